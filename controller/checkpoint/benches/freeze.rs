//! Freeze time of periodic checkpoints, full vs incremental, for a runc container holding
//! 1 GiB of touched memory (Python + numpy) that dirties a share of its pages between
//! checkpoints. Run as root after scripts/install-node-deps.sh:
//!
//! ```sh
//! cargo bench -p automigrate-checkpoint --bench freeze
//! # knobs: FREEZE_BENCH_MIB (1024), FREEZE_BENCH_DIRTY_PER_SECOND (0.05),
//! #        FREEZE_BENCH_INTERVAL_SECONDS (2), FREEZE_BENCH_ROUNDS (3)
//! ```
//!
//! The freeze is CRIU's own `frozen_time` from `stats-dump`. Results are printed as a Markdown
//! table (docs/checkpoints.md keeps the measured one). Under `cargo test --benches` it only says
//! how to run it.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use automigrate_checkpoint::bundle::{Bundle, BundleSpec};
use automigrate_checkpoint::command::SystemRunner;
use automigrate_checkpoint::runc::{RuncBackend, RuncContainer, RuncRestoreTarget};
use automigrate_checkpoint::{
    CheckpointBackend, CheckpointStore, DumpKind, Retention, SealedCheckpoint, Subject,
    checkpoint_into_store,
};
use automigrate_core::model::PodRef;

const WORKLOAD_PY: &str = r#"
import sys, time
import numpy as np
mib, dirty_per_second = int(sys.argv[1]), float(sys.argv[2])
values_per_page = 4096 // 8
a = np.ones(mib * 1024 * 1024 // 8, dtype=np.float64)  # every page touched
pages = a.size // values_per_page
rng = np.random.default_rng(1)
open("/work/ready", "w").close()
per_tick = max(1, int(pages * dirty_per_second / 10))
while True:
    idx = rng.integers(0, pages, size=per_tick) * values_per_page
    a[idx] += 1.0
    time.sleep(0.1)
"#;

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|value| value.parse().ok())
        .unwrap_or(default)
}

struct Row {
    what: String,
    freeze: Vec<Duration>,
    wall: Vec<Duration>,
    bytes: Vec<u64>,
    pages_written: Vec<u64>,
    memdump: Vec<Duration>,
    memwrite: Vec<Duration>,
}

impl Row {
    fn new(what: impl Into<String>) -> Self {
        Self {
            what: what.into(),
            freeze: Vec::new(),
            wall: Vec::new(),
            bytes: Vec::new(),
            pages_written: Vec::new(),
            memdump: Vec::new(),
            memwrite: Vec::new(),
        }
    }

    fn add(&mut self, stored: &SealedCheckpoint, wall: Duration) -> Result<()> {
        let freeze = stored.manifest.freeze.context("no freeze recorded")?;
        self.freeze.push(freeze.duration());
        self.wall.push(wall);
        self.bytes.push(stored.manifest.total_bytes());
        let stats = automigrate_checkpoint::criu::read_dump_stats(&stored.dir.join("stats-dump"))?;
        self.pages_written.push(stats.pages_written);
        self.memdump.push(stats.memdump_time);
        self.memwrite.push(stats.memwrite_time);
        Ok(())
    }

    fn print(&self) {
        let ms = |values: &[Duration]| {
            values
                .iter()
                .map(|d| format!("{:.0}", d.as_secs_f64() * 1000.0))
                .collect::<Vec<_>>()
                .join(" / ")
        };
        let mib = self
            .bytes
            .iter()
            .map(|b| format!("{:.0}", *b as f64 / 1048576.0))
            .collect::<Vec<_>>()
            .join(" / ");
        let pages = self
            .pages_written
            .iter()
            .map(u64::to_string)
            .collect::<Vec<_>>()
            .join(" / ");
        println!(
            "| {} | {} | {} | {} | {} | {} | {} |",
            self.what,
            ms(&self.freeze),
            ms(&self.memdump),
            ms(&self.memwrite),
            ms(&self.wall),
            mib,
            pages
        );
    }
}

/// The benchmark's container; removed however the benchmark ends.
struct Running {
    backend: RuncBackend<SystemRunner>,
    id: String,
    runc_root: PathBuf,
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = std::process::Command::new("runc")
            .arg("--root")
            .arg(&self.runc_root)
            .args(["delete", "--force", &self.id])
            .output();
    }
}

async fn start(dir: &Path, name: &str, mib: u64, dirty: f64) -> Result<(Running, Bundle)> {
    let work = dir.join(format!("{name}-work"));
    std::fs::create_dir_all(&work)?;
    std::fs::write(work.join("workload.py"), WORKLOAD_PY)?;
    let bundle = Bundle::create(
        &dir.join(format!("{name}-bundle")),
        &BundleSpec::new([
            "/usr/bin/python3".to_string(),
            "/work/workload.py".to_string(),
            mib.to_string(),
            dirty.to_string(),
        ])
        .writable(&work, "/work")
        .cwd("/work"),
    )?;
    let runc_root = dir.join("runc-root");
    let backend = RuncBackend::new(SystemRunner, "runc", "criu").with_root(&runc_root);
    let id = format!("freeze-bench-{name}-{}", std::process::id());
    backend
        .run_detached(&id, bundle.dir(), &dir.join(format!("{name}-runc.log")))
        .await?;
    let running = Running {
        backend,
        id,
        runc_root,
    };
    let ready = work.join("ready");
    let deadline = Instant::now() + Duration::from_secs(120);
    while !ready.exists() {
        if Instant::now() > deadline {
            bail!("the workload did not start (see {name}-runc.log)");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Ok((running, bundle))
}

async fn periodic_series(
    running: &Running,
    store: &CheckpointStore,
    rounds: usize,
    interval: Duration,
    incremental: bool,
    label: &str,
) -> Result<(Row, Option<Row>)> {
    let subject = Subject {
        pod: PodRef::new("bench", &running.id),
        container: "workload".into(),
    };
    let container = RuncContainer {
        id: running.id.clone(),
    };
    let mut first = Row::new(format!("{label}: first checkpoint"));
    let mut later = Row::new(format!(
        "{label}: next {rounds} checkpoints ({}s apart)",
        interval.as_secs()
    ));
    let mut parent: Option<String> = None;
    for round in 0..=rounds {
        let kind = if incremental && round == 0 {
            DumpKind::PreDump
        } else {
            DumpKind::Periodic
        };
        let started = Instant::now();
        let stored = checkpoint_into_store(
            &running.backend,
            store,
            &subject,
            &container,
            kind,
            parent.as_deref(),
            Duration::from_secs(600),
        )
        .await
        .map_err(|error| anyhow::anyhow!("{error}"))?;
        let wall = started.elapsed();
        if round == 0 {
            first.add(&stored, wall)?;
        } else {
            later.add(&stored, wall)?;
        }
        parent = incremental.then(|| stored.manifest.id.clone());
        // As the agent does: keep the newest two (and what they build on).
        store.apply_retention(
            &subject.pod,
            &Retention {
                count: 2,
                max_bytes: None,
            },
        )?;
        tokio::time::sleep(interval).await;
    }
    Ok((first, Some(later)))
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<()> {
    if !std::env::args().any(|arg| arg == "--bench") {
        println!(
            "freeze benchmark: run it with `cargo bench -p automigrate-checkpoint --bench freeze` (as root)"
        );
        return Ok(());
    }
    let mib: u64 = env_or("FREEZE_BENCH_MIB", 1024);
    let dirty: f64 = env_or("FREEZE_BENCH_DIRTY_PER_SECOND", 0.05);
    let interval = Duration::from_secs(env_or("FREEZE_BENCH_INTERVAL_SECONDS", 2));
    let rounds: usize = env_or("FREEZE_BENCH_ROUNDS", 3);
    let scratch = tempfile::Builder::new()
        .prefix("freeze-bench-")
        .tempdir_in(
            std::env::var_os("FREEZE_BENCH_DIR").map_or_else(std::env::temp_dir, PathBuf::from),
        )?;
    let dir = scratch.path();

    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")?;
    let criu = std::process::Command::new("criu")
        .arg("--version")
        .output()?;
    println!(
        "workload: runc container, python3+numpy, {mib} MiB touched, {:.0}% of pages dirtied per second; kernel {}; {}",
        dirty * 100.0,
        kernel.trim(),
        String::from_utf8_lossy(&criu.stdout)
            .lines()
            .next()
            .unwrap_or("criu ?")
    );

    let (running, bundle) = start(dir, "periodic", mib, dirty).await?;
    let capabilities = running.backend.capabilities().await?;
    let disk_store = CheckpointStore::open(&dir.join("store"))?;
    let (full_first, full_later) = periodic_series(
        &running,
        &disk_store,
        rounds,
        interval,
        false,
        "full, store on disk",
    )
    .await?;
    let shm = tempfile::Builder::new()
        .prefix("freeze-bench-")
        .tempdir_in("/dev/shm")?;
    let shm_store = CheckpointStore::open(shm.path())?;
    let (shm_first, shm_later) = periodic_series(
        &running,
        &shm_store,
        rounds,
        interval,
        false,
        "full, store on tmpfs",
    )
    .await?;
    drop(shm);
    let incremental = if capabilities.incremental {
        let incremental_store = CheckpointStore::open(&dir.join("incremental"))?;
        Some(
            periodic_series(
                &running,
                &incremental_store,
                rounds,
                interval,
                true,
                "incremental",
            )
            .await?,
        )
    } else {
        None
    };

    // A migration: stop-and-dump, then restore from it.
    let subject = Subject {
        pod: PodRef::new("bench", &running.id),
        container: "workload".into(),
    };
    let started = Instant::now();
    let last = checkpoint_into_store(
        &running.backend,
        &disk_store,
        &subject,
        &RuncContainer {
            id: running.id.clone(),
        },
        DumpKind::Final,
        None,
        Duration::from_secs(600),
    )
    .await
    .map_err(|error| anyhow::anyhow!("{error}"))?;
    let mut final_row = Row::new("final (stop-and-dump), store on disk");
    final_row.add(&last, started.elapsed())?;
    let verify_started = Instant::now();
    let verified = disk_store.verified(&subject.pod, &last.manifest.id)?;
    let verify_time = verify_started.elapsed();
    let restore_started = Instant::now();
    running
        .backend
        .restore(
            &verified,
            &RuncRestoreTarget {
                container_id: running.id.clone(),
                bundle: bundle.dir().to_path_buf(),
                work_dir: dir.join("restore-work"),
                timeout: Duration::from_secs(600),
            },
        )
        .await?;
    let restore_time = restore_started.elapsed();

    println!();
    println!(
        "| checkpoint | freeze ms (CRIU frozen_time) | of which memdump ms | of which memwrite ms | wall ms (dump + seal + fsync) | archive MiB | pages written |"
    );
    println!("|---|---|---|---|---|---|---|");
    for row in [&full_first]
        .into_iter()
        .chain(full_later.as_ref())
        .chain([&shm_first])
        .chain(shm_later.as_ref())
    {
        row.print();
    }
    match &incremental {
        Some((first, later)) => {
            first.print();
            if let Some(later) = later {
                later.print();
            }
        }
        None => println!(
            "| incremental (pre-dump + parent) | not available: {} | | | | | |",
            capabilities.notes.join("; ")
        ),
    }
    final_row.print();
    println!();
    println!(
        "verify (BLAKE3 of every file) of the final archive: {:.0} ms; runc restore: {:.0} ms",
        verify_time.as_secs_f64() * 1000.0,
        restore_time.as_secs_f64() * 1000.0
    );
    drop(running);
    Ok(())
}
