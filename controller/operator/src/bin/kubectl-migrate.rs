//! `kubectl migrate POD [--to NODE] [-n NAMESPACE]`: asks the automigrate controller to move a
//! protected pod and follows the Migration until it ends. On PATH as `kubectl-migrate`, kubectl
//! runs it as the `migrate` plugin.
//!
//! Exit status: 0 when the migration succeeded, 1 when it ended otherwise (rolled back,
//! restarted, failed) or could not be followed, 2 when `--timeout` passed first.

use std::time::Duration;

use anyhow::Context;
use automigrate_core::migration::Phase;
use automigrate_operator::crd::Migration;
use automigrate_operator::manual;
use clap::Parser;
use kube::{Api, ResourceExt};

fn duration(text: &str) -> Result<Duration, String> {
    humantime::parse_duration(text).map_err(|error| error.to_string())
}

#[derive(Debug, Parser)]
#[command(
    name = "kubectl-migrate",
    version,
    about = "Move a protected pod to another node."
)]
struct Args {
    /// The pod to move.
    pod: String,
    /// The node to move it to (default: the controller chooses).
    #[arg(long)]
    to: Option<String>,
    /// The pod's namespace (default: the kubeconfig's).
    #[arg(short = 'n', long, env = "KUBECTL_NAMESPACE")]
    namespace: Option<String>,
    /// Why, recorded on the Migration.
    #[arg(long, default_value = "requested with kubectl migrate")]
    reason: String,
    /// Create the Migration and return without following it.
    #[arg(long)]
    no_follow: bool,
    /// Stop following after this long (the migration goes on).
    #[arg(long, default_value = "30m", value_parser = duration)]
    timeout: Duration,
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<std::process::ExitCode> {
    let args = Args::parse();
    let _ = rustls::crypto::ring::default_provider().install_default();
    let client = kube::Client::try_default()
        .await
        .context("no Kubernetes configuration (kubeconfig or in-cluster)")?;
    let namespace = args
        .namespace
        .clone()
        .unwrap_or_else(|| client.default_namespace().to_string());
    let api: Api<Migration> = Api::namespaced(client, &namespace);
    let migration = manual::request(&api, &args.pod, args.to.as_deref(), &args.reason).await?;
    let name = migration.name_any();
    println!("migration.automigrate.dev/{name} created");
    if args.no_follow {
        return Ok(std::process::ExitCode::SUCCESS);
    }
    let followed = tokio::time::timeout(
        args.timeout,
        manual::follow(&api, &name, |migration| {
            println!("{}", manual::describe(migration));
        }),
    )
    .await;
    match followed {
        Ok(Ok(Phase::Succeeded)) => Ok(std::process::ExitCode::SUCCESS),
        Ok(Ok(phase)) => {
            eprintln!("migration {name} ended {phase}");
            Ok(std::process::ExitCode::from(1))
        }
        Ok(Err(error)) => {
            eprintln!("{error}");
            Ok(std::process::ExitCode::from(1))
        }
        Err(_) => {
            eprintln!(
                "still running after {}; follow it with `kubectl get migration {name} -n {namespace} -w`",
                humantime::format_duration(args.timeout)
            );
            Ok(std::process::ExitCode::from(2))
        }
    }
}
