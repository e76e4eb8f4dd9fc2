//! A plain `kube::Client` over real HTTP: discovery, list, patch and a watch that streams
//! events while its response is still open, then a graceful stop that ends the open watch.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::net::SocketAddr;
use std::time::Duration;

use automigrate_apiserver::{Options, start};
use futures::StreamExt;
use k8s_openapi::api::core::v1::{Event as CoreEvent, Pod};
use kube::Resource as _;
use kube::api::{Api, ListParams, Patch, PatchParams, PostParams, WatchEvent, WatchParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::discovery::{Discovery, Scope};
use kube::runtime::events::{Event, EventType, Recorder};
use serde_json::json;

/// Bound on waiting for an event that should arrive at once; only a hang reaches it.
const PATIENCE: Duration = Duration::from_secs(60);

async fn client_for(path: &std::path::Path) -> kube::Client {
    let kubeconfig = Kubeconfig::read_from(path).unwrap();
    let config = kube::Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
        .await
        .unwrap();
    kube::Client::try_from(config).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kube_client_lists_patches_and_watches_over_http() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("kubeconfig");
    let running = start(&Options {
        listen: vec![SocketAddr::from(([127, 0, 0, 1], 0))],
        allow_non_loopback: false,
        kubeconfig: Some(path.clone()),
        graceful_pod_deletion: true,
    })
    .await
    .unwrap();
    let client = client_for(&path).await;

    // kube's discovery reads the same legacy documents kubectl does.
    let discovery = Discovery::new(client.clone()).run().await.unwrap();
    let group = discovery.get("automigrate.dev").unwrap();
    let (migrations, capabilities) = group.recommended_kind("Migration").unwrap();
    assert_eq!(migrations.plural, "migrations");
    assert_eq!(capabilities.scope, Scope::Namespaced);
    assert!(discovery.get("coordination.k8s.io").is_some());

    let pods: Api<Pod> = Api::namespaced(client.clone(), "default");
    let pod: Pod = serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": "p1", "labels": {"app": "train"}},
        "spec": {"containers": [{"name": "main", "image": "x"}]},
    }))
    .unwrap();
    pods.create(&PostParams::default(), &pod).await.unwrap();
    let listed = pods
        .list(&ListParams::default().labels("app=train"))
        .await
        .unwrap();
    assert_eq!(listed.items.len(), 1);
    let rv = listed.metadata.resource_version.unwrap();

    let mut events = pods
        .watch(&WatchParams::default().timeout(290), &rv)
        .await
        .unwrap()
        .boxed();
    pods.patch(
        "p1",
        &PatchParams::default(),
        &Patch::Merge(json!({"metadata": {"annotations": {"step": "one"}}})),
    )
    .await
    .unwrap();
    let first = tokio::time::timeout(PATIENCE, events.next()).await.unwrap();
    match first.unwrap().unwrap() {
        WatchEvent::Modified(pod) => {
            assert_eq!(pod.metadata.annotations.unwrap()["step"], "one");
        }
        other => panic!("expected MODIFIED, got {other:?}"),
    }
    // A second change on the same open response: the body is streamed, not buffered.
    pods.patch_status(
        "p1",
        &PatchParams::default(),
        &Patch::Merge(json!({"status": {"phase": "Running"}})),
    )
    .await
    .unwrap();
    let second = tokio::time::timeout(PATIENCE, events.next()).await.unwrap();
    match second.unwrap().unwrap() {
        WatchEvent::Modified(pod) => {
            assert_eq!(pod.status.unwrap().phase.as_deref(), Some("Running"));
        }
        other => panic!("expected MODIFIED, got {other:?}"),
    }

    // kube's event recorder writes events.k8s.io/v1; `kubectl describe` lists core v1 Events by
    // involvedObject: both must see the one Event, as on a real server.
    let created = pods.get("p1").await.unwrap();
    let recorder = Recorder::new(client.clone(), "automigrate-controller".into());
    let note = "checkpoint 3 written on node-a";
    recorder
        .publish(
            &Event {
                type_: EventType::Normal,
                reason: "Checkpointed".into(),
                note: Some(note.into()),
                action: "Checkpoint".into(),
                secondary: None,
            },
            &created.object_ref(&()),
        )
        .await
        .unwrap();
    let core: Api<CoreEvent> = Api::namespaced(client.clone(), "default");
    let selector = format!(
        "involvedObject.name=p1,involvedObject.kind=Pod,involvedObject.uid={}",
        created.metadata.uid.as_deref().unwrap()
    );
    let listed = core
        .list(&ListParams::default().fields(&selector))
        .await
        .unwrap();
    assert_eq!(listed.items.len(), 1, "{listed:?}");
    assert_eq!(listed.items[0].message.as_deref(), Some(note));
    assert_eq!(listed.items[0].reason.as_deref(), Some("Checkpointed"));
    let other = core
        .list(&ListParams::default().fields("involvedObject.name=p2"))
        .await
        .unwrap();
    assert!(other.items.is_empty(), "{other:?}");

    // Graceful stop with the watch open: the stream ends and stop() returns.
    tokio::time::timeout(PATIENCE, running.stop())
        .await
        .unwrap()
        .unwrap();
    let after = tokio::time::timeout(PATIENCE, events.next()).await.unwrap();
    assert!(
        !matches!(after, Some(Ok(_))),
        "the watch should end with the server, got {after:?}"
    );
    assert!(pods.list(&ListParams::default()).await.is_err());
}

#[test]
fn non_loopback_addresses_need_an_explicit_flag() {
    let public = SocketAddr::from(([192, 0, 2, 1], 6443));
    let refused = automigrate_apiserver::check_listen(public, false).unwrap_err();
    assert!(refused.to_string().contains("loopback"), "{refused}");
    automigrate_apiserver::check_listen(public, true).unwrap();
    automigrate_apiserver::check_listen(SocketAddr::from(([127, 0, 0, 1], 6443)), false).unwrap();
    automigrate_apiserver::check_listen("[::1]:6443".parse().unwrap(), false).unwrap();
}

/// A kubelet stand-in: records `METHOD URI BODY` of each request, answers what the kubelet
/// checkpoint API answers.
async fn fake_kubelet() -> (SocketAddr, std::sync::Arc<std::sync::Mutex<Vec<String>>>) {
    let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let record = seen.clone();
    let app = axum::Router::new().fallback(move |request: http::Request<axum::body::Body>| {
        let record = record.clone();
        async move {
            let (parts, body) = request.into_parts();
            let body = axum::body::to_bytes(body, 1 << 20).await.unwrap();
            record.lock().unwrap().push(format!(
                "{} {} {}",
                parts.method,
                parts.uri,
                String::from_utf8_lossy(&body)
            ));
            (
                [(http::header::CONTENT_TYPE, "application/json")],
                r#"{"items":["/var/lib/kubelet/checkpoints/checkpoint-p_ml-c-2026.tar"]}"#,
            )
        }
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    (addr, seen)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_proxy_reaches_the_nodes_kubelet() {
    let (kubelet, seen) = fake_kubelet().await;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("kubeconfig");
    let running = start(&Options {
        listen: vec![SocketAddr::from(([127, 0, 0, 1], 0))],
        allow_non_loopback: false,
        kubeconfig: Some(path.clone()),
        graceful_pod_deletion: true,
    })
    .await
    .unwrap();
    let client = client_for(&path).await;
    let nodes: Api<k8s_openapi::api::core::v1::Node> = Api::all(client.clone());
    for name in ["n1", "n2"] {
        let node = serde_json::from_value(json!({"metadata": {"name": name}})).unwrap();
        nodes.create(&PostParams::default(), &node).await.unwrap();
    }
    // What a kubelet registers: its address and port.
    nodes
        .patch_status(
            "n1",
            &PatchParams::default(),
            &Patch::Merge(json!({"status": {
                "addresses": [{"type": "Hostname", "address": "n1"}, {"type": "InternalIP", "address": "127.0.0.1"}],
                "daemonEndpoints": {"kubeletEndpoint": {"Port": kubelet.port()}},
            }})),
        )
        .await
        .unwrap();

    // The path the agent's kubelet backend posts to.
    let request = http::Request::post("/api/v1/nodes/n1/proxy/checkpoint/ml/p/c?timeout=60")
        .body(Vec::new())
        .unwrap();
    let answer = client.request_text(request).await.unwrap();
    assert!(answer.contains("checkpoint-p_ml-c-2026.tar"), "{answer}");
    assert_eq!(
        *seen.lock().unwrap(),
        ["POST /checkpoint/ml/p/c?timeout=60 "]
    );

    // A node that registered no address, and one that does not exist.
    for (node, code) in [("n2", 500), ("n3", 404)] {
        let request = http::Request::post(format!("/api/v1/nodes/{node}/proxy/checkpoint/ml/p/c"))
            .body(Vec::new())
            .unwrap();
        // kube retries 503s for minutes: the answer must not be one.
        let answered = tokio::time::timeout(PATIENCE, client.request_text(request)).await;
        match answered.unwrap() {
            Err(kube::Error::Api(status)) => assert_eq!(status.code, code, "{node}: {status:?}"),
            other => panic!("{node}: expected an API error {code}, got {other:?}"),
        }
    }
    assert_eq!(seen.lock().unwrap().len(), 1);
    running.stop().await.unwrap();
}
