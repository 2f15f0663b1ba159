//! The event policy: which lane an event travels in, how long it stays worth delivering, and how
//! APNs should treat it. One table, defaults documented in README.md, every value overridable in `[events]`.

use std::fmt;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::config::ConfigError;

/// A push event as the Sylk API names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Event {
    IncomingSession,
    IncomingConferenceRequest,
    Cancel,
    Message,
    Transfer,
    /// A background push that makes the app register again; pushfleet's own, not a Sylk event.
    Wakeup,
}

impl Event {
    pub const ALL: [Event; 6] = [
        Event::IncomingSession,
        Event::IncomingConferenceRequest,
        Event::Cancel,
        Event::Message,
        Event::Transfer,
        Event::Wakeup,
    ];

    /// Parses the wire name. `incoming_conference` is what the reference's README documents;
    /// its code only knows `incoming_conference_request`. Both mean the same event.
    pub fn parse(name: &str) -> Option<Event> {
        match name {
            "incoming_session" => Some(Event::IncomingSession),
            "incoming_conference_request" | "incoming_conference" => {
                Some(Event::IncomingConferenceRequest)
            }
            "cancel" => Some(Event::Cancel),
            "message" => Some(Event::Message),
            "transfer" => Some(Event::Transfer),
            _ => None,
        }
    }

    /// Every event a configuration may name in `[events.<name>]`: the API's and `wakeup`.
    pub fn parse_configured(name: &str) -> Option<Event> {
        match name {
            "wakeup" => Some(Event::Wakeup),
            _ => Event::parse(name),
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Event::IncomingSession => "incoming_session",
            Event::IncomingConferenceRequest => "incoming_conference_request",
            Event::Cancel => "cancel",
            Event::Message => "message",
            Event::Transfer => "transfer",
            Event::Wakeup => "wakeup",
        }
    }

    /// The events that ring a phone: what a cancel supersedes.
    pub fn is_incoming_call(self) -> bool {
        matches!(
            self,
            Event::IncomingSession | Event::IncomingConferenceRequest
        )
    }

    fn index(self) -> usize {
        self as usize
    }
}

impl fmt::Display for Event {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Calls must never wait behind messages, so they travel in a queue of their own.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Lane {
    Calls,
    Messages,
}

impl Lane {
    pub const ALL: [Lane; 2] = [Lane::Calls, Lane::Messages];

    pub fn as_str(self) -> &'static str {
        match self {
            Lane::Calls => "calls",
            Lane::Messages => "messages",
        }
    }
}

impl fmt::Display for Lane {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The `apns-push-type` values pushfleet sends.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ApnsPushType {
    Voip,
    Background,
    Alert,
}

impl ApnsPushType {
    pub fn as_str(self) -> &'static str {
        match self {
            ApnsPushType::Voip => "voip",
            ApnsPushType::Background => "background",
            ApnsPushType::Alert => "alert",
        }
    }
}

/// What pushfleet does with one event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EventPolicy {
    pub lane: Lane,
    /// How long after acceptance a push is still worth delivering; enforced by the broker, by the
    /// worker before each send and by the provider.
    pub ttl: Duration,
    pub apns_push_type: ApnsPushType,
    pub apns_priority: u8,
    /// The same (app, token, event, call-id) accepted again within this window is a duplicate:
    /// delivered once. Never longer than the TTL; zero turns duplicate suppression off.
    pub dedupe_window: Duration,
    /// `incoming_session` only: an iOS device without a VoIP token is rung by an alert push
    /// repeated this often until the call ends; zero sends a single alert.
    pub remote_push_interval: Duration,
}

/// How long a duplicate is recognised by default: the whole TTL for calls, five minutes for
/// messages (SIP retransmissions stop after 32 s; a day of keys would not fit in memory).
const MAX_DEFAULT_DEDUPE: Duration = Duration::from_secs(300);

/// Overrides for one event, as written in `[events.<name>]`.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EventPolicyOverride {
    pub lane: Option<Lane>,
    pub ttl_secs: Option<u64>,
    pub apns_push_type: Option<ApnsPushType>,
    pub apns_priority: Option<u8>,
    pub dedupe_secs: Option<u64>,
    pub remote_push_interval_secs: Option<u64>,
}

/// The longest `remote_push_interval_secs`, as Flexisip bounds `call-remote-push-interval`.
pub const MAX_REMOTE_PUSH_INTERVAL_SECS: u64 = 30;

/// The policy for every event.
#[derive(Debug, Clone)]
pub struct EventPolicies {
    table: [EventPolicy; 6],
}

impl Default for EventPolicies {
    fn default() -> Self {
        let call = |push_type, priority| EventPolicy {
            lane: Lane::Calls,
            ttl: Duration::from_secs(60),
            apns_push_type: push_type,
            apns_priority: priority,
            dedupe_window: Duration::from_secs(60),
            remote_push_interval: Duration::ZERO,
        };
        let message = EventPolicy {
            lane: Lane::Messages,
            ttl: Duration::from_secs(24 * 3600),
            apns_push_type: ApnsPushType::Alert,
            apns_priority: 5,
            dedupe_window: MAX_DEFAULT_DEDUPE,
            remote_push_interval: Duration::ZERO,
        };
        // Housekeeping: never ahead of a message, worthless once the registration has expired;
        // repeated wake-ups are held back by the device's last wake-up in Postgres instead.
        let wakeup = EventPolicy {
            lane: Lane::Messages,
            ttl: Duration::from_secs(300),
            apns_push_type: ApnsPushType::Background,
            apns_priority: 5,
            dedupe_window: Duration::ZERO,
            remote_push_interval: Duration::ZERO,
        };
        // Indexed by `Event as usize`, in declaration order.
        EventPolicies {
            table: [
                call(ApnsPushType::Voip, 10),
                call(ApnsPushType::Voip, 10),
                call(ApnsPushType::Background, 5),
                message,
                message,
                wakeup,
            ],
        }
    }
}

impl EventPolicies {
    pub fn get(&self, event: Event) -> &EventPolicy {
        &self.table[event.index()]
    }

    /// Applies `[events.<name>]` overrides; unknown event names and out-of-range values are errors.
    pub fn with_overrides<'a>(
        mut self,
        overrides: impl IntoIterator<Item = (&'a String, &'a EventPolicyOverride)>,
    ) -> Result<Self, ConfigError> {
        for (name, o) in overrides {
            let key = |field: &str| format!("[events.{name}] {field}");
            let event = Event::parse_configured(name).ok_or_else(|| {
                ConfigError::invalid(
                    format!("[events.{name}]"),
                    "unknown event (known: incoming_session, incoming_conference_request, cancel, message, transfer, wakeup)",
                )
            })?;
            let policy = &mut self.table[event.index()];
            if let Some(lane) = o.lane {
                policy.lane = lane;
            }
            if let Some(ttl) = o.ttl_secs {
                // FCM refuses a ttl over four weeks; APNs stores for at most 30 days.
                if ttl == 0 || ttl > 2_419_200 {
                    return Err(ConfigError::invalid(
                        key("ttl_secs"),
                        format!("{ttl} must be between 1 and 2419200 (28 days)"),
                    ));
                }
                policy.ttl = Duration::from_secs(ttl);
                policy.dedupe_window = policy.ttl.min(MAX_DEFAULT_DEDUPE);
            }
            if let Some(push_type) = o.apns_push_type {
                policy.apns_push_type = push_type;
            }
            if let Some(priority) = o.apns_priority {
                if ![1, 5, 10].contains(&priority) {
                    return Err(ConfigError::invalid(
                        key("apns_priority"),
                        format!("{priority}: APNs accepts 10, 5 or 1"),
                    ));
                }
                policy.apns_priority = priority;
            }
            if let Some(secs) = o.dedupe_secs {
                if secs > policy.ttl.as_secs() {
                    return Err(ConfigError::invalid(
                        key("dedupe_secs"),
                        format!(
                            "{secs} must not exceed the TTL ({} s)",
                            policy.ttl.as_secs()
                        ),
                    ));
                }
                policy.dedupe_window = Duration::from_secs(secs);
            }
            if let Some(secs) = o.remote_push_interval_secs {
                if event != Event::IncomingSession {
                    return Err(ConfigError::invalid(
                        key("remote_push_interval_secs"),
                        "only [events.incoming_session] rings by repeated alerts",
                    ));
                }
                if secs > MAX_REMOTE_PUSH_INTERVAL_SECS {
                    return Err(ConfigError::invalid(
                        key("remote_push_interval_secs"),
                        format!(
                            "{secs} must be between 0 (off) and {MAX_REMOTE_PUSH_INTERVAL_SECS}"
                        ),
                    ));
                }
                policy.remote_push_interval = Duration::from_secs(secs);
            }
        }
        Ok(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_follow_the_design_table() {
        let p = EventPolicies::default();
        let s = p.get(Event::IncomingSession);
        assert_eq!(
            (s.lane, s.ttl.as_secs(), s.apns_push_type, s.apns_priority),
            (Lane::Calls, 60, ApnsPushType::Voip, 10)
        );
        let c = p.get(Event::Cancel);
        assert_eq!(
            (c.lane, c.apns_push_type, c.apns_priority),
            (Lane::Calls, ApnsPushType::Background, 5)
        );
        let m = p.get(Event::Transfer);
        assert_eq!((m.lane, m.ttl.as_secs()), (Lane::Messages, 86_400));
    }

    #[test]
    fn conference_alias_is_the_same_event() {
        assert_eq!(
            Event::parse("incoming_conference"),
            Event::parse("incoming_conference_request")
        );
        assert_eq!(Event::parse("incoming_sesion"), None);
    }

    #[test]
    fn overrides_are_validated() {
        let mut o = std::collections::BTreeMap::new();
        o.insert(
            "message".to_string(),
            EventPolicyOverride {
                ttl_secs: Some(600),
                ..Default::default()
            },
        );
        let p = EventPolicies::default().with_overrides(&o).unwrap();
        assert_eq!(p.get(Event::Message).ttl.as_secs(), 600);
        assert_eq!(p.get(Event::Message).dedupe_window.as_secs(), 300);

        o.insert("ring".to_string(), EventPolicyOverride::default());
        assert!(EventPolicies::default().with_overrides(&o).is_err());
    }
}
