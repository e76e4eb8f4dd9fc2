//! Embedded single-machine mode: the idea of automigrate, working on one machine, with real
//! failures and real checkpoints, driven by the same engine as the Kubernetes controller.
//!
//! A Kubernetes API server cannot run everywhere a user first wants to see automigrate work, so
//! this crate is a second driver of the shared code (`automigrate_core::decide` and
//! `automigrate_core::migration`), with a local cluster instead of the API:
//!
//! - [`cluster`]: N nodes, each a network namespace of one `automigrate_netem` emulated network
//!   (per-pair latency), with its own storage root, kubelet part and agent.
//! - [`kube`]: the local Kubernetes cluster of real components ([`kube::KubeCluster`]): the
//!   API server and the controller replicas in a `control` namespace, a kubelet per node
//!   namespace running the agent as its DaemonSet pod; link cuts, power-offs, node conditions.
//! - [`node`]: one node's storage layout, heartbeat, injected conditions and runc runtime.
//! - [`agent`]: the node agent's API as a trait ([`agent::NodeAgent`]), the in-process agent
//!   built from the checkpoint and transfer crates, and [`agent::AgentHandle`] (either kind).
//! - [`daemon`]: the `automigrate-agent` daemon per node, in its namespace, over `AgentClient`.
//! - [`workload`]: the deterministic numpy training program, its dataset, its runc bundle and
//!   its progress file.
//! - [`clock`]: the policy clock (policy time runs a fixed factor faster than real time, so the
//!   shipped policies can be used unchanged in a demo of minutes).
//! - [`policies`]: loading `policies/` exactly as the Kubernetes controller applies it.
//! - [`controller`]: the local-mode controller: snapshot, decide, checkpoints and standby copies,
//!   the migration state machine driven step by step and persisted.
//! - [`worker`]: transfers between agents, dataset copies, background periodic checkpoints.
//! - [`monitor`]: an independent watcher that counts running copies of the workload.
//! - [`process`]: the controller as a child process of the harness (killed with SIGKILL and
//!   restarted on its state directory), and the `automigrate-embedded-controller` program.
//! - [`scenario`]: the demo's runs (uninterrupted, hard failure at a fraction of training,
//!   degradation, user mobility) and the figures measured from them.
//! - [`demo`]: `automigrate demo`: prerequisites, the standard plan, running it, publishing.
//! - [`demo_runs`]: the demo's runs on the local cluster of real components ([`kube`]): the
//!   trainer applied as a Pod, failures and events caused by the harness, every migration made
//!   by `automigrate-controller` and read back from the API server.
//! - [`faults`]: the fault-injection suite (`automigrate faults`): randomized runs with one
//!   fault each (agent kills, partitions, dying targets, full disks, damaged checkpoints, policy
//!   edits), their verdicts and report.
//! - [`report`] and [`svg`]: the report (table, JSON, CSV, SVG) next to the seed paper's
//!   Table III.

pub mod agent;
pub mod clock;
pub mod cluster;
pub mod controller;
pub mod daemon;
pub mod demo;
pub mod demo_runs;
pub mod faults;
pub mod kube;
pub mod monitor;
pub mod node;
pub mod policies;
pub mod process;
pub mod report;
pub mod scenario;
pub mod svg;
pub mod worker;
pub mod workload;
