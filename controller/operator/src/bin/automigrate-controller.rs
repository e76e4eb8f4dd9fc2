//! The automigrate controller. Every flag has an environment fallback (`AUTOMIGRATE_*`), so the
//! Deployment can set them either way. Run `automigrate-controller --help` for the list.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use automigrate_core::fencing::SelfFenceTiming;
use automigrate_operator::agent_http::{AgentDirectoryConfig, HttpAgents, parse_selector};
use automigrate_operator::clock::{Clock, SystemClock};
use automigrate_operator::controller::Config;
use automigrate_operator::executor::{DeadNodeFencing, ExecutorConfig};
use automigrate_operator::prometheus::PromSignals;
use automigrate_operator::run::{Election, Stopped, run};
use clap::{Parser, ValueEnum};
use kube::runtime::events::Reporter;
use tokio::sync::watch;

#[derive(Debug, Clone, Copy, ValueEnum)]
enum LogFormat {
    Json,
    Text,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum Fencing {
    /// Every node's agent stops its protected pods once it loses its standing with the API
    /// server; a dead node counts as fenced (and gets node.kubernetes.io/out-of-service) a
    /// safe time after its last heartbeat: max(leaseTimeout, self-fence-after +
    /// self-fence-stop-time + clock-skew-allowance + fence-margin).
    SelfFence,
    /// Set node.kubernetes.io/out-of-service on a node whose Lease expired (assumes an expired
    /// node is down: a node cut off from the API server but alive keeps its copy running).
    Taint,
    /// Wait for an administrator to set that taint.
    Administrator,
}

fn duration(text: &str) -> Result<Duration, String> {
    humantime::parse_duration(text).map_err(|error| error.to_string())
}

#[derive(Debug, Parser)]
#[command(
    name = "automigrate-controller",
    version,
    about = "Keeps protected training pods alive: checkpoints, health, migrations."
)]
struct Args {
    /// Address of /metrics, /healthz, /readyz and the Alertmanager webhook.
    #[arg(long, env = "AUTOMIGRATE_LISTEN", default_value = "0.0.0.0:8080")]
    listen: SocketAddr,
    /// The controller's namespace: policies, the leader Lease and the agents live here.
    #[arg(
        long,
        env = "AUTOMIGRATE_NAMESPACE",
        default_value = "automigrate-system"
    )]
    namespace: String,
    /// Namespace of the policy ConfigMaps (default: --namespace).
    #[arg(long, env = "AUTOMIGRATE_POLICY_NAMESPACE")]
    policy_namespace: Option<String>,
    /// This replica's name in the leader Lease and on Events (the pod name).
    #[arg(
        long,
        env = "AUTOMIGRATE_IDENTITY",
        default_value = "automigrate-controller"
    )]
    identity: String,
    /// Elect a leader with a Lease (turn off only for a single replica).
    #[arg(long, env = "AUTOMIGRATE_LEADER_ELECTION", default_value_t = true, action = clap::ArgAction::Set)]
    leader_election: bool,
    #[arg(
        long,
        env = "AUTOMIGRATE_LEADER_LEASE",
        default_value = "automigrate-controller"
    )]
    leader_lease: String,
    #[arg(long, env = "AUTOMIGRATE_LEASE_DURATION", default_value = "15s", value_parser = duration)]
    lease_duration: Duration,
    #[arg(long, env = "AUTOMIGRATE_LEASE_RETRY", default_value = "5s", value_parser = duration)]
    lease_retry: Duration,
    /// Time between decision passes (a webhook alert starts one at once).
    #[arg(long, env = "AUTOMIGRATE_DECISION_INTERVAL", default_value = "10s", value_parser = duration)]
    decision_interval: Duration,
    /// Time between executor rounds over the active Migrations.
    #[arg(long, env = "AUTOMIGRATE_EXECUTOR_INTERVAL", default_value = "2s", value_parser = duration)]
    executor_interval: Duration,
    /// Time between reads of the agents' peer latency probes.
    #[arg(long, env = "AUTOMIGRATE_PROBE_INTERVAL", default_value = "30s", value_parser = duration)]
    probe_interval: Duration,
    /// While some node's Lease is late (older than --heartbeat-interval + 1s), the agents'
    /// peer probes are read this often, for peer-confirmed failure detection (0s: never).
    #[arg(long, env = "AUTOMIGRATE_PEER_REACH_INTERVAL", default_value = "2s", value_parser = duration)]
    peer_reach_interval: Duration,
    /// Prometheus HTTP API base URL for the policies' PromQL signal queries
    /// (`signals.linkLatencyQuery`, `signals.userLatencyQuery`); without it they are not run.
    #[arg(long, env = "AUTOMIGRATE_PROMETHEUS_URL")]
    prometheus_url: Option<String>,
    /// Limit for one PromQL query.
    #[arg(long, env = "AUTOMIGRATE_PROMETHEUS_TIMEOUT", default_value = "10s", value_parser = duration)]
    prometheus_timeout: Duration,
    /// How long a latency observation (agent probe, PromQL) counts (default: 3 × --probe-interval).
    #[arg(long, env = "AUTOMIGRATE_SIGNAL_MAX_AGE", value_parser = duration)]
    signal_max_age: Option<Duration>,
    /// File holding the Alertmanager webhook's bearer token; without it the webhook is off.
    #[arg(long, env = "AUTOMIGRATE_WEBHOOK_TOKEN_FILE")]
    webhook_token_file: Option<std::path::PathBuf>,
    /// How long a firing alert counts if Alertmanager does not repeat it.
    #[arg(long, env = "AUTOMIGRATE_ALERT_TTL", default_value = "4h", value_parser = duration)]
    alert_ttl: Duration,
    /// Namespace of the agent DaemonSet's pods (default: --namespace).
    #[arg(long, env = "AUTOMIGRATE_AGENT_NAMESPACE")]
    agent_namespace: Option<String>,
    /// Labels of the agent pods, `key=value,key=value`.
    #[arg(
        long,
        env = "AUTOMIGRATE_AGENT_SELECTOR",
        default_value = "app.kubernetes.io/name=automigrate,app.kubernetes.io/component=agent"
    )]
    agent_selector: String,
    #[arg(long, env = "AUTOMIGRATE_AGENT_PORT", default_value_t = 9460)]
    agent_port: u16,
    #[arg(long, env = "AUTOMIGRATE_AGENT_TRANSFER_PORT", default_value_t = 9461)]
    agent_transfer_port: u16,
    #[arg(long, env = "AUTOMIGRATE_AGENT_SCHEME", default_value = "http")]
    agent_scheme: String,
    /// File holding the agents' bearer token.
    #[arg(long, env = "AUTOMIGRATE_AGENT_TOKEN_FILE")]
    agent_token_file: Option<std::path::PathBuf>,
    /// PEM CA bundle for https agents.
    #[arg(long, env = "AUTOMIGRATE_AGENT_CA_FILE")]
    agent_ca_file: Option<std::path::PathBuf>,
    /// The agents' data root (dataset paths are sent relative to it).
    #[arg(
        long,
        env = "AUTOMIGRATE_AGENT_DATA_ROOT",
        default_value = "/var/lib/automigrate/data"
    )]
    agent_data_root: String,
    /// The agents' checkpoint store on each node (mounted into application-mode replacements).
    #[arg(
        long,
        env = "AUTOMIGRATE_CHECKPOINT_ROOT",
        default_value = "/var/lib/automigrate/checkpoints"
    )]
    checkpoint_root: String,
    /// Limit for one agent call (a synchronous checkpoint included).
    #[arg(long, env = "AUTOMIGRATE_AGENT_TIMEOUT", default_value = "10m", value_parser = duration)]
    agent_timeout: Duration,
    /// Who confirms that a dead node's pods cannot run any more.
    #[arg(
        long,
        env = "AUTOMIGRATE_DEAD_NODE_FENCING",
        value_enum,
        default_value = "self-fence"
    )]
    dead_node_fencing: Fencing,
    /// Self-fence mode: the heartbeat age at which the agents stop their node's protected
    /// pods. At least every agent's --self-fence-after.
    #[arg(long, env = "AUTOMIGRATE_SELF_FENCE_AFTER", default_value = "15s", value_parser = duration)]
    self_fence_after: Duration,
    /// Self-fence mode: the longest an agent takes to have them stopped (its
    /// --self-fence-stop-time).
    #[arg(long, env = "AUTOMIGRATE_SELF_FENCE_STOP_TIME", default_value = "5s", value_parser = duration)]
    self_fence_stop_time: Duration,
    /// Self-fence mode: how far node clocks and this controller's clock may disagree.
    #[arg(long, env = "AUTOMIGRATE_CLOCK_SKEW_ALLOWANCE", default_value = "2s", value_parser = duration)]
    clock_skew_allowance: Duration,
    /// Self-fence mode: margin added to the safe time.
    #[arg(long, env = "AUTOMIGRATE_FENCE_MARGIN", default_value = "3s", value_parser = duration)]
    fence_margin: Duration,
    /// Self-fence mode: how often kubelets renew their node's Lease (the agents'
    /// --heartbeat-interval).
    #[arg(long, env = "AUTOMIGRATE_HEARTBEAT_INTERVAL", default_value = "10s", value_parser = duration)]
    heartbeat_interval: Duration,
    /// Self-fence mode: how often the agents check their heartbeat (their
    /// --self-fence-check-interval).
    #[arg(long, env = "AUTOMIGRATE_SELF_FENCE_CHECK_INTERVAL", default_value = "1s", value_parser = duration)]
    self_fence_check_interval: Duration,
    #[arg(
        long,
        env = "AUTOMIGRATE_LOG_FORMAT",
        value_enum,
        default_value = "json"
    )]
    log_format: LogFormat,
}

/// The `--dead-node-fencing` mode; self-fence timing that breaks the safe-time rule is refused.
fn fencing_mode(args: &Args) -> anyhow::Result<DeadNodeFencing> {
    Ok(match args.dead_node_fencing {
        Fencing::SelfFence => {
            let timing = SelfFenceTiming {
                self_fence_after: args.self_fence_after,
                stop_time: args.self_fence_stop_time,
                clock_skew: args.clock_skew_allowance,
                margin: args.fence_margin,
                heartbeat_interval: args.heartbeat_interval,
                check_interval: args.self_fence_check_interval,
            };
            timing
                .validate()
                .context("--dead-node-fencing self-fence")?;
            DeadNodeFencing::SelfFence(timing)
        }
        Fencing::Taint => DeadNodeFencing::Taint,
        Fencing::Administrator => DeadNodeFencing::Administrator,
    })
}

fn read_secret(path: &std::path::Path) -> anyhow::Result<String> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let text = text.trim().to_string();
    anyhow::ensure!(!text.is_empty(), "{} is empty", path.display());
    Ok(text)
}

fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    // Logging is best effort: a failed write must not panic (see the agent's `init_tracing`).
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .log_internal_errors(false);
    match format {
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .init(),
        LogFormat::Text => builder.init(),
    }
}

async fn signalled() -> anyhow::Result<&'static str> {
    let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        _ = terminate.recv() => Ok("SIGTERM"),
        result = tokio::signal::ctrl_c() => result.map(|()| "SIGINT").map_err(Into::into),
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    init_logging(args.log_format);
    let _ = rustls::crypto::ring::default_provider().install_default();
    let metrics = automigrate_operator::metrics::install_with(
        automigrate_operator::metrics::gauge_idle_timeout(args.decision_interval),
    )
    .context("installing the metrics recorder")?;

    let client = kube::Client::try_default()
        .await
        .context("no Kubernetes configuration (in-cluster or kubeconfig)")?;
    let clock: Arc<dyn Clock> = Arc::new(SystemClock);
    let selector = parse_selector(&args.agent_selector)
        .map_err(|error| anyhow::anyhow!("--agent-selector: {error}"))?;
    let agents = AgentDirectoryConfig {
        namespace: args
            .agent_namespace
            .clone()
            .unwrap_or_else(|| args.namespace.clone()),
        selector,
        api_port: args.agent_port,
        transfer_port: args.agent_transfer_port,
        scheme: args.agent_scheme.clone(),
        token: args
            .agent_token_file
            .as_deref()
            .map(read_secret)
            .transpose()?,
        ca_pem: args
            .agent_ca_file
            .as_deref()
            .map(|path| std::fs::read(path).with_context(|| format!("reading {}", path.display())))
            .transpose()?,
        data_root: args.agent_data_root.clone(),
        timeout: args.agent_timeout,
    };
    let config = Config {
        decision_interval: args.decision_interval,
        executor_interval: args.executor_interval,
        probe_interval: args.probe_interval,
        policy_namespace: args
            .policy_namespace
            .clone()
            .unwrap_or_else(|| args.namespace.clone()),
        namespace: args.namespace.clone(),
        alert_ttl: args.alert_ttl,
        executor: ExecutorConfig {
            dead_node_fencing: fencing_mode(&args)?,
            checkpoint_root: args.checkpoint_root.clone(),
            ..ExecutorConfig::default()
        },
        reporter: Reporter {
            controller: "automigrate-controller".into(),
            instance: Some(args.identity.clone()),
        },
        prometheus: args
            .prometheus_url
            .as_deref()
            .map(|url| PromSignals::new(url, args.prometheus_timeout))
            .transpose()?,
        signal_max_age: args.signal_max_age,
        peer_reach_interval: args.peer_reach_interval,
        heartbeat_interval: args.heartbeat_interval,
    };
    let election = args.leader_election.then(|| Election {
        namespace: args.namespace.clone(),
        lease: args.leader_lease.clone(),
        identity: args.identity.clone(),
        lease_duration: args.lease_duration,
        retry_period: args.lease_retry,
    });
    let webhook_token = args
        .webhook_token_file
        .as_deref()
        .map(read_secret)
        .transpose()?;
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("binding {}", args.listen))?;
    tracing::info!(listen = %args.listen, "serving /metrics, /healthz, /readyz");

    let (shutdown_sender, shutdown) = watch::channel(false);
    tokio::spawn(async move {
        match signalled().await {
            Ok(signal) => tracing::info!(signal, "shutting down"),
            Err(error) => tracing::error!(%error, "signal handler failed; shutting down"),
        }
        let _ = shutdown_sender.send(true);
    });
    let stopped = run(
        client,
        listener,
        election,
        config,
        |stores| Arc::new(HttpAgents::new(stores.clone(), agents)),
        webhook_token,
        Some(metrics),
        clock,
        shutdown,
    )
    .await?;
    if stopped == Stopped::LostLeadership {
        anyhow::bail!("stopped after losing leadership");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::panic)]
    use super::*;

    fn parse(extra: &[&str]) -> Args {
        let mut argv = vec!["automigrate-controller"];
        argv.extend_from_slice(extra);
        Args::try_parse_from(argv).unwrap()
    }

    #[test]
    fn self_fence_is_the_default_and_unsafe_timing_is_refused() {
        assert_eq!(
            fencing_mode(&parse(&[])).unwrap(),
            DeadNodeFencing::SelfFence(SelfFenceTiming::default())
        );
        assert_eq!(
            fencing_mode(&parse(&["--dead-node-fencing=taint"])).unwrap(),
            DeadNodeFencing::Taint
        );
        assert_eq!(
            fencing_mode(&parse(&["--dead-node-fencing=administrator"])).unwrap(),
            DeadNodeFencing::Administrator
        );
        let error = fencing_mode(&parse(&["--self-fence-after=5s"])).unwrap_err();
        assert!(
            format!("{error:#}").contains("self-fence-after"),
            "{error:#}"
        );
        let DeadNodeFencing::SelfFence(timing) = fencing_mode(&parse(&[
            "--heartbeat-interval=1s",
            "--self-fence-after=3s",
            "--self-fence-stop-time=2s",
            "--clock-skew-allowance=1s",
            "--fence-margin=1s",
        ]))
        .unwrap() else {
            panic!("not self-fence")
        };
        assert_eq!(timing.safe_time(), Duration::from_secs(7));
    }
}
