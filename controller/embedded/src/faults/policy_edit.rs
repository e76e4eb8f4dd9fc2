//! The pod's policy edited while a migration runs: a valid edit (it is applied, and the
//! migration in flight keeps the limits it was decided with) or an invalid one (refused; the
//! last valid version stays in force).
//!
//! The edits are made to the suite's policy ConfigMap with `kubectl apply`, as a person would;
//! the controller's policy watch delivers them. The run reads what the controller did with the
//! edit from its Events on the ConfigMap (`PolicyLoaded`, or `InvalidPolicy` saying the last
//! valid version stays in force).

use std::time::Duration;

use automigrate_core::Policy;
use automigrate_core::migration::Phase;
use automigrate_core::policy::configmaps_from_yaml;

use super::world::FaultContext;
use super::{Draw, FaultKind, FaultParams, FaultPlan, Trigger};

/// Valid edits: (text in the shipped policy, its replacement).
pub const VALID_EDITS: [(&str, &str); 4] = [
    ("count: 3", "count: 2"),
    ("cooldown: 10m", "cooldown: 5m"),
    ("timeout: 2m", "timeout: 90s"),
    ("replicateTo: 1", "replicateTo: 2"),
];

/// Invalid edits: an unknown key, an unknown fallback, a zero timeout, a negative count.
pub const INVALID_EDITS: [(&str, &str); 4] = [
    ("interval: 10m", "intervall: 10m"),
    ("fallback: rollback", "fallback: sometimes"),
    ("timeout: 2m", "timeout: 0s"),
    ("count: 3", "count: -1"),
];

pub fn draw(draw: &mut Draw) -> (Trigger, FaultParams) {
    let phase = draw
        .pick(&[
            Phase::Syncing,
            Phase::Checkpointing,
            Phase::Transferring,
            Phase::Restoring,
            Phase::Verifying,
        ])
        .unwrap_or(Phase::Syncing);
    let trigger = draw
        .pick(&[Trigger::Degradation, Trigger::NodeFailure])
        .unwrap_or(Trigger::Degradation);
    (
        trigger,
        FaultParams::PolicyEdit {
            phase,
            edit: draw.range(0, 3) as u32,
        },
    )
}

pub async fn inject(context: &FaultContext, plan: &FaultPlan) -> Result<(), String> {
    let FaultParams::PolicyEdit { phase, edit } = plan.params else {
        return Err("not a policy-edit plan".into());
    };
    let valid = plan.kind == FaultKind::PolicyEditValid;
    let edits = if valid { &VALID_EDITS } else { &INVALID_EDITS };
    let (from, to) = edits[edit as usize % edits.len()];
    let name = context.policy_name().to_string();
    let path = context.policy_file().to_path_buf();
    let original =
        std::fs::read_to_string(&path).map_err(|error| format!("{}: {error}", path.display()))?;
    let documents = configmaps_from_yaml(&original).map_err(|error| error.to_string())?;
    let text = documents
        .iter()
        .find(|document| document.metadata.name == name)
        .ok_or_else(|| format!("policy `{name}` not in {}", path.display()))?
        .policy_text()
        .map_err(|error| error.to_string())?
        .to_string();
    if !text.contains(from) {
        return Err(format!("policy `{name}` has no `{from}` to edit"));
    }
    let edited_policy = text.replacen(from, to, 1);
    match (valid, Policy::from_yaml(&name, &edited_policy)) {
        (true, Err(error)) => return Err(format!("the valid edit is refused: {error}")),
        (false, Ok(_)) => return Err(format!("the invalid edit `{to}` parses")),
        _ => {}
    }
    context.trigger(plan).await?;
    let view = context
        .wait_for_phase(phase, Duration::from_secs(90))
        .await?;
    let edited = original.replacen(from, to, 1);
    let edited_path = path.with_extension("edited.yaml");
    std::fs::write(&edited_path, edited)
        .map_err(|error| format!("{}: {error}", edited_path.display()))?;
    let cluster = std::sync::Arc::clone(context.cluster());
    let apply = edited_path.clone();
    tokio::task::spawn_blocking(move || cluster.apply_file(&apply))
        .await
        .map_err(|error| error.to_string())?
        .map_err(|error| error.to_string())?;
    context.expect_policy(if valid { "applied" } else { "refused" });
    context.strike("controller", view.phase);
    context.note(format!(
        "policy ConfigMap `{name}` edited with kubectl apply ({}: `{from}` -> `{to}`) during {:?}",
        if valid { "valid" } else { "invalid" },
        view.phase
    ));
    Ok(())
}
