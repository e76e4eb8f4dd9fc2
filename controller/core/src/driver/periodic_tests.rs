//! The periodic-checkpoint rules against a recording double of [`PeriodicPort`]: a pod on node
//! `n`, its record, the stores of every node, standbys that refuse copies, a take or a record
//! that fails. Fixed cases for each rule, then random ones checked against the safety rules.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use jiff::Timestamp;
use proptest::prelude::*;

use super::periodic::*;
use crate::model::CheckpointInfo;
use crate::units::Bytes;

const NODE: &str = "n";

fn at(seconds: i64) -> Timestamp {
    Timestamp::from_second(1_800_000_000 + seconds).unwrap_or(Timestamp::UNIX_EPOCH)
}

fn info(id: &str, held_on: &[&str]) -> CheckpointInfo {
    CheckpointInfo {
        id: id.into(),
        taken_at: at(0),
        size: Bytes(1_000),
        freeze: Some(Duration::from_millis(300)),
        held_on: held_on.iter().map(|node| node.to_string()).collect(),
        epoch: None,
    }
}

fn standbys(names: &[&str]) -> Vec<String> {
    names.iter().map(|name| name.to_string()).collect()
}

/// What the double was asked to do, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Effect {
    Take(String),
    Record {
        id: String,
        held_on: Vec<String>,
    },
    Replicate {
        from: String,
        id: String,
        to: String,
    },
}

#[derive(Debug, Default)]
struct World {
    record: Option<CheckpointInfo>,
    /// Checkpoint ids each node's store holds.
    stores: BTreeMap<String, BTreeSet<String>>,
    refuse_copies_to: BTreeSet<String>,
    take_fails: bool,
    /// The record fails from this call on (0: the first).
    record_fails_from: Option<usize>,
    records: usize,
    effects: Vec<Effect>,
}

impl World {
    fn with_record(record: Option<CheckpointInfo>) -> Self {
        let mut world = Self::default();
        if let Some(record) = &record {
            for node in &record.held_on {
                world
                    .stores
                    .entry(node.clone())
                    .or_default()
                    .insert(record.id.clone());
            }
        }
        world.record = record;
        world
    }

    fn holds(&self, node: &str, id: &str) -> bool {
        self.stores.get(node).is_some_and(|ids| ids.contains(id))
    }

    fn run(&mut self, replicate_to: &[String]) -> Result<Checkpointed, String> {
        let record = self.record.clone();
        let pod = PodNow {
            running: true,
            recorded: record.as_ref(),
        };
        let periodic = Periodic::start(NODE, replicate_to, Some(pod)).map_err(|e| e.to_string())?;
        carry_out_ready(self, periodic).expect("the double never waits")
    }
}

impl PeriodicPort for World {
    type Error = String;

    fn take(
        &mut self,
        node: &str,
    ) -> impl std::future::Future<Output = Result<CheckpointInfo, String>> + Send {
        self.effects.push(Effect::Take(node.into()));
        let result = if self.take_fails {
            Err("dump failed".to_string())
        } else {
            self.stores
                .entry(node.into())
                .or_default()
                .insert("new".into());
            // The port's held_on is ignored: the rule says the new one is on the node.
            Ok(info("new", &["somewhere-else"]))
        };
        std::future::ready(result)
    }

    fn record(
        &mut self,
        info: &CheckpointInfo,
    ) -> impl std::future::Future<Output = Result<(), String>> + Send {
        self.effects.push(Effect::Record {
            id: info.id.clone(),
            held_on: info.held_on.clone(),
        });
        let call = self.records;
        self.records += 1;
        let result = if self.record_fails_from.is_some_and(|from| call >= from) {
            Err("API server refused".to_string())
        } else {
            self.record = Some(info.clone());
            Ok(())
        };
        std::future::ready(result)
    }

    fn replicate(
        &mut self,
        from: &str,
        checkpoint: &str,
        to: &str,
    ) -> impl std::future::Future<Output = Result<(), String>> + Send {
        self.effects.push(Effect::Replicate {
            from: from.into(),
            id: checkpoint.into(),
            to: to.into(),
        });
        let result = if self.refuse_copies_to.contains(to) || !self.holds(from, checkpoint) {
            Err(format!("{to} refused the copy"))
        } else {
            self.stores
                .entry(to.into())
                .or_default()
                .insert(checkpoint.into());
            Ok(())
        };
        std::future::ready(result)
    }
}

fn record_effect(held_on: &[&str]) -> Effect {
    Effect::Record {
        id: "new".into(),
        held_on: standbys(held_on),
    }
}

fn replicate_effect(to: &str) -> Effect {
    Effect::Replicate {
        from: NODE.into(),
        id: "new".into(),
        to: to.into(),
    }
}

#[test]
fn without_standbys_the_checkpoint_is_recorded_at_once() {
    let mut world = World::with_record(Some(info("old", &[NODE, "s1"])));
    let done = world.run(&[]).unwrap();
    assert_eq!(
        world.effects,
        [Effect::Take(NODE.into()), record_effect(&[NODE])]
    );
    assert!(done.recorded);
    assert_eq!(done.info.held_on, [NODE]);
}

#[test]
fn a_recorded_checkpoint_a_standby_holds_is_replaced_only_once_a_replica_lands() {
    let mut world = World::with_record(Some(info("old", &[NODE, "s1"])));
    world.refuse_copies_to.insert("s1".into());
    let done = world.run(&standbys(&["s1", "s2"])).unwrap();
    assert_eq!(
        world.effects,
        [
            Effect::Take(NODE.into()),
            replicate_effect("s1"),
            replicate_effect("s2"),
            record_effect(&[NODE, "s2"]),
        ]
    );
    assert_eq!(done.replica_failures.len(), 1);
    assert_eq!(done.replica_failures[0].0, "s1");
    assert_eq!(world.record.unwrap().held_on, [NODE, "s2"]);
}

#[test]
fn when_no_replica_lands_the_record_keeps_the_checkpoint_a_standby_holds() {
    let mut world = World::with_record(Some(info("old", &[NODE, "s1"])));
    world.refuse_copies_to.insert("s1".into());
    let done = world.run(&standbys(&["s1"])).unwrap();
    assert!(!done.recorded);
    assert_eq!(done.info.held_on, [NODE]);
    assert_eq!(world.record.unwrap().id, "old");
}

#[test]
fn with_nothing_better_on_record_the_checkpoint_is_recorded_at_once_and_after_each_replica() {
    for record in [None, Some(info("old", &[NODE]))] {
        let mut world = World::with_record(record);
        let done = world.run(&standbys(&["s1", "s2"])).unwrap();
        assert_eq!(
            world.effects,
            [
                Effect::Take(NODE.into()),
                record_effect(&[NODE]),
                replicate_effect("s1"),
                record_effect(&[NODE, "s1"]),
                replicate_effect("s2"),
                record_effect(&[NODE, "s1", "s2"]),
            ]
        );
        assert!(done.recorded && done.replica_failures.is_empty());
    }
}

#[test]
fn a_failed_take_records_and_copies_nothing() {
    let mut world = World::with_record(None);
    world.take_fails = true;
    assert_eq!(world.run(&standbys(&["s1"])), Err("dump failed".into()));
    assert_eq!(world.effects, [Effect::Take(NODE.into())]);
    assert_eq!(world.record, None);
}

#[test]
fn a_failed_record_ends_the_job() {
    let mut world = World::with_record(None);
    world.record_fails_from = Some(0);
    assert!(world.run(&standbys(&["s1", "s2"])).is_err());
    assert_eq!(
        world.effects,
        [Effect::Take(NODE.into()), record_effect(&[NODE])]
    );
}

#[test]
fn a_pod_gone_or_not_yet_running_is_refused() {
    assert_eq!(Periodic::start(NODE, &[], None), Err(Refusal::Gone));
    let pod = PodNow {
        running: false,
        recorded: None,
    };
    assert_eq!(
        Periodic::start(NODE, &[], Some(pod)),
        Err(Refusal::NotRunning)
    );
}

#[test]
fn answers_out_of_turn_change_nothing() {
    let pod = PodNow {
        running: true,
        recorded: None,
    };
    let mut periodic = Periodic::start(NODE, &standbys(&["s1"]), Some(pod)).unwrap();
    let before = periodic.clone();
    periodic.replicated(Ok(()));
    periodic.recorded();
    assert_eq!(periodic, before);
    periodic.taken(info("new", &[]));
    let after_take = periodic.clone();
    periodic.taken(info("other", &[]));
    periodic.replicated(Ok(()));
    assert_eq!(
        periodic, after_take,
        "a replica before the record is not asked for"
    );
}

/// A driver in virtual time (the simulator) steps the machine itself, between its own timed
/// events: the same steps as `carry_out`, and the same account.
#[test]
fn stepping_by_hand_gives_what_carry_out_does() {
    let record = info("old", &[NODE, "s1"]);
    let list = standbys(&["s1", "s2", "s3"]);
    let mut world = World::with_record(Some(record.clone()));
    world.refuse_copies_to.insert("s2".into());
    let through_port = world.run(&list).unwrap();

    let pod = PodNow {
        running: true,
        recorded: Some(&record),
    };
    let mut periodic = Periodic::start(NODE, &list, Some(pod)).unwrap();
    let mut steps = Vec::new();
    let done = loop {
        let step = periodic.next();
        steps.push(step.clone());
        match step {
            PeriodicStep::Take { node } => {
                assert_eq!(node, NODE);
                periodic.taken(info("new", &[]));
            }
            PeriodicStep::Record(_) => periodic.recorded(),
            PeriodicStep::Replicate { to, .. } if to == "s2" => {
                periodic.replicated(Err("s2 refused the copy".into()))
            }
            PeriodicStep::Replicate { .. } => periodic.replicated(Ok(())),
            PeriodicStep::Done(done) => break done,
        }
    };
    assert_eq!(done, through_port);
    let effects: Vec<Effect> = steps
        .iter()
        .filter_map(|step| match step {
            PeriodicStep::Take { node } => Some(Effect::Take(node.clone())),
            PeriodicStep::Record(info) => Some(Effect::Record {
                id: info.id.clone(),
                held_on: info.held_on.clone(),
            }),
            PeriodicStep::Replicate {
                from,
                checkpoint,
                to,
            } => Some(Effect::Replicate {
                from: from.clone(),
                id: checkpoint.clone(),
                to: to.clone(),
            }),
            PeriodicStep::Done(_) => None,
        })
        .collect();
    assert_eq!(effects, world.effects);
    assert_eq!(done.info.held_on, [NODE, "s1", "s3"]);
}

#[test]
fn a_pod_is_due_once_its_checkpoint_is_interval_old() {
    let interval = Duration::from_secs(60);
    assert!(is_due(at(0), None, interval));
    assert!(!is_due(at(59), Some(at(0)), interval));
    assert!(is_due(at(60), Some(at(0)), interval));
}

#[test]
fn the_next_check_is_when_the_checkpoint_turns_interval_old() {
    let (interval, min) = (Duration::from_secs(60), Duration::from_secs(10));
    assert_eq!(next_check_at(at(5), None, Some(interval), min), at(5));
    assert_eq!(
        next_check_at(at(5), Some(at(0)), Some(interval), min),
        at(60)
    );
    // Overdue: now, never in the past.
    assert_eq!(
        next_check_at(at(90), Some(at(0)), Some(interval), min),
        at(90)
    );
    // Interval not known yet: no policy allows less than minInterval.
    assert_eq!(next_check_at(at(5), Some(at(0)), None, min), at(15));
}

fn scenario() -> impl Strategy<Value = (u8, Vec<(bool, bool)>, bool, Option<usize>)> {
    (
        0u8..3,
        proptest::collection::vec((any::<bool>(), any::<bool>()), 0..5),
        any::<bool>(),
        proptest::option::of(0usize..4),
    )
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    /// Random records, standby lists (some refusing, some repeated), failing takes and records:
    /// with standbys asked for the record never loses a copy off the node; it never names a node without the checkpoint,
    /// every standby is tried once in order, and the same inputs give the same effects.
    #[test]
    fn periodic_checkpoints_keep_the_record_safe((record, list, take_fails, record_fails_from) in scenario()) {
        let record = match record {
            0 => None,
            1 => Some(info("old", &[NODE])),
            _ => Some(info("old", &[NODE, "s0"])),
        };
        let standby_list: Vec<String> = list
            .iter()
            .enumerate()
            .map(|(i, (repeat, _))| format!("s{}", if *repeat { 0 } else { i + 1 }))
            .collect();
        let build = || {
            let mut world = World::with_record(record.clone());
            world.take_fails = take_fails;
            world.record_fails_from = record_fails_from;
            for (name, (_, refuses)) in standby_list.iter().zip(&list) {
                if *refuses {
                    world.refuse_copies_to.insert(name.clone());
                }
            }
            world
        };
        let mut world = build();
        let result = world.run(&standby_list);

        // Same inputs, same effects.
        let mut again = build();
        prop_assert_eq!(again.run(&standby_list), result.clone());
        prop_assert_eq!(&again.effects, &world.effects);

        // With standbys asked for, the record never loses a copy that survives the node.
        // (Without, the new one is recorded at once: see `records_at_once`.)
        let survived_before = !standby_list.is_empty() && record
            .as_ref()
            .is_some_and(|r| r.held_on.iter().any(|node| node != NODE));
        let survives_now = world
            .record
            .as_ref()
            .is_some_and(|r| r.held_on.iter().any(|node| node != NODE));
        prop_assert!(!survived_before || survives_now, "{:?}", world.effects);

        // Every record names only nodes that hold the checkpoint.
        if let Some(now) = &world.record {
            for node in &now.held_on {
                prop_assert!(world.holds(node, &now.id), "{node} lacks {}", now.id);
            }
        }

        // Take first, once; copies in the decision's order, each once, from the node; nothing
        // after a failed take or record.
        prop_assert_eq!(&world.effects[0], &Effect::Take(NODE.into()));
        let copied: Vec<&String> = world
            .effects
            .iter()
            .filter_map(|effect| match effect {
                Effect::Replicate { from, to, .. } => {
                    assert_eq!(from, NODE);
                    Some(to)
                }
                _ => None,
            })
            .collect();
        prop_assert!(copied.iter().zip(&standby_list).all(|(a, b)| *a == b));
        match &result {
            Ok(done) => {
                prop_assert_eq!(copied.len(), standby_list.len());
                prop_assert_eq!(
                    done.replica_failures.len() + done.info.held_on.len() - 1,
                    standby_list.len()
                );
                // Recorded exactly when the rule says so.
                let landed = done.info.held_on.len() > 1;
                let expected =
                    records_at_once(record.as_ref(), NODE, &standby_list) || landed;
                prop_assert_eq!(done.recorded, expected);
                if expected {
                    prop_assert_eq!(world.record.as_ref(), Some(&done.info));
                } else {
                    prop_assert_eq!(&world.record, &record);
                }
            }
            Err(_) => {
                prop_assert!(take_fails || record_fails_from.is_some());
                let last_failed = match world.effects.last() {
                    Some(Effect::Take(_)) => take_fails,
                    Some(Effect::Record { .. }) => record_fails_from.is_some(),
                    _ => false,
                };
                prop_assert!(last_failed, "{:?}", world.effects);
            }
        }
    }
}
