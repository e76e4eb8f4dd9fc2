//! Named network namespaces: creating and deleting them with `ip netns`, running code or
//! commands inside them, and setting their per-namespace sysctls.
//!
//! Data model: a [`Namespace`] owns one `/run/netns/NAME` bind mount; dropping it deletes the
//! namespace (best effort, logged). Code runs inside a namespace on a short-lived thread that
//! `setns(2)`s into it: the network namespace is per thread, so the rest of the process is
//! untouched, and sockets or TUN devices created there stay in that namespace wherever their file
//! descriptors are used afterwards.

use std::ffi::OsStr;
use std::fs::File;
use std::io::Write as _;
use std::path::PathBuf;
use std::process::Command;

use nix::sched::{CloneFlags, setns};

/// Where `ip netns` keeps its namespace handles.
pub const NETNS_RUN_DIR: &str = "/run/netns";

/// What went wrong with a namespace.
#[derive(Debug, thiserror::Error)]
pub enum NamespaceError {
    /// A namespace name `ip netns` would refuse or misread.
    #[error("invalid namespace name {0:?}: use 1-64 characters of [A-Za-z0-9_.-]")]
    InvalidName(String),
    /// `ip` could not be started at all.
    #[error("cannot run `ip` (iproute2 is required): {0}")]
    IpMissing(#[source] std::io::Error),
    /// An `ip` command failed.
    #[error("`ip {args}` failed: {stderr}")]
    IpFailed {
        /// The arguments given to `ip`.
        args: String,
        /// What `ip` printed on stderr.
        stderr: String,
    },
    /// The namespace handle could not be opened or entered.
    #[error("cannot enter network namespace {name}: {source}")]
    Enter {
        /// Namespace name.
        name: String,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// The thread running code in the namespace panicked.
    #[error("the thread running inside namespace {0} panicked")]
    ThreadPanicked(String),
    /// A sysctl key that is not a dotted path of plain names.
    #[error("invalid sysctl key {0:?}")]
    InvalidSysctlKey(String),
    /// Writing a sysctl failed.
    #[error("cannot set sysctl {key}={value} in namespace {name}: {source}")]
    Sysctl {
        /// Namespace name.
        name: String,
        /// Dotted sysctl key.
        key: String,
        /// Value written.
        value: String,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
}

/// Runs `ip ARGS`, returning its stderr as the error when it fails.
#[tracing::instrument(level = "debug")]
pub(crate) fn run_ip(args: &[&str]) -> Result<(), NamespaceError> {
    let output = Command::new("ip")
        .args(args)
        .output()
        .map_err(NamespaceError::IpMissing)?;
    if output.status.success() {
        Ok(())
    } else {
        Err(NamespaceError::IpFailed {
            args: args.join(" "),
            stderr: String::from_utf8_lossy(&output.stderr).trim().to_owned(),
        })
    }
}

/// Whether `name` is safe to use as a namespace name (and in a path under `/run/netns`).
pub(crate) fn valid_name(name: &str) -> bool {
    (1..=64).contains(&name.len())
        && name != "."
        && name != ".."
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.'))
}

/// Moves the calling thread into the named network namespace.
///
/// Only the calling thread moves. Use it on threads you own (for example the threads of a
/// dedicated runtime); [`run_in_namespace`] does it on a scoped thread for you.
#[tracing::instrument(level = "trace")]
pub fn enter_namespace(name: &str) -> Result<(), NamespaceError> {
    if !valid_name(name) {
        return Err(NamespaceError::InvalidName(name.to_owned()));
    }
    let handle = File::open(PathBuf::from(NETNS_RUN_DIR).join(name)).map_err(|source| {
        NamespaceError::Enter {
            name: name.to_owned(),
            source,
        }
    })?;
    setns(&handle, CloneFlags::CLONE_NEWNET).map_err(|errno| NamespaceError::Enter {
        name: name.to_owned(),
        source: std::io::Error::from(errno),
    })
}

/// Runs `work` on a new thread inside the named namespace and returns its result.
pub fn run_in_namespace<T, F>(name: &str, work: F) -> Result<T, NamespaceError>
where
    T: Send,
    F: FnOnce() -> T + Send,
{
    std::thread::scope(|scope| {
        let thread = std::thread::Builder::new()
            .name(format!("netns-{name}"))
            .spawn_scoped(scope, || {
                enter_namespace(name)?;
                Ok(work())
            })
            .map_err(|source| NamespaceError::Enter {
                name: name.to_owned(),
                source,
            })?;
        thread
            .join()
            .map_err(|_| NamespaceError::ThreadPanicked(name.to_owned()))?
    })
}

/// A `Command` that runs `program` inside the named namespace (`ip netns exec NAME program`).
/// Add arguments, environment and stdio to it as to any `Command`; it also converts into
/// `tokio::process::Command`.
pub fn namespace_command(name: &str, program: impl AsRef<OsStr>) -> Command {
    let mut command = Command::new("ip");
    command.args(["netns", "exec", name]).arg(program);
    command
}

/// Sets a sysctl (`net.ipv4.tcp_congestion_control`-style dotted key) inside the namespace, by
/// writing `/proc/sys/...` from a thread that entered it (net sysctls are per namespace, and the
/// namespace `/proc/sys/net` shows is that of the thread opening it).
#[tracing::instrument(level = "debug")]
pub fn set_namespace_sysctl(name: &str, key: &str, value: &str) -> Result<(), NamespaceError> {
    let valid_key = !key.is_empty()
        && key.split('.').all(|part| {
            !part.is_empty()
                && part != ".."
                && part
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-'))
        });
    if !valid_key {
        return Err(NamespaceError::InvalidSysctlKey(key.to_owned()));
    }
    let path = PathBuf::from("/proc/sys").join(key.replace('.', "/"));
    let sysctl_error = |source| NamespaceError::Sysctl {
        name: name.to_owned(),
        key: key.to_owned(),
        value: value.to_owned(),
        source,
    };
    run_in_namespace(name, || -> std::io::Result<()> {
        let mut file = File::options().write(true).open(&path)?;
        file.write_all(value.as_bytes())
    })?
    .map_err(sysctl_error)
}

/// Reads a sysctl inside the namespace (trimmed).
pub fn namespace_sysctl(name: &str, key: &str) -> Result<String, NamespaceError> {
    let path = PathBuf::from("/proc/sys").join(key.replace('.', "/"));
    run_in_namespace(name, || std::fs::read_to_string(&path))?
        .map(|value| value.trim().to_owned())
        .map_err(|source| NamespaceError::Sysctl {
            name: name.to_owned(),
            key: key.to_owned(),
            value: String::new(),
            source,
        })
}

/// An owned network namespace, deleted on drop.
#[derive(Debug)]
pub(crate) struct Namespace {
    name: String,
    deleted: bool,
}

impl Namespace {
    /// Creates the namespace with its loopback up and IPv6 off (so the emulated links carry only
    /// the traffic a test sends, not router solicitations).
    #[tracing::instrument(level = "debug")]
    pub(crate) fn create(name: &str) -> Result<Self, NamespaceError> {
        if !valid_name(name) {
            return Err(NamespaceError::InvalidName(name.to_owned()));
        }
        run_ip(&["netns", "add", name])?;
        // From here on, a failure deletes the half-made namespace through Drop.
        let namespace = Self {
            name: name.to_owned(),
            deleted: false,
        };
        run_ip(&["-n", name, "link", "set", "lo", "up"])?;
        set_namespace_sysctl(name, "net.ipv6.conf.all.disable_ipv6", "1")?;
        set_namespace_sysctl(name, "net.ipv6.conf.default.disable_ipv6", "1")?;
        Ok(namespace)
    }

    /// The namespace name (as `ip netns` knows it).
    pub(crate) fn name(&self) -> &str {
        &self.name
    }

    /// Deletes the namespace now, reporting failure.
    #[tracing::instrument(level = "debug", skip(self), fields(name = %self.name))]
    pub(crate) fn delete(mut self) -> Result<(), NamespaceError> {
        self.deleted = true;
        run_ip(&["netns", "delete", &self.name])
    }
}

impl Drop for Namespace {
    fn drop(&mut self) {
        if !self.deleted
            && let Err(error) = run_ip(&["netns", "delete", &self.name])
        {
            tracing::warn!(name = %self.name, %error, "could not delete network namespace");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_sysctl_keys_are_checked_before_touching_anything() {
        assert!(valid_name("amnet3-pair-0"));
        assert!(!valid_name(""));
        assert!(!valid_name(".."));
        assert!(!valid_name("a/b"));
        assert!(!valid_name(&"x".repeat(65)));
        assert!(matches!(
            set_namespace_sysctl("nonexistent-ns", "net/../../etc", "1"),
            Err(NamespaceError::InvalidSysctlKey(_))
        ));
        assert!(matches!(
            enter_namespace("../etc"),
            Err(NamespaceError::InvalidName(_))
        ));
    }
}
