//! The holder's work: one loop over the component's stanzas and the XMPP deliveries. A lost
//! component, broker connection or write ends the turn; unacked deliveries go back to the
//! queue, and the worker reconnects (or another worker takes over).

use std::time::{Duration, Instant};

use deadpool_postgres::Pool;
use futures_util::StreamExt;
use lapin::message::Delivery;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicNackOptions, BasicQosOptions, BasicRejectOptions,
    ConfirmSelectOptions,
};
use lapin::types::FieldTable;
use lapin::{Connection, Consumer};
use pushfleet_core::clock::now_ms;
use pushfleet_core::config::XmppSettings;
use pushfleet_core::job::{AttemptRecord, DeliveryStatus, Job, OutcomeEvent, Terminal};
use pushfleet_core::logged::{Escaped, Identity};
use pushfleet_core::reconnect;
use pushfleet_core::topology::{self, BrokerError, Topology};
use pushfleet_core::xmpp as registrations;
use pushfleet_core::Settings;
use tokio::sync::watch;
use tracing::{debug, info, warn};

use super::component::{Component, ComponentError};
use super::xml::{escape, Element};
use crate::outcomes::OutcomeBatcher;

/// Deliveries the holder takes at once: enough to keep the stream busy, few enough that a
/// holder that goes returns little to the queue.
const PREFETCH: u16 = 64;
/// A registration that cannot reach Postgres in this time is answered with an error, so that
/// distributors do not wait on us.
const DB_TIMEOUT: Duration = Duration::from_secs(5);

/// How often a standby asks for the component while another connection holds it: the longest
/// a takeover waits after the holder goes.
const STANDBY_POLL: Duration = Duration::from_secs(2);

const UNIFIEDPUSH_NS: &str = "unifiedpush.org";
const DISCO_INFO_NS: &str = "http://jabber.org/protocol/disco#info";
const PING_NS: &str = "urn:xmpp:ping";
const STANZAS_NS: &str = "urn:ietf:params:xml:ns:xmpp-stanzas";

#[derive(Debug, thiserror::Error)]
enum TurnError {
    #[error(transparent)]
    Component(#[from] ComponentError),
    #[error(transparent)]
    Broker(#[from] BrokerError),
}

impl From<lapin::Error> for TurnError {
    fn from(e: lapin::Error) -> TurnError {
        TurnError::Broker(e.into())
    }
}

/// Holds the component whenever it can, until shutdown.
pub async fn run(
    settings: Settings,
    gateway: XmppSettings,
    secret: String,
    pool: Pool,
    worker_id: String,
    mut shutdown: watch::Receiver<bool>,
) {
    let topology = Topology::new(&settings.rabbitmq);
    metrics::gauge!("pushfleet_xmpp_component_held").set(0.0);
    loop {
        let name = format!("{worker_id}-xmpp");
        let (rabbitmq, declared) = (&settings.rabbitmq, &topology);
        let name = name.as_str();
        let open = move || async move {
            let connection = topology::connect(rabbitmq, name).await?;
            declared.declare(&connection).await?;
            Ok::<_, BrokerError>(connection)
        };
        let Some(connection) =
            reconnect::until_ok("RabbitMQ unreachable (XMPP gateway)", &mut shutdown, open).await
        else {
            return;
        };
        // Standby: the server refuses the component (conflict) while another worker holds it.
        // That is the normal state of all workers but one, so it is retried quietly every
        // STANDBY_POLL; anything else (the server away, a wrong secret) is logged by until_ok.
        let (held_by, secret, link) = (&gateway, secret.as_str(), &connection);
        let stop = shutdown.clone();
        let connect = move || {
            let mut stop = stop.clone();
            async move {
                loop {
                    let attempt = tokio::select! {
                        held = Component::connect(held_by, secret) => held,
                        // A standby also notices a lost broker link.
                        _ = topology::closed(link) => {
                            Err(ComponentError::Refused("RabbitMQ connection lost".into()))
                        }
                    };
                    match attempt {
                        Err(ComponentError::Refused(reason)) if reason == "conflict" => {
                            debug!("another connection holds the XMPP component; standing by");
                        }
                        other => return other,
                    }
                    tokio::select! {
                        _ = tokio::time::sleep(STANDBY_POLL) => {}
                        _ = stop.changed() => {
                            return Err(ComponentError::Refused("shutting down".into()));
                        }
                    }
                }
            }
        };
        let what = "cannot hold the XMPP component";
        let Some(component) = reconnect::until_ok(what, &mut shutdown, connect).await else {
            let _ = connection.close(200, "shutdown".into()).await;
            return;
        };
        if !connection.status().connected() {
            component.close().await;
            continue;
        }
        info!(component = %gateway.component, server = %gateway.server, "holding the XMPP component");
        metrics::gauge!("pushfleet_xmpp_component_held").set(1.0);
        let mut turn = Turn {
            gateway: &gateway,
            topology: &topology,
            pool: &pool,
            worker_id: &worker_id,
            component,
        };
        let result = turn.run(&connection, shutdown.clone()).await;
        metrics::gauge!("pushfleet_xmpp_component_held").set(0.0);
        turn.component.close().await;
        let _ = tokio::time::timeout(
            Duration::from_secs(1),
            connection.close(200, "XMPP gateway turn over".into()),
        )
        .await;
        if *shutdown.borrow() {
            return;
        }
        match result {
            Ok(()) => warn!("RabbitMQ cancelled the XMPP consumer; reconnecting"),
            Err(e) => warn!(error = %e, "lost the XMPP component; reconnecting"),
        }
    }
}

struct Turn<'a> {
    gateway: &'a XmppSettings,
    topology: &'a Topology,
    pool: &'a Pool,
    worker_id: &'a str,
    component: Component,
}

impl Turn<'_> {
    async fn run(
        &mut self,
        connection: &Connection,
        mut shutdown: watch::Receiver<bool>,
    ) -> Result<(), TurnError> {
        let publish = connection.create_channel().await?;
        publish
            .confirm_select(ConfirmSelectOptions::default())
            .await?;
        let (outcomes, _publisher) = OutcomeBatcher::start(publish, self.topology);
        let channel = connection.create_channel().await?;
        channel
            .basic_qos(PREFETCH, BasicQosOptions::default())
            .await?;
        let mut deliveries: Consumer = channel
            .basic_consume(
                self.topology.xmpp_queue().as_str().into(),
                format!("{}-xmpp", self.worker_id).as_str().into(),
                // Manual acks: a push leaves the queue only once its outcome is saved.
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await?;
        loop {
            if *shutdown.borrow() {
                return Ok(());
            }
            tokio::select! {
                stanza = self.component.incoming.recv() => match stanza {
                    Some(Ok(stanza)) => self.answer(&stanza).await?,
                    Some(Err(e)) => return Err(e.into()),
                    None => return Err(ComponentError::Closed.into()),
                },
                delivery = deliveries.next() => match delivery {
                    Some(Ok(delivery)) => self.deliver(delivery, &outcomes).await?,
                    Some(Err(e)) => return Err(e.into()),
                    None => return Ok(()),
                },
                _ = topology::closed(connection) => return Err(BrokerError::Disconnected.into()),
                changed = shutdown.changed() => if changed.is_err() || *shutdown.borrow() {
                    return Ok(());
                },
            }
        }
    }

    /// Sends one push as a `<message>`, saves its outcome, then acks it. A push that could not
    /// be written goes back to the queue, and the turn ends.
    async fn deliver(
        &mut self,
        delivery: Delivery,
        outcomes: &OutcomeBatcher,
    ) -> Result<(), TurnError> {
        let job: Job = match serde_json::from_slice(&delivery.data) {
            Ok(job) => job,
            Err(e) => {
                warn!(error = %e, "unreadable XMPP delivery; dead-lettered");
                metrics::counter!("pushfleet_jobs_unreadable_total").increment(1);
                delivery
                    .acker
                    .reject(BasicRejectOptions { requeue: false })
                    .await?;
                return Ok(());
            }
        };
        let Some(target) = job.handling.xmpp.as_ref() else {
            warn!(job_id = %job.id, "a job without an XMPP target in the XMPP queue; dead-lettered");
            delivery
                .acker
                .reject(BasicRejectOptions { requeue: false })
                .await?;
            return Ok(());
        };
        let started = Instant::now();
        let at_ms = now_ms();
        let mut outcome = OutcomeEvent::for_job(&job);
        let status = if job.is_expired(at_ms) {
            DeliveryStatus::Expired
        } else {
            let stanza = message_stanza(
                &self.gateway.component,
                &job,
                &target.jid,
                &target.public_token,
            );
            if let Err(e) = self.component.send(&stanza).await {
                requeue(&delivery).await;
                return Err(e.into());
            }
            outcome.attempt = Some(AttemptRecord {
                number: job.attempt + 1,
                at_ms,
                provider_status: None,
                reason: None,
                duration_ms: started.elapsed().as_millis() as u64,
                worker: self.worker_id.to_string(),
            });
            DeliveryStatus::Delivered
        };
        outcome.terminal = Some(Terminal {
            status,
            attempts: job.attempt + u32::from(status == DeliveryStatus::Delivered),
            provider_status: None,
            reason: (status == DeliveryStatus::Expired).then(|| "expired before sending".into()),
            provider_message_id: None,
            finished_at_ms: now_ms(),
        });
        if let Err(e) = outcomes.save(&outcome).await {
            // Sent but not recorded: back to the queue, sent again by whoever holds it next
            // (at least once, as every push).
            requeue(&delivery).await;
            return Err(e.into());
        }
        delivery.acker.ack(BasicAckOptions::default()).await?;
        info!(
            job_id = %job.id, call_id = %Escaped(&job.push.call_id), to = %Identity(&target.jid),
            outcome = %status, "UnifiedPush push over XMPP"
        );
        metrics::counter!(
            "pushfleet_deliveries_total",
            "app" => job.app_id.clone(), "platform" => job.platform.as_str(),
            "event" => job.event.as_str(), "outcome" => status.as_str()
        )
        .increment(1);
        metrics::histogram!(
            "pushfleet_push_latency_seconds",
            "lane" => job.lane.as_str(), "outcome" => status.as_str()
        )
        .record(now_ms().saturating_sub(job.received_at_ms) as f64 / 1000.0);
        Ok(())
    }

    /// Answers an IQ; other stanzas (bounced messages, presence) are only logged.
    async fn answer(&mut self, stanza: &Element) -> Result<(), TurnError> {
        if stanza.name != "iq" {
            if stanza.attr("type") == Some("error") {
                debug!(from = %Identity(stanza.attr("from").unwrap_or_default()), kind = %stanza.name, "an XMPP error came back");
            }
            return Ok(());
        }
        let kind = stanza.attr("type").unwrap_or_default();
        let (Some(from), "get" | "set") = (stanza.attr("from"), kind) else {
            return Ok(());
        };
        let id = stanza.attr("id").unwrap_or_default();
        let to = stanza.attr("to").unwrap_or(self.gateway.component.as_str());
        let payload = stanza.children.first();
        let ns = payload.and_then(|p| p.attr("xmlns")).unwrap_or_default();
        let name = payload.map(Element::local_name).unwrap_or_default();
        let reply = match (kind, name, ns) {
            ("set", "register" | "unregister", UNIFIEDPUSH_NS) => {
                let token = payload
                    .and_then(|p| p.child("token"))
                    .map(|t| t.text.trim())
                    .unwrap_or_default();
                let (ok, inner) = self.registration(name, from, token).await;
                let kind = if ok { "result" } else { "error" };
                format!(
                    "<iq type='{kind}' id='{}' from='{}' to='{}'><{name} xmlns='{UNIFIEDPUSH_NS}'>{inner}</{name}></iq>",
                    escape(id), escape(to), escape(from)
                )
            }
            ("get", "query", DISCO_INFO_NS) => format!(
                "<iq type='result' id='{}' from='{}' to='{}'><query xmlns='{DISCO_INFO_NS}'>\
                 <identity category='component' type='generic' name='UnifiedPush gateway'/>\
                 <feature var='{DISCO_INFO_NS}'/><feature var='{UNIFIEDPUSH_NS}'/>\
                 <feature var='{PING_NS}'/></query></iq>",
                escape(id),
                escape(to),
                escape(from)
            ),
            ("get", "ping", PING_NS) => format!(
                "<iq type='result' id='{}' from='{}' to='{}'/>",
                escape(id),
                escape(to),
                escape(from)
            ),
            _ => format!(
                "<iq type='error' id='{}' from='{}' to='{}'><error type='cancel'>\
                 <service-unavailable xmlns='{STANZAS_NS}'/></error></iq>",
                escape(id),
                escape(to),
                escape(from)
            ),
        };
        self.component.send(&reply).await?;
        Ok(())
    }

    /// Registers or unregisters `from`'s public token: whether it worked, and the element's
    /// content (`<endpoint>`, `<success/>` or `<error>reason</error>`).
    async fn registration(&self, action: &str, from: &str, token: &str) -> (bool, String) {
        let failed = |reason: &str| {
            metrics::counter!("pushfleet_xmpp_registrations_total", "action" => action.to_string(), "result" => "error").increment(1);
            (false, format!("<error>{}</error>", escape(reason)))
        };
        if token.is_empty() {
            return failed("a token is required");
        }
        if token.len() > 256 || token.chars().any(char::is_control) {
            return failed("the token must be at most 256 characters of text");
        }
        if !from.contains('/') {
            return failed("register from a full JID (with a resource)");
        }
        let work = async {
            let client = self
                .pool
                .get()
                .await
                .map_err(pushfleet_core::db::DbError::from)?;
            match action {
                "register" => registrations::register(&**client, from, token)
                    .await
                    .map(Some),
                _ => registrations::unregister(&**client, from, token)
                    .await
                    .map(|_| None),
            }
        };
        let done = match tokio::time::timeout(DB_TIMEOUT, work).await {
            Ok(Ok(done)) => done,
            Ok(Err(e)) => {
                warn!(error = %e, action, "XMPP registration not stored");
                return failed("temporarily unavailable, try again later");
            }
            Err(_) => {
                warn!(
                    action,
                    "XMPP registration not stored: Postgres did not answer in time"
                );
                return failed("temporarily unavailable, try again later");
            }
        };
        metrics::counter!("pushfleet_xmpp_registrations_total", "action" => action.to_string(), "result" => "ok").increment(1);
        match done {
            Some(endpoint_token) => {
                let endpoint =
                    registrations::endpoint_url(&self.gateway.endpoint_base, &endpoint_token);
                info!(jid = %Identity(from), "UnifiedPush distributor registered over XMPP");
                (true, format!("<endpoint>{}</endpoint>", escape(&endpoint)))
            }
            None => {
                info!(jid = %Identity(from), "UnifiedPush distributor unregistered over XMPP");
                (true, "<success/>".to_string())
            }
        }
    }
}

/// The push as the seed's gateway sends it: the public token as subject, the content as body.
fn message_stanza(component: &str, job: &Job, jid: &str, public_token: &str) -> String {
    format!(
        "<message id='{}' from='{}' to='{}'><subject>{}</subject><body>{}</body></message>",
        job.id,
        escape(component),
        escape(jid),
        escape(public_token),
        escape(job.push.content.as_deref().unwrap_or_default()),
    )
}

/// Puts a push back in its queue, for whoever holds the component next.
async fn requeue(delivery: &Delivery) {
    let requeue = BasicNackOptions {
        requeue: true,
        ..Default::default()
    };
    let _ = delivery.acker.nack(requeue).await;
}

#[cfg(test)]
mod tests {
    use super::*;
    use pushfleet_core::job::{Handling, PushData, XmppTarget};

    #[test]
    fn a_push_is_a_message_with_subject_and_body_escaped() {
        let job = Job {
            v: 1,
            id: uuid::Uuid::nil(),
            app_id: "up.localhost".into(),
            platform: pushfleet_core::Platform::UnifiedPush,
            event: pushfleet_core::Event::Message,
            lane: pushfleet_core::Lane::Messages,
            received_at_ms: 0,
            deadline_ms: 1,
            attempt: 0,
            push: PushData {
                content: Some("a<b & 'c'".into()),
                ..Default::default()
            },
            api_key_id: None,
            reply: false,
            handling: Handling {
                xmpp: Some(XmppTarget {
                    jid: "d@x/y".into(),
                    public_token: "p".into(),
                }),
                ..Default::default()
            },
        };
        assert_eq!(
            message_stanza("up.localhost", &job, "d@x/y", "p&q"),
            "<message id='00000000-0000-0000-0000-000000000000' from='up.localhost' to='d@x/y'>\
             <subject>p&amp;q</subject><body>a&lt;b &amp; &apos;c&apos;</body></message>"
        );
    }
}
