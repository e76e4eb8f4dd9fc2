//! Scenario and policy files: what a simulation run is, as YAML.
//!
//! Two kinds of scenario: a [`ClusterScenario`] describes a whole cluster over time (topology,
//! failure process, workload, users) for the discrete-event simulator; a [`PaperScenario`]
//! describes the seed paper's two testbed experiments with every assumption the reproduction
//! needs. A [`SimPolicy`] file pairs a recovery behaviour the simulator models (what Kubernetes
//! does on its own, or the automigrate controller) with the `automigrate_core::Policy` document
//! the engine is given. Field names are `camelCase` like the engine's own documents, and unknown
//! fields are rejected with their path, so a typo in a scenario fails loudly.

use std::path::{Path, PathBuf};
use std::time::Duration;

use automigrate_core::model::Resources;
use automigrate_core::policy::{Policy, from_yaml_with_path};
use automigrate_core::transfer::TransferSettings;
use automigrate_core::units::{self, BitRate, Bytes};
use serde::Deserialize;

/// Why a scenario or policy file could not be used.
#[derive(Debug, thiserror::Error)]
pub enum ScenarioError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {field}: {reason}")]
    Parse {
        path: PathBuf,
        field: String,
        reason: String,
    },
    #[error("{path}: {reason}")]
    Invalid { path: PathBuf, reason: String },
}

pub(crate) fn read(path: &Path) -> Result<String, ScenarioError> {
    std::fs::read_to_string(path).map_err(|source| ScenarioError::Read {
        path: path.to_path_buf(),
        source,
    })
}

pub(crate) fn parse<T: serde::de::DeserializeOwned>(
    path: &Path,
    text: &str,
) -> Result<T, ScenarioError> {
    from_yaml_with_path(text).map_err(|(field, reason)| ScenarioError::Parse {
        path: path.to_path_buf(),
        field,
        reason,
    })
}

fn invalid(path: &Path, reason: impl Into<String>) -> ScenarioError {
    ScenarioError::Invalid {
        path: path.to_path_buf(),
        reason: reason.into(),
    }
}

/// Bytes per second from a rate written as e.g. `479MB/s`.
pub fn bytes_per_second(rate: BitRate) -> f64 {
    rate.0 as f64 / 8.0
}

/// The CRIU cost model: how long a dump, a restore and a fresh start take.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CriuSpec {
    /// Rate at which CRIU writes a memory image to local disk while the task is frozen.
    pub dump_rate: BitRate,
    /// Rate at which CRIU reads a memory image back and maps it.
    pub restore_rate: BitRate,
    /// Freezing the cgroup, collecting the task tree and writing metadata, per dump.
    #[serde(with = "units::duration")]
    pub freeze_overhead: Duration,
    /// Creating and starting a container whose image is already on the node.
    #[serde(with = "units::duration")]
    pub container_start: Duration,
    /// Rate at which a fresh process loads its framework from the container image.
    pub image_load_rate: BitRate,
    /// After a dump, the agent hashes (BLAKE3) and fsyncs the archive before it can be sent or
    /// restored: a fixed cost per archive, plus its bytes at `sealRate`. The workload is not
    /// frozen for it. Zero (the default) leaves sealing out of the model.
    #[serde(default, with = "units::duration")]
    pub seal_overhead: Duration,
    #[serde(default)]
    pub seal_rate: Option<BitRate>,
}

impl CriuSpec {
    /// Time the workload is frozen to dump `bytes`.
    pub fn dump_time(&self, bytes: u64) -> Duration {
        self.freeze_overhead + secs(bytes as f64 / bytes_per_second(self.dump_rate).max(1.0))
    }

    /// Time from the end of the freeze to a sealed archive of `bytes` that can be sent.
    pub fn seal_time(&self, bytes: u64) -> Duration {
        match self.seal_rate {
            Some(rate) => self.seal_overhead + secs(bytes as f64 / bytes_per_second(rate).max(1.0)),
            None => self.seal_overhead,
        }
    }

    /// A migration's final stop-and-dump: the workload is stopped for the dump and stays
    /// stopped while the archive is sealed.
    pub fn final_dump_time(&self, bytes: u64) -> Duration {
        self.dump_time(bytes) + self.seal_time(bytes)
    }

    /// Time from "start the replacement" to "it runs", restoring `bytes` of memory image.
    pub fn restore_time(&self, bytes: u64) -> Duration {
        self.container_start + secs(bytes as f64 / bytes_per_second(self.restore_rate).max(1.0))
    }

    /// Time for a new container to start training from nothing: start it, then load the
    /// framework from its image.
    pub fn fresh_start_time(&self, container_image: u64) -> Duration {
        self.container_start
            + secs(container_image as f64 / bytes_per_second(self.image_load_rate).max(1.0))
    }
}

pub(crate) fn secs(value: f64) -> Duration {
    if value.is_finite() && value > 0.0 {
        Duration::try_from_secs_f64(value).unwrap_or(Duration::MAX)
    } else {
        Duration::ZERO
    }
}

// ----------------------------------------------------------------------------------------------
// Cluster scenarios

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ClusterSpec {
    pub nodes: usize,
    /// Edge cells, on a ring: the RTT between two nodes grows with the cells between them.
    pub cells: usize,
    pub allocatable: Resources,
    #[serde(with = "units::duration")]
    pub intra_cell_rtt: Duration,
    #[serde(with = "units::duration")]
    pub rtt_per_hop: Duration,
    pub bandwidth: BitRate,
    pub loss: f64,
    /// Peers each node's agent probes (half in its own cell); only these links are in the
    /// snapshot, as in a real cluster.
    pub probes_per_node: usize,
    #[serde(with = "units::duration")]
    pub heartbeat: Duration,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum FailureModel {
    Exponential,
    Weibull,
    /// Failures read from a CSV file (`node,failAtSeconds,repairAtSeconds,warnAtSeconds`).
    Trace,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PrecursorSpec {
    /// Share of failures that a degradation signal announces.
    pub probability: f64,
    /// Mean time from the signal to the failure (exponential).
    #[serde(with = "units::duration")]
    pub lead_mean: Duration,
    /// The node condition the signal sets to True (as node-problem-detector would).
    pub condition: String,
    /// Signals that no failure follows, per node and year.
    pub false_alarms_per_node_year: f64,
    #[serde(with = "units::duration")]
    pub false_alarm_duration: Duration,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct FailureSpec {
    pub model: FailureModel,
    /// Mean time between failures of one node.
    #[serde(with = "units::duration")]
    pub mtbf: Duration,
    /// Weibull shape (ignored by the exponential model).
    #[serde(default = "one")]
    pub shape: f64,
    #[serde(with = "units::duration")]
    pub repair_median: Duration,
    pub repair_sigma: f64,
    /// CSV trace, relative to the scenario file, for `model: trace`.
    #[serde(default)]
    pub trace: Option<String>,
    pub precursor: PrecursorSpec,
}

fn one() -> f64 {
    1.0
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct JobClass {
    pub name: String,
    pub weight: f64,
    /// Median uninterrupted training time (log-normal).
    #[serde(with = "units::duration")]
    pub duration_median: Duration,
    pub duration_sigma: f64,
    /// CRIU memory image of the training process.
    pub memory_image: Bytes,
    pub container_image: Bytes,
    /// Share of the memory image an incremental dump rewrites.
    pub dirty_fraction: f64,
    pub requests: Resources,
    /// Id of a dataset in `workload.datasets`.
    pub dataset: String,
    /// Share of jobs whose results go to a moving edge user.
    #[serde(default)]
    pub user_fraction: f64,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct DatasetSpec {
    pub id: String,
    pub total_bytes: Bytes,
    pub files: u64,
    /// Nodes holding a copy when the run starts.
    pub replicas: usize,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct WorkloadSpec {
    /// Jobs arriving over the horizon (a Poisson process conditioned on this count).
    pub jobs: usize,
    pub classes: Vec<JobClass>,
    pub datasets: Vec<DatasetSpec>,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct UserSpec {
    /// Mean pause between two moves (random waypoint over cells).
    #[serde(with = "units::duration")]
    pub move_mean: Duration,
    #[serde(with = "units::duration")]
    pub access_latency: Duration,
    #[serde(with = "units::duration")]
    pub latency_per_hop: Duration,
}

/// What the transfer engine costs beyond the link model's fluid streams (measured by the
/// transfer benchmark; see `scale-1000.yaml`). The default adds nothing.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TransferCost {
    /// Share of the link rate that carries payload when the link is the bottleneck (TCP/IP
    /// headers, the engine's framing).
    pub payload_share: f64,
    /// Fixed cost of one transfer: hashing before sending, the receiver's final commit.
    #[serde(with = "units::duration")]
    pub setup: Duration,
    /// Round trips of one transfer beyond the two handshake round trips the link model
    /// already charges per connection (TLS, the manifest, slow start).
    pub setup_rtts: f64,
    /// Per file: the receiver's check, fsync and rename.
    #[serde(with = "units::duration")]
    pub per_file: Duration,
}

impl Default for TransferCost {
    fn default() -> Self {
        Self {
            payload_share: 1.0,
            setup: Duration::ZERO,
            setup_rtts: 0.0,
            per_file: Duration::ZERO,
        }
    }
}

impl TransferCost {
    /// What a transfer of `files` files over a path of `rtt` costs on top of its streams.
    pub fn overhead(&self, rtt: Duration, files: usize) -> Duration {
        self.setup
            + secs(rtt.as_secs_f64() * self.setup_rtts.max(0.0))
            + self.per_file * u32::try_from(files).unwrap_or(u32::MAX)
    }
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SimSettings {
    /// Checkpoint timers that fall due are handed to the engine in batches of this length.
    #[serde(with = "units::duration")]
    pub checkpoint_batch: Duration,
    /// One round of the stream controller in simulated transfers.
    #[serde(with = "units::duration")]
    pub transfer_round: Duration,
    /// Time from "replacement restored" to "it made progress", for the Verifying phase.
    #[serde(with = "units::duration")]
    pub verify: Duration,
    /// Time to stop and delete a live source pod when fencing it.
    #[serde(with = "units::duration")]
    pub stop_source: Duration,
    /// Stop the run this long after the horizon even if jobs are left.
    #[serde(with = "units::duration")]
    pub drain_limit: Duration,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ClusterScenario {
    pub name: String,
    #[serde(default)]
    pub description: String,
    pub seed: u64,
    /// Jobs arrive within this span.
    #[serde(with = "units::duration")]
    pub horizon: Duration,
    pub cluster: ClusterSpec,
    pub failures: FailureSpec,
    pub workload: WorkloadSpec,
    #[serde(default)]
    pub users: Option<UserSpec>,
    pub criu: CriuSpec,
    /// The transfer engine's costs beyond the link model (none when left out).
    #[serde(default)]
    pub transfer: TransferCost,
    pub settings: SimSettings,
    /// Policy files, relative to the scenario file.
    pub policies: Vec<String>,
    /// Set when loaded: where relative paths start.
    #[serde(skip)]
    pub base_dir: PathBuf,
}

impl ClusterScenario {
    pub fn load(path: &Path) -> Result<Self, ScenarioError> {
        let text = read(path)?;
        let mut scenario: ClusterScenario = parse(path, &text)?;
        scenario.base_dir = path.parent().map(Path::to_path_buf).unwrap_or_default();
        scenario.check(path)?;
        Ok(scenario)
    }

    fn check(&self, path: &Path) -> Result<(), ScenarioError> {
        let cluster = &self.cluster;
        if cluster.nodes == 0 || cluster.cells == 0 || cluster.cells > cluster.nodes {
            return Err(invalid(path, "cluster: need 1 ≤ cells ≤ nodes"));
        }
        if !(0.0..1.0).contains(&cluster.loss) {
            return Err(invalid(path, "cluster.loss must be in [0, 1)"));
        }
        if cluster.heartbeat.is_zero() || cluster.bandwidth.0 == 0 {
            return Err(invalid(
                path,
                "cluster.heartbeat and cluster.bandwidth must be above zero",
            ));
        }
        if self.failures.mtbf.is_zero() || self.failures.shape <= 0.0 {
            return Err(invalid(path, "failures: mtbf and shape must be above zero"));
        }
        if self.failures.model == FailureModel::Trace && self.failures.trace.is_none() {
            return Err(invalid(path, "failures.trace is required for model: trace"));
        }
        let precursor = &self.failures.precursor;
        if !(0.0..=1.0).contains(&precursor.probability)
            || precursor.false_alarms_per_node_year < 0.0
        {
            return Err(invalid(
                path,
                "failures.precursor: probability in [0, 1], rate ≥ 0",
            ));
        }
        if self.workload.classes.is_empty() || self.workload.classes.iter().all(|c| c.weight <= 0.0)
        {
            return Err(invalid(
                path,
                "workload.classes: at least one with weight > 0",
            ));
        }
        for (index, class) in self.workload.classes.iter().enumerate() {
            if !self.workload.datasets.iter().any(|d| d.id == class.dataset) {
                return Err(invalid(
                    path,
                    format!(
                        "workload.classes[{index}].dataset `{}` is not in workload.datasets",
                        class.dataset
                    ),
                ));
            }
            if !(0.0..=1.0).contains(&class.dirty_fraction)
                || !(0.0..=1.0).contains(&class.user_fraction)
            {
                return Err(invalid(
                    path,
                    format!("workload.classes[{index}]: fractions must be in [0, 1]"),
                ));
            }
            if class.requests.shortfall(class.requests).is_some()
                || cluster.allocatable.shortfall(class.requests).is_some()
            {
                return Err(invalid(
                    path,
                    format!("workload.classes[{index}] does not fit on an empty node"),
                ));
            }
        }
        if self.settings.checkpoint_batch.is_zero() || self.settings.transfer_round.is_zero() {
            return Err(invalid(
                path,
                "settings: batch and round must be above zero",
            ));
        }
        if self.policies.is_empty() {
            return Err(invalid(path, "policies: list at least one policy file"));
        }
        Ok(())
    }

    /// The scenario's policies, loaded from their files.
    pub fn load_policies(&self) -> Result<Vec<SimPolicy>, ScenarioError> {
        self.policies
            .iter()
            .map(|file| SimPolicy::load(&self.base_dir.join(file)))
            .collect()
    }

    /// The failure trace rows, for `model: trace`.
    pub fn load_trace(&self) -> Result<Vec<TraceRow>, ScenarioError> {
        let Some(file) = &self.failures.trace else {
            return Ok(Vec::new());
        };
        let path = self.base_dir.join(file);
        parse_trace(&path, &read(&path)?, self.cluster.nodes)
    }
}

/// One failure from a trace: times in seconds from the start of the run.
#[derive(Debug, Clone, PartialEq)]
pub struct TraceRow {
    pub node: usize,
    pub fail_at: f64,
    pub repair_at: f64,
    /// When a degradation signal preceded the failure, if one did.
    pub warn_at: Option<f64>,
}

/// Parses `node,failAtSeconds,repairAtSeconds[,warnAtSeconds]` with a header line.
pub fn parse_trace(path: &Path, text: &str, nodes: usize) -> Result<Vec<TraceRow>, ScenarioError> {
    let mut rows = Vec::new();
    for (line_number, line) in text.lines().enumerate().skip(1) {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let bad = |what: &str| invalid(path, format!("line {}: {what}", line_number + 1));
        let fields: Vec<&str> = line.split(',').map(str::trim).collect();
        if fields.len() < 3 {
            return Err(bad("expected node,failAt,repairAt[,warnAt]"));
        }
        let number = |text: &str| {
            text.parse::<f64>()
                .ok()
                .filter(|v| v.is_finite() && *v >= 0.0)
        };
        let node = fields[0]
            .parse::<usize>()
            .map_err(|_| bad("node is not an index"))?;
        if node >= nodes {
            return Err(bad("node index outside the cluster"));
        }
        let fail_at = number(fields[1]).ok_or_else(|| bad("failAt is not a time"))?;
        let repair_at = number(fields[2]).ok_or_else(|| bad("repairAt is not a time"))?;
        if repair_at <= fail_at {
            return Err(bad("repairAt must come after failAt"));
        }
        let warn_at = match fields.get(3).filter(|text| !text.is_empty()) {
            Some(text) => Some(
                number(text)
                    .filter(|warn| *warn <= fail_at)
                    .ok_or_else(|| bad("warnAt must be a time before failAt"))?,
            ),
            None => None,
        };
        rows.push(TraceRow {
            node,
            fail_at,
            repair_at,
            warn_at,
        });
    }
    Ok(rows)
}

// ----------------------------------------------------------------------------------------------
// Policies

/// What the cluster does on a failure, beyond what the engine policy says.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum Recovery {
    /// Kubernetes alone: evict after the grace period and tolerations, restart from zero.
    KubernetesDefault,
    /// Periodic checkpoints, but recovery is Kubernetes' eviction; the new pod resumes from the
    /// newest stored checkpoint.
    PeriodicOnly,
    /// The automigrate controller: the engine detects failures and degradation and migrates.
    Engine,
    /// SpeCon-like: Kubernetes recovery, plus a speculative migration of each job once its
    /// training progress slows, as SpeCon does to make room for fast-growing jobs.
    SpeconLike,
}

impl Recovery {
    pub fn takes_periodic_checkpoints(self) -> bool {
        matches!(self, Self::PeriodicOnly | Self::Engine)
    }

    pub fn waits_for_eviction(self) -> bool {
        !matches!(self, Self::Engine)
    }
}

/// Kubernetes' own timers (node lifecycle controller and default tolerations).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct EvictionSpec {
    #[serde(with = "units::duration")]
    pub node_monitor_grace: Duration,
    #[serde(with = "units::duration")]
    pub toleration: Duration,
}

impl Default for EvictionSpec {
    fn default() -> Self {
        Self {
            node_monitor_grace: Duration::from_secs(50),
            toleration: Duration::from_secs(300),
        }
    }
}

/// When a SpeCon-like policy decides a job's progress has slowed: a uniform draw per job of the
/// share of its training after which its loss curve flattens.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SpeconSpec {
    pub slow_growth_from: f64,
    pub slow_growth_to: f64,
    /// How often the progress monitor looks at the jobs.
    #[serde(with = "units::duration")]
    pub monitor_period: Duration,
}

/// A policy as the simulator runs it.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SimPolicy {
    /// The engine policy's name too; pods name it in `automigrate.dev/policy`.
    pub name: String,
    pub label: String,
    #[serde(default)]
    pub description: String,
    pub recovery: Recovery,
    #[serde(default)]
    pub kubernetes: EvictionSpec,
    #[serde(default)]
    pub specon: Option<SpeconSpec>,
    /// The engine policy document, exactly as a user would put it in a ConfigMap.
    pub engine: Policy,
}

impl SimPolicy {
    pub fn load(path: &Path) -> Result<Self, ScenarioError> {
        let policy: SimPolicy = parse(path, &read(path)?)?;
        let issues = policy.engine.validate();
        if let Some(issue) = issues.first() {
            return Err(ScenarioError::Parse {
                path: path.to_path_buf(),
                field: format!("engine.{}", issue.path),
                reason: issue.reason.clone(),
            });
        }
        if policy.recovery == Recovery::SpeconLike && policy.specon.is_none() {
            return Err(invalid(
                path,
                "recovery: speconLike needs a `specon` section",
            ));
        }
        Ok(policy)
    }
}

// ----------------------------------------------------------------------------------------------
// The seed paper's experiments

/// The testbed network: AWS t3.large workers, a master in another zone, `tc` delay.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TestbedNetwork {
    /// Sustained bandwidth of a worker's NIC.
    pub capacity: BitRate,
    pub loss: f64,
    /// RTT between the two workers before any delay is added (same zone).
    #[serde(with = "units::duration")]
    pub worker_base_rtt: Duration,
    /// RTT between a worker and the master before any delay is added (other zone).
    #[serde(with = "units::duration")]
    pub master_base_rtt: Duration,
    /// The added delay sits on each worker's egress, so it counts twice between the workers
    /// and once between a worker and the master.
    pub delay_on_worker_egress: bool,
}

impl TestbedNetwork {
    fn link(&self, base: Duration, added: Duration, times: u32) -> crate::network::Link {
        crate::network::Link {
            rtt: base + added * times,
            capacity_bps: self.capacity.0 as f64,
            loss: self.loss,
        }
    }

    /// The worker-to-worker path with `latency` added.
    pub fn worker_link(&self, latency: Duration) -> crate::network::Link {
        let times = if self.delay_on_worker_egress { 2 } else { 1 };
        self.link(self.worker_base_rtt, latency, times)
    }

    /// A worker-to-master path with `latency` added.
    pub fn master_link(&self, latency: Duration) -> crate::network::Link {
        self.link(self.master_base_rtt, latency, 1)
    }
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PaperModel {
    pub name: String,
    pub model_size: Bytes,
    pub container_image: Bytes,
}

/// How big a training process's CRIU image is: the paper does not say.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct MemoryImageSpec {
    /// Share of the container image that ends up mapped in the process (interpreter, framework
    /// libraries and their heaps).
    pub container_image_fraction: f64,
    /// Copies of the weights in memory (weights, gradients, optimiser moments).
    pub model_copies: f64,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Table3Spec {
    pub failure_fractions: Vec<f64>,
    #[serde(with = "duration_list")]
    pub latencies: Vec<Duration>,
    /// The latency whose published row calibrates each model's unpublished training time.
    #[serde(with = "units::duration")]
    pub calibrate_on: Duration,
    /// Fit one latency-independent migration cost shared by all models (pod re-creation,
    /// scheduling, readiness: what the paper measured but our cost model lacks) on the rows at
    /// the other latencies.
    pub fit_fixed_overhead: bool,
    pub models: Vec<PaperModel>,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PaperDataset {
    pub name: String,
    pub total_bytes: Bytes,
    pub files: u64,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RepositorySpec {
    #[serde(with = "units::duration")]
    pub rtt: Duration,
    pub capacity: BitRate,
    pub loss: f64,
    /// Round trips per file for the HTTP request.
    pub rtts_per_file: u32,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ScpSpec {
    /// OpenSSH's channel window caps the data in flight.
    pub channel_window: Bytes,
    /// Cipher throughput of one core.
    pub cipher_rate: BitRate,
    /// TCP and SSH handshakes, key exchange and authentication, in round trips.
    pub setup_rtts: u32,
    /// Fixed CPU time of the session setup.
    #[serde(with = "units::duration")]
    pub setup_cpu: Duration,
    /// The scp protocol's per-file header and acknowledgements, in round trips.
    pub rtts_per_file: u32,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct KubectlSpec {
    /// kubectl start, API server authentication and the exec stream upgrade, per leg.
    #[serde(with = "units::duration")]
    pub exec_setup: Duration,
    /// Round trips of the exec upgrade, per leg.
    pub setup_rtts: u32,
    /// tar's header block per file.
    pub tar_header: Bytes,
    /// What the API server and kubelet can proxy through exec streams, all streams together.
    pub api_server_cap: BitRate,
}

/// NFS costs of writing and reading a CRIU image directory.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct NfsSpec {
    /// Files in one CRIU image directory (per-thread core images, mm, pagemap, pages, fds…).
    pub image_files: u32,
    /// Synchronous round trips per file on each leg.
    pub rtts_per_file: u32,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct MiddlewareSpec {
    pub initial_window: u32,
    pub max_window: u32,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Fig5Spec {
    #[serde(with = "duration_list")]
    pub latencies: Vec<Duration>,
    pub datasets: Vec<PaperDataset>,
    pub repository: RepositorySpec,
    pub scp: ScpSpec,
    pub kubectl: KubectlSpec,
    pub middleware: MiddlewareSpec,
    /// Our engine's transfer settings (as in a policy's `transfer` section).
    pub engine: automigrate_core::policy::TransferPolicy,
}

/// The reproduction of the paper's testbed experiments.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PaperScenario {
    pub name: String,
    pub network: TestbedNetwork,
    pub criu: CriuSpec,
    pub memory_image: MemoryImageSpec,
    pub nfs: NfsSpec,
    #[serde(with = "units::duration")]
    pub transfer_round: Duration,
    pub table3: Table3Spec,
    pub fig5: Fig5Spec,
    /// The published numbers, relative to this file.
    pub published: String,
    #[serde(skip)]
    pub base_dir: PathBuf,
}

impl PaperScenario {
    pub fn load(path: &Path) -> Result<Self, ScenarioError> {
        let text = read(path)?;
        let mut scenario: PaperScenario = parse(path, &text)?;
        scenario.base_dir = path.parent().map(Path::to_path_buf).unwrap_or_default();
        if scenario.table3.models.is_empty() || scenario.table3.failure_fractions.is_empty() {
            return Err(invalid(path, "table3 needs models and failure fractions"));
        }
        if !scenario
            .table3
            .latencies
            .contains(&scenario.table3.calibrate_on)
        {
            return Err(invalid(
                path,
                "table3.calibrateOn must be one of table3.latencies",
            ));
        }
        Ok(scenario)
    }

    pub fn load_published(&self) -> Result<Published, ScenarioError> {
        let path = self.base_dir.join(&self.published);
        parse(&path, &read(&path)?)
    }

    pub fn engine_transfer_settings(&self) -> TransferSettings {
        self.fig5.engine.settings()
    }
}

/// The paper's published figures, as quoted in the reference summary.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Published {
    pub source: String,
    pub table3: Vec<PublishedTable3Row>,
    /// Fig. 5: the largest reduction the middleware gave over plain `kubectl cp` (at 70 ms).
    pub fig5_middleware_best_reduction_percent: f64,
    #[serde(with = "units::duration")]
    pub fig5_middleware_best_reduction_latency: Duration,
    pub fig5_findings: Vec<String>,
}

/// One cell of Table III: min and max percent over the three failure points.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PublishedTable3Row {
    pub model: String,
    #[serde(with = "units::duration")]
    pub latency: Duration,
    pub min: f64,
    pub max: f64,
}

/// `[10ms, 20ms]` as a list of humantime strings.
mod duration_list {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer};

    pub fn deserialize<'de, D: Deserializer<'de>>(
        deserializer: D,
    ) -> Result<Vec<Duration>, D::Error> {
        Vec::<String>::deserialize(deserializer)?
            .iter()
            .map(|text| {
                automigrate_core::units::parse_duration(text).map_err(serde::de::Error::custom)
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn trace_rows_parse_and_bad_rows_name_their_line() {
        let path = Path::new("t.csv");
        let rows = parse_trace(
            path,
            "node,failAt,repairAt,warnAt\n3,100,400,40\n1,5,9,\n",
            4,
        )
        .unwrap();
        assert_eq!(rows.len(), 2);
        assert_eq!(rows[0].warn_at, Some(40.0));
        assert_eq!(rows[1].warn_at, None);
        let error = parse_trace(path, "h\n9,1,2\n", 4).unwrap_err().to_string();
        assert!(error.contains("line 2"), "{error}");
        let error = parse_trace(path, "h\n1,5,3\n", 4).unwrap_err().to_string();
        assert!(error.contains("after"), "{error}");
    }

    #[test]
    fn criu_costs_scale_with_bytes() {
        let criu = CriuSpec {
            dump_rate: BitRate(8_000_000_000),
            restore_rate: BitRate(4_000_000_000),
            freeze_overhead: Duration::from_millis(100),
            container_start: Duration::from_secs(2),
            image_load_rate: BitRate(800_000_000),
            seal_overhead: Duration::from_millis(50),
            seal_rate: Some(BitRate(16_000_000_000)),
        };
        assert_eq!(criu.dump_time(1_000_000_000), Duration::from_millis(1100));
        assert_eq!(criu.restore_time(1_000_000_000), Duration::from_secs(4));
        assert_eq!(criu.fresh_start_time(100_000_000), Duration::from_secs(3));
        assert_eq!(criu.seal_time(1_000_000_000), Duration::from_millis(550));
        assert_eq!(
            criu.final_dump_time(1_000_000_000),
            Duration::from_millis(1650)
        );
        let unsealed = CriuSpec {
            seal_overhead: Duration::ZERO,
            seal_rate: None,
            ..criu
        };
        assert_eq!(
            unsealed.final_dump_time(1_000_000_000),
            Duration::from_millis(1100)
        );
    }

    #[test]
    fn transfer_overhead_adds_setup_round_trips_and_files() {
        let cost = TransferCost {
            payload_share: 0.965,
            setup: Duration::from_millis(180),
            setup_rtts: 11.0,
            per_file: Duration::from_millis(1),
        };
        assert_eq!(
            cost.overhead(Duration::from_millis(10), 600),
            Duration::from_millis(180 + 110 + 600)
        );
        assert_eq!(
            TransferCost::default().overhead(Duration::from_millis(70), 1000),
            Duration::ZERO
        );
    }
}
