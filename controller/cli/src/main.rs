//! `automigrate`: the command line.
//!
//! Today it holds the tools that need no cluster: `plan` replays a cluster snapshot through the
//! decision engine and prints what the controller would do and why; `check` validates policy
//! files before they are deployed; `transfer` drives the agent-to-agent transfer engine by hand
//! (operators, benchmarks); `demo` runs the embedded single-machine mode (automigrate-embedded)
//! with real failures and writes its report; `faults` runs the fault-injection suite over it. `plan` and `check` read files, call the pure
//! engine, and print; the engine itself never touches a file or a clock.

mod cluster;
mod demo;
mod faults;
mod load;
mod render;
mod transfer;

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand, ValueEnum};

#[derive(Debug, Parser)]
#[command(
    name = "automigrate",
    version,
    about = "Keep deep-learning training alive when nodes fail: checkpoint, migrate, resume."
)]
struct Cli {
    /// Log filter (tracing env-filter syntax), e.g. `debug` or `automigrate_core=debug`.
    #[arg(long, env = "AUTOMIGRATE_LOG", default_value = "warn", global = true)]
    log: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum Output {
    Text,
    Json,
    Yaml,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Print the decisions the controller would make for a cluster snapshot, with reasons.
    Plan {
        /// Cluster snapshot (YAML or JSON): nodes, protected pods, links, users, alerts.
        #[arg(long)]
        snapshot: PathBuf,
        /// A policy ConfigMap file, or a directory of them (every *.yaml / *.yml).
        #[arg(long)]
        policies: Option<PathBuf>,
        /// Decide as of this time (RFC 3339). Default: the snapshot's `takenAt`, else now.
        #[arg(long)]
        now: Option<jiff::Timestamp>,
        /// Engine memory from an earlier pass (hysteresis, dwell timers), as written by
        /// `--save-memory`.
        #[arg(long)]
        memory: Option<PathBuf>,
        /// Write the engine memory after this pass, to chain passes.
        #[arg(long)]
        save_memory: Option<PathBuf>,
        #[arg(long, value_enum, default_value = "text")]
        output: Output,
        /// Most YAML nodes (values, lists and maps; about 30 per cluster node or pod) read from
        /// the snapshot, a guard against runaway documents.
        #[arg(long, default_value_t = automigrate_core::ClusterSnapshot::DEFAULT_MAX_YAML_NODES)]
        max_yaml_nodes: usize,
    },
    /// Validate policy ConfigMap files; exits non-zero if any is invalid, or if a file holds
    /// no policy (it says why: no label, a mistyped label, not a ConfigMap, empty). A
    /// kustomization (a directory with `kustomization.yaml`, or the file) is followed as
    /// kustomize reads it: the policies among its resources are checked, its other manifests
    /// skipped, and it fails only if they hold no policy.
    Check {
        /// Files or directories.
        #[arg(required = true)]
        paths: Vec<PathBuf>,
    },
    /// Move a directory between agents over mutual TLS (send, receive, dev certificates).
    Transfer(Box<transfer::Args>),
    /// Run real failures, migrations and resumes on this machine (root, runc, CRIU 4) and
    /// write the report.
    Demo(Box<demo::Args>),
    /// Run the fault-injection suite on the local cluster of real components (root, runc, CRIU 4,
    /// kubectl; the API server, kubelet, agent and controller binaries)
    /// and write its report.
    Faults(Box<faults::Args>),
    /// Run the local cluster of real components (API server, kubelets, agents, controller) for
    /// your own pods: `automigrate cluster up`, then `kubectl --kubeconfig <root>/kubeconfig`.
    Cluster(Box<cluster::Args>),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let filter = tracing_subscriber::EnvFilter::try_new(&cli.log)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        // Logging is best effort: a failed write must not panic the long runs (demo, faults).
        .log_internal_errors(false)
        .init();
    match run(cli.command) {
        Ok(code) => code,
        Err(error) => {
            eprintln!("error: {error:#}");
            ExitCode::from(2)
        }
    }
}

fn run(command: Command) -> Result<ExitCode> {
    match command {
        Command::Plan {
            snapshot,
            policies,
            now,
            memory,
            save_memory,
            output,
            max_yaml_nodes,
        } => {
            let snapshot = load::snapshot(&snapshot, max_yaml_nodes)?;
            let policies = match policies {
                Some(path) => {
                    let loaded = load::policies(&path)?;
                    for missing in &loaded.missing {
                        eprintln!("warning: {missing}");
                    }
                    if !loaded.errors.is_empty() {
                        for error in &loaded.errors {
                            eprintln!("error: {error}");
                        }
                        anyhow::bail!(
                            "{} invalid polic{} in {}; fix {} or leave the file out",
                            loaded.errors.len(),
                            if loaded.errors.len() == 1 { "y" } else { "ies" },
                            path.display(),
                            if loaded.errors.len() == 1 {
                                "it"
                            } else {
                                "them"
                            }
                        );
                    }
                    loaded.set
                }
                None => automigrate_core::PolicySet::new(),
            };
            let memory = match memory {
                Some(path) => load::memory(&path)?,
                None => automigrate_core::EngineMemory::default(),
            };
            let now = now
                .or(snapshot.taken_at)
                .unwrap_or_else(jiff::Timestamp::now);
            let (decisions, memory) = automigrate_core::decide(&snapshot, &policies, &memory, now);
            match output {
                Output::Text => print!("{}", render::text(&decisions, &policies)),
                Output::Json => println!("{}", serde_json::to_string_pretty(&decisions)?),
                Output::Yaml => print!("{}", serde_saphyr::to_string(&decisions)?),
            }
            if let Some(path) = save_memory {
                let text = serde_json::to_string_pretty(&memory)?;
                std::fs::write(&path, text)
                    .with_context(|| format!("writing engine memory to {}", path.display()))?;
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Transfer(args) => {
            transfer::run(*args)?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Demo(args) => demo::run(*args),
        Command::Faults(args) => faults::run(*args),
        Command::Cluster(args) => cluster::run(*args),
        Command::Check { paths } => {
            let mut failed = 0usize;
            for path in &paths {
                let loaded = load::policies(path)?;
                for name in loaded.set.names() {
                    println!("ok      {name}");
                }
                for error in &loaded.errors {
                    println!("invalid {error}");
                }
                // A file meant as a policy that is not one must not pass as checked.
                for missing in &loaded.missing {
                    println!("none    {missing}");
                }
                for skipped in &loaded.skipped {
                    println!("skipped {skipped}");
                }
                failed += loaded.errors.len() + loaded.missing.len();
            }
            Ok(if failed == 0 {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            })
        }
    }
}
