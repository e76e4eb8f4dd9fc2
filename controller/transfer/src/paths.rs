//! Confining every received path to the destination root.
//!
//! Two layers, both needed:
//!
//! - [`RelPath`] checks the *name* a peer sent: relative, `/`-separated, no empty, `.` or `..`
//!   component, no NUL, bounded length, and not inside the reserved staging directory. A name
//!   that passes cannot leave the root by itself.
//! - [`Dir`] checks the *filesystem*: a name can still leave the root through a symlink that
//!   already exists inside it (`dest/data -> /etc`). So the receiver never hands a multi-part
//!   path to the kernel: it opens the root once and walks one component at a time with
//!   `openat(O_NOFOLLOW | O_DIRECTORY)`, creating missing directories with `mkdirat`. A symlink
//!   anywhere on the way fails with `ELOOP` and is reported as such. Files are created with
//!   `O_NOFOLLOW` relative to their parent's descriptor and moved into place with `renameat`,
//!   which replaces a symlink at the final name instead of following it.

use std::fs::File;
use std::os::fd::{AsFd, OwnedFd};
use std::path::Path;

use nix::errno::Errno;
use nix::fcntl::{AtFlags, OFlag, openat, renameat};
use nix::sys::stat::{Mode, SFlag, fstatat, mkdirat};
use nix::unistd::{UnlinkatFlags, unlinkat};

/// Name of the directory under the destination root where partial files and journals live.
/// Peers may not name it: their paths are refused if they start with it.
pub const STAGING_DIR: &str = ".automigrate-staging";
/// Longest path accepted, in bytes.
pub const MAX_PATH_BYTES: usize = crate::wire::MAX_PATH_BYTES;
/// Longest component accepted, in bytes (Linux's NAME_MAX).
pub const MAX_COMPONENT_BYTES: usize = 255;

/// Why a path was refused, or a confined filesystem operation failed.
#[derive(Debug, thiserror::Error)]
pub enum PathError {
    /// The path is empty.
    #[error("empty path")]
    Empty,
    /// The path starts with `/`.
    #[error("`{0}`: absolute paths are not allowed")]
    Absolute(String),
    /// A component is `..`.
    #[error("`{0}`: `..` components are not allowed")]
    ParentComponent(String),
    /// A component is `.`.
    #[error("`{0}`: `.` components are not allowed")]
    CurrentComponent(String),
    /// Two slashes in a row, or a trailing slash.
    #[error("`{0}`: empty path components are not allowed")]
    EmptyComponent(String),
    /// A NUL byte.
    #[error("`{0}`: NUL bytes are not allowed")]
    Nul(String),
    /// Over [`MAX_PATH_BYTES`] or a component over [`MAX_COMPONENT_BYTES`].
    #[error("`{path}`: too long ({len} bytes, limit {max})")]
    TooLong {
        /// The path, cut for display.
        path: String,
        /// Its length or its component's.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// The path names the staging directory.
    #[error("`{0}`: the name `{STAGING_DIR}` is reserved for the receiver")]
    Reserved(String),
    /// A component on the way is a symlink.
    #[error("`{0}` is a symlink; the receiver never follows links inside the destination")]
    Symlink(String),
    /// A component on the way is not a directory.
    #[error("`{0}` exists and is not a directory")]
    NotADirectory(String),
    /// The final name exists and is a directory, so a file cannot replace it.
    #[error("`{0}` exists and is a directory")]
    IsADirectory(String),
    /// A system call failed.
    #[error("{op} `{path}`: {source}")]
    Io {
        /// What was attempted.
        op: &'static str,
        /// On what.
        path: String,
        /// The errno.
        source: Errno,
    },
}

impl PathError {
    fn io(op: &'static str, path: &str, source: Errno) -> Self {
        Self::Io {
            op,
            path: path.to_owned(),
            source,
        }
    }
}

/// A checked relative path: components are non-empty, not `.` or `..`, have no NUL, and the
/// first is not the staging directory.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RelPath(String);

impl RelPath {
    /// Checks a path as sent by a peer.
    pub fn parse(path: &str) -> Result<Self, PathError> {
        if path.is_empty() {
            return Err(PathError::Empty);
        }
        if path.len() > MAX_PATH_BYTES {
            return Err(PathError::TooLong {
                path: path.chars().take(64).collect(),
                len: path.len(),
                max: MAX_PATH_BYTES,
            });
        }
        if path.starts_with('/') {
            return Err(PathError::Absolute(path.to_owned()));
        }
        if path.contains('\0') {
            return Err(PathError::Nul(path.replace('\0', "\\0")));
        }
        for (position, component) in path.split('/').enumerate() {
            match component {
                "" => return Err(PathError::EmptyComponent(path.to_owned())),
                "." => return Err(PathError::CurrentComponent(path.to_owned())),
                ".." => return Err(PathError::ParentComponent(path.to_owned())),
                STAGING_DIR if position == 0 => return Err(PathError::Reserved(path.to_owned())),
                _ if component.len() > MAX_COMPONENT_BYTES => {
                    return Err(PathError::TooLong {
                        path: path.to_owned(),
                        len: component.len(),
                        max: MAX_COMPONENT_BYTES,
                    });
                }
                _ => {}
            }
        }
        Ok(Self(path.to_owned()))
    }

    /// `prefix/self`, or `self` when `prefix` is `None`; checked again as a whole.
    pub fn under(&self, prefix: Option<&RelPath>) -> Result<Self, PathError> {
        match prefix {
            Some(prefix) => Self::parse(&format!("{}/{}", prefix.0, self.0)),
            None => Ok(self.clone()),
        }
    }

    /// The path as a string.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The components.
    pub fn components(&self) -> impl Iterator<Item = &str> {
        self.0.split('/')
    }

    /// The parent directory's components and the final name.
    pub fn split_last(&self) -> (Vec<&str>, &str) {
        let mut parts: Vec<&str> = self.components().collect();
        let name = parts.pop().unwrap_or_default();
        (parts, name)
    }
}

impl std::fmt::Display for RelPath {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// An open directory that every confined operation is relative to.
#[derive(Debug)]
pub struct Dir {
    fd: OwnedFd,
    /// Path relative to the root, for messages only.
    shown: String,
}

/// What exists at a name inside a directory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Existing {
    /// Nothing.
    Nothing,
    /// A regular file of this size.
    File(u64),
    /// A directory.
    Dir,
    /// A symlink (never followed).
    Symlink,
    /// Something else (socket, device, fifo).
    Other,
}

const DIR_FLAGS: OFlag = OFlag::O_RDONLY
    .union(OFlag::O_DIRECTORY)
    .union(OFlag::O_NOFOLLOW)
    .union(OFlag::O_CLOEXEC);

impl Dir {
    /// Opens the destination root. The root itself is operator configuration and trusted; it
    /// may be reached through symlinks.
    pub fn open_root(path: &Path) -> Result<Self, PathError> {
        let shown = path.display().to_string();
        let fd = openat(
            nix::fcntl::AT_FDCWD,
            path,
            OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
            Mode::empty(),
        )
        .map_err(|errno| PathError::io("open destination root", &shown, errno))?;
        Ok(Self { fd, shown })
    }

    /// Another handle to the same directory.
    pub fn try_clone(&self) -> Result<Self, PathError> {
        let fd = self
            .fd
            .try_clone()
            .map_err(|error| PathError::io("dup", &self.shown, errno_of(&error)))?;
        Ok(Self {
            fd,
            shown: self.shown.clone(),
        })
    }

    fn child_shown(&self, name: &str) -> String {
        if self.shown.is_empty() {
            name.to_owned()
        } else {
            format!("{}/{}", self.shown, name)
        }
    }

    /// Opens the directory `name` inside this one without following a symlink; with `create`,
    /// makes it first when it does not exist.
    pub fn open_dir(&self, name: &str, create: Option<u32>) -> Result<Dir, PathError> {
        let shown = self.child_shown(name);
        let opened = openat(&self.fd, name, DIR_FLAGS, Mode::empty());
        let fd = match (opened, create) {
            (Ok(fd), _) => fd,
            (Err(Errno::ENOENT), Some(mode)) => {
                match mkdirat(&self.fd, name, Mode::from_bits_truncate(mode & 0o777)) {
                    // Another stream may have made it in between; either way it must now be a
                    // directory we can open without following links.
                    Ok(()) | Err(Errno::EEXIST) => {}
                    Err(errno) => return Err(PathError::io("mkdir", &shown, errno)),
                }
                openat(&self.fd, name, DIR_FLAGS, Mode::empty())
                    .map_err(|errno| self.classify(name, &shown, errno))?
            }
            (Err(errno), _) => return Err(self.classify(name, &shown, errno)),
        };
        Ok(Dir { fd, shown })
    }

    /// Turns an `openat` failure on a directory into the precise reason.
    fn classify(&self, name: &str, shown: &str, errno: Errno) -> PathError {
        match errno {
            Errno::ELOOP => PathError::Symlink(shown.to_owned()),
            Errno::ENOTDIR => match self.existing(name) {
                Ok(Existing::Symlink) => PathError::Symlink(shown.to_owned()),
                _ => PathError::NotADirectory(shown.to_owned()),
            },
            other => PathError::io("open directory", shown, other),
        }
    }

    /// Walks `components` from this directory, one `openat` each, never following a link;
    /// with `create`, makes missing directories with that mode.
    pub fn walk<'a>(
        &self,
        components: impl IntoIterator<Item = &'a str>,
        create: Option<u32>,
    ) -> Result<Dir, PathError> {
        let mut current = self.try_clone()?;
        for component in components {
            current = current.open_dir(component, create)?;
        }
        Ok(current)
    }

    /// Like [`Dir::walk`] without creating anything; `Ok(None)` when a component does not
    /// exist yet (it would be created later).
    pub fn walk_existing<'a>(
        &self,
        components: impl IntoIterator<Item = &'a str>,
    ) -> Result<Option<Dir>, PathError> {
        let mut current = self.try_clone()?;
        for component in components {
            let shown = current.child_shown(component);
            match openat(&current.fd, component, DIR_FLAGS, Mode::empty()) {
                Ok(fd) => current = Dir { fd, shown },
                Err(Errno::ENOENT) => return Ok(None),
                Err(errno) => return Err(current.classify(component, &shown, errno)),
            }
        }
        Ok(Some(current))
    }

    /// What exists at `name`, without following a link.
    pub fn existing(&self, name: &str) -> Result<Existing, PathError> {
        match fstatat(&self.fd, name, AtFlags::AT_SYMLINK_NOFOLLOW) {
            Ok(stat) => {
                let kind = SFlag::from_bits_truncate(stat.st_mode) & SFlag::S_IFMT;
                Ok(if kind == SFlag::S_IFREG {
                    Existing::File(u64::try_from(stat.st_size).unwrap_or(0))
                } else if kind == SFlag::S_IFDIR {
                    Existing::Dir
                } else if kind == SFlag::S_IFLNK {
                    Existing::Symlink
                } else {
                    Existing::Other
                })
            }
            Err(Errno::ENOENT) => Ok(Existing::Nothing),
            Err(errno) => Err(PathError::io("stat", &self.child_shown(name), errno)),
        }
    }

    /// Opens (creating when missing) the regular file `name` for writing, never following a
    /// link; `truncate` empties it first.
    pub fn create_file(&self, name: &str, truncate: bool) -> Result<File, PathError> {
        let mut flags = OFlag::O_RDWR | OFlag::O_CREAT | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC;
        if truncate {
            flags |= OFlag::O_TRUNC;
        }
        let fd =
            openat(&self.fd, name, flags, Mode::from_bits_truncate(0o600)).map_err(|errno| {
                match errno {
                    Errno::ELOOP => PathError::Symlink(self.child_shown(name)),
                    other => PathError::io("create", &self.child_shown(name), other),
                }
            })?;
        Ok(File::from(fd))
    }

    /// Opens the existing regular file `name`, never following a link; `Ok(None)` if absent.
    pub fn open_file(&self, name: &str, write: bool) -> Result<Option<File>, PathError> {
        let access = if write {
            OFlag::O_RDWR
        } else {
            OFlag::O_RDONLY
        };
        match openat(
            &self.fd,
            name,
            access | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
            Mode::empty(),
        ) {
            Ok(fd) => Ok(Some(File::from(fd))),
            Err(Errno::ENOENT) => Ok(None),
            Err(Errno::ELOOP) => Err(PathError::Symlink(self.child_shown(name))),
            Err(errno) => Err(PathError::io("open", &self.child_shown(name), errno)),
        }
    }

    /// Moves `name` from this directory to `to_name` in `to`, replacing a file (or a symlink,
    /// which is replaced, not followed) already there.
    pub fn rename_to(&self, name: &str, to: &Dir, to_name: &str) -> Result<(), PathError> {
        if to.existing(to_name)? == Existing::Dir {
            return Err(PathError::IsADirectory(to.child_shown(to_name)));
        }
        renameat(&self.fd, name, &to.fd, to_name)
            .map_err(|errno| PathError::io("rename into", &to.child_shown(to_name), errno))
    }

    /// Removes the file `name`; absent is fine.
    pub fn remove_file(&self, name: &str) -> Result<(), PathError> {
        match unlinkat(&self.fd, name, UnlinkatFlags::NoRemoveDir) {
            Ok(()) | Err(Errno::ENOENT) => Ok(()),
            Err(errno) => Err(PathError::io("remove", &self.child_shown(name), errno)),
        }
    }

    /// Removes the empty directory `name`; absent is fine.
    pub fn remove_dir(&self, name: &str) -> Result<(), PathError> {
        match unlinkat(&self.fd, name, UnlinkatFlags::RemoveDir) {
            Ok(()) | Err(Errno::ENOENT) => Ok(()),
            Err(errno) => Err(PathError::io(
                "remove directory",
                &self.child_shown(name),
                errno,
            )),
        }
    }

    /// Sets the permission bits of this directory (only `0o777` of `mode`).
    pub fn set_mode(&self, mode: u32) -> Result<(), PathError> {
        nix::sys::stat::fchmod(&self.fd, Mode::from_bits_truncate(mode & 0o777))
            .map_err(|errno| PathError::io("chmod", &self.shown, errno))
    }

    /// Makes this directory's entries durable (after renames into it).
    pub fn sync(&self) -> Result<(), PathError> {
        nix::unistd::fsync(self.fd.as_fd())
            .map_err(|errno| PathError::io("fsync", &self.shown, errno))
    }

    /// For messages.
    pub fn shown(&self) -> &str {
        &self.shown
    }
}

fn errno_of(error: &std::io::Error) -> Errno {
    error
        .raw_os_error()
        .map(Errno::from_raw)
        .unwrap_or(Errno::EIO)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_that_could_escape_are_refused() {
        for (path, expected) in [
            ("", "empty"),
            ("/etc/passwd", "absolute"),
            ("../x", ".."),
            ("a/../../x", ".."),
            ("a/./b", "`.`"),
            ("a//b", "empty path components"),
            ("a/", "empty path components"),
            ("a\0b", "NUL"),
            (".automigrate-staging/x", "reserved"),
        ] {
            let error = RelPath::parse(path).unwrap_err().to_string();
            assert!(error.contains(expected), "{path:?}: {error}");
        }
        assert!(RelPath::parse(&"a".repeat(256)).is_err());
        assert!(RelPath::parse(&"a/".repeat(2100)).is_err());
    }

    #[test]
    fn ordinary_names_pass() {
        for path in [
            "a",
            "a/b/c.txt",
            "..a",
            "a..",
            ".hidden",
            "x/.automigrate-staging",
            "é/ü",
        ] {
            assert_eq!(RelPath::parse(path).unwrap().as_str(), path);
        }
        let path = RelPath::parse("a/b/c").unwrap();
        let (parents, name) = path.split_last();
        assert_eq!((parents, name), (vec!["a", "b"], "c"));
    }

    #[test]
    fn walking_refuses_symlinks_and_files_on_the_way() {
        let root = tempfile::tempdir().unwrap();
        let outside = tempfile::tempdir().unwrap();
        std::fs::create_dir(root.path().join("real")).unwrap();
        std::os::unix::fs::symlink(outside.path(), root.path().join("link")).unwrap();
        std::os::unix::fs::symlink(outside.path(), root.path().join("real/inner")).unwrap();
        std::fs::write(root.path().join("file"), b"x").unwrap();
        let dir = Dir::open_root(root.path()).unwrap();

        let error = dir.walk(["link", "x"], Some(0o755)).unwrap_err();
        assert!(
            matches!(error, PathError::Symlink(ref p) if p.ends_with("link")),
            "{error}"
        );
        let error = dir.walk(["real", "inner"], Some(0o755)).unwrap_err();
        assert!(matches!(error, PathError::Symlink(_)), "{error}");
        let error = dir.walk(["file", "x"], Some(0o755)).unwrap_err();
        assert!(matches!(error, PathError::NotADirectory(_)), "{error}");
        assert!(matches!(
            dir.walk_existing(["link"]),
            Err(PathError::Symlink(_))
        ));
        assert!(dir.walk_existing(["new", "deeper"]).unwrap().is_none());
        // Nothing was created outside.
        assert_eq!(std::fs::read_dir(outside.path()).unwrap().count(), 0);

        let made = dir.walk(["new", "deeper"], Some(0o755)).unwrap();
        made.create_file("f", true).unwrap();
        assert!(root.path().join("new/deeper/f").is_file());
    }

    #[test]
    fn files_are_never_opened_through_a_link_and_rename_replaces_links() {
        let root = tempfile::tempdir().unwrap();
        let outside = tempfile::tempdir().unwrap();
        let victim = outside.path().join("victim");
        std::fs::write(&victim, b"precious").unwrap();
        std::os::unix::fs::symlink(&victim, root.path().join("name")).unwrap();
        let dir = Dir::open_root(root.path()).unwrap();
        assert!(matches!(
            dir.create_file("name", true),
            Err(PathError::Symlink(_))
        ));
        assert!(matches!(
            dir.open_file("name", false),
            Err(PathError::Symlink(_))
        ));
        let mut staged = dir.create_file("staged", true).unwrap();
        std::io::Write::write_all(&mut staged, b"new").unwrap();
        dir.rename_to("staged", &dir, "name").unwrap();
        assert_eq!(std::fs::read(&victim).unwrap(), b"precious");
        assert_eq!(std::fs::read(root.path().join("name")).unwrap(), b"new");
        assert_eq!(dir.existing("name").unwrap(), Existing::File(3));
    }
}
