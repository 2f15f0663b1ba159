//! The broker's own ceiling for pushfleet's traffic, without pushfleet: publishes job-sized
//! persistent messages with publisher confirms (pipelined, a bounded window of unconfirmed
//! messages) and, concurrently on its own connection, consumes them with manual acks (a
//! prefetch, `multiple` acks), through the very topology pushfleet declares — the jobs
//! exchange, the calls lane's quorum queue with its arguments — with the properties ingest sets.
//!
//! ```text
//! pushfleet-ceiling --url amqp://guest:guest@127.0.0.1:5672/%2f [--duration 20]
//!                   [--window 1024] [--prefetch 512] [--ack-every 64] [--namespace ceiling]
//! ```
//! Prints a `key=value` report on stdout: `consumed_per_s` (messages published, confirmed,
//! delivered and acked per second, after a warm-up) is the ceiling.

use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use futures_util::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions,
    ConfirmSelectOptions, ExchangeDeleteOptions, QueueDeleteOptions, QueuePurgeOptions,
};
use lapin::types::FieldTable;
use lapin::{Confirmation, Connection, ConnectionProperties};
use pushfleet_bench::{main_of, process_usage, report, Args};
use pushfleet_core::clock::now_ms;
use pushfleet_core::config::Platform;
use pushfleet_core::job::{Job, PushData, JOB_VERSION};
use pushfleet_core::topology::{self, Topology};
use pushfleet_core::{Event, Lane};
use tokio::sync::Semaphore;
use tokio::time::Instant;
use uuid::Uuid;

const USAGE: &str = "usage: pushfleet-ceiling --url AMQP_URL [--duration SECS] [--window N] \
[--prefetch N] [--ack-every N] [--namespace NS]";

/// The call lane's time to live, as ingest sets it for an incoming call.
const CALL_TTL_MS: u64 = 60_000;

/// A job exactly as ingest builds it for the load generator's request.
fn job_message() -> Job {
    let now = now_ms();
    Job {
        v: JOB_VERSION,
        id: Uuid::new_v4(),
        app_id: "com.example.sylk".into(),
        platform: Platform::Apple,
        event: Event::IncomingSession,
        lane: Lane::Calls,
        received_at_ms: now,
        deadline_ms: now + CALL_TTL_MS,
        attempt: 0,
        push: PushData {
            token: "0123456789abcdef".repeat(4),
            device_id: Some("bench-device-1234".into()),
            call_id: "async-max-1234567@bench.pushfleet".into(),
            from: "alice@example.com".into(),
            from_display_name: Some("Alice".into()),
            to: "bob@example.com".into(),
            media_type: Some("audio".into()),
            silent: true,
            badge: 1,
            ..Default::default()
        },
        api_key_id: None,
        handling: Default::default(),
        reply: false,
    }
}

struct Plan {
    url: String,
    duration: Duration,
    window: usize,
    prefetch: u16,
    ack_every: u64,
    namespace: String,
}

fn parse() -> Result<Plan> {
    let args = Args::parse(
        USAGE,
        &[
            "url",
            "duration",
            "window",
            "prefetch",
            "ack-every",
            "namespace",
        ],
    )?;
    let plan = Plan {
        url: args.required("url")?,
        duration: Duration::from_secs_f64(args.number("duration", 20.0)?),
        window: args.number("window", 1024)?,
        prefetch: args.number("prefetch", 512)?,
        ack_every: args.number("ack-every", 64)?,
        namespace: args.string("namespace", "ceiling"),
    };
    if plan.window == 0 || plan.prefetch == 0 || plan.ack_every == 0 {
        bail!("--window, --prefetch and --ack-every must be at least 1");
    }
    if plan.ack_every > u64::from(plan.prefetch) / 2 {
        bail!("--ack-every must be at most half of --prefetch, or the consumer stalls");
    }
    Ok(plan)
}

async fn connect(url: &str, name: &str) -> Result<Connection> {
    let properties = ConnectionProperties::default().with_connection_name(name.into());
    Connection::connect(url, properties)
        .await
        .with_context(|| format!("connecting to {}", pushfleet_core::topology::redact(url)))
}

async fn run(plan: Plan) -> Result<()> {
    let topology = Topology::new(&pushfleet_core::config::RabbitSettings {
        namespace: plan.namespace.clone(),
        ..Default::default()
    });
    let queue = topology.lane_queue(Lane::Calls);
    let exchange = topology.jobs_exchange();
    let publisher_conn = connect(&plan.url, "pushfleet-ceiling-publisher").await?;
    let consumer_conn = connect(&plan.url, "pushfleet-ceiling-consumer").await?;
    let publisher = publisher_conn.create_channel().await?;
    topology.declare(&publisher_conn).await?;
    publisher
        .queue_purge(queue.clone().into(), QueuePurgeOptions::default())
        .await
        .context("emptying the queue")?;
    publisher
        .confirm_select(ConfirmSelectOptions::default())
        .await?;

    let mut job = job_message();
    let body = serde_json::to_vec(&job)?;
    report("message_bytes", body.len());

    let consumed = Arc::new(AtomicU64::new(0));
    let confirmed = Arc::new(AtomicU64::new(0));
    let nacked = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));

    let consumer_channel = consumer_conn.create_channel().await?;
    consumer_channel
        .basic_qos(plan.prefetch, BasicQosOptions::default())
        .await?;
    let mut deliveries = consumer_channel
        .basic_consume(
            queue.clone().into(),
            "pushfleet-ceiling".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await?;
    let consumer = {
        let consumed = consumed.clone();
        let ack_every = plan.ack_every;
        tokio::spawn(async move {
            let mut unacked = 0u64;
            while let Some(Ok(delivery)) = deliveries.next().await {
                unacked += 1;
                if unacked >= ack_every {
                    delivery
                        .ack(BasicAckOptions { multiple: true })
                        .await
                        .context("ack")?;
                    consumed.fetch_add(unacked, Ordering::Relaxed);
                    unacked = 0;
                }
            }
            Ok::<_, anyhow::Error>(())
        })
    };

    let publishing = {
        let window = Arc::new(Semaphore::new(plan.window));
        let confirmed = confirmed.clone();
        let nacked = nacked.clone();
        let stop = stop.clone();
        tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                let permit = window.clone().acquire_owned().await?;
                // A fresh id per message, as ingest gives every job; the size stays the same.
                job.id = Uuid::new_v4();
                let body = serde_json::to_vec(&job)?;
                let properties = topology::job_properties(job.id)
                    .with_expiration(CALL_TTL_MS.to_string().into());
                let confirm = publisher
                    .basic_publish(
                        exchange.clone().into(),
                        Topology::lane_key(Lane::Calls).into(),
                        BasicPublishOptions {
                            mandatory: true,
                            ..Default::default()
                        },
                        &body,
                        properties,
                    )
                    .await?;
                let confirmed = confirmed.clone();
                let nacked = nacked.clone();
                tokio::spawn(async move {
                    match confirm.await {
                        Ok(Confirmation::Ack(None)) => confirmed.fetch_add(1, Ordering::Relaxed),
                        _ => nacked.fetch_add(1, Ordering::Relaxed),
                    };
                    drop(permit);
                });
            }
            // Let the last window be confirmed.
            let _ = window.acquire_many(plan.window as u32).await?;
            Ok::<_, anyhow::Error>(publisher)
        })
    };

    // The first fifth (at most 3 s) warms up the queue and the connections; it is not counted.
    let warmup = (plan.duration / 5).min(Duration::from_secs(3));
    tokio::time::sleep(warmup).await;
    let (consumed0, confirmed0, t0) = (
        consumed.load(Ordering::Relaxed),
        confirmed.load(Ordering::Relaxed),
        Instant::now(),
    );
    tokio::time::sleep(plan.duration - warmup).await;
    let (consumed1, confirmed1, elapsed) = (
        consumed.load(Ordering::Relaxed),
        confirmed.load(Ordering::Relaxed),
        t0.elapsed().as_secs_f64(),
    );
    stop.store(true, Ordering::Relaxed);
    let publisher = publishing.await??;
    consumer.abort();

    let published = confirmed.load(Ordering::Relaxed);
    report(
        "published_per_s",
        format!("{:.0}", (confirmed1 - confirmed0) as f64 / elapsed),
    );
    report(
        "consumed_per_s",
        format!("{:.0}", (consumed1 - consumed0) as f64 / elapsed),
    );
    report("measured_s", format!("{elapsed:.1}"));
    report("published", published);
    report("nacked", nacked.load(Ordering::Relaxed));
    report(
        "backlog",
        published.saturating_sub(consumed.load(Ordering::Relaxed)),
    );

    if let Some((cpu, _)) = process_usage("self") {
        report("client_cpu_s", format!("{cpu:.1}"));
    }

    // Leave the broker as it was.
    let _ = consumer_conn.close(200, "done".into()).await;
    let _ = publisher
        .queue_delete(queue.clone().into(), QueueDeleteOptions::default())
        .await;
    for other in topology.queues().into_iter().filter(|q| *q != queue) {
        let _ = publisher
            .queue_delete(other.into(), QueueDeleteOptions::default())
            .await;
    }
    for exchange in topology.exchanges() {
        let _ = publisher
            .exchange_delete(exchange.into(), ExchangeDeleteOptions::default())
            .await;
    }
    let _ = publisher_conn.close(200, "done".into()).await;
    Ok(())
}

fn main() -> ExitCode {
    main_of("pushfleet-ceiling", parse, run)
}
