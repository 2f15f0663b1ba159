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

fn job(call_id: &str) -> Job {
    Job {
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
        api_key_id: None,
        handling: Default::default(),
        reply: false,
    }
}

fn delivered(call_id: &str) -> OutcomeEvent {
    let mut outcome = OutcomeEvent::for_job(&job(call_id));
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

/// What the sink cannot write never stops it: an outcome Postgres refuses (a NUL in its call-id)
/// and a message that is not an outcome at all are parked in `<ns>.audit.dead` with the error,
/// the good outcomes of the same batch are written, and the sink goes on with the next push.
#[tokio::test]
async fn outcomes_the_database_refuses_are_parked_and_the_sink_goes_on() {
    let stack = Stack::start().await;
    let rabbitmq = &stack.settings.rabbitmq;
    let topology = Topology::new(rabbitmq);
    let connection = topology::connect(rabbitmq, "it").await.unwrap();
    let channel = connection.create_channel().await.unwrap();
    let call = call_id();
    let poisoned = delivered(&format!("{call}\u{0}"));
    let batch: Vec<OutcomeEvent> = (0..4)
        .map(|_| delivered(&call))
        .chain([poisoned.clone()])
        .chain((0..4).map(|_| delivered(&call)))
        .collect();
    for body in [
        serde_json::to_vec(&batch).unwrap(),
        b"{not an outcome".to_vec(),
    ] {
        channel
            .basic_publish(
                topology.outcomes_exchange().into(),
                "".into(),
                BasicPublishOptions::default(),
                &body,
                BasicProperties::default().with_delivery_mode(PERSISTENT),
            )
            .await
            .unwrap()
            .await
            .unwrap();
    }
    let rows = stack.deliveries(&call, 8).await;
    assert_eq!(rows.len(), 8);
    assert!(rows.iter().all(|row| row.id != poisoned.job_id));

    // The sink still writes what comes next.
    let next = call_id();
    let (status, answer) = stack
        .push(&v1_body(
            SYLK,
            "apple",
            &apns_token(),
            "incoming_session",
            &next,
        ))
        .await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(stack.deliveries(&next, 1).await[0].status, "delivered");

    let parked = parked_messages(&channel, &topology.audit_dead_queue(), 2).await;
    let errors: Vec<&str> = parked.iter().map(|(_, error)| error.as_str()).collect();
    assert!(
        errors.iter().any(|e| e.contains("deliveries"))
            && errors.iter().any(|e| e.contains("unreadable")),
        "{errors:?}"
    );
    let poisoned_body = parked
        .iter()
        .find(|(_, error)| error.contains("deliveries"))
        .map(|(body, _)| serde_json::from_slice::<OutcomeEvent>(body).unwrap())
        .unwrap();
    assert_eq!(poisoned_body.job_id, poisoned.job_id);
    // The recorder is the test process's: other tests' sinks may have counted too.
    let metrics = stack.worker_metrics().await;
    for reason in ["data", "unreadable"] {
        let series = format!("pushfleet_audit_rejected_total{{reason=\"{reason}\"}} ");
        let count = metrics
            .lines()
            .find_map(|line| line.strip_prefix(&series))
            .and_then(|n| n.parse::<f64>().ok());
        assert!(count >= Some(1.0), "{reason}: {metrics}");
    }
    let _ = connection.close(200, "done".into()).await;
    stack.stop().await;
}

/// A dead letter whose job Postgres refuses (expired in the queue, a NUL in its call-id) is
/// parked too, instead of being retried for ever.
#[tokio::test]
async fn a_dead_letter_the_database_refuses_is_parked() {
    let (stack, topology, connection, channel) = stack_before_its_worker().await;
    let job = job("dead\u{0}letter");
    publish_expiring(&channel, &topology, &job)
        .await
        .await
        .unwrap();
    let mut stack = stack;
    stack.start_worker().await;
    let parked = parked_messages(&channel, &topology.audit_dead_queue(), 1).await;
    assert!(parked[0].1.contains("deliveries"), "{:?}", parked[0].1);
    assert_eq!(
        serde_json::from_slice::<Job>(&parked[0].0).unwrap().id,
        job.id
    );
    // Parked, not left waiting: the dead letter is gone from the sink's queue.
    assert_eq!(
        message_count(&channel, &topology.dead_audit_queue()).await,
        0
    );
    let _ = connection.close(200, "done".into()).await;
    stack.stop().await;
}

/// Waits for `count` messages in `queue`, taking them off; each with its error header.
async fn parked_messages(
    channel: &lapin::Channel,
    queue: &str,
    count: usize,
) -> Vec<(Vec<u8>, String)> {
    use lapin::options::{BasicAckOptions, BasicGetOptions};
    use lapin::types::AMQPValue;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(15);
    let mut parked = Vec::new();
    while parked.len() < count {
        assert!(
            std::time::Instant::now() < deadline,
            "parked so far: {}",
            parked.len()
        );
        match channel
            .basic_get(queue.into(), BasicGetOptions::default())
            .await
            .unwrap()
        {
            Some(message) => {
                let delivery = message.delivery;
                let error = delivery
                    .properties
                    .headers()
                    .as_ref()
                    .and_then(|h| h.inner().get("x-pushfleet-error").cloned())
                    .map(|v| match v {
                        AMQPValue::LongString(s) => s.to_string(),
                        other => format!("{other:?}"),
                    })
                    .unwrap_or_default();
                delivery.ack(BasicAckOptions::default()).await.unwrap();
                parked.push((delivery.data, error));
            }
            None => tokio::time::sleep(std::time::Duration::from_millis(50)).await,
        }
    }
    parked
}

/// A backlog that expires in its queue comes back as a flood of dead letters: their rows are
/// written in batches, a few transactions for hundreds of jobs, each job still with its row.
#[tokio::test]
async fn expired_dead_letters_are_audited_in_batches() {
    let (stack, topology, connection, channel) = stack_before_its_worker().await;
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await
        .unwrap();
    let call_id = call_id();
    const JOBS: usize = 300;
    let mut confirms = Vec::new();
    for _ in 0..JOBS {
        let job = job(&call_id);
        confirms.push(publish_expiring(&channel, &topology, &job).await);
    }
    for confirm in confirms {
        confirm.await.unwrap();
    }
    let mut stack = stack;
    stack.start_worker().await;
    let rows = stack.deliveries(&call_id, JOBS).await;
    assert_eq!(rows.len(), JOBS);
    assert!(rows.iter().all(|row| row.status == "expired"), "{rows:?}");
    // Rows written by one transaction share its id (`xmin`).
    let transactions: i64 = stack
        .query(
            "SELECT count(DISTINCT xmin::text) FROM deliveries WHERE call_id = $1",
            &[&call_id],
        )
        .await[0]
        .get(0);
    assert!(
        transactions <= 30,
        "{transactions} transactions for {JOBS} rows"
    );
    let _ = connection.close(200, "done".into()).await;
    stack.stop().await;
}

/// A stack whose worker is not started yet, its topology declared, and a channel to the broker.
async fn stack_before_its_worker() -> (Stack, Topology, lapin::Connection, lapin::Channel) {
    let stack = Stack::start_with(StackOptions {
        start_worker: false,
        ..Default::default()
    })
    .await;
    let rabbitmq = &stack.settings.rabbitmq;
    let topology = Topology::new(rabbitmq);
    topology
        .declare(&topology::connect(rabbitmq, "it-declare").await.unwrap())
        .await
        .unwrap();
    let connection = topology::connect(rabbitmq, "it").await.unwrap();
    let channel = connection.create_channel().await.unwrap();
    (stack, topology, connection, channel)
}

/// Queues `job` in the calls lane with a TTL of 1 ms: the broker dead-letters it at once.
async fn publish_expiring(
    channel: &lapin::Channel,
    topology: &Topology,
    job: &Job,
) -> lapin::PublisherConfirm {
    channel
        .basic_publish(
            topology.jobs_exchange().into(),
            Topology::lane_key(Lane::Calls).into(),
            BasicPublishOptions::default(),
            &serde_json::to_vec(job).unwrap(),
            topology::job_properties(job.id).with_expiration("1".into()),
        )
        .await
        .unwrap()
}
