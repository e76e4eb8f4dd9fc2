//! The core verbs through the real kube client: GET/LIST/POST/PUT/PATCH/DELETE, the status
//! subresource, server-set metadata, and reflectors following watches.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::BTreeMap;
use std::time::Duration;

use automigrate_kube_fake::FakeCluster;
use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::core::v1::{
    ConfigMap, Node, NodeCondition, NodeStatus, Pod, PodSpec, PodStatus,
};
use kube::api::{
    Api, DeleteParams, ListParams, ObjectMeta, Patch, PatchParams, PostParams, WatchEvent,
    WatchParams,
};
use kube::runtime::{WatchStreamExt, reflector, watcher};
use serde_json::json;

fn pod(name: &str, node: &str) -> Pod {
    Pod {
        metadata: ObjectMeta {
            name: Some(name.into()),
            namespace: Some("default".into()),
            labels: Some(BTreeMap::from([("app".into(), "train".into())])),
            ..Default::default()
        },
        spec: Some(PodSpec {
            node_name: Some(node.into()),
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn node(name: &str, ready: &str) -> Node {
    Node {
        metadata: ObjectMeta {
            name: Some(name.into()),
            ..Default::default()
        },
        status: Some(NodeStatus {
            conditions: Some(vec![NodeCondition {
                type_: "Ready".into(),
                status: ready.into(),
                ..Default::default()
            }]),
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn api_code(err: kube::Error) -> (u16, String) {
    match err {
        kube::Error::Api(status) => (status.code, status.reason),
        other => panic!("expected an API error, got {other:?}"),
    }
}

/// Polls `check` until it holds; a failing test ends after 10 s instead of hanging.
async fn eventually(what: &str, mut check: impl FnMut() -> bool) {
    for _ in 0..1000 {
        if check() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("timed out waiting for: {what}");
}

#[tokio::test]
async fn create_get_list_replace_delete_pods() {
    let cluster = FakeCluster::new();
    let pods: Api<Pod> = Api::namespaced(cluster.client(), "default");

    let created = pods
        .create(&PostParams::default(), &pod("p1", "n1"))
        .await
        .unwrap();
    let meta = &created.metadata;
    assert!(meta.uid.as_deref().is_some_and(|u| !u.is_empty()));
    assert!(meta.creation_timestamp.is_some());
    assert_eq!(meta.generation, Some(1));
    assert_eq!(meta.namespace.as_deref(), Some("default"));
    let rv1: u64 = meta.resource_version.as_deref().unwrap().parse().unwrap();
    // A pod's status belongs to the status subresource; create starts it at Pending.
    assert_eq!(created.status.unwrap().phase.as_deref(), Some("Pending"));

    let again = pods
        .create(&PostParams::default(), &pod("p1", "n1"))
        .await
        .unwrap_err();
    assert_eq!(api_code(again), (409, "AlreadyExists".into()));

    let got = pods.get("p1").await.unwrap();
    assert_eq!(got.metadata.uid, created.metadata.uid);
    assert!(cluster.get::<Pod>(Some("default"), "p1").is_some());

    pods.create(&PostParams::default(), &pod("p2", "n2"))
        .await
        .unwrap();
    let list = pods.list(&ListParams::default()).await.unwrap();
    let names: Vec<_> = list
        .items
        .iter()
        .map(|p| p.metadata.name.clone().unwrap())
        .collect();
    assert_eq!(names, ["p1", "p2"]);
    let list_rv: u64 = list.metadata.resource_version.unwrap().parse().unwrap();
    assert!(list_rv > rv1);

    // Replace with the current resourceVersion works and bumps generation (spec changed).
    let mut changed = got.clone();
    changed.spec.as_mut().unwrap().node_name = Some("n3".into());
    let replaced = pods
        .replace("p1", &PostParams::default(), &changed)
        .await
        .unwrap();
    assert_eq!(replaced.metadata.generation, Some(2));
    let rv2: u64 = replaced
        .metadata
        .resource_version
        .as_deref()
        .unwrap()
        .parse()
        .unwrap();
    assert!(rv2 > list_rv);
    // Replacing again with the stale copy is a Conflict.
    let stale = pods
        .replace("p1", &PostParams::default(), &changed)
        .await
        .unwrap_err();
    assert_eq!(api_code(stale), (409, "Conflict".into()));

    let missing = pods.get("nope").await.unwrap_err();
    assert_eq!(api_code(missing), (404, "NotFound".into()));

    pods.delete("p1", &DeleteParams::default()).await.unwrap();
    assert_eq!(api_code(pods.get("p1").await.unwrap_err()).0, 404);
    assert!(cluster.get::<Pod>(Some("default"), "p1").is_none());
    let all: Api<Pod> = Api::all(cluster.client());
    assert_eq!(
        all.list(&ListParams::default()).await.unwrap().items.len(),
        1
    );
}

#[tokio::test]
async fn patches_merge_json_and_apply() {
    let cluster = FakeCluster::new();
    let cms: Api<ConfigMap> = Api::namespaced(cluster.client(), "ops");
    let cm = ConfigMap {
        metadata: ObjectMeta {
            name: Some("policy".into()),
            ..Default::default()
        },
        data: Some(BTreeMap::from([
            ("a".into(), "1".into()),
            ("b".into(), "2".into()),
        ])),
        ..Default::default()
    };
    cms.create(&PostParams::default(), &cm).await.unwrap();

    let merged = cms
        .patch(
            "policy",
            &PatchParams::default(),
            &Patch::Merge(json!({"data": {"a": "10", "b": null}})),
        )
        .await
        .unwrap();
    assert_eq!(
        merged.data.unwrap(),
        BTreeMap::from([("a".into(), "10".into())])
    );

    let ops: json_patch_ops::Patch = serde_json::from_value(json!([
        {"op": "add", "path": "/data/c", "value": "3"},
        {"op": "test", "path": "/data/a", "value": "10"}
    ]))
    .unwrap();
    let patched = cms
        .patch("policy", &PatchParams::default(), &Patch::Json::<()>(ops))
        .await
        .unwrap();
    assert_eq!(
        patched.data.as_ref().unwrap().get("c").map(String::as_str),
        Some("3")
    );
    let failing: json_patch_ops::Patch =
        serde_json::from_value(json!([{"op": "test", "path": "/data/a", "value": "nope"}]))
            .unwrap();
    let err = cms
        .patch(
            "policy",
            &PatchParams::default(),
            &Patch::Json::<()>(failing),
        )
        .await
        .unwrap_err();
    assert_eq!(api_code(err).0, 422);

    // Apply creates when absent and merges when present.
    let apply = PatchParams::apply("test-manager");
    let fresh = cms
        .patch(
            "applied",
            &apply,
            &Patch::Apply(json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "applied"}, "data": {"x": "1"}})),
        )
        .await
        .unwrap();
    assert_eq!(fresh.metadata.namespace.as_deref(), Some("ops"));
    let again = cms
        .patch(
            "applied",
            &apply,
            &Patch::Apply(json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "applied"}, "data": {"y": "2"}})),
        )
        .await
        .unwrap();
    assert_eq!(again.data.unwrap().len(), 2);

    // A patch carrying a stale resourceVersion is a Conflict (optimistic concurrency).
    let stale = cms
        .patch(
            "policy",
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"resourceVersion": "1"}, "data": {"a": "11"}})),
        )
        .await
        .unwrap_err();
    assert_eq!(api_code(stale), (409, "Conflict".into()));

    // A patch that changes nothing does not bump the resourceVersion.
    let before = cms.get("policy").await.unwrap();
    let same = cms
        .patch(
            "policy",
            &PatchParams::default(),
            &Patch::Merge(json!({"data": {"a": "10"}})),
        )
        .await
        .unwrap();
    assert_eq!(
        same.metadata.resource_version,
        before.metadata.resource_version
    );

    // Patching something absent is NotFound.
    let err = cms
        .patch(
            "absent",
            &PatchParams::default(),
            &Patch::Merge(json!({"data": {}})),
        )
        .await
        .unwrap_err();
    assert_eq!(api_code(err).0, 404);
}

/// `kube::core::params::Patch::Json` takes json_patch's type; kube re-exports nothing for it,
/// so the test names it through the crate the fake already depends on.
mod json_patch_ops {
    pub use json_patch::Patch;
}

#[tokio::test]
async fn status_subresource_owns_status() {
    let cluster = FakeCluster::new();
    let nodes: Api<Node> = Api::all(cluster.client());
    cluster.put(&node("n1", "True"));

    // A write to the main resource cannot change status...
    let mut update = nodes.get("n1").await.unwrap();
    update.metadata.labels = Some(BTreeMap::from([("zone".into(), "a".into())]));
    update.status = Some(NodeStatus::default());
    let after = nodes
        .replace("n1", &PostParams::default(), &update)
        .await
        .unwrap();
    assert_eq!(
        after
            .metadata
            .labels
            .unwrap()
            .get("zone")
            .map(String::as_str),
        Some("a")
    );
    assert_eq!(after.status.unwrap().conditions.unwrap()[0].status, "True");

    // ...and a write to /status changes only status.
    let patched = nodes
        .patch_status(
            "n1",
            &PatchParams::default(),
            &Patch::Merge(json!({
                "metadata": {"labels": {"zone": "b"}},
                "status": {"conditions": [{"type": "Ready", "status": "False"}]}
            })),
        )
        .await
        .unwrap();
    assert_eq!(
        patched.status.unwrap().conditions.unwrap()[0].status,
        "False"
    );
    assert_eq!(
        patched
            .metadata
            .labels
            .unwrap()
            .get("zone")
            .map(String::as_str),
        Some("a")
    );

    // The status subresource of a pod exists too; a ConfigMap has none.
    let pods: Api<Pod> = Api::namespaced(cluster.client(), "default");
    pods.create(&PostParams::default(), &pod("p", "n1"))
        .await
        .unwrap();
    let mut p = pods.get_status("p").await.unwrap();
    p.status = Some(PodStatus {
        phase: Some("Running".into()),
        ..Default::default()
    });
    let running = pods
        .replace_status("p", &PostParams::default(), &p)
        .await
        .unwrap();
    assert_eq!(running.status.unwrap().phase.as_deref(), Some("Running"));
    let cms: Api<ConfigMap> = Api::namespaced(cluster.client(), "default");
    cluster.put(&ConfigMap {
        metadata: ObjectMeta {
            name: Some("c".into()),
            namespace: Some("default".into()),
            ..Default::default()
        },
        ..Default::default()
    });
    let err = cms.get_status("c").await.unwrap_err();
    assert_eq!(api_code(err).0, 404);
}

#[tokio::test]
async fn direct_store_access_bumps_versions() {
    let cluster = FakeCluster::new();
    cluster.put(&node("a", "True"));
    let first = cluster.get::<Node>(None, "a").unwrap();
    cluster.put(&node("a", "False"));
    let second = cluster.get::<Node>(None, "a").unwrap();
    assert_eq!(
        first.metadata.uid, second.metadata.uid,
        "replace keeps the uid"
    );
    assert_ne!(
        first.metadata.resource_version,
        second.metadata.resource_version
    );
    assert_eq!(cluster.list::<Node>().len(), 1);
    assert!(cluster.remove::<Node>(None, "a"));
    assert!(!cluster.remove::<Node>(None, "a"));
    assert!(cluster.list::<Node>().is_empty());
    assert_eq!(cluster.resource_version(), 3);
}

#[tokio::test]
async fn raw_watch_replays_and_follows() {
    let cluster = FakeCluster::new();
    let cms: Api<ConfigMap> = Api::namespaced(cluster.client(), "default");
    let make = |name: &str| ConfigMap {
        metadata: ObjectMeta {
            name: Some(name.into()),
            ..Default::default()
        },
        ..Default::default()
    };
    let first = cms
        .create(&PostParams::default(), &make("a"))
        .await
        .unwrap();
    let rv = first.metadata.resource_version.unwrap();
    cms.create(&PostParams::default(), &make("b"))
        .await
        .unwrap();

    let mut stream = cms
        .watch(&WatchParams::default(), &rv)
        .await
        .unwrap()
        .boxed();
    // Replayed from history: only what happened after `rv`.
    match stream.try_next().await.unwrap().unwrap() {
        WatchEvent::Added(cm) => assert_eq!(cm.metadata.name.as_deref(), Some("b")),
        other => panic!("unexpected {other:?}"),
    }
    cms.delete("a", &DeleteParams::default()).await.unwrap();
    match stream.try_next().await.unwrap().unwrap() {
        WatchEvent::Deleted(cm) => assert_eq!(cm.metadata.name.as_deref(), Some("a")),
        other => panic!("unexpected {other:?}"),
    }

    // From "0": the current state as ADDED events.
    let mut from_zero = cms
        .watch(&WatchParams::default(), "0")
        .await
        .unwrap()
        .boxed();
    match from_zero.try_next().await.unwrap().unwrap() {
        WatchEvent::Added(cm) => assert_eq!(cm.metadata.name.as_deref(), Some("b")),
        other => panic!("unexpected {other:?}"),
    }
}

#[tokio::test]
async fn reflector_store_sees_adds_updates_deletes() {
    let cluster = FakeCluster::new();
    cluster.put(&node("n1", "True"));
    cluster.put(&node("n2", "True"));
    let nodes: Api<Node> = Api::all(cluster.client());

    let (reader, writer) = reflector::store::<Node>();
    let stream = reflector(writer, watcher(nodes.clone(), watcher::Config::default()))
        .default_backoff()
        .applied_objects();
    let task = tokio::spawn(stream.for_each(|_| futures::future::ready(())));
    reader.wait_until_ready().await.unwrap();
    assert_eq!(reader.state().len(), 2);

    // Added through the API and directly.
    nodes
        .create(&PostParams::default(), &node("n3", "True"))
        .await
        .unwrap();
    cluster.put(&node("n4", "Unknown"));
    eventually("4 nodes", || reader.state().len() == 4).await;

    // Updated through /status.
    nodes
        .patch_status(
            "n1",
            &PatchParams::default(),
            &Patch::Merge(
                json!({"status": {"conditions": [{"type": "Ready", "status": "False"}]}}),
            ),
        )
        .await
        .unwrap();
    let ready_of = |name: &str| {
        reader
            .state()
            .iter()
            .find(|n| n.metadata.name.as_deref() == Some(name))
            .and_then(|n| {
                n.status
                    .as_ref()?
                    .conditions
                    .as_ref()?
                    .first()
                    .map(|c| c.status.clone())
            })
    };
    eventually("n1 NotReady", || ready_of("n1").as_deref() == Some("False")).await;

    // Deleted through the API and directly.
    nodes.delete("n2", &DeleteParams::default()).await.unwrap();
    cluster.remove::<Node>(None, "n3");
    eventually("n2 and n3 gone", || reader.state().len() == 2).await;
    let mut names: Vec<_> = reader
        .state()
        .iter()
        .map(|n| n.metadata.name.clone().unwrap())
        .collect();
    names.sort();
    assert_eq!(names, ["n1", "n4"]);

    // The watcher used list + watch, resuming from the list's resourceVersion.
    let requests = cluster.requests();
    assert!(
        requests
            .iter()
            .any(|r| r.path == "/api/v1/nodes" && !r.query.contains("watch=true"))
    );
    assert!(
        requests
            .iter()
            .any(|r| r.path == "/api/v1/nodes" && r.query.contains("watch=true"))
    );
    task.abort();
}

#[tokio::test]
async fn streaming_list_watcher_works() {
    let cluster = FakeCluster::new();
    for i in 0..3 {
        cluster.put(&pod(&format!("p{i}"), "n1"));
    }
    let pods: Api<Pod> = Api::namespaced(cluster.client(), "default");
    let (reader, writer) = reflector::store::<Pod>();
    let stream = reflector(
        writer,
        watcher(pods.clone(), watcher::Config::default().streaming_lists()),
    )
    .default_backoff()
    .applied_objects();
    let task = tokio::spawn(stream.for_each(|_| futures::future::ready(())));
    reader.wait_until_ready().await.unwrap();
    assert_eq!(reader.state().len(), 3);
    pods.delete("p0", &DeleteParams::default()).await.unwrap();
    eventually("p0 gone", || reader.state().len() == 2).await;
    let watch = cluster
        .requests()
        .into_iter()
        .find(|r| r.query.contains("watch=true"))
        .unwrap();
    assert!(
        watch.query.contains("sendInitialEvents=true"),
        "{}",
        watch.query
    );
    task.abort();
}
