//! Flexisip's per-contact push options, as Linphone puts them in its Contact next to the RFC 8599
//! parameters: the alert strings and sounds of the contact (`pn-call-str`, `pn-msg-snd`…), how
//! long to hold a call's push back (`pn-timeout`), how often to ring an iOS device without a VoIP
//! token (`pn-call-remote-push-interval`). They come with an RFC 8599 push, or are stored with a
//! v2 device registered through RFC 8599 parameters, and shape the job.

use std::collections::HashMap;
use std::time::Duration;

use pushfleet_core::job::{ContactStrings, Job, Ringing};
use pushfleet_core::ledger::{cancel_key, LedgerEntry};
use pushfleet_core::policy::{EventPolicies, MAX_REMOTE_PUSH_INTERVAL_SECS};
use pushfleet_core::{Event, Platform};

use crate::error::ApiError;
use crate::limits;

const TIMEOUT: &str = "pn-timeout";
const REMOTE_PUSH_INTERVAL: &str = "pn-call-remote-push-interval";
/// The longest a call's push may be held back (Flexisip's call fork timeout is 90 s by default;
/// the TTL bounds it further).
pub const MAX_TIMEOUT_SECS: u64 = 90;

/// The options of one device.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct CallOptions {
    pub strings: ContactStrings,
    /// `pn-timeout`: seconds a call's push waits before it is sent.
    pub timeout_secs: Option<u64>,
    /// `pn-call-remote-push-interval`: overrides `[events.incoming_session]
    /// remote_push_interval_secs` for this device.
    pub remote_push_interval_secs: Option<u64>,
    /// An iOS device without a VoIP token: calls ring it by alerts.
    pub remote_only: bool,
    /// The token a cancel of a call goes to, when not the push's own.
    pub cancel_token: Option<String>,
    /// A message to a group chat (`group-chat`): it shows `pn-groupchat-str`.
    pub group_chat: bool,
}

impl CallOptions {
    /// Every parameter these options are read from.
    pub const PARAMS: [&'static str; 10] = [
        "pn-call-str",
        "pn-msg-str",
        "pn-groupchat-str",
        "pn-missing-call-str",
        "pn-call-accepted-elsewhere-str",
        "pn-call-declined-elsewhere-str",
        "pn-call-snd",
        "pn-msg-snd",
        TIMEOUT,
        REMOTE_PUSH_INTERVAL,
    ];

    /// Reads the options from RFC 8599 parameters (lower-case names, decoded values).
    pub fn from_params(params: &HashMap<String, String>) -> Result<CallOptions, ApiError> {
        let mut options = CallOptions::default();
        for name in ContactStrings::PARAMS {
            let Some(value) = params.get(name).filter(|v| !v.is_empty()) else {
                continue;
            };
            limits::check(&limits::pn_string(name), value)?;
            if let Some(slot) = options.strings.slot(name) {
                *slot = Some(value.clone());
            }
        }
        options.timeout_secs = seconds(
            params,
            TIMEOUT,
            MAX_TIMEOUT_SECS,
            "must be whole seconds from 0 to 90",
        )?;
        options.remote_push_interval_secs = seconds(
            params,
            REMOTE_PUSH_INTERVAL,
            MAX_REMOTE_PUSH_INTERVAL_SECS,
            "must be whole seconds from 0 (a single alert) to 30",
        )?;
        Ok(options)
    }

    /// Shapes a job built from a validated push: its strings, and for a call its hold and its
    /// ringing by alerts. Returns the ledger entry that tells workers the push is held back.
    pub fn apply(
        &self,
        job: &mut Job,
        policies: &EventPolicies,
    ) -> Result<Option<LedgerEntry>, ApiError> {
        job.push.strings = self.strings.clone();
        job.push.group_chat = self.group_chat && job.event == Event::Message;
        if !job.event.is_incoming_call() {
            return Ok(None);
        }
        if job.platform == Platform::Apple && self.remote_only {
            let interval = self
                .remote_push_interval_secs
                .map(Duration::from_secs)
                .unwrap_or(policies.get(Event::IncomingSession).remote_push_interval);
            job.handling.ringing = Some(Ringing {
                interval_ms: interval.as_millis() as u64,
                rings: 0,
                ended: None,
            });
        }
        let Some(secs) = self.timeout_secs.filter(|secs| *secs > 0) else {
            return Ok(None);
        };
        let until_ms = job.received_at_ms + secs * 1000;
        if until_ms >= job.deadline_ms {
            return Err(ApiError::InvalidField {
                field: TIMEOUT,
                problem: "must be shorter than the call's TTL",
            });
        }
        job.handling.hold_until_ms = Some(until_ms);
        let cancel_token = self.cancel_token.as_deref().unwrap_or(&job.push.token);
        Ok(Some(LedgerEntry::Held {
            key: cancel_key(&job.app_id, job.platform, cancel_token, &job.push.call_id),
            from_ms: job.received_at_ms,
            until_ms,
        }))
    }
}

/// A whole number of seconds within `0..=max`, as a parameter gives it.
fn seconds(
    params: &HashMap<String, String>,
    name: &'static str,
    max: u64,
    problem: &'static str,
) -> Result<Option<u64>, ApiError> {
    let Some(text) = params.get(name).filter(|v| !v.is_empty()) else {
        return Ok(None);
    };
    match text.parse::<u64>() {
        Ok(secs) if secs <= max => Ok(Some(secs)),
        _ => Err(ApiError::InvalidField {
            field: name,
            problem,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use pushfleet_core::job::PushData;
    use pushfleet_core::Lane;
    use uuid::Uuid;

    fn params(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn call(platform: Platform) -> Job {
        Job {
            v: 1,
            id: Uuid::new_v4(),
            app_id: "a".into(),
            platform,
            event: Event::IncomingSession,
            lane: Lane::Calls,
            received_at_ms: 1_000,
            deadline_ms: 61_000,
            attempt: 0,
            push: PushData {
                token: "voip".into(),
                call_id: "c".into(),
                ..Default::default()
            },
            api_key_id: None,
            handling: Default::default(),
            reply: false,
        }
    }

    #[test]
    fn strings_and_numbers_are_read_and_checked() {
        let options = CallOptions::from_params(&params(&[
            ("pn-call-str", "MY_CALL"),
            ("pn-msg-snd", "msg.caf"),
            ("pn-timeout", "5"),
            ("pn-call-remote-push-interval", "2"),
        ]))
        .unwrap();
        assert_eq!(options.strings.call_str.as_deref(), Some("MY_CALL"));
        assert_eq!(options.strings.msg_snd.as_deref(), Some("msg.caf"));
        assert_eq!(
            (options.timeout_secs, options.remote_push_interval_secs),
            (Some(5), Some(2))
        );
        for bad in [
            ("pn-timeout", "-1"),
            ("pn-timeout", "91"),
            ("pn-call-remote-push-interval", "31"),
            ("pn-call-remote-push-interval", "1.5"),
        ] {
            let e = CallOptions::from_params(&params(&[bad])).unwrap_err();
            assert_eq!(e.status().as_u16(), 400, "{bad:?}");
            assert!(e.to_string().ends_with(bad.0), "{e}");
        }
        let long = "x".repeat(257);
        assert!(CallOptions::from_params(&params(&[("pn-call-str", &long)])).is_err());
        assert!(CallOptions::from_params(&params(&[("pn-msg-str", "a\u{1}b")])).is_err());
    }

    #[test]
    fn a_remote_only_ios_call_rings_by_alerts_and_a_timeout_holds_it() {
        let policies = EventPolicies::default();
        let options = CallOptions {
            remote_only: true,
            remote_push_interval_secs: Some(2),
            timeout_secs: Some(3),
            cancel_token: Some("remote".into()),
            ..Default::default()
        };
        let mut job = call(Platform::Apple);
        let held = options.apply(&mut job, &policies).unwrap();
        assert_eq!(job.handling.ringing.as_ref().unwrap().interval_ms, 2000);
        assert_eq!(job.handling.hold_until_ms, Some(4_000));
        assert_eq!(
            held,
            Some(LedgerEntry::Held {
                key: cancel_key("a", Platform::Apple, "remote", "c"),
                from_ms: 1_000,
                until_ms: 4_000,
            })
        );
        // Android has no such thing; a message is never held.
        let mut android = call(Platform::Firebase);
        options.apply(&mut android, &policies).unwrap();
        assert!(android.handling.ringing.is_none());
        let mut message = call(Platform::Apple);
        message.event = Event::Message;
        assert_eq!(options.apply(&mut message, &policies).unwrap(), None);
        assert!(message.handling.is_plain());
        // A hold as long as the TTL would never ring.
        let too_long = CallOptions {
            timeout_secs: Some(60),
            ..Default::default()
        };
        assert!(too_long
            .apply(&mut call(Platform::Apple), &policies)
            .is_err());
    }
}
