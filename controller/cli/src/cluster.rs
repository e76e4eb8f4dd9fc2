//! `automigrate cluster up|down`: the local cluster of real components
//! (`automigrate_embedded::kube::KubeCluster`) for a user's own pods. `up` runs in the
//! foreground until Ctrl-C or `automigrate cluster down`, then removes every component,
//! container and network namespace it made. This file only turns flags into a config.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, Result};
use automigrate_embedded::kube::{self, KubeCluster, KubeClusterConfig};

/// `automigrate cluster …`
#[derive(Debug, clap::Args)]
pub struct Args {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, clap::Subcommand)]
enum Command {
    /// Start the cluster and keep it up until Ctrl-C (or `automigrate cluster down`).
    Up(UpArgs),
    /// Stop the cluster that `up` runs on this state directory.
    Down {
        /// The state directory `up` was given.
        #[arg(long, default_value = DEFAULT_ROOT)]
        root: PathBuf,
    },
}

const DEFAULT_ROOT: &str = "/dev/shm/automigrate-cluster";

#[derive(Debug, clap::Args)]
struct UpArgs {
    /// How many nodes (node-a, node-b, …).
    #[arg(long, default_value_t = 2)]
    nodes: usize,
    /// Round-trip time between neighbouring nodes (node-a to node-c is twice it), e.g. 10ms.
    #[arg(long, default_value = "10ms", value_parser = duration)]
    rtt: Duration,
    /// State directory (kubeconfig, logs, node storage); keep it on tmpfs: the kubelets report
    /// DiskPressure on a nearly full disk. Must not hold a running cluster.
    #[arg(long, default_value = DEFAULT_ROOT)]
    root: PathBuf,
    /// Where the cluster's programs are (automigrate-apiserver, -kubelet, -agent,
    /// automigrate-controller, automigrate); default: next to this program, or
    /// $AUTOMIGRATE_BIN_DIR.
    #[arg(long)]
    bin_dir: Option<PathBuf>,
    /// Policy ConfigMap files applied after deploy/policies/default.yaml (repeat).
    #[arg(long = "policy")]
    policies: Vec<PathBuf>,
    /// The controller's dead-node fencing mode (AUTOMIGRATE_DEAD_NODE_FENCING), if not its
    /// default.
    #[arg(long)]
    fencing: Option<String>,
}

fn duration(text: &str) -> Result<Duration, String> {
    let (number, unit) = text.split_at(
        text.find(|c: char| !c.is_ascii_digit())
            .unwrap_or(text.len()),
    );
    let value: u64 = number
        .parse()
        .map_err(|_| format!("`{text}` is not a duration like 10ms or 1s"))?;
    match unit {
        "ms" => Ok(Duration::from_millis(value)),
        "s" => Ok(Duration::from_secs(value)),
        _ => Err(format!("`{text}`: unit must be ms or s")),
    }
}

pub fn run(args: Args) -> Result<ExitCode> {
    match args.command {
        Command::Up(args) => up(args),
        Command::Down { root } => {
            if kube::stop_running_cluster(&root)? {
                println!("asked the cluster in {} to stop", root.display());
                Ok(ExitCode::SUCCESS)
            } else {
                eprintln!("no running cluster in {}", root.display());
                Ok(ExitCode::from(1))
            }
        }
    }
}

fn up(args: UpArgs) -> Result<ExitCode> {
    let bin_dir = match args.bin_dir {
        Some(dir) => dir,
        None => kube::find_bin_dir().context(
            "the local cluster's programs were not found next to this program: build them with \
             `cargo build --release --locked -p automigrate -p automigrate-apiserver -p \
             automigrate-kubelet -p automigrate-agent -p automigrate-operator`, or name their \
             directory with --bin-dir",
        )?,
    };
    let mut config = KubeClusterConfig::line(args.nodes, args.rtt, args.root.clone(), bin_dir);
    config.name_prefix = "cluster".into();
    config.policies = args.policies;
    if let Some(fencing) = args.fencing {
        config
            .controller_env
            .push(("AUTOMIGRATE_DEAD_NODE_FENCING".into(), fencing));
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    runtime.block_on(async move {
        let mut terminate =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
                .context("installing the SIGTERM handler")?;
        eprintln!(
            "starting a {}-node cluster in {} …",
            args.nodes,
            args.root.display()
        );
        let cluster = KubeCluster::create(config)
            .await
            .context("starting the local cluster")?;
        let kubeconfig = cluster.kubeconfig().display().to_string();
        println!("the local cluster is up:");
        println!("  kubectl --kubeconfig {kubeconfig} get nodes,pods,migrations -A");
        println!("  export KUBECONFIG={kubeconfig}");
        println!("  component logs: {}", cluster.logs_dir().display());
        println!(
            "Ctrl-C (or `automigrate cluster down --root {}`) stops it.",
            args.root.display()
        );
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = terminate.recv() => {}
        }
        eprintln!("stopping the local cluster …");
        cluster
            .teardown()
            .await
            .context("stopping the local cluster")?;
        eprintln!("stopped");
        Ok(ExitCode::SUCCESS)
    })
}
