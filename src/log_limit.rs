//! Rate limiting for repeated warnings, so a flood of one problem cannot flood the log.

use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::time::Duration;

/// Lets one log line through per interval and counts the ones it held back.
#[derive(Debug)]
pub struct LogLimiter {
    interval_ms: i64,
    next_ms: AtomicI64,
    suppressed: AtomicU64,
}

impl LogLimiter {
    /// Creates a limiter that lets one line through per `interval`.
    pub fn new(interval: Duration) -> Self {
        Self {
            interval_ms: i64::try_from(interval.as_millis()).unwrap_or(i64::MAX),
            next_ms: AtomicI64::new(i64::MIN),
            suppressed: AtomicU64::new(0),
        }
    }

    /// Returns the number of lines held back since the last one when a line may be logged at
    /// `now_ms`, and `None` when this one is held back.
    pub fn allow(&self, now_ms: i64) -> Option<u64> {
        let next_ms = self.next_ms.load(Ordering::Relaxed);
        let claimed = now_ms >= next_ms
            && self
                .next_ms
                .compare_exchange(
                    next_ms,
                    now_ms.saturating_add(self.interval_ms),
                    Ordering::Relaxed,
                    Ordering::Relaxed,
                )
                .is_ok();
        if claimed {
            Some(self.suppressed.swap(0, Ordering::Relaxed))
        } else {
            self.suppressed.fetch_add(1, Ordering::Relaxed);
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_line_per_interval() {
        let limiter = LogLimiter::new(Duration::from_secs(10));
        assert_eq!(limiter.allow(0), Some(0));
        assert_eq!(limiter.allow(1), None);
        assert_eq!(limiter.allow(9_999), None);
        assert_eq!(
            limiter.allow(10_000),
            Some(2),
            "the held-back lines are counted"
        );
        assert_eq!(limiter.allow(10_001), None);
    }
}
