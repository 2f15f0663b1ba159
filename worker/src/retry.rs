//! When to try a push again: exponential back-off with jitter, a `Retry-After` taking
//! precedence, rounded up to one of the broker's retry tiers, never past the job's deadline.

use std::time::Duration;

use backoff::backoff::Backoff;
use backoff::ExponentialBackoffBuilder;
use pushfleet_core::config::RetrySettings;
use pushfleet_core::job::Job;
use pushfleet_core::{DeliveryStatus, Topology};

/// What to do with a job whose last attempt may succeed later.
#[derive(Debug, Clone, PartialEq)]
pub enum RetryPlan {
    /// Park the job in the retry tier of this delay.
    WaitInTier(u64),
    /// No attempt is possible any more.
    GiveUp(DeliveryStatus, String),
}

/// The back-off before attempt `attempts_made + 1`: the `attempts_made`-th delay of a fresh
/// exponential back-off, so that any worker computes it from the job alone.
pub fn backoff_delay(settings: &RetrySettings, attempts_made: u32) -> Duration {
    let mut backoff = ExponentialBackoffBuilder::new()
        .with_initial_interval(Duration::from_millis(settings.initial_backoff_ms))
        .with_multiplier(settings.multiplier)
        .with_randomization_factor(settings.jitter)
        .with_max_interval(Duration::from_millis(settings.max_backoff_ms))
        .with_max_elapsed_time(None)
        .build();
    let mut delay = Duration::from_millis(settings.initial_backoff_ms);
    for _ in 0..attempts_made.max(1) {
        delay = backoff
            .next_backoff()
            .unwrap_or(Duration::from_millis(settings.max_backoff_ms));
    }
    delay
}

/// Plans the next attempt after `attempts_made` sends of `job`.
pub fn plan(
    settings: &RetrySettings,
    topology: &Topology,
    job: &Job,
    attempts_made: u32,
    retry_after: Option<Duration>,
    now_ms: u64,
) -> RetryPlan {
    if attempts_made >= settings.max_attempts {
        return RetryPlan::GiveUp(
            DeliveryStatus::Failed,
            format!("gave up after {attempts_made} attempts"),
        );
    }
    let backoff = backoff_delay(settings, attempts_made);
    let wanted = retry_after.map_or(backoff, |r| r.max(backoff));
    let tier = topology.retry_tier(wanted.as_millis() as u64);
    let remaining = job.deadline_ms.saturating_sub(now_ms);
    if tier < remaining {
        return RetryPlan::WaitInTier(tier);
    }
    // The back-off alone may be shortened to fit before the deadline; a provider's Retry-After
    // may not.
    if retry_after.is_none() {
        if let Some(&shorter) = topology
            .retry_tiers_ms()
            .iter()
            .rev()
            .find(|&&t| t < remaining)
        {
            return RetryPlan::WaitInTier(shorter);
        }
    }
    RetryPlan::GiveUp(
        DeliveryStatus::Expired,
        "the deadline passes before another attempt could be made".into(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use pushfleet_core::config::{Platform, RabbitSettings};
    use pushfleet_core::{Event, Lane, PushData};
    use uuid::Uuid;

    fn settings() -> RetrySettings {
        RetrySettings {
            jitter: 0.0,
            ..Default::default()
        }
    }

    fn topology() -> Topology {
        Topology::new(&RabbitSettings::default())
    }

    fn job(deadline_ms: u64) -> Job {
        Job {
            v: 1,
            id: Uuid::new_v4(),
            app_id: "a".into(),
            platform: Platform::Apple,
            event: Event::Message,
            lane: Lane::Messages,
            received_at_ms: 0,
            deadline_ms,
            attempt: 0,
            push: PushData::default(),
            api_key_id: None,
            handling: Default::default(),
            reply: false,
        }
    }

    #[test]
    fn delays_grow_exponentially_up_to_the_cap() {
        let s = settings();
        let delays: Vec<u64> = (1..=12)
            .map(|n| backoff_delay(&s, n).as_millis() as u64)
            .collect();
        assert_eq!(&delays[..4], &[1000, 2000, 4000, 8000]);
        assert_eq!(delays[11], 300_000);
    }

    #[test]
    fn jitter_stays_within_its_band() {
        let s = RetrySettings {
            jitter: 0.3,
            ..Default::default()
        };
        for _ in 0..100 {
            let d = backoff_delay(&s, 3).as_millis() as u64;
            assert!((2800..=5200).contains(&d), "{d}");
        }
    }

    #[test]
    fn delays_round_up_to_a_tier() {
        let (s, t) = (settings(), topology());
        let j = job(u64::MAX);
        assert_eq!(plan(&s, &t, &j, 1, None, 0), RetryPlan::WaitInTier(1000));
        assert_eq!(plan(&s, &t, &j, 3, None, 0), RetryPlan::WaitInTier(5000));
    }

    #[test]
    fn retry_after_wins_when_longer() {
        let (s, t) = (settings(), topology());
        let j = job(u64::MAX);
        let plan = plan(&s, &t, &j, 1, Some(Duration::from_secs(3)), 0);
        assert_eq!(plan, RetryPlan::WaitInTier(5000));
    }

    #[test]
    fn the_deadline_bounds_every_wait() {
        let (s, t) = (settings(), topology());
        // 4 s back-off, 3 s left: the 2 s tier still fits.
        assert_eq!(
            plan(&s, &t, &job(3_000), 3, None, 0),
            RetryPlan::WaitInTier(2000)
        );
        // Nothing fits in 500 ms.
        assert!(matches!(
            plan(&s, &t, &job(500), 1, None, 0),
            RetryPlan::GiveUp(DeliveryStatus::Expired, _)
        ));
        // A Retry-After beyond the deadline is not shortened.
        assert!(matches!(
            plan(&s, &t, &job(3_000), 1, Some(Duration::from_secs(4)), 0),
            RetryPlan::GiveUp(DeliveryStatus::Expired, _)
        ));
    }

    #[test]
    fn attempts_are_bounded() {
        let (s, t) = (settings(), topology());
        assert!(matches!(
            plan(&s, &t, &job(u64::MAX), 8, None, 0),
            RetryPlan::GiveUp(DeliveryStatus::Failed, _)
        ));
    }
}
