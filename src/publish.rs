//! The publisher: moves finished files from the staging directory to the store.
//!
//! Files left by an earlier run go first, then the files the writer finishes, in order. At
//! most `concurrency` files are published at once, and the queue holds only file metadata,
//! so while the store is down finished files wait on disk and memory stays flat. A retryable
//! failure is retried without limit, with capped exponential backoff and jitter. A
//! non-retryable one, such as access denied, leaves the file in the staging directory, is
//! logged at error level, and is retried at the next start.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::sync::Semaphore;
use tokio::sync::mpsc::UnboundedReceiver;
use tokio::task::JoinSet;
use tokio::time::Instant;
use tracing::{error, info, warn};

use crate::metrics::{FailureKind, Metrics};
use crate::spool;
use crate::store::ObjectStore;
use crate::writer::FinishedFile;

/// First wait before a failed publish is retried; it doubles up to [`MAX_RETRY_DELAY`].
const FIRST_RETRY_DELAY: Duration = Duration::from_millis(200);
const MAX_RETRY_DELAY: Duration = Duration::from_secs(30);
/// After this many failed attempts of one file, only every [`LOG_EVERY_ATTEMPTS`]th is logged.
const LOGGED_FIRST_ATTEMPTS: u32 = 3;
const LOG_EVERY_ATTEMPTS: u32 = 10;

/// Counts shared by the publisher and the shutdown report.
#[derive(Debug, Default)]
pub struct PublishCounts {
    pub files: AtomicU64,
    pub bytes: AtomicU64,
    /// Files given up on after a non-retryable failure; they stay in the staging directory.
    pub files_failed: AtomicU64,
}

/// Delays between attempts: doubling from [`FIRST_RETRY_DELAY`] up to [`MAX_RETRY_DELAY`],
/// each drawn between half and all of its step, so that files which failed together do not
/// retry together.
#[derive(Debug)]
struct Backoff {
    step: Duration,
}

// === impl Backoff ===

impl Backoff {
    fn new() -> Self {
        Self {
            step: FIRST_RETRY_DELAY,
        }
    }

    fn next_delay(&mut self) -> Duration {
        let step = self.step;
        self.step = (self.step * 2).min(MAX_RETRY_DELAY);
        step / 2 + step.mul_f64(fastrand::f64() / 2.0)
    }
}

/// Publishes `recovered`, then every file from `finished` until the channel closes, with at
/// most `concurrency` files in flight; returns when all of them are done. The spool gauges of
/// `metrics` count the files queued and not yet published.
pub async fn publish_files(
    store: Arc<dyn ObjectStore>,
    recovered: Vec<FinishedFile>,
    mut finished: UnboundedReceiver<FinishedFile>,
    counts: Arc<PublishCounts>,
    metrics: Arc<Metrics>,
    concurrency: usize,
) {
    for file in &recovered {
        metrics.file_waiting(file.bytes);
    }
    let permits = Arc::new(Semaphore::new(concurrency));
    let mut uploads = JoinSet::new();
    let mut recovered = recovered.into_iter();
    loop {
        // Wait for a free slot before taking the next file, so files queue on disk.
        let Ok(permit) = permits.clone().acquire_owned().await else {
            break;
        };
        let next = match recovered.next() {
            Some(file) => Some(file),
            None => finished.recv().await,
        };
        let Some(file) = next else {
            break;
        };

        while let Some(done) = uploads.try_join_next() {
            log_join_error(done);
        }
        let store = store.clone();
        let counts = counts.clone();
        let metrics = metrics.clone();
        uploads.spawn(async move {
            publish_one(store.as_ref(), &file, &counts, &metrics).await;
            drop(permit);
        });
    }
    while let Some(done) = uploads.join_next().await {
        log_join_error(done);
    }
}

/// Publishes one file, retrying retryable failures without limit.
async fn publish_one(
    store: &dyn ObjectStore,
    file: &FinishedFile,
    counts: &PublishCounts,
    metrics: &Metrics,
) {
    let started = Instant::now();
    let mut backoff = Backoff::new();
    let mut attempt = 1u32;
    loop {
        match store.publish(&file.key, &file.path).await {
            Ok(()) => break,
            Err(err) if err.is_retryable() => {
                metrics.upload_failed(FailureKind::Retryable);
                let delay = backoff.next_delay();
                if attempt <= LOGGED_FIRST_ATTEMPTS || attempt.is_multiple_of(LOG_EVERY_ATTEMPTS) {
                    warn!(attempt, key = %file.key, retry_in = ?delay, error = %err, "publish failed, retrying");
                }
                tokio::time::sleep(delay).await;
                attempt += 1;
            }
            Err(err) => {
                metrics.upload_failed(FailureKind::Fatal);
                counts.files_failed.fetch_add(1, Ordering::SeqCst);
                error!(
                    key = %file.key,
                    path = %file.path.display(),
                    error = %err,
                    "publish failed and is not retryable; the file stays in the staging directory and is retried at the next start"
                );
                return;
            }
        }
    }

    let staging = store.staging_dir().to_owned();
    let path = file.path.clone();
    let _ = tokio::task::spawn_blocking(move || spool::remove_empty_parents(&staging, &path)).await;
    counts.files.fetch_add(1, Ordering::SeqCst);
    counts.bytes.fetch_add(file.bytes, Ordering::SeqCst);
    metrics.file_uploaded(file.bytes, started.elapsed().as_secs_f64());
    metrics.pending_done(&file.key);
    metrics.spool_files.dec();
    metrics.spool_bytes.dec_by(gauge_bytes(file.bytes));
    info!(key = %file.key, bytes = file.bytes, sessions = file.sessions, attempts = attempt, "published file");
}

fn gauge_bytes(bytes: u64) -> i64 {
    i64::try_from(bytes).unwrap_or(i64::MAX)
}

fn log_join_error(done: Result<(), tokio::task::JoinError>) {
    if let Err(err) = done {
        error!(error = %err, "publish task failed");
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;
    use std::sync::Mutex;

    use async_trait::async_trait;

    use super::*;
    use crate::store::StoreError;
    use crate::store::s3::Failure;

    #[test]
    fn backoff_grows_to_cap_with_jitter() {
        let mut backoff = Backoff::new();
        let first = backoff.next_delay();
        assert!(first >= FIRST_RETRY_DELAY / 2, "{first:?}");
        assert!(first <= FIRST_RETRY_DELAY, "{first:?}");
        for _ in 0..20 {
            let delay = backoff.next_delay();
            assert!(delay <= MAX_RETRY_DELAY, "{delay:?}");
        }
        let capped = backoff.next_delay();
        assert!(capped >= MAX_RETRY_DELAY / 2, "{capped:?}");
    }

    /// A store that fails each key a set number of times, with a set failure.
    struct FlakyStore {
        failures_per_key: u32,
        failure: Failure,
        attempts: Mutex<Vec<String>>,
        in_flight: AtomicU64,
        max_in_flight: AtomicU64,
    }

    #[async_trait]
    impl ObjectStore for FlakyStore {
        fn describe(&self) -> String {
            "flaky".to_owned()
        }
        fn staging_dir(&self) -> &Path {
            Path::new("unused")
        }
        async fn check(&self) -> Result<(), StoreError> {
            Ok(())
        }
        async fn publish(&self, key: &str, _file: &Path) -> Result<(), StoreError> {
            let now = self.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
            self.max_in_flight.fetch_max(now, Ordering::SeqCst);
            tokio::time::sleep(Duration::from_millis(10)).await;
            self.in_flight.fetch_sub(1, Ordering::SeqCst);

            let mut attempts = self.attempts.lock().unwrap();
            attempts.push(key.to_owned());
            let tries = attempts.iter().filter(|k| *k == key).count();
            if tries as u32 <= self.failures_per_key {
                return Err(StoreError::S3 {
                    operation: "upload",
                    key: key.to_owned(),
                    failure: self.failure.clone(),
                    message: "injected".to_owned(),
                });
            }
            Ok(())
        }
    }

    fn flaky(failures_per_key: u32, failure: Failure) -> Arc<FlakyStore> {
        Arc::new(FlakyStore {
            failures_per_key,
            failure,
            attempts: Mutex::new(Vec::new()),
            in_flight: AtomicU64::new(0),
            max_in_flight: AtomicU64::new(0),
        })
    }

    fn metrics() -> Arc<Metrics> {
        Arc::new(Metrics::new())
    }

    fn file(key: &str) -> FinishedFile {
        FinishedFile {
            key: key.to_owned(),
            path: key.into(),
            bytes: 10,
            sessions: Some(1),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn retryable_failures_are_retried() {
        let store = flaky(
            3,
            Failure::Response {
                status: 503,
                code: Some("SlowDown".to_owned()),
            },
        );
        let counts = Arc::new(PublishCounts::default());
        let metrics = metrics();
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        for key in ["b", "c", "d", "e", "f"] {
            // The writer counts each file it finishes.
            metrics.file_written(file(key).bytes);
            tx.send(file(key)).unwrap();
        }
        drop(tx);

        publish_files(
            store.clone(),
            vec![file("a")],
            rx,
            counts.clone(),
            metrics.clone(),
            2,
        )
        .await;

        assert_eq!(counts.files.load(Ordering::SeqCst), 6);
        assert_eq!(counts.files_failed.load(Ordering::SeqCst), 0);
        assert_eq!(store.attempts.lock().unwrap().len(), 6 * 4);
        assert_eq!(store.max_in_flight.load(Ordering::SeqCst), 2);
        assert_eq!(metrics.spool_files.get(), 0);
        assert_eq!(metrics.spool_bytes.get(), 0);
        let rendered = metrics.render();
        assert!(
            rendered.contains("impression_server_upload_failures_total{kind=\"retryable\"} 18"),
            "{rendered}"
        );
        assert!(
            rendered.contains("impression_server_files_uploaded_total 6"),
            "{rendered}"
        );
        assert!(
            rendered.contains("impression_server_files_written_total 5"),
            "{rendered}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn recovered_files_go_first() {
        let store = flaky(0, Failure::Transport);
        let counts = Arc::new(PublishCounts::default());
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        tx.send(file("new")).unwrap();
        drop(tx);

        publish_files(store.clone(), vec![file("old")], rx, counts, metrics(), 1).await;

        assert_eq!(*store.attempts.lock().unwrap(), ["old", "new"]);
    }

    #[tokio::test(start_paused = true)]
    async fn permanent_failure_is_not_retried() {
        let store = flaky(
            u32::MAX,
            Failure::Response {
                status: 403,
                code: Some("AccessDenied".to_owned()),
            },
        );
        let counts = Arc::new(PublishCounts::default());
        let metrics = metrics();
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        metrics.file_written(file("a").bytes);
        tx.send(file("a")).unwrap();
        drop(tx);

        publish_files(
            store.clone(),
            Vec::new(),
            rx,
            counts.clone(),
            metrics.clone(),
            4,
        )
        .await;

        assert_eq!(store.attempts.lock().unwrap().len(), 1);
        assert_eq!(counts.files.load(Ordering::SeqCst), 0);
        assert_eq!(counts.files_failed.load(Ordering::SeqCst), 1);
        assert_eq!(metrics.spool_files.get(), 1, "the file stays in the spool");
        assert_eq!(metrics.spool_bytes.get(), 10);
        let rendered = metrics.render();
        assert!(
            rendered.contains("impression_server_upload_failures_total{kind=\"fatal\"} 1"),
            "{rendered}"
        );
    }
}
