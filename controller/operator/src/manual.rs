//! Manual migrations (`kubectl migrate POD [--to NODE]`): create a Migration request and follow
//! it until it ends. The controller treats a Migration without status as a request: the next
//! decision pass takes it (to the named node, or to the best one).

use futures::StreamExt;
use kube::api::{ObjectMeta, PostParams};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, ResourceExt};

use automigrate_core::migration::Phase;

use crate::crd::{self, Migration, MigrationSpec, Origin};

#[derive(Debug, thiserror::Error)]
pub enum ManualError {
    #[error("creating the Migration failed: {0}")]
    Create(#[source] kube::Error),
    #[error("watching the Migration failed: {0}")]
    Watch(#[source] watcher::Error),
    #[error("the Migration {0} was deleted before it ended")]
    Deleted(String),
    #[error("the watch ended before the Migration did")]
    Ended,
}

impl ManualError {
    pub fn metric_label(&self) -> &'static str {
        match self {
            Self::Create(_) => "create",
            Self::Watch(_) => "watch",
            Self::Deleted(_) => "deleted",
            Self::Ended => "ended",
        }
    }
}

/// Creates a Migration request for `pod` in the Api's namespace.
pub async fn request(
    api: &Api<Migration>,
    pod: &str,
    target: Option<&str>,
    reason: &str,
) -> Result<Migration, ManualError> {
    let migration = Migration {
        metadata: ObjectMeta {
            generate_name: Some(format!(
                "{}-manual-",
                pod.chars().take(40).collect::<String>()
            )),
            labels: Some(crd::labels_for(pod)),
            ..ObjectMeta::default()
        },
        spec: MigrationSpec {
            pod: pod.to_string(),
            target: target.map(String::from),
            origin: Origin::Manual,
            trigger: Some(automigrate_core::decide::Trigger::Manual),
            reason: reason.to_string(),
        },
        status: None,
    };
    api.create(&PostParams::default(), &migration)
        .await
        .map_err(ManualError::Create)
}

/// One line for a person: phase, route, message.
pub fn describe(migration: &Migration) -> String {
    match &migration.status {
        None => format!(
            "{}: waiting for the controller to pick it up",
            migration.name_any()
        ),
        Some(status) => {
            let state = &status.state;
            let mut line = format!(
                "{}: {} {} → {}",
                migration.name_any(),
                state.phase,
                if state.source.is_empty() {
                    "?"
                } else {
                    &state.source
                },
                if state.target.is_empty() {
                    "?"
                } else {
                    &state.target
                },
            );
            if status.bytes_moved > 0 {
                line.push_str(&format!(
                    ", {} moved",
                    automigrate_core::units::approx_bytes(status.bytes_moved)
                ));
            }
            if let Some(message) = &state.message {
                line.push_str(&format!(" ({message})"));
            }
            line
        }
    }
}

/// Follows the Migration `name` until its phase is terminal, calling `on_change` with every
/// new version; returns the final phase.
pub async fn follow(
    api: &Api<Migration>,
    name: &str,
    mut on_change: impl FnMut(&Migration),
) -> Result<Phase, ManualError> {
    let config = watcher::Config::default().fields(&format!("metadata.name={name}"));
    let mut stream = std::pin::pin!(watcher(api.clone(), config).default_backoff());
    let mut last_seen: Option<String> = None;
    while let Some(event) = stream.next().await {
        let event = event.map_err(ManualError::Watch)?;
        let migration = match event {
            watcher::Event::Apply(migration) | watcher::Event::InitApply(migration) => migration,
            watcher::Event::Delete(_) => return Err(ManualError::Deleted(name.to_string())),
            watcher::Event::Init | watcher::Event::InitDone => continue,
        };
        let line = describe(&migration);
        if last_seen.as_deref() != Some(line.as_str()) {
            on_change(&migration);
            last_seen = Some(line);
        }
        if let Some(phase) = migration.phase().filter(|phase| phase.is_terminal()) {
            return Ok(phase);
        }
    }
    Err(ManualError::Ended)
}
