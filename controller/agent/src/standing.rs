//! What self-fencing ([`crate::fence`]) acts through on a real node: reading this node's
//! heartbeat (its Lease) and protected pods from the API server, asking the peers, and killing
//! containers with runc.
//!
//! **The peer question.** An agent that cannot read its own Lease asks every peer, over UDP on
//! the probe port, "do you reach the API server, and what is my heartbeat?". The peer reads the
//! asker's Lease (`get` on `leases` in `kube-node-lease`) and answers with the `renewTime` it
//! saw, or that it does not reach the API server. Both messages carry a BLAKE3 MAC keyed from
//! the agents' shared API token, and the answer echoes the question's random nonce: a forged
//! answer could hold a fence back, so unauthenticated answers are dropped (and without a token
//! peers are not asked). A replayed or slow answer can only carry an older heartbeat, which
//! the state machine never lets age a fresher one. The asker computes the heartbeat's age with
//! its own clock, the clock of the kubelet that wrote it.
//!
//! Request: `AMSTAND1` | nonce (8) | name length (1) | asker node | MAC (32).
//! Answer: `AMSTANR1` | nonce (8) | reaches (1) | renewTime µs since the epoch (8, i64) |
//! name length (1) | answering node | MAC (32).

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use jiff::Timestamp;
use tokio::net::UdpSocket;

use crate::fence::{Observation, Standing, Stopper};
use crate::kubeapi::ApiServerTransport;
use crate::prober::PeerSource;

pub const REQUEST_MAGIC: &[u8; 8] = b"AMSTAND1";
pub const ANSWER_MAGIC: &[u8; 8] = b"AMSTANR1";
const MAC_LEN: usize = 32;
/// The namespace of node Leases.
pub const NODE_LEASE_NAMESPACE: &str = "kube-node-lease";
/// The annotation that protects a pod (`automigrate.dev/protect: "true"`).
pub const PROTECT_ANNOTATION: &str = automigrate_core::annotations::PROTECT;

#[derive(Debug, thiserror::Error)]
pub enum StandingError {
    #[error("malformed message")]
    Malformed,
    #[error("bad MAC")]
    BadMac,
}

/// The key both sides of the peer question use, derived from the agents' shared token.
#[derive(Clone)]
pub struct PeerKey([u8; 32]);

impl std::fmt::Debug for PeerKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("PeerKey(..)")
    }
}

impl PeerKey {
    pub fn from_token(token: &str) -> Self {
        Self(blake3::derive_key(
            "automigrate 2026 self-fence peer standing v1",
            token.as_bytes(),
        ))
    }

    fn mac(&self, message: &[u8]) -> blake3::Hash {
        blake3::keyed_hash(&self.0, message)
    }

    fn seal(&self, mut message: Vec<u8>) -> Vec<u8> {
        let mac = self.mac(&message);
        message.extend_from_slice(mac.as_bytes());
        message
    }

    /// The message without its MAC, if the MAC is right (compared in constant time).
    fn open<'a>(&self, sealed: &'a [u8]) -> Result<&'a [u8], StandingError> {
        if sealed.len() < MAC_LEN {
            return Err(StandingError::Malformed);
        }
        let (message, mac) = sealed.split_at(sealed.len() - MAC_LEN);
        let mac: [u8; MAC_LEN] = mac.try_into().map_err(|_| StandingError::Malformed)?;
        if self.mac(message) == blake3::Hash::from_bytes(mac) {
            Ok(message)
        } else {
            Err(StandingError::BadMac)
        }
    }
}

fn push_name(buffer: &mut Vec<u8>, name: &str) -> Result<(), StandingError> {
    let length = u8::try_from(name.len()).map_err(|_| StandingError::Malformed)?;
    buffer.push(length);
    buffer.extend_from_slice(name.as_bytes());
    Ok(())
}

fn take_name(rest: &[u8]) -> Result<(String, &[u8]), StandingError> {
    let (&length, rest) = rest.split_first().ok_or(StandingError::Malformed)?;
    let length = usize::from(length);
    if rest.len() < length {
        return Err(StandingError::Malformed);
    }
    let (name, rest) = rest.split_at(length);
    let name = std::str::from_utf8(name).map_err(|_| StandingError::Malformed)?;
    Ok((name.to_string(), rest))
}

fn take8(rest: &[u8]) -> Result<([u8; 8], &[u8]), StandingError> {
    if rest.len() < 8 {
        return Err(StandingError::Malformed);
    }
    let (head, rest) = rest.split_at(8);
    Ok((head.try_into().map_err(|_| StandingError::Malformed)?, rest))
}

pub fn encode_request(key: &PeerKey, nonce: u64, asker: &str) -> Result<Vec<u8>, StandingError> {
    let mut message = REQUEST_MAGIC.to_vec();
    message.extend_from_slice(&nonce.to_be_bytes());
    push_name(&mut message, asker)?;
    Ok(key.seal(message))
}

/// The nonce and the asking node.
pub fn decode_request(key: &PeerKey, sealed: &[u8]) -> Result<(u64, String), StandingError> {
    let message = key.open(sealed)?;
    let rest = message
        .strip_prefix(REQUEST_MAGIC.as_slice())
        .ok_or(StandingError::Malformed)?;
    let (nonce, rest) = take8(rest)?;
    let (asker, rest) = take_name(rest)?;
    if !rest.is_empty() {
        return Err(StandingError::Malformed);
    }
    Ok((u64::from_be_bytes(nonce), asker))
}

/// A peer's answer: the asker's heartbeat as the peer read it, or `None`: no API server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Answer {
    pub nonce: u64,
    pub peer: String,
    pub renewed: Option<Timestamp>,
}

pub fn encode_answer(key: &PeerKey, answer: &Answer) -> Result<Vec<u8>, StandingError> {
    let mut message = ANSWER_MAGIC.to_vec();
    message.extend_from_slice(&answer.nonce.to_be_bytes());
    message.push(u8::from(answer.renewed.is_some()));
    let micros = answer.renewed.map_or(0, |time| time.as_microsecond());
    message.extend_from_slice(&micros.to_be_bytes());
    push_name(&mut message, &answer.peer)?;
    Ok(key.seal(message))
}

pub fn decode_answer(key: &PeerKey, sealed: &[u8]) -> Result<Answer, StandingError> {
    let message = key.open(sealed)?;
    let rest = message
        .strip_prefix(ANSWER_MAGIC.as_slice())
        .ok_or(StandingError::Malformed)?;
    let (nonce, rest) = take8(rest)?;
    let (&reaches, rest) = rest.split_first().ok_or(StandingError::Malformed)?;
    let (micros, rest) = take8(rest)?;
    let (peer, rest) = take_name(rest)?;
    if !rest.is_empty() || reaches > 1 {
        return Err(StandingError::Malformed);
    }
    let renewed = if reaches == 1 {
        Some(
            Timestamp::from_microsecond(i64::from_be_bytes(micros))
                .map_err(|_| StandingError::Malformed)?,
        )
    } else {
        None
    };
    Ok(Answer {
        nonce: u64::from_be_bytes(nonce),
        peer,
        renewed,
    })
}

/// A protected pod on this node, as last listed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProtectedPod {
    pub namespace: String,
    pub name: String,
    pub uid: String,
    pub containers: Vec<String>,
    /// `status.containerStatuses[].containerID` by container name, as the kubelet last wrote
    /// it (`<runtime>://<id>`): the runtime's id of the container, which is runc's id under
    /// the runtime's runc root (containerd's `/run/containerd/runc/k8s.io`, CRI-O's
    /// `/run/runc`). Raw; [`runtime_id`] checks it before it reaches runc.
    pub container_ids: BTreeMap<String, String>,
}

/// This node's view of the API server: its Lease and its protected pods.
#[derive(Debug, Clone)]
pub struct ApiView {
    pub api: ApiServerTransport,
}

impl ApiView {
    /// The `renewTime` of `node`'s Lease.
    pub async fn renewed(&self, node: &str) -> Result<Timestamp, String> {
        let path =
            format!("/apis/coordination.k8s.io/v1/namespaces/{NODE_LEASE_NAMESPACE}/leases/{node}");
        let response = self
            .api
            .get(&path)
            .await
            .map_err(|error| error.to_string())?;
        if response.status != 200 {
            return Err(format!("GET {path}: HTTP {}", response.status));
        }
        let lease: serde_json::Value =
            serde_json::from_str(&response.body).map_err(|error| format!("Lease: {error}"))?;
        lease["spec"]["renewTime"]
            .as_str()
            .ok_or_else(|| "the Lease has no renewTime".to_string())?
            .parse::<Timestamp>()
            .map_err(|error| format!("renewTime: {error}"))
    }

    /// The pods on `node` annotated `automigrate.dev/protect: "true"`.
    pub async fn protected_pods(&self, node: &str) -> Result<Vec<ProtectedPod>, String> {
        let path = format!("/api/v1/pods?fieldSelector=spec.nodeName%3D{node}");
        let response = self
            .api
            .get(&path)
            .await
            .map_err(|error| error.to_string())?;
        if response.status != 200 {
            return Err(format!("GET {path}: HTTP {}", response.status));
        }
        let list: serde_json::Value =
            serde_json::from_str(&response.body).map_err(|error| format!("pods: {error}"))?;
        Ok(parse_protected(&list, node))
    }
}

/// The protected pods of a pod list that run on `node`.
pub fn parse_protected(list: &serde_json::Value, node: &str) -> Vec<ProtectedPod> {
    let text = |value: &serde_json::Value| value.as_str().unwrap_or_default().to_string();
    list["items"]
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or_default()
        .iter()
        .filter(|pod| pod["spec"]["nodeName"].as_str() == Some(node))
        .filter(|pod| pod["metadata"]["annotations"][PROTECT_ANNOTATION].as_str() == Some("true"))
        .map(|pod| ProtectedPod {
            namespace: text(&pod["metadata"]["namespace"]),
            name: text(&pod["metadata"]["name"]),
            uid: text(&pod["metadata"]["uid"]),
            containers: pod["spec"]["containers"]
                .as_array()
                .map(Vec::as_slice)
                .unwrap_or_default()
                .iter()
                .map(|container| text(&container["name"]))
                .collect(),
            container_ids: pod["status"]["containerStatuses"]
                .as_array()
                .map(Vec::as_slice)
                .unwrap_or_default()
                .iter()
                .filter_map(|status| {
                    Some((
                        status["name"].as_str()?.to_string(),
                        status["containerID"].as_str()?.to_string(),
                    ))
                })
                .collect(),
        })
        .collect()
}

/// Answers peers' questions about their standing (wired into the probe responder).
#[derive(Debug, Clone)]
pub struct StandingService {
    pub node: String,
    pub key: PeerKey,
    pub view: ApiView,
    /// At most this many questions are answered at once (each is an API read).
    pub slots: Arc<tokio::sync::Semaphore>,
}

impl StandingService {
    /// Answers one question (if it is authentic) on `socket`, in the background.
    pub fn answer(&self, socket: Arc<UdpSocket>, question: Vec<u8>, from: SocketAddr) {
        let Ok((nonce, asker)) = decode_request(&self.key, &question) else {
            return;
        };
        let Ok(slot) = self.slots.clone().try_acquire_owned() else {
            return;
        };
        let service = self.clone();
        tokio::spawn(async move {
            let _slot = slot;
            let renewed = service.view.renewed(&asker).await.ok();
            let answer = Answer {
                nonce,
                peer: service.node.clone(),
                renewed,
            };
            if let Ok(sealed) = encode_answer(&service.key, &answer)
                && let Err(error) = socket.send_to(&sealed, from).await
            {
                tracing::debug!(%error, %from, "standing answer failed");
            }
        });
    }
}

/// The real [`Standing`]: this node's Lease from the API server, the peers over UDP. Each
/// successful read also refreshes the list of protected pods the [`RuncStopper`] kills.
#[derive(Debug)]
pub struct NodeStanding {
    pub node: String,
    pub view: ApiView,
    pub peers: PeerSource,
    /// `None`: no token, so peers' answers could not be trusted and they are not asked.
    pub key: Option<PeerKey>,
    pub answer_timeout: Duration,
    pub protected: Arc<Mutex<Vec<ProtectedPod>>>,
    pub pods_every: u32,
    pub reads: Mutex<u32>,
}

impl Standing for NodeStanding {
    async fn own_heartbeat_age(&self) -> Result<Duration, String> {
        let renewed = self.view.renewed(&self.node).await?;
        let due = self
            .reads
            .lock()
            .map(|mut reads| {
                *reads = reads.wrapping_add(1);
                *reads % self.pods_every.max(1) == 1 || self.pods_every <= 1
            })
            .unwrap_or(true);
        if due {
            match self.view.protected_pods(&self.node).await {
                Ok(pods) => {
                    if let Ok(mut protected) = self.protected.lock() {
                        *protected = pods;
                    }
                }
                Err(error) => tracing::debug!(%error, "listing protected pods failed"),
            }
        }
        Ok(age_of(renewed, Timestamp::now()))
    }

    async fn ask_peers(&self) -> Vec<Observation> {
        let Some(key) = &self.key else {
            return Vec::new();
        };
        let peers = match self.peers.load().await {
            Ok(peers) => peers,
            Err(error) => {
                tracing::warn!(%error, "cannot read the peer list to ask about standing");
                return Vec::new();
            }
        };
        let mut asked = tokio::task::JoinSet::new();
        for peer in peers {
            let key = key.clone();
            let node = self.node.clone();
            let timeout = self.answer_timeout;
            asked.spawn(async move { ask_one(&key, &node, &peer.address, timeout).await });
        }
        let mut observations = Vec::new();
        while let Some(joined) = asked.join_next().await {
            if let Ok(Some(answer)) = joined {
                observations.push(match answer.renewed {
                    Some(renewed) => Observation::PeerSawHeartbeat {
                        peer: answer.peer,
                        age: age_of(renewed, Timestamp::now()),
                    },
                    None => Observation::PeerNoApi { peer: answer.peer },
                });
            }
        }
        observations
    }
}

/// `now - renewed`, zero for a heartbeat from the future.
pub fn age_of(renewed: Timestamp, now: Timestamp) -> Duration {
    automigrate_core::units::age(now, renewed)
}

fn fresh_nonce() -> u64 {
    let mut bytes = [0u8; 8];
    if ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut bytes).is_err() {
        // Without randomness a nonce from the clock still separates questions.
        return u64::try_from(Timestamp::now().as_nanosecond()).unwrap_or_default();
    }
    u64::from_be_bytes(bytes)
}

/// Asks one peer; its authentic answer to this very question, if it comes in time.
pub async fn ask_one(
    key: &PeerKey,
    node: &str,
    address: &str,
    timeout: Duration,
) -> Option<Answer> {
    let target = tokio::net::lookup_host(address).await.ok()?.next()?;
    let bind: SocketAddr = if target.is_ipv4() {
        ([0, 0, 0, 0], 0).into()
    } else {
        (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
    };
    let socket = UdpSocket::bind(bind).await.ok()?;
    socket.connect(target).await.ok()?;
    let nonce = fresh_nonce();
    socket
        .send(&encode_request(key, nonce, node).ok()?)
        .await
        .ok()?;
    let deadline = tokio::time::Instant::now() + timeout;
    let mut buffer = [0u8; 512];
    loop {
        let len = tokio::time::timeout_at(deadline, socket.recv(&mut buffer))
            .await
            .ok()?
            .ok()?;
        if let Ok(answer) = decode_answer(key, &buffer[..len])
            && answer.nonce == nonce
        {
            return Some(answer);
        }
    }
}

/// Kills protected pods' containers with `runc kill` (SIGKILL) and waits until runc reports
/// them stopped. A container's runc id is the one its pod's status last gave
/// (`containerStatuses[].containerID`, see [`runtime_id`]), kept from the last successful pod
/// list so that the kill works while the node is cut off; without one (no status yet, or a
/// malformed id) it comes from a template: `{namespace}`, `{pod}`, `{container}`, `{uid8}` (the
/// first 8 alphanumerics of the pod's uid). Besides, runc's state is scanned on every stop and
/// keep-down for containers labelled with a condemned pod's uid and container name
/// ([`labelled_containers`]): the kubelet may restart one under a new id while the node is cut
/// off. A stop succeeds only when runc has
/// shown every listed protected container and says it is stopped (or it was since deleted):
/// an id runc never finds, or a `runc state` that fails otherwise, fails the stop.
#[derive(Debug)]
pub struct RuncStopper {
    pub runc: String,
    pub root: Option<std::path::PathBuf>,
    pub template: String,
    pub protected: Arc<Mutex<Vec<ProtectedPod>>>,
    pub condemned: Mutex<BTreeSet<String>>,
    pub stop_time: Duration,
    /// Ids runc has shown at least once: one of these that is gone now was removed (after it
    /// stopped); a protected pod's id runc never showed is a container it cannot see.
    pub found: Mutex<BTreeSet<String>>,
    /// (pod uid, container name) of every container it condemned: runc state is scanned for
    /// them on every stop and keep-down (see [`labelled_containers`]), so a container the
    /// kubelet (re)started under a new id is found too.
    pub condemned_pods: Mutex<BTreeSet<PodContainer>>,
}

/// What runc says about one container id.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum RuncState {
    /// Running, paused or created.
    Live,
    Stopped,
    /// "container does not exist".
    Missing,
}

/// The runc id of a pod's container under `template`.
pub fn container_id(template: &str, pod: &ProtectedPod, container: &str) -> String {
    let uid8: String = pod
        .uid
        .chars()
        .filter(char::is_ascii_alphanumeric)
        .take(8)
        .collect();
    template
        .replace("{namespace}", &pod.namespace)
        .replace("{pod}", &pod.name)
        .replace("{container}", container)
        .replace("{uid8}", &uid8)
}

/// The runc id in a `containerID` (`containerd://<64 hex>`, `cri-o://<id>`, the local
/// kubelet's `runc://<id>`): the part after `<scheme>://`, if it is a plain runc argument — only
/// `[A-Za-z0-9_.-]`, not starting with `-` (runc would read an option), not `.` or `..` (a path
/// under the runc root), at most 1024 bytes. Anything else is refused (`None`): the kill falls
/// back to the template id, and if runc does not find that either the stop fails.
pub fn runtime_id(container_id: &str) -> Option<&str> {
    let (scheme, id) = container_id.split_once("://")?;
    (!scheme.is_empty() && plain_id(id)).then_some(id)
}

/// (pod uid, container name): a pod's container across its restarts.
pub type PodContainer = (String, String);

/// Whether `id` is a plain runc argument (see [`runtime_id`]).
fn plain_id(id: &str) -> bool {
    let plain = |byte: u8| byte.is_ascii_alphanumeric() || matches!(byte, b'_' | b'.' | b'-');
    !id.is_empty()
        && id.len() <= 1024
        && id.bytes().all(plain)
        && !id.starts_with('-')
        && id != "."
        && id != ".."
}

/// The containers under the runc root `root` (`<id>/state.json`) whose labels — the OCI
/// annotations the runtime set, which runc keeps as `key=value` in `config.labels` — name one
/// of `wanted` (pod uid, container name): containerd's `io.kubernetes.cri.sandbox-uid` and
/// `io.kubernetes.cri.container-name`, or `io.kubernetes.pod.uid` and
/// `io.kubernetes.container.name`. A pod's sandbox (pause) container has no container name and
/// never matches. Read from the node alone, so it finds a container the kubelet started while
/// the node was cut off, whose id no pod status gave. As (id, (uid, container)).
pub fn labelled_containers(
    root: &std::path::Path,
    wanted: &BTreeSet<PodContainer>,
) -> Vec<(String, PodContainer)> {
    let Ok(entries) = std::fs::read_dir(root) else {
        return Vec::new();
    };
    let mut matched = Vec::new();
    for entry in entries.flatten() {
        let id = entry.file_name().to_string_lossy().to_string();
        if !plain_id(&id) {
            continue;
        }
        let Ok(text) = std::fs::read_to_string(entry.path().join("state.json")) else {
            continue;
        };
        let Ok(state) = serde_json::from_str::<serde_json::Value>(&text) else {
            continue;
        };
        let labels: BTreeMap<&str, &str> = state["config"]["labels"]
            .as_array()
            .map(Vec::as_slice)
            .unwrap_or_default()
            .iter()
            .filter_map(|label| label.as_str()?.split_once('='))
            .collect();
        let label = |keys: [&str; 2]| keys.iter().find_map(|key| labels.get(key).copied());
        let (Some(uid), Some(container)) = (
            label(["io.kubernetes.cri.sandbox-uid", "io.kubernetes.pod.uid"]),
            label([
                "io.kubernetes.cri.container-name",
                "io.kubernetes.container.name",
            ]),
        ) else {
            continue;
        };
        let key = (uid.to_string(), container.to_string());
        if wanted.contains(&key) {
            matched.push((id, key));
        }
    }
    matched.sort();
    matched
}

/// The runc id the kill uses for `container` of `pod`: the id its status gave, else the
/// template's (see [`RuncStopper`]).
pub fn kill_id(template: &str, pod: &ProtectedPod, container: &str) -> String {
    pod.container_ids
        .get(container)
        .and_then(|raw| runtime_id(raw))
        .map_or_else(|| container_id(template, pod, container), str::to_string)
}

impl RuncStopper {
    /// The condemned pods' containers runc state shows now, added to the condemned ids.
    fn scan_condemned(&self) -> Result<Vec<(String, PodContainer)>, String> {
        let wanted = self
            .condemned_pods
            .lock()
            .map_err(|_| "condemned pod list poisoned".to_string())?
            .clone();
        if wanted.is_empty() {
            return Ok(Vec::new());
        }
        let root = self
            .root
            .clone()
            .unwrap_or_else(|| std::path::PathBuf::from(DEFAULT_RUNC_ROOT));
        let scanned = labelled_containers(&root, &wanted);
        self.condemned
            .lock()
            .map_err(|_| "condemned list poisoned".to_string())?
            .extend(scanned.iter().map(|(id, _)| id.clone()));
        Ok(scanned)
    }

    async fn runc(&self, args: &[&str]) -> Result<std::process::Output, String> {
        let mut command = tokio::process::Command::new(&self.runc);
        if let Some(root) = &self.root {
            command.arg("--root").arg(root);
        }
        command
            .args(args)
            .kill_on_drop(true)
            .output()
            .await
            .map_err(|error| format!("{}: {error}", self.runc))
    }

    /// What runc says of `id`. Any failure other than "does not exist" (no permission, a
    /// missing root) is an error: it confirms nothing.
    async fn state(&self, id: &str) -> Result<RuncState, String> {
        let output = self.runc(&["state", id]).await?;
        if !output.status.success() {
            let stderr = String::from_utf8_lossy(&output.stderr);
            if stderr.contains("does not exist") {
                return Ok(RuncState::Missing);
            }
            return Err(format!("runc state {id}: {}", stderr.trim()));
        }
        if let Ok(mut found) = self.found.lock() {
            found.insert(id.to_string());
        }
        let state: serde_json::Value = serde_json::from_slice(&output.stdout)
            .map_err(|error| format!("runc state {id}: {error}"))?;
        Ok(if state["status"].as_str() == Some("stopped") {
            RuncState::Stopped
        } else {
            RuncState::Live
        })
    }

    /// Whether runc knows `id` as a live (running, paused or created) container.
    async fn live(&self, id: &str) -> Result<bool, String> {
        Ok(self.state(id).await? == RuncState::Live)
    }

    /// Kills every live container of `ids`; `Ok(killed)` once none is live, within the stop
    /// time.
    async fn kill_all(&self, ids: &BTreeSet<String>) -> Result<usize, String> {
        let mut killed = 0;
        let mut live = Vec::new();
        for id in ids {
            if self.live(id).await? {
                let output = self.runc(&["kill", id, "KILL"]).await?;
                if !output.status.success() && self.live(id).await? {
                    return Err(format!(
                        "runc kill {id}: {}",
                        String::from_utf8_lossy(&output.stderr).trim()
                    ));
                }
                killed += 1;
                live.push(id.clone());
            }
        }
        let deadline = tokio::time::Instant::now() + self.stop_time;
        for id in live {
            while self.live(&id).await? {
                if tokio::time::Instant::now() >= deadline {
                    return Err(format!("{id} still runs after SIGKILL"));
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
        Ok(killed)
    }
}

impl Stopper for RuncStopper {
    async fn stop_protected(&self) -> Result<usize, String> {
        // (pod, id, (uid, container)) of every container of a protected pod the API server
        // listed here.
        let listed: Vec<(String, String, PodContainer)> = self
            .protected
            .lock()
            .map_err(|_| "protected pod list poisoned".to_string())?
            .iter()
            .flat_map(|pod| {
                pod.containers
                    .iter()
                    .map(|container| {
                        (
                            format!("{}/{}", pod.namespace, pod.name),
                            kill_id(&self.template, pod, container),
                            (pod.uid.clone(), container.clone()),
                        )
                    })
                    .collect::<Vec<_>>()
            })
            .collect();
        self.condemned_pods
            .lock()
            .map_err(|_| "condemned pod list poisoned".to_string())?
            .extend(
                listed
                    .iter()
                    .filter(|(_, _, (uid, _))| !uid.is_empty())
                    .map(|(_, _, key)| key.clone()),
            );
        let scanned = self.scan_condemned()?;
        let all = {
            let mut condemned = self
                .condemned
                .lock()
                .map_err(|_| "condemned list poisoned".to_string())?;
            condemned.extend(listed.iter().map(|(_, id, _)| id.clone()));
            condemned.clone()
        };
        let killed = self.kill_all(&all).await?;
        // A listed container runc never showed may run where runc cannot see it (a stale or
        // missing status id and a template that does not match, another runc root): nothing
        // confirms it stopped, so the stop failed (retried, and overdue starves the watchdog) —
        // never "fenced".
        let found = self
            .found
            .lock()
            .map_err(|_| "found list poisoned".to_string())?
            .clone();
        // A container runc showed under the pod's labels counts as seen (the status id may be
        // stale: the kubelet restarted it while the node was cut off).
        let seen_by_label: BTreeSet<&PodContainer> = scanned
            .iter()
            .filter(|(id, _)| found.contains(id))
            .map(|(_, key)| key)
            .collect();
        let unseen: Vec<String> = listed
            .iter()
            .filter(|(_, id, key)| !found.contains(id) && !seen_by_label.contains(key))
            .map(|(pod, id, _)| format!("pod {pod} (runc id {id})"))
            .collect();
        if unseen.is_empty() {
            Ok(killed)
        } else {
            Err(format!(
                "{killed} container(s) killed, but runc does not find {}: it cannot confirm they are stopped",
                unseen.join(", ")
            ))
        }
    }

    async fn keep_down(&self) -> Result<usize, String> {
        self.scan_condemned()?;
        let all = self
            .condemned
            .lock()
            .map_err(|_| "condemned list poisoned".to_string())?
            .clone();
        self.kill_all(&all).await
    }
}

/// runc's root when none is given.
pub const DEFAULT_RUNC_ROOT: &str = "/run/runc";

/// Containers under the runc root whose init pid (`init_process_pid` in `state.json`) `proc`
/// does not show: the agent is not in the host PID namespace (no hostPID), so runc reports
/// running containers "stopped" and `runc kill` cannot reach them. (A container that exited
/// and was not yet deleted is listed too; the warning says so.)
pub fn invisible_containers(root: &std::path::Path, proc: &std::path::Path) -> Vec<String> {
    let Ok(entries) = std::fs::read_dir(root) else {
        return Vec::new();
    };
    let mut invisible = Vec::new();
    for entry in entries.flatten() {
        let Ok(text) = std::fs::read_to_string(entry.path().join("state.json")) else {
            continue;
        };
        let Ok(state) = serde_json::from_str::<serde_json::Value>(&text) else {
            continue;
        };
        let pid = state["init_process_pid"].as_u64().unwrap_or_default();
        if pid > 0 && !proc.join(pid.to_string()).exists() {
            invisible.push(format!(
                "{} (pid {pid})",
                entry.file_name().to_string_lossy()
            ));
        }
    }
    invisible.sort();
    invisible
}

/// Self-fencing as the daemon runs it.
#[derive(Debug, Clone)]
pub struct SelfFenceOptions {
    pub timing: automigrate_core::fencing::SelfFenceTiming,
    /// Off: the agent only logs when it would fence.
    pub enabled: bool,
    /// The API server, with a per-request timeout of half a check interval.
    pub view: ApiView,
    /// From the agents' shared token; `None`: peers are neither asked nor answered.
    pub key: Option<PeerKey>,
    pub runc: String,
    pub runc_root: Option<std::path::PathBuf>,
    /// runc id template of a protected pod's container (see [`container_id`]).
    pub container_id: String,
    /// The hardware watchdog device, if it is to be used (the last resort).
    pub watchdog: Option<std::path::PathBuf>,
}

impl SelfFenceOptions {
    /// The answering side, wired into the probe responder.
    pub fn service(&self, node: &str) -> Option<StandingService> {
        Some(StandingService {
            node: node.to_string(),
            key: self.key.clone()?,
            view: self.view.clone(),
            slots: Arc::new(tokio::sync::Semaphore::new(16)),
        })
    }

    /// Runs the self-fencing loop until `shutdown`.
    pub async fn run(
        self,
        node: String,
        peers: PeerSource,
        metrics: crate::metrics::AgentMetrics,
        shutdown: tokio::sync::watch::Receiver<bool>,
    ) {
        let protected = Arc::new(Mutex::new(Vec::new()));
        let standing = NodeStanding {
            node,
            view: self.view,
            peers,
            key: self.key,
            answer_timeout: self.timing.check_interval / 2,
            protected: protected.clone(),
            pods_every: 1,
            reads: Mutex::new(0),
        };
        let stopper = RuncStopper {
            runc: self.runc,
            root: self.runc_root,
            template: self.container_id,
            protected,
            condemned: Mutex::new(BTreeSet::new()),
            condemned_pods: Mutex::new(BTreeSet::new()),
            stop_time: self.timing.stop_time,
            found: Mutex::new(BTreeSet::new()),
        };
        let machine = crate::fence::SelfFence::new(self.timing, self.enabled, Duration::ZERO);
        let interval = self.timing.check_interval;
        let watchdog: Box<dyn crate::fence::Watchdog> = match &self.watchdog {
            Some(path) => match crate::fence::DeviceWatchdog::open(path) {
                Ok(device) => Box::new(device),
                Err(error) => {
                    tracing::error!(%error, "cannot open the watchdog; self-fencing without it");
                    Box::new(crate::fence::NoWatchdog)
                }
            },
            None => Box::new(crate::fence::NoWatchdog),
        };
        if self.enabled {
            let root = stopper
                .root
                .clone()
                .unwrap_or_else(|| DEFAULT_RUNC_ROOT.into());
            let invisible = invisible_containers(&root, std::path::Path::new("/proc"));
            if !invisible.is_empty() {
                tracing::error!(
                    runc_root = %root.display(),
                    containers = %invisible.join(", "),
                    "SELF-FENCING CANNOT KILL CONTAINERS: the init processes of containers under the runc root are not visible in /proc, so this agent is not in the host PID namespace (run it with hostPID) — runc reports them stopped and cannot kill them (or they exited and were not deleted yet)"
                );
            }
        }
        tracing::info!(
            enabled = self.enabled,
            self_fence_after = %automigrate_core::units::format_duration(self.timing.self_fence_after),
            peers_asked = standing.key.is_some(),
            "self-fencing watches this node's heartbeat"
        );
        crate::fence::FenceLoop {
            machine,
            standing,
            stopper,
            watchdog,
            metrics: Some(metrics),
        }
        .run(interval, shutdown)
        .await;
    }
}

/// Peers by node, for tests and logs.
pub fn by_node(answers: &[Answer]) -> BTreeMap<String, Option<Timestamp>> {
    answers
        .iter()
        .map(|answer| (answer.peer.clone(), answer.renewed))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn questions_and_answers_round_trip_and_refuse_tampering() {
        let key = PeerKey::from_token("0123456789abcdef-token");
        let request = encode_request(&key, 42, "node-a").unwrap();
        assert_eq!(
            decode_request(&key, &request).unwrap(),
            (42, "node-a".into())
        );
        let other = PeerKey::from_token("another-token-0123456789");
        assert!(matches!(
            decode_request(&other, &request),
            Err(StandingError::BadMac)
        ));
        let mut tampered = request.clone();
        tampered[9] ^= 1;
        assert!(decode_request(&key, &tampered).is_err());

        let renewed: Timestamp = "2026-12-06T15:00:00.123456Z".parse().unwrap();
        for renewed in [Some(renewed), None] {
            let answer = Answer {
                nonce: 42,
                peer: "node-b".into(),
                renewed,
            };
            let sealed = encode_answer(&key, &answer).unwrap();
            assert_eq!(decode_answer(&key, &sealed).unwrap(), answer);
            // An answer is not a question and the other way round.
            assert!(decode_request(&key, &sealed).is_err());
            assert!(decode_answer(&other, &sealed).is_err());
            let mut forged = sealed.clone();
            forged[17] ^= 0x55;
            assert!(decode_answer(&key, &forged).is_err(), "forged renewTime");
        }
        assert!(decode_answer(&key, &request).is_err());
        assert!(decode_answer(&key, b"short").is_err());
    }

    #[test]
    fn only_protected_pods_of_this_node_are_listed() {
        let list = serde_json::json!({"items": [
            {"metadata": {"namespace": "ml", "name": "trainer", "uid": "1a2b-3c4d-5e6f",
                          "annotations": {"automigrate.dev/protect": "true"}},
             "spec": {"nodeName": "node-a", "containers": [{"name": "main"}, {"name": "side"}]}},
            {"metadata": {"namespace": "ml", "name": "web", "uid": "u2"},
             "spec": {"nodeName": "node-a", "containers": [{"name": "main"}]}},
            {"metadata": {"namespace": "ml", "name": "other", "uid": "u3",
                          "annotations": {"automigrate.dev/protect": "true"}},
             "spec": {"nodeName": "node-b", "containers": [{"name": "main"}]}}
        ]});
        let pods = parse_protected(&list, "node-a");
        assert_eq!(pods.len(), 1);
        assert_eq!(pods[0].containers, ["main", "side"]);
        assert_eq!(
            container_id("{namespace}_{pod}_{container}_{uid8}", &pods[0], "main"),
            "ml_trainer_main_1a2b3c4d"
        );
        assert_eq!(
            container_id("{namespace}-{pod}-{container}", &pods[0], "side"),
            "ml-trainer-side"
        );
    }

    /// A peer answers with the asker's heartbeat from the API server; a peer that cannot read
    /// it says so; a wrong key gets no answer at all.
    #[tokio::test]
    async fn a_peer_answers_with_the_heartbeat_it_reads() {
        use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
        // A one-request API server with node-a's Lease.
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let api = format!("http://{}", listener.local_addr().unwrap());
        let server = tokio::spawn(async move {
            let (mut stream, _) = listener.accept().await.unwrap();
            let mut request = Vec::new();
            let mut buffer = [0u8; 4096];
            while !request.windows(4).any(|window| window == b"\r\n\r\n") {
                let read = stream.read(&mut buffer).await.unwrap();
                request.extend_from_slice(&buffer[..read]);
            }
            let body = r#"{"spec":{"renewTime":"2026-12-06T15:00:00.500000Z"}}"#;
            let answer = format!(
                "HTTP/1.1 200 OK\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                body.len()
            );
            stream.write_all(answer.as_bytes()).await.unwrap();
            String::from_utf8(request).unwrap()
        });
        let key = PeerKey::from_token("0123456789abcdef-token");
        let view = |url: &str| ApiView {
            api: ApiServerTransport::new(url, None, None, Duration::from_secs(5)).unwrap(),
        };
        let service = StandingService {
            node: "node-b".into(),
            key: key.clone(),
            view: view(&api),
            slots: Arc::new(tokio::sync::Semaphore::new(4)),
        };
        // The probe responder answers the question (and still echoes probes).
        let socket = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let address = socket.local_addr().unwrap().to_string();
        let serving = tokio::spawn(
            crate::prober::Responder::new(socket)
                .with_standing(service)
                .serve(),
        );
        crate::prober::probe_once(&address, 1, 7, Duration::from_secs(5))
            .await
            .unwrap();
        let answer = ask_one(&key, "node-a", &address, Duration::from_secs(5))
            .await
            .unwrap();
        assert_eq!(answer.peer, "node-b");
        assert_eq!(
            answer.renewed,
            Some("2026-12-06T15:00:00.5Z".parse().unwrap())
        );
        let request = server.await.unwrap();
        assert!(
            request.starts_with(
                "GET /apis/coordination.k8s.io/v1/namespaces/kube-node-lease/leases/node-a "
            ),
            "{request}"
        );
        // The API server is gone now: the peer says it does not reach it.
        let answer = ask_one(&key, "node-a", &address, Duration::from_secs(5))
            .await
            .unwrap();
        assert_eq!(answer.renewed, None);
        // A question under another key is not answered.
        let other = PeerKey::from_token("another-token-0123456789");
        assert!(
            ask_one(&other, "node-a", &address, Duration::from_millis(300))
                .await
                .is_none()
        );
        serving.abort();
    }
    /// A stand-in runc: `state ID` says running until `kill ID KILL` was called (a file per
    /// container under the root), "does not exist" for unknown ids; every call is logged.
    fn fake_runc(dir: &std::path::Path) -> String {
        use std::os::unix::fs::PermissionsExt as _;
        let script = dir.join("runc");
        std::fs::write(
            &script,
            r#"#!/bin/sh
root="$2"; shift 2
echo "$@" >> "$root/calls"
case "$1" in
  state)
    [ -e "$root/$2.exists" ] || { echo "container does not exist" >&2; exit 1; }
    if [ -e "$root/$2.killed" ]; then echo '{"status":"stopped"}'; else echo '{"status":"running"}'; fi ;;
  kill) touch "$root/$2.killed" ;;
esac
"#,
        )
        .unwrap();
        std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
        script.display().to_string()
    }

    /// Fails if the stopper kills a pod that is not protected, misses a container, reports
    /// done before runc says stopped, or forgets what it condemned.
    #[tokio::test]
    async fn the_stopper_kills_protected_containers_and_keeps_condemned_ones_down() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("root");
        std::fs::create_dir(&root).unwrap();
        for id in [
            "ml_trainer_main_1a2b3c4d",
            "ml_trainer_side_1a2b3c4d",
            "ml_web_main_u2",
        ] {
            std::fs::write(root.join(format!("{id}.exists")), "").unwrap();
        }
        let trainer = ProtectedPod {
            namespace: "ml".into(),
            name: "trainer".into(),
            uid: "1a2b-3c4d-5e6f".into(),
            containers: vec!["main".into(), "side".into()],
            container_ids: BTreeMap::new(),
        };
        let protected = Arc::new(Mutex::new(vec![trainer]));
        let stopper = RuncStopper {
            runc: fake_runc(dir.path()),
            root: Some(root.clone()),
            template: "{namespace}_{pod}_{container}_{uid8}".into(),
            protected: protected.clone(),
            condemned: Mutex::new(BTreeSet::new()),
            condemned_pods: Mutex::new(BTreeSet::new()),
            stop_time: Duration::from_secs(10),
            found: Mutex::new(BTreeSet::new()),
        };
        assert_eq!(stopper.stop_protected().await.unwrap(), 2);
        for id in ["ml_trainer_main_1a2b3c4d", "ml_trainer_side_1a2b3c4d"] {
            assert!(root.join(format!("{id}.killed")).exists(), "{id}");
        }
        assert!(
            !root.join("ml_web_main_u2.killed").exists(),
            "unprotected pod killed"
        );
        // Killed already: nothing more to kill.
        assert_eq!(stopper.stop_protected().await.unwrap(), 0);
        // The pod list changes (the trainer is gone from it), the kubelet restarts the
        // container: keeping down still kills it.
        protected.lock().unwrap().clear();
        std::fs::remove_file(root.join("ml_trainer_main_1a2b3c4d.killed")).unwrap();
        assert_eq!(stopper.keep_down().await.unwrap(), 1);
        let calls = std::fs::read_to_string(root.join("calls")).unwrap();
        assert!(
            calls.contains("kill ml_trainer_main_1a2b3c4d KILL"),
            "{calls}"
        );
        assert!(!calls.contains("kill ml_web"), "{calls}");
        // The kubelet deletes a killed container: runc showed it once, so gone is stopped.
        protected.lock().unwrap().push(ProtectedPod {
            namespace: "ml".into(),
            name: "trainer".into(),
            uid: "1a2b-3c4d-5e6f".into(),
            containers: vec!["main".into(), "side".into()],
            container_ids: BTreeMap::new(),
        });
        std::fs::remove_file(root.join("ml_trainer_side_1a2b3c4d.exists")).unwrap();
        assert_eq!(stopper.stop_protected().await.unwrap(), 0);
    }

    /// Fails if a `runc state` that fails for another reason than "does not exist" (no
    /// permission, a wrong root) counts as a stopped container.
    #[tokio::test]
    async fn a_runc_that_cannot_tell_confirms_nothing() {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = tempfile::tempdir().unwrap();
        let script = dir.path().join("runc");
        std::fs::write(
            &script,
            "#!/bin/sh\necho 'open /run/runc/x/state.json: permission denied' >&2\nexit 1\n",
        )
        .unwrap();
        std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
        let stopper = RuncStopper {
            runc: script.display().to_string(),
            root: None,
            template: "{namespace}_{pod}_{container}".into(),
            protected: Arc::new(Mutex::new(Vec::new())),
            condemned: Mutex::new(BTreeSet::from(["ml_trainer_main".to_string()])),
            condemned_pods: Mutex::new(BTreeSet::new()),
            stop_time: Duration::from_secs(10),
            found: Mutex::new(BTreeSet::new()),
        };
        let error = stopper.keep_down().await.unwrap_err();
        assert!(error.contains("permission denied"), "{error}");
    }

    /// The node is cut off for good (no read, no peer answers).
    struct CutOff;

    impl Standing for CutOff {
        async fn own_heartbeat_age(&self) -> Result<Duration, String> {
            Err("timed out".into())
        }
        async fn ask_peers(&self) -> Vec<Observation> {
            Vec::new()
        }
    }

    /// Regression (local cluster): on containerd (hashed ids) or without hostPID runc does not
    /// find the protected pod's container, and the fence reported "self-fenced: 0 protected
    /// container(s) stopped" while it ran on, so the controller started a second copy. Fails
    /// if a protected container runc never found counts as stopped: it must be a failed stop,
    /// retried every check, naming the pod and the id, and overdue after the stop time.
    #[tokio::test]
    async fn a_protected_container_runc_cannot_find_is_a_failed_stop_not_a_fence() {
        use crate::fence::{FenceEvent, FenceLoop, NoWatchdog, SelfFence};
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("root");
        std::fs::create_dir(&root).unwrap();
        // The container runs under a hashed id the template cannot produce.
        std::fs::write(root.join("4f1d9c0e7b.exists"), "").unwrap();
        let trainer = ProtectedPod {
            namespace: "ml".into(),
            name: "trainer".into(),
            uid: "1a2b-3c4d-5e6f".into(),
            containers: vec!["main".into()],
            container_ids: BTreeMap::new(),
        };
        let stopper = RuncStopper {
            runc: fake_runc(dir.path()),
            root: Some(root.clone()),
            template: "{namespace}_{pod}_{container}_{uid8}".into(),
            protected: Arc::new(Mutex::new(vec![trainer])),
            condemned: Mutex::new(BTreeSet::new()),
            condemned_pods: Mutex::new(BTreeSet::new()),
            stop_time: Duration::from_secs(10),
            found: Mutex::new(BTreeSet::new()),
        };
        let second = Duration::from_secs(1);
        let timing = automigrate_core::fencing::SelfFenceTiming {
            self_fence_after: 4 * second,
            stop_time: 2 * second,
            clock_skew: second,
            margin: second,
            heartbeat_interval: second,
            check_interval: second,
        };
        let mut fence = FenceLoop {
            machine: SelfFence::new(timing, true, Duration::ZERO),
            standing: CutOff,
            stopper,
            watchdog: NoWatchdog,
            metrics: None,
        };
        let mut events = Vec::new();
        let mut petted_after_stop_time = false;
        for step in 0..8u32 {
            let report = fence.check(step * second).await;
            // No heartbeat ever: the fence begins at the startup grace (3 s); stop time 2 s.
            if step * second >= 5 * second {
                petted_after_stop_time |= report.petted;
            }
            events.extend(report.events);
        }
        assert!(
            !events
                .iter()
                .any(|event| matches!(event, FenceEvent::Fenced { .. })),
            "{events:?}"
        );
        let failed: Vec<&String> = events
            .iter()
            .filter_map(|event| match event {
                FenceEvent::StopFailed { error } => Some(error),
                _ => None,
            })
            .collect();
        assert_eq!(failed.len(), 5, "retried every check: {events:?}");
        assert!(
            failed[0].contains("ml/trainer") && failed[0].contains("ml_trainer_main_1a2b3c4d"),
            "{}",
            failed[0]
        );
        assert!(
            events
                .iter()
                .any(|event| matches!(event, FenceEvent::StopOverdue { .. })),
            "{events:?}"
        );
        assert!(!petted_after_stop_time, "watchdog still fed");
    }

    /// The containerd id of the trainer's main container in the tests below.
    const HASH: &str = "4f1d9c0e7b2a61d8c3e5f7a9b0c2d4e6f8a1b3c5d7e9f0a2b4c6d8e0f1a3b5c7";

    /// A pod list as the API server gives it on a containerd node: the trainer's main
    /// container has a hashed id, its side container none yet.
    fn containerd_pod_list() -> serde_json::Value {
        serde_json::json!({"items": [
            {"metadata": {"namespace": "ml", "name": "trainer", "uid": "1a2b-3c4d-5e6f",
                          "annotations": {"automigrate.dev/protect": "true"}},
             "spec": {"nodeName": "node-a", "containers": [{"name": "main"}, {"name": "side"}]},
             "status": {"containerStatuses": [
                 {"name": "main", "containerID": format!("containerd://{HASH}")},
                 {"name": "side"}]}}
        ]})
    }

    /// Fails if the kill does not use the id from the pod's status (containerd's hashes, which
    /// no template yields), or if a container without one does not fall back to the template.
    #[tokio::test]
    async fn the_kill_uses_container_ids_from_the_pod_status() {
        let pods = parse_protected(&containerd_pod_list(), "node-a");
        assert_eq!(pods.len(), 1);
        let template = "{namespace}_{pod}_{container}_{uid8}";
        assert_eq!(kill_id(template, &pods[0], "main"), HASH);
        assert_eq!(
            kill_id(template, &pods[0], "side"),
            "ml_trainer_side_1a2b3c4d"
        );
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("root");
        std::fs::create_dir(&root).unwrap();
        for id in [HASH, "ml_trainer_side_1a2b3c4d"] {
            std::fs::write(root.join(format!("{id}.exists")), "").unwrap();
        }
        let stopper = RuncStopper {
            runc: fake_runc(dir.path()),
            root: Some(root.clone()),
            template: template.into(),
            protected: Arc::new(Mutex::new(pods)),
            condemned: Mutex::new(BTreeSet::new()),
            condemned_pods: Mutex::new(BTreeSet::new()),
            stop_time: Duration::from_secs(10),
            found: Mutex::new(BTreeSet::new()),
        };
        assert_eq!(stopper.stop_protected().await.unwrap(), 2);
        assert!(root.join(format!("{HASH}.killed")).exists());
        assert!(root.join("ml_trainer_side_1a2b3c4d.killed").exists());
    }

    /// Fails if an id that is not a plain runc argument (an option, a path, a shell word) is
    /// passed to runc: it is refused and the template id is used instead.
    #[test]
    fn a_malformed_container_id_is_refused() {
        assert_eq!(runtime_id(&format!("containerd://{HASH}")), Some(HASH));
        assert_eq!(runtime_id("cri-o://abc_1.2-3"), Some("abc_1.2-3"));
        assert_eq!(
            runtime_id("runc://ml_trainer_main_1a2b3c4d"),
            Some("ml_trainer_main_1a2b3c4d")
        );
        for bad in [
            "containerd://",
            "://abc",
            HASH,
            "containerd://--root=/tmp",
            "containerd://..",
            "containerd://.",
            "containerd://../../etc",
            "containerd://a b",
            "containerd://a;reboot",
            "containerd://a/b",
            "containerd://ünïcode",
        ] {
            assert_eq!(runtime_id(bad), None, "{bad}");
        }
        let mut pods = parse_protected(&containerd_pod_list(), "node-a");
        pods[0]
            .container_ids
            .insert("main".into(), "containerd://--root=/tmp".into());
        assert_eq!(
            kill_id("{namespace}_{pod}_{container}_{uid8}", &pods[0], "main"),
            "ml_trainer_main_1a2b3c4d"
        );
    }

    /// A stand-in API server on a loopback port: answers the Lease read and the pod list from
    /// `answers` (path prefix, HTTP status, body), one request a connection, until it is
    /// dropped (aborted).
    async fn fake_api(
        answers: Vec<(&'static str, u16, String)>,
    ) -> (String, tokio::task::JoinHandle<()>) {
        use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let serving = tokio::spawn(async move {
            let answers = Arc::new(answers);
            loop {
                let (mut stream, _) = listener.accept().await.unwrap();
                let answers = answers.clone();
                tokio::spawn(async move {
                    let mut request = Vec::new();
                    let mut buffer = [0u8; 4096];
                    while !request.windows(4).any(|window| window == b"\r\n\r\n") {
                        let read = stream.read(&mut buffer).await.unwrap();
                        if read == 0 {
                            return;
                        }
                        request.extend_from_slice(&buffer[..read]);
                    }
                    let request = String::from_utf8(request).unwrap();
                    let (status, body) = answers
                        .iter()
                        .find(|(prefix, _, _)| request.starts_with(&format!("GET {prefix}")))
                        .map_or((404, String::new()), |(_, status, body)| {
                            (*status, body.clone())
                        });
                    let answer = format!(
                        "HTTP/1.1 {status} X\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                        body.len()
                    );
                    stream.write_all(answer.as_bytes()).await.unwrap();
                });
            }
        });
        (url, serving)
    }

    /// The point of the cache: the kill happens when the agent is cut off. Fails if the ids
    /// learnt while the API server answered are lost when a pod list fails or the API server
    /// is gone, or if the kill then does not use them.
    #[tokio::test]
    async fn the_last_known_ids_are_kept_and_used_when_the_api_server_is_gone() {
        let lease = r#"{"spec":{"renewTime":"2026-12-06T15:00:00Z"}}"#.to_string();
        let standing = |url: &str| NodeStanding {
            node: "node-a".into(),
            view: ApiView {
                api: ApiServerTransport::new(url, None, None, Duration::from_secs(5)).unwrap(),
            },
            peers: PeerSource {
                fixed: Vec::new(),
                file: None,
            },
            key: None,
            answer_timeout: Duration::from_millis(100),
            protected: Arc::new(Mutex::new(Vec::new())),
            pods_every: 1,
            reads: Mutex::new(0),
        };
        // The API server answers: the ids are learnt.
        let (url, serving) = fake_api(vec![
            ("/apis/coordination.k8s.io/", 200, lease.clone()),
            ("/api/v1/pods", 200, containerd_pod_list().to_string()),
        ])
        .await;
        let mut node = standing(&url);
        node.own_heartbeat_age().await.unwrap();
        serving.abort();
        let _ = serving.await;
        let learnt = node.protected.lock().unwrap().clone();
        assert_eq!(
            learnt[0].container_ids["main"],
            format!("containerd://{HASH}")
        );
        // The Lease still reads but the pod list fails: the ids stay.
        let (url, serving) = fake_api(vec![
            ("/apis/coordination.k8s.io/", 200, lease),
            ("/api/v1/pods", 500, "{}".into()),
        ])
        .await;
        let protected = node.protected.clone();
        node = NodeStanding {
            protected: protected.clone(),
            ..standing(&url)
        };
        node.own_heartbeat_age().await.unwrap();
        serving.abort();
        let _ = serving.await;
        assert_eq!(*protected.lock().unwrap(), learnt);
        // The API server is gone: no read, the ids stay, and the kill uses them.
        assert!(node.own_heartbeat_age().await.is_err());
        assert_eq!(*protected.lock().unwrap(), learnt);
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("root");
        std::fs::create_dir(&root).unwrap();
        for id in [HASH, "ml_trainer_side_1a2b3c4d"] {
            std::fs::write(root.join(format!("{id}.exists")), "").unwrap();
        }
        let stopper = RuncStopper {
            runc: fake_runc(dir.path()),
            root: Some(root.clone()),
            template: "{namespace}_{pod}_{container}_{uid8}".into(),
            protected,
            condemned: Mutex::new(BTreeSet::new()),
            condemned_pods: Mutex::new(BTreeSet::new()),
            stop_time: Duration::from_secs(10),
            found: Mutex::new(BTreeSet::new()),
        };
        assert_eq!(stopper.stop_protected().await.unwrap(), 2);
        let calls = std::fs::read_to_string(root.join("calls")).unwrap();
        assert!(calls.contains(&format!("kill {HASH} KILL")), "{calls}");
    }

    /// Fails if a container the kubelet (re)starts under a new id — after the kill, or while
    /// the node is cut off, so that the pod status the agent last read names an id runc no
    /// longer has — is not found through its runc labels and killed, or if the pod's sandbox
    /// or another pod's container is.
    #[tokio::test]
    async fn a_container_restarted_under_a_new_id_is_found_by_its_labels() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("root");
        std::fs::create_dir(&root).unwrap();
        // A runc container: the fake runc's marker and runc's state.json with the labels.
        let container = |id: &str, labels: &[&str]| {
            std::fs::write(root.join(format!("{id}.exists")), "").unwrap();
            std::fs::create_dir(root.join(id)).unwrap();
            let mut labels: Vec<String> = labels.iter().map(|label| label.to_string()).collect();
            labels.push(format!(
                "bundle=/run/containerd/io.containerd.runtime.v2.task/k8s.io/{id}"
            ));
            std::fs::write(
                root.join(id).join("state.json"),
                serde_json::json!({"id": id, "config": {"labels": labels}}).to_string(),
            )
            .unwrap();
        };
        let trainer_main = [
            "io.kubernetes.cri.container-type=container",
            "io.kubernetes.cri.sandbox-uid=1a2b-3c4d-5e6f",
            "io.kubernetes.cri.container-name=main",
        ];
        container("aaaa1111", &trainer_main);
        container(
            "pause0000",
            &[
                "io.kubernetes.cri.container-type=sandbox",
                "io.kubernetes.cri.sandbox-uid=1a2b-3c4d-5e6f",
            ],
        );
        container(
            "other0000",
            &[
                "io.kubernetes.cri.sandbox-uid=9999-other",
                "io.kubernetes.cri.container-name=main",
            ],
        );
        let trainer = |id: &str| ProtectedPod {
            namespace: "ml".into(),
            name: "trainer".into(),
            uid: "1a2b-3c4d-5e6f".into(),
            containers: vec!["main".into()],
            container_ids: BTreeMap::from([("main".to_string(), format!("containerd://{id}"))]),
        };
        let stopper = |protected: ProtectedPod| RuncStopper {
            runc: fake_runc(dir.path()),
            root: Some(root.clone()),
            template: "{namespace}_{pod}_{container}_{uid8}".into(),
            protected: Arc::new(Mutex::new(vec![protected])),
            condemned: Mutex::new(BTreeSet::new()),
            condemned_pods: Mutex::new(BTreeSet::new()),
            stop_time: Duration::from_secs(10),
            found: Mutex::new(BTreeSet::new()),
        };
        let fence = stopper(trainer("aaaa1111"));
        assert_eq!(fence.stop_protected().await.unwrap(), 1);
        // The kubelet deletes the killed container and starts the next one under a new id.
        std::fs::remove_file(root.join("aaaa1111.exists")).unwrap();
        std::fs::remove_dir_all(root.join("aaaa1111")).unwrap();
        container("bbbb2222", &trainer_main);
        assert_eq!(fence.keep_down().await.unwrap(), 1);
        assert!(root.join("bbbb2222.killed").exists());
        // Cut off before the restart: the status id is gone, the new container is found.
        std::fs::remove_file(root.join("bbbb2222.killed")).unwrap();
        let late = stopper(trainer("aaaa1111"));
        assert_eq!(late.stop_protected().await.unwrap(), 1);
        assert!(root.join("bbbb2222.killed").exists());
        assert!(!root.join("pause0000.killed").exists(), "sandbox killed");
        assert!(
            !root.join("other0000.killed").exists(),
            "another pod killed"
        );
    }

    /// Fails if a container whose init pid /proc does not show (the agent is not in the host
    /// PID namespace) goes unreported, or a visible one is reported.
    #[test]
    fn containers_whose_pid_is_not_visible_are_reported() {
        let dir = tempfile::tempdir().unwrap();
        let state = |id: &str, pid: u64| {
            std::fs::create_dir(dir.path().join(id)).unwrap();
            std::fs::write(
                dir.path().join(id).join("state.json"),
                serde_json::json!({"id": id, "init_process_pid": pid}).to_string(),
            )
            .unwrap();
        };
        state("visible", u64::from(std::process::id()));
        // Above any pid_max (2^22).
        state("invisible", 999_999_999);
        assert_eq!(
            invisible_containers(dir.path(), std::path::Path::new("/proc")),
            ["invisible (pid 999999999)"]
        );
        assert!(
            invisible_containers(&dir.path().join("nope"), std::path::Path::new("/proc"))
                .is_empty()
        );
    }
}
