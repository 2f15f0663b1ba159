//! Jobs coalesced into broker messages: ingest puts the jobs accepted while a lane's previous
//! publish awaits its confirm into one message, and everything stays per job — its answer, its
//! audit row, its deadline — through an expired batch and a worker dying mid-batch.

use std::time::{Duration, Instant};

use futures_util::StreamExt;
use lapin::options::{BasicConsumeOptions, BasicPublishOptions, ConfirmSelectOptions};
use lapin::types::FieldTable;
use pushfleet_core::clock::now_ms;
use pushfleet_core::job::{decode_batch, json_array, SyncReply, JOB_VERSION};
use pushfleet_core::topology::{self, DIRECT_REPLY_TO};
use pushfleet_core::{DeliveryStatus, Event, Job, Lane, Platform, PushData, Topology};
use pushfleet_fakes::Scripted;
use serde_json::Value;
use uuid::Uuid;

use crate::lifecycle::wait_for_terminal_rows;
use crate::support::*;

/// An app of this module's own, so that its counters are not shared with other tests.
const APP: &str = "org.pushfleet.batches";

/// The jobs ingest counted as queued for `app`, from its `/metrics`.
async fn jobs_queued(stack: &Stack, app: &str) -> f64 {
    let text = stack
        .http
        .get(stack.url("/metrics"))
        .send()
        .await
        .expect("ingest answers")
        .text()
        .await
        .expect("metrics text");
    let label = format!("app=\"{app}\"");
    text.lines()
        .filter(|line| line.starts_with("pushfleet_ingest_jobs_total{") && line.contains(&label))
        .filter_map(|line| line.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// A message job for `token`, as ingest makes it, with `ttl_ms` to live.
fn message_job(token: &str, call_id: &str, ttl_ms: u64) -> Job {
    let now = now_ms();
    Job {
        v: JOB_VERSION,
        id: Uuid::new_v4(),
        app_id: SYLK.into(),
        platform: Platform::Apple,
        event: Event::Message,
        lane: Lane::Messages,
        received_at_ms: now,
        deadline_ms: now + ttl_ms,
        attempt: 0,
        push: PushData {
            token: token.into(),
            call_id: call_id.into(),
            from: "alice@example.com".into(),
            to: "bob@example.com".into(),
            ..Default::default()
        },
        api_key_id: None,
        handling: Default::default(),
        reply: false,
    }
}

/// Publishes `jobs` as one batch message into the messages lane, as ingest does.
async fn publish_batch(stack: &Stack, jobs: &[Job], expiration_ms: u64) {
    let rabbitmq = &stack.settings.rabbitmq;
    let topology = Topology::new(rabbitmq);
    let connection = topology::connect(rabbitmq, "it-batches").await.unwrap();
    let channel = connection.create_channel().await.unwrap();
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await
        .unwrap();
    let encoded: Vec<Vec<u8>> = jobs
        .iter()
        .map(|j| serde_json::to_vec(j).unwrap())
        .collect();
    let mut body = Vec::new();
    json_array(encoded.iter().map(Vec::as_slice), &mut body);
    let properties = topology::job_batch_properties(Uuid::new_v4())
        .with_expiration(expiration_ms.to_string().into());
    let published = channel
        .basic_publish(
            topology.jobs_exchange().into(),
            Topology::lane_key(Lane::Messages).into(),
            BasicPublishOptions {
                mandatory: true,
                ..Default::default()
            },
            &body,
            properties,
        )
        .await;
    topology::confirm(published, Duration::from_secs(5))
        .await
        .expect("batch confirmed");
    let _ = connection.close(200, "done".into()).await;
}

#[tokio::test]
async fn concurrent_pushes_share_messages_and_each_caller_gets_its_own_answer() {
    let stack = Stack::start_with(StackOptions {
        sync_timeout_ms: 30_000,
        start_worker: false,
        extra_apps: vec![APP.into()],
        ..Default::default()
    })
    .await;
    let rabbitmq = &stack.settings.rabbitmq;
    let topology = Topology::new(rabbitmq);
    let connection = topology::connect(rabbitmq, "it-batches").await.unwrap();
    let channel = connection.create_channel().await.unwrap();

    // 150 sync callers at once, while no worker runs: their jobs wait in the lane.
    const PUSHES: usize = 150;
    let pushes: Vec<(String, String)> = (0..PUSHES).map(|_| (call_id(), apns_token())).collect();
    let answers = futures_util::future::join_all(pushes.iter().map(|(call, token)| {
        let body = v1_body(APP, "apple", token, "message", call);
        let stack = &stack;
        async move { stack.push(&body).await }
    }));
    let observe_then_deliver = async {
        let queued_by = Instant::now() + Duration::from_secs(20);
        while jobs_queued(&stack, APP).await < PUSHES as f64 {
            assert!(Instant::now() < queued_by, "the pushes were not all queued");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let messages = message_count(&channel, &topology.lane_queue(Lane::Messages)).await;
        assert!(
            messages > 0 && (messages as usize) < PUSHES,
            "{PUSHES} concurrent pushes took {messages} broker messages"
        );
        start_worker(&stack.settings).await
    };
    let (answers, worker) = tokio::join!(answers, observe_then_deliver);

    // Every caller got the provider's answer for its own push, not a 202 and not another's.
    for ((call, token), (status, answer)) in pushes.iter().zip(&answers) {
        assert_eq!(*status, 200, "{answer}");
        assert_eq!(
            answer["data"]["call_id"],
            Value::from(call.as_str()),
            "{answer}"
        );
        assert_eq!(answer["data"]["platform"], "apple", "{answer}");
        let sent = stack.fakes.apns.journal().requests_for_token(token);
        assert_eq!(sent.len(), 1, "{call}: sent {} times", sent.len());
    }
    // And every push has exactly one terminal row.
    let calls: Vec<String> = pushes.iter().map(|(call, _)| call.clone()).collect();
    let deadline = Instant::now() + Duration::from_secs(30);
    let rows = loop {
        let rows = stack
            .query(
                "SELECT call_id, count(*), min(status) FROM deliveries
                  WHERE call_id = ANY($1) GROUP BY call_id",
                &[&calls],
            )
            .await;
        if rows.len() == PUSHES || Instant::now() > deadline {
            break rows;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(rows.len(), PUSHES, "pushes without a terminal row");
    for row in &rows {
        let (call, count, status): (String, i64, String) = (row.get(0), row.get(1), row.get(2));
        assert_eq!((count, status.as_str()), (1, "delivered"), "{call}");
    }
    worker.stop().await;
    let _ = connection.close(200, "done".into()).await;
    stack.stop().await;
}

#[tokio::test]
async fn an_expired_batch_queues_its_live_jobs_again_and_records_the_others_expired() {
    let mut stack = Stack::start_with(StackOptions {
        start_worker: false,
        ..Default::default()
    })
    .await;
    // One job with a second to live, two with a minute: the batch expires with the first.
    let call = call_id();
    let short = message_job(&apns_token(), &call, 1_000);
    let long = [
        message_job(&apns_token(), &call, 60_000),
        message_job(&apns_token(), &call, 60_000),
    ];
    let jobs = [short.clone(), long[0].clone(), long[1].clone()];
    publish_batch(&stack, &jobs, 1_000).await;
    // No worker consumes meanwhile: the broker dead-letters the batch when it expires.
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    assert!(short.is_expired(now_ms()));
    stack.start_worker().await;

    let rows = stack.deliveries(&call, 3).await;
    assert_eq!(rows.len(), 3, "{rows:?}");
    let status_of = |id: Uuid| {
        let of: Vec<&str> = rows
            .iter()
            .filter(|r| r.id == id)
            .map(|r| r.status.as_str())
            .collect();
        of
    };
    assert_eq!(status_of(short.id), ["expired"]);
    for job in &long {
        assert_eq!(status_of(job.id), ["delivered"], "a job with time left");
        let sent = stack
            .fakes
            .apns
            .journal()
            .requests_for_token(&job.push.token);
        assert_eq!(sent.len(), 1);
    }
    assert!(stack
        .fakes
        .apns
        .journal()
        .requests_for_token(&short.push.token)
        .is_empty());
    // Queued again alone, they were no dead letters of their own.
    let metrics = stack.worker_metrics().await;
    assert!(
        metrics.contains("pushfleet_dead_letter_jobs_requeued_total{lane=\"messages\"}"),
        "requeue counted"
    );
    stack.stop().await;
}

#[tokio::test]
async fn a_batch_answers_only_the_jobs_that_ask_for_it() {
    let stack = Stack::start().await;
    let rabbitmq = &stack.settings.rabbitmq;
    let topology = Topology::new(rabbitmq);
    let connection = topology::connect(rabbitmq, "it-batches").await.unwrap();
    // The waiting side, as ingest has it: direct reply-to on the publishing channel.
    let channel = connection.create_channel().await.unwrap();
    let mut replies = channel
        .basic_consume(
            DIRECT_REPLY_TO.into(),
            "it-replies".into(),
            BasicConsumeOptions {
                no_ack: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .unwrap();
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await
        .unwrap();
    let call = call_id();
    let mut asking = message_job(&apns_token(), &call, 60_000);
    asking.reply = true;
    let silent = [
        message_job(&apns_token(), &call, 60_000),
        message_job(&apns_token(), &call, 60_000),
    ];
    let jobs = [silent[0].clone(), asking.clone(), silent[1].clone()];
    let encoded: Vec<Vec<u8>> = jobs
        .iter()
        .map(|j| serde_json::to_vec(j).unwrap())
        .collect();
    let mut body = Vec::new();
    json_array(encoded.iter().map(Vec::as_slice), &mut body);
    let published = channel
        .basic_publish(
            topology.jobs_exchange().into(),
            Topology::lane_key(Lane::Messages).into(),
            BasicPublishOptions::default(),
            &body,
            topology::job_batch_properties(Uuid::new_v4())
                .with_expiration("60000".into())
                .with_reply_to(DIRECT_REPLY_TO.into()),
        )
        .await;
    topology::confirm(published, Duration::from_secs(5))
        .await
        .expect("batch confirmed");

    let rows = stack.deliveries(&call, 3).await;
    assert_eq!(rows.len(), 3, "{rows:?}");
    assert!(rows.iter().all(|r| r.status == "delivered"), "{rows:?}");
    // Every reply that comes within a while after the rows: only the asking job's.
    let mut answered = Vec::new();
    let until = tokio::time::Instant::now() + Duration::from_secs(2);
    while let Ok(Some(Ok(delivery))) = tokio::time::timeout_at(until, replies.next()).await {
        let batch: Vec<SyncReply> = decode_batch(&delivery.data).expect("replies");
        answered.extend(batch.into_iter().map(|r| (r.job_id, r.status)));
    }
    assert_eq!(answered, [(asking.id, DeliveryStatus::Delivered)]);
    let _ = connection.close(200, "done".into()).await;
    stack.stop().await;
}

#[tokio::test]
async fn a_worker_killed_mid_batch_leaves_no_job_lost_and_none_sent_twice() {
    let mut stack = Stack::start_with(StackOptions {
        mode: "async",
        start_worker: false,
        ..Default::default()
    })
    .await;
    let call = call_id();
    let jobs: Vec<Job> = (0..10)
        .map(|_| message_job(&apns_token(), &call, 120_000))
        .collect();
    // The last job's provider hangs: the batch cannot be acked while it is in flight.
    let slow = jobs[9].push.token.clone();
    stack
        .fakes
        .apns
        .script(&slow, Scripted::normal().delay(Duration::from_secs(6)));
    publish_batch(&stack, &jobs, 120_000).await;

    let mut worker = spawn_worker_process(&stack.config_path);
    let sent_once = |stack: &Stack, job: &Job| {
        let sent = stack
            .fakes
            .apns
            .journal()
            .requests_for_token(&job.push.token);
        sent.len()
    };
    let busy = Instant::now() + Duration::from_secs(30);
    while jobs[..9].iter().any(|job| sent_once(&stack, job) == 0) {
        assert!(Instant::now() < busy, "the fast jobs were not sent");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Their outcomes confirmed and their conclusions in the ledger, the slow one still out.
    tokio::time::sleep(Duration::from_millis(500)).await;
    worker.start_kill().unwrap();
    let _ = worker.wait().await;
    stack.fakes.apns.clear_scripts();

    // Another worker gets the batch again: it sends only the job the first did not conclude.
    stack.start_worker().await;
    let ids: Vec<(Uuid, String)> = jobs.iter().map(|j| (j.id, call.clone())).collect();
    let rows = wait_for_terminal_rows(&stack, &ids, Duration::from_secs(30)).await;
    assert_eq!(rows.len(), jobs.len(), "jobs without a terminal row");
    for (id, count, status) in &rows {
        assert_eq!((*count, status.as_str()), (1, "delivered"), "{id}");
    }
    for job in &jobs[..9] {
        assert_eq!(sent_once(&stack, job), 1, "{} sent again", job.id);
    }
    assert!(sent_once(&stack, &jobs[9]) >= 1);
    let metrics = stack.worker_metrics().await;
    assert!(
        sample(&metrics, "pushfleet_jobs_already_concluded_total") >= 9.0,
        "the concluded jobs were skipped"
    );
    stack.stop().await;
}

/// Connections ask for 16 KiB frames unless the URL says otherwise (lapin keeps 32 frames of
/// buffer each way per connection), and a message larger than a frame still goes through whole.
#[tokio::test]
async fn broker_connections_use_small_frames_and_carry_larger_messages() {
    use lapin::options::{BasicGetOptions, QueueDeclareOptions};
    use pushfleet_core::config::RabbitSettings;

    let settings = RabbitSettings {
        url: rabbitmq_url(),
        ..Default::default()
    };
    let connection = topology::connect(&settings, "it-frames").await.unwrap();
    assert_eq!(connection.configuration().frame_max(), 16 * 1024);
    let channel = connection.create_channel().await.unwrap();
    let queue = channel
        .queue_declare(
            "".into(),
            QueueDeclareOptions {
                exclusive: true,
                ..Default::default()
            },
            Default::default(),
        )
        .await
        .unwrap();
    let body: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
    channel
        .basic_publish(
            "".into(),
            queue.name().as_str().into(),
            BasicPublishOptions::default(),
            &body,
            Default::default(),
        )
        .await
        .unwrap();
    let mut got = None;
    for _ in 0..50 {
        got = channel
            .basic_get(
                queue.name().as_str().into(),
                BasicGetOptions { no_ack: true },
            )
            .await
            .unwrap();
        if got.is_some() {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert_eq!(got.expect("the message comes back").delivery.data, body);
    let _ = connection.close(200, "done".into()).await;

    let separator = if rabbitmq_url().contains('?') {
        '&'
    } else {
        '?'
    };
    let settings = RabbitSettings {
        url: format!("{}{separator}frame_max=65536", rabbitmq_url()),
        ..Default::default()
    };
    let connection = topology::connect(&settings, "it-frames").await.unwrap();
    assert_eq!(connection.configuration().frame_max(), 65536);
    let _ = connection.close(200, "done".into()).await;
}
