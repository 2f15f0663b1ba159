//! What ingest shows of itself and of its callers: answers carry token fingerprints, not
//! tokens; an admin listener alone serves the probes and metrics; log lines show callers'
//! identities only when asked to.

use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use pushfleet_core::tokens::token_fingerprint;
use serde_json::json;
use tokio::io::{AsyncBufReadExt, BufReader};

use crate::support::*;

#[tokio::test]
async fn answers_carry_token_fingerprints_not_tokens() {
    let stack = Stack::start().await;
    let token = apns_token();
    let (status, answer) = stack
        .push(&v1_body(
            SYLK,
            "apple",
            &token,
            "incoming_session",
            &call_id(),
        ))
        .await;
    assert_eq!(status, 200, "{answer}");
    assert!(!answer.to_string().contains(&token), "{answer}");
    assert_eq!(
        answer["data"]["token_fingerprint"],
        token_fingerprint(&token)
    );

    let account = format!("carol-{}@example.com", uuid::Uuid::new_v4().simple());
    let path = format!("/v2/tokens/{account}");
    let registration = json!({"app-id": SYLK, "platform": "apple", "token": token,
                              "device-id": "phone", "silent": "0"});
    let (status, echo) = stack.call("POST", &path, Some(&registration)).await;
    assert_eq!(status, 200, "{echo}");
    assert!(!echo.to_string().contains(&token), "{echo}");
    let push = json!({"call-id": call_id(), "from": "alice@example.com", "to": account,
                      "media-type": "audio", "event": "incoming_session"});
    let (status, answer) = stack
        .call("POST", &format!("{path}/push"), Some(&push))
        .await;
    assert_eq!(status, 200, "{answer}");
    assert!(!answer.to_string().contains(&token), "{answer}");
    assert_eq!(
        answer["data"][0]["token_fingerprint"],
        token_fingerprint(&token)
    );
    stack.stop().await;
}

#[tokio::test]
async fn the_reference_answer_with_raw_tokens_stays_available() {
    let stack = Stack::start_with(StackOptions {
        env: vec![(
            "PUSHFLEET__INGEST__RAW_TOKENS_IN_ANSWERS".into(),
            "true".into(),
        )],
        ..Default::default()
    })
    .await;
    let token = apns_token();
    let (status, answer) = stack
        .push(&v1_body(
            SYLK,
            "apple",
            &token,
            "incoming_session",
            &call_id(),
        ))
        .await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["data"]["token"], token.as_str());
    stack.stop().await;
}

#[tokio::test]
async fn the_admin_listener_alone_serves_probes_and_metrics() {
    let stack = Stack::start_with(StackOptions {
        env: vec![(
            "PUSHFLEET__INGEST__ADMIN_LISTEN".into(),
            "127.0.0.1:0".into(),
        )],
        ..Default::default()
    })
    .await;
    let admin = stack
        .ingest
        .as_ref()
        .unwrap()
        .admin_addr
        .expect("an admin listener");
    for path in ["/metrics", "/health", "/ready"] {
        let api = stack.http.get(stack.url(path)).send().await.unwrap();
        assert_eq!(api.status(), 404, "{path} on the API listener");
        let ops = stack
            .http
            .get(format!("http://{admin}{path}"))
            .send()
            .await
            .unwrap();
        assert_eq!(ops.status(), 200, "{path} on the admin listener");
    }
    // Pushes go to the API listener only.
    let (status, answer) = stack
        .push(&v1_body(
            SYLK,
            "apple",
            &apns_token(),
            "incoming_session",
            &call_id(),
        ))
        .await;
    assert_eq!(status, 200, "{answer}");
    let on_admin = stack
        .http
        .post(format!("http://{admin}/push"))
        .body("{}")
        .send()
        .await
        .unwrap();
    assert_eq!(on_admin.status(), 404);
    stack.stop().await;

    // The admin listener has its own access list.
    let guarded = Stack::start_with(StackOptions {
        env: vec![
            (
                "PUSHFLEET__INGEST__ADMIN_LISTEN".into(),
                "127.0.0.1:0".into(),
            ),
            (
                "PUSHFLEET__INGEST__ADMIN_ALLOWED_HOSTS".into(),
                "[\"192.0.2.1\"]".into(),
            ),
        ],
        ..Default::default()
    })
    .await;
    let admin = guarded.ingest.as_ref().unwrap().admin_addr.unwrap();
    let denied = guarded
        .http
        .get(format!("http://{admin}/metrics"))
        .send()
        .await
        .unwrap();
    assert_eq!(denied.status(), 403);
    let (status, answer) = guarded
        .push(&v1_body(
            SYLK,
            "apple",
            &apns_token(),
            "incoming_session",
            &call_id(),
        ))
        .await;
    assert_eq!(status, 200, "the API's own list is empty: {answer}");
    guarded.stop().await;
}

#[tokio::test]
async fn the_worker_is_ready_once_it_consumes() {
    let stack = Stack::start().await;
    let addr = stack.worker.as_ref().unwrap().http_addr;
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let ready = stack
            .http
            .get(format!("http://{addr}/ready"))
            .send()
            .await
            .unwrap();
        if ready.status() == 200 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "worker never ready: {}",
            ready.status()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    stack.stop().await;
}

/// The lines a `pushfleet-ingest` process logs while it accepts one push to `to`.
async fn ingest_log_lines(stack: &Stack, identities: bool, to: &str) -> Vec<String> {
    let port = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.local_addr().unwrap().port()
    };
    let bin = std::env::current_exe()
        .unwrap()
        .parent()
        .and_then(Path::parent)
        .unwrap()
        .join("pushfleet-ingest");
    let mut ingest = tokio::process::Command::new(bin)
        .arg("--config")
        .arg(&stack.config_path)
        .env("PUSHFLEET__INGEST__LISTEN", format!("127.0.0.1:{port}"))
        .env("PUSHFLEET__INGEST__MODE", "async")
        .env("PUSHFLEET__LOG__IDENTITIES", identities.to_string())
        .env("RUST_LOG", "info")
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("ingest starts");
    let mut lines = BufReader::new(ingest.stderr.take().unwrap()).lines();
    let mut seen = Vec::new();
    while let Ok(Some(line)) = lines.next_line().await {
        let listening = line.contains("ingest listening");
        seen.push(line);
        if listening {
            break;
        }
    }
    let mut body = v1_body(SYLK, "apple", &apns_token(), "message", &call_id());
    body["to"] = json!(to);
    let answer = stack
        .http
        .post(format!("http://127.0.0.1:{port}/push"))
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(answer.status(), 202);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while let Ok(Ok(Some(line))) = tokio::time::timeout_at(deadline, lines.next_line()).await {
        let accepted = line.contains("push accepted");
        seen.push(line);
        if accepted {
            break;
        }
    }
    let _ = ingest.start_kill();
    seen
}

#[tokio::test]
async fn log_lines_show_identities_only_when_asked() {
    let stack = Stack::start().await;
    let to = "sip:+15550123456@example.com";
    let hidden = ingest_log_lines(&stack, false, to).await;
    let accepted = hidden
        .iter()
        .find(|l| l.contains("push accepted"))
        .unwrap_or_else(|| panic!("{hidden:#?}"));
    assert!(!accepted.contains("5550123456"), "{accepted}");
    assert!(accepted.contains("to=id:"), "{accepted}");
    assert!(accepted.contains("token="), "{accepted}");
    assert!(
        hidden.iter().all(|l| !l.contains("5550123456")),
        "{hidden:#?}"
    );

    let shown = ingest_log_lines(&stack, true, to).await;
    let accepted = shown
        .iter()
        .find(|l| l.contains("push accepted"))
        .unwrap_or_else(|| panic!("{shown:#?}"));
    assert!(accepted.contains(to), "{accepted}");
    stack.stop().await;
}
