//! Wiring: the reflectors, the policy loader, the writer, the decision pass, the checkpoint
//! orchestrator, the link prober and the executor, started together on one `kube::Client`.
//!
//! [`Controller::start`] starts what every replica runs (reflectors, policy loader, writer);
//! [`Controller::run`] runs the loops that act, which do nothing unless this replica leads:
//! - the decision loop: a pass every `decision_interval` (or at once when the webhook receives
//!   alerts), whose checkpoint decisions are spawned as jobs;
//! - the executor loop: every `executor_interval`, an `advance` of every active Migration (never
//!   two at once for one Migration);
//! - the probe loop: every `probe_interval`, the agents' peer latency and, when a Prometheus is
//!   configured, the policies' PromQL signal queries. Their observations count for
//!   `signal_max_age` (three probe rounds by default), see [`crate::probes`].
//! - the reach loop: every `peer_reach_interval` (2 s by default), while some node's Lease is
//!   older than one renewal (`heartbeat_interval`) plus 1 s, and not older than
//!   [`REACH_WATCH_FOR`], the agents' peer probes again, so that peer-confirmed failure
//!   ([`automigrate_core::health`]) reads whether the peers reach that node *now*, not up to a
//!   `probe_interval` ago; then a decision pass at once.
//!
//! Tests call [`Decider::pass`](crate::decider::Decider::pass) and
//! [`Executor::advance`](crate::executor::Executor::advance) directly with an explicit `now`
//! instead of running the loops.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use automigrate_core::policy::PolicySet;
use k8s_openapi::api::core::v1::ConfigMap;
use kube::runtime::events::Reporter;
use kube::runtime::watcher;
use kube::{Api, Client, ResourceExt};
use tokio::sync::{Notify, watch};

use crate::agent::NodeAgent;
use crate::alertmanager::{ALERTS_CONFIG_MAP, AlertBook};
use crate::checkpoints::CheckpointOrchestrator;
use crate::clock::Clock;
use crate::decider::Decider;
use crate::executor::{Executor, ExecutorConfig, InFlight};
use crate::leader::Leadership;
use crate::policies::{PolicyLoader, SharedPolicies};
use crate::probes::{LinkBook, UserBook};
use crate::prometheus::PromSignals;
use crate::stores::Stores;
use crate::writer::Writer;

#[derive(Debug, Clone)]
pub struct Config {
    pub decision_interval: Duration,
    pub executor_interval: Duration,
    pub probe_interval: Duration,
    /// Namespace of the policy ConfigMaps.
    pub policy_namespace: String,
    /// The controller's own namespace: the ConfigMap of received alerts
    /// ([`ALERTS_CONFIG_MAP`](crate::alertmanager::ALERTS_CONFIG_MAP)) lives here.
    pub namespace: String,
    /// How long a firing alert counts without being repeated by Alertmanager.
    pub alert_ttl: Duration,
    pub executor: ExecutorConfig,
    /// Name on the Events this controller publishes, and this replica's identity.
    pub reporter: Reporter,
    /// Where the policies' PromQL signal queries run; `None`: they are not run.
    pub prometheus: Option<PromSignals>,
    /// How long a latency observation counts; `None`: three `probe_interval`s.
    pub signal_max_age: Option<Duration>,
    /// How often the reach loop looks for stale Leases (zero: never).
    pub peer_reach_interval: Duration,
    /// How often kubelets renew their node's Lease (`--heartbeat-interval`).
    pub heartbeat_interval: Duration,
}

/// A Lease older than this no longer makes the reach loop poll: its node has long been
/// judged (the Lease timeout is at most a minute or so), and a node that stays dead must not
/// keep every agent polled every few seconds.
pub const REACH_WATCH_FOR: Duration = Duration::from_secs(120);

/// Slack past one renewal period before a Lease counts as late for the reach loop.
const REACH_SLACK: Duration = Duration::from_secs(1);

/// Whether some node's last renewal (`renewals`) is late at `now`: older than one renewal
/// period plus 1 s, but not older than [`REACH_WATCH_FOR`].
pub fn lease_is_late(
    renewals: impl IntoIterator<Item = jiff::Timestamp>,
    heartbeat_interval: Duration,
    now: jiff::Timestamp,
) -> bool {
    let late_after = heartbeat_interval.saturating_add(REACH_SLACK);
    renewals.into_iter().any(|renewed| {
        let age = automigrate_core::units::age(now, renewed);
        age > late_after && age <= REACH_WATCH_FOR
    })
}

impl Config {
    pub fn signal_max_age(&self) -> Duration {
        self.signal_max_age
            .unwrap_or_else(|| self.probe_interval.saturating_mul(3))
    }
}

impl Default for Config {
    fn default() -> Self {
        Self {
            decision_interval: Duration::from_secs(10),
            executor_interval: Duration::from_secs(2),
            probe_interval: Duration::from_secs(30),
            policy_namespace: "automigrate-system".into(),
            namespace: "automigrate-system".into(),
            alert_ttl: Duration::from_secs(4 * 3600),
            executor: ExecutorConfig::default(),
            reporter: Reporter {
                controller: "automigrate-controller".into(),
                instance: None,
            },
            prometheus: None,
            signal_max_age: None,
            peer_reach_interval: Duration::from_secs(2),
            heartbeat_interval: automigrate_core::policy::KUBELET_HEARTBEAT,
        }
    }
}

#[derive(Debug, Clone)]
pub struct Controller {
    pub stores: Stores,
    pub policies: SharedPolicies,
    pub alerts: AlertBook,
    pub links: LinkBook,
    pub users: UserBook,
    pub writer: Writer,
    pub checkpoints: CheckpointOrchestrator,
    pub decider: Arc<Decider>,
    pub executor: Arc<Executor>,
    pub agent: Arc<dyn NodeAgent>,
    pub clock: Arc<dyn Clock>,
    /// Wakes the decision loop early (the webhook pokes it).
    pub wake: Arc<Notify>,
    config: Config,
    warned_no_prometheus: Arc<AtomicBool>,
    /// True once every store and the shared alert book hold their initial lists.
    synced: watch::Receiver<bool>,
}

impl Controller {
    /// Starts the reflectors, the writer and the policy loader. `agent` builds the agent
    /// access from the stores (the HTTP agents find each node's agent pod there).
    pub fn start(
        client: Client,
        agent: impl FnOnce(&Stores) -> Arc<dyn NodeAgent>,
        leadership: Leadership,
        clock: Arc<dyn Clock>,
        config: Config,
    ) -> Self {
        let stores = Stores::spawn(&client);
        let wake = Arc::new(Notify::new());
        let agent = agent(&stores);
        let writer = Writer::spawn(client.clone(), leadership, config.reporter.clone());
        let policies: SharedPolicies = Arc::new(RwLock::new(PolicySet::new()));
        let loader = PolicyLoader::new(policies.clone(), writer.clone())
            .with_fencing(config.executor.dead_node_fencing);
        let policy_api = Api::<ConfigMap>::namespaced(client.clone(), &config.policy_namespace);
        // Supervised like the reflectors: a policy watch that ends fails /readyz and restarts.
        crate::stores::supervise("policies", stores.watches.clone(), move || {
            loader.clone().run(policy_api.clone())
        });
        // Every replica follows the shared alert book; each change wakes the decision loop, so
        // the leader acts on an alert whichever replica received it.
        let alerts_api = Api::<ConfigMap>::namespaced(client, &config.namespace);
        let alert_store = crate::stores::reflect(
            alerts_api.clone(),
            watcher::Config::default().fields(&format!("metadata.name={ALERTS_CONFIG_MAP}")),
            "alerts",
            stores.watches.clone(),
            Some(wake.clone()),
        );
        let alerts = AlertBook::shared(config.alert_ttl, alerts_api, alert_store);
        let (synced_sender, synced) = watch::channel(false);
        {
            let (stores, alerts) = (stores.clone(), alerts.clone());
            tokio::spawn(async move {
                if stores.ready().await.is_ok() && alerts.ready().await {
                    let _ = synced_sender.send(true);
                }
            });
        }
        let links = LinkBook::new(config.signal_max_age());
        let users = UserBook::new(config.signal_max_age());
        let checkpoints =
            CheckpointOrchestrator::new(stores.clone(), writer.clone(), agent.clone());
        let decider = Arc::new(Decider::new(
            stores.clone(),
            policies.clone(),
            alerts.clone(),
            links.clone(),
            users.clone(),
            writer.clone(),
            checkpoints.clone(),
        ));
        let executor = Arc::new(
            Executor::new(
                stores.clone(),
                writer.clone(),
                agent.clone(),
                config.executor.clone(),
            )
            .with_clock(clock.clone()),
        );
        Self {
            stores,
            policies,
            alerts,
            links,
            users,
            writer,
            checkpoints,
            decider,
            executor,
            agent,
            clock,
            wake,
            config,
            warned_no_prometheus: Arc::default(),
            synced,
        }
    }

    /// Runs the acting loops until `shutdown` turns true. They act only while `leadership`
    /// says this replica leads.
    pub async fn run(&self, leadership: Leadership, shutdown: watch::Receiver<bool>) {
        tokio::join!(
            self.decision_loop(leadership.clone(), shutdown.clone()),
            self.executor_loop(leadership.clone(), shutdown.clone()),
            self.probe_loop(leadership.clone(), shutdown.clone()),
            self.reach_loop(leadership, shutdown),
        );
    }

    /// Waits until every store holds its initial list: a pass over half-listed stores would
    /// see pods missing (and refuse their requests) or nodes without their Leases. `false`
    /// when `shutdown` came first or the stores can never sync.
    async fn synced(&self, shutdown: &mut watch::Receiver<bool>) -> bool {
        let mut synced = self.synced.clone();
        tokio::select! {
            ready = synced.wait_for(|synced| *synced) => ready.is_ok(),
            _ = shutdown.wait_for(|stop| *stop) => false,
        }
    }

    async fn decision_loop(&self, leadership: Leadership, mut shutdown: watch::Receiver<bool>) {
        if !self.synced(&mut shutdown).await {
            return;
        }
        loop {
            if leadership.is_leader() {
                match self.decider.pass(self.clock.now()).await {
                    Ok(report) => {
                        for decision in report.checkpoints {
                            let orchestrator = self.checkpoints.clone();
                            tokio::spawn(async move {
                                let _ = orchestrator.run(&decision).await;
                            });
                        }
                    }
                    Err(error) => {
                        tracing::error!(%error, "decision pass failed");
                        crate::metrics::error("decider", error.metric_label());
                    }
                }
            }
            tokio::select! {
                _ = tokio::time::sleep(self.config.decision_interval) => {}
                _ = self.wake.notified() => {}
                _ = shutdown.wait_for(|stop| *stop) => return,
            }
        }
    }

    async fn executor_loop(&self, leadership: Leadership, mut shutdown: watch::Receiver<bool>) {
        let in_flight = InFlight::default();
        if !self.synced(&mut shutdown).await {
            return;
        }
        loop {
            if leadership.is_leader() {
                for migration in self.executor.active() {
                    let Some(guard) = in_flight.try_start(&migration) else {
                        continue;
                    };
                    let executor = self.executor.clone();
                    let clock = self.clock.clone();
                    tokio::spawn(async move {
                        let _guard = guard;
                        if let Err(error) = executor.advance(&migration, clock.now()).await {
                            tracing::warn!(migration = %migration.name_any(), %error, "advance failed");
                            crate::metrics::error("executor", error.metric_label());
                        }
                    });
                }
            }
            tokio::select! {
                _ = tokio::time::sleep(self.config.executor_interval) => {}
                _ = shutdown.wait_for(|stop| *stop) => return,
            }
        }
    }

    /// One round of the probe loop at the clock's now: every agent's peers, then the policies'
    /// PromQL queries.
    pub async fn refresh_signals(&self, nodes: &[String]) {
        self.links
            .refresh(self.agent.as_ref(), nodes, self.clock.now())
            .await;
        let policies = match self.policies.read() {
            Ok(policies) => policies.clone(),
            Err(_) => return,
        };
        let Some(prometheus) = &self.config.prometheus else {
            if !crate::prometheus::Queries::of(&policies).is_empty()
                && !self.warned_no_prometheus.swap(true, Ordering::Relaxed)
            {
                tracing::warn!(
                    "a policy names PromQL signal queries, but no --prometheus-url is set: they are not run"
                );
            }
            return;
        };
        prometheus
            .refresh(&policies, &self.links, &self.users, self.clock.now())
            .await;
    }

    /// One round of the reach loop at the clock's now: when some node's Lease is late, every
    /// agent's peer probes (which say whether each peer answers now), then a decision pass.
    /// Returns whether it polled.
    pub async fn refresh_reach(&self) -> bool {
        let now = self.clock.now();
        let renewals: Vec<jiff::Timestamp> = self
            .stores
            .leases
            .state()
            .iter()
            .filter_map(|lease| Some(lease.spec.as_ref()?.renew_time.as_ref()?.0))
            .collect();
        if !lease_is_late(renewals, self.config.heartbeat_interval, now) {
            return false;
        }
        let nodes = self.node_names();
        self.links.refresh(self.agent.as_ref(), &nodes, now).await;
        self.wake.notify_one();
        true
    }

    /// Every node the reflector holds, by name: whose agents the probe rounds ask.
    fn node_names(&self) -> Vec<String> {
        self.stores
            .nodes
            .state()
            .iter()
            .map(|node| node.name_any())
            .collect()
    }

    async fn reach_loop(&self, leadership: Leadership, mut shutdown: watch::Receiver<bool>) {
        if self.config.peer_reach_interval.is_zero() || !self.synced(&mut shutdown).await {
            return;
        }
        loop {
            if leadership.is_leader() {
                self.refresh_reach().await;
            }
            tokio::select! {
                _ = tokio::time::sleep(self.config.peer_reach_interval) => {}
                _ = shutdown.wait_for(|stop| *stop) => return,
            }
        }
    }

    async fn probe_loop(&self, leadership: Leadership, mut shutdown: watch::Receiver<bool>) {
        loop {
            if leadership.is_leader() {
                let nodes = self.node_names();
                self.refresh_signals(&nodes).await;
            }
            tokio::select! {
                _ = tokio::time::sleep(self.config.probe_interval) => {}
                _ = shutdown.wait_for(|stop| *stop) => return,
            }
        }
    }
}
