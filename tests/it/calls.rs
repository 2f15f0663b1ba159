//! Calls the Flexisip way: iOS devices without a VoIP token rung by repeated alerts until the
//! call ends and told how it ended, pushes held back by `pn-timeout`, per-contact strings and
//! sounds, and apps that hide the caller.

use std::time::{Duration, Instant};

use pushfleet_fakes::journal::RecordedRequest;
use serde_json::{json, Value};

use crate::support::*;

/// Ringing every second, a short ringing window.
fn ringing_stack(ttl_secs: u64) -> StackOptions {
    StackOptions {
        mode: "async",
        extra_config: format!(
            "\n[events.incoming_session]\nttl_secs = {ttl_secs}\nremote_push_interval_secs = 1\n"
        ),
        ..Default::default()
    }
}

fn call_data(call_id: &str) -> Value {
    json!({"call-id": call_id, "from": "alice@example.com", "from-display-name": "Alice",
           "to": "bob@example.com"})
}

fn with(mut body: Value, extra: Value) -> Value {
    for (k, v) in extra.as_object().unwrap() {
        body[k] = v.clone();
    }
    body
}

/// The Sylk iOS app, registered with a remote (alert) token only.
fn remote_only(token: &str) -> Value {
    json!({"pn-provider": "apns", "pn-param": format!("ABCD1234.{SYLK}.remote"), "pn-prid": token})
}

fn alerts(stack: &Stack, token: &str) -> Vec<RecordedRequest> {
    stack
        .fakes
        .apns
        .journal()
        .requests_for_token(token)
        .into_iter()
        .filter(|r| r.header("apns-push-type") == Some("alert"))
        .collect()
}

fn loc_key(request: &RecordedRequest) -> String {
    request.json.as_ref().unwrap()["aps"]["alert"]["loc-key"]
        .as_str()
        .unwrap_or_default()
        .to_string()
}

#[tokio::test]
async fn a_phone_without_voip_push_rings_by_alerts_until_the_call_ends_and_hears_how() {
    let stack = Stack::start_with(ringing_stack(5)).await;
    let (answered, unanswered) = (apns_token(), apns_token());
    let (answered_call, unanswered_call) = (call_id(), call_id());
    let strings = json!({"pn-call-str": "CALL_FROM",
                         "pn-call-accepted-elsewhere-str": "ANSWERED_ON_ANOTHER_PHONE"});
    let started = Instant::now();
    for (token, call) in [(&answered, &answered_call), (&unanswered, &unanswered_call)] {
        let body = with(with(call_data(call), remote_only(token)), strings.clone());
        let (status, answer) = stack.push_rfc8599(&body).await;
        assert_eq!(status, 202, "{answer}");
    }

    // Rung every second.
    tokio::time::sleep(Duration::from_millis(2600)).await;
    let rung = alerts(&stack, &answered);
    assert!(rung.len() >= 2, "{} rings in 2.6 s", rung.len());
    for ring in &rung {
        assert_eq!(ring.header("apns-topic"), Some(SYLK));
        assert_eq!(ring.header("apns-priority"), Some("10"));
        assert_eq!(ring.header("apns-expiration"), Some("0"));
        assert_eq!(
            ring.header("apns-collapse-id"),
            Some(answered_call.as_str())
        );
        assert_eq!(loc_key(ring), "CALL_FROM");
        assert_eq!(
            ring.json.as_ref().unwrap()["aps"]["alert"]["loc-args"],
            json!(["Alice"])
        );
    }
    let gaps: Vec<u128> = rung
        .windows(2)
        .map(|w| (w[1].received_instant - w[0].received_instant).as_millis())
        .collect();
    assert!(gaps.iter().all(|gap| (900..2500).contains(gap)), "{gaps:?}");

    // Answered elsewhere: one final alert saying so, then silence.
    let cancel = with(
        with(call_data(&answered_call), remote_only(&answered)),
        json!({"type": "background", "reason": "answered_elsewhere"}),
    );
    let (status, answer) = stack.push_rfc8599(&cancel).await;
    assert_eq!(status, 202, "{answer}");
    let final_sent = Instant::now() + Duration::from_secs(5);
    while !alerts(&stack, &answered)
        .iter()
        .any(|r| loc_key(r) == "ANSWERED_ON_ANOTHER_PHONE")
        && Instant::now() < final_sent
    {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Nothing after the final alert.
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let after_cancel = alerts(&stack, &answered);
    let last = after_cancel.last().unwrap();
    assert_eq!(loc_key(last), "ANSWERED_ON_ANOTHER_PHONE");
    assert_eq!(
        last.json.as_ref().unwrap()["call-end"],
        "answered_elsewhere"
    );
    let finals = after_cancel
        .iter()
        .filter(|r| loc_key(r) == "ANSWERED_ON_ANOTHER_PHONE")
        .count();
    assert_eq!(finals, 1);

    // Past the TTL: nothing more, for either call; the unanswered one stopped by itself.
    let ttl_end = started + Duration::from_millis(6500);
    tokio::time::sleep(ttl_end.saturating_duration_since(Instant::now())).await;
    assert_eq!(alerts(&stack, &answered).len(), after_cancel.len());
    let unanswered_rings = alerts(&stack, &unanswered);
    assert!(
        (3..=5).contains(&unanswered_rings.len()),
        "{} rings in a 5 s window",
        unanswered_rings.len()
    );
    assert!(unanswered_rings.iter().all(|r| loc_key(r) == "CALL_FROM"));
    tokio::time::sleep(Duration::from_millis(1200)).await;
    assert_eq!(alerts(&stack, &unanswered).len(), unanswered_rings.len());

    // One audit row per call, each alert an attempt of it.
    let rows = stack.deliveries(&answered_call, 2).await;
    let ringing = rows.iter().find(|r| r.event == "incoming_session").unwrap();
    assert_eq!(ringing.status, "delivered");
    assert_eq!(ringing.attempts as usize, after_cancel.len());
    assert_eq!(stack.attempts(ringing.id).await.len(), after_cancel.len());
    let rows = stack.deliveries(&unanswered_call, 1).await;
    assert_eq!(rows.len(), 1);
    assert_eq!(
        (rows[0].status.as_str(), rows[0].attempts as usize),
        ("delivered", unanswered_rings.len())
    );
    assert!(stack
        .worker_metrics()
        .await
        .contains("pushfleet_ringing_alerts_total"));
    stack.stop().await;
}

#[tokio::test]
async fn a_call_held_by_pn_timeout_and_cancelled_meanwhile_sends_nothing() {
    let stack = Stack::start_async().await;
    let (remote, voip) = (apns_token(), apns_token());
    let device = json!({"pn-provider": "apns",
                        "pn-param": format!("ABCD1234.{SYLK}.remote&voip"),
                        "pn-prid": format!("{remote}:remote&{voip}:voip")});
    let call = call_id();
    let sent_at = Instant::now();
    let held = with(
        with(call_data(&call), device.clone()),
        json!({"pn-timeout": 3}),
    );
    let (status, answer) = stack.push_rfc8599(&held).await;
    assert_eq!(status, 202, "{answer}");
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let cancel = with(
        with(call_data(&call), device.clone()),
        json!({"type": "background"}),
    );
    let (status, answer) = stack.push_rfc8599(&cancel).await;
    assert_eq!(status, 202, "{answer}");

    let rows = stack.deliveries(&call, 2).await;
    let status_of = |event: &str| {
        rows.iter()
            .find(|r| r.event == event)
            .map(|r| (r.status.clone(), r.attempts))
    };
    assert_eq!(status_of("incoming_session"), Some(("cancelled".into(), 0)));
    assert_eq!(status_of("cancel"), Some(("cancelled".into(), 0)));
    assert!(sent_at.elapsed() >= Duration::from_millis(2900));
    let journal = stack.fakes.apns.journal();
    assert!(journal.requests_for_token(&voip).is_empty());
    assert!(journal.requests_for_token(&remote).is_empty());

    // Without a cancel the held push goes out once its time is up.
    let call = call_id();
    let sent_at = std::time::SystemTime::now();
    let held = with(with(call_data(&call), device), json!({"pn-timeout": "1"}));
    let (status, answer) = stack.push_rfc8599(&held).await;
    assert_eq!(status, 202, "{answer}");
    let rows = stack.deliveries(&call, 1).await;
    assert_eq!(rows[0].status, "delivered");
    let rung = journal.requests_for_token(&voip);
    assert_eq!(rung.len(), 1);
    let waited = rung[0].received_at.duration_since(sent_at).unwrap();
    assert!(waited >= Duration::from_millis(900), "{waited:?}");
    assert_eq!(rung[0].header("apns-push-type"), Some("voip"));

    // A timeout no call could wait for is refused.
    let (status, answer) = stack
        .push_rfc8599(&with(
            with(call_data(&call_id()), remote_only(&remote)),
            json!({"pn-timeout": 600}),
        ))
        .await;
    assert_eq!(status, 400, "{answer}");
    assert_eq!(
        answer["description"],
        "must be whole seconds from 0 to 90: pn-timeout"
    );
    stack.stop().await;
}

#[tokio::test]
async fn per_contact_strings_and_sounds_reach_the_payload_also_from_a_stored_device() {
    let stack = Stack::start().await;
    let token = apns_token();
    // A single alert: no repeats asked for.
    let call = call_id();
    let contact_with = |extra: &str| {
        format!(
            "<sip:bob@192.0.2.10;pn-provider=apns;pn-param=ABCD1234.{SYLK};pn-prid={token};\
             pn-call-str=INCOMING_FROM;pn-call-snd=ring.caf;pn-msg-str=TEXT_FROM;\
             pn-msg-snd=msg.caf;pn-groupchat-str=GROUP_TEXT;pn-call-remote-push-interval=0{extra}>"
        )
    };
    let contact = contact_with("");
    let (status, answer) = stack
        .push_rfc8599(&with(call_data(&call), json!({"contact": contact})))
        .await;
    assert_eq!(status, 200, "{answer}");
    let sent = stack.fakes.apns.journal().requests_for_token(&token);
    assert_eq!(sent.len(), 1);
    let body = sent[0].json.as_ref().unwrap();
    assert_eq!(sent[0].header("apns-push-type"), Some("alert"));
    assert_eq!(body["aps"]["alert"]["loc-key"], "INCOMING_FROM");
    assert_eq!(body["aps"]["sound"], "ring.caf");

    // A message and a group message to the same contact.
    for (group, expected) in [(false, "TEXT_FROM"), (true, "GROUP_TEXT")] {
        let message = with(
            call_data(&call_id()),
            json!({"contact": contact, "type": "message", "content": "hi", "group-chat": group}),
        );
        let (status, answer) = stack.push_rfc8599(&message).await;
        assert_eq!(status, 200, "{answer}");
        let sent = stack.fakes.apns.journal().requests_for_token(&token);
        let body = sent.last().unwrap().json.clone().unwrap();
        assert_eq!(body["aps"]["alert"]["loc-key"], expected);
        assert_eq!(body["aps"]["sound"], "msg.caf");
    }

    // Registered through the token API with the same Contact, the strings stay with the device.
    let account = format!("{}@example.com", uuid::Uuid::new_v4().simple());
    let (status, answer) = stack
        .call(
            "POST",
            &format!("/v2/tokens/{account}"),
            Some(&json!({"contact": contact, "device-id": "iphone"})),
        )
        .await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["app-id"], SYLK);
    assert_eq!(answer["remote_only"], true);
    assert_eq!(answer["push_options"]["pn-call-str"], "INCOMING_FROM");
    let call = call_id();
    let (status, answer) = stack
        .call(
            "POST",
            &format!("/v2/tokens/{account}/push"),
            Some(&with(
                call_data(&call),
                json!({"event": "incoming_session", "media-type": "audio", "silent": true}),
            )),
        )
        .await;
    assert_eq!(status, 200, "{answer}");
    let sent = stack.fakes.apns.journal().requests_for_token(&token);
    let last = sent.last().unwrap();
    assert_eq!(last.header("apns-collapse-id"), Some(call.as_str()));
    assert_eq!(
        last.json.as_ref().unwrap()["aps"]["alert"]["loc-key"],
        "INCOMING_FROM"
    );

    // A malformed option is refused at registration, never stored.
    let (status, answer) = stack
        .call(
            "POST",
            &format!("/v2/tokens/{account}"),
            Some(&json!({"contact": contact_with(";pn-timeout=soon"), "device-id": "x"})),
        )
        .await;
    assert_eq!(status, 400, "{answer}");
    stack.stop().await;
}

#[tokio::test]
async fn an_app_that_hides_callers_sends_no_caller_in_any_payload() {
    let stack = Stack::start_with(StackOptions {
        env: vec![
            ("PUSHFLEET__APPS__0__DISPLAY_CALLER".into(), "false".into()),
            ("PUSHFLEET__APPS__1__DISPLAY_CALLER".into(), "false".into()),
        ],
        ..Default::default()
    })
    .await;
    let (apns, fcm) = (apns_token(), fcm_token());
    for event in ["incoming_session", "message"] {
        for (platform, token) in [("apple", &apns), ("firebase", &fcm)] {
            let mut body = v1_body(SYLK, platform, token, event, &call_id());
            if event == "message" {
                body["media-type"] = json!("chat");
                body["content"] = json!("hello");
            }
            let (status, answer) = stack.push(&body).await;
            assert_eq!(status, 200, "{answer}");
        }
    }
    let mut sent = stack.fakes.apns.journal().requests_for_token(&apns);
    sent.extend(stack.fakes.fcm.journal().requests_for_token(&fcm));
    assert_eq!(sent.len(), 4);
    for request in sent {
        let text = String::from_utf8_lossy(&request.body);
        assert!(!text.contains("alice") && !text.contains("Alice"), "{text}");
        assert!(text.contains("hello") || text.contains("incoming_session"));
    }
    stack.stop().await;
}

#[tokio::test]
async fn a_linphone_call_rung_by_alerts_ends_with_the_final_alert_without_a_cancel_push() {
    let stack = Stack::start_with(ringing_stack(10)).await;
    let token = apns_token();
    let call = call_id();
    let device = json!({"pn-provider": "apns.dev", "pn-param": format!("ABCD1234.{LINPHONE}.remote"),
                        "pn-prid": token});
    let (status, answer) = stack
        .push_rfc8599(&with(call_data(&call), device.clone()))
        .await;
    assert_eq!(status, 202, "{answer}");
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let rung = alerts(&stack, &token);
    assert!(!rung.is_empty());
    assert_eq!(rung[0].header("apns-topic"), Some(LINPHONE));
    assert_eq!(loc_key(&rung[0]), "IC_MSG");

    // Flexisip's "background" type: a cancel, which a Linphone app takes as the call's end only.
    let (status, answer) = stack
        .push_rfc8599(&with(
            with(call_data(&call), device),
            json!({"type": "background", "reason": "declined_elsewhere"}),
        ))
        .await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["data"]["reason"], "declined_elsewhere");
    let final_sent = Instant::now() + Duration::from_secs(5);
    while !alerts(&stack, &token)
        .iter()
        .any(|r| loc_key(r) == "Call declined elsewhere")
        && Instant::now() < final_sent
    {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let sent = stack.fakes.apns.journal().requests_for_token(&token);
    let last = sent.last().unwrap();
    assert_eq!(loc_key(last), "Call declined elsewhere");
    assert!(sent
        .iter()
        .all(|r| r.header("apns-push-type") == Some("alert")));
    let count = sent.len();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(
        stack.fakes.apns.journal().requests_for_token(&token).len(),
        count
    );
    let rows = stack.deliveries(&call, 1).await;
    assert_eq!(rows.len(), 1);
    assert_eq!(
        (rows[0].status.as_str(), rows[0].attempts as usize),
        ("delivered", count)
    );
    stack.stop().await;
}
