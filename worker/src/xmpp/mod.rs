//! The UnifiedPush-over-XMPP gateway (`[xmpp]`): every worker configured for it tries to hold
//! the XEP-0114 component; the XMPP server lets one connection at a time have it (a second one
//! gets the stream error `conflict`). The holder answers the distributors' register and
//! unregister IQs and consumes `<ns>.xmpp`, where ingest queues the pushes POSTed to `/UP`;
//! the others stand by, retrying, and one of them takes over when the holder goes. Meanwhile
//! pushes wait in RabbitMQ.

pub mod component;
mod gateway;
pub mod xml;

pub use gateway::run;
