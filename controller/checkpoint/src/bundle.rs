//! OCI bundles that run the host's own programs in a container, with no image.
//!
//! Data model: a [`BundleSpec`] (command, environment, working directory, which host
//! directories to expose read-only, which host directories to bind writable) becomes a bundle
//! directory: `config.json` plus an empty `rootfs/` whose mount points are the host's `/usr` and
//! `/etc` bound read-only, `/lib`, `/lib64`, `/bin`, `/sbin` recreated as the host has them
//! (symlinks into `/usr` on a merged-/usr system, read-only binds otherwise), a private `/tmp`,
//! and the usual `/proc`, `/dev`, `/sys`. Tests and the demo use it to run `python3` or `sh`
//! under runc on a machine without images or a registry.
//!
//! The container's stdio must not point at host files outside its mounts (CRIU cannot dump
//! them): start it with stdio on `/dev/null` and let the program write into a writable bind.

use std::path::{Path, PathBuf};

use serde_json::json;

#[derive(Debug, thiserror::Error)]
pub enum BundleError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("`{path}` must be an absolute path")]
    NotAbsolute { path: String },
    #[error("bundle needs a command to run")]
    NoCommand,
}

fn io_error(path: &Path) -> impl FnOnce(std::io::Error) -> BundleError + '_ {
    move |source| BundleError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// A host directory bound into the container read-write.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WritableBind {
    pub host: PathBuf,
    pub container: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BundleSpec {
    pub args: Vec<String>,
    pub env: Vec<String>,
    pub cwd: String,
    pub hostname: String,
    /// Host directories exposed read-only at the same path.
    pub host_read_only: Vec<String>,
    pub writable: Vec<WritableBind>,
}

impl BundleSpec {
    pub fn new<S: Into<String>>(args: impl IntoIterator<Item = S>) -> Self {
        Self {
            args: args.into_iter().map(Into::into).collect(),
            env: vec![
                "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".to_string(),
                "HOME=/tmp".to_string(),
                "PYTHONUNBUFFERED=1".to_string(),
            ],
            cwd: "/".to_string(),
            hostname: "automigrate".to_string(),
            host_read_only: vec!["/usr".to_string(), "/etc".to_string()],
            writable: Vec::new(),
        }
    }

    pub fn writable(mut self, host: impl Into<PathBuf>, container: impl Into<String>) -> Self {
        self.writable.push(WritableBind {
            host: host.into(),
            container: container.into(),
        });
        self
    }

    pub fn cwd(mut self, cwd: impl Into<String>) -> Self {
        self.cwd = cwd.into();
        self
    }

    pub fn env(mut self, variable: impl Into<String>) -> Self {
        self.env.push(variable.into());
        self
    }
}

/// A bundle directory on disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Bundle {
    dir: PathBuf,
}

/// The top-level directories a merged-/usr Debian system links into `/usr`.
const USR_LINKED_DIRS: [&str; 4] = ["/lib", "/lib64", "/bin", "/sbin"];

impl Bundle {
    /// Writes `config.json` and `rootfs/` into `dir` (created if needed).
    #[tracing::instrument(name = "bundle_create", skip(spec))]
    pub fn create(dir: &Path, spec: &BundleSpec) -> Result<Self, BundleError> {
        if spec.args.is_empty() {
            return Err(BundleError::NoCommand);
        }
        for path in spec
            .host_read_only
            .iter()
            .chain(spec.writable.iter().map(|bind| &bind.container))
            .chain(std::iter::once(&spec.cwd))
        {
            if !path.starts_with('/') {
                return Err(BundleError::NotAbsolute { path: path.clone() });
            }
        }
        let rootfs = dir.join("rootfs");
        std::fs::create_dir_all(&rootfs).map_err(io_error(&rootfs))?;

        let mut mounts = vec![
            json!({"destination": "/proc", "type": "proc", "source": "proc"}),
            json!({"destination": "/dev", "type": "tmpfs", "source": "tmpfs",
                   "options": ["nosuid", "strictatime", "mode=755", "size=65536k"]}),
            json!({"destination": "/dev/pts", "type": "devpts", "source": "devpts",
                   "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620"]}),
            json!({"destination": "/dev/shm", "type": "tmpfs", "source": "shm",
                   "options": ["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"]}),
            json!({"destination": "/dev/mqueue", "type": "mqueue", "source": "mqueue",
                   "options": ["nosuid", "noexec", "nodev"]}),
            json!({"destination": "/sys", "type": "sysfs", "source": "sysfs",
                   "options": ["nosuid", "noexec", "nodev", "ro"]}),
            json!({"destination": "/tmp", "type": "tmpfs", "source": "tmpfs",
                   "options": ["nosuid", "nodev", "mode=1777"]}),
        ];
        let mut read_only: Vec<String> = spec.host_read_only.clone();
        for linked in USR_LINKED_DIRS {
            let host = Path::new(linked);
            let inside = rootfs.join(linked.trim_start_matches('/'));
            match std::fs::symlink_metadata(host) {
                Ok(meta) if meta.file_type().is_symlink() => {
                    let target = std::fs::read_link(host).map_err(io_error(host))?;
                    if std::fs::symlink_metadata(&inside).is_err() {
                        std::os::unix::fs::symlink(&target, &inside).map_err(io_error(&inside))?;
                    }
                }
                Ok(meta) if meta.is_dir() => read_only.push(linked.to_string()),
                _ => {}
            }
        }
        for path in &read_only {
            mounts.push(json!({"destination": path, "type": "bind", "source": path,
                               "options": ["rbind", "ro", "nosuid", "nodev"]}));
        }
        for bind in &spec.writable {
            mounts.push(json!({"destination": bind.container, "type": "bind",
                               "source": bind.host.display().to_string(),
                               "options": ["rbind", "rw", "nosuid", "nodev"]}));
        }

        let capabilities = ["CAP_AUDIT_WRITE", "CAP_KILL", "CAP_NET_BIND_SERVICE"];
        let config = json!({
            "ociVersion": "1.0.2",
            "process": {
                "terminal": false,
                "user": {"uid": 0, "gid": 0},
                "args": spec.args,
                "env": spec.env,
                "cwd": spec.cwd,
                "capabilities": {
                    "bounding": capabilities,
                    "effective": capabilities,
                    "permitted": capabilities,
                    "ambient": capabilities,
                },
                "rlimits": [{"type": "RLIMIT_NOFILE", "hard": 1024, "soft": 1024}],
                "noNewPrivileges": true,
            },
            "root": {"path": "rootfs", "readonly": true},
            "hostname": spec.hostname,
            "mounts": mounts,
            "linux": {
                "resources": {"devices": [{"allow": false, "access": "rwm"}]},
                "namespaces": [
                    {"type": "pid"}, {"type": "network"}, {"type": "ipc"},
                    {"type": "uts"}, {"type": "mount"},
                ],
                "maskedPaths": [
                    "/proc/acpi", "/proc/asound", "/proc/kcore", "/proc/keys",
                    "/proc/latency_stats", "/proc/timer_list", "/proc/timer_stats",
                    "/proc/sched_debug", "/sys/firmware", "/proc/scsi",
                ],
                "readonlyPaths": [
                    "/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys", "/proc/sysrq-trigger",
                ],
            },
        });
        let config_path = dir.join("config.json");
        let text = serde_json::to_string_pretty(&config).map_err(|error| BundleError::Io {
            path: config_path.clone(),
            source: std::io::Error::other(error),
        })?;
        std::fs::write(&config_path, text).map_err(io_error(&config_path))?;
        Ok(Self {
            dir: dir.to_path_buf(),
        })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn config_path(&self) -> PathBuf {
        self.dir.join("config.json")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_config_with_binds_and_a_read_only_root() {
        let dir = tempfile::tempdir().unwrap();
        let work = dir.path().join("work");
        let bundle = Bundle::create(
            &dir.path().join("bundle"),
            &BundleSpec::new(["/usr/bin/python3", "-c", "print(1)"])
                .writable(&work, "/work")
                .cwd("/work"),
        )
        .unwrap();
        let config: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(bundle.config_path()).unwrap()).unwrap();
        assert_eq!(config["root"]["readonly"], true);
        assert_eq!(config["process"]["args"][0], "/usr/bin/python3");
        assert_eq!(config["process"]["cwd"], "/work");
        let mounts = config["mounts"].as_array().unwrap();
        let find = |destination: &str| {
            mounts
                .iter()
                .find(|mount| mount["destination"] == destination)
                .unwrap_or_else(|| panic!("no mount at {destination}"))
        };
        assert!(
            find("/usr")["options"]
                .as_array()
                .unwrap()
                .contains(&json!("ro"))
        );
        assert!(
            find("/etc")["options"]
                .as_array()
                .unwrap()
                .contains(&json!("ro"))
        );
        assert_eq!(find("/work")["source"], work.display().to_string());
        assert!(
            find("/work")["options"]
                .as_array()
                .unwrap()
                .contains(&json!("rw"))
        );
        // /lib is recreated the way the host has it.
        let host_lib = std::fs::symlink_metadata("/lib").unwrap();
        let inside = bundle.dir().join("rootfs/lib");
        if host_lib.file_type().is_symlink() {
            assert_eq!(
                std::fs::read_link(inside).unwrap(),
                std::fs::read_link("/lib").unwrap()
            );
        } else {
            find("/lib");
        }
    }

    #[test]
    fn refuses_relative_paths_and_empty_commands() {
        let dir = tempfile::tempdir().unwrap();
        assert!(matches!(
            Bundle::create(dir.path(), &BundleSpec::new(Vec::<String>::new())),
            Err(BundleError::NoCommand)
        ));
        assert!(matches!(
            Bundle::create(dir.path(), &BundleSpec::new(["sh"]).cwd("work")),
            Err(BundleError::NotAbsolute { .. })
        ));
    }
}
