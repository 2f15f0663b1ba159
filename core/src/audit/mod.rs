//! The audit trail for auditors: queries by any filter ([`query`]) and their CSV form
//! ([`csv`]), retention ([`retention`]) and erasure of a person ([`erase`]). One
//! implementation, used by ingest's `GET /audit`, the `pushfleet audit` command and the worker.

pub mod csv;
pub mod erase;
pub mod query;
pub mod retention;
