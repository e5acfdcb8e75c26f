//! Prometheus metrics, served at `GET /metrics` in the text format.
//!
//! Every name starts with `impression_server_`. Labels come only from closed sets (route
//! template, status class, item kind, close reason, rejection reason), never from ids or error
//! text, so the number of series stays fixed.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::sync::Mutex;
use std::sync::atomic::AtomicU64;

use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue, LabelValueEncoder};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::{Registry, Unit};

use crate::session::{CloseReason, Recorded};

/// The error codes a batch can be rejected with, as `ApiError` names them.
pub const REJECTION_REASONS: [&str; 11] = [
    "invalid_json",
    "invalid_field",
    "invalid_gzip",
    "body_read_failed",
    "missing_write_key",
    "invalid_write_key",
    "body_too_large",
    "unsupported_encoding",
    "body_read_timeout",
    "shutting_down",
    "not_found",
];

/// The routes a request is counted under; anything else is `other`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Route {
    Collect,
    SessionsCount,
    Healthz,
    Readyz,
    Metrics,
    Other,
}

/// A response status, by its first digit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum StatusClass {
    Informational,
    Success,
    Redirection,
    ClientError,
    ServerError,
}

/// Impressions or events.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ItemKind {
    Impression,
    Event,
}

/// Whether a failed upload is retried.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FailureKind {
    Retryable,
    Fatal,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct RequestLabels {
    route: Route,
    status_class: StatusClass,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct RouteLabels {
    route: Route,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct KindLabels {
    kind: ItemKind,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct ReasonLabels {
    reason: &'static str,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct CloseLabels {
    reason: CloseReason,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct FailureLabels {
    kind: FailureKind,
}

type HistogramFamily<L> = Family<L, Histogram, fn() -> Histogram>;

/// Every metric the server exports.
pub struct Metrics {
    registry: Registry,
    http_requests: Family<RequestLabels, Counter>,
    http_duration: HistogramFamily<RouteLabels>,
    items_accepted: Family<KindLabels, Counter>,
    items_duplicate: Family<KindLabels, Counter>,
    batches_rejected: Family<ReasonLabels, Counter>,
    sessions_opened: Counter,
    sessions_closed: Family<CloseLabels, Counter>,
    session_duration: Histogram,
    session_items: Histogram,
    files_written: Counter,
    files_uploaded: Counter,
    uploaded_bytes: Counter,
    upload_failures: Family<FailureLabels, Counter>,
    upload_duration: Histogram,
    /// Set at scrape time from the session store.
    pub sessions_active: Gauge,
    /// Estimated heap bytes of the active sessions.
    pub session_bytes: Gauge,
    pub spool_files: Gauge,
    pub spool_bytes: Gauge,
    pub oldest_pending_data_age: Gauge<f64, AtomicU64>,
    pub ready: Gauge,
    /// Files holding closed sessions not yet published, by key, with the time their first
    /// session was written.
    pending: Mutex<HashMap<String, i64>>,
}

// === impl Metrics ===

impl Metrics {
    /// Creates and registers every metric.
    pub fn new() -> Self {
        let mut registry = Registry::default();
        let sub = registry.sub_registry_with_prefix("impression_server");

        let http_requests = Family::default();
        sub.register(
            "http_requests",
            "HTTP requests by route and status class",
            http_requests.clone(),
        );
        let http_duration: HistogramFamily<RouteLabels> =
            Family::new_with_constructor(request_histogram);
        sub.register_with_unit(
            "http_request_duration",
            "Time from request to response",
            Unit::Seconds,
            http_duration.clone(),
        );
        let items_accepted = Family::default();
        sub.register(
            "items_accepted",
            "Impressions and events stored",
            items_accepted.clone(),
        );
        let items_duplicate = Family::default();
        sub.register(
            "items_duplicate",
            "Impressions and events dropped because their id was already in the session",
            items_duplicate.clone(),
        );
        let batches_rejected = Family::default();
        sub.register(
            "batches_rejected",
            "Batches rejected, by error code",
            batches_rejected.clone(),
        );

        let sessions_opened = Counter::default();
        sub.register(
            "sessions_opened",
            "Sessions opened",
            sessions_opened.clone(),
        );
        let sessions_closed = Family::default();
        sub.register(
            "sessions_closed",
            "Sessions closed, by reason",
            sessions_closed.clone(),
        );
        let session_duration = Histogram::new(exponential_buckets(1.0, 4.0, 9));
        sub.register_with_unit(
            "session_duration",
            "Time from a session's first to its last request",
            Unit::Seconds,
            session_duration.clone(),
        );
        let session_items = Histogram::new(exponential_buckets(1.0, 4.0, 9));
        sub.register(
            "session_items",
            "Impressions and events per closed session",
            session_items.clone(),
        );

        let files_written = Counter::default();
        sub.register(
            "files_written",
            "Avro files finished",
            files_written.clone(),
        );
        let files_uploaded = Counter::default();
        sub.register(
            "files_uploaded",
            "Avro files uploaded to the output",
            files_uploaded.clone(),
        );
        let uploaded_bytes = Counter::default();
        sub.register(
            "uploaded_bytes",
            "Bytes of Avro files uploaded to the output",
            uploaded_bytes.clone(),
        );
        let upload_failures = Family::default();
        sub.register(
            "upload_failures",
            "Failed upload attempts, by kind",
            upload_failures.clone(),
        );
        let upload_duration = Histogram::new(exponential_buckets(0.005, 4.0, 9));
        sub.register_with_unit(
            "upload_duration",
            "Time to upload one file, retries included",
            Unit::Seconds,
            upload_duration.clone(),
        );

        let sessions_active = Gauge::default();
        sub.register(
            "sessions_active",
            "Active sessions",
            sessions_active.clone(),
        );
        let session_bytes = Gauge::default();
        sub.register(
            "session_bytes",
            "Estimated heap bytes of the active sessions",
            session_bytes.clone(),
        );
        let spool_files = Gauge::default();
        sub.register(
            "spool_files",
            "Finished files waiting for upload",
            spool_files.clone(),
        );
        let spool_bytes = Gauge::default();
        sub.register(
            "spool_bytes",
            "Bytes of finished files waiting for upload",
            spool_bytes.clone(),
        );
        let oldest_pending_data_age = Gauge::<f64, AtomicU64>::default();
        sub.register_with_unit(
            "oldest_pending_data_age",
            "Age of the oldest closed session not yet uploaded",
            Unit::Seconds,
            oldest_pending_data_age.clone(),
        );
        let ready = Gauge::default();
        sub.register(
            "ready",
            "1 while the server takes traffic, 0 while it shuts down",
            ready.clone(),
        );

        // Every series of the closed label sets exists from the start at zero, so rates and
        // alerts work before the first event of a kind.
        for route in Route::ALL {
            drop(http_duration.get_or_create(&RouteLabels { route }));
            for status_class in StatusClass::ALL {
                drop(http_requests.get_or_create(&RequestLabels {
                    route,
                    status_class,
                }));
            }
        }
        for kind in [ItemKind::Impression, ItemKind::Event] {
            drop(items_accepted.get_or_create(&KindLabels { kind }));
            drop(items_duplicate.get_or_create(&KindLabels { kind }));
        }
        for reason in REJECTION_REASONS {
            drop(batches_rejected.get_or_create(&ReasonLabels { reason }));
        }
        for reason in CloseReason::ALL {
            drop(sessions_closed.get_or_create(&CloseLabels { reason }));
        }
        for kind in [FailureKind::Retryable, FailureKind::Fatal] {
            drop(upload_failures.get_or_create(&FailureLabels { kind }));
        }

        Self {
            registry,
            http_requests,
            http_duration,
            items_accepted,
            items_duplicate,
            batches_rejected,
            sessions_opened,
            sessions_closed,
            session_duration,
            session_items,
            files_written,
            files_uploaded,
            uploaded_bytes,
            upload_failures,
            upload_duration,
            sessions_active,
            session_bytes,
            spool_files,
            spool_bytes,
            oldest_pending_data_age,
            ready,
            pending: Mutex::new(HashMap::new()),
        }
    }

    /// Records that the file `key` contains data not yet published since `since_ms`.
    pub fn pending_since(&self, key: &str, since_ms: i64) {
        self.lock_pending()
            .entry(key.to_owned())
            .or_insert(since_ms);
    }

    /// Records that the file `key` was published.
    pub fn pending_done(&self, key: &str) {
        self.lock_pending().remove(key);
    }

    /// Sets the age of the oldest unpublished data as of `now_ms`; 0 when nothing is pending.
    pub fn update_pending_age(&self, now_ms: i64) {
        let oldest = self.lock_pending().values().copied().min();
        let age_ms = oldest.map_or(0, |since_ms| now_ms.saturating_sub(since_ms).max(0));
        self.oldest_pending_data_age.set(age_ms as f64 / 1000.0);
    }

    fn lock_pending(&self) -> std::sync::MutexGuard<'_, HashMap<String, i64>> {
        // The map stays consistent even if a holder panicked: every operation on it is one call.
        self.pending
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Renders every metric in the Prometheus text format.
    pub fn render(&self) -> String {
        let mut text = String::new();
        if prometheus_client::encoding::text::encode(&mut text, &self.registry).is_err() {
            // Writing into a String fails only if an encoder reports an error. An empty scrape
            // is then the safe result.
            text.clear();
        }
        text
    }

    pub fn request_finished(&self, route: Route, status: u16, seconds: f64) {
        let status_class = StatusClass::of(status);
        self.http_requests
            .get_or_create(&RequestLabels {
                route,
                status_class,
            })
            .inc();
        self.http_duration
            .get_or_create(&RouteLabels { route })
            .observe(seconds);
    }

    pub fn items_recorded(&self, recorded: &Recorded) {
        let Recorded {
            impressions,
            events,
            duplicate_impressions,
            duplicate_events,
            ..
        } = *recorded;
        let add = |family: &Family<KindLabels, Counter>, kind, count: usize| {
            if count > 0 {
                family
                    .get_or_create(&KindLabels { kind })
                    .inc_by(count as u64);
            }
        };
        add(&self.items_accepted, ItemKind::Impression, impressions);
        add(&self.items_accepted, ItemKind::Event, events);
        add(
            &self.items_duplicate,
            ItemKind::Impression,
            duplicate_impressions,
        );
        add(&self.items_duplicate, ItemKind::Event, duplicate_events);
    }

    pub fn batch_rejected(&self, reason: &'static str) {
        self.batches_rejected
            .get_or_create(&ReasonLabels { reason })
            .inc();
    }

    pub fn session_opened(&self) {
        self.sessions_opened.inc();
    }

    pub fn session_closed(&self, reason: CloseReason, duration_seconds: f64, items: usize) {
        self.sessions_closed
            .get_or_create(&CloseLabels { reason })
            .inc();
        self.session_duration.observe(duration_seconds);
        self.session_items.observe(items as f64);
    }

    /// Counts a file the writer finished, which now waits for upload.
    pub fn file_written(&self, bytes: u64) {
        self.files_written.inc();
        self.file_waiting(bytes);
    }

    /// Counts a file waiting for upload, such as one left by an earlier run.
    pub fn file_waiting(&self, bytes: u64) {
        self.spool_files.inc();
        self.spool_bytes
            .inc_by(i64::try_from(bytes).unwrap_or(i64::MAX));
    }

    pub fn file_uploaded(&self, bytes: u64, seconds: f64) {
        self.files_uploaded.inc();
        self.uploaded_bytes.inc_by(bytes);
        self.upload_duration.observe(seconds);
    }

    pub fn upload_failed(&self, kind: FailureKind) {
        self.upload_failures
            .get_or_create(&FailureLabels { kind })
            .inc();
    }

    /// Returns a counter's current value, for tests and logs.
    pub fn accepted(&self, kind: ItemKind) -> u64 {
        self.items_accepted
            .get_or_create(&KindLabels { kind })
            .get()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

fn request_histogram() -> Histogram {
    // 0.25 ms to about 4 s.
    Histogram::new(exponential_buckets(0.000_25, 2.5, 12))
}

// === label values ===

impl Route {
    const ALL: [Route; 6] = [
        Route::Collect,
        Route::SessionsCount,
        Route::Healthz,
        Route::Readyz,
        Route::Metrics,
        Route::Other,
    ];
}

impl StatusClass {
    const ALL: [StatusClass; 5] = [
        StatusClass::Informational,
        StatusClass::Success,
        StatusClass::Redirection,
        StatusClass::ClientError,
        StatusClass::ServerError,
    ];

    fn of(status: u16) -> Self {
        match status {
            100..=199 => StatusClass::Informational,
            200..=299 => StatusClass::Success,
            300..=399 => StatusClass::Redirection,
            400..=499 => StatusClass::ClientError,
            _ => StatusClass::ServerError,
        }
    }
}

impl EncodeLabelValue for Route {
    fn encode(&self, encoder: &mut LabelValueEncoder) -> Result<(), std::fmt::Error> {
        encoder.write_str(match self {
            Route::Collect => "/v1/collect",
            Route::SessionsCount => "/v1/sessions/count",
            Route::Healthz => "/healthz",
            Route::Readyz => "/readyz",
            Route::Metrics => "/metrics",
            Route::Other => "other",
        })
    }
}

impl EncodeLabelValue for StatusClass {
    fn encode(&self, encoder: &mut LabelValueEncoder) -> Result<(), std::fmt::Error> {
        encoder.write_str(match self {
            StatusClass::Informational => "1xx",
            StatusClass::Success => "2xx",
            StatusClass::Redirection => "3xx",
            StatusClass::ClientError => "4xx",
            StatusClass::ServerError => "5xx",
        })
    }
}

impl EncodeLabelValue for ItemKind {
    fn encode(&self, encoder: &mut LabelValueEncoder) -> Result<(), std::fmt::Error> {
        encoder.write_str(match self {
            ItemKind::Impression => "impression",
            ItemKind::Event => "event",
        })
    }
}

impl EncodeLabelValue for FailureKind {
    fn encode(&self, encoder: &mut LabelValueEncoder) -> Result<(), std::fmt::Error> {
        encoder.write_str(match self {
            FailureKind::Retryable => "retryable",
            FailureKind::Fatal => "fatal",
        })
    }
}

impl EncodeLabelValue for CloseReason {
    fn encode(&self, encoder: &mut LabelValueEncoder) -> Result<(), std::fmt::Error> {
        encoder.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use super::*;

    /// The dashboard and alert rules in `deploy/` may use only the metrics listed in
    /// `deploy/metrics.txt`, so this test keeps the list and the code in step.
    #[test]
    fn pending_age_follows_oldest_file() {
        let metrics = Metrics::new();
        metrics.update_pending_age(10_000);
        assert_eq!(metrics.oldest_pending_data_age.get(), 0.0);

        metrics.pending_since("a", 1_000);
        metrics.pending_since("b", 4_000);
        metrics.update_pending_age(10_000);
        assert_eq!(metrics.oldest_pending_data_age.get(), 9.0);

        metrics.pending_done("a");
        metrics.update_pending_age(10_000);
        assert_eq!(metrics.oldest_pending_data_age.get(), 6.0);
    }

    #[test]
    fn exported_names_match_deploy_list() {
        let listed: BTreeSet<String> = include_str!("../deploy/metrics.txt")
            .lines()
            .filter(|line| !line.starts_with('#') && !line.trim().is_empty())
            .map(str::to_owned)
            .collect();

        let exported: BTreeSet<String> = Metrics::new()
            .render()
            .lines()
            .filter_map(|line| line.strip_prefix("# TYPE "))
            .map(|line| {
                let (name, kind) = line.split_once(' ').unwrap();
                let name = if kind == "counter" {
                    format!("{name}_total")
                } else {
                    name.to_owned()
                };
                format!("{kind} {name}")
            })
            .collect();
        assert_eq!(exported, listed);
    }
}
