//! Running the external programs that do the privileged work (`runc`, `criu`).
//!
//! Owns the [`CommandRunner`] seam: backends describe a program run as an [`Invocation`]
//! (program, arguments, working directory, time limit, whether its output is read) and a runner
//! carries it out. [`SystemRunner`] starts real processes; [`RecordingRunner`] records every
//! invocation and answers from a script, so tests can check the exact argv a backend produces
//! without root.

use std::collections::VecDeque;
use std::fmt;
use std::future::Future;
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// One program run, as a backend asks for it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Invocation {
    pub program: String,
    pub args: Vec<String>,
    pub cwd: Option<PathBuf>,
    pub timeout: Option<Duration>,
    /// Read stdout and stderr. Off for commands that leave a detached process behind
    /// (`runc run -d`, `runc restore -d`): it would inherit the pipes and keep them open, so
    /// reading them would never finish. Such commands write their errors to a log file.
    pub capture_output: bool,
}

impl Invocation {
    pub fn new(program: impl Into<String>) -> Self {
        Self {
            program: program.into(),
            args: Vec::new(),
            cwd: None,
            timeout: None,
            capture_output: true,
        }
    }

    pub fn arg(mut self, arg: impl Into<String>) -> Self {
        self.args.push(arg.into());
        self
    }

    pub fn args<I, S>(mut self, args: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.args.extend(args.into_iter().map(Into::into));
        self
    }

    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = Some(timeout);
        self
    }

    pub fn cwd(mut self, cwd: impl Into<PathBuf>) -> Self {
        self.cwd = Some(cwd.into());
        self
    }

    pub fn without_output(mut self) -> Self {
        self.capture_output = false;
        self
    }

    /// Program followed by its arguments, as `execve` receives them.
    pub fn argv(&self) -> Vec<String> {
        std::iter::once(self.program.clone())
            .chain(self.args.iter().cloned())
            .collect()
    }
}

impl fmt::Display for Invocation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.argv().join(" "))
    }
}

/// What a finished program left: its exit code (`None` when a signal ended it) and output.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CommandOutput {
    pub exit_code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
}

impl CommandOutput {
    pub fn success(stdout: impl Into<String>) -> Self {
        Self {
            exit_code: Some(0),
            stdout: stdout.into(),
            stderr: String::new(),
        }
    }

    pub fn failure(exit_code: i32, stderr: impl Into<String>) -> Self {
        Self {
            exit_code: Some(exit_code),
            stdout: String::new(),
            stderr: stderr.into(),
        }
    }

    pub fn succeeded(&self) -> bool {
        self.exit_code == Some(0)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum CommandError {
    #[error(
        "cannot start `{program}` (is it installed? scripts/install-node-deps.sh installs runc and criu): {source}"
    )]
    Spawn {
        program: String,
        source: std::io::Error,
    },
    #[error("`{command}` did not finish within {timeout:?} and was killed")]
    TimedOut { command: String, timeout: Duration },
    #[error("waiting for `{command}` failed: {source}")]
    Wait {
        command: String,
        source: std::io::Error,
    },
    #[error("the recording runner has no answer left for `{command}`")]
    ScriptExhausted { command: String },
}

/// Runs programs. Implementations must be usable from several tasks at once.
pub trait CommandRunner: Send + Sync {
    fn run(
        &self,
        invocation: &Invocation,
    ) -> impl Future<Output = Result<CommandOutput, CommandError>> + Send;
}

impl<R: CommandRunner> CommandRunner for Arc<R> {
    fn run(
        &self,
        invocation: &Invocation,
    ) -> impl Future<Output = Result<CommandOutput, CommandError>> + Send {
        (**self).run(invocation)
    }
}

/// Starts real processes with tokio. Standard input is always `/dev/null`.
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemRunner;

impl CommandRunner for SystemRunner {
    #[tracing::instrument(name = "command", skip_all, fields(command = %invocation))]
    async fn run(&self, invocation: &Invocation) -> Result<CommandOutput, CommandError> {
        let mut command = tokio::process::Command::new(&invocation.program);
        command.args(&invocation.args).stdin(Stdio::null());
        if let Some(cwd) = &invocation.cwd {
            command.current_dir(cwd);
        }
        if invocation.capture_output {
            command.stdout(Stdio::piped()).stderr(Stdio::piped());
        } else {
            command.stdout(Stdio::null()).stderr(Stdio::null());
        }
        // A run abandoned on timeout must not leave the program going on its own.
        command.kill_on_drop(true);
        let child = command.spawn().map_err(|source| CommandError::Spawn {
            program: invocation.program.clone(),
            source,
        })?;
        let finished = child.wait_with_output();
        let output = match invocation.timeout {
            Some(timeout) => tokio::time::timeout(timeout, finished).await.map_err(|_| {
                CommandError::TimedOut {
                    command: invocation.to_string(),
                    timeout,
                }
            })?,
            None => finished.await,
        }
        .map_err(|source| CommandError::Wait {
            command: invocation.to_string(),
            source,
        })?;
        let result = CommandOutput {
            exit_code: output.status.code(),
            stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
        };
        tracing::debug!(exit_code = ?result.exit_code, "finished");
        Ok(result)
    }
}

/// A test double: records every invocation and answers from a script.
///
/// Answers are taken in order; a matching rule (`answer_when`) wins over the queue. With an
/// empty queue and no rule it answers success with empty output, so a test only scripts the
/// calls whose output matters.
#[derive(Debug, Default)]
pub struct RecordingRunner {
    state: Mutex<RecordingState>,
}

#[derive(Debug, Default)]
struct RecordingState {
    calls: Vec<Invocation>,
    queued: VecDeque<CommandOutput>,
    rules: Vec<(Vec<String>, CommandOutput)>,
    strict: bool,
}

impl RecordingRunner {
    pub fn new() -> Self {
        Self::default()
    }

    /// Fail with [`CommandError::ScriptExhausted`] instead of answering success by default.
    pub fn strict(self) -> Self {
        self.with_state(|state| state.strict = true);
        self
    }

    /// The next unmatched call gets this answer.
    pub fn push_answer(&self, output: CommandOutput) {
        self.with_state(|state| state.queued.push_back(output));
    }

    /// Every call whose argv starts with `argv_prefix` gets this answer.
    pub fn answer_when<S: Into<String>>(
        &self,
        argv_prefix: impl IntoIterator<Item = S>,
        output: CommandOutput,
    ) {
        let prefix = argv_prefix.into_iter().map(Into::into).collect();
        self.with_state(|state| state.rules.push((prefix, output)));
    }

    pub fn calls(&self) -> Vec<Invocation> {
        self.with_state(|state| state.calls.clone())
    }

    /// The argv of every call, in order.
    pub fn argvs(&self) -> Vec<Vec<String>> {
        self.calls().iter().map(Invocation::argv).collect()
    }

    fn with_state<T>(&self, f: impl FnOnce(&mut RecordingState) -> T) -> T {
        // A poisoned lock only means another test thread panicked; the record is still usable.
        let mut guard = self
            .state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        f(&mut guard)
    }
}

impl CommandRunner for RecordingRunner {
    async fn run(&self, invocation: &Invocation) -> Result<CommandOutput, CommandError> {
        self.with_state(|state| {
            state.calls.push(invocation.clone());
            let argv = invocation.argv();
            if let Some((_, output)) = state
                .rules
                .iter()
                .find(|(prefix, _)| argv.starts_with(prefix))
            {
                return Ok(output.clone());
            }
            match state.queued.pop_front() {
                Some(output) => Ok(output),
                None if state.strict => Err(CommandError::ScriptExhausted {
                    command: invocation.to_string(),
                }),
                None => Ok(CommandOutput::success("")),
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn system_runner_captures_output_and_exit_code() {
        let output = SystemRunner
            .run(&Invocation::new("sh").args(["-c", "echo out; echo err >&2; exit 3"]))
            .await
            .unwrap();
        assert_eq!(output.exit_code, Some(3));
        assert_eq!(output.stdout, "out\n");
        assert_eq!(output.stderr, "err\n");
        assert!(!output.succeeded());
    }

    #[tokio::test]
    async fn system_runner_kills_on_timeout() {
        let error = SystemRunner
            .run(
                &Invocation::new("sleep")
                    .arg("30")
                    .timeout(Duration::from_millis(100)),
            )
            .await
            .unwrap_err();
        assert!(matches!(error, CommandError::TimedOut { .. }), "{error}");
    }

    #[tokio::test]
    async fn system_runner_names_a_missing_program() {
        let error = SystemRunner
            .run(&Invocation::new("/nonexistent/runc"))
            .await
            .unwrap_err();
        assert!(error.to_string().contains("/nonexistent/runc"), "{error}");
        assert!(
            error.to_string().contains("install-node-deps.sh"),
            "{error}"
        );
    }

    #[tokio::test]
    async fn recording_runner_records_and_answers_in_order() {
        let runner = RecordingRunner::new();
        runner.answer_when(
            ["criu", "--version"],
            CommandOutput::success("Version: 4.1.1\n"),
        );
        runner.push_answer(CommandOutput::failure(1, "boom"));
        let first = runner
            .run(&Invocation::new("runc").arg("list"))
            .await
            .unwrap();
        let version = runner
            .run(&Invocation::new("criu").arg("--version"))
            .await
            .unwrap();
        let third = runner.run(&Invocation::new("true")).await.unwrap();
        assert_eq!(first.exit_code, Some(1));
        assert_eq!(version.stdout, "Version: 4.1.1\n");
        assert!(third.succeeded());
        assert_eq!(
            runner.argvs(),
            vec![
                vec!["runc", "list"],
                vec!["criu", "--version"],
                vec!["true"]
            ]
        );
    }

    #[tokio::test]
    async fn strict_recording_runner_refuses_unscripted_calls() {
        let runner = RecordingRunner::new().strict();
        let error = runner.run(&Invocation::new("runc")).await.unwrap_err();
        assert!(matches!(error, CommandError::ScriptExhausted { .. }));
    }
}
