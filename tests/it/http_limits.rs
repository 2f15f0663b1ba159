//! The HTTP limits of both listeners (`[http]`): slow and idle clients are closed after their
//! timeouts without delaying anyone else, the connection cap holds extra connections back, load
//! beyond the in-flight bound is shed with 503 while probes answer, a slow body gets 408, and
//! ingest's shutdown lets requests in progress finish up to its deadline.

use std::io::ErrorKind;
use std::net::SocketAddr;
use std::time::Duration;

use pushfleet_fakes::FakeOptions;
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio::time::{sleep, timeout, Instant};

use crate::support::*;

fn http_config(keys: &str) -> String {
    format!("\n[http]\n{keys}\n")
}

fn ingest_addr(stack: &Stack) -> SocketAddr {
    stack.ingest.as_ref().unwrap().addr
}

/// One HTTP/1.1 answer read off a raw connection.
#[derive(Debug)]
struct RawResponse {
    status: u16,
    /// Lower-case names.
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl RawResponse {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|_| {
            panic!(
                "answer {} is not JSON: {}",
                self.status,
                String::from_utf8_lossy(&self.body)
            )
        })
    }
}

/// Reads one response with a `Content-Length` body.
async fn read_response(stream: &mut TcpStream) -> std::io::Result<RawResponse> {
    let mut buf = Vec::new();
    let head_end = loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break end + 4;
        }
        let mut chunk = [0u8; 4096];
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            return Err(ErrorKind::UnexpectedEof.into());
        }
        buf.extend_from_slice(&chunk[..n]);
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).to_string();
    let mut lines = head.split("\r\n");
    let status = lines
        .next()
        .and_then(|line| line.split(' ').nth(1))
        .and_then(|code| code.parse().ok())
        .expect("status line");
    let headers: Vec<(String, String)> = lines
        .filter_map(|line| line.split_once(':'))
        .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    let length: usize = headers
        .iter()
        .find(|(n, _)| n == "content-length")
        .map_or(0, |(_, v)| v.parse().expect("content-length"));
    let mut body = buf[head_end..].to_vec();
    while body.len() < length {
        let mut chunk = [0u8; 4096];
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            return Err(ErrorKind::UnexpectedEof.into());
        }
        body.extend_from_slice(&chunk[..n]);
    }
    Ok(RawResponse {
        status,
        headers,
        body,
    })
}

async fn get(stream: &mut TcpStream, path: &str) -> RawResponse {
    let request = format!("GET {path} HTTP/1.1\r\nHost: pushfleet\r\n\r\n");
    stream.write_all(request.as_bytes()).await.unwrap();
    timeout(Duration::from_secs(5), read_response(stream))
        .await
        .expect("answered within 5 s")
        .expect("a complete response")
}

/// Waits for the server to close `stream`: EOF, or a reset when a byte of ours was still
/// unread at the close. Anything else (an answer, still open after `within`) fails.
async fn closed_by_server(stream: &mut TcpStream, within: Duration) -> &'static str {
    let mut buf = [0u8; 1024];
    match timeout(within, stream.read(&mut buf)).await {
        Err(_) => panic!("still open after {within:?}"),
        Ok(Ok(0)) => "eof",
        Ok(Ok(n)) => panic!(
            "answered instead of closed: {:?}",
            String::from_utf8_lossy(&buf[..n])
        ),
        Ok(Err(e)) if e.kind() == ErrorKind::ConnectionReset => "reset",
        Ok(Err(e)) => panic!("read failed: {e}"),
    }
}

/// How a slowloris connection ended.
#[derive(Debug)]
struct SlowEnd {
    connected_at: Instant,
    closed_at: Instant,
    how: &'static str,
}

/// Opens a connection that sends the start of a request head, then one more header byte every
/// 100 ms without ever finishing it, until the server closes it (at most 15 s).
async fn slowloris(addr: SocketAddr, ready: mpsc::Sender<()>) -> Result<SlowEnd, String> {
    let connected_at = Instant::now();
    let stream = TcpStream::connect(addr)
        .await
        .map_err(|e| format!("connect: {e}"))?;
    let (mut reader, mut writer) = stream.into_split();
    writer
        .write_all(
            b"POST /push HTTP/1.1\r\nHost: pushfleet\r\nContent-Type: application/json\r\nX-Slow: ",
        )
        .await
        .map_err(|e| format!("first bytes: {e}"))?;
    let _ = ready.send(()).await;
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    let mut buf = [0u8; 1024];
    let end = |how| {
        Ok(SlowEnd {
            connected_at,
            closed_at: Instant::now(),
            how,
        })
    };
    loop {
        if connected_at.elapsed() > Duration::from_secs(15) {
            return Err("still open after 15 s".into());
        }
        tokio::select! {
            read = reader.read(&mut buf) => return match read {
                Ok(0) => end("eof"),
                Ok(n) => Err(format!("answered: {:?}", String::from_utf8_lossy(&buf[..n]))),
                Err(e) if e.kind() == ErrorKind::ConnectionReset => end("reset"),
                Err(e) => Err(format!("read: {e}")),
            },
            _ = tick.tick() => {
                if writer.write_all(b"x").await.is_err() {
                    return end("write refused");
                }
            }
        }
    }
}

/// Opens `n` slowloris connections; returns once each has sent its first bytes. They open in
/// batches smaller than the listen backlog (128): the test and the server share one thread, and
/// a burst larger than the backlog would have SYNs dropped and retried a second later.
async fn open_slowloris(
    addr: SocketAddr,
    n: usize,
) -> Vec<tokio::task::JoinHandle<Result<SlowEnd, String>>> {
    let mut tasks = Vec::with_capacity(n);
    let opened = Instant::now();
    while tasks.len() < n {
        let batch = (n - tasks.len()).min(50);
        let (ready, mut readies) = mpsc::channel(batch);
        tasks.extend((0..batch).map(|_| tokio::spawn(slowloris(addr, ready.clone()))));
        drop(ready);
        for _ in 0..batch {
            let deadline = Duration::from_secs(5).saturating_sub(opened.elapsed());
            timeout(deadline, readies.recv())
                .await
                .expect("slow connections open within 5 s")
                .expect("every connection opens");
        }
    }
    tasks
}

/// The sum of the `pushfleet_ingest_requests_total` samples carrying every one of `labels`.
async fn requests_counted(stack: &Stack, labels: &[&str]) -> f64 {
    let text = stack
        .http
        .get(stack.url("/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    text.lines()
        .filter(|line| line.starts_with("pushfleet_ingest_requests_total{"))
        .filter(|line| labels.iter().all(|label| line.contains(label)))
        .filter_map(|line| line.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

#[tokio::test]
async fn slowloris_connections_delay_no_push_and_are_closed_after_the_header_timeout() {
    let stack = Stack::start_with(StackOptions {
        extra_config: http_config("header_read_timeout_ms = 1000"),
        ..Default::default()
    })
    .await;
    let addr = ingest_addr(&stack);
    let push = || async {
        let sent = Instant::now();
        let body = v1_body(SYLK, "apple", &apns_token(), "incoming_session", &call_id());
        let (status, answer) = stack.push(&body).await;
        assert_eq!(status, 200, "{answer}");
        (Instant::now(), Instant::now() - sent)
    };
    // The first push opens the provider connection; the one measured is an ordinary one.
    let (_, unloaded) = push().await;
    let slow = open_slowloris(addr, 300).await;
    let (answered_at, latency) = push().await;
    assert!(
        latency < Duration::from_secs(1),
        "answered in {latency:?} beside 300 slow connections"
    );

    let mut lifetimes = Vec::new();
    let mut eofs = 0;
    for task in slow {
        let end = task.await.unwrap().expect("closed by the server");
        assert!(
            end.closed_at > answered_at,
            "every slow connection was still open when the push was answered"
        );
        lifetimes.push(end.closed_at - end.connected_at);
        eofs += usize::from(end.how == "eof");
    }
    lifetimes.sort();
    let (first, median, last) = (lifetimes[0], lifetimes[150], lifetimes[299]);
    eprintln!(
        "slowloris: push answered in {latency:?} beside 300 slow connections (the first push, \
         alone: {unloaded:?}); they were closed after {first:?} (first), {median:?} (median), \
         {last:?} (last); {eofs} of 300 saw EOF, the others a reset"
    );
    // Trickling bytes does not extend the header timeout.
    assert!(
        first >= Duration::from_millis(950),
        "closed early: {first:?}"
    );
    assert!(last < Duration::from_millis(3000), "closed late: {last:?}");
    stack.stop().await;
}

#[tokio::test]
async fn at_the_connection_cap_new_connections_wait_while_open_ones_keep_working() {
    let stack = Stack::start_with(StackOptions {
        start_worker: false,
        extra_config: http_config("max_connections = 2\nheader_read_timeout_ms = 1500"),
        ..Default::default()
    })
    .await;
    let addr = ingest_addr(&stack);
    let mut open = TcpStream::connect(addr).await.unwrap();
    assert_eq!(get(&mut open, "/health").await.status, 200);
    // The second slot, held by a connection that sends nothing.
    let mut idle = TcpStream::connect(addr).await.unwrap();
    let idle_connected = Instant::now();
    sleep(Duration::from_millis(200)).await;

    // A third connection completes its TCP handshake (the listen backlog) but is not served.
    let mut waiting = TcpStream::connect(addr).await.unwrap();
    waiting
        .write_all(b"GET /health HTTP/1.1\r\nHost: pushfleet\r\n\r\n")
        .await
        .unwrap();
    let waiting_sent = Instant::now();
    let waiting_answer = tokio::spawn(async move {
        let response = read_response(&mut waiting).await;
        (response, Instant::now())
    });
    sleep(Duration::from_millis(500)).await;
    assert!(!waiting_answer.is_finished(), "served beyond the cap");

    // The connections already open keep working.
    let again = Instant::now();
    assert_eq!(get(&mut open, "/health").await.status, 200);
    assert!(again.elapsed() < Duration::from_millis(500));

    // The idle one is closed at its header timeout, and the waiting one takes its slot.
    closed_by_server(&mut idle, Duration::from_secs(5)).await;
    let idle_closed = Instant::now();
    let (response, answered_at) = timeout(Duration::from_secs(5), waiting_answer)
        .await
        .expect("served once a slot is free")
        .unwrap();
    assert_eq!(response.expect("a response").status, 200);
    assert!(idle_closed - idle_connected >= Duration::from_millis(1400));
    assert!(
        answered_at + Duration::from_millis(100) >= idle_closed,
        "served only after a slot freed"
    );
    eprintln!(
        "connection cap: the third connection waited {:?} for a slot",
        answered_at - waiting_sent
    );
    stack.stop().await;
}

#[tokio::test]
async fn beyond_the_in_flight_bound_requests_get_503_while_probes_answer() {
    let stack = Stack::start_with(StackOptions {
        start_worker: false,
        sync_timeout_ms: 3000,
        extra_config: http_config("max_in_flight_requests = 1"),
        ..Default::default()
    })
    .await;
    let overloaded_before = requests_counted(&stack, &[r#"error="overloaded""#]).await;
    // No worker: this sync push holds the only in-flight slot for its whole wait.
    let held = {
        let http = stack.http.clone();
        let url = stack.url("/push");
        let body = v1_body(SYLK, "apple", &apns_token(), "incoming_session", &call_id());
        tokio::spawn(async move { http.post(url).json(&body).send().await })
    };
    let mut shed = 0;
    let deadline = Instant::now() + Duration::from_secs(2);
    loop {
        let status = stack
            .http
            .get(stack.url("/"))
            .send()
            .await
            .unwrap()
            .status();
        if status == 503 {
            shed += 1;
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the held push never took the slot"
        );
        sleep(Duration::from_millis(20)).await;
    }

    for _ in 0..3 {
        let response = stack
            .http
            .post(stack.url("/push"))
            .json(&v1_body(
                SYLK,
                "apple",
                &apns_token(),
                "incoming_session",
                &call_id(),
            ))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 503);
        assert_eq!(response.headers()["retry-after"], "1");
        let body: Value = response.json().await.unwrap();
        assert_eq!(
            body,
            json!({"code": 503, "description": "too many requests in progress, retry later", "data": ""})
        );
        shed += 1;
    }
    for probe in ["/health", "/ready", "/metrics"] {
        let status = stack
            .http
            .get(stack.url(probe))
            .send()
            .await
            .unwrap()
            .status();
        assert_eq!(status, 200, "{probe} is never shed");
    }
    assert!(
        !held.is_finished(),
        "still in flight while the others were shed"
    );
    let overloaded_after = requests_counted(&stack, &[r#"error="overloaded""#]).await;
    assert_eq!(overloaded_after - overloaded_before, f64::from(shed));
    assert!(
        requests_counted(
            &stack,
            &[
                r#"route="/push""#,
                r#"status="503""#,
                r#"error="overloaded""#
            ]
        )
        .await
            >= 3.0
    );

    let held = held.await.unwrap().expect("the held push is answered");
    assert_eq!(held.status(), 202, "answered once its sync wait ran out");
    let status = stack
        .http
        .get(stack.url("/"))
        .send()
        .await
        .unwrap()
        .status();
    assert_eq!(status, 200, "served again once the slot is free");
    stack.stop().await;
}

#[tokio::test]
async fn a_body_that_arrives_too_slowly_gets_408_and_the_connection_is_closed() {
    let stack = Stack::start_with(StackOptions {
        start_worker: false,
        extra_config: http_config("request_body_timeout_ms = 1000"),
        ..Default::default()
    })
    .await;
    let timeouts_before = requests_counted(&stack, &[r#"error="body_timeout""#]).await;
    let stream = TcpStream::connect(ingest_addr(&stack)).await.unwrap();
    let (mut reader, mut writer) = stream.into_split();
    writer
        .write_all(
            b"POST /push HTTP/1.1\r\nHost: pushfleet\r\nContent-Type: application/json\r\n\
              Content-Length: 200\r\n\r\n{",
        )
        .await
        .unwrap();
    let sent = Instant::now();
    let trickle = tokio::spawn(async move {
        for _ in 0..50 {
            sleep(Duration::from_millis(200)).await;
            if writer.write_all(b" ").await.is_err() {
                return;
            }
        }
    });
    let mut raw = Vec::new();
    timeout(Duration::from_secs(5), reader.read_to_end(&mut raw))
        .await
        .expect("answered and closed within 5 s")
        .or_else(|e| {
            (e.kind() == ErrorKind::ConnectionReset)
                .then_some(0)
                .ok_or(e)
        })
        .unwrap();
    let elapsed = sent.elapsed();
    trickle.abort();
    let text = String::from_utf8_lossy(&raw).to_string();
    let (head, body) = text.split_once("\r\n\r\n").expect("a response");
    assert!(head.starts_with("HTTP/1.1 408 "), "{head}");
    assert!(
        head.to_ascii_lowercase().contains("\r\nconnection: close"),
        "{head}"
    );
    let body: Value = serde_json::from_str(body).unwrap();
    assert_eq!(
        body,
        json!({"code": 408, "description": "request body not received within 1000 ms", "data": ""})
    );
    assert!(
        elapsed >= Duration::from_millis(950) && elapsed < Duration::from_millis(3000),
        "{elapsed:?}"
    );
    let timeouts_after = requests_counted(&stack, &[r#"error="body_timeout""#]).await;
    assert_eq!(timeouts_after - timeouts_before, 1.0);
    stack.stop().await;
}

/// Forwards one connection to `target`; the task ends, with the instant, when the connection
/// does (a pooled client connection closes only once the server closed its side).
async fn forward_one(target: SocketAddr) -> (SocketAddr, tokio::task::JoinHandle<Instant>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let task = tokio::spawn(async move {
        let (mut client, _) = listener.accept().await.unwrap();
        let mut server = TcpStream::connect(target).await.unwrap();
        let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
        Instant::now()
    });
    (addr, task)
}

#[tokio::test]
async fn http2_prior_knowledge_is_served_and_closed_when_idle() {
    let stack = Stack::start_with(StackOptions {
        extra_config: http_config("idle_timeout_ms = 1500"),
        ..Default::default()
    })
    .await;
    let (addr, connection) = forward_one(ingest_addr(&stack)).await;
    let h2 = reqwest::Client::builder()
        .http2_prior_knowledge()
        .build()
        .unwrap();
    let health = h2
        .get(format!("http://{addr}/health"))
        .send()
        .await
        .unwrap();
    assert_eq!(health.version(), reqwest::Version::HTTP_2);
    assert_eq!(health.status(), 200);
    let call = call_id();
    let response = h2
        .post(format!("http://{addr}/push"))
        .json(&v1_body(
            SYLK,
            "apple",
            &apns_token(),
            "incoming_session",
            &call,
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(response.version(), reqwest::Version::HTTP_2);
    assert_eq!(response.status(), 200);
    let answer: Value = response.json().await.unwrap();
    assert_eq!(answer["data"]["call_id"], call.as_str());
    let idle_from = Instant::now();
    let closed_at = timeout(Duration::from_secs(5), connection)
        .await
        .expect("the idle HTTP/2 connection is closed")
        .unwrap();
    let idle = closed_at - idle_from;
    assert!(idle >= Duration::from_millis(1400), "closed after {idle:?}");
    stack.stop().await;
}

#[tokio::test]
async fn the_worker_listener_closes_slow_connections_and_idle_keep_alives() {
    let stack = Stack::start_with(StackOptions {
        extra_config: http_config("header_read_timeout_ms = 500\nidle_timeout_ms = 2000"),
        ..Default::default()
    })
    .await;
    let addr = stack.worker.as_ref().unwrap().http_addr;
    let slow = open_slowloris(addr, 20).await;

    // Probes answer meanwhile, and a keep-alive connection may idle longer than the header
    // timeout between requests.
    let mut keep_alive = TcpStream::connect(addr).await.unwrap();
    let health = get(&mut keep_alive, "/health").await;
    assert_eq!(health.status, 200);
    assert_eq!(health.json(), json!({"status": "ok"}));
    sleep(Duration::from_millis(1000)).await;
    let metrics = get(&mut keep_alive, "/metrics").await;
    assert_eq!(metrics.status, 200);
    assert!(metrics
        .header("content-type")
        .is_some_and(|t| t.starts_with("text/plain")));
    let idle_from = Instant::now();

    for task in slow {
        let end = task.await.unwrap().expect("closed by the server");
        let lifetime = end.closed_at - end.connected_at;
        assert!(
            lifetime >= Duration::from_millis(450) && lifetime < Duration::from_millis(2500),
            "slow connection closed after {lifetime:?}"
        );
    }
    closed_by_server(&mut keep_alive, Duration::from_secs(5)).await;
    let idle = idle_from.elapsed();
    assert!(
        idle >= Duration::from_millis(1900) && idle < Duration::from_millis(4000),
        "idle connection closed after {idle:?}"
    );
    stack.stop().await;
}

#[tokio::test]
async fn stop_answers_the_request_in_flight_and_closes_idle_connections_at_once() {
    let mut stack = Stack::start_with(StackOptions {
        fakes: FakeOptions::default().with_response_delay(Duration::from_millis(1500)),
        env: vec![(
            "PUSHFLEET__INGEST__SHUTDOWN_TIMEOUT_MS".into(),
            "5000".into(),
        )],
        ..Default::default()
    })
    .await;
    let addr = ingest_addr(&stack);
    let mut idle = TcpStream::connect(addr).await.unwrap();
    assert_eq!(get(&mut idle, "/health").await.status, 200);
    let mut half_sent = TcpStream::connect(addr).await.unwrap();
    half_sent
        .write_all(b"POST /push HTTP/1.1\r\nHost: pushfleet\r\n")
        .await
        .unwrap();
    let in_flight = {
        let http = reqwest::Client::new();
        let url = stack.url("/push");
        let body = v1_body(SYLK, "apple", &apns_token(), "incoming_session", &call_id());
        tokio::spawn(async move {
            let response = http.post(url).json(&body).send().await;
            (response, Instant::now())
        })
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    while stack.fakes.apns.request_count() == 0 {
        assert!(Instant::now() < deadline, "the push reached the provider");
        sleep(Duration::from_millis(10)).await;
    }

    let stop_called = Instant::now();
    let ingest = stack.ingest.take().unwrap();
    let stopping = tokio::spawn(async move {
        let stopped = ingest.stop().await;
        (stopped, Instant::now())
    });
    closed_by_server(&mut idle, Duration::from_millis(500)).await;
    closed_by_server(&mut half_sent, Duration::from_millis(500)).await;
    sleep(Duration::from_millis(100)).await;
    assert!(
        TcpStream::connect(addr).await.is_err(),
        "no new connections once stopping"
    );

    let (response, answered_at) = in_flight.await.unwrap();
    let response = response.expect("the request in flight is answered");
    let status = response.status();
    let answer = response.text().await.unwrap_or_default();
    assert_eq!(
        (
            status.as_u16(),
            answered_at - stop_called < Duration::from_secs(5)
        ),
        (200, true),
        "the provider's answer, over the broker, within the deadline: {answer}"
    );
    let (stopped, stopped_at) = stopping.await.unwrap();
    stopped.unwrap();
    assert!(stopped_at >= answered_at, "stop waited for the answer");
    let took = stopped_at - stop_called;
    assert!(took < Duration::from_secs(5), "stop took {took:?}");
    eprintln!("shutdown: request in flight answered and stop returned after {took:?}");
    stack.stop().await;
}

#[tokio::test]
async fn stop_returns_at_its_deadline_despite_a_request_that_would_take_longer() {
    let mut stack = Stack::start_with(StackOptions {
        start_worker: false,
        sync_timeout_ms: 30_000,
        env: vec![(
            "PUSHFLEET__INGEST__SHUTDOWN_TIMEOUT_MS".into(),
            "1000".into(),
        )],
        ..Default::default()
    })
    .await;
    let hung = {
        let http = reqwest::Client::new();
        let url = stack.url("/push");
        let body = v1_body(SYLK, "apple", &apns_token(), "incoming_session", &call_id());
        tokio::spawn(async move {
            let response = http.post(url).json(&body).send().await;
            (response.map(|r| r.status()), Instant::now())
        })
    };
    sleep(Duration::from_millis(500)).await;
    assert!(!hung.is_finished());

    let stop_called = Instant::now();
    stack.ingest.take().unwrap().stop().await.unwrap();
    let took = stop_called.elapsed();
    assert!(
        took >= Duration::from_millis(950) && took < Duration::from_millis(2500),
        "stop took {took:?} with a 1000 ms deadline"
    );
    let (response, ended_at) = timeout(Duration::from_secs(5), hung)
        .await
        .expect("the client learns at once")
        .unwrap();
    assert!(response.is_err(), "its connection was closed: {response:?}");
    assert!(ended_at - stop_called < Duration::from_millis(3000));
    eprintln!("shutdown: stop returned after {took:?} with a request still waiting");
    stack.stop().await;
}
