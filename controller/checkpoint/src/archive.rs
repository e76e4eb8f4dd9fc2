//! Sealing, verifying and moving checkpoint archives (the layout is in [`crate::manifest`]).
//!
//! - [`seal`] hashes every file of a finished checkpoint directory and writes its manifest.
//! - [`verify`] re-reads a directory and recomputes every hash; [`verify_chain`] also verifies
//!   the parents an incremental checkpoint needs. Restoring takes a [`VerifiedCheckpoint`],
//!   which only these functions make, so nothing can restore from an archive that did not
//!   verify.
//! - [`export_tar`] / [`import_tar`] move an archive as one plain tar stream (manifest first);
//!   [`extract_foreign_tar`] unpacks a kubelet archive, which has no manifest yet.

use std::collections::BTreeSet;
use std::fs::{self, File};
use std::io::{Read, Write};
use std::path::{Component, Path, PathBuf};

use crate::manifest::{FORMAT_VERSION, FileEntry, MANIFEST_FILE, Manifest};

#[derive(Debug, thiserror::Error)]
pub enum ArchiveError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{dir}: no {MANIFEST_FILE}: not a checkpoint archive, or an unfinished one")]
    ManifestMissing { dir: PathBuf },
    #[error("{path}: manifest does not parse: {source}")]
    ManifestInvalid {
        path: PathBuf,
        source: serde_json::Error,
    },
    #[error("{path}: manifest format version {found}, this build reads version {FORMAT_VERSION}")]
    UnsupportedVersion { path: PathBuf, found: u32 },
    #[error("{archive}: file `{file}` is listed twice in the manifest")]
    DuplicateEntry { archive: PathBuf, file: String },
    #[error("{archive}: path `{file}` is not a plain relative path inside the archive")]
    UnsafePath { archive: PathBuf, file: String },
    #[error("{archive}: file `{file}` is listed in the manifest but missing")]
    MissingFile { archive: PathBuf, file: String },
    #[error("{archive}: file `{file}` is not in the manifest")]
    ExtraFile { archive: PathBuf, file: String },
    #[error("{archive}: file `{file}` has {actual} bytes, the manifest says {expected}")]
    SizeMismatch {
        archive: PathBuf,
        file: String,
        expected: u64,
        actual: u64,
    },
    #[error("{archive}: file `{file}` does not match its BLAKE3 hash (corrupted or tampered with)")]
    HashMismatch { archive: PathBuf, file: String },
    #[error("{archive}: `{file}` is a {found}, the manifest lists a {expected}")]
    WrongType {
        archive: PathBuf,
        file: String,
        expected: &'static str,
        found: &'static str,
    },
    #[error("{archive}: symlink `{file}` points to `{actual}`, the manifest says `{expected}`")]
    SymlinkMismatch {
        archive: PathBuf,
        file: String,
        expected: String,
        actual: String,
    },
    #[error("{archive}: parent checkpoint `{parent}` is needed to restore it but {reason}")]
    ParentUnusable {
        archive: PathBuf,
        parent: String,
        reason: String,
    },
    #[error("tar entry `{file}`: {reason}")]
    BadTarEntry { file: String, reason: String },
}

fn io_error(path: &Path) -> impl FnOnce(std::io::Error) -> ArchiveError + '_ {
    move |source| ArchiveError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// An archive whose manifest and every hash were checked, with the verified parents it needs
/// (nearest first). Only [`verify_chain`] makes one.
#[derive(Debug, Clone)]
pub struct VerifiedCheckpoint {
    dir: PathBuf,
    manifest: Manifest,
    ancestors: Vec<(PathBuf, Manifest)>,
}

impl VerifiedCheckpoint {
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn manifest(&self) -> &Manifest {
        &self.manifest
    }

    pub fn ancestors(&self) -> &[(PathBuf, Manifest)] {
        &self.ancestors
    }

    pub fn images_dir(&self) -> PathBuf {
        self.dir.join(crate::manifest::CRIU_IMAGES_DIR)
    }
}

/// Hashes every file under `dir` into `manifest.files` and writes the manifest, then flushes
/// everything to disk. Refuses anything but regular files, directories and symlinks.
#[tracing::instrument(name = "archive_seal", skip(manifest), fields(id = %manifest.id))]
pub fn seal(dir: &Path, mut manifest: Manifest) -> Result<Manifest, ArchiveError> {
    let manifest_path = dir.join(MANIFEST_FILE);
    if manifest_path.exists() {
        fs::remove_file(&manifest_path).map_err(io_error(&manifest_path))?;
    }
    manifest.format_version = FORMAT_VERSION;
    manifest.files = walk(dir)?
        .into_iter()
        .map(|(relative, kind)| describe(dir, &relative, kind))
        .collect::<Result<_, _>>()?;
    let json =
        serde_json::to_vec_pretty(&manifest).map_err(|source| ArchiveError::ManifestInvalid {
            path: manifest_path.clone(),
            source,
        })?;
    let mut file = File::create(&manifest_path).map_err(io_error(&manifest_path))?;
    file.write_all(&json).map_err(io_error(&manifest_path))?;
    sync_tree(dir)?;
    tracing::debug!(
        files = manifest.files.len(),
        bytes = manifest.total_bytes(),
        "sealed"
    );
    Ok(manifest)
}

/// Reads the manifest without checking the files.
pub fn read_manifest(dir: &Path) -> Result<Manifest, ArchiveError> {
    let path = dir.join(MANIFEST_FILE);
    let bytes = match fs::read(&path) {
        Ok(bytes) => bytes,
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => {
            return Err(ArchiveError::ManifestMissing {
                dir: dir.to_path_buf(),
            });
        }
        Err(source) => return Err(ArchiveError::Io { path, source }),
    };
    // The version is checked before the full parse so that a newer format says so plainly.
    #[derive(serde::Deserialize)]
    #[serde(rename_all = "camelCase")]
    struct VersionOnly {
        format_version: u32,
    }
    let version: VersionOnly =
        serde_json::from_slice(&bytes).map_err(|source| ArchiveError::ManifestInvalid {
            path: path.clone(),
            source,
        })?;
    if version.format_version != FORMAT_VERSION {
        return Err(ArchiveError::UnsupportedVersion {
            path,
            found: version.format_version,
        });
    }
    serde_json::from_slice(&bytes).map_err(|source| ArchiveError::ManifestInvalid { path, source })
}

/// Checks the manifest and recomputes every hash. The first problem found is returned, naming
/// the file.
#[tracing::instrument(name = "archive_verify")]
pub fn verify(dir: &Path) -> Result<Manifest, ArchiveError> {
    let manifest = read_manifest(dir)?;
    let archive = dir.to_path_buf();
    let mut listed = BTreeSet::new();
    for entry in &manifest.files {
        let file = entry.path().to_string();
        if !is_safe_relative(&file) || file == MANIFEST_FILE {
            return Err(ArchiveError::UnsafePath { archive, file });
        }
        if !listed.insert(file.clone()) {
            return Err(ArchiveError::DuplicateEntry { archive, file });
        }
    }
    let present: BTreeSet<String> = walk(dir)?
        .into_iter()
        .map(|(relative, _)| relative)
        .collect();
    if let Some(extra) = present.difference(&listed).next() {
        return Err(ArchiveError::ExtraFile {
            archive,
            file: extra.clone(),
        });
    }
    for entry in &manifest.files {
        check_entry(dir, entry)?;
    }
    Ok(manifest)
}

/// Verifies `dir` and, for an incremental checkpoint, every parent it needs. Parents are found
/// next to it (`<dir>/../<parent id>`), which is how the store and [`import_tar`] place them.
pub fn verify_chain(dir: &Path) -> Result<VerifiedCheckpoint, ArchiveError> {
    let manifest = verify(dir)?;
    let mut ancestors: Vec<(PathBuf, Manifest)> = Vec::new();
    let mut next_parent = manifest.parent.clone();
    while let Some(parent) = next_parent {
        let unusable = |reason: String| ArchiveError::ParentUnusable {
            archive: dir.to_path_buf(),
            parent: parent.clone(),
            reason,
        };
        if !is_safe_relative(&parent) || parent.contains('/') {
            return Err(unusable("its id is not a plain name".to_string()));
        }
        if ancestors.iter().any(|(_, seen)| seen.id == parent) || parent == manifest.id {
            return Err(unusable("the parent chain loops".to_string()));
        }
        let parent_dir = dir.with_file_name(&parent);
        let parent_manifest = verify(&parent_dir).map_err(|error| unusable(error.to_string()))?;
        if parent_manifest.id != parent {
            return Err(unusable(format!(
                "the archive there is `{}`",
                parent_manifest.id
            )));
        }
        next_parent = parent_manifest.parent.clone();
        ancestors.push((parent_dir, parent_manifest));
    }
    Ok(VerifiedCheckpoint {
        dir: dir.to_path_buf(),
        manifest,
        ancestors,
    })
}

/// Writes the archive as a plain tar stream, manifest first, so a receiver can read it before
/// the data.
#[tracing::instrument(name = "archive_export", skip(writer))]
pub fn export_tar<W: Write>(dir: &Path, writer: W) -> Result<W, ArchiveError> {
    let manifest = read_manifest(dir)?;
    let mut builder = tar::Builder::new(writer);
    builder.follow_symlinks(false);
    let tar_error = |path: &Path| {
        let path = path.to_path_buf();
        move |source| ArchiveError::Io { path, source }
    };
    let manifest_path = dir.join(MANIFEST_FILE);
    builder
        .append_path_with_name(&manifest_path, MANIFEST_FILE)
        .map_err(tar_error(&manifest_path))?;
    for entry in &manifest.files {
        let path = dir.join(entry.path());
        builder
            .append_path_with_name(&path, entry.path())
            .map_err(tar_error(&path))?;
    }
    builder.into_inner().map_err(tar_error(dir))
}

/// Unpacks a tar stream written by [`export_tar`] into `dest` (which must not exist yet) and
/// verifies it. On any failure `dest` is removed again.
#[tracing::instrument(name = "archive_import", skip(reader))]
pub fn import_tar<R: Read>(reader: R, dest: &Path) -> Result<Manifest, ArchiveError> {
    fs::create_dir(dest).map_err(io_error(dest))?;
    let result = extract_foreign_tar(reader, dest).and_then(|()| verify(dest));
    if result.is_err() {
        let _ = fs::remove_dir_all(dest);
    }
    result
}

/// Unpacks a tar stream into `dest` (created if missing), accepting only regular files,
/// directories and relative symlinks at plain relative paths.
pub fn extract_foreign_tar<R: Read>(reader: R, dest: &Path) -> Result<(), ArchiveError> {
    fs::create_dir_all(dest).map_err(io_error(dest))?;
    let mut archive = tar::Archive::new(reader);
    let entries = archive.entries().map_err(io_error(dest))?;
    for entry in entries {
        let mut entry = entry.map_err(io_error(dest))?;
        let raw_path = entry.path().map_err(io_error(dest))?.into_owned();
        let name = raw_path.to_string_lossy().trim_end_matches('/').to_string();
        let name = name.strip_prefix("./").unwrap_or(&name).to_string();
        if name.is_empty() || name == "." {
            continue;
        }
        let bad = |reason: &str| ArchiveError::BadTarEntry {
            file: name.clone(),
            reason: reason.to_string(),
        };
        if !is_safe_relative(&name) {
            return Err(bad("not a plain relative path"));
        }
        let target = dest.join(&name);
        if let Some(parent) = target.parent() {
            fs::create_dir_all(parent).map_err(io_error(parent))?;
        }
        match entry.header().entry_type() {
            tar::EntryType::Directory => fs::create_dir_all(&target).map_err(io_error(&target))?,
            tar::EntryType::Regular | tar::EntryType::Continuous => {
                let mut file = File::create(&target).map_err(io_error(&target))?;
                std::io::copy(&mut entry, &mut file).map_err(io_error(&target))?;
            }
            tar::EntryType::Symlink => {
                let link = entry
                    .link_name()
                    .map_err(io_error(&target))?
                    .ok_or_else(|| bad("symlink without a target"))?
                    .into_owned();
                if link.is_absolute() {
                    return Err(bad("absolute symlink target"));
                }
                std::os::unix::fs::symlink(&link, &target).map_err(io_error(&target))?;
            }
            other => return Err(bad(&format!("unsupported entry type {other:?}"))),
        }
    }
    Ok(())
}

/// Writes `value` as pretty JSON (the `*.dump` metadata files).
pub(crate) fn write_json<T: serde::Serialize>(path: &Path, value: &T) -> std::io::Result<()> {
    let json = serde_json::to_vec_pretty(value).map_err(std::io::Error::other)?;
    fs::write(path, json)
}

/// Flushes every file and directory under `dir` (and `dir` itself) to disk.
pub fn sync_tree(dir: &Path) -> Result<(), ArchiveError> {
    for (relative, kind) in walk(dir)? {
        if kind == EntryType::File {
            let path = dir.join(&relative);
            File::open(&path)
                .and_then(|file| file.sync_all())
                .map_err(io_error(&path))?;
        }
    }
    let mut dirs = vec![dir.to_path_buf()];
    while let Some(current) = dirs.pop() {
        for entry in fs::read_dir(&current).map_err(io_error(&current))? {
            let entry = entry.map_err(io_error(&current))?;
            if entry.file_type().map_err(io_error(&current))?.is_dir() {
                dirs.push(entry.path());
            }
        }
        sync_dir(&current)?;
    }
    Ok(())
}

pub fn sync_dir(dir: &Path) -> Result<(), ArchiveError> {
    File::open(dir)
        .and_then(|file| file.sync_all())
        .map_err(io_error(dir))
}

/// Sum of the sizes of all regular files under `dir` (the manifest included).
pub fn disk_bytes(dir: &Path) -> Result<u64, ArchiveError> {
    let mut total = fs::metadata(dir.join(MANIFEST_FILE))
        .map(|meta| meta.len())
        .unwrap_or(0);
    for (relative, kind) in walk(dir)? {
        if kind == EntryType::File {
            let path = dir.join(relative);
            total += fs::metadata(&path).map_err(io_error(&path))?.len();
        }
    }
    Ok(total)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum EntryType {
    File,
    Symlink,
    Other,
}

impl EntryType {
    fn name(self) -> &'static str {
        match self {
            Self::File => "regular file",
            Self::Symlink => "symlink",
            Self::Other => "special file",
        }
    }
}

/// Every non-directory entry under `dir` except the manifest, sorted, as relative `/` paths.
fn walk(dir: &Path) -> Result<Vec<(String, EntryType)>, ArchiveError> {
    let mut found = Vec::new();
    let mut pending = vec![(dir.to_path_buf(), String::new())];
    while let Some((current, prefix)) = pending.pop() {
        for entry in fs::read_dir(&current).map_err(io_error(&current))? {
            let entry = entry.map_err(io_error(&current))?;
            let name = entry.file_name().to_string_lossy().into_owned();
            let relative = if prefix.is_empty() {
                name
            } else {
                format!("{prefix}/{name}")
            };
            if relative == MANIFEST_FILE {
                continue;
            }
            let file_type = entry.file_type().map_err(io_error(&entry.path()))?;
            if file_type.is_dir() {
                pending.push((entry.path(), relative));
            } else if file_type.is_file() {
                found.push((relative, EntryType::File));
            } else if file_type.is_symlink() {
                found.push((relative, EntryType::Symlink));
            } else {
                found.push((relative, EntryType::Other));
            }
        }
    }
    found.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(found)
}

fn describe(dir: &Path, relative: &str, kind: EntryType) -> Result<FileEntry, ArchiveError> {
    let path = dir.join(relative);
    match kind {
        EntryType::File => {
            let (size, hash) = hash_file(&path)?;
            Ok(FileEntry::File {
                path: relative.to_string(),
                size,
                blake3: hash,
            })
        }
        EntryType::Symlink => Ok(FileEntry::Symlink {
            path: relative.to_string(),
            target: read_link(&path)?,
        }),
        EntryType::Other => Err(ArchiveError::WrongType {
            archive: dir.to_path_buf(),
            file: relative.to_string(),
            expected: "regular file or symlink",
            found: kind.name(),
        }),
    }
}

fn check_entry(dir: &Path, entry: &FileEntry) -> Result<(), ArchiveError> {
    let archive = dir.to_path_buf();
    let file = entry.path().to_string();
    let path = dir.join(&file);
    let meta = match fs::symlink_metadata(&path) {
        Ok(meta) => meta,
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => {
            return Err(ArchiveError::MissingFile { archive, file });
        }
        Err(source) => return Err(ArchiveError::Io { path, source }),
    };
    let found = if meta.is_file() {
        EntryType::File
    } else if meta.file_type().is_symlink() {
        EntryType::Symlink
    } else {
        EntryType::Other
    };
    match entry {
        FileEntry::File { size, blake3, .. } => {
            if found != EntryType::File {
                return Err(ArchiveError::WrongType {
                    archive,
                    file,
                    expected: EntryType::File.name(),
                    found: found.name(),
                });
            }
            if meta.len() != *size {
                return Err(ArchiveError::SizeMismatch {
                    archive,
                    file,
                    expected: *size,
                    actual: meta.len(),
                });
            }
            let (_, actual) = hash_file(&path)?;
            if &actual != blake3 {
                return Err(ArchiveError::HashMismatch { archive, file });
            }
        }
        FileEntry::Symlink { target, .. } => {
            if found != EntryType::Symlink {
                return Err(ArchiveError::WrongType {
                    archive,
                    file,
                    expected: EntryType::Symlink.name(),
                    found: found.name(),
                });
            }
            let actual = read_link(&path)?;
            if &actual != target {
                return Err(ArchiveError::SymlinkMismatch {
                    archive,
                    file,
                    expected: target.clone(),
                    actual,
                });
            }
        }
    }
    Ok(())
}

fn hash_file(path: &Path) -> Result<(u64, String), ArchiveError> {
    let mut file = File::open(path).map_err(io_error(path))?;
    let mut hasher = blake3::Hasher::new();
    let mut buffer = vec![0u8; 1 << 20];
    let mut size = 0u64;
    loop {
        let read = file.read(&mut buffer).map_err(io_error(path))?;
        if read == 0 {
            break;
        }
        size += read as u64;
        hasher.update(buffer.get(..read).unwrap_or_default());
    }
    Ok((size, hasher.finalize().to_hex().to_string()))
}

fn read_link(path: &Path) -> Result<String, ArchiveError> {
    Ok(fs::read_link(path)
        .map_err(io_error(path))?
        .to_string_lossy()
        .into_owned())
}

/// A relative path made only of normal components (no `..`, no root, no `.`).
fn is_safe_relative(path: &str) -> bool {
    !path.is_empty()
        && Path::new(path)
            .components()
            .all(|component| matches!(component, Component::Normal(_)))
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::manifest::{BackendKind, DumpKind};
    use automigrate_core::annotations::CheckpointMode;
    use automigrate_core::model::PodRef;

    pub(crate) fn draft(id: &str, parent: Option<&str>) -> Manifest {
        Manifest {
            format_version: FORMAT_VERSION,
            id: id.to_string(),
            pod: PodRef::new("ml", "trainer"),
            container: "main".to_string(),
            backend: BackendKind::CriuProcess,
            runtime: None,
            criu_version: Some("4.1.1".to_string()),
            created_at: "2026-11-22T10:00:00Z".parse().unwrap(),
            parent: parent.map(str::to_string),
            mode: CheckpointMode::Transparent,
            kind: DumpKind::Periodic,
            freeze: None,
            epoch: Some(3),
            files: Vec::new(),
        }
    }

    fn sample_archive(root: &Path, id: &str) -> PathBuf {
        let dir = root.join(id);
        fs::create_dir_all(dir.join("checkpoint")).unwrap();
        fs::write(dir.join("checkpoint/pages-1.img"), vec![7u8; 70_000]).unwrap();
        fs::write(dir.join("checkpoint/core-1.img"), b"core").unwrap();
        fs::write(dir.join("config.dump"), b"{}").unwrap();
        seal(&dir, draft(id, None)).unwrap();
        dir
    }

    #[test]
    fn sealed_archive_lists_every_file_and_verifies() {
        let root = tempfile::tempdir().unwrap();
        let dir = sample_archive(root.path(), "trainer-000001");
        let manifest = verify(&dir).unwrap();
        let paths: Vec<&str> = manifest.files.iter().map(FileEntry::path).collect();
        assert_eq!(
            paths,
            [
                "checkpoint/core-1.img",
                "checkpoint/pages-1.img",
                "config.dump"
            ]
        );
        assert_eq!(manifest.total_bytes(), 70_000 + 4 + 2);
        let expected = blake3::hash(&[7u8; 70_000]).to_hex().to_string();
        assert!(
            manifest.files.iter().any(
                |entry| matches!(entry, FileEntry::File { blake3, .. } if *blake3 == expected)
            )
        );
    }

    #[test]
    fn a_flipped_bit_is_refused_naming_the_file() {
        let root = tempfile::tempdir().unwrap();
        let dir = sample_archive(root.path(), "a");
        let path = dir.join("checkpoint/pages-1.img");
        let mut bytes = fs::read(&path).unwrap();
        bytes[12_345] ^= 0x10;
        fs::write(&path, bytes).unwrap();
        let error = verify(&dir).unwrap_err();
        assert!(
            matches!(&error, ArchiveError::HashMismatch { file, .. } if file == "checkpoint/pages-1.img"),
            "{error}"
        );
        assert!(error.to_string().contains("checkpoint/pages-1.img"));
    }

    #[test]
    fn a_truncated_file_is_refused() {
        let root = tempfile::tempdir().unwrap();
        let dir = sample_archive(root.path(), "a");
        let file = File::options()
            .write(true)
            .open(dir.join("checkpoint/pages-1.img"))
            .unwrap();
        file.set_len(4096).unwrap();
        let error = verify(&dir).unwrap_err();
        assert!(
            matches!(&error, ArchiveError::SizeMismatch { file, expected: 70_000, actual: 4096, .. } if file == "checkpoint/pages-1.img"),
            "{error}"
        );
    }

    #[test]
    fn an_extra_file_is_refused() {
        let root = tempfile::tempdir().unwrap();
        let dir = sample_archive(root.path(), "a");
        fs::write(dir.join("checkpoint/evil.img"), b"x").unwrap();
        let error = verify(&dir).unwrap_err();
        assert!(
            matches!(&error, ArchiveError::ExtraFile { file, .. } if file == "checkpoint/evil.img"),
            "{error}"
        );
    }

    #[test]
    fn a_missing_file_is_refused() {
        let root = tempfile::tempdir().unwrap();
        let dir = sample_archive(root.path(), "a");
        fs::remove_file(dir.join("checkpoint/core-1.img")).unwrap();
        let error = verify(&dir).unwrap_err();
        assert!(
            matches!(&error, ArchiveError::MissingFile { file, .. } if file == "checkpoint/core-1.img"),
            "{error}"
        );
    }

    #[test]
    fn a_bad_manifest_is_refused() {
        let root = tempfile::tempdir().unwrap();
        let dir = sample_archive(root.path(), "a");
        let manifest_path = dir.join(MANIFEST_FILE);
        let text = fs::read_to_string(&manifest_path).unwrap();

        fs::write(&manifest_path, &text[..text.len() / 2]).unwrap();
        assert!(matches!(
            verify(&dir).unwrap_err(),
            ArchiveError::ManifestInvalid { .. }
        ));

        fs::write(
            &manifest_path,
            text.replace("\"formatVersion\": 1", "\"formatVersion\": 99"),
        )
        .unwrap();
        assert!(matches!(
            verify(&dir).unwrap_err(),
            ArchiveError::UnsupportedVersion { found: 99, .. }
        ));

        // A manifest edited to match a tampered file's new size still fails on the hash.
        fs::write(dir.join("config.dump"), b"{}{}").unwrap();
        fs::write(&manifest_path, text.replace("\"size\": 2,", "\"size\": 4,")).unwrap();
        assert!(matches!(
            verify(&dir).unwrap_err(),
            ArchiveError::HashMismatch { file, .. } if file == "config.dump"
        ));

        let escaping = text.replace("\"config.dump\"", "\"../config.dump\"");
        fs::write(&manifest_path, escaping).unwrap();
        assert!(matches!(
            verify(&dir).unwrap_err(),
            ArchiveError::UnsafePath { .. }
        ));

        fs::remove_file(&manifest_path).unwrap();
        assert!(matches!(
            verify(&dir).unwrap_err(),
            ArchiveError::ManifestMissing { .. }
        ));
    }

    #[test]
    fn tar_round_trip_keeps_files_and_symlinks() {
        let root = tempfile::tempdir().unwrap();
        let parent = sample_archive(root.path(), "p");
        let child = root.path().join("c");
        fs::create_dir_all(child.join("checkpoint")).unwrap();
        fs::write(child.join("checkpoint/pages-1.img"), b"delta").unwrap();
        std::os::unix::fs::symlink("../../p/checkpoint", child.join("checkpoint/parent")).unwrap();
        seal(&child, draft("c", Some("p"))).unwrap();

        let other = tempfile::tempdir().unwrap();
        for dir in [&parent, &child] {
            let bytes = export_tar(dir, Vec::new()).unwrap();
            let name = dir.file_name().unwrap();
            import_tar(bytes.as_slice(), &other.path().join(name)).unwrap();
        }
        let verified = verify_chain(&other.path().join("c")).unwrap();
        assert_eq!(verified.manifest().parent.as_deref(), Some("p"));
        assert_eq!(verified.ancestors().len(), 1);
        assert_eq!(
            fs::read_link(other.path().join("c/checkpoint/parent")).unwrap(),
            Path::new("../../p/checkpoint")
        );
    }

    #[test]
    fn import_refuses_a_tampered_stream_and_leaves_nothing() {
        let root = tempfile::tempdir().unwrap();
        let dir = sample_archive(root.path(), "a");
        let mut bytes = export_tar(&dir, Vec::new()).unwrap();
        // Flip a byte inside pages-1.img's data (all 7s) in the stream.
        let at = bytes
            .windows(64)
            .position(|w| w.iter().all(|b| *b == 7))
            .unwrap();
        bytes[at + 100] = 8;
        let dest = root.path().join("imported");
        let error = import_tar(bytes.as_slice(), &dest).unwrap_err();
        assert!(
            matches!(error, ArchiveError::HashMismatch { .. }),
            "{error}"
        );
        assert!(!dest.exists());
    }

    #[test]
    fn chain_verification_needs_a_sound_parent() {
        let root = tempfile::tempdir().unwrap();
        let parent = sample_archive(root.path(), "p");
        let child = root.path().join("c");
        fs::create_dir_all(&child).unwrap();
        fs::write(child.join("x"), b"x").unwrap();
        seal(&child, draft("c", Some("p"))).unwrap();
        verify_chain(&child).unwrap();

        fs::write(parent.join("config.dump"), b"[]").unwrap();
        let error = verify_chain(&child).unwrap_err();
        assert!(
            matches!(&error, ArchiveError::ParentUnusable { parent, .. } if parent == "p"),
            "{error}"
        );
        assert!(error.to_string().contains("config.dump"), "{error}");

        fs::remove_dir_all(&parent).unwrap();
        assert!(matches!(
            verify_chain(&child).unwrap_err(),
            ArchiveError::ParentUnusable { .. }
        ));
    }

    #[test]
    fn foreign_tar_with_escaping_path_is_refused() {
        let mut builder = tar::Builder::new(Vec::new());
        let mut header = tar::Header::new_gnu();
        header.set_size(1);
        header.set_entry_type(tar::EntryType::Regular);
        header.set_mode(0o644);
        // `append_data` refuses `..` itself, so write the name into the raw header.
        let name = b"../escape";
        header.as_old_mut().name[..name.len()].copy_from_slice(name);
        header.set_cksum();
        builder.append(&header, &b"x"[..]).unwrap();
        let bytes = builder.into_inner().unwrap();
        let root = tempfile::tempdir().unwrap();
        let error = extract_foreign_tar(bytes.as_slice(), &root.path().join("d")).unwrap_err();
        assert!(matches!(error, ArchiveError::BadTarEntry { .. }), "{error}");
        assert!(!root.path().join("escape").exists());
    }
}
