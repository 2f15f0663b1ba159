//! Waiting for RabbitMQ or Postgres to come back. Every loop that must outlast an outage (a
//! lost broker connection, an audit write while the database restarts) goes through
//! [`until_ok`]: exponential back-off with jitter from the `backoff` crate, and an end as soon
//! as the process shuts down.

use std::fmt::Display;
use std::future::Future;
use std::time::Duration;

use backoff::backoff::Backoff;
use backoff::{ExponentialBackoff, ExponentialBackoffBuilder};
use tokio::sync::watch;
use tracing::warn;

/// The first wait after a failure; it doubles up to [`LONGEST_WAIT`].
const FIRST_WAIT: Duration = Duration::from_millis(100);
/// Long enough not to hammer a recovering service, short enough to notice it back quickly.
const LONGEST_WAIT: Duration = Duration::from_secs(5);

fn schedule() -> ExponentialBackoff {
    ExponentialBackoffBuilder::new()
        .with_initial_interval(FIRST_WAIT)
        .with_multiplier(2.0)
        // Spreads the reconnects of a fleet that lost the same broker at the same moment.
        .with_randomization_factor(0.2)
        .with_max_interval(LONGEST_WAIT)
        .with_max_elapsed_time(None)
        .build()
}

/// Runs `attempt` until it succeeds, waiting between failures and logging each as
/// `"<what>; retrying"`. `None` once `shutdown` is (or becomes) true.
pub async fn until_ok<T, E, F, Fut>(
    what: &str,
    shutdown: &mut watch::Receiver<bool>,
    mut attempt: F,
) -> Option<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, E>>,
    E: Display,
{
    let mut waits = schedule();
    loop {
        if *shutdown.borrow() {
            return None;
        }
        match attempt().await {
            Ok(value) => return Some(value),
            Err(e) => warn!(error = %e, "{what}; retrying"),
        }
        let wait = waits.next_backoff().unwrap_or(LONGEST_WAIT);
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = shutdown.wait_for(|stop| *stop) => return None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU32, Ordering};

    #[tokio::test(start_paused = true)]
    async fn retries_until_success() {
        let (_stop, mut shutdown) = watch::channel(false);
        let tries = AtomicU32::new(0);
        let value = until_ok("test", &mut shutdown, || async {
            match tries.fetch_add(1, Ordering::SeqCst) {
                0..=2 => Err("not yet"),
                n => Ok(n),
            }
        })
        .await;
        assert_eq!(value, Some(3));
    }

    #[tokio::test(start_paused = true)]
    async fn waits_grow_to_the_cap() {
        let mut waits = schedule();
        let first = waits.next_backoff().unwrap();
        assert!(first <= FIRST_WAIT.mul_f64(1.2), "{first:?}");
        let late = (0..20).filter_map(|_| waits.next_backoff()).last().unwrap();
        assert!(late <= LONGEST_WAIT.mul_f64(1.2) && late >= LONGEST_WAIT.mul_f64(0.8));
    }

    #[tokio::test(start_paused = true)]
    async fn shutdown_ends_the_wait() {
        let (stop, mut shutdown) = watch::channel(false);
        let waiting = tokio::spawn(async move {
            until_ok("test", &mut shutdown, || async { Err::<(), _>("down") }).await
        });
        tokio::time::sleep(Duration::from_secs(1)).await;
        stop.send(true).unwrap();
        assert_eq!(waiting.await.unwrap(), None);
    }
}
