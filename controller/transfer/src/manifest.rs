//! The manifest: what a transfer moves, with the hashes that let the receiver verify every
//! piece against the source, and the piece numbering both ends use for resume.
//!
//! Data model:
//! - Files and directories, paths relative to the transfer's target directory. Files are in a
//!   fixed order (sorted paths for a scanned directory); a file's *index* in that order is how
//!   frames and the planner name it.
//! - A file larger than `chunk_size` is cut into chunks at multiples of `chunk_size` (exactly as
//!   `automigrate_core::transfer::plan_transfer` cuts it) and carries one BLAKE3 hash per chunk.
//!   Every file carries a file hash: the BLAKE3 hash of its content when it fits in one chunk,
//!   else the hash list of its chunks ([`file_hash_from_chunks`]), so hashing reads each byte
//!   once and the receiver can check a large file on disk chunk by chunk.
//! - A *piece* is what is verified and journaled on its own: one chunk of a large file, or one
//!   whole small file. Pieces are numbered file by file, so both ends derive the same numbers
//!   from the manifest alone, and "which pieces do you have" is a list of ranges.
//! - The transfer id is a BLAKE3 hash of the canonical encoding of the manifest (its frames).
//!   The same content sent to the same place gets the same id, which is what lets a restarted
//!   sender resume; any change to a file changes the id, so stale partial data is never reused.
//!
//! The sender builds a manifest by scanning and hashing the source ([`scan`]); the receiver
//! rebuilds it from frames with [`ManifestAssembler`], which enforces its limits while the
//! frames arrive.

use std::collections::HashSet;
use std::fs::File;
use std::io::Read;
use std::ops::Range;
use std::path::{Path, PathBuf};

use crate::paths::{PathError, RelPath};
use crate::wire::{self, Frame, Hash, MAX_HASHES_PER_FRAME, ManifestEntry, ManifestStart};

/// Smallest chunk size: the planner's minimum.
pub const MIN_CHUNK_SIZE: u64 = automigrate_core::transfer::MIN_CHUNK_SIZE;
/// Largest chunk size a receiver accepts: it buffers one chunk per stream to verify it before
/// writing, so this bounds its memory.
pub const MAX_CHUNK_SIZE: u64 = 64 * 1024 * 1024;
/// Most pieces in one transfer, the planner's unit limit.
pub const MAX_PIECES: u64 = automigrate_core::transfer::MAX_WORK_UNITS;
/// Domain separation for the transfer id.
const ID_CONTEXT: &str = "automigrate-transfer 2026 manifest v1";
/// Domain separation for the hash list of a large file.
const FILE_HASH_CONTEXT: &str = "automigrate-transfer 2026 file from chunk hashes v1";

/// Why a manifest could not be built or accepted.
#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    /// A path in the manifest was refused.
    #[error("manifest path: {0}")]
    Path(#[from] PathError),
    /// The source could not be read.
    #[error("reading the source `{path}`: {source}")]
    Read {
        /// The local path.
        path: PathBuf,
        /// The reason.
        source: std::io::Error,
    },
    /// The source holds something other than regular files and directories.
    #[error("`{0}` is a symlink or special file; only regular files and directories are sent")]
    Unsupported(PathBuf),
    /// A source name is not UTF-8, which the wire format requires.
    #[error("`{0}` is not valid UTF-8")]
    NotUtf8(PathBuf),
    /// A listed file is outside the base directory it is relative to.
    #[error("`{file}` is not inside `{base}`")]
    OutsideBase {
        /// The file.
        file: PathBuf,
        /// The base.
        base: PathBuf,
    },
    /// The chunk size is outside `MIN_CHUNK_SIZE..=MAX_CHUNK_SIZE`.
    #[error("chunk size {0} is outside {MIN_CHUNK_SIZE}..={MAX_CHUNK_SIZE} bytes")]
    ChunkSize(u64),
    /// Two entries have the same path, or a file is a parent of another entry.
    #[error("`{0}` appears twice, or is both a file and a directory")]
    Conflict(String),
    /// Frames arrived out of order, or their counts disagree with the header.
    #[error("malformed manifest: {0}")]
    Malformed(String),
    /// A limit was exceeded.
    #[error("manifest too large: {what} {value} exceeds the limit of {limit}")]
    TooLarge {
        /// What was counted.
        what: &'static str,
        /// Its value.
        value: u64,
        /// The limit.
        limit: u64,
    },
    /// The manifest does not hash to the transfer id the peer announced.
    #[error("the manifest does not match the announced transfer id")]
    IdMismatch,
}

/// One file of the transfer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileEntry {
    /// Path relative to the target.
    pub path: RelPath,
    /// Size in bytes.
    pub size: u64,
    /// Permission bits.
    pub mode: u32,
    /// BLAKE3 of the content.
    pub hash: Hash,
    /// BLAKE3 of each chunk, for files larger than the chunk size; empty otherwise.
    pub chunk_hashes: Vec<Hash>,
}

/// One directory of the transfer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DirEntry {
    /// Path relative to the target.
    pub path: RelPath,
    /// Permission bits.
    pub mode: u32,
}

/// What a transfer moves.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Manifest {
    /// Directory under the receiver's root; `None` for the root itself.
    pub target: Option<RelPath>,
    /// Chunk size.
    pub chunk_size: u64,
    /// Files, in index order.
    pub files: Vec<FileEntry>,
    /// Directories.
    pub dirs: Vec<DirEntry>,
    /// First piece of each file, and the total at the end (`files.len() + 1` entries).
    piece_starts: Vec<u64>,
}

/// Where a piece lies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PieceLocation {
    /// File index.
    pub file: usize,
    /// Chunk index within the file (0 for a small file).
    pub chunk: u64,
    /// Byte offset in the file.
    pub offset: u64,
    /// Length in bytes.
    pub len: u64,
    /// Whether the file is chunked.
    pub chunked: bool,
}

impl Manifest {
    /// Builds a manifest and its piece table; checks the chunk size, the piece limit, path
    /// conflicts and that each chunked file carries the right number of chunk hashes.
    pub fn new(
        target: Option<RelPath>,
        chunk_size: u64,
        files: Vec<FileEntry>,
        dirs: Vec<DirEntry>,
    ) -> Result<Self, ManifestError> {
        if !(MIN_CHUNK_SIZE..=MAX_CHUNK_SIZE).contains(&chunk_size) {
            return Err(ManifestError::ChunkSize(chunk_size));
        }
        check_conflicts(&files, &dirs)?;
        let mut piece_starts = Vec::with_capacity(files.len() + 1);
        let mut next = 0_u64;
        for file in &files {
            piece_starts.push(next);
            let pieces = pieces_in(file.size, chunk_size);
            let expected_hashes = if file.size > chunk_size { pieces } else { 0 };
            if u64::try_from(file.chunk_hashes.len()).ok() != Some(expected_hashes) {
                return Err(ManifestError::Malformed(format!(
                    "`{}` has {} chunk hashes, expected {expected_hashes}",
                    file.path,
                    file.chunk_hashes.len()
                )));
            }
            if expected_hashes > 0 && file_hash_from_chunks(&file.chunk_hashes) != file.hash {
                return Err(ManifestError::Malformed(format!(
                    "`{}`: the file hash is not the hash of its chunk hashes",
                    file.path
                )));
            }
            next = next.saturating_add(pieces);
            if next > MAX_PIECES {
                return Err(ManifestError::TooLarge {
                    what: "pieces",
                    value: next,
                    limit: MAX_PIECES,
                });
            }
        }
        piece_starts.push(next);
        Ok(Self {
            target,
            chunk_size,
            files,
            dirs,
            piece_starts,
        })
    }

    /// Number of pieces.
    pub fn piece_count(&self) -> u64 {
        self.piece_starts.last().copied().unwrap_or(0)
    }

    /// Sum of file sizes.
    pub fn total_bytes(&self) -> u64 {
        self.files
            .iter()
            .fold(0_u64, |sum, file| sum.saturating_add(file.size))
    }

    /// The pieces of file `file`.
    pub fn pieces_of(&self, file: usize) -> Range<u64> {
        let start = self.piece_starts.get(file).copied().unwrap_or(0);
        let end = self.piece_starts.get(file + 1).copied().unwrap_or(start);
        start..end
    }

    /// Whether file `file` is sent in chunks.
    pub fn is_chunked(&self, file: usize) -> bool {
        self.files
            .get(file)
            .is_some_and(|entry| entry.size > self.chunk_size)
    }

    /// Where piece `piece` lies; `None` past the end.
    pub fn locate(&self, piece: u64) -> Option<PieceLocation> {
        if piece >= self.piece_count() {
            return None;
        }
        // The last file whose first piece is <= piece; empty ranges cannot occur because
        // every file has at least one piece.
        let file = self.piece_starts.partition_point(|&start| start <= piece) - 1;
        let entry = self.files.get(file)?;
        let chunk = piece - self.piece_starts[file];
        let chunked = entry.size > self.chunk_size;
        let (offset, len) = if chunked {
            let offset = chunk * self.chunk_size;
            (offset, self.chunk_size.min(entry.size - offset))
        } else {
            (0, entry.size)
        };
        Some(PieceLocation {
            file,
            chunk,
            offset,
            len,
            chunked,
        })
    }

    /// The piece of chunk `chunk` of file `file`, if both exist and the file is chunked.
    pub fn chunk_piece(&self, file: usize, chunk: u64) -> Option<u64> {
        if !self.is_chunked(file) {
            return None;
        }
        let range = self.pieces_of(file);
        let piece = range.start.checked_add(chunk)?;
        range.contains(&piece).then_some(piece)
    }

    /// Bytes of piece `piece`.
    pub fn piece_len(&self, piece: u64) -> u64 {
        self.locate(piece).map_or(0, |location| location.len)
    }

    /// The frames that carry this manifest, in order (after `Hello`/`Welcome`).
    pub fn frames(&self) -> Vec<Frame> {
        let mut frames = Vec::with_capacity(self.files.len() + self.dirs.len() + 2);
        frames.push(Frame::ManifestStart(ManifestStart {
            target: self
                .target
                .as_ref()
                .map(|target| target.as_str().to_owned())
                .unwrap_or_default(),
            chunk_size: self.chunk_size,
            files: self.files.len() as u64,
            dirs: self.dirs.len() as u64,
            total_bytes: self.total_bytes(),
        }));
        for dir in &self.dirs {
            frames.push(Frame::ManifestEntry(ManifestEntry::Dir {
                path: dir.path.as_str().to_owned(),
                mode: dir.mode,
            }));
        }
        for file in &self.files {
            frames.push(Frame::ManifestEntry(ManifestEntry::File {
                path: file.path.as_str().to_owned(),
                size: file.size,
                mode: file.mode,
                hash: file.hash,
            }));
            for hashes in file.chunk_hashes.chunks(MAX_HASHES_PER_FRAME) {
                frames.push(Frame::ChunkHashes(hashes.to_vec()));
            }
        }
        frames.push(Frame::ManifestEnd);
        frames
    }

    /// The transfer id: BLAKE3 (derive-key mode) over the encoded manifest frames.
    pub fn transfer_id(&self) -> Result<Hash, wire::WireError> {
        let mut hasher = blake3::Hasher::new_derive_key(ID_CONTEXT);
        let mut buffer = Vec::new();
        for frame in self.frames() {
            buffer.clear();
            frame.encode(&mut buffer)?;
            hasher.update(&buffer);
        }
        Ok(*hasher.finalize().as_bytes())
    }

    /// The planner's view of the files.
    pub fn file_specs(&self) -> Vec<automigrate_core::transfer::FileSpec> {
        self.files
            .iter()
            .map(|file| automigrate_core::transfer::FileSpec {
                path: file.path.as_str().to_owned(),
                size: file.size,
            })
            .collect()
    }
}

fn pieces_in(size: u64, chunk_size: u64) -> u64 {
    if size > chunk_size {
        size.div_ceil(chunk_size)
    } else {
        1
    }
}

/// Refuses duplicate paths, and a file that is also the parent of another entry.
fn check_conflicts(files: &[FileEntry], dirs: &[DirEntry]) -> Result<(), ManifestError> {
    let mut seen: HashSet<&str> = HashSet::with_capacity(files.len() + dirs.len());
    let file_paths: HashSet<&str> = files.iter().map(|file| file.path.as_str()).collect();
    let all = files
        .iter()
        .map(|file| &file.path)
        .chain(dirs.iter().map(|dir| &dir.path));
    for path in all {
        if !seen.insert(path.as_str()) {
            return Err(ManifestError::Conflict(path.as_str().to_owned()));
        }
        let text = path.as_str();
        for (position, _) in text.match_indices('/') {
            let parent = &text[..position];
            if file_paths.contains(parent) {
                return Err(ManifestError::Conflict(parent.to_owned()));
            }
        }
    }
    Ok(())
}

/// What to send.
#[derive(Debug, Clone)]
pub enum Source {
    /// A directory: every file and directory under it, recursively; paths relative to it.
    Dir(PathBuf),
    /// Files (and directories, sent whole) under `base`, paths relative to `base`.
    Paths {
        /// The directory the paths are relative to.
        base: PathBuf,
        /// Files or directories, absolute or relative to `base`.
        paths: Vec<PathBuf>,
    },
    /// Files and directories confined beneath `root`: every one is opened through a handle on
    /// `root` with no symlink followed ([`crate::beneath`]), at the scan and again when the
    /// sender reads it, so a symlink swapped in after a check cannot lead outside `root`.
    Beneath {
        /// The confining directory (trusted: a symlink in its own path is followed).
        root: PathBuf,
        /// Files or directories relative to `root`, no `..`; sent under these same paths.
        paths: Vec<RelPath>,
    },
}

/// A scanned source: the manifest and, per file index, the local path to read.
#[derive(Debug, Clone)]
pub struct Scanned {
    /// The manifest.
    pub manifest: Manifest,
    /// Local paths, by file index; relative to `beneath` when it is set.
    pub local_paths: Vec<PathBuf>,
    /// The handle on a [`Source::Beneath`] root: local paths are opened through it with
    /// [`crate::beneath::open_file`], never by path.
    pub beneath: Option<std::sync::Arc<std::os::fd::OwnedFd>>,
}

/// Lists and hashes the source. Runs on the calling thread and `threads - 1` more (files are
/// hashed in parallel); call it from a blocking context.
#[tracing::instrument(skip_all, fields(chunk_size))]
pub fn scan(
    source: &Source,
    target: Option<RelPath>,
    chunk_size: u64,
    threads: usize,
) -> Result<Scanned, ManifestError> {
    if !(MIN_CHUNK_SIZE..=MAX_CHUNK_SIZE).contains(&chunk_size) {
        return Err(ManifestError::ChunkSize(chunk_size));
    }
    let mut listed_files: Vec<(RelPath, PathBuf, u64, u32)> = Vec::new();
    let mut listed_dirs: Vec<DirEntry> = Vec::new();
    let mut beneath = None;
    match source {
        Source::Dir(root) => list_dir(root, None, &mut listed_files, &mut listed_dirs)?,
        Source::Beneath { root, paths } => {
            let handle = crate::beneath::open_root(root).map_err(|source| ManifestError::Read {
                path: root.clone(),
                source,
            })?;
            for path in paths {
                list_beneath(&handle, path, &mut listed_files, &mut listed_dirs)?;
            }
            beneath = Some(std::sync::Arc::new(handle));
        }
        Source::Paths { base, paths } => {
            for path in paths {
                let full = if path.is_absolute() {
                    path.clone()
                } else {
                    base.join(path)
                };
                let relative = full
                    .strip_prefix(base)
                    .map_err(|_| ManifestError::OutsideBase {
                        file: full.clone(),
                        base: base.clone(),
                    })?;
                let relative = utf8_rel(relative)?;
                let metadata =
                    std::fs::symlink_metadata(&full).map_err(|source| ManifestError::Read {
                        path: full.clone(),
                        source,
                    })?;
                if metadata.is_dir() {
                    listed_dirs.push(DirEntry {
                        path: relative.clone(),
                        mode: mode_of(&metadata),
                    });
                    list_dir(&full, Some(&relative), &mut listed_files, &mut listed_dirs)?;
                } else if metadata.is_file() {
                    listed_files.push((relative, full, metadata.len(), mode_of(&metadata)));
                } else {
                    return Err(ManifestError::Unsupported(full));
                }
            }
        }
    }
    listed_files.sort_by(|a, b| a.0.cmp(&b.0));
    listed_dirs.sort_by(|a, b| a.path.cmp(&b.path));
    listed_dirs.dedup();

    let hashed = hash_files(
        &listed_files,
        beneath.as_deref(),
        chunk_size,
        threads.max(1),
    )?;
    let mut files = Vec::with_capacity(listed_files.len());
    let mut local_paths = Vec::with_capacity(listed_files.len());
    for ((path, local, _, mode), (size, hash, chunk_hashes)) in listed_files.into_iter().zip(hashed)
    {
        files.push(FileEntry {
            path,
            size,
            mode,
            hash,
            chunk_hashes,
        });
        local_paths.push(local);
    }
    let manifest = Manifest::new(target, chunk_size, files, listed_dirs)?;
    Ok(Scanned {
        manifest,
        local_paths,
        beneath,
    })
}

fn mode_of(metadata: &std::fs::Metadata) -> u32 {
    use std::os::unix::fs::PermissionsExt as _;
    metadata.permissions().mode() & 0o777
}

fn utf8_rel(path: &Path) -> Result<RelPath, ManifestError> {
    let text = path
        .to_str()
        .ok_or_else(|| ManifestError::NotUtf8(path.to_path_buf()))?;
    Ok(RelPath::parse(text)?)
}

fn list_dir(
    dir: &Path,
    prefix: Option<&RelPath>,
    files: &mut Vec<(RelPath, PathBuf, u64, u32)>,
    dirs: &mut Vec<DirEntry>,
) -> Result<(), ManifestError> {
    let read_error = |path: &Path| {
        let path = path.to_path_buf();
        move |source| ManifestError::Read { path, source }
    };
    let mut entries = std::fs::read_dir(dir)
        .map_err(read_error(dir))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(read_error(dir))?;
    entries.sort_by_key(std::fs::DirEntry::file_name);
    for entry in entries {
        let local = entry.path();
        let name = entry
            .file_name()
            .into_string()
            .map_err(|_| ManifestError::NotUtf8(local.clone()))?;
        let relative = match prefix {
            Some(prefix) => RelPath::parse(&format!("{prefix}/{name}"))?,
            None => RelPath::parse(&name)?,
        };
        let metadata = std::fs::symlink_metadata(&local).map_err(read_error(&local))?;
        if metadata.is_dir() {
            dirs.push(DirEntry {
                path: relative.clone(),
                mode: mode_of(&metadata),
            });
            list_dir(&local, Some(&relative), files, dirs)?;
        } else if metadata.is_file() {
            files.push((relative, local, metadata.len(), mode_of(&metadata)));
        } else {
            return Err(ManifestError::Unsupported(local));
        }
    }
    Ok(())
}

/// Lists `path` beneath `root` (a file, or a directory recursively) through directory handles:
/// each directory is opened relative to its parent's handle, refusing symlinks, so the walk
/// never leaves `root` whatever is renamed meanwhile. Local paths are relative to `root`.
fn list_beneath(
    root: &std::os::fd::OwnedFd,
    path: &RelPath,
    files: &mut Vec<(RelPath, PathBuf, u64, u32)>,
    dirs: &mut Vec<DirEntry>,
) -> Result<(), ManifestError> {
    use crate::beneath::{self, Kind};
    let local = PathBuf::from(path.as_str());
    let read_error = |path: &Path| {
        let path = path.to_path_buf();
        move |source| ManifestError::Read { path, source }
    };
    let handle = beneath::open(root, &local, false).map_err(read_error(&local))?;
    let opened = beneath::stat(&handle).map_err(read_error(&local))?;
    match opened.kind {
        Kind::File => {
            files.push((path.clone(), local, opened.size, opened.mode));
            return Ok(());
        }
        Kind::Other => return Err(ManifestError::Unsupported(local)),
        Kind::Dir => dirs.push(DirEntry {
            path: path.clone(),
            mode: opened.mode,
        }),
    }
    walk_beneath(handle, path, &local, files, dirs)
}

/// The entries under the directory `dir` (opened beneath the root), depth first: one open
/// handle per level, so a wide tree does not run out of descriptors.
fn walk_beneath(
    dir: std::os::fd::OwnedFd,
    relative: &RelPath,
    local: &Path,
    files: &mut Vec<(RelPath, PathBuf, u64, u32)>,
    dirs: &mut Vec<DirEntry>,
) -> Result<(), ManifestError> {
    use crate::beneath::{self, Kind};
    let read_error = |path: &Path| {
        let path = path.to_path_buf();
        move |source| ManifestError::Read { path, source }
    };
    let (entries, dir) = beneath::list_dir(dir).map_err(read_error(local))?;
    for entry in entries {
        let entry_local = local.join(&entry.name);
        let name = entry
            .name
            .to_str()
            .ok_or_else(|| ManifestError::NotUtf8(entry_local.clone()))?;
        let entry_relative = RelPath::parse(&format!("{relative}/{name}"))?;
        match entry.kind {
            Kind::File => files.push((entry_relative, entry_local, entry.size, entry.mode)),
            Kind::Dir => {
                dirs.push(DirEntry {
                    path: entry_relative.clone(),
                    mode: entry.mode,
                });
                let sub =
                    beneath::open_subdir(&dir, &entry.name).map_err(read_error(&entry_local))?;
                walk_beneath(sub, &entry_relative, &entry_local, files, dirs)?;
            }
            Kind::Other => return Err(ManifestError::Unsupported(entry_local)),
        }
    }
    Ok(())
}

type FileHashes = (u64, Hash, Vec<Hash>);

/// Hashes files on `threads` threads, taking files from a shared counter so one large file
/// does not leave the others waiting.
fn hash_files(
    files: &[(RelPath, PathBuf, u64, u32)],
    beneath: Option<&std::os::fd::OwnedFd>,
    chunk_size: u64,
    threads: usize,
) -> Result<Vec<FileHashes>, ManifestError> {
    use std::sync::Mutex;
    use std::sync::atomic::{AtomicUsize, Ordering};
    let next = AtomicUsize::new(0);
    let results: Mutex<Vec<Option<Result<FileHashes, ManifestError>>>> =
        Mutex::new((0..files.len()).map(|_| None).collect());
    std::thread::scope(|scope| {
        for _ in 0..threads.min(files.len().max(1)) {
            scope.spawn(|| {
                let mut buffer = vec![0_u8; 1 << 20];
                loop {
                    let index = next.fetch_add(1, Ordering::Relaxed);
                    let Some((_, local, _, _)) = files.get(index) else {
                        break;
                    };
                    let result = hash_file(local, beneath, chunk_size, &mut buffer);
                    if let Ok(mut results) = results.lock() {
                        results[index] = Some(result);
                    }
                }
            });
        }
    });
    let results = results
        .into_inner()
        .map_err(|_| ManifestError::Malformed("a hashing thread panicked".into()))?;
    results
        .into_iter()
        .map(|result| {
            result.unwrap_or_else(|| Err(ManifestError::Malformed("a file was not hashed".into())))
        })
        .collect()
}

/// Reads a file once, hashing each chunk; the file's hash is its content hash when it fits in
/// one chunk, else the hash list of its chunks ([`file_hash_from_chunks`]). The size is what
/// was read, so a file that grew or shrank since listing is described as it is now.
fn hash_file(
    path: &Path,
    beneath: Option<&std::os::fd::OwnedFd>,
    chunk_size: u64,
    buffer: &mut [u8],
) -> Result<FileHashes, ManifestError> {
    let error = |source| ManifestError::Read {
        path: path.to_path_buf(),
        source,
    };
    let file = match beneath {
        Some(root) => crate::beneath::open_file(root, path),
        None => File::open(path),
    }
    .map_err(error)?;
    hash_content(file, chunk_size, buffer).map_err(error)
}

/// Size, file hash and chunk hashes of everything `reader` yields, as the manifest describes a
/// file (see [`hash_file`]); the receiver uses it to recognise files already in place.
pub fn hash_content(
    mut reader: impl Read,
    chunk_size: u64,
    buffer: &mut [u8],
) -> std::io::Result<(u64, Hash, Vec<Hash>)> {
    let mut chunk = blake3::Hasher::new();
    let mut chunk_hashes = Vec::new();
    let mut size = 0_u64;
    let mut in_chunk = 0_u64;
    loop {
        let read = match reader.read(buffer) {
            Ok(read) => read,
            Err(error) if error.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(error) => return Err(error),
        };
        if read == 0 {
            break;
        }
        let mut data = &buffer[..read];
        while !data.is_empty() {
            let room = usize::try_from(chunk_size - in_chunk).unwrap_or(usize::MAX);
            let take = room.min(data.len());
            chunk.update(&data[..take]);
            in_chunk += take as u64;
            data = &data[take..];
            if in_chunk == chunk_size {
                chunk_hashes.push(*chunk.finalize().as_bytes());
                chunk.reset();
                in_chunk = 0;
            }
        }
        size += read as u64;
    }
    if in_chunk > 0 || size == 0 {
        chunk_hashes.push(*chunk.finalize().as_bytes());
    }
    if size <= chunk_size {
        let hash = chunk_hashes.first().copied().unwrap_or_default();
        return Ok((size, hash, Vec::new()));
    }
    Ok((size, file_hash_from_chunks(&chunk_hashes), chunk_hashes))
}

/// The hash of a file larger than the chunk size: BLAKE3 (derive-key mode) over its chunk
/// hashes in order. Each byte is then hashed once, and the receiver checks a file on disk
/// chunk by chunk, so a bad chunk costs that chunk, not the file.
pub fn file_hash_from_chunks(chunk_hashes: &[Hash]) -> Hash {
    let mut hasher = blake3::Hasher::new_derive_key(FILE_HASH_CONTEXT);
    for hash in chunk_hashes {
        hasher.update(hash);
    }
    *hasher.finalize().as_bytes()
}

/// Receiver limits on a manifest.
#[derive(Debug, Clone, Copy)]
pub struct ManifestLimits {
    /// Most files and directories together.
    pub max_entries: u64,
    /// Most bytes of manifest frames together.
    pub max_bytes: u64,
}

impl Default for ManifestLimits {
    fn default() -> Self {
        Self {
            max_entries: 1 << 22,
            max_bytes: 256 << 20,
        }
    }
}

/// Rebuilds a manifest from frames on the receiver, checking limits as frames arrive.
#[derive(Debug)]
pub struct ManifestAssembler {
    limits: ManifestLimits,
    start: Option<(Option<RelPath>, u64, u64, u64, u64)>,
    files: Vec<FileEntry>,
    dirs: Vec<DirEntry>,
    bytes: u64,
    hashes_wanted: u64,
    pieces: u64,
    total: u64,
}

impl ManifestAssembler {
    /// An empty assembler.
    pub fn new(limits: ManifestLimits) -> Self {
        Self {
            limits,
            start: None,
            files: Vec::new(),
            dirs: Vec::new(),
            bytes: 0,
            hashes_wanted: 0,
            pieces: 0,
            total: 0,
        }
    }

    /// Takes the next frame, `encoded_len` bytes on the wire. Returns the manifest after
    /// `ManifestEnd`.
    pub fn push(
        &mut self,
        frame: Frame,
        encoded_len: usize,
    ) -> Result<Option<Manifest>, ManifestError> {
        self.bytes = self.bytes.saturating_add(encoded_len as u64);
        if self.bytes > self.limits.max_bytes {
            return Err(ManifestError::TooLarge {
                what: "bytes",
                value: self.bytes,
                limit: self.limits.max_bytes,
            });
        }
        let malformed = |what: String| Err(ManifestError::Malformed(what));
        match (frame, &self.start) {
            (Frame::ManifestStart(start), None) => {
                let target = if start.target.is_empty() {
                    None
                } else {
                    Some(RelPath::parse(&start.target)?)
                };
                if !(MIN_CHUNK_SIZE..=MAX_CHUNK_SIZE).contains(&start.chunk_size) {
                    return Err(ManifestError::ChunkSize(start.chunk_size));
                }
                let entries = start.files.saturating_add(start.dirs);
                if entries > self.limits.max_entries {
                    return Err(ManifestError::TooLarge {
                        what: "entries",
                        value: entries,
                        limit: self.limits.max_entries,
                    });
                }
                self.start = Some((
                    target,
                    start.chunk_size,
                    start.files,
                    start.dirs,
                    start.total_bytes,
                ));
                Ok(None)
            }
            (Frame::ManifestStart(_), Some(_)) => malformed("second ManifestStart".into()),
            (_, None) => malformed("the manifest must begin with ManifestStart".into()),
            (Frame::ManifestEntry(entry), Some(start)) => {
                let (chunk_size, files, dirs) = (start.1, start.2, start.3);
                if self.hashes_wanted > 0 {
                    return malformed(
                        "an entry arrived before the previous file's chunk hashes".into(),
                    );
                }
                match entry {
                    ManifestEntry::Dir { path, mode } => {
                        if self.dirs.len() as u64 >= dirs {
                            return malformed(format!(
                                "more than the announced {dirs} directories"
                            ));
                        }
                        self.dirs.push(DirEntry {
                            path: RelPath::parse(&path)?,
                            mode: mode & 0o777,
                        });
                    }
                    ManifestEntry::File {
                        path,
                        size,
                        mode,
                        hash,
                    } => {
                        if self.files.len() as u64 >= files {
                            return malformed(format!("more than the announced {files} files"));
                        }
                        self.total = self.total.saturating_add(size);
                        self.hashes_wanted = if size > chunk_size {
                            size.div_ceil(chunk_size)
                        } else {
                            0
                        };
                        self.pieces = self.pieces.saturating_add(self.hashes_wanted.max(1));
                        if self.pieces > MAX_PIECES {
                            return Err(ManifestError::TooLarge {
                                what: "pieces",
                                value: self.pieces,
                                limit: MAX_PIECES,
                            });
                        }
                        // Reserve only what the byte budget already allows for.
                        let reserve =
                            usize::try_from(self.hashes_wanted.min(MAX_HASHES_PER_FRAME as u64))
                                .unwrap_or(0);
                        self.files.push(FileEntry {
                            path: RelPath::parse(&path)?,
                            size,
                            mode: mode & 0o777,
                            hash,
                            chunk_hashes: Vec::with_capacity(reserve),
                        });
                    }
                }
                Ok(None)
            }
            (Frame::ChunkHashes(hashes), Some(_)) => {
                let count = hashes.len() as u64;
                if count == 0 || count > self.hashes_wanted {
                    return malformed(format!(
                        "{count} chunk hashes where {} were expected",
                        self.hashes_wanted
                    ));
                }
                let Some(file) = self.files.last_mut() else {
                    return malformed("chunk hashes before any file".into());
                };
                file.chunk_hashes.extend(hashes);
                self.hashes_wanted -= count;
                Ok(None)
            }
            (Frame::ManifestEnd, Some((target, chunk_size, files, dirs, total))) => {
                if self.hashes_wanted > 0 {
                    return malformed("the manifest ended inside a file's chunk hashes".into());
                }
                if self.files.len() as u64 != *files || self.dirs.len() as u64 != *dirs {
                    return malformed(format!(
                        "announced {files} files and {dirs} directories, got {} and {}",
                        self.files.len(),
                        self.dirs.len()
                    ));
                }
                if self.total != *total {
                    return malformed(format!(
                        "announced {total} bytes, the files add up to {}",
                        self.total
                    ));
                }
                let manifest = Manifest::new(
                    target.clone(),
                    *chunk_size,
                    std::mem::take(&mut self.files),
                    std::mem::take(&mut self.dirs),
                )?;
                Ok(Some(manifest))
            }
            (other, Some(_)) => malformed(format!(
                "unexpected {} frame inside the manifest",
                other.kind()
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample_tree() -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        std::fs::create_dir_all(root.join("a/b")).unwrap();
        std::fs::create_dir_all(root.join("empty")).unwrap();
        std::fs::write(root.join("a/small"), b"hello").unwrap();
        std::fs::write(root.join("a/b/zero"), b"").unwrap();
        let big: Vec<u8> = (0..(3 * MIN_CHUNK_SIZE + 17))
            .map(|i| (i % 251) as u8)
            .collect();
        std::fs::write(root.join("big"), &big).unwrap();
        dir
    }

    #[test]
    fn scanning_lists_everything_in_a_stable_order_with_correct_hashes() {
        let tree = sample_tree();
        let scanned = scan(&Source::Dir(tree.path().into()), None, MIN_CHUNK_SIZE, 2).unwrap();
        let manifest = &scanned.manifest;
        let paths: Vec<&str> = manifest.files.iter().map(|f| f.path.as_str()).collect();
        assert_eq!(paths, ["a/b/zero", "a/small", "big"]);
        let dirs: Vec<&str> = manifest.dirs.iter().map(|d| d.path.as_str()).collect();
        assert_eq!(dirs, ["a", "a/b", "empty"]);
        let big = std::fs::read(tree.path().join("big")).unwrap();
        let big_entry = &manifest.files[2];
        assert_eq!(
            big_entry.hash,
            file_hash_from_chunks(&big_entry.chunk_hashes)
        );
        assert_eq!(
            manifest.files[1].hash,
            *blake3::hash(b"hello").as_bytes(),
            "a small file's hash is its content hash"
        );
        assert_eq!(big_entry.chunk_hashes.len(), 4);
        for (index, chunk) in big.chunks(MIN_CHUNK_SIZE as usize).enumerate() {
            assert_eq!(
                big_entry.chunk_hashes[index],
                *blake3::hash(chunk).as_bytes()
            );
        }
        assert_eq!(manifest.files[0].hash, *blake3::hash(b"").as_bytes());
        assert_eq!(manifest.piece_count(), 1 + 1 + 4);
        assert_eq!(manifest.locate(2).unwrap().offset, 0);
        let last = manifest.locate(5).unwrap();
        assert_eq!(
            (last.file, last.chunk, last.offset, last.len),
            (2, 3, 3 * MIN_CHUNK_SIZE, 17)
        );
        assert!(manifest.locate(6).is_none());
        assert_eq!(manifest.chunk_piece(2, 3), Some(5));
        assert_eq!(manifest.chunk_piece(2, 4), None);
        assert_eq!(manifest.chunk_piece(1, 0), None);
    }

    #[test]
    fn the_id_follows_the_content() {
        let tree = sample_tree();
        let source = Source::Dir(tree.path().into());
        let first = scan(&source, None, MIN_CHUNK_SIZE, 1).unwrap().manifest;
        let again = scan(&source, None, MIN_CHUNK_SIZE, 2).unwrap().manifest;
        assert_eq!(first.transfer_id().unwrap(), again.transfer_id().unwrap());
        std::fs::write(tree.path().join("a/small"), b"hellO").unwrap();
        let changed = scan(&source, None, MIN_CHUNK_SIZE, 1).unwrap().manifest;
        assert_ne!(first.transfer_id().unwrap(), changed.transfer_id().unwrap());
        let elsewhere = scan(
            &source,
            Some(RelPath::parse("x").unwrap()),
            MIN_CHUNK_SIZE,
            1,
        )
        .unwrap()
        .manifest;
        assert_ne!(
            changed.transfer_id().unwrap(),
            elsewhere.transfer_id().unwrap()
        );
    }

    #[test]
    fn frames_reassemble_to_the_same_manifest() {
        let tree = sample_tree();
        let manifest = scan(
            &Source::Dir(tree.path().into()),
            Some(RelPath::parse("t/u").unwrap()),
            MIN_CHUNK_SIZE,
            2,
        )
        .unwrap()
        .manifest;
        let mut assembler = ManifestAssembler::new(ManifestLimits::default());
        let mut result = None;
        for frame in manifest.frames() {
            let len = frame.to_bytes().unwrap().len();
            result = assembler.push(frame, len).unwrap();
        }
        assert_eq!(result.unwrap(), manifest);
    }

    #[test]
    fn the_assembler_refuses_lies_and_excess() {
        let tree = sample_tree();
        let manifest = scan(&Source::Dir(tree.path().into()), None, MIN_CHUNK_SIZE, 1)
            .unwrap()
            .manifest;
        let frames = manifest.frames();

        // A traversal path in an entry.
        let mut assembler = ManifestAssembler::new(ManifestLimits::default());
        assembler.push(frames[0].clone(), 10).unwrap();
        let error = assembler
            .push(
                Frame::ManifestEntry(ManifestEntry::Dir {
                    path: "../up".into(),
                    mode: 0o755,
                }),
                10,
            )
            .unwrap_err();
        assert!(
            matches!(error, ManifestError::Path(PathError::ParentComponent(_))),
            "{error}"
        );

        // Too many bytes.
        let mut assembler = ManifestAssembler::new(ManifestLimits {
            max_entries: 100,
            max_bytes: 50,
        });
        let error = frames.iter().try_for_each(|frame| {
            assembler
                .push(frame.clone(), frame.to_bytes().unwrap().len())
                .map(drop)
        });
        assert!(matches!(
            error,
            Err(ManifestError::TooLarge { what: "bytes", .. })
        ));

        // Too many entries announced.
        let mut assembler = ManifestAssembler::new(ManifestLimits {
            max_entries: 2,
            max_bytes: 1 << 20,
        });
        assert!(matches!(
            assembler.push(frames[0].clone(), 10),
            Err(ManifestError::TooLarge {
                what: "entries",
                ..
            })
        ));

        // A missing chunk hash frame.
        let mut assembler = ManifestAssembler::new(ManifestLimits::default());
        let without_hashes: Vec<Frame> = frames
            .iter()
            .filter(|f| !matches!(f, Frame::ChunkHashes(_)))
            .cloned()
            .collect();
        let error = without_hashes
            .into_iter()
            .try_for_each(|frame| assembler.push(frame, 10).map(drop));
        assert!(matches!(error, Err(ManifestError::Malformed(_))));

        // A file that is also a directory.
        let error = Manifest::new(
            None,
            MIN_CHUNK_SIZE,
            vec![FileEntry {
                path: RelPath::parse("a").unwrap(),
                size: 0,
                mode: 0o644,
                hash: [0; 32],
                chunk_hashes: vec![],
            }],
            vec![DirEntry {
                path: RelPath::parse("a/b").unwrap(),
                mode: 0o755,
            }],
        )
        .unwrap_err();
        assert!(matches!(error, ManifestError::Conflict(_)), "{error}");
    }

    #[test]
    fn special_files_are_refused_by_name() {
        let tree = sample_tree();
        std::os::unix::fs::symlink("/etc/passwd", tree.path().join("link")).unwrap();
        let error = scan(&Source::Dir(tree.path().into()), None, MIN_CHUNK_SIZE, 1).unwrap_err();
        assert!(
            matches!(error, ManifestError::Unsupported(ref p) if p.ends_with("link")),
            "{error}"
        );
    }
}
