//! Reading a source confined beneath a directory: every file and directory is opened relative
//! to a held directory handle, in one step, with no symlink followed anywhere on the way
//! (`openat2` with `RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS`). A check by path followed by a read
//! by path can race: a directory swapped for a symlink in between leads the read outside. Here
//! there is no "in between": what is opened is what was confined.
//!
//! Used for [`crate::Source::Beneath`] (an agent's datasets under its data root): the scan
//! walks directories through handles ([`list_dir`]), and the sender opens each file again
//! with [`open_file`] when it reads it.

use std::ffi::OsStr;
use std::fs::File;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::ffi::OsStrExt as _;
use std::path::{Path, PathBuf};

use nix::dir::Dir;
use nix::fcntl::{AtFlags, OFlag, OpenHow, ResolveFlag};
use nix::sys::stat::{FileStat, SFlag};

/// What a directory entry is, as [`list_dir`] reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// A regular file.
    File,
    /// A directory.
    Dir,
    /// A symlink, device, socket or FIFO: never followed, never read.
    Other,
}

/// An entry of a directory: its name, what it is, its size and permission bits.
#[derive(Debug, Clone)]
pub struct Entry {
    /// The name within its directory.
    pub name: std::ffi::OsString,
    /// What it is, not following a symlink.
    pub kind: Kind,
    /// Size in bytes.
    pub size: u64,
    /// Permission bits.
    pub mode: u32,
}

/// Opens the directory that confines the rest. The root itself is configuration, trusted: a
/// symlink in its own path is followed.
pub fn open_root(path: &Path) -> std::io::Result<OwnedFd> {
    Ok(nix::fcntl::open(
        path,
        OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
        nix::sys::stat::Mode::empty(),
    )?)
}

/// Opens `relative` beneath `root`; fails (`ELOOP`, `EXDEV`) when any component is a symlink
/// or the path would leave `root`. `O_NONBLOCK` so a FIFO swapped in cannot hang the open;
/// callers check what they opened ([`stat`]).
pub fn open(root: impl AsFd, relative: &Path, directory: bool) -> std::io::Result<OwnedFd> {
    let mut flags = OFlag::O_RDONLY | OFlag::O_CLOEXEC | OFlag::O_NOFOLLOW | OFlag::O_NONBLOCK;
    if directory {
        flags |= OFlag::O_DIRECTORY;
    }
    let how = OpenHow::new()
        .flags(flags)
        .resolve(ResolveFlag::RESOLVE_BENEATH | ResolveFlag::RESOLVE_NO_SYMLINKS);
    if relative.as_os_str().is_empty() {
        // It would name `root` itself, which is never a source file.
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            "an empty path names the root itself",
        ));
    }
    Ok(nix::fcntl::openat2(root, relative, how)?)
}

/// Opens the regular file `relative` beneath `root` for reading (see [`open`]).
pub fn open_file(root: impl AsFd, relative: &Path) -> std::io::Result<File> {
    let fd = open(root, relative, false)?;
    if kind(&nix::sys::stat::fstat(&fd)?) != Kind::File {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!("`{}` is not a regular file", relative.display()),
        ));
    }
    Ok(File::from(fd))
}

/// What an opened handle is, with its size and mode.
pub fn stat(fd: impl AsFd) -> std::io::Result<Entry> {
    let stat = nix::sys::stat::fstat(fd)?;
    Ok(entry(OsStr::new(""), &stat))
}

/// The entries of the directory `dir` (not `.` and `..`), sorted by name, each described
/// without following symlinks. Takes the handle: a directory stream owns its descriptor.
pub fn list_dir(dir: OwnedFd) -> std::io::Result<(Vec<Entry>, OwnedFd)> {
    // The stream consumes a descriptor; keep our own for the `fstatat` calls and the caller.
    let mut stream = Dir::from_fd(dir.try_clone()?)?;
    let mut entries = Vec::new();
    for item in stream.iter() {
        let item = item?;
        let name = OsStr::from_bytes(item.file_name().to_bytes());
        if name == "." || name == ".." {
            continue;
        }
        let stat = nix::sys::stat::fstatat(&dir, name, AtFlags::AT_SYMLINK_NOFOLLOW)?;
        entries.push(entry(name, &stat));
    }
    entries.sort_by(|a, b| a.name.cmp(&b.name));
    Ok((entries, dir))
}

/// Opens the subdirectory `name` of the directory `dir`, refusing a symlink.
pub fn open_subdir(dir: impl AsFd, name: &OsStr) -> std::io::Result<OwnedFd> {
    open(dir, &PathBuf::from(name), true)
}

fn kind(stat: &FileStat) -> Kind {
    match SFlag::from_bits_truncate(stat.st_mode & SFlag::S_IFMT.bits()) {
        SFlag::S_IFREG => Kind::File,
        SFlag::S_IFDIR => Kind::Dir,
        _ => Kind::Other,
    }
}

fn entry(name: &OsStr, stat: &FileStat) -> Entry {
    Entry {
        name: name.to_os_string(),
        kind: kind(stat),
        size: u64::try_from(stat.st_size).unwrap_or(0),
        mode: stat.st_mode & 0o777,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_symlinked_component_is_refused_even_inside_the_root() {
        let root = tempfile::tempdir().unwrap();
        let outside = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(root.path().join("real/ds")).unwrap();
        std::fs::write(root.path().join("real/ds/f"), b"in").unwrap();
        std::fs::create_dir_all(outside.path().join("ds")).unwrap();
        std::fs::write(outside.path().join("ds/f"), b"out").unwrap();
        std::os::unix::fs::symlink(outside.path(), root.path().join("away")).unwrap();
        std::os::unix::fs::symlink("real", root.path().join("alias")).unwrap();
        let handle = open_root(root.path()).unwrap();

        let read = |path: &str| {
            let mut file = open_file(&handle, Path::new(path))?;
            let mut text = String::new();
            std::io::Read::read_to_string(&mut file, &mut text)?;
            Ok::<_, std::io::Error>(text)
        };
        assert_eq!(read("real/ds/f").unwrap(), "in");
        for refused in ["away/ds/f", "alias/ds/f", "../x", "/etc/hostname"] {
            assert!(read(refused).is_err(), "{refused} was opened");
        }
        assert!(
            open_file(&handle, Path::new("real/ds")).is_err(),
            "a directory"
        );
    }

    #[test]
    fn listing_describes_symlinks_without_following_them() {
        let root = tempfile::tempdir().unwrap();
        std::fs::create_dir(root.path().join("d")).unwrap();
        std::fs::write(root.path().join("f"), b"12345").unwrap();
        std::os::unix::fs::symlink("/etc", root.path().join("l")).unwrap();
        let (entries, _) = list_dir(open_root(root.path()).unwrap()).unwrap();
        let seen: Vec<_> = entries
            .iter()
            .map(|entry| (entry.name.to_str().unwrap().to_string(), entry.kind))
            .collect();
        assert_eq!(
            seen,
            [
                ("d".to_string(), Kind::Dir),
                ("f".to_string(), Kind::File),
                ("l".to_string(), Kind::Other)
            ]
        );
        assert_eq!(entries[1].size, 5);
        assert!(open_subdir(open_root(root.path()).unwrap(), OsStr::new("l")).is_err());
    }

    #[test]
    fn a_scan_beneath_never_lists_through_a_symlink() {
        use crate::manifest::{MIN_CHUNK_SIZE, scan};
        use crate::paths::RelPath;
        let root = tempfile::tempdir().unwrap();
        let outside = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(root.path().join("sets/ds/sub")).unwrap();
        std::fs::write(root.path().join("sets/ds/sub/a"), b"a").unwrap();
        std::fs::create_dir_all(outside.path().join("ds")).unwrap();
        std::fs::write(outside.path().join("ds/secret"), b"s").unwrap();
        let source = |path: &str| crate::Source::Beneath {
            root: root.path().to_path_buf(),
            paths: vec![RelPath::parse(path).unwrap()],
        };
        let scanned = scan(&source("sets/ds"), None, MIN_CHUNK_SIZE, 1).unwrap();
        let files: Vec<_> = scanned
            .manifest
            .files
            .iter()
            .map(|f| f.path.as_str())
            .collect();
        assert_eq!(files, ["sets/ds/sub/a"]);
        assert_eq!(scanned.local_paths, [PathBuf::from("sets/ds/sub/a")]);

        // `sets` swapped for a symlink to a tree outside: the same source no longer scans.
        std::fs::rename(root.path().join("sets"), root.path().join("sets.old")).unwrap();
        std::os::unix::fs::symlink(outside.path(), root.path().join("sets")).unwrap();
        assert!(scan(&source("sets/ds"), None, MIN_CHUNK_SIZE, 1).is_err());
        // And a file listed before the swap cannot be opened through it afterwards.
        let handle = scanned.beneath.unwrap();
        std::fs::create_dir_all(outside.path().join("ds/sub")).unwrap();
        std::fs::write(outside.path().join("ds/sub/a"), b"outside").unwrap();
        assert!(open_file(&*handle, &scanned.local_paths[0]).is_err());
        // A symlink inside the listed tree is refused, not followed.
        std::fs::create_dir_all(root.path().join("other")).unwrap();
        std::os::unix::fs::symlink(outside.path(), root.path().join("other/link")).unwrap();
        assert!(matches!(
            scan(&source("other"), None, MIN_CHUNK_SIZE, 1),
            Err(crate::manifest::ManifestError::Unsupported(_))
        ));
    }
}
