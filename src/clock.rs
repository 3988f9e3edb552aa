//! The edge's two clocks, read in one place.
//!
//! - [`unix_now`]: wall-clock Unix seconds, for everything that meets the outside world
//!   (token `exp`, share expiry, certificate lifetimes, renewal windows, ledgers).
//! - [`monotonic_ms`]: milliseconds on a process-local monotonic clock, for durations
//!   that must not jump with the wall clock (instance ejection).
//!
//! Time is a parameter: the logic that depends on it (expiry, backoff, renewal) takes
//! `now` as an argument and is tested without sleeping; only the callers at the edge of
//! the program (request hooks, background services) read these functions.

use std::sync::LazyLock;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

static START: LazyLock<Instant> = LazyLock::new(Instant::now);

/// The current Unix time in seconds (0 if the system clock is before 1970).
pub fn unix_now() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs() as i64).unwrap_or(0)
}

/// Milliseconds since this process first asked, on a monotonic clock.
pub fn monotonic_ms() -> u64 {
    START.elapsed().as_millis() as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn monotonic_never_goes_back() {
        let a = monotonic_ms();
        let b = monotonic_ms();
        assert!(b >= a);
        assert!(unix_now() > 1_700_000_000);
    }
}
