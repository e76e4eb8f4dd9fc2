//! The Node object and its Lease: registration, the periodic status update (conditions with
//! heartbeat times, addresses, nodeInfo, capacity) and the Lease renewal in `kube-node-lease`.
//!
//! This is what the controller reads (`controller/operator/src/snapshot.rs`): each condition's
//! `status` and `lastTransitionTime`, taints, allocatable, and the Lease's `renewTime` as the
//! node's heartbeat. A real kubelet posts its status every `nodeStatusUpdateFrequency` (10 s) when
//! something changed and at least every `nodeStatusReportFrequency` (5 min) otherwise; this one
//! posts on every tick, which the API server sees as the same kind of write. It renews the Lease
//! every `leaseDuration / 4` (10 s of 40 s), as the real node lease controller does.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use jiff::Timestamp;
use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::api::core::v1::{
    DaemonEndpoint, Node, NodeAddress, NodeCondition, NodeDaemonEndpoints, NodeSystemInfo,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta, OwnerReference, Time};
use kube::api::{Api, Patch, PatchParams, PostParams};
use serde_json::json;
use tokio::sync::watch;

/// Namespace of the node heartbeat Leases (the controller reads the same one).
pub const NODE_LEASE_NAMESPACE: &str = "kube-node-lease";

/// What this kubelet reports as its version: the Kubernetes API version it speaks, marked local.
pub const KUBELET_VERSION: &str = "v1.33.0-automigrate-local";

/// The thresholds below which the node reports memory or disk pressure (the real kubelet's
/// hard eviction thresholds `memory.available` and `nodefs.available`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Thresholds {
    pub memory_available_bytes: u64,
    pub nodefs_available_percent: u64,
}

impl Default for Thresholds {
    /// The kubelet's defaults: `memory.available<100Mi`, `nodefs.available<10%`.
    fn default() -> Self {
        Self {
            memory_available_bytes: 100 << 20,
            nodefs_available_percent: 10,
        }
    }
}

impl std::str::FromStr for Thresholds {
    type Err = String;

    /// The kubelet's `--eviction-hard` syntax for the two signals used here, e.g.
    /// `memory.available<100Mi,nodefs.available<10%`; a signal left out keeps its default.
    fn from_str(text: &str) -> Result<Self, String> {
        let mut thresholds = Self::default();
        for entry in text.split(',').map(str::trim).filter(|e| !e.is_empty()) {
            let (signal, value) = entry
                .split_once('<')
                .ok_or_else(|| format!("`{entry}`: expected <signal><<value>"))?;
            match signal {
                "memory.available" => {
                    thresholds.memory_available_bytes = parse_bytes(value)
                        .ok_or_else(|| format!("`{value}`: expected a quantity like 100Mi"))?;
                }
                "nodefs.available" => {
                    thresholds.nodefs_available_percent = value
                        .strip_suffix('%')
                        .and_then(|number| number.parse().ok())
                        .ok_or_else(|| format!("`{value}`: expected a percentage like 10%"))?;
                }
                other => return Err(format!("unsupported eviction signal `{other}`")),
            }
        }
        Ok(thresholds)
    }
}

fn parse_bytes(text: &str) -> Option<u64> {
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let number: u64 = number.parse().ok()?;
    let factor: u64 = match unit {
        "" => 1,
        "Ki" => 1 << 10,
        "Mi" => 1 << 20,
        "Gi" => 1 << 30,
        "k" => 1_000,
        "M" => 1_000_000,
        "G" => 1_000_000_000,
        _ => return None,
    };
    number.checked_mul(factor)
}

#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    #[error("API request `{what}` failed: {source}")]
    Api {
        what: &'static str,
        source: kube::Error,
    },
}

fn api(what: &'static str) -> impl FnOnce(kube::Error) -> NodeError {
    move |source| NodeError::Api { what, source }
}

/// How this node presents itself.
#[derive(Debug, Clone, PartialEq)]
pub struct NodeConfig {
    pub name: String,
    /// The node's address (`InternalIP`), also every pod's `hostIP`.
    pub address: String,
    /// Port of this kubelet's API (`status.daemonEndpoints.kubeletEndpoint`).
    pub port: u16,
    /// Labels set at registration (`kubernetes.io/hostname`, `kubernetes.io/os`, `kubernetes.io/arch` are added).
    pub labels: BTreeMap<String, String>,
    /// The kubelet's root directory: its disk decides DiskPressure.
    pub root_dir: PathBuf,
    pub status_update_interval: Duration,
    pub lease_renew_interval: Duration,
    pub lease_duration_seconds: i32,
    /// `containerRuntimeVersion` in nodeInfo, e.g. `runc://1.1.5`.
    pub runtime_version: String,
    pub thresholds: Thresholds,
}

impl NodeConfig {
    pub fn new(name: impl Into<String>, address: impl Into<String>, root_dir: PathBuf) -> Self {
        Self {
            name: name.into(),
            address: address.into(),
            port: 10250,
            labels: BTreeMap::new(),
            root_dir,
            status_update_interval: Duration::from_secs(10),
            lease_renew_interval: Duration::from_secs(10),
            lease_duration_seconds: 40,
            runtime_version: "runc://unknown".to_string(),
            thresholds: Thresholds::default(),
        }
    }
}

/// One condition as the kubelet decides it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decided {
    pub kind: &'static str,
    pub status: &'static str,
    pub reason: &'static str,
    pub message: String,
}

/// The node's conditions from what the kernel reports, with the real kubelet's reasons.
pub fn decide_conditions(root_dir: &Path, thresholds: &Thresholds) -> Vec<Decided> {
    let memory_low = mem_available().is_some_and(|bytes| bytes < thresholds.memory_available_bytes);
    let disk_low = disk_available_percent(root_dir)
        .is_some_and(|percent| percent < thresholds.nodefs_available_percent);
    vec![
        if memory_low {
            Decided {
                kind: "MemoryPressure",
                status: "True",
                reason: "KubeletHasInsufficientMemory",
                message: "kubelet has insufficient memory available".into(),
            }
        } else {
            Decided {
                kind: "MemoryPressure",
                status: "False",
                reason: "KubeletHasSufficientMemory",
                message: "kubelet has sufficient memory available".into(),
            }
        },
        if disk_low {
            Decided {
                kind: "DiskPressure",
                status: "True",
                reason: "KubeletHasDiskPressure",
                message: "kubelet has disk pressure".into(),
            }
        } else {
            Decided {
                kind: "DiskPressure",
                status: "False",
                reason: "KubeletHasNoDiskPressure",
                message: "kubelet has no disk pressure".into(),
            }
        },
        Decided {
            kind: "PIDPressure",
            status: "False",
            reason: "KubeletHasSufficientPID",
            message: "kubelet has sufficient PID available".into(),
        },
        Decided {
            kind: "NetworkUnavailable",
            status: "False",
            reason: "NodeNetworkReady",
            message: "the node's network namespace is set up".into(),
        },
        Decided {
            kind: "Ready",
            status: "True",
            reason: "KubeletReady",
            message: "kubelet is posting ready status".into(),
        },
    ]
}

/// The new condition list: `lastHeartbeatTime` is now, `lastTransitionTime` is kept while the
/// status stays the same (what the controller uses as "since"). Conditions of types the kubelet
/// does not decide (a node-problem-detector's `KernelDeadlock`, `ReadonlyFilesystem`, ...) are
/// kept as they are, after the kubelet's own: the real kubelet patches only its own types, and
/// the whole list is written here, so dropping them would erase another writer's report.
pub fn merge_conditions(
    previous: &[NodeCondition],
    decided: &[Decided],
    now: Timestamp,
) -> Vec<NodeCondition> {
    let foreign = previous
        .iter()
        .filter(|old| !decided.iter().any(|condition| condition.kind == old.type_))
        .cloned();
    decided
        .iter()
        .map(|condition| {
            let transition = previous
                .iter()
                .find(|old| old.type_ == condition.kind && old.status == condition.status)
                .and_then(|old| old.last_transition_time.clone())
                .unwrap_or(Time(now));
            NodeCondition {
                type_: condition.kind.to_string(),
                status: condition.status.to_string(),
                reason: Some(condition.reason.to_string()),
                message: Some(condition.message.clone()),
                last_heartbeat_time: Some(Time(now)),
                last_transition_time: Some(transition),
            }
        })
        .chain(foreign)
        .collect()
}

fn read_trimmed(path: &str) -> Option<String> {
    std::fs::read_to_string(path)
        .ok()
        .map(|text| text.trim().to_string())
}

fn meminfo(field: &str) -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    text.lines().find_map(|line| {
        let rest = line.strip_prefix(field)?.strip_prefix(':')?;
        let kib: u64 = rest.trim().trim_end_matches("kB").trim().parse().ok()?;
        Some(kib * 1024)
    })
}

fn mem_available() -> Option<u64> {
    meminfo("MemAvailable")
}

fn disk_available_percent(dir: &Path) -> Option<u64> {
    let stat = nix::sys::statvfs::statvfs(dir).ok()?;
    let total = stat.blocks();
    (total > 0).then(|| stat.blocks_available() * 100 / total)
}

fn os_image() -> String {
    std::fs::read_to_string("/etc/os-release")
        .ok()
        .and_then(|text| {
            text.lines().find_map(|line| {
                line.strip_prefix("PRETTY_NAME=")
                    .map(|value| value.trim_matches('"').to_string())
            })
        })
        .unwrap_or_else(|| "Linux".to_string())
}

fn architecture() -> &'static str {
    match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        other => other,
    }
}

/// The Node's status fields other than conditions.
fn status_body(config: &NodeConfig, conditions: &[NodeCondition]) -> serde_json::Value {
    let cpus = std::thread::available_parallelism().map_or(1, std::num::NonZero::get);
    let memory = meminfo("MemTotal").unwrap_or(0);
    let resources: BTreeMap<String, Quantity> = BTreeMap::from([
        ("cpu".to_string(), Quantity(cpus.to_string())),
        (
            "memory".to_string(),
            Quantity(format!("{}Ki", memory / 1024)),
        ),
        ("pods".to_string(), Quantity("110".to_string())),
    ]);
    let info = NodeSystemInfo {
        architecture: architecture().to_string(),
        boot_id: read_trimmed("/proc/sys/kernel/random/boot_id").unwrap_or_default(),
        container_runtime_version: config.runtime_version.clone(),
        kernel_version: read_trimmed("/proc/sys/kernel/osrelease").unwrap_or_default(),
        kube_proxy_version: String::new(),
        kubelet_version: KUBELET_VERSION.to_string(),
        machine_id: read_trimmed("/etc/machine-id").unwrap_or_default(),
        operating_system: "linux".to_string(),
        os_image: os_image(),
        system_uuid: String::new(),
        swap: None,
    };
    json!({
        "status": {
            "addresses": [
                NodeAddress { type_: "InternalIP".into(), address: config.address.clone() },
                NodeAddress { type_: "Hostname".into(), address: config.name.clone() },
            ],
            "capacity": resources,
            "allocatable": resources,
            "conditions": conditions,
            "daemonEndpoints": NodeDaemonEndpoints {
                kubelet_endpoint: Some(DaemonEndpoint { port: i32::from(config.port) }),
            },
            "nodeInfo": info,
        }
    })
}

/// Registers the Node (or finds it already registered) and posts a first status.
#[tracing::instrument(skip_all, fields(node = %config.name))]
pub async fn register(client: &kube::Client, config: &NodeConfig) -> Result<Node, NodeError> {
    let nodes: Api<Node> = Api::all(client.clone());
    let mut labels = config.labels.clone();
    labels.insert("kubernetes.io/hostname".into(), config.name.clone());
    labels.insert("kubernetes.io/os".into(), "linux".into());
    labels.insert("kubernetes.io/arch".into(), architecture().into());
    let node = Node {
        metadata: ObjectMeta {
            name: Some(config.name.clone()),
            labels: Some(labels),
            ..ObjectMeta::default()
        },
        ..Node::default()
    };
    match nodes.create(&PostParams::default(), &node).await {
        Ok(_) => tracing::info!("node registered"),
        Err(kube::Error::Api(status)) if status.code == 409 => {
            tracing::info!("node already registered; taking it over");
        }
        Err(source) => {
            return Err(NodeError::Api {
                what: "create node",
                source,
            });
        }
    }
    update_status(client, config).await
}

/// One status update: conditions decided now, merged with the stored ones.
pub async fn update_status(client: &kube::Client, config: &NodeConfig) -> Result<Node, NodeError> {
    let nodes: Api<Node> = Api::all(client.clone());
    let current = nodes.get(&config.name).await.map_err(api("get node"))?;
    let previous = current
        .status
        .as_ref()
        .and_then(|status| status.conditions.clone())
        .unwrap_or_default();
    let conditions = merge_conditions(
        &previous,
        &decide_conditions(&config.root_dir, &config.thresholds),
        Timestamp::now(),
    );
    nodes
        .patch_status(
            &config.name,
            &PatchParams::default(),
            &Patch::Merge(status_body(config, &conditions)),
        )
        .await
        .map_err(api("patch node status"))
}

/// Renews (or creates) this node's Lease.
pub async fn renew_lease(
    client: &kube::Client,
    config: &NodeConfig,
    node_uid: Option<&str>,
) -> Result<Lease, NodeError> {
    let leases: Api<Lease> = Api::namespaced(client.clone(), NODE_LEASE_NAMESPACE);
    let now = MicroTime(Timestamp::now());
    let spec = |old: Option<LeaseSpec>| LeaseSpec {
        holder_identity: Some(config.name.clone()),
        lease_duration_seconds: Some(config.lease_duration_seconds),
        renew_time: Some(now.clone()),
        ..old.unwrap_or_default()
    };
    match leases
        .get_opt(&config.name)
        .await
        .map_err(api("get lease"))?
    {
        Some(mut lease) => {
            lease.spec = Some(spec(lease.spec.take()));
            leases
                .replace(&config.name, &PostParams::default(), &lease)
                .await
                .map_err(api("renew lease"))
        }
        None => {
            let owner = node_uid.map(|uid| {
                vec![OwnerReference {
                    api_version: "v1".into(),
                    kind: "Node".into(),
                    name: config.name.clone(),
                    uid: uid.to_string(),
                    ..OwnerReference::default()
                }]
            });
            let lease = Lease {
                metadata: ObjectMeta {
                    name: Some(config.name.clone()),
                    namespace: Some(NODE_LEASE_NAMESPACE.into()),
                    owner_references: owner,
                    ..ObjectMeta::default()
                },
                spec: Some(spec(None)),
            };
            leases
                .create(&PostParams::default(), &lease)
                .await
                .map_err(api("create lease"))
        }
    }
}

/// Registers the node, then keeps its status and Lease current until `shutdown` turns true.
/// Failed writes are logged and retried on the next tick, as the real kubelet does.
pub async fn run(
    client: kube::Client,
    config: NodeConfig,
    mut shutdown: watch::Receiver<bool>,
) -> Result<(), NodeError> {
    let node = register(&client, &config).await?;
    let uid = node.metadata.uid.clone();
    let mut status_tick = tokio::time::interval(config.status_update_interval);
    let mut lease_tick = tokio::time::interval(config.lease_renew_interval);
    status_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    lease_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // The first status tick fires at once; registration just posted one.
    status_tick.tick().await;
    loop {
        tokio::select! {
            () = crate::pods::stopped(&mut shutdown) => return Ok(()),
            _ = status_tick.tick() => {
                if let Err(error) = update_status(&client, &config).await {
                    tracing::warn!(%error, "node status update failed; retrying next tick");
                }
            }
            _ = lease_tick.tick() => {
                if let Err(error) = renew_lease(&client, &config, uid.as_deref()).await {
                    tracing::warn!(%error, "lease renewal failed; retrying next tick");
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status_of(decided: &[Decided], kind: &str) -> &'static str {
        decided.iter().find(|c| c.kind == kind).unwrap().status
    }

    #[test]
    fn pressure_follows_the_thresholds() {
        let never = Thresholds {
            memory_available_bytes: 0,
            nodefs_available_percent: 0,
        };
        let always = Thresholds {
            memory_available_bytes: u64::MAX,
            nodefs_available_percent: 101,
        };
        let relaxed = decide_conditions(Path::new("/"), &never);
        assert_eq!(status_of(&relaxed, "MemoryPressure"), "False");
        assert_eq!(status_of(&relaxed, "DiskPressure"), "False");
        let strict = decide_conditions(Path::new("/"), &always);
        assert_eq!(status_of(&strict, "MemoryPressure"), "True");
        assert_eq!(status_of(&strict, "DiskPressure"), "True");
        assert_eq!(status_of(&strict, "Ready"), "True");
    }

    #[test]
    fn eviction_hard_syntax() {
        let parsed: Thresholds = "memory.available<1Gi,nodefs.available<5%".parse().unwrap();
        assert_eq!(
            parsed,
            Thresholds {
                memory_available_bytes: 1 << 30,
                nodefs_available_percent: 5
            }
        );
        assert_eq!(
            "nodefs.available<0%"
                .parse::<Thresholds>()
                .unwrap()
                .memory_available_bytes,
            100 << 20
        );
        assert!("imagefs.available<15%".parse::<Thresholds>().is_err());
        assert!("memory.available<lots".parse::<Thresholds>().is_err());
    }

    fn at(seconds: i64) -> Timestamp {
        Timestamp::from_second(1_900_000_000 + seconds).unwrap()
    }

    #[test]
    fn transition_time_is_kept_while_the_status_holds() {
        let ready = |status: &'static str| Decided {
            kind: "Ready",
            status,
            reason: "KubeletReady",
            message: String::new(),
        };
        let first = merge_conditions(&[], &[ready("True")], at(0));
        let second = merge_conditions(&first, &[ready("True")], at(10));
        assert_eq!(second[0].last_transition_time, Some(Time(at(0))));
        assert_eq!(second[0].last_heartbeat_time, Some(Time(at(10))));
        let third = merge_conditions(&second, &[ready("False")], at(20));
        assert_eq!(third[0].last_transition_time, Some(Time(at(20))));
    }

    #[test]
    fn conditions_another_writer_reported_are_kept() {
        let ready = Decided {
            kind: "Ready",
            status: "True",
            reason: "KubeletReady",
            message: String::new(),
        };
        let first = merge_conditions(&[], std::slice::from_ref(&ready), at(0));
        // What a node-problem-detector adds to the Node's status.
        let mut reported = first.clone();
        reported.push(NodeCondition {
            type_: "KernelDeadlock".into(),
            status: "True".into(),
            reason: Some("DockerHung".into()),
            message: Some("task docker:7 blocked for more than 120 seconds".into()),
            last_heartbeat_time: Some(Time(at(5))),
            last_transition_time: Some(Time(at(5))),
        });
        let next = merge_conditions(&reported, std::slice::from_ref(&ready), at(10));
        let types: Vec<&str> = next.iter().map(|c| c.type_.as_str()).collect();
        assert_eq!(types, ["Ready", "KernelDeadlock"]);
        assert_eq!(next[1], reported[1], "the other writer's condition changed");
        assert_eq!(next[0].last_heartbeat_time, Some(Time(at(10))));
    }

    #[test]
    fn a_healthy_host_reports_every_condition() {
        let kinds: Vec<_> = decide_conditions(Path::new("/"), &Thresholds::default())
            .iter()
            .map(|c| c.kind)
            .collect();
        assert_eq!(
            kinds,
            [
                "MemoryPressure",
                "DiskPressure",
                "PIDPressure",
                "NetworkUnavailable",
                "Ready"
            ]
        );
    }
}
