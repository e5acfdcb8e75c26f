//! Wall-clock time for the times written into records.
//!
//! Session start, end and close times and the partition of a file come from one `Clock`, so tests
//! can set the time instead of sleeping.

use std::sync::atomic::{AtomicI64, Ordering};

use chrono::{DateTime, Utc};

/// A source of wall-clock time in milliseconds since the Unix epoch.
pub trait Clock: Send + Sync + 'static {
    /// Returns the current time in milliseconds since the Unix epoch.
    fn now_ms(&self) -> i64;
}

/// The system's real-time clock.
#[derive(Debug, Default, Clone, Copy)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now_ms(&self) -> i64 {
        Utc::now().timestamp_millis()
    }
}

/// A clock that moves only when set, for tests.
#[derive(Debug, Default)]
pub struct ManualClock {
    now_ms: AtomicI64,
}

impl ManualClock {
    /// Creates a clock that reads `now_ms` until it is changed.
    pub fn new(now_ms: i64) -> Self {
        Self {
            now_ms: AtomicI64::new(now_ms),
        }
    }

    /// Creates a clock set to an RFC 3339 time such as `2026-12-04T10:59:00Z`.
    ///
    /// # Panics
    ///
    /// Panics when `rfc3339` is not a valid RFC 3339 time; meant for tests.
    pub fn at(rfc3339: &str) -> Self {
        Self::new(parse_rfc3339_ms(rfc3339).expect("valid RFC 3339 time"))
    }

    /// Sets the time.
    pub fn set_ms(&self, now_ms: i64) {
        self.now_ms.store(now_ms, Ordering::SeqCst);
    }

    /// Moves the time forward by `step`.
    pub fn advance(&self, step: std::time::Duration) {
        let step_ms = i64::try_from(step.as_millis()).unwrap_or(i64::MAX);
        self.now_ms.fetch_add(step_ms, Ordering::SeqCst);
    }
}

impl Clock for ManualClock {
    fn now_ms(&self) -> i64 {
        self.now_ms.load(Ordering::SeqCst)
    }
}

/// Parses an RFC 3339 time into milliseconds since the Unix epoch.
pub fn parse_rfc3339_ms(text: &str) -> Option<i64> {
    DateTime::parse_from_rfc3339(text)
        .ok()
        .map(|time| time.timestamp_millis())
}
