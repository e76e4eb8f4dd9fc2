//! Transfers across an emulated link (two network namespaces joined by the user-space link
//! emulator of `automigrate-netem`): delay, random loss and a rate cap, and a link that is cut
//! in the middle of a transfer. Needs root, `/dev/net/tun` and `ip`; with
//! `AUTOMIGRATE_SKIP_PRIVILEGED=1` the tests skip loudly, otherwise a missing prerequisite fails
//! them by name. Assertions are on bytes and counts, never on timing.

#![cfg(test)]

mod common;

use std::io::Write as _;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use automigrate_core::transfer::{TransferSettings, TransferStrategy};
use automigrate_netem::{EmulatedPair, Link, SKIP_PRIVILEGED_ENV, Side, missing_prerequisites};
use automigrate_transfer::manifest::Source;
use automigrate_transfer::receiver::{Receiver, ReceiverConfig};
use automigrate_transfer::sender::{Report, SendError, SendOptions, send};
use automigrate_transfer::tls::TlsConfig;
use common::*;

fn privileged(test: &str) -> bool {
    if std::env::var(SKIP_PRIVILEGED_ENV).is_ok_and(|value| value == "1") {
        // Straight to the stderr handle so the harness cannot swallow it.
        let _ = writeln!(
            std::io::stderr(),
            "\n************************************************************\n\
             SKIPPED {test}: {SKIP_PRIVILEGED_ENV}=1 is set.\n\
             It needs root, /dev/net/tun and iproute2 (network namespaces and\n\
             TUN devices); it did NOT run. CI never sets {SKIP_PRIVILEGED_ENV}.\n\
             ************************************************************\n"
        );
        return false;
    }
    if let Some(missing) = missing_prerequisites() {
        panic!("{test} needs {missing}; or set {SKIP_PRIVILEGED_ENV}=1 to skip it (loudly)");
    }
    true
}

/// A receiver serving inside side B of `pair`; returns its address and the runtime it runs on.
fn receiver_in_b(
    pair: &EmulatedPair,
    dest: &std::path::Path,
    tls: &TlsConfig,
) -> (tokio::runtime::Runtime, Receiver, SocketAddr) {
    let address = SocketAddr::from((pair.addr(Side::B), 0));
    let listener = pair
        .run_in(Side::B, || std::net::TcpListener::bind(address))
        .unwrap()
        .unwrap();
    listener.set_nonblocking(true).unwrap();
    let addr = listener.local_addr().unwrap();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let receiver = Receiver::new(ReceiverConfig::new(dest), tls).unwrap();
    let serving = receiver.clone();
    runtime.spawn(async move {
        let listener = tokio::net::TcpListener::from_std(listener).unwrap();
        let _ = serving.serve(listener).await;
    });
    (runtime, receiver, addr)
}

/// Runs `send` on a runtime whose threads live in side A's namespace, so its sockets do.
fn send_from_a(
    pair: &EmulatedPair,
    source: Source,
    addr: SocketAddr,
    tls: &TlsConfig,
    options: &SendOptions,
) -> Result<Report, SendError> {
    pair.run_in(Side::A, || {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        runtime.block_on(send(&source, addr, tls, options))
    })
    .unwrap()
}

#[test]
fn a_transfer_across_a_lossy_delayed_link_is_byte_exact() {
    if !privileged("a_transfer_across_a_lossy_delayed_link_is_byte_exact") {
        return;
    }
    // 10 ms RTT, 1 % loss each way, 100 Mbit/s.
    let link = Link::delayed(Duration::from_millis(5))
        .with_loss(0.01)
        .with_rate_bps(100_000_000)
        .with_seed(7);
    let pair = EmulatedPair::symmetric("amxfer", link).unwrap();
    let pki = pki();
    let source = tempfile::tempdir().unwrap();
    let dest = tempfile::tempdir().unwrap();
    mixed_tree(source.path(), 3, 2 * 1024 * 1024, 100, 6000);
    let (_runtime, receiver, addr) = receiver_in_b(&pair, dest.path(), &pki.receiver);
    let options = SendOptions {
        settings: TransferSettings {
            strategy: TransferStrategy::Parallel,
            max_streams: 8,
            chunk_size: 256 * 1024,
            rate_limit_bps: None,
        },
        round: Some(Duration::from_millis(300)),
        // The test certificates name the node, not the namespace's address.
        server_name: Some("node-b".into()),
        ..SendOptions::default()
    };

    let report = send_from_a(
        &pair,
        Source::Dir(source.path().into()),
        addr,
        &pki.sender,
        &options,
    )
    .unwrap();

    assert_same_tree(source.path(), dest.path());
    // TCP repaired the losses; nothing had to go again at our level.
    assert_eq!(report.units_resent, 0);
    assert_eq!(report.hash_mismatches, 0);
    assert!(report.connections <= 8);
    assert_eq!(receiver.stats().sessions_completed, 1);
    let carried = pair.stats(Side::A).unwrap();
    assert!(
        carried.dropped_loss > 0,
        "the link dropped nothing: {carried:?}"
    );
}

#[test]
fn a_link_cut_in_the_middle_resumes_and_resends_only_what_was_in_flight() {
    if !privileged("a_link_cut_in_the_middle_resumes_and_resends_only_what_was_in_flight") {
        return;
    }
    let link = Link::delayed(Duration::from_millis(5)).with_rate_bps(40_000_000);
    let pair = EmulatedPair::symmetric("amxcut", link).unwrap();
    let pki = pki();
    let source = tempfile::tempdir().unwrap();
    let dest = tempfile::tempdir().unwrap();
    mixed_tree(source.path(), 4, 2 * 1024 * 1024, 40, 6000);
    let (_runtime, receiver, addr) = receiver_in_b(&pair, dest.path(), &pki.receiver);
    let (cut_tx, cut_rx) = std::sync::mpsc::channel::<()>();
    let cut_tx = std::sync::Mutex::new(Some(cut_tx));
    let options = SendOptions {
        settings: TransferSettings {
            strategy: TransferStrategy::Parallel,
            max_streams: 3,
            chunk_size: 256 * 1024,
            rate_limit_bps: None,
        },
        round: Some(Duration::from_millis(300)),
        // A silent link (no reset, packets just vanish) is noticed by these timeouts.
        idle_timeout: Duration::from_secs(2),
        window_units: 4,
        connect_timeout: Duration::from_secs(1),
        server_name: Some("node-b".into()),
        progress: Some(Arc::new(move |progress| {
            if progress.units_done >= 8
                && let Some(tx) = cut_tx.lock().unwrap().take()
            {
                let _ = tx.send(());
            }
        })),
        ..SendOptions::default()
    };

    let report = std::thread::scope(|scope| {
        let sending = scope.spawn(|| {
            send_from_a(
                &pair,
                Source::Dir(source.path().into()),
                addr,
                &pki.sender,
                &options,
            )
        });
        // Cut once 8 units are acknowledged (unless the transfer already ended, which the
        // assertions below then catch).
        while !sending.is_finished() {
            if cut_rx.recv_timeout(Duration::from_millis(50)).is_ok() {
                pair.cut().unwrap();
                std::thread::sleep(Duration::from_secs(4));
                pair.restore().unwrap();
                break;
            }
        }
        sending.join().unwrap()
    })
    .unwrap();

    assert_same_tree(source.path(), dest.path());
    let window = u64::from(options.window_units);
    assert!(report.units_resent <= 3 * window, "{report:#?}");
    assert!(report.connections > 3, "streams were reopened: {report:#?}");
    assert_eq!(receiver.stats().sessions_completed, 1);
}

#[test]
fn without_a_link_estimate_the_controller_climbs_from_one_stream() {
    if !privileged("without_a_link_estimate_the_controller_climbs_from_one_stream") {
        return;
    }
    // 10 ms RTT and 1 % loss each way: one CUBIC stream is loss-bound near 14 Mbit/s (Mathis),
    // a seventh of the 100 Mbit/s link. Without an estimate the planner assumes a clean
    // 1 Gbit/s link, where one stream fills it, and plans one stream.
    let link = Link::delayed(Duration::from_millis(5))
        .with_loss(0.01)
        .with_rate_bps(100_000_000)
        .with_seed(11);
    let pair = EmulatedPair::symmetric("amxblind", link).unwrap();
    let pki = pki();
    let source = tempfile::tempdir().unwrap();
    let dest = tempfile::tempdir().unwrap();
    mixed_tree(source.path(), 4, 4 * 1024 * 1024, 0, 0);
    let (_runtime, receiver, addr) = receiver_in_b(&pair, dest.path(), &pki.receiver);
    let options = SendOptions {
        settings: TransferSettings {
            strategy: TransferStrategy::Auto,
            max_streams: 16,
            chunk_size: 256 * 1024,
            rate_limit_bps: None,
        },
        link: None,
        round: Some(Duration::from_millis(300)),
        // Loss-bound, unlike BBR (the host default), which one stream would fill the link with.
        congestion_control: Some("cubic".into()),
        server_name: Some("node-b".into()),
        ..SendOptions::default()
    };

    let report = send_from_a(
        &pair,
        Source::Dir(source.path().into()),
        addr,
        &pki.sender,
        &options,
    )
    .unwrap();

    assert_same_tree(source.path(), dest.path());
    assert_eq!(receiver.stats().sessions_completed, 1);
    assert_eq!(report.plan.initial_streams, 1, "{report:#?}");
    let first = report.rounds.first().expect("no round was measured");
    assert_eq!(first.streams, 1, "{report:#?}");
    // Two loss-bound streams deliver about twice one: the controller must have kept climbing.
    assert!(
        report.rounds.iter().any(|round| round.streams >= 4),
        "the controller stayed low: {report:#?}"
    );
}
