//! Checkpoint OCI images: what a runtime (CRI-O, containerd ≥ 2.1) restores a container from
//! when a pod's image is a checkpoint.
//!
//! Layout written for checkpoint `<id>` of pod `<namespace>/<pod>` (an OCI image layout,
//! <https://github.com/opencontainers/image-spec/blob/main/image-layout.md>):
//!
//! ```text
//! <image root>/<namespace>/<id>/
//!   oci-layout                       {"imageLayoutVersion":"1.0.0"}
//!   index.json                       one manifest, annotation org.opencontainers.image.ref.name=<id>
//!   blobs/sha256/<manifest digest>   image manifest: config + ONE layer, checkpoint annotations
//!   blobs/sha256/<config digest>     image config: os, architecture, rootfs.diff_ids
//!   blobs/sha256/<layer digest>      uncompressed tar of the checkpoint archive (checkpoint/,
//!                                    config.dump, spec.dump, stats-dump, …, and our manifest)
//! ```
//!
//! The manifest carries `org.criu.checkpoint.container.name` (containerd) and
//! `io.kubernetes.cri-o.annotations.checkpoint.name` (CRI-O), both the container's name, plus
//! `dev.automigrate.checkpoint.*` (id, pod, BLAKE3 of our archive manifest).
//!
//! Only a full checkpoint becomes an image: an incremental one needs its parents' images next to
//! it, which a runtime restoring from a single layer does not have.
//!
//! Importing the layout into the runtime's image store is node-specific, so it is an external
//! command the operator configures ([`ImageOptions::import_command`], e.g. `skopeo copy
//! oci:{layout}:{tag} containers-storage:{image}`); without one the reference returned is
//! `oci:<layout>:<tag>`.

use std::fs::{self, File};
use std::io::Write;
use std::path::{Path, PathBuf};

use automigrate_checkpoint::VerifiedCheckpoint;
use automigrate_checkpoint::archive;
use automigrate_checkpoint::manifest::MANIFEST_FILE;
use serde_json::json;

pub const MEDIA_TYPE_INDEX: &str = "application/vnd.oci.image.index.v1+json";
pub const MEDIA_TYPE_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
pub const MEDIA_TYPE_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
pub const MEDIA_TYPE_LAYER: &str = "application/vnd.oci.image.layer.v1.tar";
pub const ANNOTATION_CONTAINER_NAME: &str = "org.criu.checkpoint.container.name";
pub const ANNOTATION_CRIO_CHECKPOINT_NAME: &str = "io.kubernetes.cri-o.annotations.checkpoint.name";
pub const ANNOTATION_REF_NAME: &str = "org.opencontainers.image.ref.name";

#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    #[error("checkpoint {id} is incremental (parent {parent}); an image needs a full checkpoint")]
    Incremental { id: String, parent: String },
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{0}")]
    Archive(#[from] archive::ArchiveError),
    #[error("encoding {what}: {source}")]
    Json {
        what: &'static str,
        source: serde_json::Error,
    },
    #[error("import command `{command}` failed: {reason}")]
    Import { command: String, reason: String },
}

fn io_error(path: &Path) -> impl FnOnce(std::io::Error) -> ImageError + '_ {
    move |source| ImageError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// How images are made available to the runtime.
#[derive(Debug, Clone)]
pub struct ImageOptions {
    /// Where layouts are written.
    pub root: PathBuf,
    /// Program and arguments run after the layout is written; `{layout}`, `{tag}` and `{image}`
    /// are replaced in each argument. No shell is involved.
    pub import_command: Option<Vec<String>>,
    /// The reference the import makes, with `{namespace}`, `{pod}`, `{container}`, `{id}`.
    pub reference_template: String,
}

impl ImageOptions {
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self {
            root: root.into(),
            import_command: None,
            reference_template: "localhost/automigrate/{namespace}-{pod}:{id}".to_string(),
        }
    }
}

/// A written layout.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageLayout {
    pub dir: PathBuf,
    pub tag: String,
    pub manifest_digest: String,
    pub layer_digest: String,
    pub layer_bytes: u64,
}

impl ImageLayout {
    /// `oci:<dir>:<tag>`, the reference skopeo and podman read a layout by.
    pub fn oci_reference(&self) -> String {
        format!("oci:{}:{}", self.dir.display(), self.tag)
    }
}

/// Writes (or finds, when already written) the image layout of a verified, full checkpoint.
/// Blocking.
#[tracing::instrument(name = "image_build", skip_all, fields(id = %checkpoint.manifest().id))]
pub fn write_layout(
    checkpoint: &VerifiedCheckpoint,
    root: &Path,
) -> Result<ImageLayout, ImageError> {
    let manifest = checkpoint.manifest();
    if let Some(parent) = &manifest.parent {
        return Err(ImageError::Incremental {
            id: manifest.id.clone(),
            parent: parent.clone(),
        });
    }
    let namespace_dir = root.join(&manifest.pod.namespace);
    fs::create_dir_all(&namespace_dir).map_err(io_error(&namespace_dir))?;
    let final_dir = namespace_dir.join(&manifest.id);
    if final_dir.join("index.json").exists() {
        if let Ok(layout) = read_layout(&final_dir) {
            tracing::debug!("layout already written");
            return Ok(layout);
        }
        fs::remove_dir_all(&final_dir).map_err(io_error(&final_dir))?;
    }
    let staging = tempfile::Builder::new()
        .prefix(&format!(".building-{}-", manifest.id))
        .tempdir_in(&namespace_dir)
        .map_err(io_error(&namespace_dir))?;
    let blobs = staging.path().join("blobs/sha256");
    fs::create_dir_all(&blobs).map_err(io_error(&blobs))?;

    // The layer: the archive as a plain tar, hashed while written.
    let layer_tmp = blobs.join(".layer");
    let file = File::create(&layer_tmp).map_err(io_error(&layer_tmp))?;
    let writer = archive::export_tar(checkpoint.dir(), Sha256Writer::new(file))?;
    let (file, layer_digest, layer_bytes) = writer.finish();
    file.sync_all().map_err(io_error(&layer_tmp))?;
    let layer_path = blobs.join(&layer_digest);
    fs::rename(&layer_tmp, &layer_path).map_err(io_error(&layer_path))?;

    let archive_manifest = fs::read(checkpoint.dir().join(MANIFEST_FILE))
        .map_err(io_error(&checkpoint.dir().join(MANIFEST_FILE)))?;
    let created = manifest.created_at.to_string();
    let config = json!({
        "created": created,
        "architecture": oci_architecture(),
        "os": "linux",
        "config": {},
        "rootfs": {"type": "layers", "diff_ids": [format!("sha256:{layer_digest}")]},
        "history": [{"created": created, "created_by": "automigrate-agent checkpoint image"}],
    });
    let (config_digest, config_bytes) = write_blob(&blobs, "image config", &config)?;
    let image_manifest = json!({
        "schemaVersion": 2,
        "mediaType": MEDIA_TYPE_MANIFEST,
        "config": {
            "mediaType": MEDIA_TYPE_CONFIG,
            "digest": format!("sha256:{config_digest}"),
            "size": config_bytes,
        },
        "layers": [{
            "mediaType": MEDIA_TYPE_LAYER,
            "digest": format!("sha256:{layer_digest}"),
            "size": layer_bytes,
        }],
        "annotations": {
            ANNOTATION_CONTAINER_NAME: manifest.container,
            ANNOTATION_CRIO_CHECKPOINT_NAME: manifest.container,
            "org.opencontainers.image.created": created,
            "dev.automigrate.checkpoint.id": manifest.id,
            "dev.automigrate.checkpoint.pod": manifest.pod.to_string(),
            "dev.automigrate.checkpoint.backend": manifest.backend.to_string(),
            "dev.automigrate.checkpoint.manifest-blake3": blake3::hash(&archive_manifest).to_hex().to_string(),
        },
    });
    let (manifest_digest, manifest_bytes) = write_blob(&blobs, "image manifest", &image_manifest)?;
    let index = json!({
        "schemaVersion": 2,
        "mediaType": MEDIA_TYPE_INDEX,
        "manifests": [{
            "mediaType": MEDIA_TYPE_MANIFEST,
            "digest": format!("sha256:{manifest_digest}"),
            "size": manifest_bytes,
            "annotations": {ANNOTATION_REF_NAME: manifest.id},
        }],
    });
    write_json(&staging.path().join("index.json"), "index", &index)?;
    write_json(
        &staging.path().join("oci-layout"),
        "oci-layout",
        &json!({"imageLayoutVersion": "1.0.0"}),
    )?;
    archive::sync_tree(staging.path())?;
    let staged = staging.keep();
    fs::rename(&staged, &final_dir).map_err(io_error(&final_dir))?;
    archive::sync_dir(&namespace_dir)?;
    tracing::info!(dir = %final_dir.display(), layer_bytes, "checkpoint image written");
    Ok(ImageLayout {
        dir: final_dir,
        tag: manifest.id.clone(),
        manifest_digest: format!("sha256:{manifest_digest}"),
        layer_digest: format!("sha256:{layer_digest}"),
        layer_bytes,
    })
}

/// Reads back what [`write_layout`] wrote (the layout's first manifest).
pub fn read_layout(dir: &Path) -> Result<ImageLayout, ImageError> {
    let read_json = |path: PathBuf| -> Result<serde_json::Value, ImageError> {
        let bytes = fs::read(&path).map_err(io_error(&path))?;
        serde_json::from_slice(&bytes).map_err(|source| ImageError::Json {
            what: "layout",
            source,
        })
    };
    let malformed = |what: &str| ImageError::Io {
        path: dir.to_path_buf(),
        source: std::io::Error::other(format!("malformed layout: {what}")),
    };
    let index = read_json(dir.join("index.json"))?;
    let entry = &index["manifests"][0];
    let manifest_digest = entry["digest"]
        .as_str()
        .ok_or_else(|| malformed("digest"))?;
    let tag = entry["annotations"][ANNOTATION_REF_NAME]
        .as_str()
        .ok_or_else(|| malformed("ref name"))?;
    let manifest = read_json(blob_path(dir, manifest_digest).ok_or_else(|| malformed("digest"))?)?;
    let layer = &manifest["layers"][0];
    let layer_digest = layer["digest"].as_str().ok_or_else(|| malformed("layer"))?;
    let layer_bytes = layer["size"]
        .as_u64()
        .ok_or_else(|| malformed("layer size"))?;
    let layer_path = blob_path(dir, layer_digest).ok_or_else(|| malformed("layer digest"))?;
    if fs::metadata(&layer_path)
        .map_err(io_error(&layer_path))?
        .len()
        != layer_bytes
    {
        return Err(malformed("layer size differs"));
    }
    Ok(ImageLayout {
        dir: dir.to_path_buf(),
        tag: tag.to_string(),
        manifest_digest: manifest_digest.to_string(),
        layer_digest: layer_digest.to_string(),
        layer_bytes,
    })
}

/// `blobs/sha256/<hex>` of a `sha256:<hex>` digest (hex checked, so no path tricks).
pub fn blob_path(dir: &Path, digest: &str) -> Option<PathBuf> {
    let hex = digest.strip_prefix("sha256:")?;
    (hex.len() == 64
        && hex
            .bytes()
            .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase()))
    .then(|| dir.join("blobs/sha256").join(hex))
}

/// Runs the configured import command for a layout; returns the reference it made.
#[tracing::instrument(name = "image_import", skip_all, fields(image))]
pub async fn import(
    options: &ImageOptions,
    layout: &ImageLayout,
    checkpoint: &VerifiedCheckpoint,
) -> Result<String, ImageError> {
    let manifest = checkpoint.manifest();
    let image = options
        .reference_template
        .replace("{namespace}", &manifest.pod.namespace)
        .replace("{pod}", &manifest.pod.name)
        .replace("{container}", &manifest.container)
        .replace("{id}", &manifest.id);
    tracing::Span::current().record("image", image.as_str());
    let Some(template) = &options.import_command else {
        return Ok(layout.oci_reference());
    };
    let layout_dir = layout.dir.display().to_string();
    let argv: Vec<String> = template
        .iter()
        .map(|arg| {
            arg.replace("{layout}", &layout_dir)
                .replace("{tag}", &layout.tag)
                .replace("{image}", &image)
        })
        .collect();
    let shown = argv.join(" ");
    let Some((program, args)) = argv.split_first() else {
        return Err(ImageError::Import {
            command: shown,
            reason: "empty command".to_string(),
        });
    };
    let output = tokio::process::Command::new(program)
        .args(args)
        .stdin(std::process::Stdio::null())
        .output()
        .await
        .map_err(|error| ImageError::Import {
            command: shown.clone(),
            reason: error.to_string(),
        })?;
    if !output.status.success() {
        let stderr = String::from_utf8_lossy(&output.stderr);
        let tail: String = stderr
            .lines()
            .rev()
            .take(10)
            .collect::<Vec<_>>()
            .join(" | ");
        return Err(ImageError::Import {
            command: shown,
            reason: format!("{}: {tail}", output.status),
        });
    }
    tracing::info!("image imported");
    Ok(image)
}

fn oci_architecture() -> &'static str {
    match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        "powerpc64" => "ppc64le",
        other => other,
    }
}

fn write_json(
    path: &Path,
    what: &'static str,
    value: &serde_json::Value,
) -> Result<(), ImageError> {
    let bytes = serde_json::to_vec(value).map_err(|source| ImageError::Json { what, source })?;
    fs::write(path, bytes).map_err(io_error(path))
}

/// Writes a JSON blob under its digest; returns (hex digest, size).
fn write_blob(
    blobs: &Path,
    what: &'static str,
    value: &serde_json::Value,
) -> Result<(String, u64), ImageError> {
    let bytes = serde_json::to_vec(value).map_err(|source| ImageError::Json { what, source })?;
    let digest = sha256_hex(&bytes);
    let path = blobs.join(&digest);
    fs::write(&path, &bytes).map_err(io_error(&path))?;
    Ok((digest, bytes.len() as u64))
}

pub fn sha256_hex(bytes: &[u8]) -> String {
    hex(ring::digest::digest(&ring::digest::SHA256, bytes).as_ref())
}

fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write as _;
    bytes
        .iter()
        .fold(String::with_capacity(64), |mut out, byte| {
            let _ = write!(out, "{byte:02x}");
            out
        })
}

/// A writer that hashes (SHA-256) and counts what passes through.
struct Sha256Writer<W> {
    inner: W,
    context: ring::digest::Context,
    bytes: u64,
}

impl<W: Write> Sha256Writer<W> {
    fn new(inner: W) -> Self {
        Self {
            inner,
            context: ring::digest::Context::new(&ring::digest::SHA256),
            bytes: 0,
        }
    }

    fn finish(self) -> (W, String, u64) {
        (self.inner, hex(self.context.finish().as_ref()), self.bytes)
    }
}

impl<W: Write> Write for Sha256Writer<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let written = self.inner.write(buf)?;
        self.context.update(&buf[..written]);
        self.bytes += written as u64;
        Ok(written)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sha256_matches_a_known_vector() {
        assert_eq!(
            sha256_hex(b"abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }

    #[test]
    fn blob_paths_refuse_anything_but_a_sha256_digest() {
        let dir = Path::new("/l");
        let good = format!("sha256:{}", "a".repeat(64));
        assert!(blob_path(dir, &good).is_some());
        for bad in [
            "sha256:../../etc/passwd".to_string(),
            format!("sha512:{}", "a".repeat(64)),
            format!("sha256:{}", "A".repeat(64)),
            "sha256:abc".to_string(),
        ] {
            assert!(blob_path(dir, &bad).is_none(), "{bad}");
        }
    }
}
