//! `POST /rfc8599/push`: pushes addressed by the RFC 8599 parameters Linphone clients register
//! (as OpenSIPS, Kamailio or Flexisip pass them on), delivered through the configured app.

use serde_json::{json, Value};

use crate::support::*;

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

#[tokio::test]
async fn linphone_ios_and_android_parameters_reach_the_right_app_and_token() {
    let stack = Stack::start().await;

    // Linphone iOS: the Contact as the registrar stored it, remote&voip pair, sandbox provider.
    let (remote, voip) = (apns_token(), apns_token());
    let call = call_id();
    let contact = format!(
        "<sip:bob@192.0.2.10:5061;transport=tls;pn-provider=apns.dev;\
         pn-param=ABCD1234.{LINPHONE}.remote&voip;pn-prid={remote}:remote&{voip}:voip;\
         pn-timeout=0;pn-silent=1>"
    );
    let (status, answer) = stack
        .post_raw(
            "/rfc8599/push",
            with(call_data(&call), json!({"contact": contact}))
                .to_string()
                .into_bytes(),
        )
        .await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(
        answer["data"]["token_fingerprint"],
        pushfleet_core::tokens::token_fingerprint(&voip)
    );
    let sent = stack.fakes.apns.journal().requests_for_token(&voip);
    assert_eq!(sent.len(), 1);
    assert_eq!(
        sent[0].header("apns-topic"),
        Some(format!("{LINPHONE}.voip").as_str())
    );
    assert!(stack
        .fakes
        .apns
        .journal()
        .requests_for_token(&remote)
        .is_empty());
    let rows = stack.deliveries(&call, 1).await;
    assert_eq!(
        (
            rows[0].app_id.as_str(),
            rows[0].platform.as_str(),
            rows[0].status.as_str()
        ),
        (LINPHONE, "apple", "delivered")
    );

    // Linphone Android: pn-param is the sender id, which names no app here: the caller adds it.
    let fcm = fcm_token();
    let call = call_id();
    let body = with(
        call_data(&call),
        json!({"pn-provider": "fcm", "pn-param": "929724111839", "pn-prid": fcm}),
    );
    let (status, answer) = stack.push_rfc8599(&body).await;
    assert_eq!(status, 404, "{answer}");
    assert_eq!(
        answer["description"],
        "no Firebase app is configured for pn-param '929724111839' (give its app-id)"
    );
    let (status, answer) = stack
        .push_rfc8599(&with(body, json!({"app-id": LINPHONE})))
        .await;
    assert_eq!(status, 200, "{answer}");
    let sent = stack.fakes.fcm.journal().requests_for_token(&fcm);
    assert_eq!(sent.len(), 1);
    assert_eq!(
        sent[0].json.as_ref().unwrap()["message"]["data"]["call-id"],
        call.as_str()
    );
    assert_eq!(stack.deliveries(&call, 1).await[0].app_id, LINPHONE);

    // Legacy Linphone parameters.
    let legacy = apns_token();
    let call = call_id();
    let (status, answer) = stack
        .push_rfc8599(&with(
            call_data(&call),
            json!({"pn-type": "apple", "app-id": format!("{LINPHONE}.voip.prod"), "pn-tok": legacy}),
        ))
        .await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(
        stack.fakes.apns.journal().requests_for_token(&legacy).len(),
        1
    );
    stack.stop().await;
}

#[tokio::test]
async fn project_ids_and_event_types_are_mapped() {
    let stack = Stack::start().await;
    // The service account's project id names the (first) Firebase app using it.
    let fcm = fcm_token();
    let call = call_id();
    let (status, answer) = stack
        .push_rfc8599(&with(
            call_data(&call),
            json!({"pn-provider": "firebase", "pn-param": stack.files.fcm_project_id,
                   "pn-prid": fcm, "type": "message"}),
        ))
        .await;
    assert_eq!(status, 200, "{answer}");
    let row = &stack.deliveries(&call, 1).await[0];
    assert_eq!(
        (row.app_id.as_str(), row.event.as_str(), row.lane.as_str()),
        (SYLK, "message", "messages")
    );

    // A cancel goes to the remote (background) token of a remote&voip pair.
    let (remote, voip) = (apns_token(), apns_token());
    let call = call_id();
    let (status, answer) = stack
        .push_rfc8599(&with(
            call_data(&call),
            json!({"pn-provider": "apns", "pn-param": format!("TEAM123.{SYLK}.voip&remote"),
                   "pn-prid": format!("{voip}:voip&{remote}:remote"), "event": "cancel"}),
        ))
        .await;
    assert_eq!(status, 200, "{answer}");
    let sent = stack.fakes.apns.journal().requests_for_token(&remote);
    assert_eq!(sent.len(), 1);
    assert_eq!(sent[0].header("apns-push-type"), Some("background"));
    stack.stop().await;
}

#[tokio::test]
async fn malformed_parameters_get_a_clear_4xx() {
    let stack = Stack::start().await;
    let call = call_id();
    let cases = [
        (
            json!({"pn-provider": "wp", "pn-param": "x", "pn-prid": "y"}),
            400,
            "pn-provider 'wp' is not supported (apns, apns.dev, fcm)",
        ),
        (
            json!({"pn-param": "ABCD1234.org.linphone.phone", "pn-prid": "y"}),
            400,
            "field required: pn-provider",
        ),
        (
            json!({"pn-provider": "apns", "pn-param": "ABCD1234.com.unknown.voip", "pn-prid": "y"}),
            404,
            "Apple com.unknown app is not configured",
        ),
        (
            json!({"pn-provider": "apns", "pn-param": "ABCD1234.org.linphone.phone.remote&voip",
                   "pn-prid": "abc:remote"}),
            400,
            "pn-prid must hold one token per service of pn-param ('<token>:remote&<token>:voip'): abc:remote",
        ),
        (
            json!({"pn-provider": "apns", "pn-param": "nodots", "pn-prid": "y"}),
            400,
            "pn-param must be <TeamID>.<BundleID>[.<service>]: nodots",
        ),
        (
            json!({"pn-provider": "fcm", "pn-param": "1", "pn-prid": "y", "type": "fax"}),
            400,
            "type must be 'call', 'message' or 'background': type",
        ),
        (
            json!({"pn-provider": "fcm", "pn-param": 12, "pn-prid": "y"}),
            400,
            "str type expected: pn-param",
        ),
    ];
    for (params, status, description) in cases {
        let body = with(call_data(&call), params.clone());
        let (got, answer) = stack.push_rfc8599(&body).await;
        assert_eq!(
            (got, answer["description"].as_str()),
            (status, Some(description)),
            "{params}"
        );
    }
    // Call data is checked as for /push.
    let (status, answer) = stack
        .push_rfc8599(
            &json!({"pn-provider": "apns", "pn-param": format!("T.{SYLK}.voip"),
                              "pn-prid": apns_token(), "call-id": call, "from": "a"}),
        )
        .await;
    assert_eq!(
        (status, answer["description"].as_str()),
        (400, Some("'to' item(s) missing."))
    );
    stack.stop().await;
}
