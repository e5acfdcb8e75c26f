//! Outputs for finished files: the object store seam, the local-directory output and, in
//! [`s3`], the S3 output.
//!
//! Every output uses the same key layout, built by [`object_key`] alone:
//! `incoming-logs/ds=YYYY-MM-DD/hh=HH/<server_id>-<file_id>.avro`. A finished file waits in
//! the store's staging directory, at `<staging>/<key>`, until it is published.

pub mod s3;

use std::io;
use std::path::{Path, PathBuf};

use std::sync::Arc;

use async_trait::async_trait;
use chrono::{DateTime, Utc};

use crate::config::Output;
pub use crate::store::s3::S3Store;

/// Folder inside a local output directory where files are written before they are published.
/// It is on the same file system as the output, so publishing is a rename.
const STAGING_DIR: &str = ".staging";

/// A failed store operation.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("failed to {action} {path}: {source}")]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// A request to S3 failed; `failure` decides whether a retry can help.
    #[error("failed to {operation} {key}: {message}")]
    S3 {
        operation: &'static str,
        key: String,
        failure: s3::Failure,
        message: String,
    },
    #[error("{operation} timed out after {timeout:?}")]
    Timeout {
        operation: &'static str,
        timeout: std::time::Duration,
    },
    #[error("{0}")]
    Setup(String),
}

impl StoreError {
    /// Returns whether the same operation may succeed later without a change of
    /// configuration. Local file errors count as retryable, as a full disk can be freed.
    pub fn is_retryable(&self) -> bool {
        match self {
            StoreError::Io { .. } | StoreError::Timeout { .. } => true,
            StoreError::S3 { failure, .. } => s3::is_retryable(failure),
            StoreError::Setup(_) => false,
        }
    }
}

/// An output that finished files are published to.
#[async_trait]
pub trait ObjectStore: Send + Sync + 'static {
    /// Describes the output for logs and errors, such as its directory or bucket.
    fn describe(&self) -> String;

    /// Returns the directory where files wait until they are published. A file there is at
    /// `<staging>/<key>` once it is complete.
    fn staging_dir(&self) -> &Path;

    /// Makes a test write, and removes it, to show the output accepts files.
    async fn check(&self) -> Result<(), StoreError>;

    /// Publishes the finished file at `file` under `key`. On success the file is no longer at
    /// `file`, except when the S3 output failed to delete it, which the next start repairs by
    /// uploading it again. Publishing the same key again replaces the object, so a retry
    /// never duplicates.
    async fn publish(&self, key: &str, file: &Path) -> Result<(), StoreError>;
}

/// A local directory with the same key layout as the S3 output.
#[derive(Debug, Clone)]
pub struct LocalDirStore {
    root: PathBuf,
    staging: PathBuf,
}

// === impl LocalDirStore ===

impl LocalDirStore {
    /// Creates a store rooted at `root`; nothing is touched until [`ObjectStore::check`].
    pub fn new(root: impl Into<PathBuf>) -> Self {
        let root = root.into();
        let staging = root.join(STAGING_DIR);
        Self { root, staging }
    }
}

#[async_trait]
impl ObjectStore for LocalDirStore {
    fn describe(&self) -> String {
        format!("directory {}", self.root.display())
    }

    fn staging_dir(&self) -> &Path {
        &self.staging
    }

    async fn check(&self) -> Result<(), StoreError> {
        let staging = self.staging.clone();
        let root = self.root.clone();
        run_blocking(move || {
            create_dir_all(&staging)?;
            write_probe(&root)
        })
        .await
    }

    async fn publish(&self, key: &str, file: &Path) -> Result<(), StoreError> {
        let target = self.root.join(key);
        let file = file.to_owned();
        run_blocking(move || {
            let parent = target.parent().unwrap_or(Path::new("."));
            create_dir_all(parent)?;
            std::fs::rename(&file, &target).map_err(io_error("rename into place", &target))?;
            // The rename is durable only once the directory entry is on disk.
            std::fs::File::open(parent)
                .and_then(|dir| dir.sync_all())
                .map_err(io_error("sync directory", parent))
        })
        .await
    }
}

/// Opens the store that `output` names; nothing is written until [`ObjectStore::check`].
pub async fn open(output: &Output) -> Result<Arc<dyn ObjectStore>, StoreError> {
    match output {
        Output::Local { dir } => Ok(Arc::new(LocalDirStore::new(dir))),
        Output::S3(settings) => Ok(Arc::new(S3Store::connect(settings.clone()).await?)),
    }
}

/// Returns the object key of a file: its partition is the UTC hour starting at `hour_start_ms`.
pub fn object_key(hour_start_ms: i64, server_id: &str, file_id: &str) -> String {
    let hour = DateTime::<Utc>::from_timestamp_millis(hour_start_ms).unwrap_or_default();
    format!(
        "incoming-logs/ds={}/hh={}/{server_id}-{file_id}.avro",
        hour.format("%Y-%m-%d"),
        hour.format("%H")
    )
}

/// Writes and removes a small file in `dir`, to show that files can be written there.
pub(crate) fn write_probe(dir: &Path) -> Result<(), StoreError> {
    let probe = dir.join(format!(".write-check-{}", uuid::Uuid::now_v7().simple()));
    std::fs::write(&probe, b"impression-server write check").map_err(io_error("write", &probe))?;
    std::fs::remove_file(&probe).map_err(io_error("remove", &probe))
}

pub(crate) fn create_dir_all(dir: &Path) -> Result<(), StoreError> {
    std::fs::create_dir_all(dir).map_err(io_error("create directory", dir))
}

pub(crate) fn io_error(action: &'static str, path: &Path) -> impl FnOnce(io::Error) -> StoreError {
    let path = path.to_owned();
    move |source| StoreError::Io {
        action,
        path,
        source,
    }
}

pub(crate) async fn run_blocking<T: Send + 'static>(
    work: impl FnOnce() -> Result<T, StoreError> + Send + 'static,
) -> Result<T, StoreError> {
    match tokio::task::spawn_blocking(work).await {
        Ok(result) => result,
        Err(join_error) => Err(StoreError::Io {
            action: "run file operation",
            path: PathBuf::new(),
            source: io::Error::other(join_error),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::parse_rfc3339_ms;

    #[test]
    fn key_uses_utc_hour() {
        let hour = parse_rfc3339_ms("2026-12-04T11:00:00Z").unwrap();
        assert_eq!(
            object_key(hour, "edge-1", "0193f0a0"),
            "incoming-logs/ds=2026-12-04/hh=11/edge-1-0193f0a0.avro"
        );
    }

    #[tokio::test]
    async fn publish_moves_file_under_key() {
        let root = tempfile::tempdir().unwrap();
        let store = LocalDirStore::new(root.path());
        store.check().await.unwrap();

        let staged = store.staging_dir().join("f.partial");
        std::fs::write(&staged, b"avro").unwrap();
        store
            .publish("incoming-logs/ds=2026-12-04/hh=11/a-f.avro", &staged)
            .await
            .unwrap();

        assert!(!staged.exists());
        let published = root
            .path()
            .join("incoming-logs/ds=2026-12-04/hh=11/a-f.avro");
        assert_eq!(std::fs::read(published).unwrap(), b"avro");
        let leftovers: Vec<_> = std::fs::read_dir(root.path()).unwrap().collect();
        assert_eq!(
            leftovers.len(),
            2,
            "only the staging folder and incoming-logs remain"
        );
    }

    #[tokio::test]
    async fn check_fails_on_unwritable_output() {
        let root = tempfile::tempdir().unwrap();
        let file = root.path().join("not-a-directory");
        std::fs::write(&file, b"").unwrap();
        let err = LocalDirStore::new(&file).check().await.unwrap_err();
        assert!(err.to_string().contains("create directory"), "{err}");
    }
}
