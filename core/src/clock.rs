//! Wall-clock time as the services exchange it: milliseconds since the Unix epoch on the wire
//! (deadlines, attempt times), seconds where a protocol wants them (JWT `iat`).

use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Milliseconds since the Unix epoch: the one time representation on the wire.
pub fn now_ms() -> u64 {
    since_epoch(SystemTime::now()).as_millis() as u64
}

/// Seconds since the Unix epoch.
pub fn unix_secs() -> u64 {
    since_epoch(SystemTime::now()).as_secs()
}

/// The instant `ms` milliseconds after the Unix epoch.
pub fn system_time(ms: u64) -> SystemTime {
    UNIX_EPOCH + Duration::from_millis(ms)
}

/// A clock set before 1970 reads as the epoch itself rather than failing.
fn since_epoch(time: SystemTime) -> Duration {
    time.duration_since(UNIX_EPOCH).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn milliseconds_round_trip() {
        let now = now_ms();
        assert_eq!(since_epoch(system_time(now)).as_millis() as u64, now);
        assert!(unix_secs() * 1000 <= now_ms());
    }
}
