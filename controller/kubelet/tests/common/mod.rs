//! What the kubelet tests share: a FakeCluster, a kubelet on it with short intervals, waiting
//! for a state, and a guard that removes every runc container a test started, even on failure.
#![allow(dead_code)]

use std::io::{Read as _, Write as _};
use std::path::{Path, PathBuf};
use std::time::Duration;

use automigrate_checkpoint::kubelet::{ApiResponse, ApiTransport, KubeletError};
use automigrate_kube_fake::{FakeCluster, FakeClusterOptions, NodeProxyRequest, NodeProxyResponse};
use automigrate_kubelet::node::NodeConfig;
use automigrate_kubelet::pods::PodConfig;
use automigrate_kubelet::{Kubelet, KubeletConfig};

pub const NODE: &str = "node-a";
pub const NODE_IP: &str = "10.77.0.2";

/// Privileged tests skip only when asked to, and say so loudly.
pub fn skip_privileged(test: &str) -> bool {
    if std::env::var("AUTOMIGRATE_SKIP_PRIVILEGED").as_deref() == Ok("1") {
        eprintln!(
            "\n!!! SKIPPING {test}: AUTOMIGRATE_SKIP_PRIVILEGED=1 (needs root and runc) !!!\n"
        );
        return true;
    }
    false
}

pub fn cluster() -> FakeCluster {
    FakeCluster::with_options(FakeClusterOptions {
        graceful_pod_deletion: true,
        ..FakeClusterOptions::default()
    })
}

pub fn config(root: &Path) -> KubeletConfig {
    let mut node = NodeConfig::new(NODE, NODE_IP, root.to_path_buf());
    node.status_update_interval = Duration::from_millis(50);
    node.lease_renew_interval = Duration::from_millis(50);
    // No pressure whatever the test machine's disk and memory: the tests assert on what the
    // kubelet reports, not on the host (the thresholds have their own unit test).
    node.thresholds = automigrate_kubelet::node::Thresholds {
        memory_available_bytes: 0,
        nodefs_available_percent: 0,
    };
    let mut pods = PodConfig::new(NODE, NODE_IP);
    pods.initial_backoff = Duration::from_millis(100);
    KubeletConfig {
        node,
        pods,
        runc: "runc".into(),
        api_listen: Some(std::net::SocketAddr::from(([127, 0, 0, 1], 0))),
        reported_checkpoint_dir: automigrate_checkpoint::kubelet::KUBELET_CHECKPOINT_DIR.into(),
    }
}

pub async fn start(cluster: &FakeCluster, root: &Path) -> Kubelet {
    Kubelet::start(cluster.client(), config(root))
        .await
        .unwrap()
}

/// Polls `check` every 20 ms for up to 60 s (generous: a loaded 2-core machine starts runc
/// slowly); the test asserts on the state reached, never on how fast.
pub async fn eventually(what: &str, mut check: impl FnMut() -> bool) {
    for _ in 0..3000 {
        if check() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("timed out waiting for: {what}");
}

/// Deletes every container in a runc root when dropped (also while a failed test unwinds).
pub struct RuncGuard {
    root: PathBuf,
}

impl RuncGuard {
    pub fn new(root: PathBuf) -> Self {
        Self { root }
    }

    /// The ids of the containers runc knows, with their status.
    pub fn containers(&self) -> Vec<(String, String)> {
        let output = std::process::Command::new("runc")
            .arg("--root")
            .arg(&self.root)
            .args(["list", "--format", "json"])
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&output.stdout);
        let list: Option<Vec<serde_json::Value>> =
            serde_json::from_str(text.trim()).unwrap_or(None);
        list.unwrap_or_default()
            .iter()
            .map(|c| {
                (
                    c["id"].as_str().unwrap_or_default().to_string(),
                    c["status"].as_str().unwrap_or_default().to_string(),
                )
            })
            .collect()
    }
}

impl Drop for RuncGuard {
    fn drop(&mut self) {
        if !self.root.exists() {
            return;
        }
        for (id, _) in self.containers() {
            let _ = std::process::Command::new("runc")
                .arg("--root")
                .arg(&self.root)
                .args(["delete", "--force", &id])
                .status();
        }
    }
}

/// The agent's transport, over the kube client instead of its own HTTPS client.
pub struct KubeTransport(pub kube::Client);

impl ApiTransport for KubeTransport {
    async fn post(&self, path: &str) -> Result<ApiResponse, KubeletError> {
        let request = http::Request::post(path).body(Vec::new()).unwrap();
        match self.0.request_text(request).await {
            Ok(body) => Ok(ApiResponse { status: 200, body }),
            Err(kube::Error::Api(status)) => Ok(ApiResponse {
                status: status.code,
                body: status.message,
            }),
            Err(error) => Err(KubeletError::Transport(error.to_string())),
        }
    }
}

/// What the local API server does for `/api/v1/nodes/{node}/proxy/...`: forwards the request to
/// the kubelet's port (here with a blocking HTTP/1.1 exchange).
pub fn forward(addr: std::net::SocketAddr, request: &NodeProxyRequest) -> NodeProxyResponse {
    let mut stream = std::net::TcpStream::connect(addr).unwrap();
    let target = if request.query.is_empty() {
        request.path.clone()
    } else {
        format!("{}?{}", request.path, request.query)
    };
    write!(
        stream,
        "{} {target} HTTP/1.1\r\nHost: kubelet\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
        request.method
    )
    .unwrap();
    let mut answer = String::new();
    stream.read_to_string(&mut answer).unwrap();
    let status: u16 = answer[9..12].parse().unwrap();
    let body = answer.split_once("\r\n\r\n").unwrap().1.to_string();
    NodeProxyResponse::new(http::StatusCode::from_u16(status).unwrap(), body)
}
