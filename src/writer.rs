//! Partition files: closed sessions encoded into one open Avro file per UTC hour.
//!
//! [`PartitionWriter`] does the encoding and file I/O and is driven by [`run_writer`] on a
//! blocking thread of its own, so no request waits for it. A file is finished when its hour
//! has ended, when it reaches the size limit or the upload interval, and at shutdown. A file is
//! written as `<staging>/<file_id>.avro.partial`. Once finished, it is synced, renamed to
//! `<staging>/<key>` and handed on for publishing. So after a crash, every complete file and
//! its key can be found again from the path alone. Files are opened for a session, so an
//! empty file is never produced.

use std::collections::HashMap;
use std::fs::File;
use std::io::{self, BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::mpsc::{Receiver, RecvTimeoutError, Sender};
use std::time::Duration;

use apache_avro::types::Value;
use apache_avro::{Codec, Reader, Writer};
use tokio::sync::mpsc::UnboundedSender;
use tracing::{error, info};
use uuid::Uuid;

use crate::avro::{SCHEMA, SessionRecord};
use crate::clock::Clock;
use crate::metrics::Metrics;
use crate::session::{ClosedSession, SessionSink};
use crate::store::object_key;

const HOUR_MS: i64 = 3_600_000;
/// How long after its hour a partition file stays open for sessions closed just before the hour
/// ended and still on their way to the writer.
const PARTITION_GRACE: Duration = Duration::from_secs(5);
/// How often open files are checked against their deadlines when no session arrives.
const TICK: Duration = Duration::from_millis(500);
/// Attempts to rename a finished file into a partition folder that the publisher may remove
/// at the same moment.
const RENAME_ATTEMPTS: u32 = 5;

/// Command to the writer thread.
#[derive(Debug)]
pub enum WriterCommand {
    Write(Box<ClosedSession>),
    /// Finish every open file and stop.
    FinishAll,
}

/// A complete, synced file at `<staging>/<key>`, ready to be published under `key`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FinishedFile {
    pub key: String,
    pub path: PathBuf,
    pub bytes: u64,
    /// Number of sessions in the file; `None` for a file found in the staging directory at
    /// start, which is not read.
    pub sessions: Option<u64>,
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

/// Settings of the partition files.
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
    /// Told when a file is opened, so the age of unpublished data can be reported.
    metrics: Option<Arc<Metrics>>,
}

struct OpenFile {
    writer: Writer<'static, CountingWriter>,
    key: String,
    /// Path of the file while it is written: `<staging>/<file_id>.avro.partial`.
    path: PathBuf,
    /// Path of the finished file: `<staging>/<key>`.
    finished_path: PathBuf,
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
            metrics: None,
        }
    }

    /// Reports each opened file to `metrics` as pending data.
    pub fn with_metrics(mut self, metrics: Arc<Metrics>) -> Self {
        self.metrics = Some(metrics);
        self
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
                let file = OpenFile::create(&self.settings, hour_ms, now_ms)?;
                if let Some(metrics) = &self.metrics {
                    metrics.pending_since(&file.key, now_ms);
                }
                entry.insert(file)
            }
        };

        let record = SessionRecord {
            session,
            server_id: &self.settings.server_id,
        };
        file.writer.append_ser(record)?;
        // Each session becomes its own block and reaches the operating system at once, so a
        // crash of the process loses no closed session: the next start salvages the file.
        file.writer.flush()?;
        file.writer
            .get_mut()
            .flush()
            .map_err(|source| WriteError::Io {
                path: file.path.clone(),
                source,
            })?;
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
        let finished_path = settings.staging_dir.join(&key);
        Ok(Self {
            writer,
            key,
            path,
            finished_path,
            opened_at_ms: now_ms,
            sessions: 0,
        })
    }

    /// Writes the last block, flushes and syncs the file, and renames it to its key.
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
        drop(file);

        rename_durably(&path, &self.finished_path)?;
        Ok(FinishedFile {
            key: self.key,
            path: self.finished_path,
            bytes,
            sessions: Some(self.sessions),
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

/// Runs the writer until [`WriterCommand::FinishAll`] or until every sender is gone. It writes
/// sessions, finishes due files and sends every finished file to `finished`. Blocks, so run it
/// on a thread of its own.
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
                    Ok(file) => report.forward(file.map(Ok), &finished, writer.metrics.as_deref()),
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
                report.forward(Some(file), &finished, writer.metrics.as_deref());
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
                report.forward(Some(file), &finished, writer.metrics.as_deref());
            }
            next_check_ms = now_ms + millis(TICK);
        }
    }
}

/// Counts of the writer's work over its life.
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
        metrics: Option<&Metrics>,
    ) {
        match file {
            None => {}
            Some(Ok(file)) => {
                self.files += 1;
                self.sessions += file.sessions.unwrap_or(0);
                // Counted here, not when the publisher takes it: while the store is down, files
                // wait in the spool and the gauges must show them.
                if let Some(metrics) = metrics {
                    metrics.file_written(file.bytes);
                }
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

/// Recovers the sessions of a file an earlier run left unfinished: every whole block is
/// written into a finished file under the key the file would have had, and the partial file
/// is removed. Returns `None`, after removing it, for a file without a whole session.
pub fn salvage_partial(partial: &Path, codec: Codec) -> Result<Option<FinishedFile>, WriteError> {
    let io_err = |path: &Path| {
        let path = path.to_owned();
        move |source| WriteError::Io { path, source }
    };
    let file = File::open(partial).map_err(io_err(partial))?;
    // A file cut inside its header contains no session.
    let records: Vec<Value> = match Reader::new(std::io::BufReader::new(file)) {
        Ok(reader) => reader.map_while(Result::ok).collect(),
        Err(_) => Vec::new(),
    };
    let Some((hour_ms, server_id)) = records.first().and_then(partition_of) else {
        std::fs::remove_file(partial).map_err(io_err(partial))?;
        return Ok(None);
    };

    let name = partial
        .file_name()
        .map(|name| name.to_string_lossy().into_owned())
        .unwrap_or_default();
    let file_id = name.trim_end_matches(".avro.partial");
    let key = object_key(hour_ms, &server_id, file_id);
    let staging = partial.parent().unwrap_or(Path::new("."));
    let salvaged = staging.join(format!("{file_id}.avro.salvage"));

    let output = File::create(&salvaged).map_err(io_err(&salvaged))?;
    let mut writer = Writer::with_codec(&SCHEMA, BufWriter::new(output), codec)?;
    for record in &records {
        writer.append_value_ref(record)?;
    }
    let output = writer
        .into_inner()?
        .into_inner()
        .map_err(|err| io_err(&salvaged)(err.into_error()))?;
    output.sync_all().map_err(io_err(&salvaged))?;
    let bytes = output.metadata().map_err(io_err(&salvaged))?.len();
    drop(output);

    let finished_path = staging.join(&key);
    rename_durably(&salvaged, &finished_path)?;
    std::fs::remove_file(partial).map_err(io_err(partial))?;
    Ok(Some(FinishedFile {
        key,
        path: finished_path,
        bytes,
        sessions: Some(records.len() as u64),
    }))
}

/// Returns the partition hour and server id of a session record read back from a file.
fn partition_of(record: &Value) -> Option<(i64, String)> {
    let Value::Record(fields) = record else {
        return None;
    };
    let field = |name: &str| {
        fields
            .iter()
            .find(|(key, _)| key == name)
            .map(|(_, value)| value)
    };
    let closed_at_ms = match field("closed_at")? {
        Value::TimestampMillis(ms) | Value::Long(ms) => *ms,
        _ => return None,
    };
    let Value::String(server_id) = field("server_id")? else {
        return None;
    };
    Some((
        closed_at_ms.div_euclid(HOUR_MS) * HOUR_MS,
        server_id.clone(),
    ))
}

/// Renames `from` to `to`, creating the parent directories of `to`, and syncs both parent
/// directories so the rename survives a crash. The publisher removes partition folders that
/// it emptied, so a folder can vanish between its creation and the rename; the rename is then
/// tried again.
fn rename_durably(from: &Path, to: &Path) -> Result<(), WriteError> {
    let io_err = |path: &Path| {
        let path = path.to_owned();
        move |source| WriteError::Io { path, source }
    };
    let from_dir = from.parent().unwrap_or(Path::new("."));
    let to_dir = to.parent().unwrap_or(Path::new("."));

    let mut attempts_left = RENAME_ATTEMPTS;
    loop {
        std::fs::create_dir_all(to_dir).map_err(io_err(to_dir))?;
        match std::fs::rename(from, to) {
            Ok(()) => break,
            Err(err) if err.kind() == io::ErrorKind::NotFound && attempts_left > 1 => {
                attempts_left -= 1;
            }
            Err(err) => return Err(io_err(to)(err)),
        }
    }
    for dir in [to_dir, from_dir] {
        File::open(dir)
            .and_then(|dir| dir.sync_all())
            .map_err(io_err(dir))?;
    }
    Ok(())
}

fn millis(duration: Duration) -> i64 {
    i64::try_from(duration.as_millis()).unwrap_or(i64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::batch::{Context, Impression, StringMap};
    use crate::clock::parse_rfc3339_ms;
    use crate::items::Events;
    use crate::session::CloseReason;

    fn settings(staging_dir: &std::path::Path) -> WriterSettings {
        WriterSettings {
            staging_dir: staging_dir.to_owned(),
            codec: Codec::Null,
            server_id: "edge-1".to_owned(),
            max_file_bytes: 64 * 1024 * 1024,
            upload_interval: Duration::from_secs(3600),
        }
    }

    fn session(start: &str, closed: &str, impressions: usize) -> ClosedSession {
        let start_ms = parse_rfc3339_ms(start).unwrap();
        ClosedSession {
            session_id: Uuid::now_v7(),
            device_id: "d-1".into(),
            session_key: None,
            previous_session_id: None,
            start_time_ms: start_ms,
            end_time_ms: start_ms,
            closed_at_ms: parse_rfc3339_ms(closed).unwrap(),
            close_reason: CloseReason::Inactivity,
            ip_address: None,
            context: Context::default(),
            args: StringMap::default(),
            impressions: (0..impressions)
                .map(|n| Impression {
                    impression_id: format!("i-{n}").into(),
                    feature: "RatingBox".into(),
                    time_ms: start_ms,
                    client_time_ms: None,
                    args: StringMap::default(),
                    outputs: StringMap::default(),
                    variants: Vec::new(),
                })
                .collect(),
            events: Events::default(),
        }
    }

    fn read_records(path: &std::path::Path) -> Vec<apache_avro::types::Value> {
        let reader = apache_avro::Reader::new(File::open(path).unwrap()).unwrap();
        reader.map(Result::unwrap).collect()
    }

    #[test]
    fn crash_cut_file_is_salvaged() {
        let staging = tempfile::tempdir().unwrap();
        let mut settings = settings(staging.path());
        settings.codec = Codec::Snappy;
        let mut writer = PartitionWriter::new(settings);
        let now = parse_rfc3339_ms("2026-12-04T11:05:00Z").unwrap();
        for _ in 0..3 {
            let session = session("2026-12-04T10:59:00Z", "2026-12-04T11:05:00Z", 2);
            writer.write(&session, now).unwrap();
        }

        // A crash: nothing is finished, and the last block was only half written.
        let open = writer.open.drain().map(|(_, file)| file).next().unwrap();
        let partial = open.path.clone();
        let expected_key = open.key.clone();
        std::mem::forget(open);
        let mut file = std::fs::OpenOptions::new()
            .append(true)
            .open(&partial)
            .unwrap();
        file.write_all(&[6, 200, 1, 7, 7, 7]).unwrap();
        drop(file);

        let salvaged = salvage_partial(&partial, Codec::Null).unwrap().unwrap();
        assert_eq!(
            salvaged.key, expected_key,
            "the key the file would have had"
        );
        assert_eq!(salvaged.sessions, Some(3));
        assert!(!partial.exists());
        assert_eq!(salvaged.path, staging.path().join(&expected_key));
        assert_eq!(read_records(&salvaged.path).len(), 3);
    }

    #[test]
    fn empty_partial_file_is_removed() {
        let staging = tempfile::tempdir().unwrap();
        let partial = staging.path().join("0193.avro.partial");
        std::fs::write(&partial, b"Obj\x01").unwrap();
        assert_eq!(salvage_partial(&partial, Codec::Null).unwrap(), None);
        assert!(!partial.exists());
    }

    #[test]
    fn session_lands_in_hour_of_close() {
        let staging = tempfile::tempdir().unwrap();
        let mut writer = PartitionWriter::new(settings(staging.path()));
        let now = parse_rfc3339_ms("2026-12-04T11:05:00Z").unwrap();
        let session = session("2026-12-04T10:59:00Z", "2026-12-04T11:05:00Z", 3);
        assert!(writer.write(&session, now).unwrap().is_none());

        let files: Vec<FinishedFile> = writer
            .finish_all()
            .into_iter()
            .map(Result::unwrap)
            .collect();
        assert_eq!(files.len(), 1);
        assert!(
            files[0]
                .key
                .starts_with("incoming-logs/ds=2026-12-04/hh=11/edge-1-"),
            "{}",
            files[0].key
        );
        assert_eq!(files[0].sessions, Some(1));
        assert_eq!(
            read_records(&files[0].path).len(),
            1,
            "the session is whole in one file"
        );
    }

    #[test]
    fn file_finishes_after_its_hour() {
        let staging = tempfile::tempdir().unwrap();
        let mut writer = PartitionWriter::new(settings(staging.path()));
        let at = |time: &str| parse_rfc3339_ms(time).unwrap();
        writer
            .write(
                &session("2026-12-04T10:00:00Z", "2026-12-04T10:59:59Z", 1),
                at("2026-12-04T10:59:59Z"),
            )
            .unwrap();
        writer
            .write(
                &session("2026-12-04T11:00:00Z", "2026-12-04T11:00:01Z", 1),
                at("2026-12-04T11:00:01Z"),
            )
            .unwrap();
        assert_eq!(writer.open_files(), 2);

        // Sessions closed just before the hour may still be on their way during the grace.
        assert!(writer.finish_due(at("2026-12-04T11:00:04Z")).is_empty());
        let finished = writer.finish_due(at("2026-12-04T11:00:05Z"));
        assert_eq!(finished.len(), 1);
        assert!(finished[0].as_ref().unwrap().key.contains("/hh=10/"));
        assert_eq!(writer.open_files(), 1);
    }

    #[test]
    fn file_finishes_at_upload_interval() {
        let staging = tempfile::tempdir().unwrap();
        let mut settings = settings(staging.path());
        settings.upload_interval = Duration::from_secs(600);
        let mut writer = PartitionWriter::new(settings);
        let opened = parse_rfc3339_ms("2026-12-04T10:00:00Z").unwrap();
        writer
            .write(
                &session("2026-12-04T10:00:00Z", "2026-12-04T10:00:00Z", 1),
                opened,
            )
            .unwrap();

        assert!(writer.finish_due(opened + 599_999).is_empty());
        assert_eq!(writer.finish_due(opened + 600_000).len(), 1);
        assert_eq!(writer.open_files(), 0);
        assert!(
            writer.finish_due(opened + 1_200_000).is_empty(),
            "no empty file is opened"
        );
    }

    #[test]
    fn file_finishes_at_size_limit() {
        let staging = tempfile::tempdir().unwrap();
        let mut settings = settings(staging.path());
        settings.max_file_bytes = 64 * 1024;
        let mut writer = PartitionWriter::new(settings);
        let now = parse_rfc3339_ms("2026-12-04T10:00:00Z").unwrap();

        let mut finished = Vec::new();
        let mut written = 0;
        while finished.len() < 2 {
            let session = session("2026-12-04T10:00:00Z", "2026-12-04T10:00:00Z", 50);
            finished.extend(writer.write(&session, now).unwrap());
            written += 1;
            assert!(written < 1000, "the size limit never finished a file");
        }
        finished.extend(writer.finish_all().into_iter().map(Result::unwrap));

        let read: usize = finished
            .iter()
            .map(|file| read_records(&file.path).len())
            .sum();
        assert_eq!(read, written);
        for file in &finished[..2] {
            assert!(file.bytes >= 64 * 1024, "{} bytes", file.bytes);
            assert!(file.bytes < 2 * 64 * 1024, "{} bytes", file.bytes);
        }
        let keys: std::collections::HashSet<_> = finished.iter().map(|file| &file.key).collect();
        assert_eq!(keys.len(), finished.len(), "each file has its own key");
    }

    #[test]
    fn finished_file_moves_to_key_path() {
        let staging = tempfile::tempdir().unwrap();
        let mut writer = PartitionWriter::new(settings(staging.path()));
        let closed = "2026-12-04T11:20:00Z";
        let session = session("2026-12-04T11:00:00Z", closed, 1);
        writer
            .write(&session, parse_rfc3339_ms(closed).unwrap())
            .unwrap();

        let mut finished = writer.finish_all();
        assert_eq!(finished.len(), 1);
        let file = finished.pop().unwrap().unwrap();
        assert_eq!(file.path, staging.path().join(&file.key));
        assert_eq!(std::fs::metadata(&file.path).unwrap().len(), file.bytes);
        let partials: Vec<_> = std::fs::read_dir(staging.path())
            .unwrap()
            .map(|entry| entry.unwrap().file_name())
            .filter(|name| name.to_string_lossy().ends_with(".partial"))
            .collect();
        assert!(partials.is_empty(), "{partials:?}");
    }
}
