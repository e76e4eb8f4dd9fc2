//! Regression tests for issue 14 (the agent's part): dataset confinement that cannot race,
//! bounded HTTP connections, and error answers that say what the README promises.
#![cfg(feature = "server")]
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use automigrate_agent::server::HttpLimits;
use automigrate_transfer::manifest::{MIN_CHUNK_SIZE, scan};
use common::{Pki, Setup, TOKEN, TestAgent, start_agent, write};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;

/// A guard against a test hanging, far above every bound the tests configure: reaching it
/// means "never", not "too slow".
const NEVER: Duration = Duration::from_secs(20);

async fn agent_with(limits: HttpLimits) -> (Pki, TestAgent, SocketAddr) {
    let pki = Pki::new();
    let agent = start_agent(
        &pki,
        "node-a",
        Setup {
            tune: Box::new(move |_, serve| serve.http = limits),
            ..Setup::default()
        },
    )
    .await;
    let addr = agent.running.as_ref().unwrap().api_addr;
    (pki, agent, addr)
}

/// Reads until the server closes the connection; `Err` if it is still open at [`NEVER`].
async fn closed_by_server(stream: &mut TcpStream) -> Result<(), String> {
    let mut sink = Vec::new();
    match tokio::time::timeout(NEVER, stream.read_to_end(&mut sink)).await {
        Ok(_) => Ok(()),
        Err(_) => Err(format!("still open after {NEVER:?}")),
    }
}

/// A request head that never completes.
async fn half_a_head(addr: SocketAddr) -> TcpStream {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    stream
        .write_all(b"GET /v1/peers HTTP/1.1\r\nHost: x\r\n")
        .await
        .unwrap();
    stream
}

async fn healthz_answers(addr: SocketAddr) -> bool {
    let Ok(mut stream) = TcpStream::connect(addr).await else {
        return false;
    };
    if stream
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .await
        .is_err()
    {
        return false;
    }
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(NEVER, stream.read_to_end(&mut answer)).await;
    answer.starts_with(b"HTTP/1.1 200")
}

/// The check and the read are one step: after `dataset_source` has checked `sets/ds`, its
/// parent directory is swapped for a symlink to a tree outside the data root holding the same
/// names. Reading the source must not list or read that tree (it did: the check resolved the
/// path, and the scan then read the path string again, following the new symlink).
#[tokio::test]
async fn a_dataset_swapped_for_a_symlink_after_the_check_is_not_read_outside_the_root() {
    let pki = Pki::new();
    let a = start_agent(&pki, "node-a", Setup::default()).await;
    write(&a.data_root(), "sets/ds/inside", b"in");
    let outside = tempfile::tempdir().unwrap();
    write(outside.path(), "ds/secret", b"from outside the data root");

    let source = a.agent().dataset_source("sets/ds").unwrap();
    std::fs::rename(a.data_root().join("sets"), a.data_root().join("sets.old")).unwrap();
    std::os::unix::fs::symlink(outside.path(), a.data_root().join("sets")).unwrap();

    let scanned = tokio::task::spawn_blocking(move || scan(&source, None, MIN_CHUNK_SIZE, 1))
        .await
        .unwrap();
    if let Ok(scanned) = scanned {
        let files: Vec<_> = scanned
            .manifest
            .files
            .iter()
            .map(|file| file.path.to_string())
            .collect();
        panic!("the swapped-in tree outside the data root was read: {files:?}");
    }
}

#[tokio::test]
async fn a_connection_that_sends_no_request_head_is_closed_after_the_header_timeout() {
    let (_pki, _agent, addr) = agent_with(HttpLimits {
        header_read_timeout: Duration::from_millis(200),
        ..HttpLimits::default()
    })
    .await;
    let mut silent = TcpStream::connect(addr).await.unwrap();
    let mut slow = half_a_head(addr).await;
    closed_by_server(&mut silent)
        .await
        .expect("a silent connection");
    closed_by_server(&mut slow)
        .await
        .expect("a connection with half a head");
    assert!(healthz_answers(addr).await, "the API still answers");
}

#[tokio::test]
async fn connections_past_the_cap_are_closed_and_a_freed_slot_serves_again() {
    let (_pki, _agent, addr) = agent_with(HttpLimits {
        header_read_timeout: Duration::from_secs(600),
        max_connections: 2,
        ..HttpLimits::default()
    })
    .await;
    // Accepted in order: these two hold both slots (their header timeout is far away).
    let first = TcpStream::connect(addr).await.unwrap();
    let _second = half_a_head(addr).await;
    let mut third = TcpStream::connect(addr).await.unwrap();
    closed_by_server(&mut third)
        .await
        .expect("a connection past the cap");
    drop(first);
    let deadline = tokio::time::Instant::now() + NEVER;
    while !healthz_answers(addr).await {
        assert!(
            tokio::time::Instant::now() < deadline,
            "a freed slot never served again"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn shutdown_ends_within_its_bound_with_idle_connections_open() {
    let (_pki, mut agent, addr) = agent_with(HttpLimits {
        header_read_timeout: Duration::from_secs(600),
        idle_timeout: Duration::from_secs(600),
        shutdown_timeout: Duration::from_millis(300),
        ..HttpLimits::default()
    })
    .await;
    let mut open = Vec::new();
    for _ in 0..3 {
        open.push(TcpStream::connect(addr).await.unwrap());
    }
    for _ in 0..2 {
        open.push(half_a_head(addr).await);
    }
    // Every connection is accepted and waiting for its head before the shutdown starts.
    assert!(healthz_answers(addr).await);
    tokio::time::timeout(NEVER, agent.stop())
        .await
        .expect("the shutdown did not end");
    for stream in &mut open {
        closed_by_server(stream)
            .await
            .expect("closed by the shutdown");
    }
}

#[tokio::test]
async fn a_request_body_that_stops_arriving_is_answered_408_after_the_idle_timeout() {
    let (_pki, _agent, addr) = agent_with(HttpLimits {
        idle_timeout: Duration::from_millis(200),
        ..HttpLimits::default()
    })
    .await;
    let mut stream = TcpStream::connect(addr).await.unwrap();
    let head = format!(
        "POST /v1/transfers HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\n\
         Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{{\"payl"
    );
    stream.write_all(head.as_bytes()).await.unwrap();
    let mut answer = Vec::new();
    tokio::time::timeout(NEVER, stream.read_to_end(&mut answer))
        .await
        .expect("the stalled request was never answered")
        .unwrap();
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
}

/// Sends one request with the token and `Connection: close`; the status and the body.
async fn exchange(addr: SocketAddr, method: &str, path: &str, body: &str) -> (u16, String) {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    let request = format!(
        "{method} {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut answer = Vec::new();
    tokio::time::timeout(NEVER, stream.read_to_end(&mut answer))
        .await
        .unwrap()
        .unwrap();
    let answer = String::from_utf8(answer).unwrap();
    let status = answer[9..12].parse().unwrap();
    let body = answer.split_once("\r\n\r\n").unwrap().1.to_string();
    (status, body)
}

#[tokio::test]
async fn error_answers_quote_at_most_a_few_hundred_characters_of_the_input() {
    let (_pki, _agent, addr) = agent_with(HttpLimits::default()).await;
    let long_path = vec!["segment"; 500].join("/");
    let unknown_variant = "x".repeat(5000);
    let cases = [
        (
            "POST",
            "/v1/transfers".to_string(),
            serde_json::to_string(&automigrate_agent::api::TransferRequest {
                payload: automigrate_agent::api::Payload::Dataset { path: long_path },
                to: automigrate_agent::api::Peer {
                    node: "node-b".into(),
                    address: "127.0.0.1:9".into(),
                },
            })
            .unwrap(),
        ),
        (
            "POST",
            "/v1/checkpoints".to_string(),
            format!(
                r#"{{"pod": {{"namespace": "ml", "name": "p"}}, "container": "main", "kind": "{unknown_variant}"}}"#
            ),
        ),
        ("GET", format!("/{}", "y".repeat(5000)), String::new()),
    ];
    for (method, path, body) in cases {
        let (status, answer) = exchange(addr, method, &path, &body).await;
        assert!((400..500).contains(&status), "{status}: {answer}");
        let answer: automigrate_agent::api::ErrorBody = serde_json::from_str(&answer).unwrap();
        assert!(
            answer.error.chars().count() <= 500,
            "{method} {}…: {} characters: {}…",
            path.chars().take(20).collect::<String>(),
            answer.error.len(),
            answer.error.chars().take(200).collect::<String>()
        );
        assert!(answer.error.contains("truncated"), "{}", answer.error);
    }
}

/// The README promises 404 `notFound` for a pod this node does not run; with the runc backend
/// (runc: "container does not exist") it was a 500 `checkpointFailed`.
#[tokio::test]
async fn a_checkpoint_of_a_pod_runc_does_not_know_is_404_not_found() {
    use automigrate_agent::api::{CheckpointKind, CheckpointRequest, error_kind};
    use automigrate_agent::checkpointer::{BackendCheckpointer, RuncIdTemplate};
    use automigrate_agent::client::ClientError;
    use automigrate_checkpoint::command::{CommandOutput, RecordingRunner};
    use automigrate_checkpoint::runc::RuncBackend;
    use automigrate_core::model::PodRef;

    let runner = RecordingRunner::new();
    runner.answer_when(
        ["criu", "--version"],
        CommandOutput::success("Version: 4.1.1\n"),
    );
    runner.answer_when(["criu", "check"], CommandOutput::success("Looks good.\n"));
    runner.answer_when(
        ["runc", "--version"],
        CommandOutput::success("runc version 1.1.5\n"),
    );
    // What runc 1.1 prints for an unknown id.
    runner.answer_when(
        ["runc", "state"],
        CommandOutput::failure(
            1,
            "time=\"2026-12-06T12:00:00Z\" level=error msg=\"container does not exist\"\n",
        ),
    );
    let checkpointer = std::sync::Arc::new(BackendCheckpointer::new(
        RuncBackend::new(runner, "runc", "criu"),
        RuncIdTemplate("{namespace}-{pod}-{container}".into()),
    ));
    let pki = Pki::new();
    let agent = start_agent(
        &pki,
        "node-a",
        Setup {
            checkpointer: Some(checkpointer),
            ..Setup::default()
        },
    )
    .await;
    let error = agent
        .client
        .checkpoint(&CheckpointRequest {
            pod: PodRef::new("ml", "not-here"),
            container: "main".into(),
            kind: CheckpointKind::Periodic,
        })
        .await
        .unwrap_err();
    assert!(matches!(error, ClientError::NotFound { .. }), "{error}");
    assert_eq!(error.kind(), Some(error_kind::NOT_FOUND), "{error}");
}
