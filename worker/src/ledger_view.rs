//! The worker's view of the ledger stream (see `pushfleet_core::ledger`): which calls were
//! cancelled and which dedupe keys are claimed, by any worker. Reading starts far enough in the
//! past to cover every window, so a worker that starts or reconnects late knows what happened.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use futures_util::StreamExt;
use lapin::options::{BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions};
use lapin::types::{AMQPValue, FieldTable};
use lapin::BasicProperties;
use pushfleet_core::clock::{now_ms, unix_secs};
use pushfleet_core::job::Job;
use pushfleet_core::ledger::{cancel_key, dedupe_key, Claim, Concluded, LedgerEntry};
use pushfleet_core::topology::{BrokerError, PERSISTENT};
use pushfleet_core::{Event, EventPolicies, Topology};
use tokio::sync::watch;
use tracing::{debug, warn};
use uuid::Uuid;

use crate::links::Links;

/// Claims are published in small batches: one ledger message per flush, not one per push.
const CLAIM_FLUSH: Duration = Duration::from_millis(5);
/// How long the concluded jobs of a batch message are remembered: a batch comes back when its
/// worker's connection drops (at once when the process dies, within two heartbeats when the
/// network does) or when it is requeued, well within this.
const CONCLUDED_KEPT: Duration = Duration::from_secs(300);
/// The replay from the stream is over once it has been quiet this long.
const CAUGHT_UP_AFTER: Duration = Duration::from_millis(200);

/// Whether a job may be sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Send,
    /// A cancel for the call was accepted after this push.
    Cancelled,
    /// The same push was accepted before and is (being) delivered as this job.
    Duplicate(Uuid),
}

pub struct LedgerView {
    topology: Topology,
    policies: EventPolicies,
    /// How long a cancel matters: the longest incoming-call TTL.
    cancel_window_ms: u64,
    /// How far back a (re)connecting worker reads.
    replay: Duration,
    state: Mutex<State>,
    caught_up: watch::Sender<bool>,
}

#[derive(Default)]
struct State {
    /// call-id → the latest cancel's acceptance time and reason.
    cancels: HashMap<String, (u64, Option<String>)>,
    /// cancel key → (held from, held until): pushes held back by `pn-timeout`.
    held: HashMap<u64, (u64, u64)>,
    /// dedupe key → (claiming job, claim expiry).
    claims: HashMap<u64, (Uuid, u64)>,
    /// Our claims not yet published.
    unpublished: Vec<Claim>,
    /// batch message → (remembered until, the indexes of its concluded jobs).
    concluded: HashMap<Uuid, (u64, Vec<u16>)>,
    /// Our conclusions not yet published.
    unpublished_concluded: Vec<Concluded>,
    pruned_at_ms: u64,
}

impl LedgerView {
    pub fn new(topology: Topology, policies: EventPolicies) -> LedgerView {
        let longest = |f: &dyn Fn(Event) -> Duration| Event::ALL.into_iter().map(f).max();
        let cancel_window = longest(&|e| {
            if e.is_incoming_call() {
                policies.get(e).ttl
            } else {
                Duration::ZERO
            }
        })
        .unwrap_or_default();
        let dedupe_window = longest(&|e| policies.get(e).dedupe_window).unwrap_or_default();
        LedgerView {
            topology,
            policies,
            cancel_window_ms: cancel_window.as_millis() as u64,
            replay: cancel_window.max(dedupe_window) + Duration::from_secs(5),
            state: Mutex::new(State::default()),
            caught_up: watch::channel(false).0,
        }
    }

    /// Decides whether `job` may be sent now and, if so, claims its dedupe key.
    pub fn check(&self, job: &Job, now: u64) -> Verdict {
        let mut state = self.state.lock().expect("ledger lock");
        if job.event.is_incoming_call() {
            if let Some(&(cancelled_at, _)) = state.cancels.get(&job.push.call_id) {
                if cancelled_at >= job.received_at_ms {
                    return Verdict::Cancelled;
                }
            }
        }
        let window = self.policies.get(job.event).dedupe_window.as_millis() as u64;
        if window == 0 {
            return Verdict::Send;
        }
        let key = dedupe_key(job);
        if let Some(&(holder, until)) = state.claims.get(&key) {
            if holder != job.id && until > now {
                return Verdict::Duplicate(holder);
            }
        }
        let claim = Claim {
            key,
            job_id: job.id,
            until_ms: job.received_at_ms + window,
        };
        state.claims.insert(key, (claim.job_id, claim.until_ms));
        state.unpublished.push(claim);
        Verdict::Send
    }

    /// Notes that job number `index` of the batch message `batch` is concluded (its outcome is
    /// safe), for whichever worker gets the batch again.
    pub fn conclude(&self, batch: Uuid, index: u16) {
        let until_ms = now_ms() + CONCLUDED_KEPT.as_millis() as u64;
        let mut state = self.state.lock().expect("ledger lock");
        note_concluded(&mut state.concluded, batch, index, until_ms);
        state.unpublished_concluded.push(Concluded {
            batch,
            index,
            until_ms,
        });
    }

    /// The indexes of the jobs of `batch` that some worker already concluded.
    pub fn concluded(&self, batch: Uuid) -> Vec<u16> {
        let state = self.state.lock().expect("ledger lock");
        state
            .concluded
            .get(&batch)
            .map(|(_, jobs)| jobs.clone())
            .unwrap_or_default()
    }

    /// The reason of the latest cancel of `call_id`, when one was accepted.
    pub fn cancel_reason(&self, call_id: &str) -> Option<Option<String>> {
        let state = self.state.lock().expect("ledger lock");
        state.cancels.get(call_id).map(|(_, reason)| reason.clone())
    }

    /// Whether `cancel` ends a call whose push to this device was still held back when the
    /// cancel came: the device never rang, so it needs no cancel either.
    pub fn ends_a_held_call(&self, cancel: &Job) -> bool {
        let key = cancel_key(
            &cancel.app_id,
            cancel.platform,
            &cancel.push.token,
            &cancel.push.call_id,
        );
        let state = self.state.lock().expect("ledger lock");
        state
            .held
            .get(&key)
            .is_some_and(|&(from, until)| (from..until).contains(&cancel.received_at_ms))
    }

    fn apply(&self, entry: LedgerEntry) {
        let mut state = self.state.lock().expect("ledger lock");
        let now = now_ms();
        match entry {
            LedgerEntry::Cancel {
                call_id,
                at_ms,
                reason,
            } => {
                let latest = state
                    .cancels
                    .entry(call_id)
                    .or_insert((at_ms, reason.clone()));
                if at_ms >= latest.0 {
                    *latest = (at_ms, reason);
                }
            }
            LedgerEntry::Held {
                key,
                from_ms,
                until_ms,
            } => {
                state.held.insert(key, (from_ms, until_ms));
            }
            LedgerEntry::Claims { claims } => {
                for claim in claims {
                    if claim.until_ms <= now {
                        continue;
                    }
                    // The first claim stands; a later one for the same key lost the race.
                    let current = state
                        .claims
                        .entry(claim.key)
                        .or_insert((claim.job_id, claim.until_ms));
                    if current.1 <= now {
                        *current = (claim.job_id, claim.until_ms);
                    }
                }
            }
            LedgerEntry::Concluded { jobs } => {
                for job in jobs {
                    if job.until_ms > now {
                        note_concluded(&mut state.concluded, job.batch, job.index, job.until_ms);
                    }
                }
            }
        }
        if now >= state.pruned_at_ms + 1000 {
            let window = self.cancel_window_ms;
            state.cancels.retain(|_, (at, _)| *at + window > now);
            state.held.retain(|_, (_, until)| *until + window > now);
            state.claims.retain(|_, (_, until)| *until > now);
            state.concluded.retain(|_, (until, _)| *until > now);
            state.pruned_at_ms = now;
            record_size(&state);
        }
    }

    /// Resolves once the replay of the recent past is done (or after `limit`).
    pub async fn wait_caught_up(&self, limit: Duration) {
        let mut caught_up = self.caught_up.subscribe();
        let _ = tokio::time::timeout(limit, caught_up.wait_for(|c| *c)).await;
    }

    /// Follows the stream and publishes our claims, until the connection fails or `shutdown`.
    pub async fn run(
        &self,
        links: &Links,
        mut shutdown: watch::Receiver<bool>,
    ) -> Result<(), BrokerError> {
        self.caught_up.send_replace(false);
        let channel = links.consume.create_channel().await?;
        // Streams require a prefetch and manual acks (which only grant credit).
        channel.basic_qos(1000, BasicQosOptions::default()).await?;
        let from = unix_secs().saturating_sub(self.replay.as_secs());
        let mut args = FieldTable::default();
        args.insert("x-stream-offset".into(), AMQPValue::Timestamp(from));
        let mut entries = channel
            .basic_consume(
                self.topology.ledger_queue().into(),
                "".into(),
                BasicConsumeOptions::default(),
                args,
            )
            .await?;
        let publisher = links.publish.create_channel().await?;
        let mut flush = tokio::time::interval(CLAIM_FLUSH);
        flush.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let quiet = tokio::time::sleep(CAUGHT_UP_AFTER);
        tokio::pin!(quiet);
        loop {
            tokio::select! {
                next = entries.next() => match next {
                    Some(Ok(delivery)) => {
                        match serde_json::from_slice::<LedgerEntry>(&delivery.data) {
                            Ok(entry) => self.apply(entry),
                            Err(e) => debug!(error = %e, "unreadable ledger entry skipped"),
                        }
                        delivery.ack(BasicAckOptions::default()).await?;
                        if !*self.caught_up.borrow() {
                            quiet.as_mut().reset(tokio::time::Instant::now() + CAUGHT_UP_AFTER);
                        }
                    }
                    Some(Err(e)) => return Err(e.into()),
                    None => return Ok(()),
                },
                _ = &mut quiet, if !*self.caught_up.borrow() => {
                    self.caught_up.send_replace(true);
                }
                _ = flush.tick() => {
                    let (claims, concluded) = {
                        let mut state = self.state.lock().expect("ledger lock");
                        if !state.unpublished.is_empty() {
                            record_size(&state);
                        }
                        (
                            std::mem::take(&mut state.unpublished),
                            std::mem::take(&mut state.unpublished_concluded),
                        )
                    };
                    // Best effort: a lost claim batch only narrows duplicate detection, a lost
                    // conclusion only lets a redelivered batch send that job once more.
                    if !claims.is_empty() {
                        let entry = LedgerEntry::Claims { claims };
                        if let Err(e) = self.publish(&publisher, &entry).await {
                            warn!(error = %e, "dedupe claims not published");
                        }
                    }
                    if !concluded.is_empty() {
                        let entry = LedgerEntry::Concluded { jobs: concluded };
                        if let Err(e) = self.publish(&publisher, &entry).await {
                            warn!(error = %e, "concluded jobs not published");
                        }
                    }
                }
                _ = shutdown.changed() => return Ok(()),
            }
        }
    }
}

/// What the view holds, as `pushfleet_ledger_entries{kind}` (at each pruning and each flush of
/// our claims): every worker reads the whole stream, so this grows with the fleet's rate, not
/// the worker's own.
fn record_size(state: &State) {
    for (kind, len) in [
        ("claims", state.claims.len()),
        ("cancels", state.cancels.len()),
        ("held", state.held.len()),
    ] {
        metrics::gauge!("pushfleet_ledger_entries", "kind" => kind).set(len as f64);
    }
}

/// The HELP text of the view's gauge.
pub fn describe() {
    metrics::describe_gauge!(
        "pushfleet_ledger_entries",
        "Entries the worker's view of the ledger holds, by kind (claims, cancels, held), as of its last pruning or claim flush"
    );
}

impl LedgerView {
    async fn publish(
        &self,
        publisher: &lapin::Channel,
        entry: &LedgerEntry,
    ) -> Result<(), BrokerError> {
        let body = serde_json::to_vec(entry)?;
        publisher
            .basic_publish(
                "".into(),
                self.topology.ledger_queue().into(),
                BasicPublishOptions::default(),
                &body,
                BasicProperties::default().with_delivery_mode(PERSISTENT),
            )
            .await?;
        Ok(())
    }
}

fn note_concluded(
    concluded: &mut HashMap<Uuid, (u64, Vec<u16>)>,
    batch: Uuid,
    index: u16,
    until_ms: u64,
) {
    let (until, jobs) = concluded.entry(batch).or_insert((until_ms, Vec::new()));
    *until = (*until).max(until_ms);
    if !jobs.contains(&index) {
        jobs.push(index);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use pushfleet_core::config::{Platform, RabbitSettings};
    use pushfleet_core::{Lane, PushData};

    fn ledger() -> LedgerView {
        LedgerView::new(
            Topology::new(&RabbitSettings::default()),
            EventPolicies::default(),
        )
    }

    fn job(event: Event, call_id: &str, received_at_ms: u64) -> Job {
        Job {
            v: 1,
            id: Uuid::new_v4(),
            app_id: "a".into(),
            platform: Platform::Apple,
            event,
            lane: Lane::Calls,
            received_at_ms,
            deadline_ms: received_at_ms + 60_000,
            attempt: 0,
            push: PushData {
                token: "tok".into(),
                call_id: call_id.into(),
                ..Default::default()
            },
            api_key_id: None,
            handling: Default::default(),
            reply: false,
        }
    }

    #[test]
    fn a_cancel_supersedes_earlier_incoming_pushes_only() {
        let l = ledger();
        let now = now_ms();
        l.apply(LedgerEntry::Cancel {
            call_id: "c1".into(),
            at_ms: now,
            reason: Some("answered_elsewhere".into()),
        });
        assert_eq!(
            l.cancel_reason("c1"),
            Some(Some("answered_elsewhere".to_string()))
        );
        assert_eq!(
            l.check(&job(Event::IncomingSession, "c1", now - 10), now),
            Verdict::Cancelled
        );
        // A later call reusing the id rings; other calls and the cancel itself go out.
        assert_eq!(
            l.check(&job(Event::IncomingSession, "c1", now + 10), now),
            Verdict::Send
        );
        assert_eq!(
            l.check(&job(Event::IncomingConferenceRequest, "c2", now), now),
            Verdict::Send
        );
        assert_eq!(l.check(&job(Event::Cancel, "c1", now), now), Verdict::Send);
    }

    #[test]
    fn the_second_of_two_identical_pushes_is_a_duplicate() {
        let l = ledger();
        let now = now_ms();
        let first = job(Event::IncomingSession, "c1", now);
        let mut second = job(Event::IncomingSession, "c1", now + 5);
        assert_eq!(l.check(&first, now), Verdict::Send);
        // The first job may come back (a retry, a redelivery): still itself.
        assert_eq!(l.check(&first, now), Verdict::Send);
        assert_eq!(l.check(&second, now), Verdict::Duplicate(first.id));
        second.push.token = "other".into();
        assert_eq!(l.check(&second, now), Verdict::Send);
    }

    #[test]
    fn concluded_jobs_of_a_batch_are_known_to_every_worker() {
        let ours = ledger();
        let batch = Uuid::new_v4();
        ours.conclude(batch, 0);
        ours.conclude(batch, 3);
        ours.conclude(batch, 3);
        assert_eq!(ours.concluded(batch), vec![0, 3]);
        assert!(ours.concluded(Uuid::new_v4()).is_empty());
        // What ours publishes, another worker applies.
        let published = std::mem::take(&mut ours.state.lock().unwrap().unpublished_concluded);
        assert_eq!(published.len(), 3);
        let theirs = ledger();
        theirs.apply(LedgerEntry::Concluded { jobs: published });
        assert_eq!(theirs.concluded(batch), vec![0, 3]);
        // Past their time they are forgotten.
        theirs.apply(LedgerEntry::Concluded {
            jobs: vec![Concluded {
                batch: Uuid::new_v4(),
                index: 1,
                until_ms: now_ms() - 1,
            }],
        });
        assert_eq!(theirs.state.lock().unwrap().concluded.len(), 1);
    }

    #[test]
    fn claims_from_other_workers_count() {
        let l = ledger();
        let now = now_ms();
        let theirs = job(Event::Message, "m1", now);
        l.apply(LedgerEntry::Claims {
            claims: vec![Claim {
                key: dedupe_key(&theirs),
                job_id: theirs.id,
                until_ms: now + 60_000,
            }],
        });
        let ours = job(Event::Message, "m1", now + 1);
        assert_eq!(l.check(&ours, now), Verdict::Duplicate(theirs.id));
    }
}
