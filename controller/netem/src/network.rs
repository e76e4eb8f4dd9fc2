//! Emulated networks: N nodes (network namespaces) that all reach each other over emulated links
//! with their own parameters per direction, and the two-node special case [`EmulatedPair`].
//!
//! Data model: network `ID` (claimed host-wide, see `claim.rs`) owns the subnet `10.213.ID.0/24`.
//! Node `i` is the namespace `amnetID-PREFIX-i` holding one TUN interface named [`INTERFACE`]
//! with address `10.213.ID.(i+1)/24`; every directed pair `(from, to)` has one [`Link`]. Nodes
//! are plain indices `0..node_count`. There is no root-namespace address: traffic only flows
//! between the nodes, through the relay.
//!
//! Teardown (on drop) runs in dependency order: stop the relay and close the TUN devices, delete
//! the namespaces, then release the id.

use std::ffi::OsStr;
use std::net::Ipv4Addr;
use std::process::Command;

use tun_rs::{DeviceBuilder, SyncDevice};

use crate::claim::{ClaimError, NetworkClaim, claim_network_id, namespace_prefix};
use crate::congestion::{CongestionError, set_namespace_congestion_control};
use crate::link::{Link, LinkError, MTU_BYTES};
use crate::namespace::{
    Namespace, NamespaceError, namespace_command, namespace_sysctl, run_in_namespace,
    set_namespace_sysctl,
};
use crate::relay::{LinkStats, Relay, RelayError};

/// Name of the emulated interface inside every node's namespace.
pub const INTERFACE: &str = "emu0";

/// Packets a node's kernel may queue in its TUN device before the relay reads them (the kernel
/// default is 500). The relay stamps packets when it reads them, so on a busy machine a late
/// reader costs delay; with the default queue it cost loss instead (measured: 0.7 % extra loss
/// at 20k packets/s with the two cores contended), which is worse for a loss emulator. 10 000
/// full-size packets are 600 ms at 200 Mbit/s.
pub const TUN_QUEUE_PACKETS: u32 = 10_000;

/// Relay thread priority unless [`NetworkOptions`] say otherwise: `SCHED_FIFO` 10. Measured
/// (`docs/netem.md`): with the machine's two cores shared, it bounds the relay's own delivery
/// lateness to ≤ 100 µs at p99 where normal priority reached 5-10 ms and more. 10 is low among
/// real-time priorities, so kernel threads and anything deliberately real-time still win.
pub const DEFAULT_REALTIME_PRIORITY: Option<u8> = Some(10);

/// The most nodes one network can have (hosts .1 to .253 of its /24).
pub const MAX_NODES: usize = 253;

/// What went wrong building or driving an emulated network.
#[derive(Debug, thiserror::Error)]
pub enum NetworkError {
    /// The name prefix would make an invalid namespace name.
    #[error("invalid name prefix {0:?}: use 1-32 characters of [A-Za-z0-9_-]")]
    InvalidPrefix(String),
    /// Fewer than two or more than [`MAX_NODES`] nodes.
    #[error("a network needs 2 to {MAX_NODES} nodes, got {0}")]
    NodeCount(usize),
    /// A node index out of range.
    #[error("no node {node} (the network has {node_count})")]
    NoSuchNode {
        /// The index asked for.
        node: usize,
        /// How many nodes there are.
        node_count: usize,
    },
    /// A link from a node to itself.
    #[error("node {0} has no link to itself")]
    SelfLink(usize),
    /// Invalid link parameters.
    #[error("invalid link {from} -> {to}: {source}")]
    Link {
        /// Sending node.
        from: usize,
        /// Receiving node.
        to: usize,
        /// What is wrong with it.
        #[source]
        source: LinkError,
    },
    /// No network id could be claimed.
    #[error(transparent)]
    Claim(#[from] ClaimError),
    /// A namespace operation failed.
    #[error(transparent)]
    Namespace(#[from] NamespaceError),
    /// The TUN device of a node could not be created.
    #[error(
        "cannot create the TUN device of node {node} (is /dev/net/tun there, are we root?): {source}"
    )]
    Tun {
        /// The node.
        node: usize,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// The relay could not start.
    #[error(transparent)]
    Relay(#[from] RelayError),
    /// A congestion control could not be set.
    #[error(transparent)]
    Congestion(#[from] CongestionError),
}

/// How an emulated network runs, beyond its links.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NetworkOptions {
    /// Run the relay threads under `SCHED_FIFO` at this priority (1-99), so that other work on
    /// the machine cannot delay packets; `None` runs them at normal priority. See
    /// `docs/netem.md` for what it changes in the measurements.
    pub realtime_priority: Option<u8>,
}

impl Default for NetworkOptions {
    fn default() -> Self {
        Self {
            realtime_priority: DEFAULT_REALTIME_PRIORITY,
        }
    }
}

/// N network namespaces joined by emulated links. See the module header.
#[derive(Debug)]
pub struct EmulatedNetwork {
    // Field order is drop order: relay (closes the devices) before namespaces before the claim.
    relay: Relay,
    namespaces: Vec<Namespace>,
    claim: NetworkClaim,
}

impl EmulatedNetwork {
    /// A network of `node_count` nodes where every directed link is `link`.
    pub fn create(name_prefix: &str, node_count: usize, link: Link) -> Result<Self, NetworkError> {
        Self::create_with(name_prefix, node_count, |_, _| link)
    }

    /// A network of `node_count` nodes where the directed link `from -> to` is
    /// `link_for(from, to)` (never called with `from == to`).
    pub fn create_with(
        name_prefix: &str,
        node_count: usize,
        link_for: impl Fn(usize, usize) -> Link,
    ) -> Result<Self, NetworkError> {
        Self::create_with_options(name_prefix, node_count, link_for, NetworkOptions::default())
    }

    /// [`Self::create_with`] with explicit [`NetworkOptions`].
    #[tracing::instrument(level = "debug", skip(link_for))]
    pub fn create_with_options(
        name_prefix: &str,
        node_count: usize,
        link_for: impl Fn(usize, usize) -> Link,
        options: NetworkOptions,
    ) -> Result<Self, NetworkError> {
        let prefix_ok = (1..=32).contains(&name_prefix.len())
            && name_prefix
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-'));
        if !prefix_ok {
            return Err(NetworkError::InvalidPrefix(name_prefix.to_owned()));
        }
        if !(2..=MAX_NODES).contains(&node_count) {
            return Err(NetworkError::NodeCount(node_count));
        }
        let mut links = Vec::with_capacity(node_count * node_count);
        for from in 0..node_count {
            for to in 0..node_count {
                let link = if from == to {
                    Link::ideal()
                } else {
                    link_for(from, to)
                };
                link.validate()
                    .map_err(|source| NetworkError::Link { from, to, source })?;
                links.push(link);
            }
        }

        let claim = claim_network_id()?;
        let id = claim.id();
        // Built in creation order; an early return drops (deletes) the namespaces made so far.
        let mut namespaces = Vec::with_capacity(node_count);
        let mut devices = Vec::with_capacity(node_count);
        for node in 0..node_count {
            let name = format!("{}{name_prefix}-{node}", namespace_prefix(id));
            let _span = tracing::debug_span!("create_node", node, %name).entered();
            let namespace = Namespace::create(&name)?;
            let address = node_address(id, node);
            let device = run_in_namespace(&name, || create_tun(address))?
                .map_err(|source| NetworkError::Tun { node, source })?;
            namespaces.push(namespace);
            devices.push(device);
        }
        let relay = Relay::start(
            [10, 213, id],
            devices,
            |from, to| {
                links
                    .get(from * node_count + to)
                    .copied()
                    .unwrap_or_default()
            },
            options.realtime_priority,
        )?;
        tracing::info!(id, node_count, name_prefix, "emulated network up");
        Ok(Self {
            relay,
            namespaces,
            claim,
        })
    }

    /// How many nodes the network has.
    #[must_use]
    pub fn node_count(&self) -> usize {
        self.namespaces.len()
    }

    /// The host-wide id of this network (the third octet of its subnet).
    #[must_use]
    pub fn id(&self) -> u8 {
        self.claim.id()
    }

    fn check_node(&self, node: usize) -> Result<(), NetworkError> {
        if node < self.node_count() {
            Ok(())
        } else {
            Err(NetworkError::NoSuchNode {
                node,
                node_count: self.node_count(),
            })
        }
    }

    fn check_pair(&self, from: usize, to: usize) -> Result<(), NetworkError> {
        self.check_node(from)?;
        self.check_node(to)?;
        if from == to {
            return Err(NetworkError::SelfLink(from));
        }
        Ok(())
    }

    /// The IPv4 address of a node's interface.
    pub fn addr(&self, node: usize) -> Result<Ipv4Addr, NetworkError> {
        self.check_node(node)?;
        Ok(node_address(self.id(), node))
    }

    /// The network namespace name of a node (for `ip netns exec` and friends).
    pub fn namespace(&self, node: usize) -> Result<&str, NetworkError> {
        self.check_node(node)?;
        self.namespaces
            .get(node)
            .map(Namespace::name)
            .ok_or(NetworkError::NoSuchNode {
                node,
                node_count: self.node_count(),
            })
    }

    /// A `Command` running `program` inside a node's namespace (see [`namespace_command`]).
    pub fn command(
        &self,
        node: usize,
        program: impl AsRef<OsStr>,
    ) -> Result<Command, NetworkError> {
        Ok(namespace_command(self.namespace(node)?, program))
    }

    /// Runs `work` on a thread inside a node's namespace and returns its result. Sockets created
    /// there stay in that namespace, so this is how a test binds a listener "on a node" and then
    /// uses it from anywhere (including a tokio runtime via `from_std`).
    pub fn run_in<T: Send>(
        &self,
        node: usize,
        work: impl FnOnce() -> T + Send,
    ) -> Result<T, NetworkError> {
        Ok(run_in_namespace(self.namespace(node)?, work)?)
    }

    /// Sets a sysctl inside a node's namespace.
    pub fn set_sysctl(&self, node: usize, key: &str, value: &str) -> Result<(), NetworkError> {
        Ok(set_namespace_sysctl(self.namespace(node)?, key, value)?)
    }

    /// Reads a sysctl inside a node's namespace.
    pub fn sysctl(&self, node: usize, key: &str) -> Result<String, NetworkError> {
        Ok(namespace_sysctl(self.namespace(node)?, key)?)
    }

    /// Sets the default TCP congestion control of a node (`cubic`, `bbr`, `reno`...). The kernel
    /// only accepts algorithms in the host's allowed list here; see the `congestion` functions
    /// for per-socket choice and for extending that list.
    pub fn set_congestion_control(&self, node: usize, algorithm: &str) -> Result<(), NetworkError> {
        Ok(set_namespace_congestion_control(
            self.namespace(node)?,
            algorithm,
        )?)
    }

    /// Replaces the parameters of the directed link `from -> to`. Packets already in flight keep
    /// their schedule; a cut link stays cut.
    #[tracing::instrument(level = "debug", skip(self))]
    pub fn set_link(&self, from: usize, to: usize, link: Link) -> Result<(), NetworkError> {
        self.check_pair(from, to)?;
        link.validate()
            .map_err(|source| NetworkError::Link { from, to, source })?;
        self.relay.set_link(from, to, link);
        Ok(())
    }

    /// Sets both directions between `a` and `b` to `link`.
    pub fn set_link_both(&self, a: usize, b: usize, link: Link) -> Result<(), NetworkError> {
        self.set_link(a, b, link)?;
        self.set_link(b, a, link)
    }

    /// The parameters of the directed link `from -> to`.
    pub fn link(&self, from: usize, to: usize) -> Result<Link, NetworkError> {
        self.check_pair(from, to)?;
        Ok(self.relay.link(from, to).unwrap_or_default())
    }

    /// Cuts both directions between `a` and `b`: everything sent, and everything in flight, is
    /// lost until [`Self::restore`].
    #[tracing::instrument(level = "debug", skip(self))]
    pub fn cut(&self, a: usize, b: usize) -> Result<(), NetworkError> {
        self.check_pair(a, b)?;
        self.relay.set_cut(a, b, true);
        self.relay.set_cut(b, a, true);
        Ok(())
    }

    /// Restores both directions between `a` and `b` with their current parameters.
    #[tracing::instrument(level = "debug", skip(self))]
    pub fn restore(&self, a: usize, b: usize) -> Result<(), NetworkError> {
        self.check_pair(a, b)?;
        self.relay.set_cut(a, b, false);
        self.relay.set_cut(b, a, false);
        Ok(())
    }

    /// Whether the directed link `from -> to` is cut.
    pub fn is_cut(&self, from: usize, to: usize) -> Result<bool, NetworkError> {
        self.check_pair(from, to)?;
        Ok(self.relay.is_cut(from, to))
    }

    /// Cuts every link of `node` (the node "fails" as seen from the network).
    pub fn isolate(&self, node: usize) -> Result<(), NetworkError> {
        self.check_node(node)?;
        for other in (0..self.node_count()).filter(|&other| other != node) {
            self.cut(node, other)?;
        }
        Ok(())
    }

    /// Restores every link of `node`.
    pub fn rejoin(&self, node: usize) -> Result<(), NetworkError> {
        self.check_node(node)?;
        for other in (0..self.node_count()).filter(|&other| other != node) {
            self.restore(node, other)?;
        }
        Ok(())
    }

    /// Counters of the directed link `from -> to`.
    pub fn stats(&self, from: usize, to: usize) -> Result<LinkStats, NetworkError> {
        self.check_pair(from, to)?;
        Ok(self.relay.stats(from, to))
    }

    /// Packets a node sent that were not addressed to another node (multicast, stray
    /// destinations); they are dropped.
    #[must_use]
    pub fn unroutable_packets(&self) -> u64 {
        self.relay.unroutable_packets()
    }

    /// Tears the network down now, reporting the first failure (dropping does the same but can
    /// only log).
    #[tracing::instrument(level = "debug", skip(self), fields(id = self.id()))]
    pub fn shutdown(self) -> Result<(), NetworkError> {
        let Self {
            relay,
            namespaces,
            claim,
        } = self;
        drop(relay);
        let mut first_error = None;
        for namespace in namespaces {
            if let Err(error) = namespace.delete() {
                first_error.get_or_insert(error);
            }
        }
        drop(claim);
        first_error.map_or(Ok(()), |error| Err(error.into()))
    }
}

/// `10.213.ID.(node+1)`.
fn node_address(id: u8, node: usize) -> Ipv4Addr {
    let host = u8::try_from(node + 1).unwrap_or(u8::MAX);
    Ipv4Addr::new(10, 213, id, host)
}

/// Creates, addresses and brings up the node's TUN device; runs inside the node's namespace.
fn create_tun(address: Ipv4Addr) -> std::io::Result<SyncDevice> {
    DeviceBuilder::new()
        .name(INTERFACE)
        .mtu(MTU_BYTES)
        .tx_queue_len(TUN_QUEUE_PACKETS)
        .ipv4(address, 24_u8, None)
        .enable(true)
        .build_sync()
}

/// One end of an [`EmulatedPair`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Side {
    /// The first namespace (node 0, `10.213.ID.1`).
    A,
    /// The second namespace (node 1, `10.213.ID.2`).
    B,
}

impl Side {
    /// The node index of this side in the underlying network.
    #[must_use]
    pub const fn node(self) -> usize {
        match self {
            Self::A => 0,
            Self::B => 1,
        }
    }

    /// The other side.
    #[must_use]
    pub const fn peer(self) -> Self {
        match self {
            Self::A => Self::B,
            Self::B => Self::A,
        }
    }
}

/// Two network namespaces joined by one emulated link (one [`Link`] per direction): the
/// two-node case of [`EmulatedNetwork`], with side names instead of indices.
#[derive(Debug)]
pub struct EmulatedPair {
    network: EmulatedNetwork,
}

impl EmulatedPair {
    /// Creates the two namespaces, their interfaces and the relay.
    pub fn create(name_prefix: &str, a_to_b: Link, b_to_a: Link) -> Result<Self, NetworkError> {
        Self::create_with_options(name_prefix, a_to_b, b_to_a, NetworkOptions::default())
    }

    /// [`Self::create`] with explicit [`NetworkOptions`].
    pub fn create_with_options(
        name_prefix: &str,
        a_to_b: Link,
        b_to_a: Link,
        options: NetworkOptions,
    ) -> Result<Self, NetworkError> {
        let direction = |from: usize, _to: usize| {
            if from == Side::A.node() {
                a_to_b
            } else {
                b_to_a
            }
        };
        let network = EmulatedNetwork::create_with_options(name_prefix, 2, direction, options)?;
        Ok(Self { network })
    }

    /// Creates a pair with the same link both ways.
    pub fn symmetric(name_prefix: &str, link: Link) -> Result<Self, NetworkError> {
        Self::create(name_prefix, link, link)
    }

    /// The address of one side.
    pub fn addr(&self, side: Side) -> Ipv4Addr {
        node_address(self.network.id(), side.node())
    }

    /// The namespace name of one side.
    pub fn namespace(&self, side: Side) -> Result<&str, NetworkError> {
        self.network.namespace(side.node())
    }

    /// A `Command` running `program` in one side's namespace.
    pub fn command(&self, side: Side, program: impl AsRef<OsStr>) -> Result<Command, NetworkError> {
        self.network.command(side.node(), program)
    }

    /// Runs `work` on a thread inside one side's namespace (see [`EmulatedNetwork::run_in`]).
    pub fn run_in<T: Send>(
        &self,
        side: Side,
        work: impl FnOnce() -> T + Send,
    ) -> Result<T, NetworkError> {
        self.network.run_in(side.node(), work)
    }

    /// Replaces the link carrying packets sent by `from`.
    pub fn set_link(&self, from: Side, link: Link) -> Result<(), NetworkError> {
        self.network.set_link(from.node(), from.peer().node(), link)
    }

    /// The link carrying packets sent by `from`.
    pub fn link(&self, from: Side) -> Result<Link, NetworkError> {
        self.network.link(from.node(), from.peer().node())
    }

    /// Cuts both directions.
    pub fn cut(&self) -> Result<(), NetworkError> {
        self.network.cut(Side::A.node(), Side::B.node())
    }

    /// Restores both directions.
    pub fn restore(&self) -> Result<(), NetworkError> {
        self.network.restore(Side::A.node(), Side::B.node())
    }

    /// Sets the default TCP congestion control in one side's namespace.
    pub fn set_congestion_control(&self, side: Side, algorithm: &str) -> Result<(), NetworkError> {
        self.network.set_congestion_control(side.node(), algorithm)
    }

    /// Counters of the direction carrying packets sent by `from`.
    pub fn stats(&self, from: Side) -> Result<LinkStats, NetworkError> {
        self.network.stats(from.node(), from.peer().node())
    }

    /// The underlying two-node network (sysctls, unroutable counter, ...).
    #[must_use]
    pub fn network(&self) -> &EmulatedNetwork {
        &self.network
    }

    /// Tears the pair down now, reporting failure.
    pub fn shutdown(self) -> Result<(), NetworkError> {
        self.network.shutdown()
    }
}
