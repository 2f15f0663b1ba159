//! The `pushfleet` client against a running stack: the sylk-pushclient (v1) and
//! sylk-pushclient-v2 drop-ins keep the reference's output lines and exit codes; `tokens list`
//! and `audit` read the API.

use std::path::PathBuf;
use std::process::Command;

use pushfleet_core::tokens::token_fingerprint;
use uuid::Uuid;

use crate::support::*;

/// Runs the client in-process: (exit code, stdout, stderr).
/// The options OpenSIPS's script passes to sylk-pushclient.
fn v1_args(url: &str, token: &str, call: &str, event: &str) -> Vec<String> {
    [
        format!("--url={url}"),
        "--platform=ios".into(),
        format!("--appid={SYLK}"),
        "--from_name=\"Alice\"".into(),
        "--mediatype=audio, video".into(),
        format!("--event={event}"),
        format!("--token={token}"),
        "--deviceid=dev-1".into(),
        format!("--callid={call}"),
        "--from=\"alice@example.com\"".into(),
        "--to=bob@example.com".into(),
    ]
    .into()
}

fn refs(args: &[String]) -> Vec<&str> {
    args.iter().map(String::as_str).collect()
}

async fn closed_url() -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    format!("http://{}/push", listener.local_addr().unwrap())
}

#[tokio::test]
async fn the_v1_client_prints_and_exits_as_sylk_pushclient() {
    let stack = Stack::start().await;
    let url = stack.url("/push");
    let (voip, background) = (apns_token(), apns_token());
    let pair = format!("{voip}-{background}");
    let call = call_id();
    let (code, out, err) = pushfleet(&refs(&v1_args(&url, &pair, &call, "incoming_session"))).await;
    assert_eq!(code, 0, "{out}{err}");
    let prefix = format!("incoming_session push for {call} to {url} response 200 OK: {{");
    assert!(out.starts_with(&prefix), "{out}");
    // The reference's processing: first half of the pair, media reduced, quotes removed.
    let sent = stack.fakes.apns.journal().requests_for_token(&voip);
    let payload = sent[0].json.as_ref().unwrap();
    assert_eq!(payload["media-type"], "video");
    assert_eq!(payload["from_uri"], "alice@example.com");
    assert_eq!(payload["from_display_name"], "Alice");
    // cancel goes to the second half.
    let (code, out, _) = pushfleet(&refs(&v1_args(&url, &pair, &call, "cancel"))).await;
    assert_eq!(code, 0, "{out}");
    assert_eq!(
        stack
            .fakes
            .apns
            .journal()
            .requests_for_token(&background)
            .len(),
        1
    );

    // A gone token: the server answers 410, the client reports a failure.
    let gone = apns_token();
    stack
        .fakes
        .apns
        .set_token_state(&gone, pushfleet_fakes::ApnsTokenState::Bad);
    let (code, out, _) = pushfleet(&refs(&v1_args(&url, &gone, &call, "incoming_session"))).await;
    assert_eq!(code, 1);
    assert!(
        out.starts_with(&format!(
            "incoming_session push for {call} to {url} failed: 410: {{"
        )),
        "{out}"
    );

    // Nobody listening.
    let closed = closed_url().await;
    let (code, out, _) =
        pushfleet(&refs(&v1_args(&closed, &voip, &call, "incoming_session"))).await;
    assert_eq!(
        (code, out),
        (
            1,
            format!("incoming_session push for {call} to {closed} failed: connection error\n")
        )
    );

    // argparse's exit code for a missing option.
    let (code, _, err) = pushfleet(&["--url", &url, "--platform", "ios"]).await;
    assert_eq!(code, 2);
    assert!(
        err.contains("the following arguments are required: --appid, --token, --deviceid, --callid, --from, --to"),
        "{err}"
    );
    stack.stop().await;
}

#[tokio::test]
async fn the_v1_client_treats_202_as_a_failure() {
    let stack = Stack::start_async().await;
    let url = stack.url("/push");
    let call = call_id();
    let (code, out, _) = pushfleet(&refs(&v1_args(
        &url,
        &apns_token(),
        &call,
        "incoming_session",
    )))
    .await;
    assert_eq!(code, 1);
    assert!(
        out.starts_with(&format!(
            "incoming_session push for {call} to {url} failed: 202: {{"
        )),
        "{out}"
    );
    stack.stop().await;
}

#[tokio::test]
async fn the_v2_client_lists_and_audits() {
    let stack = Stack::start().await;
    let base = stack.url("/");
    let shown = base.trim_end_matches('/').to_string();
    let account = format!("carol-{}@example.com", Uuid::new_v4().simple());
    let token = fcm_token();
    let v2 = |args: &[&str]| {
        let mut all = vec!["--url", base.as_str(), "--account", account.as_str()];
        all.extend_from_slice(args);
        all.into_iter().map(str::to_string).collect::<Vec<_>>()
    };

    let add = v2(&[
        "add",
        "--platform",
        "android",
        "--appid",
        SYLK,
        "--token",
        &token,
        "--deviceid",
        "pixel",
    ]);
    let (code, out, _) = pushfleet(&refs(&add)).await;
    assert_eq!(code, 0, "{out}");
    assert!(
        out.starts_with(&format!(
            "Add request to {shown}/v2/tokens/{account} - 200: {{"
        )),
        "{out}"
    );
    // Without --platform the server refuses: exit 1 and the failure line.
    let (code, out, _) = pushfleet(&refs(&v2(&[
        "add",
        "--appid",
        SYLK,
        "--token",
        "t",
        "--deviceid",
        "d",
    ])))
    .await;
    assert_eq!(code, 1);
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 2, "{out}");
    assert!(lines[1].starts_with(&format!(
        "Add request to {shown}/v2/tokens/{account} failed: 400: "
    )));
    assert!(lines[1].contains("Field 'platform' required"));

    let call = call_id();
    let push = v2(&[
        "push",
        "--callid",
        &call,
        "--from",
        "alice@example.com",
        "--to",
        "carol",
    ]);
    let (code, out, _) = pushfleet(&refs(&push)).await;
    assert_eq!(code, 0, "{out}");
    assert!(out.starts_with(&format!(
        "Push request to {shown}/v2/tokens/{account}/push - 200: "
    )));
    let (code, out, _) = pushfleet(&refs(&v2(&[
        "push",
        "--callid",
        &call,
        "--from",
        "a",
        "--to",
        "b",
        "--deviceid",
        "nope",
    ])))
    .await;
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("/push/nope failed: 404: "), "{out}");

    // tokens list: fingerprints, never the token.
    let (code, out, _) = pushfleet(&refs(&v2(&["tokens", "list"]))).await;
    assert_eq!(code, 0, "{out}");
    assert!(
        out.contains("pixel") && out.contains(&token_fingerprint(&token)),
        "{out}"
    );
    assert!(!out.contains(&token), "{out}");
    // audit by call-id.
    stack.deliveries(&call, 1).await;
    let (code, out, _) = pushfleet(&["audit", "--url", &base, "--callid", &call]).await;
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("delivered") && out.contains(&account), "{out}");
    let (code, out, _) = pushfleet(&["audit", "--url", &base, "--callid", "no-such-call"]).await;
    assert_eq!(code, 1, "{out}");

    let remove = v2(&["remove", "--appid", SYLK, "--deviceid", "pixel"]);
    let (code, out, _) = pushfleet(&refs(&remove)).await;
    assert_eq!(code, 0, "{out}");
    let (code, out, _) = pushfleet(&refs(&remove)).await;
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains(" - 404: {\"result\":\"User not found\"}"),
        "{out}"
    );
    let (code, out, _) = pushfleet(&refs(&v2(&["tokens", "list"]))).await;
    assert_eq!((code, out.starts_with("404: ")), (1, true), "{out}");
    let (code, _, err) = pushfleet(&refs(&v2(&["remove", "--appid", SYLK, "--bogus", "x"]))).await;
    assert_eq!(code, 2, "{err}");
    stack.stop().await;
}

/// The built binary, as OpenSIPS runs it (`ops/test` builds every target first).
fn binary() -> PathBuf {
    let dir = std::env::current_exe().unwrap();
    let path = dir.parent().unwrap().parent().unwrap().join("pushfleet");
    assert!(
        path.exists(),
        "{} is missing: cargo build -p pushfleet-client",
        path.display()
    );
    path
}

#[tokio::test]
async fn the_binary_keeps_the_exit_codes_under_either_name() {
    let url = closed_url().await;
    let args = v1_args(&url, "tok", "c1", "incoming_session");
    let output = Command::new(binary()).args(&args).output().unwrap();
    assert_eq!(output.status.code(), Some(1));
    assert_eq!(
        String::from_utf8_lossy(&output.stdout),
        format!("incoming_session push for c1 to {url} failed: connection error\n")
    );
    let output = Command::new(binary()).output().unwrap();
    assert_eq!(output.status.code(), Some(2));
    // Linked as sylk-pushclient-v2, a bare command line is a v2 one.
    let dir = std::env::temp_dir().join(format!("pushfleet-it-{}", Uuid::new_v4()));
    std::fs::create_dir_all(&dir).unwrap();
    let link = dir.join("sylk-pushclient-v2");
    std::os::unix::fs::symlink(binary(), &link).unwrap();
    let output = Command::new(&link)
        .args(["--url", &url, "--account", "a", "remove", "--appid", "x"])
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(1));
    let base = url.trim_end_matches("/push");
    assert_eq!(
        String::from_utf8_lossy(&output.stdout),
        format!("Remove request to {base}/push/v2/tokens/a failed: connection error\n")
    );
    let _ = std::fs::remove_dir_all(dir);
}
