//! `automigrate-kubelet`: the local cluster's kubelet for one node (see docs/local-cluster.md).

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use automigrate_kubelet::node::NodeConfig;
use automigrate_kubelet::pods::PodConfig;
use automigrate_kubelet::{Kubelet, KubeletConfig};
use clap::Parser;

#[derive(Debug, Parser)]
#[command(
    version,
    about = "The local cluster's kubelet: registers its Node, renews its Lease, runs the pods bound to it with runc"
)]
struct Args {
    /// The Node's name.
    #[arg(long, env = "NODE_NAME")]
    node_name: String,
    /// The node's address (InternalIP, every pod's hostIP).
    #[arg(long)]
    node_ip: String,
    /// Kubeconfig to reach the API server (default: $KUBECONFIG, ~/.kube/config, in-cluster).
    #[arg(long)]
    kubeconfig: Option<PathBuf>,
    /// The kubelet's state directory (runc state, pod bundles, checkpoints).
    #[arg(long, default_value = "/var/lib/kubelet")]
    root_dir: PathBuf,
    /// Port of the kubelet API.
    #[arg(long, default_value_t = 10250)]
    port: u16,
    /// How often the Node's status is posted (the real kubelet's nodeStatusUpdateFrequency).
    #[arg(long, default_value = "10s", value_parser = humantime_duration)]
    node_status_update_frequency: Duration,
    /// How often the node Lease is renewed.
    #[arg(long, default_value = "10s", value_parser = humantime_duration)]
    lease_renew_interval: Duration,
    /// The node Lease's duration in seconds.
    #[arg(long, default_value_t = 40)]
    node_lease_duration_seconds: i32,
    /// Address the kubelet API (the checkpoint call) listens on; default: the node IP and --port.
    #[arg(long)]
    listen: Option<std::net::SocketAddr>,
    /// The checkpoint directory named in checkpoint answers (where the node's agent finds this
    /// kubelet's checkpoint directory mounted, as on a real node).
    #[arg(long, default_value = automigrate_checkpoint::kubelet::KUBELET_CHECKPOINT_DIR)]
    reported_checkpoint_dir: PathBuf,
    /// Hard eviction thresholds that decide MemoryPressure and DiskPressure, in the kubelet's
    /// syntax (its defaults; nothing is evicted here).
    #[arg(long, default_value = "memory.available<100Mi,nodefs.available<10%")]
    eviction_hard: automigrate_kubelet::node::Thresholds,
    /// The runc program.
    #[arg(long, default_value = "runc")]
    runc: String,
    /// `FROM=TO`: a `hostPath` volume under FROM is bound from the same path under TO
    /// (repeatable; the first match wins). For several local nodes on one host: each node's
    /// kubelet maps e.g. `/var/lib/automigrate` to that node's own directory, as separate
    /// machines each have their own.
    #[arg(long, value_parser = host_path_mapping)]
    host_path_map: Vec<(PathBuf, PathBuf)>,
}

fn host_path_mapping(text: &str) -> Result<(PathBuf, PathBuf), String> {
    let (from, to) = text
        .split_once('=')
        .ok_or_else(|| format!("`{text}`: expected FROM=TO"))?;
    let (from, to) = (PathBuf::from(from), PathBuf::from(to));
    if !from.is_absolute() || !to.is_absolute() {
        return Err(format!("`{text}`: both paths must be absolute"));
    }
    Ok((from, to))
}

fn humantime_duration(text: &str) -> Result<Duration, String> {
    let (number, unit) = text.split_at(
        text.find(|c: char| !c.is_ascii_digit())
            .unwrap_or(text.len()),
    );
    let value: u64 = number
        .parse()
        .map_err(|_| format!("`{text}` is not a duration like 10s or 500ms"))?;
    match unit {
        "ms" => Ok(Duration::from_millis(value)),
        "s" | "" => Ok(Duration::from_secs(value)),
        "m" => Ok(Duration::from_secs(value * 60)),
        _ => Err(format!("`{text}`: unit must be ms, s or m")),
    }
}

/// `automigrate-kubelet import-image`: the node's image import, what the agent's
/// `--image-import-command` runs (`skopeo copy oci:{layout}:{tag} containers-storage:{image}` on
/// a CRI-O node).
#[derive(Debug, Parser)]
#[command(name = "automigrate-kubelet import-image")]
struct ImportArgs {
    /// The kubelet's state directory (its image store is `<root-dir>/images`).
    #[arg(long, default_value = "/var/lib/kubelet")]
    root_dir: PathBuf,
    /// The OCI layout to import, `oci:<dir>:<tag>`.
    source: String,
    /// The reference pods name it by.
    image: String,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    if std::env::args().nth(1).as_deref() == Some("import-image") {
        let args = ImportArgs::parse_from(std::env::args().skip(1));
        let layout = automigrate_kubelet::runtime::Layout::new(&args.root_dir);
        let dir = automigrate_kubelet::images::import(&layout.images(), &args.source, &args.image)
            .with_context(|| format!("importing {} as {}", args.source, args.image))?;
        println!("{}", dir.display());
        return Ok(());
    }
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .init();
    let _ = rustls::crypto::ring::default_provider().install_default();
    let args = Args::parse();
    let client = match &args.kubeconfig {
        Some(path) => {
            let kubeconfig = kube::config::Kubeconfig::read_from(path)
                .with_context(|| format!("reading {}", path.display()))?;
            let config = kube::Config::from_custom_kubeconfig(
                kubeconfig,
                &kube::config::KubeConfigOptions::default(),
            )
            .await
            .context("kubeconfig")?;
            kube::Client::try_from(config).context("API client")?
        }
        None => kube::Client::try_default()
            .await
            .context("no Kubernetes configuration")?,
    };
    std::fs::create_dir_all(&args.root_dir)
        .with_context(|| format!("creating {}", args.root_dir.display()))?;
    let mut node = NodeConfig::new(&args.node_name, &args.node_ip, args.root_dir.clone());
    node.port = args.port;
    node.status_update_interval = args.node_status_update_frequency;
    node.lease_renew_interval = args.lease_renew_interval;
    node.lease_duration_seconds = args.node_lease_duration_seconds;
    node.thresholds = args.eviction_hard;
    let config = KubeletConfig {
        node,
        pods: PodConfig {
            host_path_map: args.host_path_map,
            ..PodConfig::new(&args.node_name, &args.node_ip)
        },
        runc: args.runc,
        api_listen: Some(match args.listen {
            Some(addr) => addr,
            None => std::net::SocketAddr::new(
                args.node_ip
                    .parse()
                    .context("--node-ip must be an IP address")?,
                args.port,
            ),
        }),
        reported_checkpoint_dir: args.reported_checkpoint_dir,
    };
    let mut kubelet = Kubelet::start(client, config)
        .await
        .context("starting the kubelet")?;
    tracing::info!(node = %args.node_name, "kubelet running");
    tokio::select! {
        result = kubelet.wait() => result.context("kubelet loop ended")?,
        _ = tokio::signal::ctrl_c() => {
            tracing::info!("shutting down (containers keep running)");
            kubelet.shutdown().await.context("shutdown")?;
        }
    }
    Ok(())
}
