//! Rolling back: the replacement is stopped first if it was started, then the workload comes
//! back as the state machine says: kept running, restored on the source from the migration's
//! checkpoint, or started fresh on the target; a fresh start then waits for the new copy and
//! removes what is left of the source (a dead node's pod lingers). (A rollback that starts
//! the workload again is only asked for once the source is fenced:
//! [`crate::migration::step`].)

use super::port::{Action, Outcome, Port, Role};
use super::restore::Next;
use super::run::Run;
use crate::migration::RollbackAction;

/// The rollback step. `source_dead`: the source node's Lease has expired (what is left of the
/// source pod is then deleted forcibly, as after a migration).
pub(crate) async fn roll_back<P: Port>(
    port: &mut P,
    run: &mut Run,
    stop_target: bool,
    action: RollbackAction,
    source_dead: bool,
) -> Next {
    if stop_target {
        return match port.act(run, &Action::StopReplacement).await {
            Outcome::Done { .. } => {
                // Recorded before anything else starts: a fresh start below may wait for its
                // pod over several turns, and a port may know the pods it stops only by the
                // last one started (the operator does), so stopping again would stop that one.
                run.state.target_started = false;
                Next::Again
            }
            other => Next::Outcome(other),
        };
    }
    let start = match action {
        RollbackAction::KeepSource => return Next::Outcome(Outcome::done()),
        RollbackAction::RestoreOnSource => Action::StartReplacement {
            node: run.state.source.clone(),
            from: run.restore_from().map(String::from),
            role: Role::Rollback,
        },
        RollbackAction::RestartFresh => Action::StartReplacement {
            node: run.state.target.clone(),
            from: None,
            role: Role::Rollback,
        },
    };
    let started = port.act(run, &start).await;
    if action != RollbackAction::RestartFresh || !matches!(started, Outcome::Done { .. }) {
        return Next::Outcome(started);
    }
    // A fresh start on the target ends the migration as a migration does: once the new copy
    // runs, what is left of the source is removed. A dead source's pod object otherwise
    // lingers on its out-of-service node, and the decision engine, seeing a protected pod on
    // a failed node, would start the workload yet again (one more copy every pass).
    Next::Outcome(
        port.act(run, &Action::CheckReplacement { source_dead })
            .await,
    )
}
