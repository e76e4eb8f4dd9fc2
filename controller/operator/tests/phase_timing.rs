//! Phase timing at the reconcile level: a step that takes a while inside one executor round
//! (a synchronous final checkpoint) is timed, not recorded as 0 s. The controller's clock is a
//! manual one that the agent double moves while it "dumps", so the run is deterministic.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use tokio::sync::Notify;

use automigrate_core::migration::Phase;
use automigrate_core::model::PodRef;
use automigrate_kube_fake::FakeCluster;
use automigrate_operator::agent::{
    AgentResult, CheckpointKind, CheckpointTaken, NodeAgent, PeerLatency, RecordingAgent,
    TransferProgress,
};
use automigrate_operator::clock::{Clock, ManualClock};
use automigrate_operator::controller::Config;
use automigrate_operator::crd::{Migration, MigrationStatus, TransferPayload};

mod common;
use common::*;

/// The recording double, except that a final checkpoint takes `dump` on the manual clock, or
/// never answers (`None`: the node died while dumping; no TCP answer ever comes from a
/// powered-off or cut-off node), and that one later call may never be answered ([`Hangs`]).
#[derive(Debug)]
struct SlowDump {
    inner: RecordingAgent,
    clock: ManualClock,
    dump: Option<Duration>,
    hangs: Hangs,
    dumped: AtomicBool,
    /// Told when the call that [`Hangs`] names is held unanswered, so a test knows the phase
    /// began without guessing from how long a round takes.
    held: Arc<Notify>,
}

/// Which call after the final dump a node that died during it never answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Hangs {
    Nothing,
    /// The source's send of a checkpoint (it died while sending its dump).
    CheckpointSend,
    /// The build of a restore image on this node (the target, which died in Restoring).
    ImageBuildOn(&'static str),
    /// The listing of this node's checkpoints (a node that died while it was asked).
    ListingOn(&'static str),
}

impl NodeAgent for SlowDump {
    fn checkpoint<'a>(
        &'a self,
        node: &'a str,
        pod: &'a PodRef,
        container: &'a str,
        kind: CheckpointKind,
    ) -> AgentResult<'a, CheckpointTaken> {
        if kind == CheckpointKind::Final {
            self.dumped.store(true, Ordering::SeqCst);
            let Some(dump) = self.dump else {
                return Box::pin(std::future::pending());
            };
            self.clock.advance(dump);
            self.inner.set_now(self.clock.now());
        }
        self.inner.checkpoint(node, pod, container, kind)
    }

    fn checkpoints<'a>(
        &'a self,
        node: &'a str,
        pod: &'a PodRef,
    ) -> AgentResult<'a, Vec<CheckpointTaken>> {
        if matches!(self.hangs, Hangs::ListingOn(dying) if dying == node) {
            self.held.notify_one();
            return Box::pin(std::future::pending());
        }
        self.inner.checkpoints(node, pod)
    }

    fn start_transfer<'a>(
        &'a self,
        from: &'a str,
        payload: &'a TransferPayload,
        to: &'a str,
    ) -> AgentResult<'a, TransferProgress> {
        if self.hangs == Hangs::CheckpointSend
            && payload.checkpoint.is_some()
            && self.dumped.load(Ordering::SeqCst)
        {
            self.held.notify_one();
            return Box::pin(std::future::pending());
        }
        self.inner.start_transfer(from, payload, to)
    }

    fn transfer_status<'a>(
        &'a self,
        node: &'a str,
        id: &'a str,
    ) -> AgentResult<'a, TransferProgress> {
        self.inner.transfer_status(node, id)
    }

    fn build_image<'a>(&'a self, node: &'a str, checkpoint_id: &'a str) -> AgentResult<'a, String> {
        if matches!(self.hangs, Hangs::ImageBuildOn(target) if target == node) {
            self.held.notify_one();
            return Box::pin(std::future::pending());
        }
        self.inner.build_image(node, checkpoint_id)
    }

    fn peers<'a>(&'a self, node: &'a str) -> AgentResult<'a, Vec<PeerLatency>> {
        self.inner.peers(node)
    }
}

/// A final checkpoint that takes 20 s finishes inside one executor round (the round's `now` is
/// the time it began). Checkpointing lasted 20 s and the downtime includes them; both used to
/// read from the round's fixed `now`: Checkpointing 0 s.
#[tokio::test]
async fn a_phase_that_ends_inside_one_round_is_timed_by_the_clock() {
    let Started {
        cluster,
        clock,
        h,
        name,
        ..
    } = start_one_migration(Some(Duration::from_secs(20)), Hangs::Nothing, "timing").await;
    let stores = h.controller.stores.clone();

    // Rounds at the clock's time, as the executor loop runs them.
    let mut phase = Phase::Pending;
    for _ in 0..300 {
        let migration = stores.migration(NS, &name).unwrap();
        phase = h
            .controller
            .executor
            .advance(&migration, clock.now())
            .await
            .unwrap()
            .phase;
        if phase == Phase::Verifying {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(phase, Phase::Verifying);
    let replacement = cluster
        .get::<Migration>(Some(NS), &name)
        .unwrap()
        .status
        .unwrap()
        .replacement_pod
        .unwrap();
    h.kubelet_runs(&replacement).await;
    h.drive(&name, clock.now(), |a| a.phase == Phase::Succeeded)
        .await;

    let state = cluster
        .get::<Migration>(Some(NS), &name)
        .unwrap()
        .status
        .unwrap()
        .state;
    let checkpointing = state
        .history
        .iter()
        .find(|timing| timing.phase == Phase::Checkpointing)
        .unwrap();
    assert_eq!(
        checkpointing.duration,
        Duration::from_secs(20),
        "{:#?}",
        state.history
    );
    assert_eq!(
        state.downtime,
        Some(Duration::from_secs(20)),
        "from the freeze to the replacement running: {:#?}",
        state.history
    );
}

/// A source that dies while its final dump is asked for (fault suite, issue 16 campaign: a
/// node powered off 0.1–0.3 s into Checkpointing held the phase 31 s): the call is given up
/// once the source's Lease has expired, and the next round counts the source as lost.
#[tokio::test]
async fn a_dump_the_dead_source_never_answers_is_given_up_when_its_lease_expires() {
    let Started {
        cluster,
        clock,
        h,
        name,
        ..
    } = start_one_migration(None, Hangs::Nothing, "dies while dumping").await;

    let (phase, message) =
        rounds_while_the_source_lease_expires(&h, &cluster, &clock, &name, "dump").await;
    assert_ne!(phase, Phase::Checkpointing, "{message:?}");
}

/// A source that dies while it sends its final dump to the target (fault suite, session 8: a
/// node powered off or cut off 30–280 ms into Transferring held the round, and the training,
/// 33–35 s): the call is given up once the source's Lease has expired, and the next round
/// counts the source as lost and goes on from a stored checkpoint.
#[tokio::test]
async fn a_send_the_dead_source_never_answers_is_given_up_when_its_lease_expires() {
    let Started {
        cluster,
        clock,
        h,
        name,
        held,
    } = start_one_migration(
        Some(Duration::ZERO),
        Hangs::CheckpointSend,
        "dies while sending",
    )
    .await;
    // Rounds until the dump is taken and its transfer asked for.
    let phase = rounds_until_held(&h, &clock, &name, &held).await;
    assert_eq!(h.status(&name).state.phase, Phase::Transferring, "{phase}");

    // Lost (asserted there): the migration goes on from a stored checkpoint, still in
    // Transferring while that one is sent if the target lacks it.
    rounds_while_the_source_lease_expires(&h, &cluster, &clock, &name, "send").await;
}

/// A node that dies while the driver asks what checkpoints it holds (after the source was
/// lost, when a stored checkpoint is chosen): the listing is given up once that node's Lease
/// expires, and the migration goes on without its copies instead of waiting on it for the
/// agent client's timeout (10 min by default).
#[tokio::test]
async fn a_listing_the_dying_holder_never_answers_is_given_up_when_its_lease_expires() {
    let Started {
        cluster,
        clock,
        h,
        name,
        held,
    } = start_one_migration(None, Hangs::ListingOn("edge-1"), "a holder dies").await;
    // The source (edge-2) dies first: 40 s pass while the others renew. Then, once edge-1 is
    // asked for its checkpoints, edge-1 dies too: 40 s more pass while only edge-3 renews.
    let dying = {
        let cluster = cluster.clone();
        let clock = clock.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(300)).await;
            clock.advance(Duration::from_secs(40));
            for name in ["edge-1", "edge-3"] {
                cluster.put(&lease(name, at(40)));
            }
            held.notified().await;
            clock.advance(Duration::from_secs(40));
            cluster.put(&lease("edge-3", at(80)));
        })
    };
    let mut phase = Phase::Pending;
    for _ in 0..40 {
        phase = round_that_ends(&h, &clock, &name, "the dead edge-1's listing").await;
        if dying.is_finished() && !matches!(phase, Phase::Checkpointing | Phase::Syncing) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tokio::time::timeout(Duration::from_secs(30), dying)
        .await
        .unwrap_or_else(|_| panic!("edge-1 was never asked for its checkpoints ({phase})"))
        .unwrap();
    let status = h.status(&name);
    assert!(!status.state.source_alive, "{status:?}");
    assert!(
        !matches!(phase, Phase::Checkpointing | Phase::Syncing),
        "{phase}: {:?}",
        status.state.message
    );
}

/// Executor rounds until one waits on the call [`Hangs`] names (the double tells `held`);
/// returns the phase of the last round that ended.
async fn rounds_until_held(h: &Harness, clock: &ManualClock, name: &str, held: &Notify) -> Phase {
    let stores = h.controller.stores.clone();
    let mut phase = Phase::Pending;
    for _ in 0..50 {
        let migration = stores.migration(NS, name).unwrap();
        let round = h.controller.executor.advance(&migration, clock.now());
        tokio::select! {
            advanced = round => phase = advanced.unwrap().phase,
            () = held.notified() => break,
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    phase
}

/// Executor rounds while, 300 ms after the first began, 40 s pass on the clock (the default
/// lease timeout is 30 s): `dead`'s Lease stays at 0 s, the other nodes renew theirs. Each
/// round must end (no call waits on the dead node past its Lease: `waiting_on` names the call
/// for the failure message) until `lost` holds of the status; returns the last phase and
/// status message.
async fn rounds_while_a_lease_expires(
    h: &Harness,
    cluster: &FakeCluster,
    clock: &ManualClock,
    name: &str,
    dead: &'static str,
    waiting_on: &str,
    lost: impl Fn(&MigrationStatus) -> bool,
) -> (Phase, Option<String>) {
    let renewing = {
        let cluster = cluster.clone();
        let clock = clock.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(300)).await;
            clock.advance(Duration::from_secs(40));
            for name in ["edge-1", "edge-2", "edge-3"] {
                if name != dead {
                    cluster.put(&lease(name, at(40)));
                }
            }
        })
    };
    let mut phase = Phase::Pending;
    let mut message = None;
    for _ in 0..20 {
        phase = round_that_ends(h, clock, name, &format!("the dead {dead}'s {waiting_on}")).await;
        let status = h.status(name);
        message = status.state.message.clone();
        if lost(&status) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    renewing.await.unwrap();
    assert!(lost(&h.status(name)), "phase {phase}, message {message:?}");
    (phase, message)
}

/// One executor round at the clock's time, which must end within 30 s of real time (a call
/// held on `waiting_on` fails the test instead of hanging it); returns its phase.
async fn round_that_ends(h: &Harness, clock: &ManualClock, name: &str, waiting_on: &str) -> Phase {
    let migration = h.controller.stores.migration(NS, name).unwrap();
    tokio::time::timeout(
        Duration::from_secs(30),
        h.controller.executor.advance(&migration, clock.now()),
    )
    .await
    .unwrap_or_else(|_| panic!("the round still waits on {waiting_on}"))
    .unwrap()
    .phase
}

/// [`rounds_while_a_lease_expires`] for the source (edge-2): it must be counted lost.
async fn rounds_while_the_source_lease_expires(
    h: &Harness,
    cluster: &FakeCluster,
    clock: &ManualClock,
    name: &str,
    waiting_on: &str,
) -> (Phase, Option<String>) {
    rounds_while_a_lease_expires(h, cluster, clock, name, "edge-2", waiting_on, |status| {
        !status.state.source_alive
    })
    .await
}

/// A target that dies while it builds the restore image (fault suite, issue 12 campaign,
/// f084-td: a target powered off in Restoring held the phase 31 s with a 15 s lease timeout):
/// the call is given up once the target's Lease has expired, and the next round
/// counts the target as lost; with the source alive, the migration rolls back to it.
#[tokio::test]
async fn an_image_the_dead_target_never_builds_is_given_up_when_its_lease_expires() {
    let Started {
        cluster,
        clock,
        h,
        name,
        held,
    } = start_one_migration(
        Some(Duration::ZERO),
        Hangs::ImageBuildOn("edge-3"),
        "target dies restoring",
    )
    .await;
    // Rounds until the checkpoint is on the target and its image asked for.
    let phase = rounds_until_held(&h, &clock, &name, &held).await;
    assert_eq!(h.status(&name).state.phase, Phase::Restoring, "{phase}");

    let (phase, message) = rounds_while_a_lease_expires(
        &h,
        &cluster,
        &clock,
        &name,
        "edge-3",
        "image build",
        |status| status.state.phase != Phase::Restoring,
    )
    .await;
    assert!(
        matches!(phase, Phase::RollingBack | Phase::RolledBack),
        "{phase}: {message:?}"
    );
    let status = h.status(&name);
    assert!(!status.state.target_started, "{status:?}");
}

/// A test's cluster with one Migration started on it (edge-2 to edge-3), its agent the
/// [`SlowDump`] double with `dump` and `hangs`.
struct Started {
    cluster: FakeCluster,
    clock: ManualClock,
    h: Harness,
    name: String,
    held: Arc<Notify>,
}

async fn start_one_migration(dump: Option<Duration>, hangs: Hangs, reason: &str) -> Started {
    let cluster = FakeCluster::new();
    let agent = RecordingAgent::new();
    let clock = ManualClock::new(t0());
    let held = Arc::new(Notify::new());
    let double = Arc::new(SlowDump {
        inner: agent.clone(),
        clock: clock.clone(),
        dump,
        hangs,
        dumped: AtomicBool::new(false),
        held: held.clone(),
    });
    let h =
        Harness::start_with_agent(&cluster, &agent, double, clock.clone(), Config::default()).await;
    healthy_cluster(&h, "{}").await;
    agent.set_now(at(0));
    let name = h.request_migration("trainer", Some("edge-3"), reason).await;
    let stores = h.controller.stores.clone();
    h.controller.decider.pass(at(0)).await.unwrap();
    eventually("the started Migration to reach the store", || {
        stores
            .migration(NS, &name)
            .is_some_and(|m| m.status.is_some())
    })
    .await;
    Started {
        cluster,
        clock,
        h,
        name,
        held,
    }
}
