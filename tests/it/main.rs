//! pushfleet's integration suite: the real ingest and worker against the machine's RabbitMQ and
//! Postgres and the fake providers. Each test runs in its own namespace; `ops/test` gives the
//! whole run its own virtual host and database.

mod bad_input;
mod broker_outage;
mod connections;
mod delivery;
mod lifecycle;
mod startup;
mod support;
mod v1_push;
