//! Outcome events on their way to the audit sink: batched per broker message, and still
//! readable in the one-event-per-message form of earlier workers.

use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
use lapin::BasicProperties;
use pushfleet_core::clock::now_ms;
use pushfleet_core::job::{Terminal, JOB_VERSION};
use pushfleet_core::topology::{self, PERSISTENT};
use pushfleet_core::{
    DeliveryStatus, Event, Job, Lane, OutcomeEvent, Platform, PushData, Topology,
};
use pushfleet_worker::outcomes::OutcomeBatcher;
use uuid::Uuid;

use crate::support::*;

fn delivered(call_id: &str) -> OutcomeEvent {
    let job = Job {
        v: JOB_VERSION,
        id: Uuid::new_v4(),
        app_id: SYLK.into(),
        platform: Platform::Apple,
        event: Event::IncomingSession,
        lane: Lane::Calls,
        received_at_ms: now_ms(),
        deadline_ms: now_ms() + 60_000,
        attempt: 0,
        push: PushData {
            token: apns_token(),
            call_id: call_id.into(),
            ..Default::default()
        },
    };
    let mut outcome = OutcomeEvent::for_job(&job);
    outcome.terminal = Some(Terminal {
        status: DeliveryStatus::Delivered,
        attempts: 1,
        provider_status: Some(200),
        reason: None,
        provider_message_id: None,
        finished_at_ms: now_ms(),
    });
    outcome
}

#[tokio::test]
async fn outcomes_of_concurrent_jobs_share_broker_messages_and_are_all_audited() {
    let mut stack = Stack::start_with(StackOptions {
        start_worker: false,
        ..Default::default()
    })
    .await;
    let rabbitmq = &stack.settings.rabbitmq;
    let topology = Topology::new(rabbitmq);
    let connection = topology::connect(rabbitmq, "it").await.unwrap();
    let channel = connection.create_channel().await.unwrap();
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await
        .unwrap();
    let (batcher, publishing) = OutcomeBatcher::start(channel.clone(), &topology);
    let call = call_id();
    let saves: Vec<_> = (0..100)
        .map(|_| {
            let (batcher, outcome) = (batcher.clone(), delivered(&call));
            tokio::spawn(async move { batcher.save(&outcome).await })
        })
        .collect();
    for save in saves {
        save.await.unwrap().expect("outcome confirmed");
    }
    drop(batcher);
    publishing.await.unwrap();

    // No sink runs yet: the audit queue holds the batches as published.
    let messages = message_count(&channel, &topology.audit_queue()).await;
    assert!(messages < 20, "100 outcomes took {messages} messages");
    stack.start_worker().await;
    let rows = stack.deliveries(&call, 100).await;
    assert_eq!(rows.len(), 100);
    assert!(rows.iter().all(|row| row.status == "delivered"));
    let _ = connection.close(200, "done".into()).await;
    stack.stop().await;
}

#[tokio::test]
async fn an_outcome_from_a_worker_that_sends_one_per_message_is_audited() {
    let stack = Stack::start().await;
    let rabbitmq = &stack.settings.rabbitmq;
    let topology = Topology::new(rabbitmq);
    let connection = topology::connect(rabbitmq, "it").await.unwrap();
    let channel = connection.create_channel().await.unwrap();
    let call = call_id();
    let outcome = delivered(&call);
    channel
        .basic_publish(
            topology.outcomes_exchange().into(),
            "".into(),
            BasicPublishOptions::default(),
            &serde_json::to_vec(&outcome).unwrap(),
            BasicProperties::default()
                .with_delivery_mode(PERSISTENT)
                .with_type("outcome.v1".into()),
        )
        .await
        .unwrap()
        .await
        .unwrap();
    let rows = stack.deliveries(&call, 1).await;
    assert_eq!(
        (rows[0].id, rows[0].status.as_str()),
        (outcome.job_id, "delivered")
    );
    let _ = connection.close(200, "done".into()).await;
    stack.stop().await;
}
