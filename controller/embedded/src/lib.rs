//! The local cluster: automigrate on one machine, with real failures and real checkpoints,
//! carried out by the same programs a user deploys.
//!
//! Nothing here decides or drives a migration. The local cluster runs the real
//! `automigrate-apiserver` (kube-fake over HTTP), an `automigrate-kubelet` per node, the
//! `automigrate-agent` as each node's DaemonSet pod, and two `automigrate-controller` replicas;
//! the harnesses in this crate only cause failures (power off, cut links, kill or freeze
//! processes, fill disks, damage files, set a node condition as a problem detector would,
//! annotate a user's latency) and read what happened back from the API server and from runc.
//!
//! - [`kube`]: the local Kubernetes cluster of real components ([`kube::KubeCluster`]): the
//!   API server and the controller replicas in a `control` namespace, a kubelet per node
//!   namespace running the agent as its DaemonSet pod; link cuts, power-offs, node conditions.
//! - [`programs`]: where the workspace's binaries are.
//! - [`workload`]: the deterministic numpy training program and its dataset.
//! - [`demo`]: `automigrate demo`: prerequisites, the standard plan, running it, publishing.
//! - [`demo_runs`]: the demo's runs on the local cluster (uninterrupted, hard failure at a
//!   fraction of training, degradation, user mobility): the trainer applied as a Pod, failures
//!   and events caused by the harness, every migration made by `automigrate-controller` and read
//!   back from the API server.
//! - [`faults`]: the fault-injection suite (`automigrate faults`): randomized runs with one
//!   fault each (agent kills and outages, controller kills, power-offs, partitions, full disks,
//!   damaged checkpoints, policy edits), their verdicts and report.
//! - [`report`] and [`svg`]: the report (table, JSON, CSV, SVG) next to the seed paper's
//!   Table III.

pub mod demo;
pub mod demo_runs;
pub mod faults;
pub mod kube;
pub mod programs;
pub mod report;
pub mod svg;
pub mod workload;
