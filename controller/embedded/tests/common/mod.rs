//! What every privileged test of the embedded mode shares: the rule for running or skipping,
//! where the shipped policies are, and the log set-up.

use std::io::Write;
use std::path::{Path, PathBuf};

use automigrate_embedded::demo::missing_prerequisites;

pub const SKIP_VARIABLE: &str = "AUTOMIGRATE_SKIP_PRIVILEGED";

/// True when the test may run; a missing prerequisite fails the test unless skipping was asked
/// for, and a skip is never silent.
pub fn privileged(test: &str) -> bool {
    if std::env::var(SKIP_VARIABLE).as_deref() == Ok("1") {
        let _ = writeln!(
            std::io::stderr(),
            "\n************************************************************\n\
             SKIPPED {test}: {SKIP_VARIABLE}=1 is set.\n\
             This test needs root, network namespaces, TUN, runc, CRIU >= 4,\n\
             iptables, python3-numpy and the automigrate-agent binary;\n\
             it did NOT run. CI never sets {SKIP_VARIABLE}.\n\
             ************************************************************\n"
        );
        return false;
    }
    let missing = missing_prerequisites();
    assert!(
        missing.is_empty(),
        "{test} cannot run: missing {}.\nInstall them with `sudo scripts/install-node-deps.sh`, \
         or set {SKIP_VARIABLE}=1 to skip privileged tests (loudly).",
        missing.join("; ")
    );
    true
}

pub fn policies_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../policies")
}

/// Logs to the test's output at `warn`, or as `AUTOMIGRATE_LOG` says:
/// `AUTOMIGRATE_LOG=automigrate_embedded=info cargo test … -- --nocapture` shows each step.
pub fn init_logs() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("AUTOMIGRATE_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_test_writer()
        .try_init();
}
