//! The `automigrate-agent` command line. Every flag has an environment fallback
//! (`AUTOMIGRATE_*`, `NODE_NAME`), so a DaemonSet sets them from the downward API and Secrets.
//!
//! [`Args::into_parts`] checks the combination and builds what [`crate::server`] runs; the
//! binary only binds sockets and waits for a signal.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use automigrate_checkpoint::Retention;
use automigrate_checkpoint::application::ApplicationBackend;
use automigrate_checkpoint::command::SystemRunner;
use automigrate_checkpoint::kubelet::KubeletBackend;
use automigrate_checkpoint::process::ProcessBackend;
use automigrate_checkpoint::runc::RuncBackend;
use automigrate_core::units::{BitRate, Bytes};
use automigrate_transfer::TlsConfig;
use clap::{Parser, ValueEnum};

use crate::agent::AgentOptions;
use crate::api::Peer;
use crate::checkpointer::{self, Checkpointer, RuncIdTemplate, WorkloadsDir};
use crate::image::ImageOptions;
use crate::kubeapi::ApiServerTransport;
use crate::prober::{PeerSource, ProbeOptions, parse_peer};
use crate::server::{HttpLimits, ServeOptions};

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum BackendChoice {
    /// `runc checkpoint` of containers named by --runc-container-id.
    Runc,
    /// `criu dump` of processes registered in --workloads-dir.
    Process,
    /// The kubelet checkpoint API through the API server (in a pod).
    Kubelet,
    /// The program saves its own state (registered in --workloads-dir).
    Application,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

fn duration(text: &str) -> Result<Duration, String> {
    crate::api::duration::parse(text).map_err(|error| format!("{error} (write e.g. `5s`)"))
}

/// The automigrate node agent: checkpoints, the checkpoint store, transfers between nodes,
/// checkpoint images and latency probes, behind an HTTP API.
#[derive(Debug, Clone, Parser)]
#[command(name = "automigrate-agent", version)]
pub struct Args {
    /// This node's name (the Kubernetes node name; peers' certificates are checked against it).
    #[arg(long, env = "NODE_NAME")]
    pub node_name: String,

    /// HTTP API address.
    #[arg(long, env = "AUTOMIGRATE_API_LISTEN", default_value = "0.0.0.0:9460")]
    pub api_listen: SocketAddr,

    /// Time a client has to send a request's head, from connecting (or from the previous answer
    /// on a kept-alive connection); then the API closes the connection.
    #[arg(long, env = "AUTOMIGRATE_API_HEADER_TIMEOUT", value_parser = duration, default_value = "15s")]
    pub api_header_timeout: Duration,

    /// Longest a request body or an answer may stop moving before the API closes the
    /// connection.
    #[arg(long, env = "AUTOMIGRATE_API_IDLE_TIMEOUT", value_parser = duration, default_value = "60s")]
    pub api_idle_timeout: Duration,

    /// API connections served at once; more are closed as soon as they are accepted.
    #[arg(long, env = "AUTOMIGRATE_API_MAX_CONNECTIONS", default_value_t = 256,
          value_parser = clap::value_parser!(u32).range(1..))]
    pub api_max_connections: u32,

    /// Longest a shutdown (SIGTERM) waits for API requests in flight before closing them.
    #[arg(long, env = "AUTOMIGRATE_SHUTDOWN_TIMEOUT", value_parser = duration, default_value = "20s")]
    pub shutdown_timeout: Duration,

    /// Transfer engine address (TCP, mutual TLS); the latency probe responder uses the same
    /// port over UDP.
    #[arg(
        long,
        env = "AUTOMIGRATE_TRANSFER_LISTEN",
        default_value = "0.0.0.0:9461"
    )]
    pub transfer_listen: SocketAddr,

    /// Datasets live here; received datasets land at the same relative path.
    #[arg(
        long,
        env = "AUTOMIGRATE_DATA_ROOT",
        default_value = "/var/lib/automigrate/data"
    )]
    pub data_root: PathBuf,

    /// The checkpoint store.
    #[arg(
        long,
        env = "AUTOMIGRATE_STORE_ROOT",
        default_value = "/var/lib/automigrate/checkpoints"
    )]
    pub store_root: PathBuf,

    /// Checkpoint image layouts (default: <store-root>/.images).
    #[arg(long, env = "AUTOMIGRATE_IMAGE_ROOT")]
    pub image_root: Option<PathBuf>,

    /// File holding the bearer token the API requires.
    #[arg(long, env = "AUTOMIGRATE_TOKEN_FILE")]
    pub token_file: Option<PathBuf>,

    /// Serve the API without a token on a non-loopback address (only inside an isolated
    /// network namespace, e.g. the embedded mode).
    #[arg(long, env = "AUTOMIGRATE_ALLOW_UNAUTHENTICATED")]
    pub allow_unauthenticated: bool,

    /// This agent's certificate (PEM) for the transfer engine.
    #[arg(long, env = "AUTOMIGRATE_TLS_CERT")]
    pub tls_cert: PathBuf,

    /// Its private key (PEM).
    #[arg(long, env = "AUTOMIGRATE_TLS_KEY")]
    pub tls_key: PathBuf,

    /// The CA bundle peers' certificates must chain to (PEM).
    #[arg(long, env = "AUTOMIGRATE_TLS_CA")]
    pub tls_ca: PathBuf,

    /// How checkpoints are taken.
    #[arg(long, env = "AUTOMIGRATE_BACKEND", value_enum, default_value = "runc")]
    pub backend: BackendChoice,

    /// The runc program.
    #[arg(long, env = "AUTOMIGRATE_RUNC", default_value = "runc")]
    pub runc: String,

    /// runc's state directory (`runc --root`).
    #[arg(long, env = "AUTOMIGRATE_RUNC_ROOT")]
    pub runc_root: Option<PathBuf>,

    /// runc container id of a pod's container: {namespace}, {pod}, {container} are replaced.
    #[arg(
        long,
        env = "AUTOMIGRATE_RUNC_CONTAINER_ID",
        default_value = "{namespace}-{pod}-{container}"
    )]
    pub runc_container_id: String,

    /// The criu program.
    #[arg(long, env = "AUTOMIGRATE_CRIU", default_value = "criu")]
    pub criu: String,

    /// Registry of process and application workloads:
    /// <dir>/<namespace>/<pod>/<container>/{pid,save/,hook}.
    #[arg(
        long,
        env = "AUTOMIGRATE_WORKLOADS_DIR",
        default_value = "/run/automigrate/workloads"
    )]
    pub workloads_dir: PathBuf,

    /// Where the kubelet's checkpoint directory is mounted in the agent.
    #[arg(
        long,
        env = "AUTOMIGRATE_KUBELET_CHECKPOINT_DIR",
        default_value = "/var/lib/kubelet/checkpoints"
    )]
    pub kubelet_checkpoint_dir: PathBuf,

    /// API server URL for the kubelet backend (default: in-cluster service and service account).
    #[arg(long, env = "AUTOMIGRATE_KUBE_API")]
    pub kube_api: Option<String>,

    /// Longest a checkpoint may take.
    #[arg(long, env = "AUTOMIGRATE_CHECKPOINT_TIMEOUT", value_parser = duration, default_value = "5m")]
    pub checkpoint_timeout: Duration,

    /// Checkpoints kept per pod (their parents too).
    #[arg(long, env = "AUTOMIGRATE_RETAIN_COUNT", default_value_t = 3)]
    pub retain_count: u32,

    /// Byte budget per pod (e.g. 20GiB); the newest checkpoint is always kept.
    #[arg(long, env = "AUTOMIGRATE_RETAIN_BYTES")]
    pub retain_bytes: Option<Bytes>,

    /// Every n-th periodic checkpoint is full, the others incremental on the previous one
    /// (when CRIU can track memory); 1 makes every checkpoint full.
    #[arg(long, env = "AUTOMIGRATE_FULL_EVERY", default_value_t = 1)]
    pub full_every: u32,

    /// Peers to probe: `node=host:port` (their transfer address); repeat or comma-separate.
    #[arg(long = "peer", env = "AUTOMIGRATE_PEERS", value_delimiter = ',')]
    pub peers: Vec<String>,

    /// File of peers (`node=host:port` per line), re-read every probe round.
    #[arg(long, env = "AUTOMIGRATE_PEERS_FILE")]
    pub peers_file: Option<PathBuf>,

    /// How often each peer is probed.
    #[arg(long, env = "AUTOMIGRATE_PROBE_INTERVAL", value_parser = duration, default_value = "5s")]
    pub probe_interval: Duration,

    /// Probes per peer that RTT and loss are computed over.
    #[arg(long, env = "AUTOMIGRATE_PROBE_WINDOW", default_value_t = 20)]
    pub probe_window: usize,

    /// Cap on outgoing transfers (e.g. 200Mbit/s).
    #[arg(long, env = "AUTOMIGRATE_TRANSFER_RATE_LIMIT")]
    pub transfer_rate_limit: Option<BitRate>,

    /// Most parallel streams of one transfer.
    #[arg(long, env = "AUTOMIGRATE_TRANSFER_MAX_STREAMS")]
    pub transfer_max_streams: Option<u32>,

    /// TCP congestion control for transfers (e.g. cubic, bbr).
    #[arg(long, env = "AUTOMIGRATE_CONGESTION_CONTROL")]
    pub congestion_control: Option<String>,

    /// Command importing a checkpoint image layout into the runtime, split on whitespace;
    /// {layout}, {tag}, {image} are replaced (e.g.
    /// `skopeo copy oci:{layout}:{tag} containers-storage:{image}`).
    #[arg(long, env = "AUTOMIGRATE_IMAGE_IMPORT_COMMAND")]
    pub image_import_command: Option<String>,

    /// The image reference the import makes: {namespace}, {pod}, {container}, {id}.
    #[arg(
        long,
        env = "AUTOMIGRATE_IMAGE_REFERENCE",
        default_value = "localhost/automigrate/{namespace}-{pod}:{id}"
    )]
    pub image_reference: String,

    /// Self-fencing: stop this node's protected pods (`automigrate.dev/protect: "true"`) when
    /// no heartbeat younger than --self-fence-after comes from the API server or a peer (needs
    /// the API server: --kube-api or in a pod). `false`: only log when it would.
    #[arg(long, env = "AUTOMIGRATE_SELF_FENCE", default_value_t = true, action = clap::ArgAction::Set)]
    pub self_fence: bool,

    /// Heartbeat age at which this node fences itself (at most the controller's).
    #[arg(long, env = "AUTOMIGRATE_SELF_FENCE_AFTER", value_parser = duration, default_value = "15s")]
    pub self_fence_after: Duration,

    /// Longest the kill of the protected containers may take (at most the controller's);
    /// past it the watchdog, if any, is no longer fed.
    #[arg(long, env = "AUTOMIGRATE_SELF_FENCE_STOP_TIME", value_parser = duration, default_value = "5s")]
    pub self_fence_stop_time: Duration,

    /// How often the node's kubelet renews its Lease.
    #[arg(long, env = "AUTOMIGRATE_HEARTBEAT_INTERVAL", value_parser = duration, default_value = "10s")]
    pub heartbeat_interval: Duration,

    /// How often the agent checks its heartbeat.
    #[arg(long, env = "AUTOMIGRATE_SELF_FENCE_CHECK_INTERVAL", value_parser = duration, default_value = "1s")]
    pub self_fence_check_interval: Duration,

    /// runc id of a protected pod's container for the kill when its pod status gives none
    /// (`containerStatuses[].containerID` is used first): {namespace}, {pod}, {container},
    /// {uid8} (default: --runc-container-id).
    #[arg(long, env = "AUTOMIGRATE_SELF_FENCE_CONTAINER_ID")]
    pub self_fence_container_id: Option<String>,

    /// The hardware watchdog device to feed (e.g. /dev/watchdog): the last resort when the
    /// kill does not finish. Off unless given.
    #[arg(long, env = "AUTOMIGRATE_WATCHDOG")]
    pub watchdog: Option<PathBuf>,

    /// Log format.
    #[arg(
        long,
        env = "AUTOMIGRATE_LOG_FORMAT",
        value_enum,
        default_value = "text"
    )]
    pub log_format: LogFormat,
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{0}")]
    Invalid(String),
    #[error("{what} {path}: {source}")]
    Read {
        what: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("TLS: {0}")]
    Tls(#[from] automigrate_transfer::tls::TlsError),
    #[error("kubelet backend: {0}")]
    Kube(#[from] crate::kubeapi::KubeApiError),
}

/// What the binary runs.
pub struct Parts {
    pub options: AgentOptions,
    pub serve: ServeOptions,
    pub checkpointer: Arc<dyn Checkpointer>,
}

impl std::fmt::Debug for Parts {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Parts")
            .field("options", &self.options)
            .field("serve", &self.serve)
            .finish_non_exhaustive()
    }
}

impl Args {
    pub fn into_parts(self) -> Result<Parts, ConfigError> {
        crate::api::validate_pod_name(&self.node_name)
            .map_err(|error| ConfigError::Invalid(format!("--node-name: {error}")))?;
        let token = match &self.token_file {
            Some(path) => {
                let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
                    what: "token file",
                    path: path.clone(),
                    source,
                })?;
                let token = text.trim().to_string();
                if token.len() < 16 || token.chars().any(|c| c.is_whitespace() || c.is_control()) {
                    return Err(ConfigError::Invalid(format!(
                        "the token in {} must be at least 16 characters without spaces",
                        path.display()
                    )));
                }
                Some(token)
            }
            None => None,
        };
        if token.is_none() {
            if self.api_listen.ip().is_loopback() {
                tracing::warn!(
                    "no --token-file: the API is open to anyone on this host (loopback only)"
                );
            } else if self.allow_unauthenticated {
                tracing::warn!(addr = %self.api_listen, "no --token-file and --allow-unauthenticated: the API is open to anyone who can reach {}; use this only inside an isolated network namespace", self.api_listen);
            } else {
                return Err(ConfigError::Invalid(format!(
                    "no --token-file: the API on {} would be open to the network. Give a token, \
                     listen on 127.0.0.1, or pass --allow-unauthenticated inside an isolated \
                     network namespace",
                    self.api_listen
                )));
            }
        }
        if self.full_every == 0 {
            return Err(ConfigError::Invalid(
                "--full-every must be at least 1".into(),
            ));
        }
        if self.retain_count == 0 {
            return Err(ConfigError::Invalid(
                "--retain-count must be at least 1".into(),
            ));
        }
        if self.probe_interval.is_zero() || self.probe_window == 0 {
            return Err(ConfigError::Invalid(
                "--probe-interval and --probe-window must be positive".into(),
            ));
        }
        let tls = TlsConfig::from_pem_files(&self.tls_ca, &self.tls_cert, &self.tls_key)?;
        let fixed: Vec<Peer> = self
            .peers
            .iter()
            .filter(|entry| !entry.trim().is_empty())
            .map(|entry| parse_peer(entry))
            .collect::<Result<_, _>>()
            .map_err(|error| ConfigError::Invalid(format!("--peer: {error}")))?;

        let mut options =
            AgentOptions::new(&self.node_name, &self.data_root, &self.store_root, tls);
        options.retention = Retention {
            count: self.retain_count,
            max_bytes: self.retain_bytes.map(|bytes| bytes.0),
        };
        options.checkpoint_timeout = self.checkpoint_timeout;
        options.full_every = self.full_every;
        options.congestion_control = self.congestion_control.clone();
        if let Some(rate) = self.transfer_rate_limit {
            options.transfer_settings.rate_limit_bps = Some(rate.0);
        }
        if let Some(streams) = self.transfer_max_streams {
            options.transfer_settings.max_streams = streams;
        }
        options
            .transfer_settings
            .validate()
            .map_err(|error| ConfigError::Invalid(format!("transfer settings: {error}")))?;
        let mut images = ImageOptions::new(
            self.image_root
                .clone()
                .unwrap_or_else(|| self.store_root.join(".images")),
        );
        images.reference_template = self.image_reference.clone();
        images.import_command = self
            .image_import_command
            .as_deref()
            .map(|command| {
                command
                    .split_whitespace()
                    .map(str::to_string)
                    .collect::<Vec<_>>()
            })
            .filter(|argv| !argv.is_empty());
        options.images = images;

        let checkpointer = self.checkpointer()?;
        let mut serve = ServeOptions::new(&self.data_root);
        serve.token = token;
        serve.peers = PeerSource {
            fixed,
            file: self.peers_file.clone(),
        };
        serve.probe = ProbeOptions {
            interval: self.probe_interval,
            timeout: self.probe_interval.min(Duration::from_secs(1)),
            window: self.probe_window,
        };
        serve.receiver.congestion_control = self.congestion_control.clone();
        for (flag, value) in [
            ("--api-header-timeout", self.api_header_timeout),
            ("--api-idle-timeout", self.api_idle_timeout),
        ] {
            // Zero would close every connection before its first request.
            if value.is_zero() {
                return Err(ConfigError::Invalid(format!(
                    "{flag} must be more than 0s (e.g. 15s)"
                )));
            }
        }
        serve.http = HttpLimits {
            header_read_timeout: self.api_header_timeout,
            idle_timeout: self.api_idle_timeout,
            max_connections: usize::try_from(self.api_max_connections).unwrap_or(usize::MAX),
            shutdown_timeout: self.shutdown_timeout,
        };
        serve.self_fence = self.self_fence_options(serve.token.as_deref())?;
        Ok(Parts {
            options,
            serve,
            checkpointer,
        })
    }

    /// Self-fencing needs the API server; without one it is off (and said so).
    fn self_fence_options(
        &self,
        token: Option<&str>,
    ) -> Result<Option<crate::standing::SelfFenceOptions>, ConfigError> {
        use automigrate_core::fencing::SelfFenceTiming;
        let timing = SelfFenceTiming {
            self_fence_after: self.self_fence_after,
            stop_time: self.self_fence_stop_time,
            heartbeat_interval: self.heartbeat_interval,
            check_interval: self.self_fence_check_interval,
            ..SelfFenceTiming::default()
        };
        timing
            .validate()
            .map_err(|error| ConfigError::Invalid(format!("self-fencing: {error}")))?;
        let read_timeout = timing.check_interval / 2;
        let api = match &self.kube_api {
            Some(url) => ApiServerTransport::new(url, None, None, read_timeout)?,
            None => match ApiServerTransport::in_cluster(read_timeout) {
                Ok(api) => api,
                Err(error) => {
                    tracing::warn!(%error, "no API server: self-fencing is off");
                    return Ok(None);
                }
            },
        };
        if token.is_none() {
            tracing::warn!(
                "no --token-file: self-fencing neither asks nor answers peers (their answers could not be authenticated)"
            );
        }
        Ok(Some(crate::standing::SelfFenceOptions {
            timing,
            enabled: self.self_fence,
            view: crate::standing::ApiView { api },
            key: token.map(crate::standing::PeerKey::from_token),
            runc: self.runc.clone(),
            runc_root: self.runc_root.clone(),
            container_id: self
                .self_fence_container_id
                .clone()
                .unwrap_or_else(|| self.runc_container_id.clone()),
            watchdog: self.watchdog.clone(),
        }))
    }

    fn checkpointer(&self) -> Result<Arc<dyn Checkpointer>, ConfigError> {
        Ok(match self.backend {
            BackendChoice::Runc => {
                let mut backend = RuncBackend::new(SystemRunner, &self.runc, &self.criu);
                if let Some(root) = &self.runc_root {
                    backend = backend.with_root(root);
                }
                checkpointer::runc(backend, RuncIdTemplate(self.runc_container_id.clone()))
            }
            BackendChoice::Process => checkpointer::process(
                ProcessBackend::new(SystemRunner, &self.criu),
                WorkloadsDir(self.workloads_dir.clone()),
            ),
            BackendChoice::Application => checkpointer::application(
                ApplicationBackend::default(),
                WorkloadsDir(self.workloads_dir.clone()),
            ),
            BackendChoice::Kubelet => {
                let timeout = self.checkpoint_timeout + Duration::from_secs(30);
                let transport = match &self.kube_api {
                    Some(url) => ApiServerTransport::new(url, None, None, timeout)?,
                    None => ApiServerTransport::in_cluster(timeout)?,
                };
                checkpointer::kubelet(KubeletBackend::new(
                    transport,
                    &self.node_name,
                    &self.kubelet_checkpoint_dir,
                ))
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Fixture {
        dir: tempfile::TempDir,
    }

    impl Fixture {
        fn new() -> Self {
            let dir = tempfile::tempdir().unwrap();
            automigrate_transfer::devcerts::write_dev_pki(dir.path(), &["node-a".into()], &[], 1)
                .unwrap();
            Self { dir }
        }

        fn args(&self, extra: &[&str]) -> Result<Args, clap::Error> {
            let path = |name: &str| self.dir.path().join(name).display().to_string();
            let mut argv = vec![
                "automigrate-agent".to_string(),
                "--node-name=node-a".into(),
                format!("--tls-cert={}", path("node-a.pem")),
                format!("--tls-key={}", path("node-a-key.pem")),
                format!("--tls-ca={}", path("ca.pem")),
                format!("--data-root={}", path("data")),
                format!("--store-root={}", path("store")),
            ];
            argv.extend(extra.iter().map(|arg| arg.to_string()));
            Args::try_parse_from(argv)
        }

        fn token_file(&self, token: &str) -> String {
            let path = self.dir.path().join("token");
            std::fs::write(&path, format!("{token}\n")).unwrap();
            format!("--token-file={}", path.display())
        }
    }

    #[test]
    fn defaults_are_the_documented_ports_and_backend() {
        let fixture = Fixture::new();
        let args = fixture.args(&[]).unwrap();
        assert_eq!(args.api_listen, "0.0.0.0:9460".parse().unwrap());
        assert_eq!(args.transfer_listen, "0.0.0.0:9461".parse().unwrap());
        assert_eq!(args.backend, BackendChoice::Runc);
        assert_eq!(args.probe_interval, Duration::from_secs(5));
        assert_eq!(args.checkpoint_timeout, Duration::from_secs(300));
    }

    #[test]
    fn an_open_api_on_the_network_needs_a_token_or_an_explicit_opt_out() {
        let fixture = Fixture::new();
        let error = fixture.args(&[]).unwrap().into_parts().unwrap_err();
        assert!(error.to_string().contains("--token-file"), "{error}");
        fixture
            .args(&["--api-listen=127.0.0.1:9460"])
            .unwrap()
            .into_parts()
            .unwrap();
        fixture
            .args(&["--allow-unauthenticated"])
            .unwrap()
            .into_parts()
            .unwrap();
        let parts = fixture
            .args(&[&fixture.token_file("0123456789abcdef-token")])
            .unwrap()
            .into_parts()
            .unwrap();
        assert_eq!(parts.serve.token.as_deref(), Some("0123456789abcdef-token"));
        let error = fixture
            .args(&[&fixture.token_file("short")])
            .unwrap()
            .into_parts()
            .unwrap_err();
        assert!(error.to_string().contains("at least 16"), "{error}");
    }

    #[test]
    fn units_peers_and_backends_are_parsed() {
        let fixture = Fixture::new();
        let parts = fixture
            .args(&[
                "--allow-unauthenticated",
                "--retain-bytes=20GiB",
                "--retain-count=4",
                "--transfer-rate-limit=200Mbit/s",
                "--probe-interval=250ms",
                "--peer=node-b=10.0.0.2:9461,node-c=10.0.0.3:9461",
                "--backend=process",
                "--image-import-command=skopeo copy oci:{layout}:{tag} containers-storage:{image}",
            ])
            .unwrap()
            .into_parts()
            .unwrap();
        assert_eq!(parts.options.retention.max_bytes, Some(20 << 30));
        assert_eq!(parts.options.retention.count, 4);
        assert_eq!(
            parts.options.transfer_settings.rate_limit_bps,
            Some(200_000_000)
        );
        assert_eq!(parts.serve.probe.interval, Duration::from_millis(250));
        assert_eq!(parts.serve.peers.fixed.len(), 2);
        assert_eq!(parts.checkpointer.backend().to_string(), "criu-process");
        assert_eq!(
            parts.options.images.import_command.as_deref().unwrap()[0],
            "skopeo"
        );
        let error = fixture
            .args(&["--allow-unauthenticated", "--peer=node-b"])
            .unwrap()
            .into_parts()
            .unwrap_err();
        assert!(error.to_string().contains("--peer"), "{error}");
        assert!(fixture.args(&["--probe-interval=soon"]).is_err());
        assert!(fixture.args(&["--backend=docker"]).is_err());
        let parts = fixture
            .args(&[
                "--allow-unauthenticated",
                "--api-header-timeout=2s",
                "--api-idle-timeout=30s",
                "--api-max-connections=8",
                "--shutdown-timeout=5s",
            ])
            .unwrap()
            .into_parts()
            .unwrap();
        assert_eq!(parts.serve.http.header_read_timeout, Duration::from_secs(2));
        assert_eq!(parts.serve.http.idle_timeout, Duration::from_secs(30));
        assert_eq!(parts.serve.http.max_connections, 8);
        assert_eq!(parts.serve.http.shutdown_timeout, Duration::from_secs(5));
        assert!(fixture.args(&["--api-max-connections=0"]).is_err());
        let error = fixture
            .args(&["--allow-unauthenticated", "--api-header-timeout=0s"])
            .unwrap()
            .into_parts()
            .unwrap_err();
        assert!(
            error.to_string().contains("--api-header-timeout"),
            "{error}"
        );
        let parts = fixture
            .args(&[
                "--allow-unauthenticated",
                "--backend=kubelet",
                "--kube-api=http://127.0.0.1:1",
            ])
            .unwrap()
            .into_parts()
            .unwrap();
        assert_eq!(parts.checkpointer.backend().to_string(), "kubelet");
        let error = fixture
            .args(&["--allow-unauthenticated", "--full-every=0"])
            .unwrap()
            .into_parts()
            .unwrap_err();
        assert!(error.to_string().contains("--full-every"), "{error}");
    }
    #[test]
    fn self_fencing_is_on_with_an_api_server_and_refuses_unsafe_timing() {
        let fixture = Fixture::new();
        // No API server (not in a pod, no --kube-api): off.
        let parts = fixture
            .args(&["--allow-unauthenticated"])
            .unwrap()
            .into_parts()
            .unwrap();
        assert!(parts.serve.self_fence.is_none());
        let parts = fixture
            .args(&[
                "--allow-unauthenticated",
                "--kube-api=http://127.0.0.1:1",
                "--runc-root=/run/node-a",
            ])
            .unwrap()
            .into_parts()
            .unwrap();
        let fence = parts.serve.self_fence.unwrap();
        assert!(fence.enabled);
        assert_eq!(fence.timing.self_fence_after, Duration::from_secs(15));
        assert_eq!(fence.container_id, "{namespace}-{pod}-{container}");
        assert!(fence.key.is_none(), "no token, no peer question");
        assert!(fence.watchdog.is_none(), "the watchdog is off unless given");
        let parts = fixture
            .args(&[
                &fixture.token_file("0123456789abcdef-token"),
                "--api-listen=127.0.0.1:9460",
                "--kube-api=http://127.0.0.1:1",
                "--self-fence=false",
                "--heartbeat-interval=1s",
                "--self-fence-after=3s",
                "--self-fence-stop-time=2s",
                "--self-fence-container-id={namespace}_{pod}_{container}_{uid8}",
                "--watchdog=/dev/watchdog",
            ])
            .unwrap()
            .into_parts()
            .unwrap();
        let fence = parts.serve.self_fence.unwrap();
        assert!(!fence.enabled && fence.key.is_some());
        assert_eq!(fence.timing.self_fence_after, Duration::from_secs(3));
        assert_eq!(fence.container_id, "{namespace}_{pod}_{container}_{uid8}");
        // 10 s renewals and a 10 s deadline: healthy nodes would fence themselves.
        let error = fixture
            .args(&[
                "--allow-unauthenticated",
                "--kube-api=http://127.0.0.1:1",
                "--self-fence-after=10s",
            ])
            .unwrap()
            .into_parts()
            .unwrap_err();
        assert!(error.to_string().contains("self-fence-after"), "{error}");
    }
}
