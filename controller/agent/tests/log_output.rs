//! The agent binary keeps working when its log cannot be written (a full disk under the file
//! its output goes to): logging is best effort, never a reason for a request or a transfer to
//! fail.
#![cfg(feature = "server")]
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::net::TcpListener;
use std::process::{Child, Command, Stdio};

use automigrate_agent::AgentClient;
use automigrate_agent::api::{Payload, Peer, TransferRequest, TransferState};
use common::{Pki, Setup, finished_transfer, start_agent, wait_until, write};

/// A loopback port free now (the binary binds it a moment later).
fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test]
async fn an_agent_whose_log_output_is_full_still_serves_and_transfers() {
    let pki = Pki::new();
    let receiver = start_agent(&pki, "node-b", Setup::default()).await;
    let dir = tempfile::tempdir().unwrap();
    let [ca, cert, key] = pki.write_identity("node-a", dir.path());
    let data_root = dir.path().join("data");
    write(&data_root, "set/file", &vec![7u8; 256 * 1024]);
    let api = format!("127.0.0.1:{}", free_port());
    let full = || {
        std::fs::OpenOptions::new()
            .write(true)
            .open("/dev/full")
            .unwrap()
    };
    // Every write to /dev/full fails with ENOSPC.
    let _agent = Killed(
        Command::new(env!("CARGO_BIN_EXE_automigrate-agent"))
            .args(["--node-name", "node-a", "--api-listen", &api])
            .args(["--transfer-listen", &format!("127.0.0.1:{}", free_port())])
            .arg("--data-root")
            .arg(&data_root)
            .arg("--store-root")
            .arg(dir.path().join("store"))
            .arg("--tls-ca")
            .arg(&ca)
            .arg("--tls-cert")
            .arg(&cert)
            .arg("--tls-key")
            .arg(&key)
            .env("RUST_LOG", "debug")
            .stdin(Stdio::null())
            .stdout(full())
            .stderr(full())
            .spawn()
            .unwrap(),
    );
    let client = AgentClient::new(&format!("http://{api}"), None).unwrap();
    wait_until("the agent binary to be ready", || {
        let client = client.clone();
        async move { client.ready().await.is_ok() }
    })
    .await;
    for _ in 0..20 {
        client.health().await.unwrap();
    }
    let started = client
        .start_transfer(&TransferRequest {
            payload: Payload::Dataset { path: "set".into() },
            to: Peer {
                node: "node-b".into(),
                address: receiver.transfer_addr.to_string(),
            },
        })
        .await
        .unwrap();
    let done = finished_transfer(&client, &started.id).await;
    assert_eq!(done.state, TransferState::Succeeded, "{:?}", done.error);
    assert_eq!(
        std::fs::read(receiver.data_root().join("set/file")).unwrap(),
        vec![7u8; 256 * 1024]
    );
}
