//! The ledger: a RabbitMQ stream every worker reads, carrying what all of them must know about
//! pushes they may not hold themselves.
//!
//! - A **cancel** is written by ingest when it accepts a `cancel` push: any incoming-call push
//!   for that call-id accepted before it and not yet sent, queued or waiting for a retry on any
//!   worker, ends `cancelled` instead of ringing the phone.
//! - A **claim** is written by a worker about to send a job: the same (app, token, event,
//!   call-id) sent again within the event's dedupe window is a duplicate.
//!
//! - A **conclusion** is written by a worker for each job of a batch message whose outcome is
//!   safe while the rest of the batch is still being handled: should the worker die before the
//!   batch is acked, the worker that gets it again skips the jobs already concluded.
//!
//! A stream, not a queue: a worker that starts late replays the recent past from a timestamp.

use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::config::Platform;
use crate::job::Job;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum LedgerEntry {
    /// A cancel for `call_id` accepted at `at_ms`. It supersedes the incoming pushes of that
    /// call accepted before it, which all expire within one incoming-call TTL of it.
    Cancel {
        call_id: String,
        at_ms: u64,
        /// The cancel's `reason`: how a call rung by alerts ended (see `job::CallEnd`).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        reason: Option<String>,
    },
    /// A call's push to a device held back until `until_ms` (`pn-timeout`), accepted at
    /// `from_ms`: a cancel for that device accepted in between finds nothing rung and is not
    /// sent either. `key` is the [`cancel_key`] of the device's cancel.
    Held {
        key: u64,
        from_ms: u64,
        until_ms: u64,
    },
    /// Jobs a worker has started sending, batched.
    Claims { claims: Vec<Claim> },
    /// Jobs of batch messages whose outcomes are safe with the broker, batched.
    Concluded { jobs: Vec<Concluded> },
}

/// "Job number `index` of the batch message `batch` is concluded; the batch may come back
/// until `until_ms`."
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Concluded {
    pub batch: Uuid,
    pub index: u16,
    pub until_ms: u64,
}

/// "Job `job_id` holds dedupe key `key` until `until_ms`."
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Claim {
    pub key: u64,
    pub job_id: Uuid,
    pub until_ms: u64,
}

/// The dedupe key of a job: (app, platform, token, event, call-id), hashed to 64 bits with
/// SHA-256 so that every process computes the same key.
pub fn dedupe_key(job: &Job) -> u64 {
    key_of([
        job.app_id.as_str(),
        job.platform.as_str(),
        job.push.token.as_str(),
        job.event.as_str(),
        job.push.call_id.as_str(),
    ])
}

/// The key of the cancel a device would get for a call: (app, platform, the token a cancel goes
/// to, call-id). Ingest writes it for a held push; a worker computes it from the cancel job.
pub fn cancel_key(app_id: &str, platform: Platform, cancel_token: &str, call_id: &str) -> u64 {
    key_of([app_id, platform.as_str(), cancel_token, "cancel", call_id])
}

fn key_of(parts: [&str; 5]) -> u64 {
    let mut context = ring::digest::Context::new(&ring::digest::SHA256);
    for part in parts {
        context.update(part.as_bytes());
        // A separator that cannot occur in any part, so ("ab","c") and ("a","bc") differ.
        context.update(&[0]);
    }
    let digest = context.finish();
    let mut bytes = [0u8; 8];
    bytes.copy_from_slice(&digest.as_ref()[..8]);
    u64::from_be_bytes(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::job::PushData;
    use crate::policy::{Event, Lane};

    fn job(token: &str, event: Event, call_id: &str) -> Job {
        Job {
            v: 1,
            id: Uuid::new_v4(),
            app_id: "app".into(),
            platform: Platform::Apple,
            event,
            lane: Lane::Calls,
            received_at_ms: 1,
            deadline_ms: 2,
            attempt: 0,
            push: PushData {
                token: token.into(),
                call_id: call_id.into(),
                ..Default::default()
            },
            api_key_id: None,
            handling: Default::default(),
            reply: false,
        }
    }

    #[test]
    fn the_key_ignores_the_job_id_but_not_the_fields() {
        let a = job("tok", Event::IncomingSession, "call-1");
        let b = job("tok", Event::IncomingSession, "call-1");
        assert_ne!(a.id, b.id);
        assert_eq!(dedupe_key(&a), dedupe_key(&b));
        assert_ne!(
            dedupe_key(&a),
            dedupe_key(&job("tok", Event::Cancel, "call-1"))
        );
        assert_ne!(
            dedupe_key(&a),
            dedupe_key(&job("tok", Event::IncomingSession, "call-2"))
        );
        assert_ne!(
            dedupe_key(&job("ab", Event::Message, "c")),
            dedupe_key(&job("a", Event::Message, "bc"))
        );
    }

    #[test]
    fn entries_have_a_stable_wire_form() {
        let entry = LedgerEntry::Cancel {
            call_id: "c".into(),
            at_ms: 1,
            reason: None,
        };
        let text = serde_json::to_string(&entry).unwrap();
        assert_eq!(text, r#"{"kind":"cancel","call_id":"c","at_ms":1}"#);
        assert_eq!(serde_json::from_str::<LedgerEntry>(&text).unwrap(), entry);
    }
}
