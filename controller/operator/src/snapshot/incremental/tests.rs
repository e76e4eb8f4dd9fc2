//! The incremental snapshot against the full builder: random sequences of object adds,
//! updates (with and without a resourceVersion), relists (a new allocation of the same
//! version), deletes, Lease renewals and checkpoint starts, with a pass after some of them; at
//! every pass the kept snapshot must equal [`build`](crate::snapshot::build)'s and the engine
//! must decide the same on it as on the old builder's (reflector-ordered) snapshot.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use crate::snapshot::NODE_LEASE_NAMESPACE;

use automigrate_core::decide::EngineMemory;
use automigrate_core::model::{ClusterSnapshot, LinkObservation, PodRef, UserObservation};
use automigrate_core::policy::PolicySet;
use jiff::Timestamp;
use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::api::core::v1::{
    Container, Node, NodeCondition, NodeSpec, NodeStatus, Pod, PodSpec, PodStatus,
    ResourceRequirements, Taint,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta, OwnerReference, Time};
use proptest::prelude::*;

use super::*;
use crate::snapshot::{GPU_RESOURCE, LATEST_CHECKPOINT, build};

const NAMESPACES: [&str; 2] = ["a", "b"];
const POD_NAMES: usize = 6;
/// Node names the pods may be bound to; the last one never exists as a Node.
const NODE_NAMES: usize = 5;

fn t(seconds: i64) -> Timestamp {
    Timestamp::from_second(1_800_000_000 + seconds).unwrap()
}

fn node_name(index: usize) -> String {
    format!("n{index}")
}

fn pod_ref(index: usize) -> PodRef {
    PodRef::new(
        NAMESPACES[index % NAMESPACES.len()],
        format!("p{}", index / NAMESPACES.len()),
    )
}

#[derive(Debug, Clone)]
struct PodShape {
    node: Option<usize>,
    /// 0: no protect annotation, 1: "true", 2: "false".
    protect: u8,
    phase: Option<&'static str>,
    deleting: bool,
    cpu: Vec<u64>,
    memory: u64,
    gpu: u64,
    /// 0: none, 1: a valid checkpoint, 2: an unreadable one.
    checkpoint: u8,
    checkpoint_age: i64,
    user: Option<&'static str>,
    user_latency: Option<&'static str>,
    owner: Option<&'static str>,
    label: Option<&'static str>,
    interval: Option<&'static str>,
}

#[derive(Debug, Clone)]
struct NodeShape {
    ready: &'static str,
    since: i64,
    unschedulable: bool,
    taint: bool,
    cpu: u64,
    memory_gib: u64,
    gpus: u64,
    zone: Option<&'static str>,
}

#[derive(Debug, Clone)]
enum Op {
    /// A new version of the pod (created if absent); `versioned`: it carries a resourceVersion.
    PutPod(usize, PodShape, bool),
    /// The same version at a new address, as a relist gives.
    RelistPod(usize),
    DeletePod(usize),
    PutNode(usize, NodeShape, bool),
    RelistNode(usize),
    DeleteNode(usize),
    /// A Lease renewal at this offset; `elsewhere`: in a namespace other than kube-node-lease.
    RenewLease(usize, i64, bool),
    DeleteLease(usize),
    /// The pods being checkpointed, as a bit set over the pod indexes.
    InProgress(u16),
    /// The user-latency book's list: 0 the same values in a new allocation, else other values.
    SetUsers(u8),
    /// The link book's list, likewise.
    SetLinks(u8),
    /// A decision pass, with the store's listing order shuffled by this seed.
    Pass(u64),
}

fn pod_shape() -> impl Strategy<Value = PodShape> {
    (
        (
            prop_oneof![1 => Just(None), 6 => (0..NODE_NAMES + 1).prop_map(Some)],
            prop_oneof![4 => Just(1u8), 1 => Just(0u8), 1 => Just(2u8)],
            prop_oneof![
                Just(Some("Running")),
                Just(Some("Pending")),
                Just(Some("Succeeded")),
                Just(Some("Failed")),
                Just(None)
            ],
            proptest::bool::weighted(0.1),
            proptest::collection::vec(prop_oneof![0u64..4_000, Just(u64::MAX / 1_000)], 0..3),
            prop_oneof![4 => 0u64..8, 1 => Just(u64::MAX >> 1)],
            0u64..2,
        ),
        (
            0u8..3,
            0i64..1_300,
            proptest::option::of(prop_oneof![Just("alice"), Just("bob")]),
            proptest::option::of(prop_oneof![
                Just("n1=30ms, n2=40ms"),
                Just("n0=5ms"),
                Just("oops")
            ]),
            proptest::option::of(prop_oneof![Just("Job"), Just("ReplicaSet")]),
            proptest::option::of(prop_oneof![Just("x"), Just("y")]),
            proptest::option::of(prop_oneof![Just("1m"), Just("bogus")]),
        ),
    )
        .prop_map(
            |(
                (node, protect, phase, deleting, cpu, memory, gpu),
                (checkpoint, checkpoint_age, user, user_latency, owner, label, interval),
            )| PodShape {
                node,
                protect,
                phase,
                deleting,
                cpu,
                memory,
                gpu,
                checkpoint,
                checkpoint_age,
                user,
                user_latency,
                owner,
                label,
                interval,
            },
        )
}

fn node_shape() -> impl Strategy<Value = NodeShape> {
    (
        prop_oneof![6 => Just("True"), 1 => Just("False"), 1 => Just("Unknown")],
        0i64..600,
        proptest::bool::weighted(0.2),
        proptest::bool::weighted(0.2),
        1u64..16_000,
        1u64..64,
        0u64..2,
        proptest::option::of(prop_oneof![Just("z1"), Just("z2")]),
    )
        .prop_map(
            |(ready, since, unschedulable, taint, cpu, memory_gib, gpus, zone)| NodeShape {
                ready,
                since,
                unschedulable,
                taint,
                cpu,
                memory_gib,
                gpus,
                zone,
            },
        )
}

fn op() -> impl Strategy<Value = Op> {
    let pods = NAMESPACES.len() * POD_NAMES;
    prop_oneof![
        8 => (0..pods, pod_shape(), proptest::bool::weighted(0.8))
            .prop_map(|(pod, shape, versioned)| Op::PutPod(pod, shape, versioned)),
        2 => (0..pods).prop_map(Op::RelistPod),
        2 => (0..pods).prop_map(Op::DeletePod),
        3 => (0..NODE_NAMES, node_shape(), proptest::bool::weighted(0.8))
            .prop_map(|(node, shape, versioned)| Op::PutNode(node, shape, versioned)),
        1 => (0..NODE_NAMES).prop_map(Op::RelistNode),
        1 => (0..NODE_NAMES).prop_map(Op::DeleteNode),
        3 => (0..NODE_NAMES, prop_oneof![4 => 0i64..25, 1 => 25i64..60], proptest::bool::weighted(0.1))
            .prop_map(|(node, offset, elsewhere)| Op::RenewLease(node, offset, elsewhere)),
        1 => (0..NODE_NAMES).prop_map(Op::DeleteLease),
        2 => any::<u16>().prop_map(Op::InProgress),
        1 => (0u8..3).prop_map(Op::SetUsers),
        1 => (0u8..3).prop_map(Op::SetLinks),
        4 => any::<u64>().prop_map(Op::Pass),
    ]
}

fn quantity(value: String) -> Quantity {
    Quantity(value)
}

fn make_pod(index: usize, shape: &PodShape, version: Option<u64>) -> Pod {
    let pod_ref = pod_ref(index);
    let mut annotations = BTreeMap::from([("other.io/x".to_string(), "y".to_string())]);
    match shape.protect {
        1 => {
            annotations.insert(annotations::PROTECT.into(), "true".into());
        }
        2 => {
            annotations.insert(annotations::PROTECT.into(), "false".into());
        }
        _ => {}
    }
    if let Some(user) = shape.user {
        annotations.insert(annotations::USER.into(), user.into());
    }
    if let Some(latency) = shape.user_latency {
        annotations.insert(annotations::USER_LATENCY.into(), latency.into());
    }
    if let Some(interval) = shape.interval {
        annotations.insert(annotations::CHECKPOINT_INTERVAL.into(), interval.into());
    }
    match shape.checkpoint {
        1 => {
            let taken = t(-shape.checkpoint_age);
            annotations.insert(
                LATEST_CHECKPOINT.into(),
                format!(
                    r#"{{"id":"ck-{index}-{}","takenAt":"{taken}","size":1024,"heldOn":["n0","n3"]}}"#,
                    shape.checkpoint_age
                ),
            );
        }
        2 => {
            annotations.insert(LATEST_CHECKPOINT.into(), "{not json".into());
        }
        _ => {}
    }
    let containers = shape
        .cpu
        .iter()
        .enumerate()
        .map(|(number, cpu)| {
            let mut requests = BTreeMap::from([
                ("cpu".to_string(), quantity(format!("{cpu}m"))),
                (
                    "memory".to_string(),
                    quantity(if shape.memory > 1 << 40 {
                        shape.memory.to_string()
                    } else {
                        format!("{}Gi", shape.memory)
                    }),
                ),
            ]);
            if shape.gpu > 0 {
                requests.insert(GPU_RESOURCE.into(), quantity(shape.gpu.to_string()));
            }
            Container {
                name: format!("c{number}"),
                resources: Some(ResourceRequirements {
                    requests: Some(requests),
                    ..ResourceRequirements::default()
                }),
                ..Container::default()
            }
        })
        .collect();
    Pod {
        metadata: ObjectMeta {
            name: Some(pod_ref.name.clone()),
            namespace: Some(pod_ref.namespace.clone()),
            uid: Some(format!("uid-{pod_ref}")),
            resource_version: version.map(|version| version.to_string()),
            deletion_timestamp: shape.deleting.then(|| Time(t(-1))),
            labels: shape
                .label
                .map(|label| BTreeMap::from([("app".to_string(), label.to_string())])),
            annotations: Some(annotations),
            owner_references: shape.owner.map(|kind| {
                vec![OwnerReference {
                    kind: kind.into(),
                    name: "owner".into(),
                    controller: Some(true),
                    ..OwnerReference::default()
                }]
            }),
            ..ObjectMeta::default()
        },
        spec: Some(PodSpec {
            node_name: shape.node.map(node_name),
            containers,
            ..PodSpec::default()
        }),
        status: Some(PodStatus {
            phase: shape.phase.map(str::to_string),
            ..PodStatus::default()
        }),
    }
}

fn make_node(index: usize, shape: &NodeShape, version: Option<u64>) -> Node {
    let mut labels = BTreeMap::from([("kubernetes.io/hostname".to_string(), node_name(index))]);
    if let Some(zone) = shape.zone {
        labels.insert("topology.kubernetes.io/zone".into(), zone.into());
    }
    Node {
        metadata: ObjectMeta {
            name: Some(node_name(index)),
            uid: Some(format!("uid-{index}")),
            resource_version: version.map(|version| version.to_string()),
            labels: Some(labels),
            ..ObjectMeta::default()
        },
        spec: Some(NodeSpec {
            unschedulable: Some(shape.unschedulable),
            taints: shape.taint.then(|| {
                vec![Taint {
                    key: "dedicated".into(),
                    value: Some("gpu".into()),
                    effect: "NoSchedule".into(),
                    ..Taint::default()
                }]
            }),
            ..NodeSpec::default()
        }),
        status: Some(NodeStatus {
            allocatable: Some(BTreeMap::from([
                ("cpu".into(), quantity(format!("{}m", shape.cpu))),
                ("memory".into(), quantity(format!("{}Gi", shape.memory_gib))),
                (GPU_RESOURCE.into(), quantity(shape.gpus.to_string())),
            ])),
            conditions: Some(vec![NodeCondition {
                type_: "Ready".into(),
                status: shape.ready.into(),
                last_transition_time: Some(Time(t(-shape.since))),
                reason: Some("KubeletReady".into()),
                ..NodeCondition::default()
            }]),
            ..NodeStatus::default()
        }),
    }
}

fn make_lease(index: usize, renewed: Timestamp, elsewhere: bool) -> Lease {
    Lease {
        metadata: ObjectMeta {
            name: Some(node_name(index)),
            namespace: Some(
                if elsewhere {
                    "default"
                } else {
                    NODE_LEASE_NAMESPACE
                }
                .into(),
            ),
            ..ObjectMeta::default()
        },
        spec: Some(LeaseSpec {
            renew_time: Some(MicroTime(renewed)),
            ..LeaseSpec::default()
        }),
    }
}

/// Nodes, Leases and Pods as the stores list them.
type Listing = (Vec<Arc<Node>>, Vec<Arc<Lease>>, Vec<Arc<Pod>>);

/// The stores: what the reflectors (and the books) would hold.
#[derive(Debug)]
struct Stores {
    pods: BTreeMap<usize, Arc<Pod>>,
    nodes: BTreeMap<usize, Arc<Node>>,
    leases: BTreeMap<usize, Arc<Lease>>,
    in_progress: BTreeSet<PodRef>,
    users: Arc<[UserObservation]>,
    links: Arc<[LinkObservation]>,
    version: u64,
}

impl Default for Stores {
    fn default() -> Self {
        Self {
            pods: BTreeMap::new(),
            nodes: BTreeMap::new(),
            leases: BTreeMap::new(),
            in_progress: BTreeSet::new(),
            users: users(0),
            links: links(0),
            version: 0,
        }
    }
}

/// A listing in an order set by `seed` (a reflector lists in hash order).
fn shuffled<T: Clone>(items: impl Iterator<Item = T>, seed: u64) -> Vec<T> {
    let mut items: Vec<T> = items.collect();
    let mut state = seed | 1;
    for index in (1..items.len()).rev() {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        let other = (state % (index as u64 + 1)) as usize;
        items.swap(index, other);
    }
    items
}

fn links(variant: u8) -> Arc<[LinkObservation]> {
    let link = |from: usize, to: usize, millis: u64| LinkObservation {
        from: node_name(from),
        to: node_name(to),
        rtt: std::time::Duration::from_millis(millis),
        bandwidth: None,
        loss: 0.0,
        answering: None,
    };
    Arc::from(match variant {
        0 => vec![link(0, 1, 3), link(1, 0, 3)],
        1 => vec![link(0, 1, 90), link(1, 2, 4), link(2, 0, 7)],
        _ => Vec::new(),
    })
}

fn users(variant: u8) -> Arc<[UserObservation]> {
    match variant {
        0 => queried_users(),
        1 => Arc::from(vec![UserObservation {
            user: "bob".into(),
            node: "n0".into(),
            latency: std::time::Duration::from_millis(5),
        }]),
        _ => Arc::from(Vec::new()),
    }
}

fn queried_users() -> Arc<[UserObservation]> {
    Arc::from(vec![
        UserObservation {
            user: "alice".into(),
            node: "n1".into(),
            latency: std::time::Duration::from_millis(99),
        },
        UserObservation {
            user: "carol".into(),
            node: "n2".into(),
            latency: std::time::Duration::from_millis(7),
        },
    ])
}

fn shuffle_snapshot(snapshot: &ClusterSnapshot, seed: u64) -> ClusterSnapshot {
    let mut shuffled_snapshot = snapshot.clone();
    shuffled_snapshot.nodes = shuffled(snapshot.nodes.iter().cloned(), seed);
    shuffled_snapshot.pods = shuffled(snapshot.pods.iter().cloned(), seed.rotate_left(17));
    shuffled_snapshot
}

impl Stores {
    fn next_version(&mut self, versioned: bool) -> Option<u64> {
        self.version += 1;
        versioned.then_some(self.version)
    }

    fn apply(&mut self, op: &Op) {
        match op {
            Op::PutPod(index, shape, versioned) => {
                let version = self.next_version(*versioned);
                self.pods
                    .insert(*index, Arc::new(make_pod(*index, shape, version)));
            }
            Op::RelistPod(index) => {
                if let Some(pod) = self.pods.get_mut(index) {
                    *pod = Arc::new((**pod).clone());
                }
            }
            Op::DeletePod(index) => {
                self.pods.remove(index);
            }
            Op::PutNode(index, shape, versioned) => {
                let version = self.next_version(*versioned);
                self.nodes
                    .insert(*index, Arc::new(make_node(*index, shape, version)));
            }
            Op::RelistNode(index) => {
                if let Some(node) = self.nodes.get_mut(index) {
                    *node = Arc::new((**node).clone());
                }
            }
            Op::DeleteNode(index) => {
                self.nodes.remove(index);
            }
            Op::RenewLease(index, offset, elsewhere) => {
                self.leases
                    .insert(*index, Arc::new(make_lease(*index, t(-offset), *elsewhere)));
            }
            Op::DeleteLease(index) => {
                self.leases.remove(index);
            }
            Op::InProgress(bits) => {
                self.in_progress = (0..NAMESPACES.len() * POD_NAMES)
                    .filter(|index| bits & (1 << index) != 0)
                    .map(pod_ref)
                    .collect();
            }
            Op::SetUsers(variant) => self.users = users(*variant),
            Op::SetLinks(variant) => self.links = links(*variant),
            Op::Pass(_) => {}
        }
    }

    fn listing(&self, seed: u64) -> Listing {
        (
            shuffled(self.nodes.values().cloned(), seed),
            shuffled(self.leases.values().cloned(), seed.rotate_left(7)),
            shuffled(self.pods.values().cloned(), seed.rotate_left(29)),
        )
    }
}

fn inputs<'a>(stores: &'a Stores, listing: &'a Listing) -> Inputs<'a> {
    Inputs {
        nodes: &listing.0,
        leases: &listing.1,
        pods: &listing.2,
        migrations: &[],
        alerts: Vec::new(),
        links: stores.links.clone(),
        users: stores.users.clone(),
        checkpoints_in_progress: &stores.in_progress,
    }
}

/// Runs `ops`, checking the incremental snapshot (and the engine's decisions on it) against the
/// full build at every pass. Returns the last pass's refresh.
fn check(ops: &[Op]) -> Result<Option<Refresh>, TestCaseError> {
    let mut stores = Stores::default();
    let mut kept = IncrementalSnapshot::new();
    let policies = PolicySet::new();
    let memory = EngineMemory::default();
    let mut last = None;
    for (step, op) in ops.iter().enumerate() {
        stores.apply(op);
        let Op::Pass(seed) = op else {
            continue;
        };
        let now = t(step as i64 % 7);
        let listing = stores.listing(*seed);
        let refresh = kept.update(inputs(&stores, &listing), now);
        let full = build(&inputs(&stores, &listing), now);
        prop_assert_eq!(kept.snapshot(), &full, "step {}: {:?}", step, refresh);
        prop_assert_eq!(kept.pod_ids().len(), full.pods.len());
        // The engine must decide the same whatever order the old builder left pods and nodes
        // in (it kept the reflector's); the kept snapshot is in name order.
        let reflector_ordered = shuffle_snapshot(&full, *seed);
        let (decided, _) = automigrate_core::decide(kept.snapshot(), &policies, &memory, now);
        let (expected, _) = automigrate_core::decide(&reflector_ordered, &policies, &memory, now);
        prop_assert_eq!(decided, expected, "step {}", step);
        last = Some(refresh);
    }
    Ok(last)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn incremental_snapshot_equals_the_full_build(
        nodes in proptest::collection::vec(node_shape(), NODE_NAMES),
        ops in proptest::collection::vec(op(), 1..60),
    ) {
        // Every node starts out existing and renewing, so that pods have somewhere healthy to
        // be checkpointed on and to move to; the ops then change that.
        let mut all: Vec<Op> = nodes
            .into_iter()
            .enumerate()
            .flat_map(|(node, shape)| [Op::PutNode(node, shape, true), Op::RenewLease(node, 0, false)])
            .collect();
        all.extend(ops);
        check(&all)?;
    }
}

fn running(node: usize) -> PodShape {
    PodShape {
        node: Some(node),
        protect: 1,
        phase: Some("Running"),
        deleting: false,
        cpu: vec![500],
        memory: 1,
        gpu: 0,
        checkpoint: 1,
        checkpoint_age: 700,
        user: Some("alice"),
        user_latency: Some("n1=30ms, n2=40ms"),
        owner: None,
        label: None,
        interval: None,
    }
}

fn ready() -> NodeShape {
    NodeShape {
        ready: "True",
        since: 100,
        unschedulable: false,
        taint: false,
        cpu: 8_000,
        memory_gib: 32,
        gpus: 0,
        zone: Some("z1"),
    }
}

#[test]
fn unchanged_objects_are_not_translated_again() {
    let mut ops = vec![
        Op::PutNode(0, ready(), true),
        Op::PutNode(1, ready(), true),
        Op::RenewLease(0, 1, false),
    ];
    for pod in 0..6 {
        ops.push(Op::PutPod(pod, running(pod % 2), true));
    }
    ops.push(Op::Pass(1));
    let first = check(&ops).unwrap().unwrap();
    assert_eq!(first.pods_translated, 6);
    assert_eq!(first.nodes_translated, 2);
    assert!(first.pods_relaid);

    // Same objects, another listing order, a Lease renewed: nothing to translate.
    ops.push(Op::RenewLease(0, 0, false));
    ops.push(Op::Pass(99));
    let second = check(&ops).unwrap().unwrap();
    assert_eq!(second, Refresh::default(), "nothing changed: {second:?}");

    // A relist (new allocations, same versions) reuses everything.
    ops.extend((0..6).map(Op::RelistPod));
    ops.push(Op::RelistNode(1));
    ops.push(Op::Pass(5));
    let relisted = check(&ops).unwrap().unwrap();
    assert_eq!(relisted.pods_translated, 0);
    assert_eq!(relisted.pods_same_version, 6);
    assert_eq!(relisted.nodes_same_version, 1);
    assert!(!relisted.pods_relaid);

    // One update, one delete, one checkpoint started: only those are touched.
    let mut moved = running(1);
    moved.checkpoint_age = 3;
    ops.push(Op::PutPod(2, moved, true));
    ops.push(Op::DeletePod(3));
    ops.push(Op::InProgress(1 << 4));
    ops.push(Op::Pass(7));
    let changed = check(&ops).unwrap().unwrap();
    assert_eq!(changed.pods_translated, 1);
    assert_eq!(changed.pods_removed, 1);
    assert!(changed.pods_relaid);

    // Without a resourceVersion a new allocation is translated again.
    ops.push(Op::PutPod(0, running(0), false));
    ops.push(Op::Pass(8));
    ops.push(Op::RelistPod(0));
    ops.push(Op::Pass(9));
    let unversioned = check(&ops).unwrap().unwrap();
    assert_eq!(unversioned.pods_translated, 1);
    assert_eq!(unversioned.pods_same_version, 0);
}

#[test]
fn pod_ids_follow_pods_across_relayouts() {
    let mut stores = Stores::default();
    let mut kept = IncrementalSnapshot::new();
    for pod in [0, 2, 4] {
        stores.apply(&Op::PutPod(pod, running(0), true));
    }
    let pass = |stores: &Stores, kept: &mut IncrementalSnapshot, seed| {
        let listing = stores.listing(seed);
        kept.update(inputs(stores, &listing), t(0));
        kept.snapshot()
            .pods
            .iter()
            .map(|pod| pod.pod_ref())
            .zip(kept.pod_ids().iter().copied())
            .collect::<BTreeMap<PodRef, u64>>()
    };
    let before = pass(&stores, &mut kept, 1);
    let layout = kept.pod_layout();
    stores.apply(&Op::PutPod(1, running(0), true));
    stores.apply(&Op::DeletePod(2));
    let after = pass(&stores, &mut kept, 2);
    assert_ne!(kept.pod_layout(), layout);
    assert_eq!(after[&pod_ref(0)], before[&pod_ref(0)]);
    assert_eq!(after[&pod_ref(4)], before[&pod_ref(4)]);
    let new_id = after[&pod_ref(1)];
    assert!(
        before.values().all(|id| *id != new_id),
        "a new pod gets a new id"
    );
}
