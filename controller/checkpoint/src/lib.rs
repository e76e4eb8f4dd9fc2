//! Checkpoints for the automigrate node agent: taking them, sealing them into verifiable
//! archives, keeping them on the node, moving them, and restoring from them.
//!
//! Modules:
//! - [`backend`]: the [`CheckpointBackend`] trait, requests and outcomes, and
//!   [`checkpoint_into_store`] (stage → checkpoint → seal → publish).
//! - [`runc`]: `runc checkpoint` / `runc restore` of OCI containers (CRIU underneath).
//! - [`process`]: `criu dump -t PID` / `criu restore` of plain process trees.
//! - [`kubelet`]: the kubelet checkpoint API through the API server, behind [`kubelet::ApiTransport`].
//! - [`application`]: the program saves its own state when signalled.
//! - [`manifest`] and [`archive`]: the archive layout (checkpointctl-compatible), its manifest
//!   with every file's BLAKE3 hash, verification, tar export/import.
//! - [`store`]: the node-local store with atomic insertion and retention.
//! - [`bundle`]: OCI bundles that run host programs with no image (tests, demo).
//! - [`command`]: the [`command::CommandRunner`] seam with a real and a recording runner.
//! - [`criu`]: CRIU version and kernel capability probe, `stats-dump` parsing.
//!
//! See docs/checkpoints.md for the archive layout, the backends and measured freeze times.

pub mod application;
pub mod archive;
pub mod backend;
pub mod bundle;
pub mod command;
pub mod criu;
pub mod kubelet;
pub mod manifest;
pub mod process;
pub mod runc;
pub mod store;

pub use archive::VerifiedCheckpoint;
pub use backend::{
    Capabilities, CheckpointBackend, CheckpointOutcome, CheckpointRequest, ParentImages, Subject,
    checkpoint_into_store,
};
pub use manifest::{BackendKind, DumpKind, Freeze, FreezeSource, Manifest};
pub use store::{CheckpointStore, Retention, RetentionReport, SealedCheckpoint};
