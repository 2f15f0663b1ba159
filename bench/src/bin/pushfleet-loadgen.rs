//! Drives pushfleet's ingest API with Sylk v1 incoming-call requests, as SylkServer sends them,
//! over many keep-alive HTTP/1.1 connections: as fast as the answers come back (closed loop, one
//! request in flight per connection) or at a fixed rate (open loop: request `i` is due at
//! `start + i / rate`, and its latency counts from that instant, so a stall is not hidden).
//!
//! ```text
//! pushfleet-loadgen --url http://127.0.0.1:8400/push [--connections 64] [--duration 10]
//!                   [--rate 0] [--requests 0] [--expect 202] [--tag bench] [--app-id ID]
//!                   [--platform apple] [--apps 0] [--events incoming_session,message]
//!                   [--accounts 0 --devices 10] [--timeout-ms 10000]
//! ```
//! Every request carries a unique call-id `<tag>-<n>@bench.pushfleet` and a unique 64-hex-digit
//! token. Prints a `key=value` report on stdout (see `report` below).
//!
//! - `--requests N` stops after N requests (or the duration, whichever comes first): a backlog
//!   of a known size.
//! - `--apps N` spreads the requests over N apps, `<app-id>.<k>` for k in 0..N, even k Apple and
//!   odd k Firebase (`--platform` is then ignored).
//! - `--events` cycles through the events named (request `n` gets event `n mod count`).
//! - `--accounts N` pushes to v2 accounts instead (`POST /v2/tokens/<tag>-acct-<k>/push`,
//!   `k = n mod N`): before the clock starts it registers `--devices` devices per account
//!   (`POST /v2/tokens/<account>`), each with its own token.

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
[--app-id ID] [--platform apple|firebase] [--timeout-ms MS] [--requests N] [--apps N] \
[--events EVENT,...] [--accounts N] [--devices N]";

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
    /// Requests in all; 0 for as many as the duration allows.
    requests: u64,
    /// Apps to spread over; 0 for `app_id` alone.
    apps: u64,
    events: Vec<String>,
    /// v2 accounts to push to; 0 for v1 pushes.
    accounts: u64,
    devices: u64,
    /// `http://host:port`, for the v2 paths.
    base: String,
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
            "requests",
            "apps",
            "events",
            "accounts",
            "devices",
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
    let events: Vec<String> = args
        .string("events", "incoming_session")
        .split(',')
        .map(str::trim)
        .filter(|e| !e.is_empty())
        .map(String::from)
        .collect();
    if events.is_empty() {
        bail!("--events needs at least one event");
    }
    let devices: u64 = args.number("devices", 10)?;
    if devices == 0 {
        bail!("--devices must be at least 1");
    }
    let base = format!("http://{host}");
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
        requests: args.number("requests", 0)?,
        apps: args.number("apps", 0)?,
        events,
        accounts: args.number("accounts", 0)?,
        devices,
        base,
    })
}

/// A well-spread 64-bit value per request (splitmix64), for tokens that look like real ones.
fn mix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

/// A unique 64-hex-digit token for `n`: the shape of an APNs token, and a valid FCM one.
fn token(n: u64) -> String {
    format!(
        "{:016x}{:016x}{:016x}{:016x}",
        mix(n),
        mix(n ^ (1 << 62)),
        mix(n ^ (2 << 62)),
        mix(n ^ (3 << 62))
    )
}

/// The app id and platform request `n` goes to.
fn app_of(plan: &Plan, n: u64) -> (String, &str) {
    if plan.apps == 0 {
        return (plan.app_id.clone(), plan.platform.as_str());
    }
    let k = n % plan.apps;
    let platform = if k.is_multiple_of(2) {
        "apple"
    } else {
        "firebase"
    };
    (format!("{}.{k}", plan.app_id), platform)
}

fn account(plan: &Plan, k: u64) -> String {
    format!("{}-acct-{k}", plan.tag)
}

/// Where request `n` goes and what it says.
fn request_for(plan: &Plan, n: u64) -> (Uri, Bytes) {
    let event = &plan.events[(n % plan.events.len() as u64) as usize];
    let tag = &plan.tag;
    if plan.accounts > 0 {
        let uri = format!(
            "{}/v2/tokens/{}/push",
            plan.base,
            account(plan, n % plan.accounts)
        );
        let body = format!(
            r#"{{"call-id": "{tag}-{n}@bench.pushfleet", "event": "{event}", "media-type": "audio", "from": "alice@example.com", "from-display-name": "Alice", "to": "bob@example.com"}}"#
        );
        return (uri.parse().expect("a valid v2 URL"), Bytes::from(body));
    }
    let (app, platform) = app_of(plan, n);
    let body = format!(
        r#"{{"app-id": "{app}", "platform": "{platform}", "token": "{token}", "device-id": "bench-device-{device}", "call-id": "{tag}-{n}@bench.pushfleet", "event": "{event}", "media-type": "audio", "silent": "1", "from": "alice@example.com", "from-display-name": "Alice", "to": "bob@example.com"}}"#,
        token = token(n),
        device = n % 10_000,
    );
    (plan.uri.clone(), Bytes::from(body))
}

/// Registers `--devices` devices for each of `--accounts` accounts, over one connection.
async fn register_devices(plan: &Plan) -> Result<u64> {
    let mut sender = connect(plan).await?;
    let mut registered = 0;
    for k in 0..plan.accounts {
        let uri: Uri = format!("{}/v2/tokens/{}", plan.base, account(plan, k)).parse()?;
        for d in 0..plan.devices {
            let body = format!(
                r#"{{"app-id": "{app}", "platform": "{platform}", "token": "{token}", "device-id": "bench-device-{d}", "silent": "1"}}"#,
                app = plan.app_id,
                platform = plan.platform,
                token = token((1 << 40) + k * plan.devices + d),
            );
            let request = Request::post(uri.clone())
                .header(hyper::header::HOST, &plan.host)
                .header(hyper::header::CONTENT_TYPE, "application/json")
                .body(Full::new(Bytes::from(body)))?;
            sender.ready().await?;
            let response = sender.send_request(request).await?;
            let status = response.status();
            let answer = response.into_body().collect().await?.to_bytes();
            if !status.is_success() {
                bail!(
                    "registering a device of {}: {status}: {}",
                    account(plan, k),
                    String::from_utf8_lossy(&answer)
                );
            }
            registered += 1;
        }
    }
    Ok(registered)
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
        if plan.requests > 0 && n >= plan.requests {
            break;
        }
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
        let (uri, body) = request_for(&plan, n);
        let request = Request::post(uri)
            .header(hyper::header::HOST, &plan.host)
            .header(hyper::header::CONTENT_TYPE, "application/json")
            .body(Full::new(body))
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
    let registered = if plan.accounts > 0 {
        register_devices(&plan).await?
    } else {
        0
    };
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
    report("registered_devices", registered);
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
            requests: 0,
            apps: 0,
            events: vec!["incoming_session".into()],
            accounts: 0,
            devices: 10,
            base: "http://127.0.0.1:8400".into(),
        }
    }

    fn json(plan: &Plan, n: u64) -> (String, serde_json::Value) {
        let (uri, body) = request_for(plan, n);
        (uri.to_string(), serde_json::from_slice(&body).unwrap())
    }

    #[test]
    fn requests_spread_over_apps_half_apple_half_firebase() {
        let mut plan = plan();
        plan.apps = 4;
        let apps: Vec<_> = (0..8).map(|n| json(&plan, n).1).collect();
        assert_eq!(apps[0]["app-id"], "com.example.sylk.0");
        assert_eq!(apps[0]["platform"], "apple");
        assert_eq!(apps[1]["app-id"], "com.example.sylk.1");
        assert_eq!(apps[1]["platform"], "firebase");
        assert_eq!(apps[5]["app-id"], "com.example.sylk.1");
        assert_eq!(apps[6]["platform"], "apple");
    }

    #[test]
    fn events_cycle_and_accounts_take_v2_pushes() {
        let mut plan = plan();
        plan.events = vec!["incoming_session".into(), "message".into()];
        assert_eq!(json(&plan, 0).1["event"], "incoming_session");
        assert_eq!(json(&plan, 3).1["event"], "message");
        plan.accounts = 3;
        let (uri, body) = json(&plan, 4);
        assert_eq!(uri, "http://127.0.0.1:8400/v2/tokens/t-acct-1/push");
        assert_eq!(body["call-id"], "t-4@bench.pushfleet");
        assert!(body.get("token").is_none());
    }

    #[test]
    fn requests_are_sylk_v1_calls_with_unique_ids_and_tokens() {
        let plan = plan();
        let a = json(&plan, 1).1;
        let b = json(&plan, 2).1;
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
