//! Hostile and unauthenticated peers: nothing lands outside the destination, and nothing at
//! all from a peer that is not authenticated.

#![cfg(test)]

#[cfg(test)]
mod common;

use std::time::Duration;

use automigrate_transfer::conn::{FrameReader, FrameWriter};
use automigrate_transfer::devcerts::DevCa;
use automigrate_transfer::manifest::ManifestLimits;
use automigrate_transfer::manifest::Source;
use automigrate_transfer::receiver::ReceiverConfig;
use automigrate_transfer::sender::{SendError, SendOptions, send};
use automigrate_transfer::tls::{TlsConfig, server_name};
use automigrate_transfer::wire::{
    ErrorCode, Frame, Hello, Intent, ManifestEntry, ManifestStart, PROTOCOL_VERSION,
};
use common::*;

/// Everything under `root`, recursively, as relative paths.
fn everything(root: &std::path::Path) -> Vec<String> {
    let mut found = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let entry = entry.unwrap();
            let path = entry.path();
            found.push(path.strip_prefix(root).unwrap().display().to_string());
            if entry.file_type().unwrap().is_dir() {
                stack.push(path);
            }
        }
    }
    found.sort();
    found
}

/// Speaks the protocol by hand as an authenticated peer and returns the receiver's answer to
/// a manifest made of `entries`.
async fn offer_manifest(
    addr: std::net::SocketAddr,
    tls: &TlsConfig,
    target: &str,
    entries: Vec<ManifestEntry>,
) -> Frame {
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let name = server_name(None, addr.ip()).unwrap();
    let stream = tls.connector().connect(name, tcp).await.unwrap();
    let (read_half, write_half) = tokio::io::split(stream);
    let mut reader = FrameReader::new(read_half);
    let mut writer = FrameWriter::new(write_half);
    let files = entries
        .iter()
        .filter(|e| matches!(e, ManifestEntry::File { .. }))
        .count() as u64;
    let dirs = entries.len() as u64 - files;
    writer
        .send(&Frame::Hello(Hello {
            min_version: PROTOCOL_VERSION,
            max_version: PROTOCOL_VERSION,
            intent: Intent::Open {
                transfer_id: [9; 32],
            },
        }))
        .await
        .unwrap();
    // The receiver may refuse and close before the whole manifest is written.
    let _ = writer
        .send(&Frame::ManifestStart(ManifestStart {
            target: target.into(),
            chunk_size: 1 << 20,
            files,
            dirs,
            total_bytes: entries
                .iter()
                .map(|e| match e {
                    ManifestEntry::File { size, .. } => *size,
                    ManifestEntry::Dir { .. } => 0,
                })
                .sum(),
        }))
        .await;
    for entry in entries {
        let _ = writer.send(&Frame::ManifestEntry(entry)).await;
    }
    let _ = writer.send(&Frame::ManifestEnd).await;
    let _ = writer.flush().await;
    let welcome = reader
        .expect(Duration::from_secs(10), "Welcome")
        .await
        .unwrap();
    assert!(matches!(welcome, Frame::Welcome(_)), "{welcome:?}");
    reader
        .expect(Duration::from_secs(10), "an answer")
        .await
        .unwrap()
}

fn file(path: &str) -> ManifestEntry {
    ManifestEntry::File {
        path: path.into(),
        size: 3,
        mode: 0o644,
        hash: *blake3::hash(b"abc").as_bytes(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn traversal_and_absolute_names_are_refused_before_anything_is_written() {
    let pki = pki();
    let dest_parent = tempfile::tempdir().unwrap();
    let dest = dest_parent.path().join("dest");
    std::fs::create_dir(&dest).unwrap();
    let running = start_receiver(ReceiverConfig::new(&dest), &pki.receiver, None).await;

    for (target, entries) in [
        ("", vec![file("../x")]),
        ("", vec![file("ok"), file("a/../../x")]),
        ("", vec![file("/etc/x")]),
        (
            "",
            vec![ManifestEntry::Dir {
                path: "..".into(),
                mode: 0o755,
            }],
        ),
        ("../up", vec![file("x")]),
        ("/abs", vec![file("x")]),
        ("", vec![file(".automigrate-staging/x")]),
        ("", vec![file("a//b")]),
    ] {
        let answer = offer_manifest(running.addr, &pki.sender, target, entries.clone()).await;
        assert!(
            matches!(
                answer,
                Frame::Error {
                    code: ErrorCode::PathRejected,
                    ..
                }
            ),
            "target {target:?} entries {entries:?}: {answer:?}"
        );
    }
    assert!(everything(&dest).is_empty(), "{:?}", everything(&dest));
    assert_eq!(everything(dest_parent.path()), ["dest"]);
    assert_eq!(running.receiver.stats().sessions_opened, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_symlink_inside_the_destination_cannot_be_used_to_escape() {
    let pki = pki();
    let dest = tempfile::tempdir().unwrap();
    let outside = tempfile::tempdir().unwrap();
    std::os::unix::fs::symlink(outside.path(), dest.path().join("escape")).unwrap();
    std::fs::create_dir(dest.path().join("real")).unwrap();
    std::os::unix::fs::symlink(outside.path(), dest.path().join("real/deeper")).unwrap();
    let running = start_receiver(ReceiverConfig::new(dest.path()), &pki.receiver, None).await;

    // Through a file path.
    let source = tempfile::tempdir().unwrap();
    write(source.path(), "escape/x", b"payload");
    let error = send_refused(source.path(), running.addr, &pki.sender).await;
    assert!(
        matches!(error, SendError::Rejected { code: ErrorCode::PathRejected, ref message } if message.contains("symlink")),
        "{error}"
    );
    // Through the target directory, one level down.
    let source = tempfile::tempdir().unwrap();
    write(source.path(), "x", b"payload");
    let options = SendOptions {
        target: Some("real/deeper/more".into()),
        ..SendOptions::default()
    };
    let error = send(
        &Source::Dir(source.path().into()),
        running.addr,
        &pki.sender,
        &options,
    )
    .await
    .unwrap_err();
    assert!(
        matches!(
            error,
            SendError::Rejected {
                code: ErrorCode::PathRejected,
                ..
            }
        ),
        "{error}"
    );

    assert!(
        everything(outside.path()).is_empty(),
        "{:?}",
        everything(outside.path())
    );
    assert_eq!(everything(dest.path()), ["escape", "real", "real/deeper"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_symlink_at_a_final_name_is_replaced_not_followed() {
    let pki = pki();
    let dest = tempfile::tempdir().unwrap();
    let outside = tempfile::tempdir().unwrap();
    let victim = outside.path().join("victim");
    std::fs::write(&victim, b"precious").unwrap();
    std::os::unix::fs::symlink(&victim, dest.path().join("name")).unwrap();
    let running = start_receiver(ReceiverConfig::new(dest.path()), &pki.receiver, None).await;
    let source = tempfile::tempdir().unwrap();
    write(source.path(), "name", b"new content");

    send(
        &Source::Dir(source.path().into()),
        running.addr,
        &pki.sender,
        &SendOptions::default(),
    )
    .await
    .unwrap();

    assert_eq!(std::fs::read(&victim).unwrap(), b"precious");
    let metadata = std::fs::symlink_metadata(dest.path().join("name")).unwrap();
    assert!(metadata.is_file());
    assert_eq!(
        std::fs::read(dest.path().join("name")).unwrap(),
        b"new content"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_without_a_certificate_writes_nothing() {
    let pki = pki();
    let dest = tempfile::tempdir().unwrap();
    let running = start_receiver(ReceiverConfig::new(dest.path()), &pki.receiver, None).await;

    let connector = TlsConfig::anonymous_client(pki.ca_pem.as_bytes()).unwrap();
    let tcp = tokio::net::TcpStream::connect(running.addr).await.unwrap();
    let name = server_name(None, running.addr.ip()).unwrap();
    // The client side of a TLS 1.3 handshake can finish before the server has judged the
    // client; the refusal shows on the first read either way.
    let outcome = match connector.connect(name, tcp).await {
        Err(error) => Err(error.to_string()),
        Ok(stream) => {
            let (read_half, write_half) = tokio::io::split(stream);
            let mut writer = FrameWriter::new(write_half);
            let mut reader = FrameReader::new(read_half);
            let _ = writer
                .send(&Frame::Hello(Hello {
                    min_version: 1,
                    max_version: 1,
                    intent: Intent::Open {
                        transfer_id: [1; 32],
                    },
                }))
                .await;
            let _ = writer.flush().await;
            match reader.expect(Duration::from_secs(10), "anything").await {
                Ok(frame) => Ok(frame),
                Err(error) => Err(error.to_string()),
            }
        }
    };
    assert!(
        outcome.is_err(),
        "an anonymous peer got an answer: {outcome:?}"
    );
    let stats = running.settled().await;
    assert_eq!(stats.tls_rejected, 1);
    assert_eq!(stats.sessions_opened, 0);
    assert!(everything(dest.path()).is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_with_a_certificate_from_another_ca_writes_nothing() {
    let pki = pki();
    let dest = tempfile::tempdir().unwrap();
    let running = start_receiver(ReceiverConfig::new(dest.path()), &pki.receiver, None).await;
    let stranger_ca = DevCa::generate("someone else's CA", 2).unwrap();
    let stranger = stranger_ca
        .node("intruder", &["127.0.0.1".into()], 2)
        .unwrap();
    // It trusts our CA (so its side of the handshake goes ahead) but its own certificate is
    // signed by another CA.
    let intruder = TlsConfig::from_pem(
        pki.ca_pem.as_bytes(),
        stranger.cert_pem.as_bytes(),
        stranger.key_pem.as_bytes(),
    )
    .unwrap();
    let source = tempfile::tempdir().unwrap();
    write(source.path(), "x", b"payload");

    let error = send_refused(source.path(), running.addr, &intruder).await;

    // In TLS 1.3 the client finishes its side of the handshake before the server has checked
    // its certificate, so the refusal reaches it either in the handshake or as the first write
    // on a connection the server already closed (seen once under load: "write: Broken pipe").
    // What matters is asserted below: the receiver refused it at TLS and nothing was written.
    assert!(
        matches!(
            error,
            SendError::Handshake { .. } | SendError::Stream { .. }
        ),
        "{error}"
    );
    // The sender saw the refusal; the receiver may not have counted it yet (CI once read 0
    // here), so read the counters once its connections are closed.
    let stats = running.settled().await;
    assert!(stats.tls_rejected >= 1, "{stats:?}");
    assert_eq!(stats.sessions_opened, 0);
    assert!(everything(dest.path()).is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_receiver_we_do_not_trust_gets_nothing() {
    let pki = pki();
    let other = {
        let ca = DevCa::generate("other CA", 2).unwrap();
        let node = ca.node("other", &["127.0.0.1".into()], 2).unwrap();
        TlsConfig::from_pem(
            ca.cert_pem().as_bytes(),
            node.cert_pem.as_bytes(),
            node.key_pem.as_bytes(),
        )
        .unwrap()
    };
    let dest = tempfile::tempdir().unwrap();
    let running = start_receiver(ReceiverConfig::new(dest.path()), &other, None).await;
    let source = tempfile::tempdir().unwrap();
    write(source.path(), "secret", b"payload");
    let error = send_refused(source.path(), running.addr, &pki.sender).await;
    assert!(matches!(error, SendError::Handshake { .. }), "{error}");
    assert!(everything(dest.path()).is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn manifests_over_the_limits_are_refused() {
    let pki = pki();
    let dest = tempfile::tempdir().unwrap();
    let mut config = ReceiverConfig::new(dest.path());
    config.manifest_limits = ManifestLimits {
        max_entries: 3,
        max_bytes: 1 << 20,
    };
    let running = start_receiver(config, &pki.receiver, None).await;
    let answer = offer_manifest(
        running.addr,
        &pki.sender,
        "",
        (0..4).map(|i| file(&format!("f{i}"))).collect(),
    )
    .await;
    assert!(
        matches!(
            answer,
            Frame::Error {
                code: ErrorCode::LimitExceeded,
                ..
            }
        ),
        "{answer:?}"
    );
    assert!(everything(dest.path()).is_empty());
}
