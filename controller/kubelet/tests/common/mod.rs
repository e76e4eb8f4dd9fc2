//! What the kubelet tests share: a FakeCluster, a kubelet on it with short intervals, waiting
//! for a state, a guard that removes every runc container a test started, even on failure, and
//! the pods, creations and deletions the privileged tests repeat.
#![allow(dead_code)]

use std::io::{Read as _, Write as _};
use std::path::{Path, PathBuf};
use std::time::Duration;

use automigrate_checkpoint::kubelet::{ApiResponse, ApiTransport, KubeletError, PodContainer};
use automigrate_kube_fake::{FakeCluster, FakeClusterOptions, NodeProxyRequest, NodeProxyResponse};
use automigrate_kubelet::node::NodeConfig;
use automigrate_kubelet::pods::PodConfig;
use automigrate_kubelet::{Kubelet, KubeletConfig};
use k8s_openapi::api::core::v1::{
    Container, HostPathVolumeSource, Pod, PodSpec, Volume, VolumeMount,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::api::{Api, DeleteParams, PostParams};

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

/// A privileged test's node: a FakeCluster and a state directory whose runc containers are
/// removed when it drops (fields drop in order: the guard before the directory it lists).
pub struct TestNode {
    pub cluster: FakeCluster,
    pub guard: RuncGuard,
    pub root: tempfile::TempDir,
}

impl TestNode {
    /// A fresh cluster and state directory, with a kubelet started on them.
    pub async fn start() -> (Self, Kubelet) {
        log_to_test_output();
        let root = tempfile::tempdir().unwrap();
        let guard = RuncGuard::new(root.path().join("runc"));
        let node = Self {
            cluster: cluster(),
            guard,
            root,
        };
        let kubelet = node.start_kubelet().await;
        (node, kubelet)
    }

    /// A kubelet on this node's cluster and state directory (again, after a shutdown).
    pub async fn start_kubelet(&self) -> Kubelet {
        start(&self.cluster, self.root.path()).await
    }

    pub fn pods(&self, namespace: &str) -> Api<Pod> {
        Api::namespaced(self.cluster.client(), namespace)
    }

    /// Routes the API server's node proxy for [`NODE`] to the kubelet's API, as the agent
    /// reaches it; returns the address the API listens on.
    pub fn serve_node_proxy(&self, kubelet: &Kubelet) -> std::net::SocketAddr {
        let addr = kubelet.api_addr().unwrap();
        self.cluster
            .set_node_proxy_handler(NODE, move |request| forward(addr, request));
        addr
    }

    /// The pod's status as the kubelet last wrote it, for a failure message.
    pub fn pod_status(&self, namespace: &str, name: &str) -> String {
        match self.cluster.get::<Pod>(Some(namespace), name) {
            Some(pod) => format!("pod {namespace}/{name} status: {:#?}", pod.status),
            None => format!("pod {namespace}/{name} is gone"),
        }
    }

    /// Whether the pod's first container is running, in the status the kubelet wrote.
    pub fn first_container_running(&self, namespace: &str, name: &str) -> bool {
        self.cluster
            .get::<Pod>(Some(namespace), name)
            .and_then(|p| {
                p.status?
                    .container_statuses?
                    .first()?
                    .state
                    .clone()?
                    .running
            })
            .is_some()
    }
}

/// A pod on [`NODE`] whose one container, `main`, runs `script` with `/bin/sh -c`.
pub fn shell_pod(namespace: &str, name: &str, image: &str, script: &str) -> Pod {
    Pod {
        metadata: ObjectMeta {
            name: Some(name.into()),
            namespace: Some(namespace.into()),
            ..ObjectMeta::default()
        },
        spec: Some(PodSpec {
            node_name: Some(NODE.into()),
            containers: vec![Container {
                name: "main".into(),
                image: Some(image.into()),
                command: Some(vec!["/bin/sh".into(), "-c".into(), script.into()]),
                ..Container::default()
            }],
            ..PodSpec::default()
        }),
        status: None,
    }
}

/// Mounts the host directory `work` at `/work` in the pod's first container.
pub fn with_work_dir(mut pod: Pod, work: &Path) -> Pod {
    let spec = pod.spec.as_mut().unwrap();
    spec.containers[0].volume_mounts = Some(vec![VolumeMount {
        name: "work".into(),
        mount_path: "/work".into(),
        ..VolumeMount::default()
    }]);
    spec.volumes = Some(vec![Volume {
        name: "work".into(),
        host_path: Some(HostPathVolumeSource {
            path: work.display().to_string(),
            type_: None,
        }),
        ..Volume::default()
    }]);
    pod
}

/// The `main` container of a pod, as the agent names it to the kubelet backend.
pub fn main_container(namespace: &str, pod: &str) -> PodContainer {
    PodContainer {
        namespace: namespace.into(),
        pod: pod.into(),
        container: "main".into(),
    }
}

pub async fn create_pod(pods: &Api<Pod>, pod: &Pod) -> Pod {
    pods.create(&PostParams::default(), pod).await.unwrap()
}

/// A graceful DELETE of a pod with a grace period of `grace_seconds`.
pub async fn delete_pod(pods: &Api<Pod>, name: &str, grace_seconds: u32) {
    pods.delete(
        name,
        &DeleteParams {
            grace_period_seconds: Some(grace_seconds),
            ..DeleteParams::default()
        },
    )
    .await
    .unwrap();
}

/// Polls `check` every 20 ms for up to 60 s (generous: a loaded 2-core machine starts runc
/// slowly); the test asserts on the state reached, never on how fast.
pub async fn eventually(what: &str, check: impl FnMut() -> bool) {
    eventually_or_report(what, check, String::new).await;
}

/// [`eventually`], with `report` (the state that was reached instead) in the failure message.
pub async fn eventually_or_report(
    what: &str,
    mut check: impl FnMut() -> bool,
    report: impl FnOnce() -> String,
) {
    for _ in 0..3000 {
        if check() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("timed out waiting for: {what}\n{}", report());
}

/// The kubelet's log, at info, in the test's captured output: a failed test prints it (why a
/// container did not start: runc's and CRIU's last lines), a passing one stays quiet.
pub fn log_to_test_output() {
    let _ = tracing_subscriber::fmt()
        .with_test_writer()
        .with_env_filter("info")
        .try_init();
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
        runc_list(&self.root).unwrap()
    }
}

/// `runc list`: the ids of the containers in a runc root, with their status (none where the
/// root does not exist yet); an error only where runc itself could not be run.
pub fn runc_list(root: &Path) -> std::io::Result<Vec<(String, String)>> {
    let output = std::process::Command::new("runc")
        .arg("--root")
        .arg(root)
        .args(["list", "--format", "json"])
        .output()?;
    let list: Option<Vec<serde_json::Value>> =
        serde_json::from_slice(output.stdout.trim_ascii()).unwrap_or(None);
    Ok(list
        .unwrap_or_default()
        .iter()
        .map(|c| {
            (
                c["id"].as_str().unwrap_or_default().to_string(),
                c["status"].as_str().unwrap_or_default().to_string(),
            )
        })
        .collect())
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
