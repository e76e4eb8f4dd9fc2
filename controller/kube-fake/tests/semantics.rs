//! API server semantics beyond plain CRUD: selectors, finalizers and deletionTimestamp,
//! generateName, Status error bodies, preconditions, name validation, dry runs, eviction.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::BTreeMap;

use automigrate_kube_fake::FakeCluster;
use k8s_openapi::api::core::v1::{ConfigMap, Pod, PodSpec};
use kube::api::{
    Api, DeleteParams, ListParams, ObjectMeta, Patch, PatchParams, PostParams, Preconditions,
};
use serde_json::json;

fn pod(name: &str, node: &str, labels: &[(&str, &str)]) -> Pod {
    Pod {
        metadata: ObjectMeta {
            name: Some(name.into()),
            namespace: Some("default".into()),
            labels: Some(
                labels
                    .iter()
                    .map(|(k, v)| ((*k).into(), (*v).into()))
                    .collect(),
            ),
            ..Default::default()
        },
        spec: Some(PodSpec {
            node_name: Some(node.into()),
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn names(pods: &[Pod]) -> Vec<String> {
    pods.iter()
        .map(|p| p.metadata.name.clone().unwrap())
        .collect()
}

fn status_of(err: kube::Error) -> Box<kube::core::Status> {
    match err {
        kube::Error::Api(status) => status,
        other => panic!("expected an API error, got {other:?}"),
    }
}

#[tokio::test]
async fn label_and_field_selectors_on_lists() {
    let cluster = FakeCluster::new();
    cluster.put(&pod("a", "n1", &[("app", "train"), ("tier", "gpu")]));
    cluster.put(&pod("b", "n2", &[("app", "train"), ("tier", "cpu")]));
    cluster.put(&pod("c", "n1", &[("app", "web")]));
    let mut other_ns = pod("d", "n1", &[("app", "train")]);
    other_ns.metadata.namespace = Some("other".into());
    cluster.put(&other_ns);

    let pods: Api<Pod> = Api::namespaced(cluster.client(), "default");
    let list = |lp: ListParams| {
        let pods = pods.clone();
        async move { names(&pods.list(&lp).await.unwrap().items) }
    };
    assert_eq!(
        list(ListParams::default().labels("app=train")).await,
        ["a", "b"]
    );
    assert_eq!(
        list(ListParams::default().labels("app!=train")).await,
        ["c"]
    );
    assert_eq!(
        list(ListParams::default().labels("tier in (gpu,tpu)")).await,
        ["a"]
    );
    assert_eq!(
        list(ListParams::default().labels("tier notin (gpu)")).await,
        ["b", "c"]
    );
    assert_eq!(list(ListParams::default().labels("tier")).await, ["a", "b"]);
    assert_eq!(list(ListParams::default().labels("!tier")).await, ["c"]);
    assert_eq!(
        list(ListParams::default().fields("spec.nodeName=n1")).await,
        ["a", "c"]
    );
    assert_eq!(
        list(
            ListParams::default()
                .fields("spec.nodeName=n1")
                .labels("app=train")
        )
        .await,
        ["a"]
    );
    assert_eq!(
        list(ListParams::default().fields("metadata.name=b")).await,
        ["b"]
    );

    let all: Api<Pod> = Api::all(cluster.client());
    let across = names(
        &all.list(&ListParams::default().labels("app=train"))
            .await
            .unwrap()
            .items,
    );
    assert_eq!(across, ["a", "b", "d"]);
    let in_other = all
        .list(&ListParams::default().fields("metadata.namespace=other"))
        .await
        .unwrap();
    assert_eq!(names(&in_other.items), ["d"]);

    // A field a real API server does not index is refused, not silently ignored.
    let err = pods
        .list(&ListParams::default().fields("spec.containers=x"))
        .await
        .unwrap_err();
    let status = status_of(err);
    assert_eq!((status.code, status.reason.as_str()), (400, "BadRequest"));
}

#[tokio::test]
async fn finalizers_defer_deletion_until_removed() {
    let cluster = FakeCluster::new();
    let cms: Api<ConfigMap> = Api::namespaced(cluster.client(), "default");
    let cm = ConfigMap {
        metadata: ObjectMeta {
            name: Some("held".into()),
            finalizers: Some(vec!["automigrate.dev/cleanup".into()]),
            ..Default::default()
        },
        ..Default::default()
    };
    cms.create(&PostParams::default(), &cm).await.unwrap();

    let deleted = cms.delete("held", &DeleteParams::default()).await.unwrap();
    let pending = deleted
        .left()
        .expect("a held object comes back, not a Status");
    assert!(pending.metadata.deletion_timestamp.is_some());
    let still = cms.get("held").await.unwrap();
    assert!(still.metadata.deletion_timestamp.is_some());

    // No new finalizers once deletion started.
    let err = cms
        .patch(
            "held",
            &PatchParams::default(),
            &Patch::Merge(
                json!({"metadata": {"finalizers": ["automigrate.dev/cleanup", "other/x"]}}),
            ),
        )
        .await
        .unwrap_err();
    assert_eq!(status_of(err).code, 422);

    // Other updates still work; removing the last finalizer removes the object.
    cms.patch(
        "held",
        &PatchParams::default(),
        &Patch::Merge(json!({"data": {"k": "v"}})),
    )
    .await
    .unwrap();
    assert!(cms.get_opt("held").await.unwrap().is_some());
    cms.patch(
        "held",
        &PatchParams::default(),
        &Patch::Merge(json!({"metadata": {"finalizers": null}})),
    )
    .await
    .unwrap();
    assert!(cms.get_opt("held").await.unwrap().is_none());
}

#[tokio::test]
async fn generate_name_and_name_validation() {
    let cluster = FakeCluster::new();
    let pods: Api<Pod> = Api::namespaced(cluster.client(), "default");
    let mut template = pod("", "n1", &[]);
    template.metadata.name = None;
    template.metadata.generate_name = Some("train-restore-".into());
    let a = pods
        .create(&PostParams::default(), &template)
        .await
        .unwrap();
    let b = pods
        .create(&PostParams::default(), &template)
        .await
        .unwrap();
    let (a, b) = (a.metadata.name.unwrap(), b.metadata.name.unwrap());
    assert!(
        a.starts_with("train-restore-") && a.len() == "train-restore-".len() + 5,
        "{a}"
    );
    assert_ne!(a, b);

    template.metadata.generate_name = None;
    let err = pods
        .create(&PostParams::default(), &template)
        .await
        .unwrap_err();
    assert_eq!(status_of(err).code, 422, "name or generateName is required");

    template.metadata.name = Some("Not_A_Name".into());
    let err = pods
        .create(&PostParams::default(), &template)
        .await
        .unwrap_err();
    let status = status_of(err);
    assert_eq!((status.code, status.reason.as_str()), (422, "Invalid"));

    // Creating with a resourceVersion is refused, as a real server does.
    let mut copied = pods.get(&a).await.unwrap();
    copied.metadata.name = Some("copy".into());
    copied.metadata.uid = None;
    let err = pods
        .create(&PostParams::default(), &copied)
        .await
        .unwrap_err();
    assert_eq!(status_of(err).code, 500);
}

#[tokio::test]
async fn status_bodies_carry_reason_and_details() {
    let cluster = FakeCluster::new();
    let pods: Api<Pod> = Api::namespaced(cluster.client(), "default");
    let status = status_of(pods.get("ghost").await.unwrap_err());
    assert_eq!(status.code, 404);
    assert_eq!(status.reason, "NotFound");
    assert_eq!(status.message, "pods \"ghost\" not found");
    let details = status.details.unwrap();
    assert_eq!(details.name, "ghost");
    assert_eq!(details.kind, "pods");

    // Unknown paths are 404 Status bodies too.
    let request = http::Request::get("/healthz").body(vec![]).unwrap();
    let err = cluster.client().request_text(request).await.unwrap_err();
    assert_eq!(status_of(err).code, 404);
}

#[tokio::test]
async fn delete_preconditions_and_dry_run() {
    let cluster = FakeCluster::new();
    let pods: Api<Pod> = Api::namespaced(cluster.client(), "default");
    let created = pods
        .create(&PostParams::default(), &pod("p", "n1", &[]))
        .await
        .unwrap();

    let wrong_uid = DeleteParams {
        preconditions: Some(Preconditions {
            uid: Some("not-the-uid".into()),
            resource_version: None,
        }),
        ..Default::default()
    };
    let err = pods.delete("p", &wrong_uid).await.unwrap_err();
    assert_eq!(status_of(err).code, 409);

    let dry = PostParams {
        dry_run: true,
        ..Default::default()
    };
    pods.create(&dry, &pod("dry", "n1", &[])).await.unwrap();
    assert!(pods.get_opt("dry").await.unwrap().is_none());

    let right_uid = DeleteParams {
        preconditions: Some(Preconditions {
            uid: created.metadata.uid.clone(),
            resource_version: created.metadata.resource_version.clone(),
        }),
        ..Default::default()
    };
    let gone = pods.delete("p", &right_uid).await.unwrap();
    // Pods come back as the deleted object; a ConfigMap deletion answers with a Status.
    assert!(gone.is_left());
    cluster.put(&ConfigMap {
        metadata: ObjectMeta {
            name: Some("c".into()),
            namespace: Some("default".into()),
            ..Default::default()
        },
        ..Default::default()
    });
    let cms: Api<ConfigMap> = Api::namespaced(cluster.client(), "default");
    assert!(
        cms.delete("c", &DeleteParams::default())
            .await
            .unwrap()
            .is_right()
    );
}

#[tokio::test]
async fn eviction_and_delete_collection() {
    let cluster = FakeCluster::new();
    for (name, app) in [("a", "x"), ("b", "x"), ("c", "y")] {
        cluster.put(&pod(name, "n1", &[("app", app)]));
    }
    let pods: Api<Pod> = Api::namespaced(cluster.client(), "default");
    pods.evict("c", &Default::default()).await.unwrap();
    assert!(cluster.get::<Pod>(Some("default"), "c").is_none());

    pods.delete_collection(
        &DeleteParams::default(),
        &ListParams::default().labels("app=x"),
    )
    .await
    .unwrap();
    assert!(cluster.list::<Pod>().is_empty());
}

#[tokio::test]
async fn put_and_replace_keep_server_fields() {
    let cluster = FakeCluster::new();
    let pods: Api<Pod> = Api::namespaced(cluster.client(), "default");
    let created = pods
        .create(&PostParams::default(), &pod("p", "n1", &[]))
        .await
        .unwrap();
    // A client cannot rewrite uid or creationTimestamp.
    let mut edit = created.clone();
    edit.metadata.creation_timestamp = None;
    edit.metadata.labels = Some(BTreeMap::from([("k".into(), "v".into())]));
    let replaced = pods
        .replace("p", &PostParams::default(), &edit)
        .await
        .unwrap();
    assert_eq!(
        replaced.metadata.creation_timestamp,
        created.metadata.creation_timestamp
    );
    assert_eq!(replaced.metadata.uid, created.metadata.uid);
    // Only metadata changed: generation stays.
    assert_eq!(replaced.metadata.generation, Some(1));

    let fixed = jiff::Timestamp::from_second(1_800_000_000).unwrap();
    cluster.set_time(Some(fixed));
    let later = pods
        .create(&PostParams::default(), &pod("q", "n1", &[]))
        .await
        .unwrap();
    assert_eq!(later.metadata.creation_timestamp.unwrap().0, fixed);
}

#[tokio::test]
async fn graceful_pod_deletion_waits_for_the_kubelet() {
    let cluster = FakeCluster::with_options(automigrate_kube_fake::FakeClusterOptions {
        graceful_pod_deletion: true,
        ..Default::default()
    });
    let fixed = jiff::Timestamp::from_second(1_800_000_000).unwrap();
    cluster.set_time(Some(fixed));
    let pods: Api<Pod> = Api::namespaced(cluster.client(), "default");
    pods.create(&PostParams::default(), &pod("bound", "n1", &[]))
        .await
        .unwrap();
    let mut unbound = pod("unbound", "", &[]);
    unbound.spec.as_mut().unwrap().node_name = None;
    pods.create(&PostParams::default(), &unbound).await.unwrap();

    // A pod bound to a node stays, terminating, until its kubelet confirms.
    let answer = pods
        .delete("bound", &DeleteParams::default())
        .await
        .unwrap();
    let terminating = answer.left().unwrap();
    assert_eq!(terminating.metadata.deletion_grace_period_seconds, Some(30));
    assert_eq!(
        terminating.metadata.deletion_timestamp.unwrap().0,
        fixed
            .checked_add(jiff::SignedDuration::from_secs(30))
            .unwrap()
    );
    assert!(pods.get_opt("bound").await.unwrap().is_some());
    // Deleting again does not finish it; a zero-grace delete (the kubelet's) does.
    pods.delete("bound", &DeleteParams::default())
        .await
        .unwrap();
    assert!(pods.get_opt("bound").await.unwrap().is_some());
    pods.delete("bound", &DeleteParams::default().grace_period(0))
        .await
        .unwrap();
    assert!(pods.get_opt("bound").await.unwrap().is_none());

    // An unscheduled pod has no kubelet to wait for.
    pods.delete("unbound", &DeleteParams::default())
        .await
        .unwrap();
    assert!(pods.get_opt("unbound").await.unwrap().is_none());
}

/// A terminating pod is not removed by writes while its grace period is pending: the real API
/// server deletes on update only when the object's `deletionGracePeriodSeconds` is 0 (its
/// `shouldDeleteDuringUpdate`), so status writes, label patches and finalizer removal leave the
/// pod Terminating until the kubelet's zero-grace DELETE.
#[tokio::test]
async fn writes_keep_a_terminating_pod_until_the_zero_grace_delete() {
    let cluster = FakeCluster::with_options(automigrate_kube_fake::FakeClusterOptions {
        graceful_pod_deletion: true,
        ..Default::default()
    });
    let fixed = jiff::Timestamp::from_second(1_800_000_000).unwrap();
    cluster.set_time(Some(fixed));
    let pods: Api<Pod> = Api::namespaced(cluster.client(), "default");
    pods.create(&PostParams::default(), &pod("p", "n1", &[]))
        .await
        .unwrap();
    pods.delete("p", &DeleteParams::default()).await.unwrap();

    // The kubelet reports the stopped containers; someone labels the pod.
    pods.patch_status(
        "p",
        &PatchParams::default(),
        &Patch::Merge(json!({"status": {"phase": "Failed"}})),
    )
    .await
    .unwrap();
    pods.patch(
        "p",
        &PatchParams::default(),
        &Patch::Merge(json!({"metadata": {"labels": {"seen": "yes"}}})),
    )
    .await
    .unwrap();
    let still = pods.get_opt("p").await.unwrap().expect("still terminating");
    assert!(still.metadata.deletion_timestamp.is_some());
    assert_eq!(still.status.unwrap().phase.as_deref(), Some("Failed"));
    pods.delete("p", &DeleteParams::default().grace_period(0))
        .await
        .unwrap();
    assert!(pods.get_opt("p").await.unwrap().is_none());

    // With a finalizer: removing it during the grace period does not delete the pod; a
    // zero-grace DELETE shortens the pending deletion, and then the finalizer's removal does.
    let mut held = pod("held", "n1", &[]);
    held.metadata.finalizers = Some(vec!["example.com/hold".into()]);
    pods.create(&PostParams::default(), &held).await.unwrap();
    pods.delete("held", &DeleteParams::default()).await.unwrap();
    pods.patch(
        "held",
        &PatchParams::default(),
        &Patch::Merge(json!({"metadata": {"finalizers": null}})),
    )
    .await
    .unwrap();
    assert!(pods.get_opt("held").await.unwrap().is_some());
    pods.patch(
        "held",
        &PatchParams::default(),
        &Patch::Merge(json!({"metadata": {"finalizers": ["example.com/hold"]}})),
    )
    .await
    .unwrap_err();
    let mut held = pod("held2", "n1", &[]);
    held.metadata.finalizers = Some(vec!["example.com/hold".into()]);
    pods.create(&PostParams::default(), &held).await.unwrap();
    pods.delete("held2", &DeleteParams::default())
        .await
        .unwrap();
    let shortened = pods
        .delete("held2", &DeleteParams::default().grace_period(0))
        .await
        .unwrap()
        .left()
        .expect("the finalizer still holds it");
    assert_eq!(shortened.metadata.deletion_grace_period_seconds, Some(0));
    // deletionTimestamp moves back by the 30 s no longer granted.
    assert_eq!(shortened.metadata.deletion_timestamp.unwrap().0, fixed);
    pods.patch(
        "held2",
        &PatchParams::default(),
        &Patch::Merge(json!({"metadata": {"finalizers": null}})),
    )
    .await
    .unwrap();
    assert!(pods.get_opt("held2").await.unwrap().is_none());
    // The first one, its finalizer gone, ends with the zero-grace DELETE.
    pods.delete("held", &DeleteParams::default().grace_period(0))
        .await
        .unwrap();
    assert!(pods.get_opt("held").await.unwrap().is_none());
}
#[tokio::test]
async fn put_defaults_the_namespace_of_namespaced_types() {
    let cluster = FakeCluster::new();
    let mut p = pod("p", "n1", &[]);
    p.metadata.namespace = None;
    cluster.put(&p);
    assert!(cluster.get::<Pod>(Some("default"), "p").is_some());
    let node = k8s_openapi::api::core::v1::Node {
        metadata: ObjectMeta {
            name: Some("n1".into()),
            ..Default::default()
        },
        ..Default::default()
    };
    cluster.put(&node);
    let stored = cluster
        .get::<k8s_openapi::api::core::v1::Node>(None, "n1")
        .unwrap();
    assert_eq!(stored.metadata.namespace, None);
}
