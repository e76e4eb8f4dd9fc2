//! The demo's training workload: its dataset, its program, its container and its progress.
//!
//! Data model:
//! - [`DatasetSpec`] describes a synthetic classification dataset (Gaussian clusters, one file
//!   per shard of rows, each row `features` little-endian `f32` values then the label). It is
//!   generated from a seed by [`generate_dataset`], so every run trains on the same bytes, and
//!   described by `dataset.json` with each file's size and BLAKE3 hash, which
//!   [`verify_dataset`] checks on whichever node holds a copy.
//! - [`TrainerSpec`] is the training job: epochs, hidden units, seed, learning rate. The program
//!   ([`TRAINER_PY`], numpy) runs as a Pod's container whose `/data` is the node's dataset
//!   copy, `/work` the pod's work directory on that node and `/app` the program (present on
//!   every node, as the seed paper assumed).
//! - [`Progress`] is what the program wrote to `/work/progress.log`: a start line, one line per
//!   epoch with the loss (also as `float.hex`, so equality is bit-exact) and a done line, all
//!   with the run tag drawn at program start (kept by a restore, new after a restart).

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// The training program, written to every node's `/app`.
pub const TRAINER_PY: &str = include_str!("trainer.py");
/// The program's file name under `/app`.
pub const TRAINER_FILE: &str = "trainer.py";
/// The dataset description file inside a dataset directory.
pub const DATASET_META: &str = "dataset.json";
/// The progress file inside the work directory.
pub const PROGRESS_FILE: &str = "progress.log";
/// The Python interpreter the container runs (the host's, bound read-only).
pub const PYTHON: &str = "/usr/bin/python3";

#[derive(Debug, thiserror::Error)]
pub enum WorkloadError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: not a dataset description: {reason}")]
    BadMeta { path: PathBuf, reason: String },
    #[error("dataset {dir}: {file}: {reason}")]
    Mismatch {
        dir: PathBuf,
        file: String,
        reason: String,
    },
}

fn io_error(path: &Path) -> impl FnOnce(std::io::Error) -> WorkloadError + '_ {
    move |source| WorkloadError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// A synthetic dataset, fully determined by these numbers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DatasetSpec {
    pub name: String,
    pub files: u32,
    pub rows_per_file: u32,
    pub features: u32,
    pub classes: u32,
    pub seed: u64,
}

impl DatasetSpec {
    pub fn bytes(&self) -> u64 {
        u64::from(self.files) * u64::from(self.rows_per_file) * (u64::from(self.features) + 1) * 4
    }
}

/// One file of a dataset, as `dataset.json` lists it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DatasetFile {
    pub path: String,
    pub size: u64,
    pub blake3: String,
}

/// `dataset.json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DatasetMeta {
    pub name: String,
    pub features: u32,
    pub classes: u32,
    pub seed: u64,
    pub files: Vec<DatasetFile>,
}

impl DatasetMeta {
    pub fn total_bytes(&self) -> u64 {
        self.files.iter().map(|file| file.size).sum()
    }
}

/// SplitMix64: a tiny, well-mixed generator; the dataset only needs to be reproducible.
#[derive(Debug, Clone)]
pub(crate) struct SplitMix(pub(crate) u64);

impl SplitMix {
    pub(crate) fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in (0, 1].
    fn unit(&mut self) -> f64 {
        ((self.next_u64() >> 11) as f64 + 1.0) / (1u64 << 53) as f64
    }

    /// Standard normal (Box–Muller; one of the pair is enough here).
    fn normal(&mut self) -> f64 {
        let (u, v) = (self.unit(), self.unit());
        (-2.0 * u.ln()).sqrt() * (std::f64::consts::TAU * v).cos()
    }
}

/// Writes the dataset's files and `dataset.json` into `dir` (created).
#[tracing::instrument(name = "generate_dataset", skip(spec), fields(name = %spec.name))]
pub fn generate_dataset(dir: &Path, spec: &DatasetSpec) -> Result<DatasetMeta, WorkloadError> {
    std::fs::create_dir_all(dir).map_err(io_error(dir))?;
    let mut rng = SplitMix(spec.seed);
    let features = spec.features as usize;
    let classes = spec.classes.max(1);
    let centers: Vec<Vec<f64>> = (0..classes)
        .map(|_| (0..features).map(|_| rng.normal()).collect())
        .collect();
    let mut files = Vec::new();
    for index in 0..spec.files {
        let name = format!("part-{index:04}.bin");
        let mut bytes = Vec::with_capacity(spec.rows_per_file as usize * (features + 1) * 4);
        for _ in 0..spec.rows_per_file {
            let label = (rng.next_u64() % u64::from(classes)) as usize;
            for feature in 0..features {
                let center = centers
                    .get(label)
                    .and_then(|center| center.get(feature))
                    .copied()
                    .unwrap_or(0.0);
                let value = center + 1.5 * rng.normal();
                bytes.extend_from_slice(&(value as f32).to_le_bytes());
            }
            bytes.extend_from_slice(&(label as f32).to_le_bytes());
        }
        let path = dir.join(&name);
        std::fs::write(&path, &bytes).map_err(io_error(&path))?;
        files.push(DatasetFile {
            path: name,
            size: bytes.len() as u64,
            blake3: blake3::hash(&bytes).to_hex().to_string(),
        });
    }
    let meta = DatasetMeta {
        name: spec.name.clone(),
        features: spec.features,
        classes: spec.classes,
        seed: spec.seed,
        files,
    };
    let meta_path = dir.join(DATASET_META);
    let text = serde_json::to_string_pretty(&meta).map_err(|error| WorkloadError::BadMeta {
        path: meta_path.clone(),
        reason: error.to_string(),
    })?;
    std::fs::write(&meta_path, text).map_err(io_error(&meta_path))?;
    Ok(meta)
}

/// Reads `dataset.json` without checking the files.
pub fn read_dataset_meta(dir: &Path) -> Result<DatasetMeta, WorkloadError> {
    let path = dir.join(DATASET_META);
    let text = std::fs::read_to_string(&path).map_err(io_error(&path))?;
    serde_json::from_str(&text).map_err(|error| WorkloadError::BadMeta {
        path,
        reason: error.to_string(),
    })
}

/// Checks every file of the dataset in `dir` against `dataset.json` (size and BLAKE3).
#[tracing::instrument(name = "verify_dataset")]
pub fn verify_dataset(dir: &Path) -> Result<DatasetMeta, WorkloadError> {
    let meta = read_dataset_meta(dir)?;
    for file in &meta.files {
        let mismatch = |reason: String| WorkloadError::Mismatch {
            dir: dir.to_path_buf(),
            file: file.path.clone(),
            reason,
        };
        if file.path.contains('/') || file.path.starts_with('.') {
            return Err(mismatch("file names must be plain names".into()));
        }
        let path = dir.join(&file.path);
        let bytes = std::fs::read(&path).map_err(io_error(&path))?;
        if bytes.len() as u64 != file.size {
            return Err(mismatch(format!(
                "{} bytes, expected {}",
                bytes.len(),
                file.size
            )));
        }
        let hash = blake3::hash(&bytes).to_hex().to_string();
        if hash != file.blake3 {
            return Err(mismatch(format!("BLAKE3 {hash}, expected {}", file.blake3)));
        }
    }
    Ok(meta)
}

/// The training job.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct TrainerSpec {
    pub epochs: u32,
    pub hidden: u32,
    pub seed: u64,
    pub learning_rate: f64,
}

/// Writes the program into `app_dir` (the node's "image").
pub fn install_program(app_dir: &Path) -> Result<(), WorkloadError> {
    std::fs::create_dir_all(app_dir).map_err(io_error(app_dir))?;
    let path = app_dir.join(TRAINER_FILE);
    std::fs::write(&path, TRAINER_PY).map_err(io_error(&path))
}

/// One epoch as the program reported it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct EpochRecord {
    pub epoch: u32,
    pub loss: f64,
    /// `float.hex()` of the loss: equal strings mean bit-identical values.
    pub loss_hex: String,
    pub run: u64,
    /// Unix time, seconds.
    pub at: f64,
}

/// A line of `progress.log`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", tag = "kind")]
pub enum ProgressLine {
    Start { run: u64, at: f64 },
    Epoch(EpochRecord),
    Done { epochs: u32, run: u64, at: f64 },
}

/// Everything in one node's `progress.log`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Progress {
    pub lines: Vec<ProgressLine>,
}

impl Progress {
    pub fn epochs(&self) -> impl Iterator<Item = &EpochRecord> {
        self.lines.iter().filter_map(|line| match line {
            ProgressLine::Epoch(record) => Some(record),
            _ => None,
        })
    }

    pub fn last_epoch(&self) -> Option<&EpochRecord> {
        self.epochs().last()
    }

    /// Start lines: (run tag, unix time).
    pub fn starts(&self) -> impl Iterator<Item = (u64, f64)> + '_ {
        self.lines.iter().filter_map(|line| match line {
            ProgressLine::Start { run, at } => Some((*run, *at)),
            _ => None,
        })
    }

    pub fn done(&self) -> Option<(u32, u64, f64)> {
        self.lines.iter().find_map(|line| match line {
            ProgressLine::Done { epochs, run, at } => Some((*epochs, *run, *at)),
            _ => None,
        })
    }
}

fn fields(line: &str) -> impl Iterator<Item = (&str, &str)> {
    line.split_whitespace()
        .filter_map(|field| field.split_once('='))
}

fn field<'l>(line: &'l str, key: &str) -> Option<&'l str> {
    fields(line).find(|(name, _)| *name == key).map(|(_, v)| v)
}

/// Parses one line; `None` for a line that is not (yet) complete or not ours.
pub fn parse_line(line: &str) -> Option<ProgressLine> {
    let run = field(line, "run")?.parse().ok()?;
    let at = field(line, "t")?.parse().ok()?;
    if line.starts_with("start ") {
        Some(ProgressLine::Start { run, at })
    } else if line.starts_with("done ") {
        Some(ProgressLine::Done {
            epochs: field(line, "epochs")?.parse().ok()?,
            run,
            at,
        })
    } else if line.starts_with("epoch=") {
        Some(ProgressLine::Epoch(EpochRecord {
            epoch: field(line, "epoch")?.parse().ok()?,
            loss: field(line, "loss")?.parse().ok()?,
            loss_hex: field(line, "hex")?.to_string(),
            run,
            at,
        }))
    } else {
        None
    }
}

/// Reads a progress file; a missing file is empty progress. A last line without its newline
/// (being written right now) is ignored.
pub fn read_progress(path: &Path) -> Result<Progress, WorkloadError> {
    let text = match std::fs::read_to_string(path) {
        Ok(text) => text,
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => String::new(),
        Err(source) => {
            return Err(WorkloadError::Io {
                path: path.to_path_buf(),
                source,
            });
        }
    };
    let complete = match text.rfind('\n') {
        Some(end) => &text[..end],
        None => "",
    };
    Ok(Progress {
        lines: complete.lines().filter_map(parse_line).collect(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> DatasetSpec {
        DatasetSpec {
            name: "clusters".into(),
            files: 3,
            rows_per_file: 50,
            features: 4,
            classes: 3,
            seed: 11,
        }
    }

    #[test]
    fn dataset_is_reproducible_and_verifies() {
        let a = tempfile::tempdir().unwrap();
        let b = tempfile::tempdir().unwrap();
        let meta_a = generate_dataset(a.path(), &spec()).unwrap();
        let meta_b = generate_dataset(b.path(), &spec()).unwrap();
        assert_eq!(meta_a, meta_b);
        assert_eq!(meta_a.total_bytes(), spec().bytes());
        assert_eq!(verify_dataset(a.path()).unwrap(), meta_a);
        let other = DatasetSpec { seed: 12, ..spec() };
        let c = tempfile::tempdir().unwrap();
        assert_ne!(generate_dataset(c.path(), &other).unwrap(), meta_a);
    }

    #[test]
    fn a_changed_byte_fails_verification() {
        let dir = tempfile::tempdir().unwrap();
        generate_dataset(dir.path(), &spec()).unwrap();
        let path = dir.path().join("part-0001.bin");
        let mut bytes = std::fs::read(&path).unwrap();
        bytes[17] ^= 0x40;
        std::fs::write(&path, bytes).unwrap();
        let error = verify_dataset(dir.path()).unwrap_err();
        assert!(
            matches!(&error, WorkloadError::Mismatch { file, .. } if file == "part-0001.bin"),
            "{error}"
        );
    }

    #[test]
    fn progress_lines_parse_and_partial_lines_are_ignored() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(PROGRESS_FILE);
        std::fs::write(
            &path,
            "start run=7 t=100.5\n\
             epoch=1 loss=0.5 hex=0x1.0000000000000p-1 run=7 t=101.0\n\
             epoch=2 loss=0.25 hex=0x1.0000000000000p-2 run=7 t=102.0\n\
             done epochs=2 run=7 t=102.1\n\
             epoch=3 loss=0.1",
        )
        .unwrap();
        let progress = read_progress(&path).unwrap();
        assert_eq!(progress.starts().collect::<Vec<_>>(), [(7, 100.5)]);
        assert_eq!(progress.epochs().count(), 2);
        let last = progress.last_epoch().unwrap();
        assert_eq!((last.epoch, last.loss), (2, 0.25));
        assert_eq!(last.loss_hex, "0x1.0000000000000p-2");
        assert_eq!(progress.done(), Some((2, 7, 102.1)));
        assert_eq!(
            read_progress(&dir.path().join("missing")).unwrap(),
            Progress::default()
        );
    }
}
