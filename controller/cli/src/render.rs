//! The human-readable report of one decision pass: what will happen, why, and what will not.

use std::fmt::Write;

use automigrate_core::PolicySet;
use automigrate_core::decide::{CheckpointSource, Decisions, Payload};
use automigrate_core::transfer::StreamMode;
use automigrate_core::units::{Bytes, approx_duration, format_duration};

fn plural(count: usize, one: &str, many: &str) -> String {
    format!("{count} {}", if count == 1 { one } else { many })
}

pub fn text(decisions: &Decisions, policies: &PolicySet) -> String {
    let mut out = String::new();
    let summary = &decisions.summary;
    let _ = writeln!(
        out,
        "automigrate plan at {}: {}, {}, {}",
        decisions.now,
        plural(summary.nodes, "node", "nodes"),
        plural(summary.protected_pods, "protected pod", "protected pods"),
        if policies.is_empty() {
            "built-in default policy".to_string()
        } else {
            plural(policies.len(), "policy", "policies")
        }
    );
    if summary.migrating_pods > 0 {
        let _ = writeln!(
            out,
            "{} already migrating (left alone)",
            plural(summary.migrating_pods, "pod", "pods")
        );
    }

    if !decisions.nodes.is_empty() {
        let _ = writeln!(out, "\nNodes needing attention");
        for report in &decisions.nodes {
            let _ = writeln!(
                out,
                "  {:<16} {:<9} {}  [policy {}]",
                report.node,
                format!("{:?}", report.assessment.state),
                report.assessment.reasons.join("; "),
                report.policy
            );
        }
    }

    let _ = writeln!(out, "\nMigrations ({})", decisions.migrations.len());
    for migration in &decisions.migrations {
        let _ = writeln!(
            out,
            "  {}  {} -> {}  ({:?}, policy {})",
            migration.pod, migration.from, migration.to, migration.trigger, migration.policy
        );
        let _ = writeln!(out, "      why: {}", migration.reason);
        let checkpoint = match &migration.checkpoint {
            CheckpointSource::Fresh { base: Some(base) } => {
                format!(
                    "fresh stop-and-dump on {}, incremental on {base}",
                    migration.from
                )
            }
            CheckpointSource::Fresh { base: None } => {
                format!("fresh stop-and-dump on {}", migration.from)
            }
            CheckpointSource::Stored {
                id,
                from,
                age,
                epoch,
                ..
            } => format!(
                "stored {id} ({} old{}) from {from}",
                format_duration(*age),
                epoch.map(|e| format!(", epoch {e}")).unwrap_or_default()
            ),
            CheckpointSource::None => "none survives: restart from the beginning".to_string(),
        };
        let _ = writeln!(out, "      checkpoint: {checkpoint}");
        for transfer in &migration.transfers {
            let plan = &transfer.plan;
            let _ = writeln!(
                out,
                "      move {}: {} from {} in {}, {}, est. {}{}",
                match transfer.payload {
                    Payload::Checkpoint => "checkpoint",
                    Payload::Dataset => "dataset",
                },
                Bytes(plan.total_bytes).approx(),
                transfer.from,
                plural(plan.units.len(), "unit", "units"),
                match plan.mode {
                    StreamMode::Single => "1 stream".to_string(),
                    StreamMode::Parallel => format!(
                        "{}..{} parallel streams",
                        plan.initial_streams, plan.max_streams
                    ),
                },
                approx_duration(plan.estimated_duration),
                if transfer.link_assumed {
                    " (link not measured: assumed)"
                } else {
                    ""
                }
            );
        }
        let ranking: Vec<String> = migration
            .candidates
            .iter()
            .map(ToString::to_string)
            .collect();
        let _ = writeln!(out, "      ranking: {}", ranking.join("; "));
        if migration.rejected.total() > 0 {
            let _ = writeln!(out, "      turned down: {}", migration.rejected);
        }
    }

    let _ = writeln!(out, "\nCheckpoints due ({})", decisions.checkpoints.len());
    for checkpoint in &decisions.checkpoints {
        let mut extras = Vec::new();
        if let Some(base) = &checkpoint.incremental_on {
            extras.push(format!("incremental on {base}"));
        }
        if !checkpoint.replicate_to.is_empty() {
            extras.push(format!(
                "replicate to {}",
                checkpoint.replicate_to.join(", ")
            ));
        }
        let _ = writeln!(
            out,
            "  {} on {} ({:?}): {}{}",
            checkpoint.pod,
            checkpoint.node,
            checkpoint.mode,
            checkpoint.reason,
            if extras.is_empty() {
                String::new()
            } else {
                format!("; {}", extras.join("; "))
            }
        );
    }

    if !decisions.deferred.is_empty() {
        let _ = writeln!(out, "\nDeferred ({})", decisions.deferred.len());
        for deferred in &decisions.deferred {
            let _ = writeln!(
                out,
                "  {} ({:?}): {}",
                deferred.pod, deferred.trigger, deferred.reason
            );
        }
    }
    if !decisions.problems.is_empty() {
        let _ = writeln!(out, "\nProblems ({})", decisions.problems.len());
        for problem in &decisions.problems {
            let _ = writeln!(out, "  {:?}: {}", problem.severity, problem.message);
        }
    }
    out
}
