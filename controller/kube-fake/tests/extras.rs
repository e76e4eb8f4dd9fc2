//! Everything around the core: node proxy handlers, fault injection, Events (core/v1 and
//! events.k8s.io/v1 through kube's recorder), Leases, custom resources of any group, request
//! recording.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::sync::{Arc, Mutex};
use std::time::Duration;

use automigrate_kube_fake::{FakeCluster, Fault, NodeProxyResponse, ResourceType};
use futures::StreamExt;
use http::{Method, StatusCode};
use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::api::core::v1::{ConfigMap, Event as CoreEvent, ObjectReference, Pod};
use k8s_openapi::api::events::v1::Event as EventsV1;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use kube::CustomResource;
use kube::api::{Api, ListParams, ObjectMeta, Patch, PatchParams, PostParams};
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::runtime::{WatchStreamExt, reflector, watcher};
use serde::{Deserialize, Serialize};
use serde_json::json;

#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "automigrate.dev",
    version = "v1alpha1",
    kind = "Migration",
    namespaced,
    status = "MigrationStatus",
    schema = "disabled"
)]
pub struct MigrationSpec {
    pub pod: String,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
pub struct MigrationStatus {
    pub phase: String,
}

fn status_code(err: kube::Error) -> u16 {
    match err {
        kube::Error::Api(status) => status.code,
        other => panic!("expected an API error, got {other:?}"),
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

#[tokio::test]
async fn node_proxy_handlers() {
    let cluster = FakeCluster::new();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let log = seen.clone();
    cluster.set_node_proxy_handler("n1", move |request| {
        log.lock().unwrap().push((
            request.method.clone(),
            request.path.clone(),
            request.query.clone(),
        ));
        NodeProxyResponse::json(
            StatusCode::OK,
            &json!({"items": ["/var/lib/kubelet/checkpoints/x.tar"]}),
        )
    });
    let client = cluster.client();
    let request =
        http::Request::post("/api/v1/nodes/n1/proxy/checkpoint/default/p1/main?timeout=30")
            .body(vec![])
            .unwrap();
    let answer: serde_json::Value = client.request(request).await.unwrap();
    assert_eq!(answer["items"][0], "/var/lib/kubelet/checkpoints/x.tar");
    assert_eq!(
        seen.lock().unwrap().as_slice(),
        [(
            Method::POST,
            "/checkpoint/default/p1/main".to_owned(),
            "timeout=30".to_owned()
        )]
    );

    // A node without a handler answers 404; the handler's own errors come through.
    let other = http::Request::post("/api/v1/nodes/n2/proxy/checkpoint/default/p1/main")
        .body(vec![])
        .unwrap();
    assert_eq!(
        status_code(client.request_text(other).await.unwrap_err()),
        404
    );
    cluster.set_node_proxy_handler("n2", |_| {
        NodeProxyResponse::new(StatusCode::INTERNAL_SERVER_ERROR, "criu failed")
    });
    let failing = http::Request::post("/api/v1/nodes/n2/proxy/checkpoint/default/p1/main")
        .body(vec![])
        .unwrap();
    assert_eq!(
        status_code(client.request_text(failing).await.unwrap_err()),
        500
    );
    cluster.clear_node_proxy_handler("n1");
    let cleared = http::Request::get("/api/v1/nodes/n1/proxy/healthz")
        .body(vec![])
        .unwrap();
    assert_eq!(
        status_code(client.request_text(cleared).await.unwrap_err()),
        404
    );
    assert!(
        cluster
            .requests()
            .iter()
            .any(|r| r.path == "/api/v1/nodes/n2/proxy/checkpoint/default/p1/main")
    );
}

#[tokio::test]
async fn injected_faults() {
    let cluster = FakeCluster::new();
    let cms: Api<ConfigMap> = Api::namespaced(cluster.client(), "default");
    let cm = ConfigMap {
        metadata: ObjectMeta {
            name: Some("c".into()),
            ..Default::default()
        },
        ..Default::default()
    };
    cluster.inject_fault(
        Fault::status(503)
            .on(Method::POST, "/api/v1/namespaces/default/configmaps")
            .times(2),
    );
    assert_eq!(
        status_code(cms.create(&PostParams::default(), &cm).await.unwrap_err()),
        503
    );
    assert_eq!(
        status_code(cms.create(&PostParams::default(), &cm).await.unwrap_err()),
        503
    );
    cms.create(&PostParams::default(), &cm).await.unwrap();

    cluster.inject_fault(Fault::unreachable().always());
    match cms.get("c").await.unwrap_err() {
        kube::Error::Service(_) => {}
        other => panic!("expected a transport error, got {other:?}"),
    }
    assert!(cms.get("c").await.is_err());
    cluster.clear_faults();
    cms.get("c").await.unwrap();

    // Faults hit every request, recorded like the rest.
    let failed_posts = cluster
        .requests()
        .iter()
        .filter(|r| r.method == Method::POST && r.path.ends_with("/configmaps"))
        .count();
    assert_eq!(failed_posts, 3);
}

#[tokio::test]
async fn reflector_rides_out_watch_faults() {
    let cluster = FakeCluster::new();
    let pods: Api<Pod> = Api::all(cluster.client());
    // The first two watch requests fail; the watcher backs off and retries.
    cluster.inject_fault(Fault::status(500).watches(true).times(2));
    let (reader, writer) = reflector::store::<Pod>();
    let stream = reflector(writer, watcher(pods, watcher::Config::default()))
        .default_backoff()
        .applied_objects();
    let task = tokio::spawn(stream.for_each(|_| futures::future::ready(())));
    reader.wait_until_ready().await.unwrap();
    cluster.put(&Pod {
        metadata: ObjectMeta {
            name: Some("p".into()),
            namespace: Some("default".into()),
            ..Default::default()
        },
        ..Default::default()
    });
    eventually("pod seen after watch faults", || reader.state().len() == 1).await;
    let watches = cluster
        .requests()
        .iter()
        .filter(|r| r.query.contains("watch=true"))
        .count();
    assert!(watches >= 3, "{watches} watch requests");
    task.abort();
}

#[tokio::test]
async fn events_through_the_recorder_and_core_v1() {
    let cluster = FakeCluster::new();
    let reporter = Reporter {
        controller: "automigrate-controller".into(),
        instance: Some("controller-0".into()),
    };
    let recorder = Recorder::new(cluster.client(), reporter);
    let reference = ObjectReference {
        api_version: Some("v1".into()),
        kind: Some("Pod".into()),
        name: Some("train-0".into()),
        namespace: Some("ml".into()),
        uid: Some("u-1".into()),
        ..Default::default()
    };
    let event = Event {
        type_: EventType::Warning,
        reason: "MigrationStarted".into(),
        note: Some("node n1 NotReady".into()),
        action: "Migrate".into(),
        secondary: None,
    };
    recorder.publish(&event, &reference).await.unwrap();
    // The same event again becomes a series (a merge patch on the first one).
    recorder.publish(&event, &reference).await.unwrap();
    let events: Api<EventsV1> = Api::namespaced(cluster.client(), "ml");
    let stored = events.list(&ListParams::default()).await.unwrap().items;
    assert_eq!(stored.len(), 1);
    assert_eq!(stored[0].reason.as_deref(), Some("MigrationStarted"));
    assert_eq!(stored[0].series.as_ref().map(|s| s.count), Some(2));
    let by_regarding = events
        .list(&ListParams::default().fields("regarding.name=train-0"))
        .await
        .unwrap();
    assert_eq!(by_regarding.items.len(), 1);

    // core/v1 Events are just another resource.
    let core: Api<CoreEvent> = Api::namespaced(cluster.client(), "ml");
    core.create(
        &PostParams::default(),
        &CoreEvent {
            metadata: ObjectMeta {
                generate_name: Some("train-0.".into()),
                ..Default::default()
            },
            involved_object: reference.clone(),
            reason: Some("InvalidPolicy".into()),
            type_: Some("Warning".into()),
            event_time: Some(MicroTime(
                jiff::Timestamp::from_second(1_800_000_000).unwrap(),
            )),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    let found = core
        .list(&ListParams::default().fields("involvedObject.name=train-0,reason=InvalidPolicy"))
        .await
        .unwrap();
    assert_eq!(found.items.len(), 1);
}

#[tokio::test]
async fn leases_with_optimistic_concurrency() {
    let cluster = FakeCluster::new();
    let leases: Api<Lease> = Api::namespaced(cluster.client(), "automigrate-system");
    let lease = Lease {
        metadata: ObjectMeta {
            name: Some("automigrate-controller".into()),
            ..Default::default()
        },
        spec: Some(LeaseSpec {
            holder_identity: Some("a".into()),
            lease_duration_seconds: Some(15),
            ..Default::default()
        }),
    };
    let created = leases.create(&PostParams::default(), &lease).await.unwrap();
    assert_eq!(created.metadata.generation, Some(1));

    // Two candidates read the same version; only the first write wins.
    let mut by_b = created.clone();
    by_b.spec.as_mut().unwrap().holder_identity = Some("b".into());
    let mut by_c = created.clone();
    by_c.spec.as_mut().unwrap().holder_identity = Some("c".into());
    leases
        .replace("automigrate-controller", &PostParams::default(), &by_b)
        .await
        .unwrap();
    let lost = leases
        .replace("automigrate-controller", &PostParams::default(), &by_c)
        .await
        .unwrap_err();
    assert_eq!(status_code(lost), 409);
    let holder = cluster
        .get::<Lease>(Some("automigrate-system"), "automigrate-controller")
        .unwrap()
        .spec
        .unwrap()
        .holder_identity;
    assert_eq!(holder.as_deref(), Some("b"));
    // Leases have no status subresource.
    assert_eq!(
        status_code(
            leases
                .get_status("automigrate-controller")
                .await
                .unwrap_err()
        ),
        404
    );
}

#[tokio::test]
async fn custom_resources_of_any_group() {
    let cluster = FakeCluster::new();
    let migrations: Api<Migration> = Api::namespaced(cluster.client(), "ml");
    let mut m = Migration::new(
        "m1",
        MigrationSpec {
            pod: "train-0".into(),
        },
    );
    m.status = Some(MigrationStatus {
        phase: "Ignored".into(),
    });
    let created = migrations.create(&PostParams::default(), &m).await.unwrap();
    // The status subresource owns status: a create does not set it.
    assert_eq!(created.status, None);

    let (reader, writer) = reflector::store::<Migration>();
    let stream = reflector(
        writer,
        watcher(migrations.clone(), watcher::Config::default()),
    )
    .default_backoff()
    .applied_objects();
    let task = tokio::spawn(stream.for_each(|_| futures::future::ready(())));
    reader.wait_until_ready().await.unwrap();

    migrations
        .patch_status(
            "m1",
            &PatchParams::default(),
            &Patch::Merge(json!({"status": {"phase": "Transferring"}})),
        )
        .await
        .unwrap();
    eventually("status seen by the reflector", || {
        reader
            .state()
            .first()
            .and_then(|m| m.status.as_ref().map(|s| s.phase == "Transferring"))
            .unwrap_or(false)
    })
    .await;

    // A spec write keeps the status and bumps generation.
    let spec_patch = Patch::Merge(json!({"spec": {"pod": "train-1"}, "status": {"phase": "Lost"}}));
    let after = migrations
        .patch("m1", &PatchParams::default(), &spec_patch)
        .await
        .unwrap();
    assert_eq!(after.status.unwrap().phase, "Transferring");
    assert_eq!(after.metadata.generation, Some(2));
    let list = migrations.list(&ListParams::default()).await.unwrap();
    assert_eq!(list.types.kind, "MigrationList");
    assert_eq!(list.types.api_version, "automigrate.dev/v1alpha1");

    // Schema-less access to the same object.
    let rt = ResourceType::new("automigrate.dev", "v1alpha1", "migrations");
    let raw = cluster.get_value(&rt, Some("ml"), "m1").unwrap();
    assert_eq!(raw["spec"]["pod"], "train-1");
    cluster
        .put_value(
            &rt,
            json!({"apiVersion": "automigrate.dev/v1alpha1", "kind": "Migration",
                   "metadata": {"name": "m2", "namespace": "ml"}, "spec": {"pod": "p"}}),
        )
        .unwrap();
    eventually("m2 seen", || reader.state().len() == 2).await;
    task.abort();
}
