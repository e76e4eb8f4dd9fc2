//! Watch semantics: history replay and its bound, 410 Expired, bookmarks, timeouts, selector
//! transitions, lagging watchers, closed streams, metadata-only requests, and a reflector that
//! recovers from all of it.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::BTreeMap;
use std::time::Duration;

use automigrate_kube_fake::{FakeCluster, FakeClusterOptions};
use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::core::v1::{ConfigMap, Node, Pod};
use kube::api::{
    Api, ListParams, ObjectMeta, PartialObjectMeta, Patch, PatchParams, PostParams, WatchEvent,
    WatchParams,
};
use kube::runtime::{WatchStreamExt, reflector, watcher};
use serde_json::json;

fn cm(name: &str, value: &str) -> ConfigMap {
    ConfigMap {
        metadata: ObjectMeta {
            name: Some(name.into()),
            namespace: Some("default".into()),
            ..Default::default()
        },
        data: Some(BTreeMap::from([("v".into(), value.into())])),
        ..Default::default()
    }
}

fn labeled_pod(name: &str, app: &str) -> Pod {
    Pod {
        metadata: ObjectMeta {
            name: Some(name.into()),
            namespace: Some("default".into()),
            labels: Some(BTreeMap::from([("app".into(), app.into())])),
            ..Default::default()
        },
        ..Default::default()
    }
}

async fn eventually(what: &str, mut check: impl FnMut() -> bool) {
    for _ in 0..1000 {
        if check() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("timed out waiting for: {what}");
}

fn describe<K: kube::Resource>(event: &WatchEvent<K>) -> String {
    match event {
        WatchEvent::Added(o) => format!("ADDED {}", o.meta().name.clone().unwrap_or_default()),
        WatchEvent::Modified(o) => {
            format!("MODIFIED {}", o.meta().name.clone().unwrap_or_default())
        }
        WatchEvent::Deleted(o) => format!("DELETED {}", o.meta().name.clone().unwrap_or_default()),
        WatchEvent::Bookmark(b) => format!("BOOKMARK {}", b.metadata.resource_version),
        WatchEvent::Error(s) => format!("ERROR {}", s.code),
    }
}

#[tokio::test]
async fn compacted_versions_answer_410() {
    let cluster = FakeCluster::new();
    let cms: Api<ConfigMap> = Api::namespaced(cluster.client(), "default");
    let first = cms
        .create(&PostParams::default(), &cm("a", "1"))
        .await
        .unwrap();
    let rv = first.metadata.resource_version.unwrap();
    cms.patch(
        "a",
        &PatchParams::default(),
        &Patch::Merge(json!({"data": {"v": "2"}})),
    )
    .await
    .unwrap();
    cluster.compact_watch_history();

    let mut stream = cms
        .watch(&WatchParams::default(), &rv)
        .await
        .unwrap()
        .boxed();
    let event = stream.try_next().await.unwrap().unwrap();
    assert_eq!(describe(&event), "ERROR 410");
    if let WatchEvent::Error(status) = event {
        assert_eq!(status.reason, "Expired");
    }
    assert!(
        stream.try_next().await.unwrap().is_none(),
        "the stream ends after 410"
    );

    // Watching from the current version still works after a compaction.
    let now = cluster.resource_version().to_string();
    let mut fresh = cms
        .watch(&WatchParams::default(), &now)
        .await
        .unwrap()
        .boxed();
    cluster.put(&cm("b", "1"));
    assert_eq!(
        describe(&fresh.try_next().await.unwrap().unwrap()),
        "ADDED b"
    );
}

#[tokio::test]
async fn history_is_bounded_per_type() {
    let cluster = FakeCluster::with_options(FakeClusterOptions {
        watch_history_per_type: 2,
        ..Default::default()
    });
    let cms: Api<ConfigMap> = Api::namespaced(cluster.client(), "default");
    cluster.put(&cm("first", "0"));
    let start = cluster.resource_version().to_string();
    for i in 0..4 {
        cluster.put(&cm("a", &i.to_string()));
    }
    let mut old = cms
        .watch(&WatchParams::default(), &start)
        .await
        .unwrap()
        .boxed();
    assert_eq!(
        describe(&old.try_next().await.unwrap().unwrap()),
        "ERROR 410"
    );

    // The last two changes are still replayable, in order.
    let recent = (cluster.resource_version() - 2).to_string();
    let mut replay = cms
        .watch(&WatchParams::default(), &recent)
        .await
        .unwrap()
        .boxed();
    let latest = cluster.get::<ConfigMap>(Some("default"), "a").unwrap();
    let mut values = Vec::new();
    for _ in 0..2 {
        match replay.try_next().await.unwrap().unwrap() {
            WatchEvent::Modified(cm) => {
                values.push((cm.metadata.resource_version, cm.data.unwrap()["v"].clone()))
            }
            other => panic!("unexpected {}", describe(&other)),
        }
    }
    assert_eq!(values[0].1, "2");
    assert_eq!(
        values[1],
        (latest.metadata.resource_version, "3".to_owned())
    );
}

#[tokio::test]
async fn bookmarks_on_request_and_before_timeout() {
    let cluster = FakeCluster::new();
    let cms: Api<ConfigMap> = Api::namespaced(cluster.client(), "default");
    cluster.put(&cm("a", "1"));
    let rv = cluster.resource_version().to_string();
    let params = WatchParams::default().timeout(1);
    let mut stream = cms.watch(&params, &rv).await.unwrap().boxed();

    // A change to another type moves the global version; a bookmark carries it.
    cluster.put(&Node {
        metadata: ObjectMeta {
            name: Some("n".into()),
            ..Default::default()
        },
        ..Default::default()
    });
    cluster.send_bookmarks();
    let expected = format!("BOOKMARK {}", cluster.resource_version());
    assert_eq!(
        describe(&stream.try_next().await.unwrap().unwrap()),
        expected
    );

    // At timeoutSeconds the server sends a last bookmark and ends the stream.
    assert_eq!(
        describe(&stream.try_next().await.unwrap().unwrap()),
        expected
    );
    assert!(stream.try_next().await.unwrap().is_none());

    // Without allowWatchBookmarks there are none.
    let quiet = WatchParams::default().timeout(1).disable_bookmarks();
    let mut stream = cms.watch(&quiet, &rv).await.unwrap().boxed();
    cluster.send_bookmarks();
    assert!(stream.try_next().await.unwrap().is_none());
}

#[tokio::test]
async fn selector_transitions_become_added_and_deleted() {
    let cluster = FakeCluster::new();
    let pods: Api<Pod> = Api::namespaced(cluster.client(), "default");
    cluster.put(&labeled_pod("p", "train"));
    let rv = cluster.resource_version().to_string();
    let mut stream = pods
        .watch(&WatchParams::default().labels("app=train"), &rv)
        .await
        .unwrap()
        .boxed();

    let set_app = |app: &str| Patch::Merge(json!({"metadata": {"labels": {"app": app}}}));
    pods.patch("p", &PatchParams::default(), &set_app("web"))
        .await
        .unwrap();
    pods.patch("p", &PatchParams::default(), &set_app("web2"))
        .await
        .unwrap();
    pods.patch("p", &PatchParams::default(), &set_app("train"))
        .await
        .unwrap();
    pods.patch(
        "p",
        &PatchParams::default(),
        &Patch::Merge(json!({"metadata": {"annotations": {"x": "y"}}})),
    )
    .await
    .unwrap();
    cluster.put(&labeled_pod("other", "web"));
    let mut elsewhere = labeled_pod("elsewhere", "train");
    elsewhere.metadata.namespace = Some("other-ns".into());
    cluster.put(&elsewhere);
    cluster.put(&labeled_pod("sentinel", "train"));

    let mut seen = Vec::new();
    while seen.last().map(String::as_str) != Some("ADDED sentinel") {
        seen.push(describe(&stream.try_next().await.unwrap().unwrap()));
    }
    assert_eq!(
        seen,
        ["DELETED p", "ADDED p", "MODIFIED p", "ADDED sentinel"]
    );
}

#[tokio::test]
async fn a_watcher_that_falls_behind_gets_410() {
    let cluster = FakeCluster::with_options(FakeClusterOptions {
        watch_channel_capacity: 2,
        ..Default::default()
    });
    let cms: Api<ConfigMap> = Api::namespaced(cluster.client(), "default");
    let rv = cluster.resource_version().to_string();
    let mut stream = cms
        .watch(&WatchParams::default(), &rv)
        .await
        .unwrap()
        .boxed();
    for i in 0..10 {
        cluster.put(&cm(&format!("c{i}"), "x"));
    }
    assert_eq!(
        describe(&stream.try_next().await.unwrap().unwrap()),
        "ERROR 410"
    );
}

#[tokio::test]
async fn reflector_survives_closed_watches_and_compaction() {
    let cluster = FakeCluster::new();
    cluster.put(&cm("a", "1"));
    let cms: Api<ConfigMap> = Api::namespaced(cluster.client(), "default");
    let (reader, writer) = reflector::store::<ConfigMap>();
    let stream = reflector(writer, watcher(cms.clone(), watcher::Config::default()))
        .default_backoff()
        .applied_objects();
    let task = tokio::spawn(stream.for_each(|_| futures::future::ready(())));
    reader.wait_until_ready().await.unwrap();

    let lists = |c: &FakeCluster| {
        c.requests()
            .iter()
            .filter(|r| r.path.ends_with("/configmaps") && !r.query.contains("watch=true"))
            .count()
    };
    let watches = |c: &FakeCluster| {
        c.requests()
            .iter()
            .filter(|r| r.query.contains("watch=true"))
            .count()
    };
    assert_eq!(lists(&cluster), 1);
    eventually("first watch", || watches(&cluster) == 1).await;

    // A closed stream is resumed from the last version, without a new list.
    cluster.close_watches();
    eventually("second watch", || watches(&cluster) == 2).await;
    cluster.put(&cm("b", "1"));
    eventually("b seen", || reader.state().len() == 2).await;
    assert_eq!(lists(&cluster), 1);

    // After a compaction that outran it, the watcher gets 410 and re-lists.
    cluster.put(&Node {
        metadata: ObjectMeta {
            name: Some("n".into()),
            ..Default::default()
        },
        ..Default::default()
    });
    cluster.compact_watch_history();
    cluster.close_watches();
    eventually("re-list", || lists(&cluster) == 2).await;
    cluster.put(&cm("c", "1"));
    cluster.remove::<ConfigMap>(Some("default"), "a");
    eventually("c seen, a gone", || {
        let mut names: Vec<_> = reader
            .state()
            .iter()
            .map(|c| c.metadata.name.clone().unwrap())
            .collect();
        names.sort();
        names == ["b", "c"]
    })
    .await;
    task.abort();
}

#[tokio::test]
async fn metadata_only_requests() {
    let cluster = FakeCluster::new();
    cluster.put(&labeled_pod("p", "train"));
    let pods: Api<Pod> = Api::namespaced(cluster.client(), "default");
    let list = pods.list_metadata(&ListParams::default()).await.unwrap();
    assert_eq!(list.items.len(), 1);
    assert_eq!(list.items[0].metadata.name.as_deref(), Some("p"));
    // Served as metadata only, not as a full Pod.
    assert_eq!(
        list.items[0].types.as_ref().unwrap().kind,
        "PartialObjectMetadata"
    );
    let one = pods.get_metadata("p").await.unwrap();
    assert_eq!(one.metadata.labels.unwrap()["app"], "train");

    let (reader, writer) = reflector::store();
    let meta_api: Api<PartialObjectMeta<Pod>> = Api::namespaced(cluster.client(), "default");
    let stream = reflector(writer, watcher(meta_api, watcher::Config::default()))
        .default_backoff()
        .applied_objects();
    let task = tokio::spawn(stream.for_each(|_| futures::future::ready(())));
    reader.wait_until_ready().await.unwrap();
    cluster.put(&labeled_pod("q", "train"));
    eventually("q in metadata store", || reader.state().len() == 2).await;
    task.abort();
}
