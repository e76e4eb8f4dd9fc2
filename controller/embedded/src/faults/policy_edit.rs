//! The pod's policy edited while a migration runs: a valid edit (it is applied, and the
//! migration in flight keeps the limits it was decided with) or an invalid one (refused; the
//! last valid version stays in force).
//!
//! The edits are made to the policy ConfigMap exactly as shipped in `policies/` and reach the
//! controller through its policy inbox, as the Kubernetes controller's policy watch delivers
//! them. The run records the policy in force at its end and the expected one.

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
    ("timeout: 5m", "timeout: 4m"),
    ("replicateTo: 1", "replicateTo: 2"),
];

/// Invalid edits: an unknown key, an unknown fallback, a zero timeout, a negative count.
pub const INVALID_EDITS: [(&str, &str); 4] = [
    ("interval: 10m", "intervall: 10m"),
    ("fallback: rollback", "fallback: sometimes"),
    ("timeout: 5m", "timeout: 0s"),
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

/// The shipped text of `name`'s `policy.yaml`.
fn shipped_text(context: &FaultContext, name: &str) -> Result<String, String> {
    let dir = context.policies_dir();
    let entries = std::fs::read_dir(dir).map_err(|error| format!("{}: {error}", dir.display()))?;
    for entry in entries.filter_map(Result::ok) {
        let Ok(text) = std::fs::read_to_string(entry.path()) else {
            continue;
        };
        let Ok(documents) = configmaps_from_yaml(&text) else {
            continue;
        };
        for document in documents {
            if document.metadata.name == name {
                return document
                    .policy_text()
                    .map(str::to_string)
                    .map_err(|error| error.to_string());
            }
        }
    }
    Err(format!("policy `{name}` not found in {}", dir.display()))
}

pub async fn inject(context: &FaultContext, plan: &FaultPlan) -> Result<(), String> {
    let FaultParams::PolicyEdit { phase, edit } = plan.params else {
        return Err("not a policy-edit plan".into());
    };
    let valid = plan.kind == FaultKind::PolicyEditValid;
    let edits = if valid { &VALID_EDITS } else { &INVALID_EDITS };
    let (from, to) = edits[edit as usize % edits.len()];
    let name = context.policy_name().to_string();
    let original = shipped_text(context, &name)?;
    if !original.contains(from) {
        return Err(format!("policy `{name}` has no `{from}` to edit"));
    }
    let edited = original.replacen(from, to, 1);
    let expected = if valid {
        Policy::from_yaml(&name, &edited)
            .map_err(|error| format!("the valid edit is refused: {error}"))?
    } else {
        if Policy::from_yaml(&name, &edited).is_ok() {
            return Err(format!("the invalid edit `{to}` parses"));
        }
        Policy::from_yaml(&name, &original).map_err(|error| error.to_string())?
    };
    context.expect_policy(serde_json::to_string(&expected).map_err(|error| error.to_string())?);
    context.trigger(plan).await?;
    let view = context
        .wait_for_phase(phase, Duration::from_secs(60))
        .await?;
    if let Ok(mut inbox) = context.policy_edits().lock() {
        inbox.push((name.clone(), edited));
    }
    context.strike("controller", Some(view.phase));
    context.note(format!(
        "policy `{name}` edited ({}: `{from}` -> `{to}`) during {}",
        if valid { "valid" } else { "invalid" },
        view.phase
    ));
    Ok(())
}
