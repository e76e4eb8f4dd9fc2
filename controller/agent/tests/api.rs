//! Client ↔ server round trips on loopback for every endpoint, with the fake checkpoint
//! backend (no root): checkpoints, listing, retention, incremental chains, transfers of
//! checkpoints and datasets between two agents, images, peers, metrics, health, auth and bad
//! input.
#![cfg(feature = "server")]
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Semaphore;

use automigrate_agent::api::{
    CheckpointKind, CheckpointQuery, CheckpointRequest, CheckpointSummary, ErrorBody, ImageRequest,
    Payload, Peer, TransferRequest, TransferState, error_kind,
};
use automigrate_agent::checkpointer::testing::FakeBackend;
use automigrate_agent::client::{AgentClient, ClientError};
use automigrate_agent::image;
use automigrate_core::model::PodRef;
use common::{Pki, Setup, TOKEN, finished_transfer, start_agent, wait_until, write};

fn request(pod: &str, kind: CheckpointKind) -> CheckpointRequest {
    CheckpointRequest {
        pod: PodRef::new("ml", pod),
        container: "main".to_string(),
        kind,
    }
}

#[tokio::test]
async fn health_readiness_and_metrics_need_no_token() {
    let pki = Pki::new();
    let agent = start_agent(&pki, "node-a", Setup::default()).await;
    let anonymous = AgentClient::new(&agent.base_url, None).unwrap();
    anonymous.health().await.unwrap();
    anonymous.ready().await.unwrap();
    agent
        .client
        .checkpoint(&request("trainer", CheckpointKind::Periodic))
        .await
        .unwrap();
    let text = anonymous.metrics().await.unwrap();
    for expected in [
        "automigrate_agent_checkpoints_total{backend=\"criu-process\",kind=\"periodic\",result=\"ok\"} 1",
        "automigrate_agent_checkpoint_freeze_seconds_bucket",
        "automigrate_agent_checkpoint_duration_seconds_count",
        "automigrate_agent_store_checkpoints 1",
        "automigrate_agent_store_bytes",
        "automigrate_agent_checkpoint_bytes_total",
    ] {
        assert!(text.contains(expected), "{expected} missing in:\n{text}");
    }
}

#[tokio::test]
async fn checkpoints_are_taken_listed_newest_first_and_kept_by_retention() {
    let pki = Pki::new();
    let agent = start_agent(
        &pki,
        "node-a",
        Setup {
            tune: Box::new(|options, _| options.retention.count = 2),
            ..Setup::default()
        },
    )
    .await;
    let first = agent
        .client
        .checkpoint(&request("trainer", CheckpointKind::Periodic))
        .await
        .unwrap();
    assert_eq!(first.id, "trainer-000001");
    assert_eq!(first.pod, PodRef::new("ml", "trainer"));
    assert_eq!(first.container, "main");
    assert_eq!(first.freeze, Duration::from_millis(7));
    assert!(first.verified);
    assert_eq!(first.parent, None);
    assert_eq!(first.files, 3, "pages, inventory, config.dump");
    assert!(first.bytes > 64 * 1024);
    for _ in 0..2 {
        agent
            .client
            .checkpoint(&request("trainer", CheckpointKind::Periodic))
            .await
            .unwrap();
    }
    agent
        .client
        .checkpoint(&request("other", CheckpointKind::Final))
        .await
        .unwrap();

    let listed = agent
        .client
        .checkpoints(&PodRef::new("ml", "trainer"))
        .await
        .unwrap();
    let ids: Vec<_> = listed.iter().map(|summary| summary.id.as_str()).collect();
    assert_eq!(
        ids,
        ["trainer-000003", "trainer-000002"],
        "retention keeps 2"
    );
    assert!(listed.iter().all(|summary| summary.verified));

    let all = agent
        .client
        .list_checkpoints(&CheckpointQuery::default())
        .await
        .unwrap();
    assert_eq!(all.len(), 3);
    assert_eq!(all[0].id, "other-000001", "newest first across pods");
    let namespace_only = agent
        .client
        .list_checkpoints(&CheckpointQuery {
            namespace: Some("elsewhere".into()),
            pod: None,
        })
        .await
        .unwrap();
    assert!(namespace_only.is_empty());
    let empty_values = agent
        .client
        .list_checkpoints(&CheckpointQuery {
            namespace: Some(String::new()),
            pod: Some(String::new()),
        })
        .await
        .unwrap();
    assert_eq!(empty_values, all, "empty filters are no filters");
    let calls = agent.fake.as_ref().unwrap().calls();
    assert_eq!(calls.len(), 4);
    assert_eq!(calls[0].workload, "ml/trainer/main");
}

#[tokio::test]
async fn periodic_checkpoints_are_incremental_until_the_next_full_one() {
    let pki = Pki::new();
    let agent = start_agent(
        &pki,
        "node-a",
        Setup {
            tune: Box::new(|options, _| {
                options.full_every = 3;
                options.retention.count = 10;
            }),
            ..Setup::default()
        },
    )
    .await;
    let mut parents = Vec::new();
    for _ in 0..4 {
        let summary = agent
            .client
            .checkpoint(&request("trainer", CheckpointKind::Periodic))
            .await
            .unwrap();
        parents.push(summary.parent);
    }
    let final_one = agent
        .client
        .checkpoint(&request("trainer", CheckpointKind::Final))
        .await
        .unwrap();
    assert_eq!(
        parents,
        [
            None,
            Some("trainer-000001".to_string()),
            Some("trainer-000002".to_string()),
            None
        ]
    );
    assert_eq!(final_one.parent, None, "final checkpoints are always full");
    let calls = agent.fake.as_ref().unwrap().calls();
    assert_eq!(calls[1].parent.as_deref(), Some("trainer-000001"));
}

#[tokio::test]
async fn checkpoint_failures_conflicts_and_bad_names_have_clear_errors() {
    let pki = Pki::new();
    let gate = Arc::new(Semaphore::new(1));
    let agent = start_agent(
        &pki,
        "node-a",
        Setup {
            fake: FakeBackend::default()
                .with_failing(vec!["ml/broken/main".into()])
                .with_gate(gate.clone()),
            ..Setup::default()
        },
    )
    .await;
    let error = agent
        .client
        .checkpoint(&request("broken", CheckpointKind::Final))
        .await
        .unwrap_err();
    assert!(
        matches!(&error, ClientError::Agent { status: 500, kind, .. } if kind == error_kind::CHECKPOINT_FAILED),
        "{error}"
    );
    assert!(
        error.to_string().contains("failed as configured"),
        "{error}"
    );

    // Two at once for one pod: the second is refused while the first runs.
    gate.forget_permits(1);
    let client = agent.client.clone();
    let first = tokio::spawn(async move {
        client
            .checkpoint(&request("trainer", CheckpointKind::Periodic))
            .await
    });
    wait_until("the first checkpoint to start", || {
        let calls = agent.fake.as_ref().unwrap().calls().len();
        async move { calls == 2 }
    })
    .await;
    let error = agent
        .client
        .checkpoint(&request("trainer", CheckpointKind::Periodic))
        .await
        .unwrap_err();
    assert!(
        matches!(&error, ClientError::Rejected { status: 409, kind, .. } if kind == error_kind::CONFLICT),
        "{error}"
    );
    gate.add_permits(1);
    first.await.unwrap().unwrap();

    // The client refuses bad names before sending; the server refuses them too.
    let error = agent
        .client
        .checkpoint(&request("../etc", CheckpointKind::Final))
        .await
        .unwrap_err();
    assert!(matches!(error, ClientError::InvalidArgument(_)), "{error}");
    let http = reqwest_client();
    for body in [
        serde_json::json!({"pod": {"namespace": "ml", "name": "../etc"}, "container": "main", "kind": "final"}),
        serde_json::json!({"pod": {"namespace": "ML", "name": "a"}, "container": "main", "kind": "final"}),
        serde_json::json!({"pod": {"namespace": "ml", "name": "a"}, "container": "a/b", "kind": "final"}),
    ] {
        let (status, error) = post_raw(&http, &agent.base_url, "/v1/checkpoints", &body).await;
        assert_eq!(status, 400, "{body}");
        assert_eq!(error.kind, error_kind::INVALID);
        assert!(error.error.contains("not a valid name"), "{}", error.error);
    }
    let (status, error) = post_raw(
        &http,
        &agent.base_url,
        "/v1/checkpoints",
        &serde_json::json!({"pod": {"namespace": "ml", "name": "a"}, "container": "main", "kind": "sometimes"}),
    )
    .await;
    assert_eq!(status, 400);
    assert_eq!(error.kind, error_kind::INVALID);
    assert!(error.error.contains("kind"), "{}", error.error);
    let response = http
        .post(format!("{}/v1/checkpoints", agent.base_url))
        .bearer_auth(TOKEN)
        .header("content-type", "application/json")
        .body("{not json")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 400);
    let error: ErrorBody = response.json().await.unwrap();
    assert_eq!(error.kind, error_kind::INVALID);
    let response = http
        .post(format!("{}/v1/checkpoints", agent.base_url))
        .bearer_auth(TOKEN)
        .header("content-type", "application/json")
        .body(vec![b' '; 100 * 1024])
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 413, "bodies are bounded");

    // Queries and routes.
    let error = agent
        .client
        .list_checkpoints(&CheckpointQuery {
            namespace: Some("../x".into()),
            pod: None,
        })
        .await
        .unwrap_err();
    assert!(
        matches!(&error, ClientError::Rejected { status: 400, kind, .. } if kind == error_kind::INVALID),
        "{error}"
    );
    let error = agent
        .client
        .list_checkpoints(&CheckpointQuery {
            namespace: None,
            pod: Some("trainer".into()),
        })
        .await
        .unwrap_err();
    assert!(error.to_string().contains("needs `namespace`"), "{error}");
    let response = http
        .get(format!("{}/v1/nothing", agent.base_url))
        .bearer_auth(TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 404);
    assert_eq!(
        response.json::<ErrorBody>().await.unwrap().kind,
        error_kind::NOT_FOUND
    );
    let response = http
        .delete(format!("{}/v1/checkpoints", agent.base_url))
        .bearer_auth(TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 405);
    assert_eq!(
        response.json::<ErrorBody>().await.unwrap().kind,
        error_kind::INVALID
    );
    let text = agent.client.metrics().await.unwrap();
    assert!(
        text.contains("automigrate_agent_checkpoints_total{backend=\"criu-process\",kind=\"final\",result=\"error\"} 1"),
        "{text}"
    );
}

#[tokio::test]
async fn a_body_over_the_limit_is_refused_before_it_is_read() {
    let pki = Pki::new();
    let agent = start_agent(&pki, "node-a", Setup::default()).await;
    // Another test may have installed the provider already; either way one is installed.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let http = reqwest::Client::new();
    let send = |body: Vec<u8>| {
        http.post(format!("{}/v1/checkpoints", agent.base_url))
            .bearer_auth(TOKEN)
            .header("content-type", "application/json")
            .body(body)
            .send()
    };
    // Valid JSON padded with spaces: only its size is wrong.
    let valid = serde_json::to_vec(&request("trainer", CheckpointKind::Periodic)).unwrap();
    let mut padded = valid.clone();
    padded.resize(automigrate_agent::server::MAX_BODY_BYTES + 1, b' ');
    let refused = send(padded).await.unwrap();
    assert_eq!(refused.status().as_u16(), 413);
    assert!(
        agent.fake.as_ref().unwrap().calls().is_empty(),
        "nothing ran"
    );
    // The same request within the limit is taken: the limit, not the content, refused it.
    let mut within = valid;
    within.resize(automigrate_agent::server::MAX_BODY_BYTES, b' ');
    assert!(send(within).await.unwrap().status().is_success());
}

#[tokio::test]
async fn every_v1_route_needs_the_token() {
    let pki = Pki::new();
    let agent = start_agent(&pki, "node-a", Setup::default()).await;
    for token in [None, Some("wrong-token-0123456789".to_string())] {
        let client = AgentClient::new(&agent.base_url, token.clone()).unwrap();
        let failures = [
            client
                .checkpoint(&request("trainer", CheckpointKind::Final))
                .await
                .unwrap_err(),
            client
                .checkpoints(&PodRef::new("ml", "trainer"))
                .await
                .unwrap_err(),
            client
                .start_transfer(&TransferRequest {
                    payload: Payload::Checkpoint { id: "x-1".into() },
                    to: agent.peer(),
                })
                .await
                .unwrap_err(),
            client.transfer_status("t-1-1").await.unwrap_err(),
            client
                .build_image(&ImageRequest {
                    checkpoint_id: "x-1".into(),
                })
                .await
                .unwrap_err(),
            client.peers().await.unwrap_err(),
        ];
        for error in failures {
            assert!(
                matches!(&error, ClientError::Unauthorized { kind, .. } if kind == error_kind::UNAUTHORIZED),
                "{token:?}: {error}"
            );
            assert_eq!(error.kind(), Some(error_kind::UNAUTHORIZED));
        }
    }
    assert!(
        agent.fake.as_ref().unwrap().calls().is_empty(),
        "nothing ran"
    );
}

#[tokio::test]
async fn a_checkpoint_chain_moves_to_a_peer_which_lists_it_verified() {
    let pki = Pki::new();
    let tune = || -> Box<dyn FnOnce(&mut _, &mut _)> {
        Box::new(
            |options: &mut automigrate_agent::agent::AgentOptions, _: &mut _| {
                options.full_every = 2;
                options.retention.count = 5;
            },
        )
    };
    let a = start_agent(
        &pki,
        "node-a",
        Setup {
            tune: tune(),
            ..Setup::default()
        },
    )
    .await;
    let b = start_agent(
        &pki,
        "node-b",
        Setup {
            tune: tune(),
            ..Setup::default()
        },
    )
    .await;
    let base = a
        .client
        .checkpoint(&request("trainer", CheckpointKind::Periodic))
        .await
        .unwrap();
    let delta = a
        .client
        .checkpoint(&request("trainer", CheckpointKind::Periodic))
        .await
        .unwrap();
    assert_eq!(delta.parent.as_deref(), Some(base.id.as_str()));

    let started = a
        .client
        .start_transfer(&TransferRequest {
            payload: Payload::Checkpoint {
                id: delta.id.clone(),
            },
            to: b.peer(),
        })
        .await
        .unwrap();
    assert_eq!(started.state, TransferState::Running);
    let done = finished_transfer(&a.client, &started.id).await;
    assert_eq!(done.state, TransferState::Succeeded, "{:?}", done.error);
    assert_eq!(done.bytes_done, done.bytes_total);
    assert!(done.bytes_total >= base.bytes + delta.bytes);
    assert!(done.streams >= 1);

    let at_b = b
        .client
        .checkpoints(&PodRef::new("ml", "trainer"))
        .await
        .unwrap();
    assert_eq!(at_b.len(), 2, "{at_b:?}");
    assert_eq!(at_b[0].id, delta.id);
    assert_eq!(at_b[1].id, base.id);
    for (received, sent) in at_b.iter().zip([&delta, &base]) {
        assert!(received.verified);
        assert_eq!(received.bytes, sent.bytes);
        assert_eq!(received.parent, sent.parent);
        assert_eq!(received.created_at, sent.created_at);
    }
    // Byte for byte, through the store's own verification.
    b.agent()
        .store()
        .verified(
            &automigrate_core::model::PodRef::new("ml", "trainer"),
            &delta.id,
        )
        .unwrap();
    // The next local checkpoint at b continues after the received sequence.
    let next = b
        .client
        .checkpoint(&request("trainer", CheckpointKind::Final))
        .await
        .unwrap();
    assert_eq!(next.id, "trainer-000003");
    let metrics = b.client.metrics().await.unwrap();
    assert!(
        metrics.contains("automigrate_agent_received_checkpoints_total{result=\"stored\"} 2"),
        "{metrics}"
    );
    let metrics = a.client.metrics().await.unwrap();
    assert!(
        metrics.contains(
            "automigrate_agent_transfers_total{payload=\"checkpoint\",result=\"succeeded\"} 1"
        ),
        "{metrics}"
    );
    assert!(metrics.contains("automigrate_agent_transfer_bytes_total"));
}

#[tokio::test]
async fn a_dataset_lands_at_the_same_path_under_the_peer_data_root() {
    let pki = Pki::new();
    let a = start_agent(&pki, "node-a", Setup::default()).await;
    let b = start_agent(&pki, "node-b", Setup::default()).await;
    let files: Vec<(String, Vec<u8>)> = (0..40)
        .map(|index| {
            (
                format!("sets/digits/part-{}/f{index}.bin", index % 4),
                (0..(1000 + index * 997))
                    .map(|byte| (byte * 31 + index) as u8)
                    .collect(),
            )
        })
        .chain([("sets/digits/large.bin".to_string(), vec![7u8; 3 << 20])])
        .collect();
    for (path, data) in &files {
        write(&a.data_root(), path, data);
    }
    let started = a
        .client
        .start_transfer(&TransferRequest {
            payload: Payload::Dataset {
                path: "sets/digits".into(),
            },
            to: b.peer(),
        })
        .await
        .unwrap();
    let done = finished_transfer(&a.client, &started.id).await;
    assert_eq!(done.state, TransferState::Succeeded, "{:?}", done.error);
    let total: usize = files.iter().map(|(_, data)| data.len()).sum();
    assert_eq!(done.bytes_total, total as u64);
    for (path, data) in &files {
        assert_eq!(
            &std::fs::read(b.data_root().join(path)).unwrap(),
            data,
            "{path}"
        );
    }
}

#[tokio::test]
async fn transfer_requests_are_checked() {
    let pki = Pki::new();
    let a = start_agent(&pki, "node-a", Setup::default()).await;
    write(&a.data_root(), "ok/file", b"x");
    let outside = tempfile::tempdir().unwrap();
    write(outside.path(), "secret", b"s");
    std::os::unix::fs::symlink(outside.path(), a.data_root().join("escape")).unwrap();
    let to = |address: &str| Peer {
        node: "node-b".into(),
        address: address.into(),
    };
    let cases = [
        (
            Payload::Checkpoint {
                id: "nope-000001".into(),
            },
            to("127.0.0.1:9"),
            404,
            error_kind::NOT_FOUND,
        ),
        (
            Payload::Checkpoint { id: "../x".into() },
            to("127.0.0.1:9"),
            400,
            error_kind::INVALID,
        ),
        (
            Payload::Dataset {
                path: "../etc".into(),
            },
            to("127.0.0.1:9"),
            400,
            error_kind::INVALID,
        ),
        (
            Payload::Dataset {
                path: "/etc".into(),
            },
            to("127.0.0.1:9"),
            400,
            error_kind::INVALID,
        ),
        (
            Payload::Dataset {
                path: "escape".into(),
            },
            to("127.0.0.1:9"),
            400,
            error_kind::INVALID,
        ),
        (
            Payload::Dataset {
                path: "missing".into(),
            },
            to("127.0.0.1:9"),
            404,
            error_kind::NOT_FOUND,
        ),
        (
            Payload::Dataset { path: "ok".into() },
            to("127.0.0.1"),
            400,
            error_kind::INVALID,
        ),
        (
            Payload::Dataset { path: "ok".into() },
            Peer {
                node: "Bad Node".into(),
                address: "127.0.0.1:9".into(),
            },
            400,
            error_kind::INVALID,
        ),
    ];
    for (payload, to, status, kind) in cases {
        let error = a
            .client
            .start_transfer(&TransferRequest {
                payload: payload.clone(),
                to,
            })
            .await
            .unwrap_err();
        let got = match &error {
            ClientError::NotFound { .. } => 404,
            ClientError::Rejected { status, .. } => *status,
            other => panic!("{payload:?}: {other}"),
        };
        assert_eq!(got, status, "{payload:?}: {error}");
        assert_eq!(error.kind(), Some(kind), "{payload:?}");
    }
    let error = a.client.transfer_status("t-0-999").await.unwrap_err();
    assert!(matches!(error, ClientError::NotFound { .. }), "{error}");
    let error = a.client.transfer_status("bad id!").await.unwrap_err();
    assert!(
        matches!(error, ClientError::Rejected { status: 400, .. }),
        "{error}"
    );
}

#[tokio::test]
async fn a_peer_that_is_not_the_named_node_is_refused() {
    let pki = Pki::new();
    let a = start_agent(&pki, "node-a", Setup::default()).await;
    let b = start_agent(&pki, "node-b", Setup::default()).await;
    write(&a.data_root(), "set/file", b"data");
    // b's address, but we mean node-c: b's certificate does not name node-c.
    let started = a
        .client
        .start_transfer(&TransferRequest {
            payload: Payload::Dataset { path: "set".into() },
            to: Peer {
                node: "node-c".into(),
                address: b.transfer_addr.to_string(),
            },
        })
        .await
        .unwrap();
    let done = finished_transfer(&a.client, &started.id).await;
    assert_eq!(done.state, TransferState::Failed);
    let error = done.error.unwrap();
    assert!(
        error.to_lowercase().contains("certificate") || error.contains("TLS"),
        "{error}"
    );
    assert!(!b.data_root().join("set/file").exists());
}

#[tokio::test]
async fn a_tampered_received_checkpoint_is_never_listed() {
    let pki = Pki::new();
    let a = start_agent(&pki, "node-a", Setup::default()).await;
    let b = start_agent(&pki, "node-b", Setup::default()).await;
    let taken = a
        .client
        .checkpoint(&request("trainer", CheckpointKind::Final))
        .await
        .unwrap();
    // As if it had arrived at b, with one byte changed on the way to the disk.
    let source = a.store_root().join("ml/trainer").join(&taken.id);
    let incoming = b
        .data_root()
        .join(".automigrate-incoming/checkpoints/ml/trainer")
        .join(&taken.id);
    copy_dir(&source, &incoming);
    let pages = incoming.join("checkpoint/pages-1.img");
    let mut bytes = std::fs::read(&pages).unwrap();
    bytes[100] ^= 0xff;
    std::fs::write(&pages, bytes).unwrap();

    let listed = b
        .client
        .checkpoints(&PodRef::new("ml", "trainer"))
        .await
        .unwrap();
    assert!(listed.is_empty(), "{listed:?}");
    assert!(!incoming.exists(), "the tampered copy is removed");
    let metrics = b.client.metrics().await.unwrap();
    assert!(
        metrics.contains("automigrate_agent_received_checkpoints_total{result=\"refused\"} 1"),
        "{metrics}"
    );

    // A copy that is still arriving (a listed file missing) waits, then goes in.
    copy_dir(&source, &incoming);
    let config = incoming.join("config.dump");
    let held_back = std::fs::read(&config).unwrap();
    std::fs::remove_file(&config).unwrap();
    assert!(
        b.client
            .checkpoints(&PodRef::new("ml", "trainer"))
            .await
            .unwrap()
            .is_empty()
    );
    assert!(incoming.exists(), "an incomplete archive is left to finish");
    std::fs::write(&config, held_back).unwrap();
    let listed = b
        .client
        .checkpoints(&PodRef::new("ml", "trainer"))
        .await
        .unwrap();
    assert_eq!(listed.len(), 1);
    assert!(listed[0].verified);

    // A manifest asking for a link out of the archive is refused before anything is linked.
    let second = a
        .client
        .checkpoint(&request("trainer", CheckpointKind::Final))
        .await
        .unwrap();
    let incoming = incoming.with_file_name(&second.id);
    copy_dir(
        &a.store_root().join("ml/trainer").join(&second.id),
        &incoming,
    );
    let manifest_path = incoming.join("automigrate-manifest.json");
    let mut manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&manifest_path).unwrap()).unwrap();
    manifest["files"].as_array_mut().unwrap().push(
        serde_json::json!({"type": "symlink", "path": "checkpoint/parent", "target": "/etc"}),
    );
    std::fs::write(&manifest_path, serde_json::to_vec(&manifest).unwrap()).unwrap();
    let listed = b
        .client
        .checkpoints(&PodRef::new("ml", "trainer"))
        .await
        .unwrap();
    assert_eq!(listed.len(), 1, "{listed:?}");
    assert!(!incoming.exists());
    let metrics = b.client.metrics().await.unwrap();
    assert!(
        metrics.contains("automigrate_agent_received_checkpoints_total{result=\"refused\"} 2"),
        "{metrics}"
    );
}

#[tokio::test]
async fn a_checkpoint_found_damaged_when_its_image_is_built_is_listed_unverified() {
    let pki = Pki::new();
    let a = start_agent(&pki, "node-a", Setup::default()).await;
    let taken = a
        .client
        .checkpoint(&request("trainer", CheckpointKind::Final))
        .await
        .unwrap();
    let trainer = PodRef::new("ml", "trainer");
    let listed = a.client.checkpoints(&trainer).await.unwrap();
    assert!(listed.iter().all(|c| c.verified), "{listed:?}");
    // Truncated at rest after it was verified (the fault suite's corrupt-at-rest).
    let pages = a
        .store_root()
        .join("ml/trainer")
        .join(&taken.id)
        .join("checkpoint/pages-1.img");
    let bytes = std::fs::read(&pages).unwrap();
    std::fs::write(&pages, &bytes[..bytes.len() / 2]).unwrap();

    let refused = a
        .client
        .build_image(&ImageRequest {
            checkpoint_id: taken.id.clone(),
        })
        .await;
    assert!(refused.is_err(), "{refused:?}");
    let listed = a.client.checkpoints(&trainer).await.unwrap();
    let damaged = listed.iter().find(|c| c.id == taken.id).unwrap();
    assert!(!damaged.verified, "still listed verified: {damaged:?}");
}

#[tokio::test]
async fn a_final_checkpoint_becomes_an_oci_image_layout() {
    let pki = Pki::new();
    let imported = tempfile::tempdir().unwrap();
    let copy_to = imported.path().join("copy");
    let command = vec![
        "cp".to_string(),
        "-r".to_string(),
        "{layout}".to_string(),
        copy_to.display().to_string(),
    ];
    let a = start_agent(&pki, "node-a", Setup::default()).await;
    let b = start_agent(
        &pki,
        "node-b",
        Setup {
            tune: Box::new(move |options, _| {
                options.images.import_command = Some(command);
                options.full_every = 2;
            }),
            ..Setup::default()
        },
    )
    .await;
    let taken = a
        .client
        .checkpoint(&request("trainer", CheckpointKind::Final))
        .await
        .unwrap();

    // Without an import command the reference is the layout itself.
    let response = a
        .client
        .build_image(&ImageRequest {
            checkpoint_id: taken.id.clone(),
        })
        .await
        .unwrap();
    let layout_dir = a.store_root().join(".images/ml").join(&taken.id);
    assert_eq!(
        response.image,
        format!("oci:{}:{}", layout_dir.display(), taken.id)
    );
    check_layout(&layout_dir, &taken.id);
    // Asking again finds the same layout.
    let again = a
        .client
        .build_image(&ImageRequest {
            checkpoint_id: taken.id.clone(),
        })
        .await
        .unwrap();
    assert_eq!(again, response);

    // At the target: the checkpoint arrives, and the import command runs.
    let started = a
        .client
        .start_transfer(&TransferRequest {
            payload: Payload::Checkpoint {
                id: taken.id.clone(),
            },
            to: b.peer(),
        })
        .await
        .unwrap();
    assert_eq!(
        finished_transfer(&a.client, &started.id).await.state,
        TransferState::Succeeded
    );
    let response = b
        .client
        .build_image(&ImageRequest {
            checkpoint_id: taken.id.clone(),
        })
        .await
        .unwrap();
    assert_eq!(
        response.image,
        format!("localhost/automigrate/ml-trainer:{}", taken.id)
    );
    check_layout(&copy_to, &taken.id);

    // Refusals: unknown, incremental.
    let error = b
        .client
        .build_image(&ImageRequest {
            checkpoint_id: "nope-000001".into(),
        })
        .await
        .unwrap_err();
    assert!(matches!(error, ClientError::NotFound { .. }), "{error}");
    b.client
        .checkpoint(&request("trainer", CheckpointKind::Periodic))
        .await
        .unwrap();
    let delta = b
        .client
        .checkpoint(&request("trainer", CheckpointKind::Periodic))
        .await
        .unwrap();
    assert!(delta.parent.is_some());
    let error = b
        .client
        .build_image(&ImageRequest {
            checkpoint_id: delta.id.clone(),
        })
        .await
        .unwrap_err();
    assert!(
        matches!(&error, ClientError::Rejected { status: 409, .. }),
        "{error}"
    );
    assert!(error.to_string().contains("incremental"), "{error}");
}

/// The layout is a valid OCI image layout whose single layer holds the archive.
fn check_layout(dir: &std::path::Path, id: &str) {
    let read = |path: std::path::PathBuf| -> serde_json::Value {
        serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap()
    };
    assert_eq!(
        read(dir.join("oci-layout")),
        serde_json::json!({"imageLayoutVersion": "1.0.0"})
    );
    let index = read(dir.join("index.json"));
    assert_eq!(index["schemaVersion"], 2);
    let entry = &index["manifests"][0];
    assert_eq!(entry["mediaType"], image::MEDIA_TYPE_MANIFEST);
    assert_eq!(entry["annotations"][image::ANNOTATION_REF_NAME], id);
    let blob = |digest: &serde_json::Value| -> Vec<u8> {
        let path = image::blob_path(dir, digest.as_str().unwrap()).unwrap();
        let bytes = std::fs::read(path).unwrap();
        assert_eq!(
            format!("sha256:{}", image::sha256_hex(&bytes)),
            digest.as_str().unwrap(),
            "a blob does not match its digest"
        );
        bytes
    };
    let manifest_bytes = blob(&entry["digest"]);
    assert_eq!(entry["size"], manifest_bytes.len());
    let manifest: serde_json::Value = serde_json::from_slice(&manifest_bytes).unwrap();
    assert_eq!(
        manifest["annotations"][image::ANNOTATION_CONTAINER_NAME],
        "main"
    );
    assert_eq!(
        manifest["annotations"][image::ANNOTATION_CRIO_CHECKPOINT_NAME],
        "main"
    );
    assert_eq!(manifest["annotations"]["dev.automigrate.checkpoint.id"], id);
    let config: serde_json::Value =
        serde_json::from_slice(&blob(&manifest["config"]["digest"])).unwrap();
    assert_eq!(config["os"], "linux");
    let layers = manifest["layers"].as_array().unwrap();
    assert_eq!(layers.len(), 1);
    assert_eq!(layers[0]["mediaType"], image::MEDIA_TYPE_LAYER);
    assert_eq!(config["rootfs"]["diff_ids"][0], layers[0]["digest"]);
    let layer = blob(&layers[0]["digest"]);
    let mut names: Vec<String> = tar::Archive::new(layer.as_slice())
        .entries()
        .unwrap()
        .map(|entry| entry.unwrap().path().unwrap().display().to_string())
        .collect();
    names.sort();
    assert_eq!(
        names,
        [
            "automigrate-manifest.json",
            "checkpoint/inventory.img",
            "checkpoint/pages-1.img",
            "config.dump"
        ]
    );
}

#[tokio::test]
async fn peers_report_rtt_and_loss() {
    let pki = Pki::new();
    let b = start_agent(&pki, "node-b", Setup::default()).await;
    // A port nobody answers on.
    let silent = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let silent_addr = silent.local_addr().unwrap();
    drop(silent);
    let b_peer = b.peer();
    let a = start_agent(
        &pki,
        "node-a",
        Setup {
            tune: Box::new(move |_, serve| {
                serve.peers.fixed = vec![
                    b_peer,
                    Peer {
                        node: "node-gone".into(),
                        address: silent_addr.to_string(),
                    },
                ];
                serve.probe.timeout = Duration::from_millis(50);
            }),
            ..Setup::default()
        },
    )
    .await;
    let client = a.client.clone();
    wait_until("five probes to each peer", || {
        let client = client.clone();
        async move {
            let metrics = client.metrics().await.unwrap();
            ["node-b", "node-gone"].iter().all(|peer| {
                metrics.lines().any(|line| {
                    line.starts_with("automigrate_agent_probes_total")
                        && line.contains(&format!("peer=\"{peer}\""))
                        && line
                            .rsplit(' ')
                            .next()
                            .and_then(|value| value.parse::<f64>().ok())
                            .is_some_and(|value| value >= 5.0)
                })
            })
        }
    })
    .await;
    let peers = a.client.peers().await.unwrap();
    assert_eq!(peers.len(), 2, "{peers:?}");
    let reachable = peers.iter().find(|peer| peer.node == "node-b").unwrap();
    let gone = peers.iter().find(|peer| peer.node == "node-gone").unwrap();
    assert!(reachable.rtt > Duration::ZERO);
    assert!(reachable.loss < 1.0);
    assert_eq!(gone.loss, 1.0);
    assert_eq!(gone.rtt, Duration::ZERO);
    let metrics = a.client.metrics().await.unwrap();
    assert!(
        metrics.contains("automigrate_agent_peer_rtt_seconds{peer=\"node-b\"}"),
        "{metrics}"
    );
    assert!(
        metrics.contains("automigrate_agent_peer_loss_ratio{peer=\"node-gone\"} 1"),
        "{metrics}"
    );
}

/// An agent whose fake backend holds every dump until `gate` gets a permit, with a final
/// checkpoint of `trainer` requested and started (the dump is waiting at the gate).
async fn a_final_checkpoint_held_at_the_gate(
    pki: &Pki,
) -> (
    common::TestAgent,
    Arc<Semaphore>,
    tokio::task::JoinHandle<Result<CheckpointSummary, ClientError>>,
) {
    let gate = Arc::new(Semaphore::new(0));
    let agent = start_agent(
        pki,
        "node-a",
        Setup {
            fake: FakeBackend::default().with_gate(gate.clone()),
            ..Setup::default()
        },
    )
    .await;
    let client = agent.client.clone();
    let in_flight = tokio::spawn(async move {
        client
            .checkpoint(&request("trainer", CheckpointKind::Final))
            .await
    });
    let fake = agent.fake.clone().unwrap();
    wait_until("the checkpoint to start", || {
        let started = !fake.calls().is_empty();
        async move { started }
    })
    .await;
    (agent, gate, in_flight)
}

#[tokio::test]
async fn shutdown_finishes_the_request_in_flight_then_stops() {
    let pki = Pki::new();
    let (mut agent, gate, in_flight) = a_final_checkpoint_held_at_the_gate(&pki).await;
    let running = agent.running.take().unwrap();
    let shutdown = tokio::spawn(running.shutdown());
    // New connections are refused while the checkpoint is still running.
    let base_url = agent.base_url.clone();
    wait_until("the API to stop accepting", || {
        let fresh = AgentClient::new(&base_url, None).unwrap();
        async move { matches!(fresh.health().await, Err(ClientError::Unreachable { .. })) }
    })
    .await;
    assert!(!in_flight.is_finished());
    gate.add_permits(1);
    let summary = in_flight.await.unwrap().unwrap();
    assert_eq!(summary.id, "trainer-000001");
    shutdown.await.unwrap();
    let error = agent.client.health().await.unwrap_err();
    assert!(matches!(error, ClientError::Unreachable { .. }), "{error}");
    assert!(error.is_transient());
    agent.stop().await;
}

#[tokio::test]
async fn a_checkpoint_whose_caller_went_away_still_finishes_and_is_stored() {
    let pki = Pki::new();
    let (agent, gate, caller) = a_final_checkpoint_held_at_the_gate(&pki).await;
    let fake = agent.fake.clone().unwrap();
    // The controller dies mid-request: its connection closes with the dump half done.
    caller.abort();
    assert!(caller.await.unwrap_err().is_cancelled());
    gate.add_permits(1);
    let pod = PodRef::new("ml", "trainer");
    wait_until("the abandoned checkpoint to be stored", || {
        let client = agent.client.clone();
        let pod = pod.clone();
        async move {
            client
                .checkpoints(&pod)
                .await
                .is_ok_and(|list| list.iter().any(|c| c.id == "trainer-000001"))
        }
    })
    .await;
    assert_eq!(fake.calls().len(), 1, "dumped once");
}

#[tokio::test]
async fn the_client_classifies_what_is_not_an_agent() {
    for bad in ["ftp://x:1", "not a url", "http://", "http://h:1/?q=1"] {
        assert!(
            matches!(
                AgentClient::new(bad, None).unwrap_err(),
                ClientError::Url { .. }
            ),
            "{bad}"
        );
    }
    assert!(matches!(
        AgentClient::new("http://127.0.0.1:1", Some("has space".into())).unwrap_err(),
        ClientError::Setup(_)
    ));
    // Something that answers HTTP but not as an agent.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    tokio::spawn(async move {
        use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
        loop {
            let (mut stream, _) = listener.accept().await.unwrap();
            let mut buffer = [0u8; 4096];
            let _ = stream.read(&mut buffer).await;
            let _ = stream
                .write_all(b"HTTP/1.1 502 Bad Gateway\r\ncontent-length: 11\r\nconnection: close\r\n\r\nbad gateway")
                .await;
        }
    });
    let client = AgentClient::new(&format!("http://{address}/prefix"), None).unwrap();
    let error = client.peers().await.unwrap_err();
    assert!(
        matches!(&error, ClientError::UnexpectedStatus { status: 502, body } if body == "bad gateway"),
        "{error}"
    );
    assert_eq!(error.kind(), None);
}

fn reqwest_client() -> reqwest::Client {
    let _ = rustls::crypto::ring::default_provider().install_default();
    reqwest::Client::new()
}

async fn post_raw(
    http: &reqwest::Client,
    base: &str,
    path: &str,
    body: &serde_json::Value,
) -> (u16, ErrorBody) {
    let response = http
        .post(format!("{base}{path}"))
        .bearer_auth(TOKEN)
        .json(body)
        .send()
        .await
        .unwrap();
    let status = response.status().as_u16();
    (status, response.json().await.unwrap())
}

fn copy_dir(from: &std::path::Path, to: &std::path::Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        let kind = entry.file_type().unwrap();
        if kind.is_dir() {
            copy_dir(&entry.path(), &target);
        } else if kind.is_symlink() {
            std::os::unix::fs::symlink(std::fs::read_link(entry.path()).unwrap(), &target).unwrap();
        } else {
            std::fs::copy(entry.path(), &target).unwrap();
        }
    }
}

#[tokio::test]
async fn a_transfer_stopped_without_a_result_reads_failed() {
    let pki = Pki::new();
    let a = start_agent(&pki, "node-a", Setup::default()).await;
    write(&a.data_root(), "set/file", b"data");
    // A peer that takes the connection and never answers: the transfer stays in its handshake.
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let started = a
        .client
        .start_transfer(&TransferRequest {
            payload: Payload::Dataset { path: "set".into() },
            to: Peer {
                node: "node-b".into(),
                address: silent.local_addr().unwrap().to_string(),
            },
        })
        .await
        .unwrap();
    assert_eq!(started.state, TransferState::Running);
    a.agent().abort_background();
    let done = finished_transfer(&a.client, &started.id).await;
    assert_eq!(done.state, TransferState::Failed);
    let error = done.error.unwrap();
    assert!(error.contains("without a result"), "{error}");
}
