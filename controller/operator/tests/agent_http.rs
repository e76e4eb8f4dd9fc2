//! The HTTP `NodeAgent` against a stand-in agent speaking the agent API over real HTTP on
//! loopback: agents found through the pod store, bearer token, wire types, dataset paths made
//! relative to the data root, the peer's transfer address, error mapping.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use automigrate_agent::api::{
    CheckpointRequest, CheckpointSummary, ErrorBody, ImageRequest, ImageResponse, PeerLatency,
    TransferRequest, TransferState, TransferStatus,
};
use automigrate_core::model::PodRef;
use automigrate_kube_fake::FakeCluster;
use automigrate_operator::agent::{AgentError, CheckpointKind, NodeAgent};
use automigrate_operator::agent_http::{AgentDirectoryConfig, HttpAgents};
use automigrate_operator::crd::TransferPayload;
use automigrate_operator::stores::Stores;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::routing::{get, post};
use axum::{Json, Router};
use k8s_openapi::api::core::v1::{Pod, PodSpec, PodStatus};
use kube::api::ObjectMeta;

#[derive(Clone, Default)]
struct Seen {
    bodies: Arc<Mutex<Vec<serde_json::Value>>>,
    tokens: Arc<Mutex<Vec<String>>>,
}

impl Seen {
    fn record(&self, headers: &HeaderMap, body: serde_json::Value) {
        let token = headers
            .get("authorization")
            .and_then(|value| value.to_str().ok())
            .unwrap_or_default()
            .to_string();
        self.tokens.lock().unwrap().push(token);
        self.bodies.lock().unwrap().push(body);
    }
}

fn stand_in_agent(seen: Seen) -> Router {
    Router::new()
        .route(
            "/v1/checkpoints",
            post(
                |State(seen): State<Seen>,
                 headers: HeaderMap,
                 Json(request): Json<CheckpointRequest>| async move {
                    seen.record(&headers, serde_json::to_value(&request).unwrap());
                    Json(CheckpointSummary {
                        id: format!("{}-000007", request.pod.name),
                        pod: request.pod,
                        container: request.container,
                        created_at: "2030-01-01T00:00:00Z".parse().unwrap(),
                        bytes: 163_000_000,
                        files: 12,
                        freeze: Duration::from_millis(340),
                        parent: None,
                        verified: true,
                    })
                },
            ),
        )
        .route(
            "/v1/transfers",
            post(
                |State(seen): State<Seen>,
                 headers: HeaderMap,
                 Json(request): Json<TransferRequest>| async move {
                    seen.record(&headers, serde_json::to_value(&request).unwrap());
                    (
                        StatusCode::ACCEPTED,
                        Json(TransferStatus {
                            id: "t-1".into(),
                            state: TransferState::Running,
                            bytes_total: 600,
                            bytes_done: 0,
                            streams: 1,
                            error: None,
                        }),
                    )
                },
            ),
        )
        .route(
            "/v1/transfers/{id}",
            get(|Path(id): Path<String>| async move {
                if id == "t-1" {
                    Ok(Json(TransferStatus {
                        id,
                        state: TransferState::Succeeded,
                        bytes_total: 600,
                        bytes_done: 600,
                        streams: 3,
                        error: None,
                    }))
                } else {
                    Err((
                        StatusCode::NOT_FOUND,
                        Json(ErrorBody {
                            error: format!("no transfer {id}"),
                            kind: "notFound".into(),
                        }),
                    ))
                }
            }),
        )
        .route(
            "/v1/images",
            post(|Json(request): Json<ImageRequest>| async move {
                Json(ImageResponse {
                    image: format!("localhost/checkpoint/{}:latest", request.checkpoint_id),
                })
            }),
        )
        .route(
            "/v1/peers",
            get(|| async {
                Json(vec![PeerLatency {
                    node: "edge-2".into(),
                    rtt: Duration::from_millis(12),
                    loss: 0.0,
                    answering: Some(false),
                    missed: Some(2),
                }])
            }),
        )
        .with_state(seen)
}

fn agent_pod(node: &str, ip: &str) -> Pod {
    Pod {
        metadata: ObjectMeta {
            name: Some(format!("agent-{node}")),
            namespace: Some("automigrate-system".into()),
            labels: Some(BTreeMap::from([
                ("app.kubernetes.io/name".into(), "automigrate".into()),
                ("app.kubernetes.io/component".into(), "agent".into()),
            ])),
            ..ObjectMeta::default()
        },
        spec: Some(PodSpec {
            node_name: Some(node.into()),
            ..PodSpec::default()
        }),
        status: Some(PodStatus {
            phase: Some("Running".into()),
            pod_ip: Some(ip.into()),
            ..PodStatus::default()
        }),
    }
}

#[tokio::test]
async fn talks_to_the_agent_on_each_node_over_http() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let seen = Seen::default();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(axum::serve(listener, stand_in_agent(seen.clone())).into_future());

    let cluster = FakeCluster::new();
    cluster.put(&agent_pod("edge-1", "127.0.0.1"));
    cluster.put(&agent_pod("edge-2", "fd00::2"));
    let stores = Stores::spawn(&cluster.client());
    stores.ready().await.unwrap();
    for _ in 0..500 {
        if stores.pods.state().len() == 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let agents = HttpAgents::new(
        stores,
        AgentDirectoryConfig {
            namespace: "automigrate-system".into(),
            selector: BTreeMap::from([("app.kubernetes.io/component".into(), "agent".into())]),
            api_port: port,
            transfer_port: 9461,
            scheme: "http".into(),
            token: Some("agent-token".into()),
            ca_pem: None,
            data_root: "/var/lib/automigrate/data/".into(),
            timeout: Duration::from_secs(10),
        },
    );
    let pod = PodRef::new("ml", "trainer");

    let taken = agents
        .checkpoint("edge-1", &pod, "train", CheckpointKind::Final)
        .await
        .unwrap();
    assert_eq!(taken.id, "trainer-000007");
    assert_eq!(taken.freeze, Duration::from_millis(340));
    assert!(taken.verified);

    let dataset = TransferPayload::dataset("/var/lib/automigrate/data/esc50/train");
    let started = agents
        .start_transfer("edge-1", &dataset, "edge-2")
        .await
        .unwrap();
    let done = agents.transfer_status("edge-1", &started.id).await.unwrap();
    assert_eq!(done.bytes_done, 600);
    let missing = agents.transfer_status("edge-1", "nope").await.unwrap_err();
    assert!(matches!(missing, AgentError::NotFound { .. }), "{missing}");

    let outside = TransferPayload::dataset("/etc/passwd");
    let refused = agents
        .start_transfer("edge-1", &outside, "edge-2")
        .await
        .unwrap_err();
    assert!(matches!(refused, AgentError::Refused { .. }), "{refused}");
    assert!(!refused.retryable());

    let image = agents
        .build_image("edge-1", "trainer-000007")
        .await
        .unwrap();
    assert_eq!(image, "localhost/checkpoint/trainer-000007:latest");
    let peers = agents.peers("edge-1").await.unwrap();
    assert_eq!(peers[0].rtt, Duration::from_millis(12));
    // The agent's "answers now" reaches the controller (peer-confirmed failure reads it).
    assert_eq!(peers[0].answering, Some(false));
    let none = agents.peers("edge-3").await.unwrap_err();
    assert_eq!(none, AgentError::NoAgent("edge-3".into()));
    assert!(none.retryable());

    let bodies = seen.bodies.lock().unwrap().clone();
    assert_eq!(
        bodies.len(),
        2,
        "the refused transfer was never sent: {bodies:#?}"
    );
    assert_eq!(bodies[0]["kind"], "final");
    assert_eq!(bodies[0]["container"], "train");
    assert_eq!(bodies[0]["pod"]["namespace"], "ml");
    assert_eq!(bodies[1]["payload"]["dataset"]["path"], "esc50/train");
    assert_eq!(bodies[1]["to"]["node"], "edge-2");
    assert_eq!(bodies[1]["to"]["address"], "[fd00::2]:9461");
    assert!(
        seen.tokens
            .lock()
            .unwrap()
            .iter()
            .all(|token| token == "Bearer agent-token")
    );
}

/// A blip: the agent answers 503 once (starting up). Reads are retried within the call and
/// succeed; a call that starts work (a final checkpoint) is not repeated behind the caller's
/// back, its failure goes to the state machine as retryable.
#[tokio::test]
async fn reads_ride_out_a_blip_and_calls_that_start_work_are_not_repeated() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let polls = Arc::new(Mutex::new(0u32));
    let dumps = Arc::new(Mutex::new(0u32));
    let unavailable = || {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(ErrorBody {
                error: "starting".into(),
                kind: "unavailable".into(),
            }),
        )
    };
    let router = Router::new()
        .route(
            "/v1/transfers/{id}",
            get({
                let polls = polls.clone();
                move |Path(id): Path<String>| async move {
                    let mut polls = polls.lock().unwrap();
                    *polls += 1;
                    if *polls == 1 {
                        return Err(unavailable());
                    }
                    Ok(Json(TransferStatus {
                        id,
                        state: TransferState::Succeeded,
                        bytes_total: 600,
                        bytes_done: 600,
                        streams: 1,
                        error: None,
                    }))
                }
            }),
        )
        .route(
            "/v1/checkpoints",
            post({
                let dumps = dumps.clone();
                move || async move {
                    *dumps.lock().unwrap() += 1;
                    unavailable()
                }
            }),
        );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(axum::serve(listener, router).into_future());

    let cluster = FakeCluster::new();
    cluster.put(&agent_pod("edge-1", "127.0.0.1"));
    let stores = Stores::spawn(&cluster.client());
    stores.ready().await.unwrap();
    for _ in 0..500 {
        if stores.pods.state().len() == 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let agents = HttpAgents::new(
        stores,
        AgentDirectoryConfig {
            namespace: "automigrate-system".into(),
            selector: BTreeMap::from([("app.kubernetes.io/component".into(), "agent".into())]),
            api_port: port,
            transfer_port: 9461,
            scheme: "http".into(),
            token: None,
            ca_pem: None,
            data_root: "/var/lib/automigrate/data/".into(),
            timeout: Duration::from_secs(10),
        },
    );

    let done = agents.transfer_status("edge-1", "t-9").await.unwrap();
    assert_eq!(done.bytes_done, 600);
    assert_eq!(*polls.lock().unwrap(), 2, "the 503 was retried once");

    let pod = PodRef::new("ml", "trainer");
    let error = agents
        .checkpoint("edge-1", &pod, "train", CheckpointKind::Final)
        .await
        .unwrap_err();
    assert!(error.retryable(), "{error}");
    assert_eq!(*dumps.lock().unwrap(), 1, "a final dump is asked once");
}
