//! The driver against a recording double of the port: a small world (a source, a target and
//! two standby nodes, stored checkpoints, transfers, replacements) that records every effect
//! and checks the safety rules after each one. Random event sequences drive it: crashes at
//! any persist (the driver is dropped and rebuilt from the last persisted run), lost and cut
//! off sources, damaged checkpoints, flaky agents, deadlines passing, a crashing replacement.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use jiff::Timestamp;
use proptest::prelude::*;

use super::*;
use crate::migration::{Limits, MigrationState, RollbackAction};
use crate::policy::Policy;

const SOURCE: &str = "s";
const TARGET: &str = "t";

fn at(seconds: i64) -> Timestamp {
    Timestamp::from_second(1_800_000_000 + seconds).unwrap_or(Timestamp::UNIX_EPOCH)
}

/// One stored checkpoint of the world: where its copies are, whether it verifies.
#[derive(Debug, Clone)]
struct Stored {
    id: String,
    taken_at: i64,
    verified: bool,
    held_on: BTreeSet<String>,
}

/// A replacement the driver started.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Replacement {
    node: String,
    running: bool,
}

/// What the script does to the world before a turn of the driver.
#[derive(Debug, Clone)]
enum Happening {
    /// Time passes a little.
    Tick(i64),
    /// Past every deadline.
    Late,
    /// The source node powers off: its copy stops, its Lease is no longer renewed.
    PowerOff,
    /// The source is cut off from the controller but alive; its agent kills its copy once
    /// its heartbeat is `selfFenceAfter + stopTime` old (self-fencing).
    CutOff,
    /// The next `n` agent calls fail as if the agent were unreachable.
    Flaky(u8),
    /// Restoring this stored checkpoint fails.
    Damage(usize),
    /// The driver crashes at its `n`-th persist from now.
    Crash(u8),
    /// The replacement crashes before it becomes Ready.
    ReplacementCrashes,
    /// The container runtime restarts the source pod's stopped container (its restart
    /// policy), as it may until the pod is deleted.
    RuntimeRestart,
    /// Transfers started from now on hang: they run for ever without progress (only a
    /// deadline ends them).
    Stall,
}

#[derive(Debug, Clone)]
struct World {
    now: i64,
    source_powered: bool,
    source_cut: bool,
    renewed_at: Option<i64>,
    out_of_service: bool,
    source_copy_running: bool,
    /// The source pod still exists (stopped or not), so its runtime may restart it.
    source_pod_present: bool,
    stored: Vec<Stored>,
    damaged: BTreeSet<String>,
    /// Damaged checkpoints whose restore was refused.
    refused: BTreeSet<String>,
    /// Verified checkpoints (stored ones that verify, and final dumps).
    verified: BTreeSet<String>,
    /// Where each checkpoint is, final dumps included.
    held: BTreeMap<String, BTreeSet<String>>,
    final_dump: Option<(String, i64)>,
    replacements: BTreeMap<&'static str, Replacement>,
    transfers: BTreeMap<String, (u8, Option<String>)>,
    next_id: u32,
    flaky: u8,
    crash_in: Option<u8>,
    replacement_crashes: bool,
    stalled: bool,
    persisted: Run,
    effects: Vec<String>,
    violations: Vec<String>,
}

impl World {
    fn new(run: Run, stored: Vec<Stored>, source_alive: bool) -> Self {
        let mut verified = BTreeSet::new();
        let mut held = BTreeMap::new();
        for checkpoint in &stored {
            if checkpoint.verified {
                verified.insert(checkpoint.id.clone());
            }
            held.insert(checkpoint.id.clone(), checkpoint.held_on.clone());
        }
        Self {
            now: 0,
            source_powered: source_alive,
            source_cut: false,
            renewed_at: Some(if source_alive { 0 } else { -5 }),
            out_of_service: false,
            source_copy_running: source_alive,
            source_pod_present: true,
            stored,
            damaged: BTreeSet::new(),
            refused: BTreeSet::new(),
            verified,
            held,
            final_dump: None,
            replacements: BTreeMap::new(),
            transfers: BTreeMap::new(),
            next_id: 0,
            flaky: 0,
            crash_in: None,
            replacement_crashes: false,
            stalled: false,
            persisted: run,
            effects: Vec::new(),
            violations: Vec::new(),
        }
    }

    fn source_reachable(&self) -> bool {
        self.source_powered && !self.source_cut
    }

    /// The cut-off source's agent has killed its copy: the latest the self-fencing rule
    /// allows, `selfFenceAfter + stopTime` after the last heartbeat (default timing, the
    /// driver's default mode), not the Lease timeout: the controller may fence at the safe
    /// time, before the Lease timeout.
    fn self_fenced(&self) -> bool {
        let timing = crate::fencing::SelfFenceTiming::default();
        let done = timing.self_fence_after.saturating_add(timing.stop_time);
        self.source_cut
            && self
                .renewed_at
                .is_some_and(|renewed| self.now - renewed >= done.as_secs() as i64)
    }

    fn reachable(&self, node: &str) -> bool {
        node != SOURCE || self.source_reachable()
    }

    /// Time passes: a live, connected source renews its Lease; a cut-off one kills its copy
    /// once its agent's self-fencing is done.
    fn pass(&mut self, seconds: i64) {
        self.now += seconds;
        if self.source_reachable() {
            self.renewed_at = Some(self.now);
        } else if self.self_fenced() {
            self.source_copy_running = false;
        }
    }

    fn happen(&mut self, happening: &Happening) {
        match happening {
            Happening::Tick(seconds) => self.pass(*seconds),
            Happening::Late => self.pass(100_000),
            Happening::PowerOff => {
                self.source_powered = false;
                self.source_copy_running = false;
                if let Some(rollback) = self.replacements.get_mut("rollback")
                    && rollback.node == SOURCE
                {
                    rollback.running = false;
                }
            }
            Happening::CutOff => self.source_cut = true,
            Happening::Flaky(n) => self.flaky = *n,
            Happening::Damage(index) => {
                if let Some(stored) = self.stored.get(*index) {
                    self.damaged.insert(stored.id.clone());
                }
            }
            Happening::Crash(n) => self.crash_in = Some(*n),
            Happening::ReplacementCrashes => self.replacement_crashes = true,
            Happening::Stall => self.stalled = true,
            Happening::RuntimeRestart => {
                if self.source_pod_present
                    && self.source_powered
                    && !self.out_of_service
                    && !self.self_fenced()
                {
                    self.source_copy_running = true;
                    self.record("runtime restarted the source container".into());
                }
            }
        }
    }

    fn running_copies(&self) -> usize {
        usize::from(self.source_copy_running)
            + self
                .replacements
                .values()
                .filter(|replacement| replacement.running)
                .count()
    }

    fn record(&mut self, effect: String) {
        self.effects.push(effect);
        if self.running_copies() > 1 {
            self.violations.push(format!(
                "two running copies after {:?}: source {}, replacements {:?}",
                self.effects.last(),
                self.source_copy_running,
                self.replacements
            ));
        }
    }

    fn flaky_call(&mut self) -> bool {
        if self.flaky > 0 {
            self.flaky -= 1;
            true
        } else {
            false
        }
    }

    fn fresh_id(&mut self, prefix: &str) -> String {
        self.next_id += 1;
        format!("{prefix}-{}", self.next_id)
    }

    fn start(&mut self, node: &str, from: &Option<String>, role: Role) -> Outcome {
        let key = match role {
            Role::Migration => "migration",
            Role::Rollback => "rollback",
        };
        if self.replacements.contains_key(key) {
            return Outcome::done();
        }
        if !self.reachable(node) || (node == SOURCE && !self.source_powered) {
            return Outcome::Failed {
                reason: format!("node {node} unreachable"),
                retryable: true,
            };
        }
        // (A dump on a source that has died since is lost with it: starting fresh is right.)
        if role == Role::Migration
            && from.is_none()
            && self.source_reachable()
            && let Some((dump, _)) = &self.final_dump
        {
            self.violations.push(format!(
                "replacement started fresh on {node} although the final dump {dump} exists"
            ));
        }
        if let Some(id) = from {
            if !self.verified.contains(id) {
                self.violations
                    .push(format!("restore on {node} from unverified checkpoint {id}"));
            }
            if !self.held.get(id).is_some_and(|nodes| nodes.contains(node)) {
                return Outcome::Failed {
                    reason: format!("checkpoint {id} is not on {node}"),
                    retryable: false,
                };
            }
            if self.damaged.contains(id) {
                self.refused.insert(id.clone());
                return Outcome::Failed {
                    reason: format!("checkpoint {id} does not restore"),
                    retryable: false,
                };
            }
        }
        self.replacements.insert(
            key,
            Replacement {
                node: node.to_string(),
                running: true,
            },
        );
        Outcome::done()
    }
}

impl Port for World {
    fn now(&mut self) -> Timestamp {
        at(self.now)
    }

    async fn observe(&mut self, _run: &Run) -> Observation {
        Observation {
            source_reachable: self.source_reachable(),
            source_running: self.source_copy_running,
            target_running: self
                .replacements
                .get("migration")
                .is_some_and(|replacement| replacement.running),
            source_known: true,
            source_renewed_at: self.renewed_at.map(at),
            source_out_of_service: self.out_of_service,
        }
    }

    async fn final_dump_since(&mut self, since: Timestamp) -> Option<String> {
        if !self.source_reachable() {
            return None;
        }
        self.final_dump
            .clone()
            .filter(|(_, taken)| at(*taken) >= since)
            .map(|(id, _)| id)
    }

    async fn stored_checkpoints(&mut self, _run: &Run) -> Vec<CheckpointCopy> {
        let mut copies = Vec::new();
        for stored in &self.stored {
            for node in &stored.held_on {
                if self.reachable(node) {
                    copies.push(CheckpointCopy {
                        id: stored.id.clone(),
                        taken_at: at(stored.taken_at),
                        node: node.clone(),
                        // A damaged image that failed to restore fails its hash check in
                        // the target's store from then on, as the real agent's listing
                        // shows it (the copies elsewhere are intact).
                        verified: stored.verified
                            && !(self.refused.contains(&stored.id) && node == TARGET),
                        rtt_to_target: match node.as_str() {
                            "h1" => Some(Duration::from_millis(5)),
                            "h2" => Some(Duration::from_millis(50)),
                            _ => None,
                        },
                    });
                }
            }
        }
        copies
    }

    async fn transfer(&mut self, record: &TransferRecord) -> Result<TransferStatus, StepFailure> {
        self.effects
            .push(format!("transfer {} id={:?}", record.describe(), record.id));
        if self.flaky_call() || !self.reachable(&record.from) {
            return Err(StepFailure {
                reason: format!("agent on {} unreachable", record.from),
                retryable: true,
            });
        }
        if let Some(id) = &record.payload.checkpoint
            && !self
                .held
                .get(id)
                .is_some_and(|nodes| nodes.contains(&record.from))
        {
            return Ok(TransferStatus::Failed {
                reason: format!("{} does not hold {id}", record.from),
            });
        }
        let id = match &record.id {
            None if self.stalled => {
                let id = self.fresh_id("stalled");
                self.transfers.insert(id.clone(), (0, None));
                id
            }
            None => {
                let id = self.fresh_id("x");
                self.transfers
                    .insert(id.clone(), (0, record.payload.checkpoint.clone()));
                id
            }
            Some(id) => id.clone(),
        };
        let Some((polls, checkpoint)) = self.transfers.get_mut(&id) else {
            return Ok(TransferStatus::Unknown);
        };
        if id.starts_with("stalled") {
            return Ok(TransferStatus::Running {
                id,
                bytes_done: 0,
                bytes_total: 100,
            });
        }
        *polls += 1;
        if *polls < 2 {
            return Ok(TransferStatus::Running {
                id,
                bytes_done: 50,
                bytes_total: 100,
            });
        }
        if let Some(checkpoint) = checkpoint.clone() {
            self.held
                .entry(checkpoint)
                .or_default()
                .insert(record.to.clone());
        }
        Ok(TransferStatus::Succeeded {
            id,
            bytes_done: 100,
            bytes_total: 100,
        })
    }

    async fn act(&mut self, run: &Run, action: &Action) -> Outcome {
        // The replacement checked is the one the phase started (a rollback's own, or the
        // migration's).
        let checked = if run.state.phase == Phase::RollingBack {
            "rollback"
        } else {
            "migration"
        };
        let flaky = self.flaky_call();
        let outcome = if flaky {
            Outcome::Failed {
                reason: "agent unreachable".into(),
                retryable: true,
            }
        } else {
            match action {
                Action::FinalCheckpoint => {
                    if self.source_reachable() && self.source_copy_running {
                        let id = self.fresh_id("final");
                        self.source_copy_running = false;
                        self.verified.insert(id.clone());
                        self.held
                            .insert(id.clone(), BTreeSet::from([SOURCE.to_string()]));
                        self.final_dump = Some((id.clone(), self.now));
                        Outcome::Done {
                            checkpoint_id: Some(id),
                        }
                    } else {
                        Outcome::Failed {
                            reason: "source not running or unreachable".into(),
                            retryable: !self.source_reachable(),
                        }
                    }
                }
                Action::StopSource => {
                    if self.source_reachable() {
                        self.source_copy_running = false;
                        self.source_pod_present = false;
                        Outcome::done()
                    } else {
                        Outcome::Failed {
                            reason: "source unreachable".into(),
                            retryable: true,
                        }
                    }
                }
                Action::MarkOutOfService { .. } => {
                    // The pod object stays: on a dead node nothing confirms its deletion
                    // until the controller deletes it forcibly (CheckReplacement).
                    self.out_of_service = true;
                    Outcome::done()
                }
                Action::StartReplacement { node, from, role } => {
                    let (node, from, role) = (node.clone(), from.clone(), *role);
                    self.start(&node, &from, role)
                }
                Action::CheckReplacement { .. } => match self.replacements.get(checked) {
                    Some(replacement) if self.replacement_crashes => {
                        let _ = replacement;
                        if let Some(replacement) = self.replacements.get_mut(checked) {
                            replacement.running = false;
                        }
                        Outcome::Failed {
                            reason: "replacement crashed".into(),
                            retryable: false,
                        }
                    }
                    Some(replacement) if replacement.running => {
                        // What is left of the source is deleted.
                        self.source_pod_present = false;
                        Outcome::done()
                    }
                    Some(_) => Outcome::waiting("replacement not running"),
                    None => Outcome::waiting("replacement not seen"),
                },
                Action::StopReplacement => {
                    self.replacements.remove("migration");
                    Outcome::done()
                }
            }
        };
        self.record(format!("{action:?} -> {outcome:?}"));
        outcome
    }

    async fn persist(
        &mut self,
        run: &Run,
        previous: Option<&MigrationState>,
    ) -> Result<(), PersistError> {
        if let Some(n) = self.crash_in.as_mut() {
            if *n == 0 {
                self.crash_in = None;
                self.effects.push("crash".into());
                return Err(PersistError {
                    reason: "crashed".into(),
                    label: "crash",
                });
            }
            *n -= 1;
        }
        self.effects.push(format!(
            "persist {:?} -> {} ({:?})",
            previous.map(|state| state.phase),
            run.state.phase,
            run.state.rollback
        ));
        self.persisted = run.clone();
        Ok(())
    }
}

fn stored_strategy() -> impl Strategy<Value = Vec<Stored>> {
    let nodes = ["s", "t", "h1", "h2"];
    proptest::collection::vec((any::<bool>(), proptest::bits::u8::masked(0b1111)), 0..4).prop_map(
        move |list| {
            list.into_iter()
                .enumerate()
                .map(|(index, (verified, mask))| Stored {
                    id: format!("ck-{index}"),
                    taken_at: -1000 + 100 * index as i64,
                    verified,
                    held_on: nodes
                        .iter()
                        .enumerate()
                        .filter(|(bit, _)| mask & (1 << bit) != 0)
                        .map(|(_, node)| node.to_string())
                        .collect(),
                })
                .collect()
        },
    )
}

fn happening() -> impl Strategy<Value = Happening> {
    prop_oneof![
        6 => (1i64..40).prop_map(Happening::Tick),
        1 => Just(Happening::Late),
        1 => Just(Happening::PowerOff),
        1 => Just(Happening::CutOff),
        1 => (1u8..4).prop_map(Happening::Flaky),
        1 => (0usize..4).prop_map(Happening::Damage),
        2 => (0u8..4).prop_map(Happening::Crash),
        1 => Just(Happening::ReplacementCrashes),
        1 => Just(Happening::RuntimeRestart),
        1 => Just(Happening::Stall),
    ]
}

fn fallback() -> impl Strategy<Value = crate::policy::Fallback> {
    use crate::policy::Fallback;
    prop_oneof![
        Just(Fallback::Rollback),
        Just(Fallback::Restart),
        Just(Fallback::Fail)
    ]
}

fn first_run(source_alive: bool, fallback: crate::policy::Fallback) -> Run {
    let policy = Policy::default();
    let state = MigrationState::new(
        SOURCE.into(),
        TARGET.into(),
        source_alive,
        at(0),
        (!source_alive).then(|| at(-5)),
    );
    let limits = Limits {
        fallback,
        ..Limits::from_policy(&policy)
    };
    let mut run = Run::new(state, limits, policy.triggers.lease_timeout);
    if source_alive {
        run.transfers.push(TransferRecord::new(
            TransferPayload::dataset("/data"),
            SOURCE,
            TARGET,
        ));
    }
    run
}

/// Plays a script: each happening, then one `advance`; a crashed advance is dropped and the
/// next one starts from what was persisted. Then the world heals (no more faults) and the
/// driver runs until the migration ends. Returns the world.
fn play(
    source_alive: bool,
    fallback: crate::policy::Fallback,
    stored: Vec<Stored>,
    script: &[Happening],
) -> World {
    let driver = Driver::default();
    let mut world = World::new(first_run(source_alive, fallback), stored, source_alive);
    let mut run = world.persisted.clone();
    let turn = |world: &mut World, run: Run| match driver.advance_ready(world, run) {
        Ok(advanced) => advanced.run,
        // The driver died: a new one starts from the persisted state.
        Err(DriverError::Persist(_)) => world.persisted.clone(),
        Err(error) => {
            world.violations.push(format!("driver error: {error}"));
            world.persisted.clone()
        }
    };
    for happening in script {
        world.happen(happening);
        run = turn(&mut world, run);
    }
    world.flaky = 0;
    world.crash_in = None;
    for round in 0..60 {
        if run.state.phase.is_terminal() {
            break;
        }
        world.pass(if round % 10 == 9 { 100_000 } else { 7 });
        run = turn(&mut world, run);
    }
    if !run.state.phase.is_terminal() {
        world.violations.push(format!(
            "never ended: stuck in {} ({:?})",
            run.state.phase, run.state.message
        ));
    }
    if run != world.persisted {
        world
            .violations
            .push("the run it ended with was not persisted".into());
    }
    let copies = world.running_copies();
    match run.state.phase {
        Phase::Succeeded | Phase::Restarted if copies != 1 => world.violations.push(format!(
            "ended {} with {copies} running copies",
            run.state.phase
        )),
        // A source pod left behind (a dead node's lingers until deleted) is a protected pod on
        // a failed node to the decision engine: it would start the workload yet again.
        Phase::Succeeded | Phase::Restarted if world.source_pod_present => {
            world.violations.push(format!(
                "ended {} with the source pod left on {SOURCE}",
                run.state.phase
            ))
        }
        // A replacement started from the beginning is a restart, never a success.
        Phase::Succeeded if run.restore_from().is_none() => world
            .violations
            .push("ended Succeeded although the replacement started fresh".into()),
        // A rollback brings the workload back where it was, unless its node has died since.
        Phase::RolledBack if copies != 1 && world.source_powered && !world.source_cut => {
            world.violations.push(format!(
                "rolled back with {copies} running copies and a working source"
            ))
        }
        _ => {}
    }
    world
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    /// Never two running copies; never a restore from an unverified checkpoint; every crash
    /// point resumes or rolls back to an end; the same inputs give the same effects.
    #[test]
    fn the_driver_keeps_its_rules_whatever_happens(
        source_alive in any::<bool>(),
        fallback in fallback(),
        stored in stored_strategy(),
        script in proptest::collection::vec(happening(), 0..30),
    ) {
        let world = play(source_alive, fallback, stored.clone(), &script);
        prop_assert!(world.violations.is_empty(), "{:?}\neffects: {:#?}", world.violations, world.effects);
        let again = play(source_alive, fallback, stored, &script);
        prop_assert_eq!(&world.effects, &again.effects, "same inputs, different effects");
        prop_assert_eq!(&world.persisted, &again.persisted);
    }
}

#[test]
fn a_dead_source_restores_the_newest_verified_copy_from_the_nearest_holder() {
    let stored = vec![
        Stored {
            id: "ck-old".into(),
            taken_at: -300,
            verified: true,
            held_on: BTreeSet::from(["h2".to_string()]),
        },
        Stored {
            id: "ck-new".into(),
            taken_at: -100,
            verified: true,
            held_on: BTreeSet::from(["h1".to_string(), "h2".to_string()]),
        },
        Stored {
            id: "ck-newest-unverified".into(),
            taken_at: -10,
            verified: false,
            held_on: BTreeSet::from(["h1".to_string()]),
        },
    ];
    let world = play(
        false,
        crate::policy::Fallback::Rollback,
        stored,
        &[Happening::Late],
    );
    assert!(world.violations.is_empty(), "{:?}", world.violations);
    assert_eq!(world.persisted.state.phase, Phase::Succeeded);
    let chosen = world.persisted.stored_checkpoint.clone().unwrap();
    assert_eq!((chosen.id.as_str(), chosen.from.as_str()), ("ck-new", "h1"));
}

#[test]
fn a_dead_source_with_no_surviving_checkpoint_ends_restarted() {
    let world = play(
        false,
        crate::policy::Fallback::Rollback,
        Vec::new(),
        &[Happening::Late],
    );
    assert!(world.violations.is_empty(), "{:?}", world.violations);
    assert_eq!(world.persisted.state.phase, Phase::Restarted);
    assert!(world.persisted.state.started_fresh);
    let message = world.persisted.state.message.clone().unwrap_or_default();
    assert!(message.contains("restarted from scratch"), "{message}");
}

#[test]
fn a_damaged_checkpoint_is_retried_once_with_the_next_older_one() {
    let stored = vec![
        Stored {
            id: "ck-0".into(),
            taken_at: -300,
            verified: true,
            held_on: BTreeSet::from(["h2".to_string()]),
        },
        Stored {
            id: "ck-1".into(),
            taken_at: -100,
            verified: true,
            held_on: BTreeSet::from(["h1".to_string()]),
        },
    ];
    let world = play(
        false,
        crate::policy::Fallback::Rollback,
        stored.clone(),
        &[Happening::Late, Happening::Damage(1)],
    );
    assert!(world.violations.is_empty(), "{:?}", world.violations);
    assert_eq!(world.persisted.state.phase, Phase::Succeeded);
    assert_eq!(world.persisted.failed_restores, ["ck-1"]);
    assert_eq!(world.persisted.restore_from(), Some("ck-0"));
    // Both damaged: one retry, then the rollback (a fresh start: the source is dead).
    let world = play(
        false,
        crate::policy::Fallback::Rollback,
        stored,
        &[Happening::Late, Happening::Damage(1), Happening::Damage(0)],
    );
    assert!(world.violations.is_empty(), "{:?}", world.violations);
    assert_eq!(world.persisted.state.phase, Phase::Restarted);
    assert_eq!(world.persisted.failed_restores, ["ck-1"]);
}

/// Live on the local cluster: node lost, its only checkpoint corrupt, the rollback started the
/// workload fresh on the target and ended Restarted, leaving the dead source's pod; the next
/// decision pass migrated that pod again, one more running copy every second.
#[test]
fn a_fresh_start_after_a_corrupt_checkpoint_retires_the_dead_source() {
    let stored = vec![Stored {
        id: "ck-only".into(),
        taken_at: -100,
        verified: true,
        held_on: BTreeSet::from([TARGET.to_string()]),
    }];
    let world = play(
        false,
        crate::policy::Fallback::Rollback,
        stored,
        &[Happening::Damage(0)],
    );
    assert!(world.violations.is_empty(), "{:?}", world.violations);
    assert_eq!(
        world.persisted.state.phase,
        Phase::Restarted,
        "{:?}\n{:#?}",
        world.persisted.state.message,
        world.effects
    );
    assert_eq!(
        world.persisted.state.rollback,
        Some(RollbackAction::RestartFresh)
    );
    assert!(
        !world.source_pod_present,
        "the dead source's pod is left: {:#?}",
        world.effects
    );
    assert_eq!(world.running_copies(), 1);
}

#[test]
fn a_crash_after_the_final_dump_restores_that_dump() {
    // Crash at the persist that records the dump: the restarted driver finds it on the source
    // instead of dumping again (its container is stopped: that would fail and roll back to a
    // source that does not run).
    let world = play(
        true,
        crate::policy::Fallback::Rollback,
        Vec::new(),
        // Persists: Syncing, transfer started, Checkpointing; the fourth (Transferring, after
        // the dump) is lost.
        &[Happening::Crash(3), Happening::Tick(1)],
    );
    assert!(world.violations.is_empty(), "{:?}", world.violations);
    assert_eq!(world.persisted.state.phase, Phase::Succeeded);
    assert!(
        world
            .persisted
            .restore_from()
            .is_some_and(|id| id.starts_with("final-")),
        "{:?}",
        world.persisted
    );
}
