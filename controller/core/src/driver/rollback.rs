//! Rolling back: the replacement is stopped first if it was started, then the workload comes
//! back as the state machine says: kept running, restored on the source from the migration's
//! checkpoint, or started fresh on the target. (A rollback that starts the workload again is
//! only asked for once the source is fenced: [`crate::migration::step`].)

use super::port::{Action, Outcome, Port, Role};
use super::run::Run;
use crate::migration::RollbackAction;

pub(crate) async fn roll_back<P: Port>(
    port: &mut P,
    run: &Run,
    stop_target: bool,
    action: RollbackAction,
) -> Outcome {
    if stop_target {
        match port.act(run, &Action::StopReplacement).await {
            Outcome::Done { .. } => {}
            other => return other,
        }
    }
    let start = match action {
        RollbackAction::KeepSource => return Outcome::done(),
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
    port.act(run, &start).await
}
