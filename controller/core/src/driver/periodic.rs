//! Periodic checkpoints and their replication: how one checkpoint the decision engine asked for
//! ([`crate::decide::CheckpointDecision`]) is carried out, shared by the operator and the
//! simulator. Decisions out, effects in: [`Periodic`] says the next [`PeriodicStep`] and is
//! told what came of it; [`carry_out`] runs it through a [`PeriodicPort`] (the operator, with
//! the agents and the API server); a driver that lives in virtual time (the simulator) calls
//! [`Periodic::next`] and the event methods itself, between its own timed events.
//!
//! # The rules
//!
//! - **When due** ([`is_due`], [`next_check_at`]): a pod is due once its last checkpoint is
//!   `interval` old, or at once without one. The engine decides with this rule
//!   (`decide.rs`, its `Due` stage, which also picks the interval: the pod's annotation
//!   within the policy's `minInterval..maxInterval`, else the policy's, `auto` by
//!   Young/Daly); a driver that schedules its own re-checks asks [`next_check_at`].
//! - **Which standbys**: the engine's (`decide.rs`, `standbys`: current holders that still
//!   qualify, then the best-ranked by round trip, failure domain and capacity);
//!   [`crate::decide::CheckpointDecision::replicate_to`] carries them, in order.
//! - **Admission** ([`Periodic::start`]): a pod that is gone or not running yet (a
//!   replacement bound to its node before its process runs: nothing to dump, a restore may
//!   still be writing its files) is refused.
//! - **Take** on the pod's node; the new checkpoint is held there.
//! - **Record** ([`records_at_once`]): the pod names one checkpoint, the one a loss of its
//!   node restores from. A new checkpoint held only on the node must not replace a recorded
//!   one a standby holds: if the node died before (or without) a replica landing, nothing on
//!   record would survive it. So with standbys asked for, the new checkpoint is recorded once
//!   the first replica holds it, unless the recorded one has no copy off the node either (or
//!   there is none); without standbys, at once. It is recorded again after each replica, with
//!   the nodes that now hold it.
//! - **Replicate** to each standby in turn, from the pod's node.
//! - **Failures**: a failed take ends the job with nothing recorded (the pod stays due and
//!   the engine asks again on its next pass). A failed replica is noted and the next standby
//!   is tried; if none lands and the recorded checkpoint survives the node, the record keeps
//!   it. Either way the pod stays due, and the engine asks again on its next pass: there is no
//!   backoff yet, so a standby that keeps refusing copies (a full disk) costs the pod a dump
//!   every pass until the engine picks another standby. A failed record ends the job (the checkpoint stays in the node's store, where a
//!   dead-node migration's inventory still finds it).
//! - **Retention** is not the driver's: each node's store keeps the newest
//!   `retention.count` checkpoints of a pod within its byte budget, and the parents they need
//!   (`automigrate-checkpoint`'s `CheckpointStore::apply_retention`, run by the agent).

use std::future::Future;
use std::pin::pin;
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use jiff::Timestamp;

use crate::model::{CheckpointInfo, NodeName};
use crate::units;

/// Whether a pod whose last checkpoint was taken at `last_taken_at` (`None`: never) is due for
/// one at `now`, given its interval.
pub fn is_due(now: Timestamp, last_taken_at: Option<Timestamp>, interval: Duration) -> bool {
    last_taken_at.is_none_or(|taken_at| units::age(now, taken_at) >= interval)
}

/// When to look at a pod again for its next checkpoint: when its last one turns `interval`
/// old ([`is_due`]), or, while the interval in force is not known yet, `min_interval` from
/// `now` (no interval a policy allows is shorter); `now` without a checkpoint. Never before
/// `now`.
pub fn next_check_at(
    now: Timestamp,
    last_taken_at: Option<Timestamp>,
    interval: Option<Duration>,
    min_interval: Duration,
) -> Timestamp {
    let later = |at: Timestamp, by: Duration| {
        jiff::SignedDuration::try_from(by)
            .ok()
            .and_then(|by| at.checked_add(by).ok())
            .unwrap_or(Timestamp::MAX)
    };
    match (last_taken_at, interval) {
        (Some(taken_at), Some(interval)) => later(taken_at, interval).max(now),
        (Some(_), None) => later(now, min_interval),
        (None, _) => now,
    }
}

/// Whether a new checkpoint on `node` replaces the recorded one as soon as it is taken, before
/// any replica lands: when the recorded one (if any) has no copy off `node` (the new one is
/// then no worse), or when no standby was asked for. In the last case the record may lose a
/// copy a standby holds (the policy asks for none, or none qualifies now); keeping the older
/// one instead would keep the pod due, and it would be checkpointed again on every pass. A
/// dead-node migration still finds such a copy: it asks every reachable agent what it holds.
pub fn records_at_once(
    recorded: Option<&CheckpointInfo>,
    node: &str,
    replicate_to: &[NodeName],
) -> bool {
    let recorded_survives =
        recorded.is_some_and(|last| last.held_on.iter().any(|holder| holder != node));
    replicate_to.is_empty() || !recorded_survives
}

/// What a driver knows of the pod when the job starts.
#[derive(Debug, Clone, Copy)]
pub struct PodNow<'a> {
    /// The pod's process runs (the operator: phase `Running`).
    pub running: bool,
    /// The checkpoint the pod has on record.
    pub recorded: Option<&'a CheckpointInfo>,
}

/// Why a periodic checkpoint is not taken at all.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("the pod is gone")]
    Gone,
    #[error("the pod is not running yet: nothing to checkpoint")]
    NotRunning,
}

/// The next thing to do for a periodic checkpoint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PeriodicStep {
    /// Take the checkpoint on `node`, the node the pod runs on; then [`Periodic::taken`].
    Take { node: NodeName },
    /// Record `info` as the pod's checkpoint; then [`Periodic::recorded`].
    Record(CheckpointInfo),
    /// Copy checkpoint `checkpoint` from `from` to the standby `to`; then
    /// [`Periodic::replicated`].
    Replicate {
        from: NodeName,
        checkpoint: String,
        to: NodeName,
    },
    /// Nothing left: what it came to.
    Done(Checkpointed),
}

/// What one periodic checkpoint came to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Checkpointed {
    /// The new checkpoint, with the nodes that hold it.
    pub info: CheckpointInfo,
    /// Whether the pod's record names it (it may keep an older one a standby holds).
    pub recorded: bool,
    /// Standby nodes that could not receive a copy, with the reason.
    pub replica_failures: Vec<(NodeName, String)>,
}

/// One periodic checkpoint being carried out: the rules above as a small state machine. A
/// driver asks [`Periodic::next`], carries the step out, and answers with [`Periodic::taken`],
/// [`Periodic::recorded`] or [`Periodic::replicated`]; a take or a record that failed ends the
/// job (drop it: nothing more is to be done).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Periodic {
    node: NodeName,
    replicate_to: Vec<NodeName>,
    record_at_once: bool,
    /// The new checkpoint, once taken.
    taken: Option<CheckpointInfo>,
    /// Its holders changed since it was last recorded (or it was never recorded and should be).
    record_due: bool,
    recorded: bool,
    /// Standbys tried so far (`replicate_to[..tried]`).
    tried: usize,
    replica_failures: Vec<(NodeName, String)>,
}

impl Periodic {
    /// Starts the checkpoint of a pod on `node` with copies to `replicate_to` (the decision's
    /// fields), or refuses it. `pod` is `None` when the pod is gone.
    pub fn start(
        node: &str,
        replicate_to: &[NodeName],
        pod: Option<PodNow<'_>>,
    ) -> Result<Self, Refusal> {
        let pod = pod.ok_or(Refusal::Gone)?;
        if !pod.running {
            return Err(Refusal::NotRunning);
        }
        Ok(Self {
            node: node.to_string(),
            replicate_to: replicate_to.to_vec(),
            record_at_once: records_at_once(pod.recorded, node, replicate_to),
            taken: None,
            record_due: false,
            recorded: false,
            tried: 0,
            replica_failures: Vec::new(),
        })
    }

    /// The step to carry out now.
    pub fn next(&self) -> PeriodicStep {
        let Some(info) = &self.taken else {
            return PeriodicStep::Take {
                node: self.node.clone(),
            };
        };
        if self.record_due {
            return PeriodicStep::Record(info.clone());
        }
        match self.replicate_to.get(self.tried) {
            Some(standby) => PeriodicStep::Replicate {
                from: self.node.clone(),
                checkpoint: info.id.clone(),
                to: standby.clone(),
            },
            None => PeriodicStep::Done(Checkpointed {
                info: info.clone(),
                recorded: self.recorded,
                replica_failures: self.replica_failures.clone(),
            }),
        }
    }

    /// The checkpoint was taken (the answer to [`PeriodicStep::Take`]). It is held on the
    /// pod's node only, whatever `info.held_on` said.
    pub fn taken(&mut self, mut info: CheckpointInfo) {
        if self.taken.is_some() {
            return;
        }
        info.held_on = vec![self.node.clone()];
        self.taken = Some(info);
        self.record_due = self.record_at_once;
    }

    /// The pod's record now names the checkpoint as [`PeriodicStep::Record`] gave it.
    pub fn recorded(&mut self) {
        if self.taken.is_some() && self.record_due {
            self.record_due = false;
            self.recorded = true;
        }
    }

    /// What came of the copy [`PeriodicStep::Replicate`] asked for: the standby holds it, or
    /// why not. Ignored unless a copy was asked for.
    pub fn replicated(&mut self, result: Result<(), String>) {
        let PeriodicStep::Replicate { to, .. } = self.next() else {
            return;
        };
        self.tried += 1;
        match result {
            Ok(()) => {
                if let Some(info) = &mut self.taken {
                    info.held_on.push(to);
                    self.record_due = true;
                }
            }
            Err(reason) => self.replica_failures.push((to, reason)),
        }
    }
}

/// The effects of a periodic checkpoint. A port serves one pod's job (it knows the pod).
pub trait PeriodicPort {
    /// Why a take or a record failed (the port's own error, kept for its logs and metrics).
    type Error;

    /// Takes a checkpoint of the pod on `node`, leaving it running. `held_on` is ignored.
    fn take(
        &mut self,
        node: &str,
    ) -> impl Future<Output = Result<CheckpointInfo, Self::Error>> + Send;

    /// Records `info` as the pod's checkpoint.
    fn record(
        &mut self,
        info: &CheckpointInfo,
    ) -> impl Future<Output = Result<(), Self::Error>> + Send;

    /// Copies checkpoint `checkpoint` from `from` to `to` and waits until it lands; `Err`
    /// says why it did not.
    fn replicate(
        &mut self,
        from: &str,
        checkpoint: &str,
        to: &str,
    ) -> impl Future<Output = Result<(), String>> + Send;
}

/// Carries out a started periodic checkpoint through `port`: every step [`Periodic`] asks for,
/// until done or a take or record fails.
pub async fn carry_out<P: PeriodicPort>(
    port: &mut P,
    mut periodic: Periodic,
) -> Result<Checkpointed, P::Error> {
    loop {
        match periodic.next() {
            PeriodicStep::Take { node } => {
                let info = port.take(&node).await?;
                periodic.taken(info);
            }
            PeriodicStep::Record(info) => {
                port.record(&info).await?;
                periodic.recorded();
            }
            PeriodicStep::Replicate {
                from,
                checkpoint,
                to,
            } => {
                let result = port.replicate(&from, &checkpoint, &to).await;
                periodic.replicated(result);
            }
            PeriodicStep::Done(done) => return Ok(done),
        }
    }
}

/// [`carry_out`] for a port whose futures are always ready (the simulator, tests); `None` if
/// the port made it wait.
pub fn carry_out_ready<P: PeriodicPort>(
    port: &mut P,
    periodic: Periodic,
) -> Option<Result<Checkpointed, P::Error>> {
    let mut future = pin!(carry_out(port, periodic));
    match future
        .as_mut()
        .poll(&mut Context::from_waker(Waker::noop()))
    {
        Poll::Ready(result) => Some(result),
        Poll::Pending => None,
    }
}
