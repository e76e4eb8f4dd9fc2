//! Latency the controller does not measure itself, kept between decision passes: node-to-node
//! links ([`LinkBook`]) and user-to-node latency ([`UserBook`]).
//!
//! Sources:
//! - the agents' own peer probes: every `--probe-interval` the probe loop asks each node's agent
//!   for `GET /v1/peers` ([`LinkBook::refresh`]);
//! - the PromQL queries named in policies (`signals.linkLatencyQuery` / `userLatencyQuery`),
//!   run on the same interval by [`crate::prometheus`].
//!
//! Each book keeps the newest observation of each pair with the time it was made, whichever
//! source made it. An agent that answers replaces what it said before (a peer it no longer
//! lists is gone); an agent that does not answer keeps its last links until they are older than
//! the book's `max_age` (three probe rounds by default), so one missed poll does not blind the
//! latency trigger, while a dead agent's numbers do not drive decisions for ever. Without links a
//! node gets no latency decision and transfers assume the engine's default link.
//!
//! A book hands out its fresh observations as one shared allocation that stays the same until
//! an observation changes, appears or expires (an agent repeating its last answer changes
//! nothing), so the decision pass copies links and users only when they changed.
//!
//! User latency written on pods (`automigrate.dev/user-latency`) is not kept here: it lives in
//! the pods the reflector holds, and [`crate::snapshot`] reads it from there.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use automigrate_core::model::{LinkObservation, UserObservation};
use automigrate_core::units;
use jiff::Timestamp;

use crate::agent::{NodeAgent, PeerLatency};

/// Where an observation came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// A node agent's peer probes.
    Agent,
    /// A policy's PromQL query.
    Prometheus,
}

impl Source {
    pub fn label(self) -> &'static str {
        match self {
            Self::Agent => "agent",
            Self::Prometheus => "prometheus",
        }
    }
}

/// One observation with its time and source.
#[derive(Debug, Clone, PartialEq)]
pub struct Observed<T> {
    pub value: T,
    pub at: Timestamp,
    pub source: Source,
}

/// Newest observation per key, dropped once older than `max_age`.
#[derive(Debug)]
struct Book<T> {
    entries: Mutex<BTreeMap<(String, String), Observed<T>>>,
    /// The fresh values as last handed out, behind a lock of their own: while nothing changed
    /// or expired, the decision pass reads them without taking `entries`, which a probe round
    /// takes once per agent (5,000 times in a row; std's Mutex is not fair, and a pass waiting
    /// for it waited out the whole round). Shared as one allocation so that the pass copies
    /// 40,000 links only when they changed.
    published: Mutex<Option<Published<T>>>,
    max_age: Duration,
}

#[derive(Debug)]
struct Published<T> {
    values: Arc<[T]>,
    /// The oldest observation when published. Observations since then are newer or change a
    /// value (which withdraws this), so none has expired while this is younger than `max_age`.
    oldest: Option<Timestamp>,
}

impl<T: Clone + PartialEq> Book<T> {
    fn new(max_age: Duration) -> Self {
        Self {
            entries: Mutex::new(BTreeMap::new()),
            published: Mutex::new(None),
            max_age,
        }
    }

    /// Fresh observations at `now`, in key order (so snapshots are deterministic). Expired ones
    /// are removed. The same allocation as the last call's while no value changed.
    fn current(&self, now: Timestamp) -> Arc<[T]> {
        if let Ok(published) = self.published.lock()
            && let Some(published) = published.as_ref()
            && published
                .oldest
                .is_none_or(|oldest| units::age(now, oldest) <= self.max_age)
        {
            return published.values.clone();
        }
        // Lock order: `entries`, then `published` (as in `record`).
        let Ok(mut entries) = self.entries.lock() else {
            return Arc::from(Vec::new());
        };
        let before = entries.len();
        entries.retain(|_, observed| units::age(now, observed.at) <= self.max_age);
        let oldest = entries.values().map(|observed| observed.at).min();
        let Ok(mut published) = self.published.lock() else {
            return Arc::from(Vec::new());
        };
        let values = match published.take() {
            Some(kept) if entries.len() == before => kept.values,
            _ => entries
                .values()
                .map(|observed| observed.value.clone())
                .collect(),
        };
        *published = Some(Published {
            values: values.clone(),
            oldest,
        });
        values
    }

    fn observed(&self) -> Vec<((String, String), Observed<T>)> {
        self.entries
            .lock()
            .map(|entries| {
                entries
                    .iter()
                    .map(|(key, observed)| (key.clone(), observed.clone()))
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Records `values` at `now`; when `replace` is given, first forgets that source's
    /// observations whose key starts with that first part (an agent answering for its node).
    fn record(
        &self,
        source: Source,
        replace: Option<&str>,
        values: impl IntoIterator<Item = ((String, String), T)>,
        now: Timestamp,
    ) -> usize {
        let Ok(mut entries) = self.entries.lock() else {
            return 0;
        };
        // What the replaced answer said, to tell whether the new one says anything else.
        let mut replaced: BTreeMap<(String, String), T> = BTreeMap::new();
        if let Some(first) = replace {
            // Keys sort by their first part: that part's entries are one range, found in
            // O(log n), not a scan of the book (5,000 agents answering a 40,000-link book
            // made the scan quadratic).
            let stale: Vec<(String, String)> = entries
                .range((first.to_string(), String::new())..)
                .take_while(|((key, _), _)| key == first)
                .filter(|(_, observed)| observed.source == source)
                .map(|(key, _)| key.clone())
                .collect();
            for key in stale {
                if let Some(observed) = entries.remove(&key) {
                    replaced.insert(key, observed.value);
                }
            }
        }
        // Each key's value before this call, taken the first time the key comes: a source may
        // name a pair twice (the last one stands), and only the value that stands counts.
        let mut before: BTreeMap<(String, String), Option<T>> = BTreeMap::new();
        let mut count = 0;
        for (key, value) in values {
            count += 1;
            let previous = entries.insert(
                key.clone(),
                Observed {
                    value,
                    at: now,
                    source,
                },
            );
            if let std::collections::btree_map::Entry::Vacant(first) = before.entry(key) {
                let old = replaced
                    .remove(first.key())
                    .or_else(|| previous.map(|observed| observed.value));
                first.insert(old);
            }
        }
        let changed = before
            .iter()
            .any(|(key, old)| entries.get(key).map(|observed| &observed.value) != old.as_ref());
        if (changed || !replaced.is_empty())
            && let Ok(mut published) = self.published.lock()
        {
            *published = None;
        }
        count
    }
}

/// Node-to-node links by `(from, to)`.
#[derive(Debug, Clone)]
pub struct LinkBook {
    book: Arc<Book<LinkObservation>>,
}

impl Default for LinkBook {
    /// Keeps observations for 90 s: three rounds of the default 30 s probe interval.
    fn default() -> Self {
        Self::new(Duration::from_secs(90))
    }
}

impl LinkBook {
    pub fn new(max_age: Duration) -> Self {
        Self {
            book: Arc::new(Book::new(max_age)),
        }
    }

    /// The links to give the engine at `now`: each pair's newest observation, if fresh.
    pub fn current(&self, now: Timestamp) -> Vec<LinkObservation> {
        self.book.current(now).to_vec()
    }

    /// [`Self::current`], shared: the same allocation as the last call's while the links are
    /// the same, so a caller that kept a copy can tell with [`Arc::ptr_eq`] that it is current.
    pub fn current_shared(&self, now: Timestamp) -> Arc<[LinkObservation]> {
        self.book.current(now)
    }

    /// Everything held, with times and sources (expired entries included until the next
    /// [`LinkBook::current`]).
    pub fn observed(&self) -> Vec<Observed<LinkObservation>> {
        self.book
            .observed()
            .into_iter()
            .map(|(_, observed)| observed)
            .collect()
    }

    /// What `node`'s agent measured at `now`; replaces that agent's earlier answer.
    pub fn record_agent(&self, node: &str, peers: Vec<PeerLatency>, now: Timestamp) -> usize {
        let links = peers.into_iter().map(|peer| {
            (
                (node.to_string(), peer.node.clone()),
                LinkObservation {
                    from: node.to_string(),
                    to: peer.node,
                    rtt: peer.rtt,
                    bandwidth: None,
                    loss: peer.loss,
                    answering: peer.answering,
                },
            )
        });
        self.book.record(Source::Agent, Some(node), links, now)
    }

    /// Links from another source (a PromQL query) at `now`; each overrides its pair.
    pub fn record(&self, source: Source, links: Vec<LinkObservation>, now: Timestamp) -> usize {
        let links = links
            .into_iter()
            .map(|link| ((link.from.clone(), link.to.clone()), link));
        self.book.record(source, None, links, now)
    }

    /// Asks every node's agent for its probes at `now`, all at once, each for at most
    /// [`PEER_QUERY_TIMEOUT`]. Returns how many agents answered.
    ///
    /// At once and bounded because the round that matters most is the one the reach loop runs
    /// while a node is silent: that node's agent is likely dead, and a call to it waits for the
    /// TCP connect to time out (three tries of the agent client's connect limit). Asked one
    /// after the other, it held up the answers of the live peers that say the node is gone,
    /// and peer-confirmed failure never came before the Lease timeout (fault suite, issue 16
    /// campaign: power-off detected at 15 s, the Lease timeout, instead of ~3 s).
    #[tracing::instrument(level = "debug", skip_all, fields(nodes = nodes.len()))]
    pub async fn refresh(&self, agent: &dyn NodeAgent, nodes: &[String], now: Timestamp) -> usize {
        let answers = futures::future::join_all(nodes.iter().map(|node| async move {
            let answer = tokio::time::timeout(PEER_QUERY_TIMEOUT, agent.peers(node)).await;
            (node, answer)
        }))
        .await;
        let mut answered = 0;
        for (node, answer) in answers {
            match answer {
                Ok(Ok(peers)) => {
                    answered += 1;
                    self.record_agent(node, peers, now);
                    crate::metrics::signal_query(Source::Agent, true);
                }
                Ok(Err(error)) => {
                    tracing::debug!(%node, %error, "no peer probes from this agent");
                    crate::metrics::signal_query(Source::Agent, false);
                }
                Err(_) => {
                    tracing::debug!(%node, "no peer probes from this agent in time");
                    crate::metrics::signal_query(Source::Agent, false);
                }
            }
        }
        answered
    }
}

/// The longest one agent's answer to a peer-probe query is awaited: a live agent answers
/// from memory in milliseconds; one that takes longer is treated as not answering this round.
pub const PEER_QUERY_TIMEOUT: Duration = Duration::from_secs(2);

/// User-to-node latency by `(user, node)`, from PromQL.
#[derive(Debug, Clone)]
pub struct UserBook {
    book: Arc<Book<UserObservation>>,
}

impl Default for UserBook {
    /// Keeps observations for 90 s, like [`LinkBook::default`].
    fn default() -> Self {
        Self::new(Duration::from_secs(90))
    }
}

impl UserBook {
    pub fn new(max_age: Duration) -> Self {
        Self {
            book: Arc::new(Book::new(max_age)),
        }
    }

    pub fn current(&self, now: Timestamp) -> Vec<UserObservation> {
        self.book.current(now).to_vec()
    }

    /// [`Self::current`], shared, as [`LinkBook::current_shared`].
    pub fn current_shared(&self, now: Timestamp) -> Arc<[UserObservation]> {
        self.book.current(now)
    }

    pub fn record(&self, source: Source, users: Vec<UserObservation>, now: Timestamp) -> usize {
        let users = users
            .into_iter()
            .map(|user| ((user.user.clone(), user.node.clone()), user));
        self.book.record(source, None, users, now)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::agent::RecordingAgent;

    fn t(seconds: i64) -> Timestamp {
        Timestamp::from_second(1_800_000_000 + seconds).unwrap()
    }

    fn peer(node: &str, millis: u64) -> PeerLatency {
        PeerLatency {
            node: node.into(),
            rtt: Duration::from_millis(millis),
            loss: 0.01,
            answering: None,
        }
    }

    fn pairs(links: &[LinkObservation]) -> Vec<(String, String, u128)> {
        links
            .iter()
            .map(|link| (link.from.clone(), link.to.clone(), link.rtt.as_millis()))
            .collect()
    }

    /// The recording double, except that the agent of `silent` never answers (a powered-off
    /// node: the call waits for a connect that never comes).
    #[derive(Debug)]
    struct SilentAgent {
        inner: RecordingAgent,
        silent: &'static str,
    }

    impl crate::agent::NodeAgent for SilentAgent {
        fn checkpoint<'a>(
            &'a self,
            node: &'a str,
            pod: &'a automigrate_core::model::PodRef,
            container: &'a str,
            kind: crate::agent::CheckpointKind,
        ) -> crate::agent::AgentResult<'a, crate::agent::CheckpointTaken> {
            self.inner.checkpoint(node, pod, container, kind)
        }

        fn checkpoints<'a>(
            &'a self,
            node: &'a str,
            pod: &'a automigrate_core::model::PodRef,
        ) -> crate::agent::AgentResult<'a, Vec<crate::agent::CheckpointTaken>> {
            self.inner.checkpoints(node, pod)
        }

        fn start_transfer<'a>(
            &'a self,
            from: &'a str,
            payload: &'a crate::crd::TransferPayload,
            to: &'a str,
        ) -> crate::agent::AgentResult<'a, crate::agent::TransferProgress> {
            self.inner.start_transfer(from, payload, to)
        }

        fn transfer_status<'a>(
            &'a self,
            node: &'a str,
            id: &'a str,
        ) -> crate::agent::AgentResult<'a, crate::agent::TransferProgress> {
            self.inner.transfer_status(node, id)
        }

        fn build_image<'a>(
            &'a self,
            node: &'a str,
            checkpoint_id: &'a str,
        ) -> crate::agent::AgentResult<'a, String> {
            self.inner.build_image(node, checkpoint_id)
        }

        fn peers<'a>(&'a self, node: &'a str) -> crate::agent::AgentResult<'a, Vec<PeerLatency>> {
            use futures::FutureExt;
            if node == self.silent {
                return futures::future::pending().boxed();
            }
            self.inner.peers(node)
        }
    }

    #[tokio::test]
    async fn a_silent_agent_does_not_hold_up_the_others_answers() {
        let agent = SilentAgent {
            inner: RecordingAgent::new(),
            silent: "a",
        };
        agent.inner.set_peers(
            "b",
            vec![PeerLatency {
                answering: Some(false),
                ..peer("a", 12)
            }],
        );
        agent.inner.set_peers("c", vec![peer("a", 9)]);
        let book = LinkBook::default();
        let nodes = ["a".to_string(), "b".to_string(), "c".to_string()];
        // Bounded by the test, so that a refresh that waits for the silent agent fails
        // instead of hanging.
        let answered =
            tokio::time::timeout(PEER_QUERY_TIMEOUT * 5, book.refresh(&agent, &nodes, t(0)))
                .await
                .expect("the refresh waited for the silent agent");
        assert_eq!(answered, 2);
        let links = book.current(t(0));
        assert_eq!(
            pairs(&links),
            vec![("b".into(), "a".into(), 12), ("c".into(), "a".into(), 9)]
        );
        assert_eq!(links[0].answering, Some(false));
    }

    #[tokio::test]
    async fn refresh_keeps_what_answering_agents_measured() {
        let agent = RecordingAgent::new();
        agent.set_peers("a", vec![peer("b", 12)]);
        agent.unreachable("c");
        let book = LinkBook::default();
        let answered = book
            .refresh(&agent, &["a".into(), "b".into(), "c".into()], t(0))
            .await;
        assert_eq!(answered, 2);
        let links = book.current(t(0));
        assert_eq!(pairs(&links), [("a".into(), "b".into(), 12)]);
        assert_eq!(links[0].loss, 0.01);
        let observed = book.observed();
        assert_eq!((observed[0].at, observed[0].source), (t(0), Source::Agent));
    }

    #[tokio::test]
    async fn a_silent_agent_keeps_its_links_until_they_are_too_old() {
        let agent = RecordingAgent::new();
        agent.set_peers("a", vec![peer("b", 12), peer("c", 30)]);
        agent.set_peers("b", vec![peer("a", 11)]);
        let book = LinkBook::new(Duration::from_secs(90));
        let nodes = ["a".to_string(), "b".to_string()];
        book.refresh(&agent, &nodes, t(0)).await;

        // b's agent goes silent; a's now lists only b, with a new RTT.
        agent.unreachable("b");
        agent.set_peers("a", vec![peer("b", 40)]);
        book.refresh(&agent, &nodes, t(30)).await;
        assert_eq!(
            pairs(&book.current(t(30))),
            [("a".into(), "b".into(), 40), ("b".into(), "a".into(), 11)],
            "a's answer replaced its old one (a→c is gone); b's last answer is kept"
        );
        assert_eq!(
            pairs(&book.current(t(90))),
            [("a".into(), "b".into(), 40), ("b".into(), "a".into(), 11)],
            "90 s old is still fresh"
        );
        assert_eq!(
            pairs(&book.current(t(91))),
            [("a".into(), "b".into(), 40)],
            "b's links expired"
        );
    }

    #[test]
    fn the_newest_observation_of_a_pair_wins_whatever_its_source() {
        let book = LinkBook::default();
        book.record_agent("a", vec![peer("b", 12)], t(0));
        let from_prometheus = LinkObservation {
            from: "a".into(),
            to: "b".into(),
            rtt: Duration::from_millis(70),
            bandwidth: None,
            loss: 0.0,
            answering: None,
        };
        book.record(Source::Prometheus, vec![from_prometheus], t(5));
        assert_eq!(pairs(&book.current(t(5))), [("a".into(), "b".into(), 70)]);
        // The agent answering again replaces only its own entries, then records its pair anew.
        book.record_agent("a", vec![peer("b", 13)], t(10));
        assert_eq!(pairs(&book.current(t(10))), [("a".into(), "b".into(), 13)]);
        // An agent answering with no peers does not erase Prometheus's observation.
        book.record(
            Source::Prometheus,
            vec![LinkObservation {
                from: "a".into(),
                to: "c".into(),
                rtt: Duration::from_millis(5),
                bandwidth: None,
                loss: 0.0,
                answering: None,
            }],
            t(11),
        );
        book.record_agent("a", Vec::new(), t(12));
        assert_eq!(pairs(&book.current(t(12))), [("a".into(), "c".into(), 5)]);
    }

    #[test]
    fn the_shared_list_stays_the_same_allocation_until_something_changes() {
        let book = LinkBook::new(Duration::from_secs(60));
        book.record_agent("a", vec![peer("b", 12), peer("c", 30)], t(0));
        let first = book.current_shared(t(0));
        // The agent repeats itself: same values, a newer time.
        book.record_agent("a", vec![peer("b", 12), peer("c", 30)], t(30));
        let repeated = book.current_shared(t(30));
        assert!(Arc::ptr_eq(&first, &repeated));
        // Still fresh at 61 s thanks to the repeat; nothing expired.
        assert!(Arc::ptr_eq(&first, &book.current_shared(t(61))));
        // A value changes.
        book.record_agent("a", vec![peer("b", 13), peer("c", 30)], t(62));
        let changed = book.current_shared(t(62));
        assert!(!Arc::ptr_eq(&first, &changed));
        assert_eq!(
            pairs(&changed),
            [("a".into(), "b".into(), 13), ("a".into(), "c".into(), 30)]
        );
        // A peer is no longer listed.
        book.record_agent("a", vec![peer("b", 13)], t(63));
        let fewer = book.current_shared(t(63));
        assert!(!Arc::ptr_eq(&changed, &fewer));
        assert_eq!(fewer.len(), 1);
        // Another source adds a pair.
        let users = UserBook::new(Duration::from_secs(60));
        let seen = UserObservation {
            user: "alice".into(),
            node: "a".into(),
            latency: Duration::from_millis(10),
        };
        users.record(Source::Prometheus, vec![seen.clone()], t(0));
        let before = users.current_shared(t(0));
        users.record(Source::Prometheus, vec![seen.clone()], t(10));
        assert!(Arc::ptr_eq(&before, &users.current_shared(t(10))));
        // A source naming a pair twice: the last value stands, and repeating that is no change.
        let twice = |millis: u64| {
            vec![
                seen.clone(),
                UserObservation {
                    latency: Duration::from_millis(millis),
                    ..seen.clone()
                },
            ]
        };
        users.record(Source::Prometheus, twice(30), t(20));
        let doubled = users.current_shared(t(20));
        assert!(!Arc::ptr_eq(&before, &doubled));
        assert_eq!(doubled[0].latency, Duration::from_millis(30));
        users.record(Source::Prometheus, twice(30), t(30));
        assert!(Arc::ptr_eq(&doubled, &users.current_shared(t(30))));
        // Expiry.
        assert!(!Arc::ptr_eq(&fewer, &book.current_shared(t(124))));
        assert!(book.current_shared(t(124)).is_empty());
    }

    #[test]
    fn user_book_expires_and_overrides() {
        let book = UserBook::new(Duration::from_secs(60));
        let seen = |node: &str, millis: u64| UserObservation {
            user: "alice".into(),
            node: node.into(),
            latency: Duration::from_millis(millis),
        };
        book.record(Source::Prometheus, vec![seen("a", 10), seen("b", 80)], t(0));
        book.record(Source::Prometheus, vec![seen("b", 20)], t(30));
        assert_eq!(book.current(t(30)), [seen("a", 10), seen("b", 20)]);
        assert_eq!(book.current(t(61)), [seen("b", 20)]);
        assert!(book.current(t(91)).is_empty());
    }
}
