//! The node's local image store, and what an image reference resolves to.
//!
//! There is no registry. A reference resolves, in this order, to:
//! - a checkpoint image in this node's store (`<root-dir>/images/<escaped reference>/`, an OCI
//!   image layout put there by [`import`], which the node's agent runs as its image import
//!   command, as it runs `skopeo copy oci:{layout}:{tag} containers-storage:{image}` on a CRI-O
//!   node);
//! - an `oci:<layout dir>:<tag>` reference (what the agent returns when no import command is
//!   configured), read in place;
//! - a `localhost/...` reference not in the store: nothing. Such a name is a locally built
//!   image (the agent names its checkpoint images `localhost/automigrate/...`); with no
//!   registry behind it, the real kubelet's pull fails (`ErrImagePull`, then
//!   `ImagePullBackOff`) and the container never starts, so this one does not start it fresh
//!   either ([`ImageError::NotPresent`]);
//! - otherwise the host's root filesystem (see [`crate::runtime`]).
//!
//! An image is a checkpoint image when its manifest carries the annotations CRI-O
//! (`io.kubernetes.cri-o.annotations.checkpoint.name`) or containerd
//! (`org.criu.checkpoint.container.name`) look for; the agent's `image` module writes both.

use std::path::{Path, PathBuf};

use automigrate_agent::image::{
    ANNOTATION_CONTAINER_NAME, ANNOTATION_CRIO_CHECKPOINT_NAME, ImageLayout, blob_path, read_layout,
};

#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("image layout {path}: {reason}")]
    Layout { path: PathBuf, reason: String },
    #[error("`{reference}` is not an `oci:<layout dir>:<tag>` reference")]
    NotOciReference { reference: String },
    #[error(
        "failed to pull image \"{reference}\": not in this node's image store, and there is no registry to pull it from (a checkpoint image is imported with `automigrate-kubelet import-image`; any reference outside localhost/ runs on the host's file system)"
    )]
    NotPresent { reference: String },
}

/// Registry host of images built on the node itself: never pulled, only found in the store.
const LOCAL_REGISTRY: &str = "localhost/";

fn io_error(path: &Path) -> impl FnOnce(std::io::Error) -> ImageError + '_ {
    move |source| ImageError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// What a container's image is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Resolved {
    /// The host's root filesystem, bound read-only.
    Host,
    /// A checkpoint image: restore the container from it.
    Checkpoint {
        layout: ImageLayout,
        /// The checkpointed container's name, from the annotations.
        container: String,
    },
}

/// The store's directory for a reference: every byte outside `[A-Za-z0-9._-]` escaped as
/// `%XX`, so distinct references never share a directory and none climbs out.
pub fn store_dir(images_root: &Path, reference: &str) -> PathBuf {
    let mut name = String::new();
    for byte in reference.bytes() {
        if byte.is_ascii_alphanumeric() || matches!(byte, b'.' | b'_' | b'-') {
            name.push(char::from(byte));
        } else {
            name.push_str(&format!("%{byte:02X}"));
        }
    }
    if name.starts_with('.') {
        name.insert_str(0, "%2E");
        name.remove(3);
    }
    images_root.join(name)
}

/// `oci:<dir>:<tag>` → the layout directory.
fn oci_layout_dir(reference: &str) -> Option<PathBuf> {
    let rest = reference.strip_prefix("oci:")?;
    let dir = rest.rsplit_once(':').map_or(rest, |(dir, _tag)| dir);
    Some(PathBuf::from(dir))
}

/// Resolves a container's image reference on this node.
pub fn resolve(images_root: &Path, reference: &str) -> Result<Resolved, ImageError> {
    let stored = store_dir(images_root, reference);
    let layout_dir = if stored.join("index.json").exists() {
        stored
    } else if let Some(dir) = oci_layout_dir(reference) {
        dir
    } else if reference.starts_with(LOCAL_REGISTRY) {
        return Err(ImageError::NotPresent {
            reference: reference.to_string(),
        });
    } else {
        return Ok(Resolved::Host);
    };
    let layout = read_layout(&layout_dir).map_err(|error| ImageError::Layout {
        path: layout_dir.clone(),
        reason: error.to_string(),
    })?;
    let manifest_path =
        blob_path(&layout_dir, &layout.manifest_digest).ok_or_else(|| ImageError::Layout {
            path: layout_dir.clone(),
            reason: format!("bad manifest digest {}", layout.manifest_digest),
        })?;
    let bytes = std::fs::read(&manifest_path).map_err(io_error(&manifest_path))?;
    let manifest: serde_json::Value =
        serde_json::from_slice(&bytes).map_err(|error| ImageError::Layout {
            path: manifest_path.clone(),
            reason: error.to_string(),
        })?;
    let annotations = &manifest["annotations"];
    let container = [ANNOTATION_CRIO_CHECKPOINT_NAME, ANNOTATION_CONTAINER_NAME]
        .iter()
        .find_map(|key| annotations[*key].as_str());
    Ok(match container {
        Some(container) => Resolved::Checkpoint {
            container: container.to_string(),
            layout,
        },
        None => Resolved::Host,
    })
}

/// Imports an OCI layout (`oci:<dir>:<tag>`) into the store under `reference`: copied into a
/// staging directory, then renamed into place, so a reader never sees half an image.
pub fn import(images_root: &Path, source: &str, reference: &str) -> Result<PathBuf, ImageError> {
    let dir = oci_layout_dir(source).ok_or_else(|| ImageError::NotOciReference {
        reference: source.to_string(),
    })?;
    read_layout(&dir).map_err(|error| ImageError::Layout {
        path: dir.clone(),
        reason: error.to_string(),
    })?;
    std::fs::create_dir_all(images_root).map_err(io_error(images_root))?;
    let target = store_dir(images_root, reference);
    let staging = images_root.join(format!(
        ".importing-{}-{}",
        std::process::id(),
        target
            .file_name()
            .map(|name| name.to_string_lossy().into_owned())
            .unwrap_or_default()
    ));
    if staging.exists() {
        std::fs::remove_dir_all(&staging).map_err(io_error(&staging))?;
    }
    copy_tree(&dir, &staging)?;
    if target.exists() {
        std::fs::remove_dir_all(&target).map_err(io_error(&target))?;
    }
    std::fs::rename(&staging, &target).map_err(io_error(&target))?;
    Ok(target)
}

fn copy_tree(from: &Path, to: &Path) -> Result<(), ImageError> {
    std::fs::create_dir_all(to).map_err(io_error(to))?;
    for entry in std::fs::read_dir(from).map_err(io_error(from))? {
        let entry = entry.map_err(io_error(from))?;
        let path = entry.path();
        let kind = entry.file_type().map_err(io_error(&path))?;
        let destination = to.join(entry.file_name());
        if kind.is_dir() {
            copy_tree(&path, &destination)?;
        } else if kind.is_file() {
            std::fs::copy(&path, &destination).map_err(io_error(&path))?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn store_names_are_distinct_and_stay_inside_the_store() {
        let root = Path::new("/images");
        let a = store_dir(root, "localhost/automigrate/ml-p:ckpt-1");
        let b = store_dir(root, "localhost/automigrate/ml-p_ckpt-1");
        assert_ne!(a, b);
        assert_eq!(a.parent(), Some(root));
        assert_eq!(store_dir(root, "..").parent(), Some(root));
        assert_ne!(store_dir(root, ".."), root.join(".."));
    }

    #[test]
    fn anything_else_is_the_host_filesystem() {
        let root = tempfile::tempdir().unwrap();
        assert_eq!(
            resolve(root.path(), "docker.io/library/debian:12").unwrap(),
            Resolved::Host
        );
    }

    #[test]
    fn a_local_image_missing_from_the_store_is_not_the_host_filesystem() {
        let root = tempfile::tempdir().unwrap();
        assert!(matches!(
            resolve(root.path(), "localhost/automigrate/ml-p:ckpt-1"),
            Err(ImageError::NotPresent { .. })
        ));
    }
}
