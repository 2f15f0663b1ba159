//! pushfleet's integration suite: the real ingest and worker against the machine's RabbitMQ and
//! Postgres and the fake providers. Each test runs in its own namespace; `ops/test` gives the
//! whole run its own virtual host and database.

mod api_keys;
mod audit_query;
mod bad_input;
mod batches;
mod broker_outage;
mod calls;
mod client;
mod connections;
mod delivery;
mod egress;
mod exposure;
mod failover;
mod http_limits;
mod import;
mod lifecycle;
mod limits;
mod metric_names;
mod operations;
mod outcomes;
mod remote_log;
mod retention;
mod rfc8599;
mod startup;
mod support;
mod tls;
mod v1_push;
mod v2_tokens;
mod wakeups;
mod webpush;
mod xmpp;
