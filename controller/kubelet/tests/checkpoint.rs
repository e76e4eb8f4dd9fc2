//! The kubelet checkpoint API, reached the way the agent reaches it (the API server's node
//! proxy), writes an archive the agent's kubelet backend accepts (root, runc and CRIU needed).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::io::{Read as _, Write as _};
use std::time::Duration;

use automigrate_checkpoint::kubelet::{
    ApiResponse, ApiTransport, KubeletBackend, KubeletError, PodContainer,
};
use automigrate_checkpoint::{CheckpointBackend, CheckpointRequest, DumpKind};
use automigrate_kube_fake::{NodeProxyRequest, NodeProxyResponse};
use common::{NODE, RuncGuard, cluster, eventually, skip_privileged, start};
use k8s_openapi::api::core::v1::{Container, Pod, PodSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::api::{Api, PostParams};

const NS: &str = "ml";

/// The agent's transport, over the kube client instead of its own HTTPS client.
struct KubeTransport(kube::Client);

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
fn forward(addr: std::net::SocketAddr, request: &NodeProxyRequest) -> NodeProxyResponse {
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

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_checkpoint_through_the_node_proxy_is_an_archive_the_agent_accepts() {
    if skip_privileged("a_checkpoint_through_the_node_proxy_is_an_archive_the_agent_accepts") {
        return;
    }
    let root = tempfile::tempdir().unwrap();
    let guard = RuncGuard::new(root.path().join("runc"));
    let cluster = cluster();
    let kubelet = start(&cluster, root.path()).await;
    let addr = kubelet.api_addr().unwrap();
    cluster.set_node_proxy_handler(NODE, move |request| forward(addr, request));
    // The Node advertises the port the API listens on.
    let node: k8s_openapi::api::core::v1::Node = cluster.get(None, NODE).unwrap();
    let port = node
        .status
        .unwrap()
        .daemon_endpoints
        .unwrap()
        .kubelet_endpoint
        .unwrap()
        .port;
    assert_eq!(port, i32::from(addr.port()));

    let pods: Api<Pod> = Api::namespaced(cluster.client(), NS);
    let pod = Pod {
        metadata: ObjectMeta {
            name: Some("counter".into()),
            namespace: Some(NS.into()),
            ..ObjectMeta::default()
        },
        spec: Some(PodSpec {
            node_name: Some(NODE.into()),
            containers: vec![Container {
                name: "main".into(),
                image: Some("local/host".into()),
                command: Some(vec![
                    "/bin/sh".into(),
                    "-c".into(),
                    "i=0; while :; do i=$((i+1)); sleep 0.1; done".into(),
                ]),
                ..Container::default()
            }],
            ..PodSpec::default()
        }),
        status: None,
    };
    pods.create(&PostParams::default(), &pod).await.unwrap();
    eventually("the container running", || {
        cluster
            .get::<Pod>(Some(NS), "counter")
            .and_then(|p| {
                p.status?
                    .container_statuses?
                    .first()?
                    .state
                    .clone()?
                    .running
            })
            .is_some()
    })
    .await;

    let local_dir = root.path().join("checkpoints");
    let backend = KubeletBackend::new(KubeTransport(cluster.client()), NODE, &local_dir);
    let staging = tempfile::tempdir().unwrap();
    let outcome = backend
        .checkpoint(
            &PodContainer {
                namespace: NS.into(),
                pod: "counter".into(),
                container: "main".into(),
            },
            &CheckpointRequest::new(DumpKind::Periodic, Duration::from_secs(120)),
            staging.path(),
        )
        .await
        .unwrap_or_else(|error| panic!("the agent's kubelet backend refused it: {error}"));
    // CRIU's statistics were found and read (the freeze time comes from them).
    assert!(outcome.dump_stats.is_some(), "{outcome:?}");
    assert_eq!(outcome.runtime.as_deref(), Some("runc"));
    let images: Vec<String> = std::fs::read_dir(staging.path().join("checkpoint"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert!(images.iter().any(|n| n.starts_with("pages-")), "{images:?}");
    assert!(staging.path().join("spec.dump").exists());
    assert!(staging.path().join("config.dump").exists());
    // The agent removed the kubelet's archive after importing it, as on a real node.
    assert_eq!(std::fs::read_dir(&local_dir).unwrap().count(), 0);
    // The container was left running.
    assert_eq!(guard.containers().len(), 1);
    assert_eq!(guard.containers()[0].1, "running");

    // A container this node does not run: a 404 that is not the kubelet's "page not found".
    let missing = backend
        .checkpoint(
            &PodContainer {
                namespace: NS.into(),
                pod: "absent".into(),
                container: "main".into(),
            },
            &CheckpointRequest::new(DumpKind::Periodic, Duration::from_secs(10)),
            tempfile::tempdir().unwrap().path(),
        )
        .await
        .unwrap_err();
    assert!(
        matches!(missing, KubeletError::NotFound { .. }),
        "{missing}"
    );
    kubelet.shutdown().await.unwrap();
}
