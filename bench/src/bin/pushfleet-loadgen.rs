//! Drives pushfleet's ingest API with Sylk v1 incoming-call requests, as SylkServer sends them,
//! over many keep-alive HTTP/1.1 connections: as fast as the answers come back (closed loop, one
//! request in flight per connection) or at a fixed rate (open loop: request `i` is due at
//! `start + i / rate`, and its latency counts from that instant, so a stall is not hidden).
//!
//! ```text
//! pushfleet-loadgen --url http://127.0.0.1:8400/push [--connections 64] [--duration 10]
//!                   [--rate 0] [--expect 202] [--tag bench] [--app-id ID] [--platform apple]
//!                   [--timeout-ms 10000]
//! ```
//! Every request carries a unique call-id `<tag>-<n>@bench.pushfleet` and a unique 64-hex-digit
//! token. Prints a `key=value` report on stdout (see `report` below).

use std::collections::BTreeMap;
use std::process::ExitCode;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1;
use hyper::{Request, Uri};
use hyper_util::rt::TokioIo;
use pushfleet_bench::{main_of, process_usage, quantile, report, Args};
use tokio::net::TcpStream;
use tokio::time::Instant;

const USAGE: &str = "usage: pushfleet-loadgen --url http://HOST:PORT/push [--connections N] \
[--duration SECS] [--rate PER_SEC (0: as fast as possible)] [--expect STATUS] [--tag TAG] \
[--app-id ID] [--platform apple|firebase] [--timeout-ms MS]";

struct Plan {
    uri: Uri,
    host: String,
    connections: usize,
    duration: Duration,
    /// Requests per second; 0 for closed loop.
    rate: f64,
    expect: u16,
    tag: String,
    app_id: String,
    platform: String,
    timeout: Duration,
}

/// What one connection saw.
#[derive(Default)]
struct Tally {
    /// Per answered request: microseconds from due (or sent) to the full answer.
    latencies_us: Vec<u32>,
    statuses: BTreeMap<u16, u64>,
    /// Connection failures, broken connections and timeouts.
    transport_errors: u64,
    /// Fixed rate: requests sent more than 5 ms after they were due (the generator fell behind).
    late: u64,
}

fn parse() -> Result<Plan> {
    let args = Args::parse(
        USAGE,
        &[
            "url",
            "connections",
            "duration",
            "rate",
            "expect",
            "tag",
            "app-id",
            "platform",
            "timeout-ms",
        ],
    )?;
    let uri: Uri = args.required("url")?.parse().context("--url")?;
    if uri.scheme_str() != Some("http") {
        bail!("--url must be http://");
    }
    let host = uri
        .authority()
        .context("--url needs a host and port")?
        .to_string();
    let connections: usize = args.number("connections", 64)?;
    if connections == 0 {
        bail!("--connections must be at least 1");
    }
    Ok(Plan {
        uri,
        host,
        connections,
        duration: Duration::from_secs_f64(args.number("duration", 10.0)?),
        rate: args.number("rate", 0.0)?,
        expect: args.number("expect", 202)?,
        tag: args.string("tag", "bench"),
        app_id: args.string("app-id", "com.example.sylk"),
        platform: args.string("platform", "apple"),
        timeout: Duration::from_millis(args.number("timeout-ms", 10_000)?),
    })
}

/// A well-spread 64-bit value per request (splitmix64), for tokens that look like real ones.
fn mix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

fn body(plan: &Plan, n: u64) -> Bytes {
    let token = format!(
        "{:016x}{:016x}{:016x}{:016x}",
        mix(n),
        mix(n ^ (1 << 62)),
        mix(n ^ (2 << 62)),
        mix(n ^ (3 << 62))
    );
    Bytes::from(format!(
        r#"{{"app-id": "{app}", "platform": "{platform}", "token": "{token}", "device-id": "bench-device-{device}", "call-id": "{tag}-{n}@bench.pushfleet", "event": "incoming_session", "media-type": "audio", "silent": "1", "from": "alice@example.com", "from-display-name": "Alice", "to": "bob@example.com"}}"#,
        app = plan.app_id,
        platform = plan.platform,
        device = n % 10_000,
        tag = plan.tag,
    ))
}

async fn connect(plan: &Plan) -> Result<http1::SendRequest<Full<Bytes>>> {
    let stream = TcpStream::connect(&plan.host).await?;
    stream.set_nodelay(true)?;
    let (sender, connection) = http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(async move {
        let _ = connection.await;
    });
    Ok(sender)
}

/// One client: sends the next due request whenever its previous one is answered.
async fn client(
    plan: Arc<Plan>,
    next: Arc<AtomicU64>,
    start: Instant,
    mut sender: Option<http1::SendRequest<Full<Bytes>>>,
) -> Tally {
    let mut tally = Tally::default();
    let end = start + plan.duration;
    loop {
        let n = next.fetch_add(1, Ordering::Relaxed);
        let due = if plan.rate > 0.0 {
            start + Duration::from_secs_f64(n as f64 / plan.rate)
        } else {
            Instant::now()
        };
        // The clock stops at `end` even when requests are still due: a generator (or a system)
        // that fell behind shows as fewer requests than offered, not as a longer run.
        if due >= end || Instant::now() >= end {
            break;
        }
        tokio::time::sleep_until(due).await;
        let sent = Instant::now();
        if plan.rate > 0.0 && sent.duration_since(due) > Duration::from_millis(5) {
            tally.late += 1;
        }
        let request = Request::post(plan.uri.clone())
            .header(hyper::header::HOST, &plan.host)
            .header(hyper::header::CONTENT_TYPE, "application/json")
            .body(Full::new(body(&plan, n)))
            .expect("a valid request");
        let answer = tokio::time::timeout(plan.timeout, async {
            let s = match sender.as_mut() {
                Some(s) => s,
                None => sender.insert(connect(&plan).await?),
            };
            s.ready().await?;
            let response = s.send_request(request).await?;
            let status = response.status().as_u16();
            response.into_body().collect().await?;
            Ok::<_, anyhow::Error>(status)
        })
        .await;
        match answer {
            Ok(Ok(status)) => {
                *tally.statuses.entry(status).or_default() += 1;
                let from = if plan.rate > 0.0 { due } else { sent };
                let us = from.elapsed().as_micros().min(u32::MAX as u128) as u32;
                tally.latencies_us.push(us);
            }
            Ok(Err(_)) | Err(_) => {
                tally.transport_errors += 1;
                // The connection is in an unknown state: open a fresh one for the next request.
                sender = None;
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
    }
    tally
}

async fn run(plan: Plan) -> Result<()> {
    let plan = Arc::new(plan);
    // Every connection is open before the clock starts.
    let mut senders = Vec::with_capacity(plan.connections);
    for _ in 0..plan.connections {
        senders.push(
            connect(&plan)
                .await
                .with_context(|| format!("connecting to {}", plan.host))?,
        );
    }
    let next = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let tasks: Vec<_> = senders
        .into_iter()
        .map(|s| tokio::spawn(client(plan.clone(), next.clone(), start, Some(s))))
        .collect();
    let mut tally = Tally::default();
    for task in tasks {
        let t = task.await?;
        let m = &mut tally;
        m.latencies_us.extend(t.latencies_us);
        for (status, count) in t.statuses {
            *m.statuses.entry(status).or_default() += count;
        }
        m.transport_errors += t.transport_errors;
        m.late += t.late;
    }
    let elapsed = start.elapsed().as_secs_f64();
    tally.latencies_us.sort_unstable();

    let answered: u64 = tally.statuses.values().sum();
    let requests = answered + tally.transport_errors;
    let expected = tally.statuses.get(&plan.expect).copied().unwrap_or(0);
    // 200 (sync answer) and 202 (queued) both mean ingest accepted the push for delivery.
    let queued: u64 = [200, 202]
        .iter()
        .filter_map(|s| tally.statuses.get(s))
        .sum();
    let ms = |q: f64| format!("{:.1}", quantile(&tally.latencies_us, q) as f64 / 1000.0);
    report("requests", requests);
    report("expected_status", plan.expect);
    report("expected", expected);
    report("queued", queued);
    report("unexpected_status", answered - expected);
    report("transport_errors", tally.transport_errors);
    report("errors", requests - expected);
    for (status, count) in &tally.statuses {
        report(&format!("status_{status}"), count);
    }
    report("elapsed_s", format!("{elapsed:.2}"));
    let offered = if plan.rate > 0.0 {
        plan.rate
    } else {
        requests as f64 / elapsed
    };
    report("offered_per_s", format!("{offered:.0}"));
    report(
        "answered_per_s",
        format!("{:.0}", answered as f64 / elapsed),
    );
    report("late", tally.late);
    // Fixed rate: requests that were due but never sent because the run ended first.
    let due = (plan.rate * plan.duration.as_secs_f64()).floor() as u64;
    report("unsent", due.saturating_sub(requests));
    report("p50_ms", ms(0.50));
    report("p99_ms", ms(0.99));
    report("max_ms", ms(1.0));
    if let Some((cpu, hwm_kb)) = process_usage("self") {
        report("cpu_s", format!("{cpu:.2}"));
        report("peak_rss_kb", hwm_kb);
    }
    Ok(())
}

fn main() -> ExitCode {
    main_of("pushfleet-loadgen", parse, run)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan() -> Plan {
        Plan {
            uri: "http://127.0.0.1:8400/push".parse().unwrap(),
            host: "127.0.0.1:8400".into(),
            connections: 1,
            duration: Duration::from_secs(1),
            rate: 0.0,
            expect: 202,
            tag: "t".into(),
            app_id: "com.example.sylk".into(),
            platform: "apple".into(),
            timeout: Duration::from_secs(1),
        }
    }

    #[test]
    fn requests_are_sylk_v1_calls_with_unique_ids_and_tokens() {
        let plan = plan();
        let a: serde_json::Value = serde_json::from_slice(&body(&plan, 1)).unwrap();
        let b: serde_json::Value = serde_json::from_slice(&body(&plan, 2)).unwrap();
        assert_eq!(a["event"], "incoming_session");
        assert_eq!(a["silent"], "1");
        assert_eq!(a["call-id"], "t-1@bench.pushfleet");
        let token = a["token"].as_str().unwrap();
        assert_eq!(token.len(), 64);
        assert!(token.chars().all(|c| c.is_ascii_hexdigit()));
        assert_ne!(a["token"], b["token"]);
        assert_ne!(a["call-id"], b["call-id"]);
    }
}
