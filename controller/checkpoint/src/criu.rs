//! What the CRIU-based backends share: asking CRIU what it is and what the kernel allows, and
//! reading the statistics CRIU writes next to a dump.
//!
//! Data model: [`CriuFacts`] (version, whether the kernel tracks dirty memory) and
//! [`DumpStats`], the `stats-dump` image that CRIU writes into the images directory. Its
//! `frozen_time` is CRIU's own measure of how long the workload was frozen, which is the
//! checkpoint cost the decision engine plans with; it is more honest than timing the whole
//! `criu`/`runc` command, which also includes starting up and writing logs.

use std::path::Path;
use std::time::Duration;

use crate::command::{CommandRunner, Invocation};

/// Name of CRIU's statistics image, in the images directory and (copied) at the archive root.
pub const STATS_DUMP_FILE: &str = "stats-dump";

/// `IMG_SERVICE_MAGIC` then `STATS_MAGIC`, little-endian, as CRIU's `images/magic.h` defines them.
const SERVICE_MAGIC: u32 = 0x5510_5940;
const STATS_MAGIC: u32 = 0x5709_3306;

#[derive(Debug, thiserror::Error)]
pub enum CriuError {
    #[error("cannot run `{command}`: {source}")]
    Command {
        command: String,
        source: crate::command::CommandError,
    },
    #[error("`criu --version` printed no version: {output:?}")]
    NoVersion { output: String },
    #[error("cannot read {path}: {source}")]
    ReadStats {
        path: String,
        source: std::io::Error,
    },
    #[error("{path} is not a CRIU stats image: {reason}")]
    BadStats { path: String, reason: String },
    #[error("cannot prepare the restore images view at {path}: {source}")]
    View {
        path: String,
        source: std::io::Error,
    },
}

/// What CRIU and the kernel under it can do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CriuFacts {
    pub version: String,
    /// Soft-dirty page tracking (`CONFIG_MEM_SOFT_DIRTY`): needed for pre-dumps and for dumps
    /// that store only the pages changed since a parent.
    pub dirty_tracking: bool,
}

/// Asks `criu` for its version and probes memory dirty tracking.
#[tracing::instrument(name = "criu_probe", skip(runner))]
pub async fn probe<R: CommandRunner>(runner: &R, criu: &str) -> Result<CriuFacts, CriuError> {
    let version_call = Invocation::new(criu)
        .arg("--version")
        .timeout(Duration::from_secs(30));
    let output = runner
        .run(&version_call)
        .await
        .map_err(|source| CriuError::Command {
            command: version_call.to_string(),
            source,
        })?;
    let version = parse_version(&output.stdout).ok_or_else(|| CriuError::NoVersion {
        output: format!("{}{}", output.stdout, output.stderr),
    })?;
    let check_call = Invocation::new(criu)
        .args(["check", "--feature", "mem_dirty_track"])
        .timeout(Duration::from_secs(30));
    let check = runner
        .run(&check_call)
        .await
        .map_err(|source| CriuError::Command {
            command: check_call.to_string(),
            source,
        })?;
    let facts = CriuFacts {
        version,
        dirty_tracking: check.succeeded(),
    };
    tracing::debug!(?facts, "criu probed");
    Ok(facts)
}

/// `Version: 4.1.1` → `4.1.1`.
pub fn parse_version(output: &str) -> Option<String> {
    output
        .lines()
        .find_map(|line| line.strip_prefix("Version:"))
        .map(|version| version.trim().to_string())
        .filter(|version| !version.is_empty())
}

/// CRIU's own account of a dump (`DumpStatsEntry` in `images/stats.proto`). Times are what
/// CRIU measured; pages are 4 KiB pages.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DumpStats {
    pub freezing_time: Duration,
    pub frozen_time: Duration,
    pub memdump_time: Duration,
    pub memwrite_time: Duration,
    pub pages_scanned: u64,
    pub pages_skipped_parent: u64,
    pub pages_written: u64,
}

/// Reads a `stats-dump` image.
pub fn read_dump_stats(path: &Path) -> Result<DumpStats, CriuError> {
    let bytes = std::fs::read(path).map_err(|source| CriuError::ReadStats {
        path: path.display().to_string(),
        source,
    })?;
    parse_dump_stats(&bytes).map_err(|reason| CriuError::BadStats {
        path: path.display().to_string(),
        reason,
    })
}

/// Image layout: two little-endian u32 magics, a u32 length, then one protobuf `StatsEntry`
/// whose field 1 is the `DumpStatsEntry`.
pub fn parse_dump_stats(bytes: &[u8]) -> Result<DumpStats, String> {
    let word = |at: usize| -> Result<u32, String> {
        bytes
            .get(at..at + 4)
            .and_then(|slice| slice.try_into().ok())
            .map(u32::from_le_bytes)
            .ok_or_else(|| format!("truncated at byte {at}"))
    };
    if word(0)? != SERVICE_MAGIC || word(4)? != STATS_MAGIC {
        return Err("wrong magic".to_string());
    }
    let length = usize::try_from(word(8)?).map_err(|error| error.to_string())?;
    let entry = bytes
        .get(12..12 + length)
        .ok_or_else(|| format!("entry of {length} bytes is truncated"))?;
    let mut stats_entry = ProtoReader::new(entry);
    while let Some((field, value)) = stats_entry.next_field()? {
        if let (1, FieldValue::Bytes(dump)) = (field, value) {
            return parse_dump_entry(dump);
        }
    }
    Err("no dump statistics in the entry (is this stats-restore?)".to_string())
}

fn parse_dump_entry(bytes: &[u8]) -> Result<DumpStats, String> {
    let mut stats = DumpStats::default();
    let mut reader = ProtoReader::new(bytes);
    while let Some((field, value)) = reader.next_field()? {
        let FieldValue::Varint(value) = value else {
            continue;
        };
        match field {
            1 => stats.freezing_time = Duration::from_micros(value),
            2 => stats.frozen_time = Duration::from_micros(value),
            3 => stats.memdump_time = Duration::from_micros(value),
            4 => stats.memwrite_time = Duration::from_micros(value),
            5 => stats.pages_scanned = value,
            6 => stats.pages_skipped_parent = value,
            7 => stats.pages_written = value,
            _ => {}
        }
    }
    Ok(stats)
}

enum FieldValue<'a> {
    Varint(u64),
    Bytes(&'a [u8]),
    Other,
}

/// Just enough protobuf wire format for CRIU's stats image.
struct ProtoReader<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl<'a> ProtoReader<'a> {
    fn new(bytes: &'a [u8]) -> Self {
        Self { bytes, at: 0 }
    }

    fn varint(&mut self) -> Result<u64, String> {
        let mut value = 0u64;
        for shift in (0..64).step_by(7) {
            let byte = *self
                .bytes
                .get(self.at)
                .ok_or_else(|| "truncated varint".to_string())?;
            self.at += 1;
            value |= u64::from(byte & 0x7f) << shift;
            if byte & 0x80 == 0 {
                return Ok(value);
            }
        }
        Err("varint longer than 10 bytes".to_string())
    }

    fn skip(&mut self, count: usize) -> Result<&'a [u8], String> {
        let slice = self
            .bytes
            .get(self.at..self.at + count)
            .ok_or_else(|| "truncated field".to_string())?;
        self.at += count;
        Ok(slice)
    }

    fn next_field(&mut self) -> Result<Option<(u64, FieldValue<'a>)>, String> {
        if self.at >= self.bytes.len() {
            return Ok(None);
        }
        let key = self.varint()?;
        let value = match key & 7 {
            0 => FieldValue::Varint(self.varint()?),
            1 => {
                self.skip(8)?;
                FieldValue::Other
            }
            2 => {
                let length = usize::try_from(self.varint()?).map_err(|error| error.to_string())?;
                FieldValue::Bytes(self.skip(length)?)
            }
            5 => {
                self.skip(4)?;
                FieldValue::Other
            }
            wire => return Err(format!("unsupported wire type {wire}")),
        };
        Ok(Some((key >> 3, value)))
    }
}

/// Copies `stats-dump` from the images directory to the archive root (where checkpointctl
/// reads it) and parses it. `Ok(None)` when CRIU wrote none.
pub fn collect_stats(
    images_dir: &Path,
    archive_dir: &Path,
) -> Result<Option<DumpStats>, CriuError> {
    let source = images_dir.join(STATS_DUMP_FILE);
    if !source.exists() {
        return Ok(None);
    }
    let stats = read_dump_stats(&source)?;
    let copy = archive_dir.join(STATS_DUMP_FILE);
    std::fs::copy(&source, &copy).map_err(|source| CriuError::ReadStats {
        path: copy.display().to_string(),
        source,
    })?;
    Ok(Some(stats))
}

/// The last `lines` lines of a CRIU or runc log, for error messages.
pub fn log_tail(path: &Path, lines: usize) -> String {
    match std::fs::read_to_string(path) {
        Ok(text) => {
            let all: Vec<&str> = text.lines().collect();
            all[all.len().saturating_sub(lines)..].join("\n")
        }
        Err(error) => format!("(no log at {}: {error})", path.display()),
    }
}

/// Builds, under `work_dir`, an images directory for `criu restore` / `runc restore` made of
/// hard links to the verified archive's images (copies where the store is on another file
/// system). CRIU writes `stats-restore` (and, without a work directory, its log) into the images
/// directory; pointing it at this view keeps the sealed archive byte-for-byte as verified, so it
/// can be verified and restored again. Hard links, not symlinks: during a container restore CRIU
/// resolves paths inside the container's mount namespace, where host paths do not exist. The
/// parents of an incremental dump are laid out as nested `parent/` directories, which is where
/// CRIU looks for them.
pub fn restore_view(
    checkpoint: &crate::archive::VerifiedCheckpoint,
    work_dir: &Path,
) -> Result<std::path::PathBuf, CriuError> {
    use crate::manifest::{CRIU_IMAGES_DIR, FileEntry};
    let io = |path: &Path| {
        let path = path.display().to_string();
        move |source| CriuError::View { path, source }
    };
    let view = work_dir.join("images");
    // A view left by an earlier attempt holds hard links to the stored files: writing through
    // one (as copying onto an existing path does) would truncate the checkpoint itself. So the
    // view is always built from nothing, and nothing below ever opens an existing file.
    match std::fs::remove_dir_all(&view) {
        Ok(()) => {}
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => {}
        Err(error) => return Err(io(&view)(error)),
    }
    let prefix = format!("{CRIU_IMAGES_DIR}/");
    let chain = std::iter::once((checkpoint.dir(), checkpoint.manifest())).chain(
        checkpoint
            .ancestors()
            .iter()
            .map(|(dir, manifest)| (dir.as_path(), manifest)),
    );
    let mut level = view.clone();
    for (dir, manifest) in chain {
        std::fs::create_dir_all(&level).map_err(io(&level))?;
        for entry in &manifest.files {
            let FileEntry::File { path, .. } = entry else {
                continue;
            };
            let Some(name) = path.strip_prefix(&prefix) else {
                continue;
            };
            let source = dir.join(path);
            let link = level.join(name);
            if let Some(parent) = link.parent() {
                std::fs::create_dir_all(parent).map_err(io(parent))?;
            }
            if std::fs::hard_link(&source, &link).is_err() {
                // Another filesystem: copy under a new name, then rename into place.
                let mut partial = link.clone().into_os_string();
                partial.push(".partial");
                let partial = std::path::PathBuf::from(partial);
                std::fs::copy(&source, &partial).map_err(io(&partial))?;
                std::fs::rename(&partial, &link).map_err(io(&link))?;
            }
        }
        level = level.join("parent");
    }
    Ok(view)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::command::{CommandOutput, RecordingRunner};

    /// A `stats-dump` written by CRIU 4.1.1 on this project's dev machine (runc container,
    /// `runc checkpoint`), byte for byte.
    const RECORDED_STATS: [u8; 49] = [
        0x40, 0x59, 0x10, 0x55, 0x06, 0x33, 0x09, 0x57, 0x25, 0x00, 0x00, 0x00, 0x0a, 0x23, 0x08,
        0xdf, 0x16, 0x10, 0x9a, 0x87, 0x08, 0x18, 0xdb, 0x18, 0x20, 0xa1, 0x0e, 0x28, 0xfe, 0x05,
        0x30, 0x00, 0x38, 0xb9, 0x05, 0x40, 0x00, 0x48, 0x00, 0x50, 0x08, 0x58, 0x08, 0x60, 0x00,
        0x68, 0x00, 0x70, 0x00,
    ];

    #[test]
    fn building_the_restore_view_again_leaves_the_stored_checkpoint_intact() {
        let root = tempfile::tempdir().unwrap();
        let dir = root.path().join("trainer-000001");
        std::fs::create_dir_all(dir.join("checkpoint")).unwrap();
        std::fs::write(dir.join("checkpoint/pages-1.img"), vec![7u8; 70_000]).unwrap();
        std::fs::write(dir.join("checkpoint/core-1.img"), b"core").unwrap();
        crate::archive::seal(&dir, crate::archive::tests::draft("trainer-000001", None)).unwrap();
        let work = root.path().join("work");
        for attempt in 0..3 {
            let checkpoint = crate::archive::verify_chain(&dir).unwrap();
            let view = restore_view(&checkpoint, &work).unwrap();
            assert_eq!(
                std::fs::read(view.join("pages-1.img")).unwrap(),
                vec![7u8; 70_000],
                "attempt {attempt}"
            );
        }
        // What a retried restore used to do to the store: the archive still verifies.
        crate::archive::verify_chain(&dir).unwrap();
        assert_eq!(
            std::fs::metadata(dir.join("checkpoint/pages-1.img"))
                .unwrap()
                .len(),
            70_000
        );
    }

    #[test]
    fn parses_a_recorded_stats_image() {
        let stats = parse_dump_stats(&RECORDED_STATS).unwrap();
        assert_eq!(stats.freezing_time, Duration::from_micros(2911));
        assert_eq!(stats.frozen_time, Duration::from_micros(131_994));
        assert_eq!(stats.memdump_time, Duration::from_micros(3163));
        assert_eq!(stats.memwrite_time, Duration::from_micros(1825));
        assert_eq!(stats.pages_scanned, 766);
        assert_eq!(stats.pages_skipped_parent, 0);
        assert_eq!(stats.pages_written, 697);
    }

    #[test]
    fn rejects_wrong_magic_and_truncation() {
        let mut wrong = RECORDED_STATS;
        wrong[0] ^= 1;
        assert!(parse_dump_stats(&wrong).unwrap_err().contains("magic"));
        assert!(parse_dump_stats(&RECORDED_STATS[..30]).is_err());
        assert!(parse_dump_stats(&RECORDED_STATS[..6]).is_err());
    }

    #[test]
    fn parses_version_lines() {
        assert_eq!(
            parse_version("Version: 4.1.1\nGitID: v4.1.1\n").as_deref(),
            Some("4.1.1")
        );
        assert_eq!(parse_version("criu: command not found"), None);
    }

    #[tokio::test]
    async fn probe_reads_version_and_dirty_tracking() {
        let runner = RecordingRunner::new();
        runner.answer_when(
            ["criu", "--version"],
            CommandOutput::success("Version: 4.1.1\n"),
        );
        runner.answer_when(
            ["criu", "check", "--feature", "mem_dirty_track"],
            CommandOutput::failure(1, "Dirty tracking is OFF"),
        );
        let facts = probe(&runner, "criu").await.unwrap();
        assert_eq!(facts.version, "4.1.1");
        assert!(!facts.dirty_tracking);
    }
}
