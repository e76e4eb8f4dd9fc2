//! Load check of the fake API server: N nodes and M pods, then the calls a controller makes at
//! that size (reflector sync of both, a full pod list, status patches seen by the reflector,
//! a field-selected list). Prints wall-clock times per phase; it asserts nothing about them.
//!
//! `cargo run --release -p automigrate-kube-fake --example kube-fake-load -- 5000 50000`

use std::time::Instant;

use automigrate_kube_fake::{FakeCluster, FakeClusterOptions};
use futures::StreamExt;
use k8s_openapi::api::core::v1::{Node, Pod, PodSpec};
use kube::api::{Api, ListParams, ObjectMeta, Patch, PatchParams};
use kube::runtime::{WatchStreamExt, reflector, watcher};
use serde_json::json;

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow_free::Result<()> {
    let mut args = std::env::args().skip(1);
    let nodes: usize = args.next().and_then(|a| a.parse().ok()).unwrap_or(5_000);
    let pods: usize = args.next().and_then(|a| a.parse().ok()).unwrap_or(50_000);
    let cluster = FakeCluster::with_options(FakeClusterOptions {
        record_requests: false,
        ..Default::default()
    });

    let t = Instant::now();
    for i in 0..nodes {
        cluster.put(&Node {
            metadata: ObjectMeta {
                name: Some(format!("node-{i}")),
                ..Default::default()
            },
            ..Default::default()
        });
    }
    for i in 0..pods {
        cluster.put(&Pod {
            metadata: ObjectMeta {
                name: Some(format!("pod-{i}")),
                namespace: Some(format!("ns-{}", i % 50)),
                ..Default::default()
            },
            spec: Some(PodSpec {
                node_name: Some(format!("node-{}", i % nodes.max(1))),
                ..Default::default()
            }),
            ..Default::default()
        });
    }
    println!("put {nodes} nodes + {pods} pods: {:?}", t.elapsed());

    let client = cluster.client();
    let t = Instant::now();
    let (pod_reader, pod_writer) = reflector::store::<Pod>();
    let (node_reader, node_writer) = reflector::store::<Node>();
    let pod_api: Api<Pod> = Api::all(client.clone());
    let node_api: Api<Node> = Api::all(client.clone());
    tokio::spawn(
        reflector(
            pod_writer,
            watcher(pod_api.clone(), watcher::Config::default()),
        )
        .default_backoff()
        .applied_objects()
        .for_each(|_| futures::future::ready(())),
    );
    tokio::spawn(
        reflector(node_writer, watcher(node_api, watcher::Config::default()))
            .default_backoff()
            .applied_objects()
            .for_each(|_| futures::future::ready(())),
    );
    pod_reader.wait_until_ready().await?;
    node_reader.wait_until_ready().await?;
    println!(
        "reflectors ready ({} pods, {} nodes): {:?}",
        pod_reader.state().len(),
        node_reader.state().len(),
        t.elapsed()
    );

    let t = Instant::now();
    let raw = client
        .request_text(http::Request::get("/api/v1/pods").body(Vec::new())?)
        .await?;
    println!(
        "list all pods as text, server side only ({} bytes): {:?}",
        raw.len(),
        t.elapsed()
    );

    let t = Instant::now();
    let listed = pod_api.list(&ListParams::default()).await?;
    println!("list all pods ({}): {:?}", listed.items.len(), t.elapsed());

    let t = Instant::now();
    let on_node = pod_api
        .list(&ListParams::default().fields("spec.nodeName=node-1"))
        .await?;
    println!(
        "field-selected list ({} pods): {:?}",
        on_node.items.len(),
        t.elapsed()
    );

    let patches = 1_000.min(pods);
    let t = Instant::now();
    for i in 0..patches {
        let api: Api<Pod> = Api::namespaced(client.clone(), &format!("ns-{}", i % 50));
        api.patch_status(
            &format!("pod-{i}"),
            &PatchParams::default(),
            &Patch::Merge(json!({"status": {"phase": "Running"}})),
        )
        .await?;
    }
    let running = |r: &reflector::Store<Pod>| {
        r.state()
            .iter()
            .filter(|p| p.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running"))
            .count()
    };
    while running(&pod_reader) < patches {
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }
    println!(
        "{patches} status patches, all seen by the reflector: {:?}",
        t.elapsed()
    );
    Ok(())
}

/// The example avoids anyhow (only binaries may use it, and this crate does not depend on it).
mod anyhow_free {
    pub type Result<T> = std::result::Result<T, Box<dyn std::error::Error + Send + Sync>>;
}
