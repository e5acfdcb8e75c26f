//! impression-server collects impressions and events from front-end apps into visitor sessions
//! and writes each closed session as one Avro record into hourly partition files.
//!
//! The parts, in the order data flows through them:
//!
//! - [`config`]: the command line and environment, checked once at start.
//! - [`api`]: the HTTP router; `POST /v1/collect` and the operations endpoints.
//! - [`serve`]: the HTTP/1.1 listener and the threads that serve its connections.
//! - [`intake`]: write keys, body encoding and limits, and the client address.
//! - [`batch`]: parsing and validation of a request body into session items.
//! - [`limits`]: limits on the shape of a batch.
//! - [`session`]: the sharded map of active sessions and their expiry.
//! - [`avro`]: the record schema from `proto/session.avsc` and the encoding.
//! - [`writer`]: one open Avro file per UTC hour, on a thread of its own.
//! - [`spool`]: the finished files waiting in the staging directory, found again at start.
//! - [`publish`]: uploads from the staging directory, with retries and bounded concurrency.
//! - [`store`]: where finished files are published: a local directory or S3.
//! - [`metrics`]: the Prometheus metrics of all of the above.
//! - [`log_limit`]: rate limiting for repeated warnings.
//! - [`clock`]: the wall clock behind every time written into a record.
//! - [`healthcheck`]: the `healthcheck` subcommand for container health checks.
//!
//! [`run`] wires them together and owns every task it starts, until shutdown.

pub mod api;
pub mod avro;
pub mod batch;
pub mod clock;
pub mod config;
pub mod healthcheck;
pub mod intake;
pub mod items;
pub mod limits;
pub mod log_limit;
pub mod metrics;
pub mod publish;
pub mod serve;
pub mod session;
pub mod spool;
pub mod store;
pub mod writer;

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use crate::api::AppState;
use crate::clock::Clock;
use crate::config::Settings;
use crate::intake::Intake;
use crate::log_limit::LogLimiter;
use crate::metrics::Metrics;
use crate::publish::PublishCounts;
use crate::session::{CloseReason, SessionLimits, SessionStore};
use crate::spool::SpoolContents;
use crate::store::{ObjectStore, StoreError};
use crate::writer::{FinishedFile, PartitionWriter, WriterCommand, WriterReport, WriterSettings};

/// Shortest time between two lines of the same repeated warning.
const REPEATED_WARNING_INTERVAL: Duration = Duration::from_secs(10);
/// How often the sweeper closes expired sessions.
const SWEEP_INTERVAL: Duration = Duration::from_secs(1);

/// A failure that stops the server from starting.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("output {output} is not writable: {source}")]
    Storage {
        output: String,
        #[source]
        source: StoreError,
    },
    #[error("output is not usable: {0}")]
    Setup(#[source] StoreError),
    #[error("failed to read staging directory {dir}: {source}")]
    Staging {
        dir: String,
        #[source]
        source: std::io::Error,
    },
    #[error("failed to start the connection threads: {0}")]
    ConnectionThreads(#[source] std::io::Error),
}

/// Counts of the shutdown; `main` exits 0 only when [`ShutdownReport::is_complete`] holds.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct ShutdownReport {
    pub sessions_closed: usize,
    pub files_written: u64,
    pub files_published: u64,
    /// Complete files still in the staging directory at exit, from this run or an earlier
    /// one; the next start publishes them.
    pub files_left: u64,
    pub bytes_left: u64,
    /// Sessions that could not be encoded or written.
    pub sessions_lost: u64,
}

impl ShutdownReport {
    /// Returns whether everything accepted reached the output.
    pub fn is_complete(&self) -> bool {
        self.files_left == 0 && self.sessions_lost == 0
    }
}

/// Runs the server on `listener` until `shutdown` completes, then closes every session, writes
/// and publishes every file, and reports what happened.
pub async fn run(
    settings: Settings,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
    clock: Arc<dyn Clock>,
) -> Result<ShutdownReport, StartError> {
    let store = store::open(&settings.output)
        .await
        .map_err(StartError::Setup)?;
    store.check().await.map_err(|source| StartError::Storage {
        output: store.describe(),
        source,
    })?;
    let recovered = recover_staged_files(store.as_ref(), avro::codec(settings.codec))?;
    let connection_threads = serve::ConnectionThreads::start(settings.http_threads)
        .map_err(StartError::ConnectionThreads)?;
    let metrics = Arc::new(Metrics::new());
    // The age of a file left by an earlier run is unknown here, so it counts from this start.
    for file in &recovered {
        metrics.pending_since(&file.key, clock.now_ms());
    }

    // Closed sessions flow to the writer thread, finished files to the publisher task.
    let (command_tx, command_rx) = std::sync::mpsc::channel::<WriterCommand>();
    let (finished_tx, finished_rx) = tokio::sync::mpsc::unbounded_channel();
    let writer = PartitionWriter::new(WriterSettings {
        staging_dir: store.staging_dir().to_owned(),
        codec: avro::codec(settings.codec),
        server_id: settings.server_id.clone(),
        max_file_bytes: settings.max_file_bytes,
        upload_interval: settings.upload_interval,
    })
    .with_metrics(metrics.clone());
    let writer_clock = clock.clone();
    let writer_task = tokio::task::spawn_blocking(move || {
        writer::run_writer(writer, command_rx, finished_tx, writer_clock)
    });
    let published = Arc::new(PublishCounts::default());
    let publisher_task = tokio::spawn(publish::publish_files(
        store.clone(),
        recovered,
        finished_rx,
        published.clone(),
        metrics.clone(),
        settings.upload_concurrency,
    ));
    let publisher_abort = publisher_task.abort_handle();

    let limits = SessionLimits {
        timeout: settings.session_timeout,
        max_duration: settings.max_session_duration,
        max_items: settings.max_session_items,
    };
    let sessions = Arc::new(
        SessionStore::new(limits, Box::new(command_tx.clone())).with_metrics(metrics.clone()),
    );
    let stop = CancellationToken::new();
    let sweeper_task = tokio::spawn(sweep_expired(sessions.clone(), clock.clone(), stop.clone()));

    let state = AppState {
        sessions: sessions.clone(),
        clock: clock.clone(),
        intake: Arc::new(Intake::from_settings(&settings)),
        metrics: metrics.clone(),
        draining: Arc::new(AtomicBool::new(false)),
        rejected_log: Arc::new(LogLimiter::new(REPEATED_WARNING_INTERVAL)),
    };
    let server_task = tokio::spawn(serve::serve(
        listener,
        api::app(state.clone()),
        connection_threads,
        settings.header_read_timeout,
        stop.clone(),
    ));
    info!(output = %store.describe(), server_id = %settings.server_id, "ready");

    // Shutdown: stop taking requests, let in-flight ones finish, then close every session.
    shutdown.await;
    info!("shutdown started, draining requests");
    state.draining.store(true, Ordering::SeqCst);
    stop.cancel();
    match tokio::time::timeout(settings.drain_timeout, server_task).await {
        Ok(Ok(())) => info!("requests drained"),
        Ok(Err(err)) => error!(error = %err, "server task failed"),
        Err(_) => {
            warn!(drain_timeout = ?settings.drain_timeout, "drain timed out, closing sessions anyway")
        }
    }
    if let Err(err) = sweeper_task.await {
        error!(error = %err, "session sweeper failed");
    }
    let sessions_closed = sessions.close_all(CloseReason::Shutdown, clock.now_ms());
    info!(sessions = sessions_closed, "closed every session");

    let _ = command_tx.send(WriterCommand::FinishAll);
    // The writer and the publisher share one deadline; the writer's report is kept even when
    // the publisher runs out of time.
    let deadline = tokio::time::Instant::now() + settings.shutdown_timeout;
    let writer_report = match tokio::time::timeout_at(deadline, writer_task).await {
        Ok(Ok(report)) => report,
        Ok(Err(err)) => {
            error!(error = %err, "writer thread failed");
            WriterReport::default()
        }
        Err(_) => {
            error!(shutdown_timeout = ?settings.shutdown_timeout, "shutdown timed out before every file was written");
            WriterReport::default()
        }
    };
    match tokio::time::timeout_at(deadline, publisher_task).await {
        Ok(Ok(())) => {}
        Ok(Err(err)) => error!(error = %err, "publisher task failed"),
        Err(_) => {
            error!(shutdown_timeout = ?settings.shutdown_timeout, "shutdown timed out before every file was published");
            // Stops the uploads in flight; their files stay in the staging directory.
            publisher_abort.abort();
        }
    }

    // What is left is counted on disk, so it covers files of earlier runs too.
    let left = scan_staging(store.as_ref()).unwrap_or_else(|err| {
        error!(error = %err, "failed to count the files left in the staging directory");
        SpoolContents::default()
    });
    let report = ShutdownReport {
        sessions_closed,
        files_written: writer_report.files,
        files_published: published.files.load(Ordering::SeqCst),
        files_left: left.files.len() as u64,
        bytes_left: left.bytes(),
        sessions_lost: writer_report.sessions_lost,
    };
    info!(
        sessions = report.sessions_closed,
        files_written = report.files_written,
        files_published = report.files_published,
        bytes_published = published.bytes.load(Ordering::SeqCst),
        files_left = report.files_left,
        bytes_left = report.bytes_left,
        "shutdown finished"
    );
    if report.files_left > 0 {
        error!(
            files = report.files_left,
            bytes = report.bytes_left,
            staging_dir = %store.staging_dir().display(),
            "files were not published and stay in the staging directory; the next start publishes them"
        );
    }
    Ok(report)
}

/// Finds the files an earlier run left in the staging directory, to publish them first, and
/// warns about partial files, which a crash cut short and which are kept for inspection.
fn recover_staged_files(
    store: &dyn ObjectStore,
    codec: apache_avro::Codec,
) -> Result<Vec<FinishedFile>, StartError> {
    let staging = store.staging_dir();
    let mut contents = scan_staging(store)?;
    // A partial file is one a crash cut short; its whole sessions are salvaged.
    for partial in &contents.partial {
        match writer::salvage_partial(partial, codec) {
            Ok(Some(file)) => {
                warn!(key = %file.key, sessions = file.sessions, "salvaged the sessions of a file an earlier run left unfinished");
                contents.files.push(file);
            }
            Ok(None) => {
                info!(path = %partial.display(), "removed an unfinished file without a whole session")
            }
            Err(err) => {
                error!(path = %partial.display(), error = %err, "failed to salvage an unfinished file; it is kept for inspection")
            }
        }
    }
    if !contents.files.is_empty() {
        info!(
            files = contents.files.len(),
            bytes = contents.bytes(),
            staging_dir = %staging.display(),
            "publishing files left by an earlier run first"
        );
    }
    // No file is being finished yet, so empty partition folders can go.
    if let Err(err) = spool::remove_empty_dirs(staging) {
        warn!(staging_dir = %staging.display(), error = %err, "failed to remove empty folders");
    }
    Ok(contents.files)
}

fn scan_staging(store: &dyn ObjectStore) -> Result<SpoolContents, StartError> {
    let staging = store.staging_dir();
    spool::scan(staging).map_err(|source| StartError::Staging {
        dir: staging.display().to_string(),
        source,
    })
}

/// Closes expired sessions every [`SWEEP_INTERVAL`] until `stop` is cancelled.
async fn sweep_expired(
    sessions: Arc<SessionStore>,
    clock: Arc<dyn Clock>,
    stop: CancellationToken,
) {
    let mut interval = tokio::time::interval(SWEEP_INTERVAL);
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            _ = interval.tick() => {
                let closed = sessions.close_expired(clock.now_ms());
                if closed > 0 {
                    tracing::debug!(sessions = closed, "closed expired sessions");
                }
            }
        }
    }
}
