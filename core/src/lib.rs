//! pushfleet-core: what ingest and workers agree on — configuration, the event policy, the job
//! and outcome messages, the RabbitMQ topology, the Postgres schema and the token store.
#![forbid(unsafe_code)]

pub mod audit;
pub mod clock;
pub mod config;
pub mod db;
pub mod http;
pub mod job;
pub mod keys;
pub mod ledger;
pub mod logged;
pub mod policy;
pub mod reconnect;
pub mod reload;
pub mod service;
pub mod tls;
pub mod tokens;
pub mod topology;
pub mod wakeup;
pub mod webpush;
pub mod xmpp;

pub use config::{AppSettings, AppType, Platform, ResponseMode, Settings};
pub use job::{DeliveryStatus, Job, OutcomeEvent, PushData, SyncReply};
pub use policy::{Event, EventPolicies, EventPolicy, Lane};
pub use topology::Topology;
