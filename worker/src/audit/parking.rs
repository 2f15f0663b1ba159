//! Where the audit sink keeps what it cannot write: the exchange `<ns>.audit.dead`, whose
//! queue operators inspect (README, "Audit dead letters"). Each parked message carries the
//! error, is counted in `pushfleet_audit_rejected_total` and logged once.

use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Channel, Connection};
use pushfleet_core::topology::{self, BrokerError, Topology, PERSISTENT};
use tracing::warn;

use crate::outcomes::CONFIRM_TIMEOUT;

/// The header that says why a message was parked.
pub const ERROR_HEADER: &str = "x-pushfleet-error";

pub struct Parking {
    /// In confirm mode: a parked message is acked from the audit queue only once it is safe.
    channel: Channel,
    exchange: String,
}

impl Parking {
    pub async fn open(
        connection: &Connection,
        topology: &Topology,
    ) -> Result<Parking, BrokerError> {
        let channel = connection.create_channel().await?;
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await?;
        Ok(Parking {
            channel,
            exchange: topology.audit_dead_exchange(),
        })
    }

    /// Parks `body`; `reason` is `data` (the database refused it) or `unreadable`.
    pub async fn park(
        &self,
        body: &[u8],
        reason: &'static str,
        error: &str,
    ) -> Result<(), BrokerError> {
        let mut headers = FieldTable::default();
        headers.insert(ERROR_HEADER.into(), AMQPValue::LongString(error.into()));
        let published = self
            .channel
            .basic_publish(
                self.exchange.as_str().into(),
                "".into(),
                BasicPublishOptions::default(),
                body,
                BasicProperties::default()
                    .with_delivery_mode(PERSISTENT)
                    .with_content_type("application/json".into())
                    .with_headers(headers),
            )
            .await;
        topology::confirm(published, CONFIRM_TIMEOUT).await?;
        metrics::counter!("pushfleet_audit_rejected_total", "reason" => reason).increment(1);
        warn!(%error, reason, "outcome parked in the audit dead letters");
        Ok(())
    }
}
