//! Persisting the driver's run into the Migration's status, and what a phase change tells the
//! world: the phase-duration histogram, a log line, an Event on the Migration, and when the
//! migration ends its result metrics and Events on the old and the new pod.

use automigrate_core::driver::{PersistError, Run};
use automigrate_core::migration::{MigrationState, Phase};
use jiff::Timestamp;
use k8s_openapi::api::core::v1::ObjectReference;
use kube::runtime::events::EventType;
use kube::{Resource, ResourceExt};

use super::port::OperatorPort;
use super::status::{conditions, ended_phase_seconds, log_phase_change, merge_conditions, set_run};
use super::{ExecError, migration_key};
use crate::crd::{Migration, MigrationStatus};

fn pod_reference(namespace: &str, name: &str, uid: Option<&str>) -> ObjectReference {
    ObjectReference {
        api_version: Some("v1".into()),
        kind: Some("Pod".into()),
        name: Some(name.into()),
        namespace: Some(namespace.into()),
        uid: uid.map(String::from),
        ..ObjectReference::default()
    }
}

impl OperatorPort<'_> {
    /// Writes `run` (with the port's own fields) as the status; after a state-machine event
    /// (`previous` set) also reports the phase change.
    pub(super) async fn save(
        &mut self,
        run: &Run,
        previous: Option<&MigrationState>,
        now: Timestamp,
    ) -> Result<(), PersistError> {
        let mut status = self.status.clone();
        set_run(&mut status, run);
        let updated = match self.write(status.clone(), now).await {
            Ok(updated) => updated,
            Err(error) => {
                let failure = PersistError {
                    reason: error.to_string(),
                    label: error.metric_label(),
                };
                if let ExecError::Persist(error) = error {
                    self.write_error = Some(error);
                }
                return Err(failure);
            }
        };
        if let Some(previous) = previous {
            self.report(&updated, previous, &status).await;
        }
        self.status = updated.status.clone().unwrap_or(status);
        self.current = updated;
        Ok(())
    }

    async fn write(
        &self,
        mut status: MigrationStatus,
        now: Timestamp,
    ) -> Result<Migration, ExecError> {
        let current = &self.current;
        let namespace = current
            .namespace()
            .ok_or_else(|| ExecError::Unnamed(current.name_any()))?;
        status.observed_generation = current.metadata.generation;
        status.conditions = merge_conditions(
            &status.conditions,
            conditions(&status.state, current.metadata.generation, now),
        );
        let updated = self
            .executor
            .writer
            .patch_migration_status(&namespace, &current.name_any(), status)
            .await
            .map_err(ExecError::Persist)?;
        if let Ok(mut written) = self.executor.written.lock() {
            written.insert(migration_key(&updated), updated.clone());
        }
        Ok(updated)
    }

    /// Metrics, the log line and Events of one state-machine event.
    async fn report(
        &self,
        updated: &Migration,
        previous: &MigrationState,
        status: &MigrationStatus,
    ) {
        let (before, after) = (previous.phase, status.state.phase);
        // Every phase (or escalated rollback stage) this event ended, timed from the persisted
        // phase timestamps.
        for (phase, seconds) in ended_phase_seconds(&status.state, previous.history.len()) {
            metrics::histogram!(crate::metrics::PHASE_SECONDS, "phase" => phase.to_string())
                .record(seconds);
        }
        if before == after {
            return;
        }
        log_phase_change(before, after, status.state.message.as_deref());
        let warning = matches!(
            after,
            Phase::RollingBack | Phase::Failed | Phase::RolledBack | Phase::Restarted
        );
        self.executor
            .writer
            .event(
                updated.object_ref(&()),
                if warning {
                    EventType::Warning
                } else {
                    EventType::Normal
                },
                &after.to_string(),
                status
                    .state
                    .message
                    .clone()
                    .unwrap_or_else(|| format!("{before} → {after}")),
                "Migrate",
            )
            .await;
        if after.is_terminal() {
            self.finished(updated, status).await;
        }
    }

    /// Metrics and pod Events when a migration ends.
    async fn finished(&self, migration: &Migration, status: &MigrationStatus) {
        let state = &status.state;
        let reason = migration
            .spec
            .trigger
            .map(|trigger| format!("{trigger:?}"))
            .unwrap_or_else(|| "Manual".into());
        metrics::counter!(crate::metrics::MIGRATIONS, "result" => state.phase.to_string(), "reason" => reason)
            .increment(1);
        if let Some(downtime) = state.downtime {
            metrics::histogram!(crate::metrics::DOWNTIME_SECONDS).record(downtime.as_secs_f64());
        }
        let namespace = migration.namespace().unwrap_or_default();
        let message = state.message.clone().unwrap_or_default();
        let (event_type, reason) = match state.phase {
            Phase::Succeeded => (EventType::Normal, "Migrated"),
            Phase::RolledBack => (EventType::Warning, "MigrationRolledBack"),
            Phase::Restarted => (EventType::Warning, "MigrationRestarted"),
            _ => (EventType::Warning, "MigrationFailed"),
        };
        let note = format!(
            "migration {} from {} to {}: {} ({message})",
            migration.name_any(),
            state.source,
            state.target,
            state.phase
        );
        let writer = &self.executor.writer;
        writer
            .event(
                pod_reference(
                    &namespace,
                    &migration.spec.pod,
                    status.source_pod_uid.as_deref(),
                ),
                event_type,
                reason,
                note.clone(),
                "Migrate",
            )
            .await;
        if state.phase == Phase::Succeeded
            && let Some(replacement) = &status.replacement_pod
        {
            let uid = self
                .executor
                .stores
                .pod(&namespace, replacement)
                .and_then(|pod| pod.metadata.uid.clone());
            writer
                .event(
                    pod_reference(&namespace, replacement, uid.as_deref()),
                    EventType::Normal,
                    "Restored",
                    note,
                    "Migrate",
                )
                .await;
        }
    }
}
