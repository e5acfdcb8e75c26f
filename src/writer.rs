//! Partition files: closed sessions encoded into one open Avro file per UTC hour.
//!
//! [`PartitionWriter`] does the encoding and file I/O and is driven by [`run_writer`] on a
//! blocking thread of its own, so no request waits for it. A file is finished when its hour
//! has ended, when it reaches the size limit or the upload interval, and at shutdown; a
//! finished file is synced to disk and handed on for publishing. Files are opened for a
//! session, so an empty file is never produced.

use std::collections::HashMap;
use std::fs::File;
use std::io::{self, BufWriter, Write};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::mpsc::{Receiver, RecvTimeoutError, Sender};
use std::time::Duration;

use apache_avro::{Codec, Writer};
use tokio::sync::mpsc::UnboundedSender;
use tracing::{error, info};
use uuid::Uuid;

use crate::avro::{SCHEMA, SessionRecord};
use crate::clock::Clock;
use crate::session::{ClosedSession, SessionSink};
use crate::store::object_key;

const HOUR_MS: i64 = 3_600_000;
/// How long after its hour a partition file stays open for sessions closed just before the hour
/// ended and still on their way to the writer.
const PARTITION_GRACE: Duration = Duration::from_secs(5);
/// How often open files are checked against their deadlines when no session arrives.
const TICK: Duration = Duration::from_millis(500);

/// What the writer thread is asked to do.
#[derive(Debug)]
pub enum WriterCommand {
    Write(Box<ClosedSession>),
    /// Finish every open file and stop.
    FinishAll,
}

/// A complete, synced file ready to be published under `key`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FinishedFile {
    pub key: String,
    pub path: PathBuf,
    pub bytes: u64,
    pub sessions: u64,
}

/// A failure to write a session; the session is lost, so it is logged at error level.
#[derive(Debug, thiserror::Error)]
pub enum WriteError {
    #[error("failed to encode session: {0}")]
    Encode(#[from] apache_avro::Error),
    #[error("failed to write {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// How partition files are written.
#[derive(Debug, Clone)]
pub struct WriterSettings {
    pub staging_dir: PathBuf,
    pub codec: Codec,
    pub server_id: String,
    pub max_file_bytes: u64,
    pub upload_interval: Duration,
}

/// The open files, one per partition hour.
pub struct PartitionWriter {
    settings: WriterSettings,
    /// Open files keyed by the start of their UTC hour, in milliseconds.
    open: HashMap<i64, OpenFile>,
}

struct OpenFile {
    writer: Writer<'static, CountingWriter>,
    key: String,
    path: PathBuf,
    opened_at_ms: i64,
    sessions: u64,
}

/// Counts the bytes that reach the file, to apply the size limit.
struct CountingWriter {
    inner: BufWriter<File>,
    bytes: u64,
}

// === impl PartitionWriter ===

impl PartitionWriter {
    /// Creates a writer with no open file; the staging directory must exist.
    pub fn new(settings: WriterSettings) -> Self {
        Self {
            settings,
            open: HashMap::new(),
        }
    }

    /// Appends `session` to the file of its partition; returns the file if this finished it.
    pub fn write(
        &mut self,
        session: &ClosedSession,
        now_ms: i64,
    ) -> Result<Option<FinishedFile>, WriteError> {
        let hour_ms = session.closed_at_ms.div_euclid(HOUR_MS) * HOUR_MS;
        let file = match self.open.entry(hour_ms) {
            std::collections::hash_map::Entry::Occupied(entry) => entry.into_mut(),
            std::collections::hash_map::Entry::Vacant(entry) => {
                entry.insert(OpenFile::create(&self.settings, hour_ms, now_ms)?)
            }
        };

        let record = SessionRecord {
            session,
            server_id: &self.settings.server_id,
        };
        file.writer.append_ser(record)?;
        file.sessions += 1;

        if file.writer.get_ref().bytes >= self.settings.max_file_bytes
            && let Some(file) = self.open.remove(&hour_ms)
        {
            return file.finish().map(Some);
        }
        Ok(None)
    }

    /// Finishes every file whose hour ended or whose upload interval passed by `now_ms`.
    pub fn finish_due(&mut self, now_ms: i64) -> Vec<Result<FinishedFile, WriteError>> {
        let grace_ms = millis(PARTITION_GRACE);
        let interval_ms = millis(self.settings.upload_interval);
        let due: Vec<i64> = self
            .open
            .iter()
            .filter(|(hour_ms, file)| {
                now_ms >= **hour_ms + HOUR_MS + grace_ms
                    || now_ms >= file.opened_at_ms + interval_ms
            })
            .map(|(hour_ms, _)| *hour_ms)
            .collect();
        due.into_iter()
            .filter_map(|hour_ms| self.open.remove(&hour_ms))
            .map(OpenFile::finish)
            .collect()
    }

    /// Finishes every open file.
    pub fn finish_all(&mut self) -> Vec<Result<FinishedFile, WriteError>> {
        self.open.drain().map(|(_, file)| file.finish()).collect()
    }

    /// Returns the number of open files.
    pub fn open_files(&self) -> usize {
        self.open.len()
    }
}

// === impl OpenFile ===

impl OpenFile {
    fn create(settings: &WriterSettings, hour_ms: i64, now_ms: i64) -> Result<Self, WriteError> {
        // The file id is fixed here, so a retried publish writes the same key.
        let file_id = Uuid::now_v7().simple().to_string();
        let key = object_key(hour_ms, &settings.server_id, &file_id);
        let path = settings.staging_dir.join(format!("{file_id}.avro.partial"));
        let file = File::create(&path).map_err(|source| WriteError::Io {
            path: path.clone(),
            source,
        })?;
        let counting = CountingWriter {
            inner: BufWriter::new(file),
            bytes: 0,
        };
        let writer = Writer::with_codec(&SCHEMA, counting, settings.codec)?;
        Ok(Self {
            writer,
            key,
            path,
            opened_at_ms: now_ms,
            sessions: 0,
        })
    }

    /// Writes the last block, flushes and syncs the file.
    fn finish(self) -> Result<FinishedFile, WriteError> {
        let path = self.path;
        let io_err = |source| WriteError::Io {
            path: path.clone(),
            source,
        };
        let counting = self.writer.into_inner()?;
        let bytes = counting.bytes;
        let file = counting
            .inner
            .into_inner()
            .map_err(|err| io_err(err.into_error()))?;
        file.sync_all().map_err(io_err)?;
        Ok(FinishedFile {
            key: self.key,
            path,
            bytes,
            sessions: self.sessions,
        })
    }
}

// === impl CountingWriter ===

impl Write for CountingWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let written = self.inner.write(buf)?;
        self.bytes += written as u64;
        Ok(written)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

// === impl SessionSink for the writer's channel ===

impl SessionSink for Sender<WriterCommand> {
    fn closed(&self, session: ClosedSession) {
        if self.send(WriterCommand::Write(Box::new(session))).is_err() {
            // Only possible after the writer stopped, which happens after every session closed.
            error!("session closed after the writer stopped; it was not written");
        }
    }
}

/// Runs the writer until it is told to finish: writes sessions, finishes due files and sends
/// every finished file to `finished`. Blocks; run it on a thread of its own.
pub fn run_writer(
    mut writer: PartitionWriter,
    commands: Receiver<WriterCommand>,
    finished: UnboundedSender<FinishedFile>,
    clock: Arc<dyn Clock>,
) -> WriterReport {
    let mut report = WriterReport::default();
    let mut next_check_ms = i64::MIN;
    loop {
        let stop = match commands.recv_timeout(TICK) {
            Ok(WriterCommand::Write(session)) => {
                match writer.write(&session, clock.now_ms()) {
                    Ok(file) => report.forward(file.map(Ok), &finished),
                    Err(err) => {
                        report.sessions_lost += 1;
                        error!(session_id = %session.session_id, error = %err, "failed to write session");
                    }
                }
                false
            }
            Ok(WriterCommand::FinishAll) | Err(RecvTimeoutError::Disconnected) => true,
            Err(RecvTimeoutError::Timeout) => false,
        };

        let now_ms = clock.now_ms();
        if stop {
            for file in writer.finish_all() {
                report.forward(Some(file), &finished);
            }
            info!(
                files = report.files,
                sessions = report.sessions,
                "writer finished all files"
            );
            return report;
        }
        if now_ms >= next_check_ms {
            for file in writer.finish_due(now_ms) {
                report.forward(Some(file), &finished);
            }
            next_check_ms = now_ms + millis(TICK);
        }
    }
}

/// What the writer did over its life.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct WriterReport {
    pub files: u64,
    pub sessions: u64,
    pub sessions_lost: u64,
}

impl WriterReport {
    fn forward(
        &mut self,
        file: Option<Result<FinishedFile, WriteError>>,
        finished: &UnboundedSender<FinishedFile>,
    ) {
        match file {
            None => {}
            Some(Ok(file)) => {
                self.files += 1;
                self.sessions += file.sessions;
                if let Err(unsent) = finished.send(file) {
                    error!(key = %unsent.0.key, "publisher stopped; finished file left in staging");
                }
            }
            Some(Err(err)) => {
                error!(error = %err, "failed to finish file");
            }
        }
    }
}

fn millis(duration: Duration) -> i64 {
    i64::try_from(duration.as_millis()).unwrap_or(i64::MAX)
}
