//! What operators rely on: the configuration reloaded on SIGHUP by both binaries, run as
//! processes, without dropping a push; every metric family with its HELP and the build info;
//! readiness that follows Postgres.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::support::{
    call_id, fcm_token, postgres_url, sample, v1_body, Services, Stack, StackOptions, TcpProxy,
    LINPHONE, SYLK,
};

/// The stack's configuration file without its last app (Linphone on Firebase), written next to
/// it; the full file stays where it is.
fn without_last_app(stack: &Stack) -> (PathBuf, String) {
    let full = std::fs::read_to_string(&stack.config_path).unwrap();
    let cut = full
        .rfind("[[apps]]")
        .expect("apps in the test configuration");
    let path = stack.config_path.with_file_name("reloaded.toml");
    std::fs::write(&path, &full[..cut]).unwrap();
    (path, full)
}

fn linphone_push() -> Value {
    v1_body(
        LINPHONE,
        "firebase",
        &fcm_token(),
        "incoming_session",
        &call_id(),
    )
}

/// Pushes (a new call each time) until one gets `status`, for at most 15 s.
async fn push_until(services: &Services, make: impl Fn() -> Value, status: u16) -> Value {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let (got, answer) = services.push(&make()).await;
        if got == status {
            return answer;
        }
        assert!(
            Instant::now() < deadline,
            "still {got} instead of {status}: {answer}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Waits until both binaries' `/metrics` show `name` at `value` at least.
async fn wait_for_counter(services: &Services, name: &str, value: f64) {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let (ingest, worker) = services.metrics().await;
        if sample(&ingest, name) >= value && sample(&worker, name) >= value {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{name} not at {value}: ingest {}, worker {}",
            sample(&ingest, name),
            sample(&worker, name)
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn sighup_adds_an_app_to_both_binaries_without_a_restart() {
    let stack = Stack::start_with(StackOptions {
        start_worker: false,
        ..Default::default()
    })
    .await;
    let (path, full) = without_last_app(&stack);
    let mut services = Services::start(&path).await;
    let (status, answer) = services.push(&linphone_push()).await;
    assert_eq!(status, 404, "not configured yet: {answer}");

    std::fs::write(&path, full).unwrap();
    // `pushfleet reload` sends the SIGHUP; by pid, as other services may run on this machine.
    for pid in services.pids() {
        let (mut out, mut err) = (Vec::new(), Vec::new());
        let args = ["reload", "--pid", &pid.to_string(), "--config"]
            .into_iter()
            .map(String::from)
            .chain([path.display().to_string()])
            .collect();
        let code = pushfleet_client::run("pushfleet", args, &mut out, &mut err).await;
        let out = String::from_utf8_lossy(&out);
        assert_eq!(code, 0, "{out}{}", String::from_utf8_lossy(&err));
        assert!(out.starts_with("sent SIGHUP to pushfleet-"), "{out}");
    }
    // Each binary reloads on its own: until both have, a push may still be refused.
    let answer = push_until(&services, linphone_push, 200).await;
    assert_eq!(answer["code"], 200, "{answer}");
    wait_for_counter(&services, "pushfleet_config_reloads_total", 1.0).await;
    // The apps that were there all along still deliver, on the same processes.
    let (status, answer) = services
        .push(&v1_body(
            SYLK,
            "firebase",
            &fcm_token(),
            "incoming_session",
            &call_id(),
        ))
        .await;
    assert_eq!(status, 200, "{answer}");
    assert!(services.both_running(), "neither binary restarted");
    services.stop().await;
    stack.stop().await;
}

#[tokio::test]
async fn a_broken_file_on_sighup_leaves_the_old_configuration_serving() {
    let stack = Stack::start_with(StackOptions {
        start_worker: false,
        ..Default::default()
    })
    .await;
    let path = stack.config_path.with_file_name("broken.toml");
    let full = std::fs::read_to_string(&stack.config_path).unwrap();
    std::fs::write(&path, &full).unwrap();
    let mut services = Services::start(&path).await;

    // Not TOML at all, then TOML naming an APNs key that does not exist: both are refused, as
    // they would be at start-up.
    std::fs::write(&path, format!("{full}\n[[apps]\nid = ")).unwrap();
    services.hang_up();
    wait_for_counter(&services, "pushfleet_config_reload_failures_total", 1.0).await;
    let missing_key = full.replace(".p8\"", ".p8-gone\"");
    assert_ne!(missing_key, full, "the test configuration names a .p8 key");
    std::fs::write(&path, missing_key).unwrap();
    services.hang_up();
    wait_for_counter(&services, "pushfleet_config_reload_failures_total", 2.0).await;

    // Every app of the file in force still delivers: the Apple one with its token key too.
    for (app, platform, token) in [
        (LINPHONE, "firebase", fcm_token()),
        (SYLK, "apple", crate::support::apns_token()),
    ] {
        let (status, answer) = services
            .push(&v1_body(
                app,
                platform,
                &token,
                "incoming_session",
                &call_id(),
            ))
            .await;
        assert_eq!(status, 200, "{app} {platform}: {answer}");
    }
    let (ingest, worker) = services.metrics().await;
    assert_eq!(sample(&ingest, "pushfleet_config_reloads_total"), 0.0);
    assert_eq!(sample(&worker, "pushfleet_config_reloads_total"), 0.0);
    assert!(services.both_running());
    services.stop().await;
    stack.stop().await;
}

/// Every family: a `# TYPE` line with its `# HELP` line.
fn families_without_help(text: &str) -> Vec<String> {
    let helped: Vec<&str> = text
        .lines()
        .filter_map(|l| l.strip_prefix("# HELP ")?.split(' ').next())
        .collect();
    text.lines()
        .filter_map(|l| l.strip_prefix("# TYPE ")?.split(' ').next())
        .filter(|name| !helped.contains(name))
        .map(str::to_string)
        .collect()
}

#[tokio::test]
async fn both_binaries_describe_every_metric_and_their_build() {
    let stack = Stack::start_with(StackOptions {
        start_worker: false,
        ..Default::default()
    })
    .await;
    let services = Services::start(&stack.config_path).await;
    let (status, answer) = services
        .push(&v1_body(
            SYLK,
            "firebase",
            &fcm_token(),
            "incoming_session",
            &call_id(),
        ))
        .await;
    assert_eq!(status, 200, "{answer}");
    stack
        .deliveries(answer["data"]["call_id"].as_str().unwrap(), 1)
        .await;
    let (ingest, worker) = services.metrics().await;
    for (binary, text, expected) in [
        (
            "ingest",
            &ingest,
            &[
                "pushfleet_ingest_requests_total",
                "pushfleet_ingest_jobs_total",
                "pushfleet_ingest_sync_timeouts_total",
                "pushfleet_postgres_up",
            ][..],
        ),
        (
            "worker",
            &worker,
            &[
                "pushfleet_deliveries_total",
                "pushfleet_push_latency_seconds",
                "pushfleet_queue_wait_seconds",
                "pushfleet_provider_requests_total",
                "pushfleet_audit_lag_seconds",
                "pushfleet_postgres_up",
            ][..],
        ),
    ] {
        assert_eq!(
            families_without_help(text),
            Vec::<String>::new(),
            "{binary}"
        );
        for family in expected.iter().chain(&[
            "pushfleet_build_info",
            "pushfleet_broker_connected",
            "pushfleet_config_reload_failures_total",
            "process_resident_memory_bytes",
        ]) {
            assert!(
                text.contains(&format!("# HELP {family} ")),
                "{binary}: no HELP for {family}"
            );
        }
        let build = text
            .lines()
            .find(|l| l.starts_with("pushfleet_build_info{"))
            .unwrap_or_else(|| panic!("{binary}: no build info"));
        assert!(
            build.contains(&format!("version=\"{}\"", env!("CARGO_PKG_VERSION")))
                && build.contains("commit=\"")
                && build.ends_with(" 1"),
            "{binary}: {build}"
        );
    }
    // The provider metrics carry the app.
    assert!(
        worker.contains(&format!(
            "pushfleet_provider_requests_total{{app=\"{SYLK}\",platform=\"firebase\",status=\"200\"}}"
        )),
        "{worker}"
    );
    services.stop().await;
    stack.stop().await;
}

async fn status_of(url: &str) -> (u16, Value) {
    let response = reqwest::get(url).await.expect("answers");
    let status = response.status().as_u16();
    (status, response.json().await.unwrap_or(Value::Null))
}

/// Polls `url` until it answers `status`, for at most 10 s.
async fn wait_for_status(url: &str, status: u16) -> Value {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (got, body) = status_of(url).await;
        if got == status {
            return body;
        }
        assert!(Instant::now() < deadline, "{url}: {got} {body}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn readiness_of_both_follows_postgres() {
    let url = postgres_url();
    let (_, rest) = url.split_once("://").unwrap();
    let (credentials, rest) = rest.split_once('@').unwrap();
    let (host, database) = rest.split_once('/').unwrap();
    let proxy = TcpProxy::start(host.to_string()).await;
    let stack = Stack::start_with(StackOptions {
        postgres_url: Some(format!(
            "postgres://{credentials}@127.0.0.1:{}/{database}",
            proxy.port
        )),
        ..Default::default()
    })
    .await;
    let worker = format!(
        "http://{}/ready",
        stack.worker.as_ref().expect("a worker").http_addr
    );
    let ingest = stack.url("/ready");
    wait_for_status(&worker, 200).await;
    wait_for_status(&ingest, 200).await;

    proxy.cut();
    let body = wait_for_status(&worker, 503).await;
    assert_eq!(body["status"], "not connected to Postgres");
    let body = wait_for_status(&ingest, 503).await;
    assert!(
        body["description"].as_str().unwrap().contains("Postgres"),
        "{body}"
    );
    let metrics = stack.worker_metrics().await;
    assert!(
        metrics.contains("pushfleet_postgres_up{service=\"worker\"} 0"),
        "{metrics}"
    );

    proxy.restore();
    wait_for_status(&worker, 200).await;
    wait_for_status(&ingest, 200).await;
    stack.stop().await;
}

/// Counter values of the test process's recorder (the in-process services share it).
async fn counters(stack: &Stack) -> (f64, f64) {
    let text = stack.worker_metrics().await;
    (
        sample(&text, "pushfleet_config_reloads_total"),
        sample(&text, "pushfleet_config_reload_failures_total"),
    )
}

async fn push_linphone_apple(stack: &Stack) -> (u16, Value) {
    let token = crate::support::apns_token();
    stack
        .push(&v1_body(
            LINPHONE,
            "apple",
            &token,
            "incoming_session",
            &call_id(),
        ))
        .await
}

/// A certificate rotated on disk is picked up by the worker's periodic check, without SIGHUP; a
/// half-written one is refused once, and the client in force keeps delivering.
#[tokio::test]
async fn a_rotated_certificate_is_picked_up_without_a_signal() {
    let stack = Stack::start_with(StackOptions {
        env: vec![(
            "PUSHFLEET__WORKER__CREDENTIALS_CHECK_SECS".into(),
            "1".into(),
        )],
        ..Default::default()
    })
    .await;
    let (status, answer) = push_linphone_apple(&stack).await;
    assert_eq!(status, 200, "{answer}");

    let (_, failures) = counters(&stack).await;
    std::fs::write(
        &stack.files.apns_client_cert_pem,
        "-----BEGIN CERTIFICATE-----\n",
    )
    .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while counters(&stack).await.1 < failures + 1.0 {
        assert!(
            Instant::now() < deadline,
            "the broken certificate was not noticed"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (status, answer) = push_linphone_apple(&stack).await;
    assert_eq!(
        status, 200,
        "the certificate in force still serves: {answer}"
    );

    let (reloads, _) = counters(&stack).await;
    let (cert, key) = stack.fakes.apns.issue_client_certificate(LINPHONE);
    std::fs::write(&stack.files.apns_client_key_pem, key).unwrap();
    std::fs::write(&stack.files.apns_client_cert_pem, cert).unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while counters(&stack).await.0 < reloads + 1.0 {
        assert!(
            Instant::now() < deadline,
            "the new certificate was not picked up"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (status, answer) = push_linphone_apple(&stack).await;
    assert_eq!(status, 200, "{answer}");
    stack.stop().await;
}

/// The stack's configuration without the app `id` on `platform`.
fn without_app(full: &str, id: &str, platform: &str) -> String {
    let mut blocks = full.split("[[apps]]");
    let mut kept = blocks.next().unwrap_or_default().to_string();
    let named = format!("id = \"{id}\"\nplatform = \"{platform}\"");
    for block in blocks {
        if !block.contains(&named) {
            kept.push_str("[[apps]]");
            kept.push_str(block);
        }
    }
    kept
}

/// An app removed while one of its pushes is at the provider: that push still gets its answer
/// (the worker finishes it with the client it started with); the next one is refused.
#[tokio::test]
async fn a_push_in_flight_survives_the_removal_of_its_app() {
    let stack = Stack::start_with(StackOptions {
        start_worker: false,
        fakes: pushfleet_fakes::FakeOptions::default()
            .with_response_delay(Duration::from_millis(3000)),
        ..Default::default()
    })
    .await;
    let path = stack.config_path.with_file_name("shrinking.toml");
    let full = std::fs::read_to_string(&stack.config_path).unwrap();
    std::fs::write(&path, &full).unwrap();
    let services = Services::start(&path).await;

    let body = v1_body(
        SYLK,
        "firebase",
        &fcm_token(),
        "incoming_session",
        &call_id(),
    );
    let reloaded = AtomicBool::new(false);
    let (in_flight, ()) = tokio::join!(
        async {
            let answer = services.push(&body).await;
            (answer, reloaded.load(Ordering::SeqCst))
        },
        async {
            let deadline = Instant::now() + Duration::from_secs(10);
            while stack.fakes.fcm.request_count() == 0 {
                assert!(
                    Instant::now() < deadline,
                    "the push did not reach the provider"
                );
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            std::fs::write(&path, without_app(&full, SYLK, "firebase")).unwrap();
            services.hang_up();
            wait_for_counter(&services, "pushfleet_config_reloads_total", 1.0).await;
            reloaded.store(true, Ordering::SeqCst);
        }
    );
    let ((status, answer), reloaded_first) = in_flight;
    assert!(reloaded_first, "both reloaded while the push was in flight");
    assert_eq!(status, 200, "the push in flight was answered: {answer}");
    let (status, answer) = services.push(&body).await;
    assert_eq!(status, 404, "the app is gone: {answer}");
    services.stop().await;
    stack.stop().await;
}
