//! Watch: change records, the kept history, and the newline-delimited event stream.
//!
//! Data model: every committed write becomes one [`Change`] (its resourceVersion, ADDED /
//! MODIFIED / DELETED, the new object and the previous one, both shared `Arc`s, never deep
//! copies). Each resource type keeps the last N changes (the history a watch can resume from)
//! and a broadcast channel of [`WatchSignal`]s for open watches. A watch request subscribes
//! under the store lock, replays the history after its resourceVersion (or the current state as
//! ADDED events), then follows the channel. The response body is a stream of JSON `WatchEvent`
//! lines, filtered per watch by namespace and selectors, with the API server's translation of
//! selector transitions (an update that makes an object stop matching is a DELETED event, one
//! that makes it start matching is an ADDED event). A watcher that falls further behind than the
//! channel holds gets a `410 Expired` ERROR event and must re-list, as on a real server.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body::Frame;
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, StreamBody};
use serde_json::{Value, json};
use tokio::sync::broadcast;
use tokio::time::Sleep;

use crate::error::ApiError;
use crate::selector::{FieldSelector, LabelSelector};

/// What a committed write did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ChangeKind {
    Added,
    Modified,
    Deleted,
}

/// One committed write, as kept in the history and sent to open watches.
#[derive(Debug)]
pub(crate) struct Change {
    /// The resourceVersion the write produced.
    pub rv: u64,
    pub kind: ChangeKind,
    /// Namespace of the object (empty for cluster-scoped).
    pub namespace: String,
    /// The object after the write (for deletions, its final state).
    pub object: Arc<Value>,
    /// The object before the write (updates only), for selector transitions.
    pub previous: Option<Arc<Value>>,
}

/// What open watches of one resource type are told.
#[derive(Debug, Clone)]
pub(crate) enum WatchSignal {
    Change(Arc<Change>),
    /// Send a BOOKMARK at this resourceVersion (to watches that allowed bookmarks).
    Bookmark(u64),
    /// End every open watch stream (as an API server restart or a load balancer would).
    Close,
}

/// Which objects one watch (or list) sees.
#[derive(Debug, Clone, Default)]
pub(crate) struct Filter {
    pub namespace: Option<String>,
    pub labels: LabelSelector,
    pub fields: FieldSelector,
}

impl Filter {
    pub fn matches(&self, namespace: &str, object: &Value) -> bool {
        if let Some(ns) = &self.namespace
            && ns != namespace
        {
            return false;
        }
        self.labels.matches(object) && self.fields.matches(object)
    }
}

/// How objects are rendered in responses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Rendering {
    Full,
    /// `Accept: application/json;as=PartialObjectMetadata...`
    MetadataOnly,
    /// `Accept: application/json;as=Table...` (kubectl get): one `Table` per object, with the
    /// resource type's columns.
    Table(Arc<crate::table::TableSpec>),
}

impl Rendering {
    pub fn render<'a>(&self, object: &'a Value) -> std::borrow::Cow<'a, Value> {
        match self {
            Rendering::Full => std::borrow::Cow::Borrowed(object),
            Rendering::MetadataOnly => std::borrow::Cow::Owned(json!({
                "apiVersion": "meta.k8s.io/v1",
                "kind": "PartialObjectMetadata",
                "metadata": object.get("metadata").cloned().unwrap_or_else(|| json!({})),
            })),
            Rendering::Table(spec) => {
                std::borrow::Cow::Owned(spec.table([object], None, jiff::Timestamp::now()))
            }
        }
    }
}

/// The response body type of the fake server.
pub(crate) type ResponseBody = UnsyncBoxBody<Bytes, Infallible>;

/// Everything a watch stream needs once the store lock is released.
pub(crate) struct WatchStart {
    /// Event lines to send first (initial state or history replay).
    pub initial: VecDeque<Bytes>,
    /// Live signals; `None` when the stream should end after `initial` (e.g. 410).
    pub receiver: Option<broadcast::Receiver<WatchSignal>>,
    pub filter: Filter,
    pub rendering: Rendering,
    pub bookmarks: bool,
    pub timeout: Duration,
    /// resourceVersion the stream is known to be current at.
    pub start_rv: u64,
    pub kind: String,
    pub api_version: String,
}

/// One `WatchEvent` JSON line.
pub(crate) fn event_line(event_type: &str, object: &Value) -> Bytes {
    let mut line =
        serde_json::to_vec(&json!({ "type": event_type, "object": object })).unwrap_or_default();
    line.push(b'\n');
    Bytes::from(line)
}

/// An ERROR event carrying a Status (used for 410 Expired).
pub(crate) fn error_line(error: &ApiError) -> Bytes {
    event_line("ERROR", &error.to_status())
}

pub(crate) fn bookmark_line(
    kind: &str,
    api_version: &str,
    rv: u64,
    initial_events_end: bool,
) -> Bytes {
    let mut metadata = json!({ "resourceVersion": rv.to_string() });
    if initial_events_end && let Some(map) = metadata.as_object_mut() {
        map.insert(
            "annotations".into(),
            json!({ "k8s.io/initial-events-end": "true" }),
        );
    }
    event_line(
        "BOOKMARK",
        &json!({ "kind": kind, "apiVersion": api_version, "metadata": metadata }),
    )
}

/// The event (type, object) a watch with `filter` sees for `change`, if any.
pub(crate) fn translate(change: &Change, filter: &Filter) -> Option<(&'static str, Arc<Value>)> {
    let now = filter.matches(&change.namespace, &change.object);
    match change.kind {
        ChangeKind::Added => now.then(|| ("ADDED", change.object.clone())),
        ChangeKind::Deleted => now.then(|| ("DELETED", change.object.clone())),
        ChangeKind::Modified => {
            let before = change
                .previous
                .as_ref()
                .is_some_and(|prev| filter.matches(&change.namespace, prev));
            match (before, now) {
                (true, true) => Some(("MODIFIED", change.object.clone())),
                (false, true) => Some(("ADDED", change.object.clone())),
                (true, false) => Some(("DELETED", change.object.clone())),
                (false, false) => None,
            }
        }
    }
}

struct StreamState {
    pending: VecDeque<Bytes>,
    receiver: Option<broadcast::Receiver<WatchSignal>>,
    filter: Filter,
    rendering: Rendering,
    bookmarks: bool,
    deadline: Pin<Box<Sleep>>,
    last_rv: u64,
    kind: String,
    api_version: String,
    finished: bool,
}

impl StreamState {
    fn on_signal(&mut self, signal: Result<WatchSignal, broadcast::error::RecvError>) {
        match signal {
            Ok(WatchSignal::Change(change)) => {
                if change.rv <= self.last_rv {
                    return;
                }
                self.last_rv = change.rv;
                if let Some((event_type, object)) = translate(&change, &self.filter) {
                    self.pending
                        .push_back(event_line(event_type, &self.rendering.render(&object)));
                }
            }
            Ok(WatchSignal::Bookmark(rv)) => {
                if rv > self.last_rv {
                    self.last_rv = rv;
                }
                if self.bookmarks {
                    self.pending.push_back(bookmark_line(
                        &self.kind,
                        &self.api_version,
                        self.last_rv,
                        false,
                    ));
                }
            }
            Ok(WatchSignal::Close) | Err(broadcast::error::RecvError::Closed) => {
                self.finished = true;
            }
            Err(broadcast::error::RecvError::Lagged(missed)) => {
                tracing::debug!(
                    missed,
                    "watcher fell behind the watch channel; answering 410"
                );
                self.pending.push_back(error_line(&ApiError::Expired {
                    requested: self.last_rv,
                    oldest: self.last_rv.saturating_add(missed),
                }));
                self.finished = true;
            }
        }
    }
}

/// Builds the streaming response body of a watch.
pub(crate) fn stream_body(start: WatchStart) -> ResponseBody {
    let state = StreamState {
        pending: start.initial,
        finished: start.receiver.is_none(),
        receiver: start.receiver,
        filter: start.filter,
        rendering: start.rendering,
        bookmarks: start.bookmarks,
        deadline: Box::pin(tokio::time::sleep(start.timeout)),
        last_rv: start.start_rv,
        kind: start.kind,
        api_version: start.api_version,
    };
    let stream = futures::stream::unfold(state, |mut state| async move {
        loop {
            if let Some(line) = state.pending.pop_front() {
                return Some((Ok::<_, Infallible>(Frame::data(line)), state));
            }
            if state.finished {
                return None;
            }
            let receiver = state.receiver.as_mut()?;
            tokio::select! {
                signal = receiver.recv() => state.on_signal(signal),
                () = &mut state.deadline => {
                    // A real server sends a last bookmark before a timed-out watch ends, so the
                    // client resumes from the newest version instead of re-listing.
                    if state.bookmarks {
                        state.pending.push_back(bookmark_line(&state.kind, &state.api_version, state.last_rv, false));
                    }
                    state.finished = true;
                }
            }
        }
    });
    StreamBody::new(stream).boxed_unsync()
}
