//! The fakes seen from a real HTTP/2 client.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde_json::{json, Value};

use crate::*;

const TOKEN: &str = "a1b2c3d4e5f60718293a4b5c6d7e8f90a1b2c3d4e5f60718293a4b5c6d7e8f90";

fn now_secs() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

fn client(fakes: &FakeProviders, identity: Option<(&str, &str)>) -> reqwest::Client {
    let mut b = reqwest::Client::builder()
        .use_rustls_tls()
        .tls_built_in_root_certs(false)
        .add_root_certificate(reqwest::Certificate::from_pem(fakes.ca_pem().as_bytes()).unwrap());
    if let Some((cert, key)) = identity {
        b = b.identity(reqwest::Identity::from_pem(format!("{cert}\n{key}").as_bytes()).unwrap());
    }
    b.build().unwrap()
}

fn apns_jwt(key: &ApnsTokenKey, iat: i64) -> String {
    let mut header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::ES256);
    header.kid = Some(key.key_id.clone());
    let enc = jsonwebtoken::EncodingKey::from_ec_pem(key.p8_pem.as_bytes()).unwrap();
    jsonwebtoken::encode(&header, &json!({"iss": key.team_id, "iat": iat}), &enc).unwrap()
}

async fn start() -> FakeProviders {
    FakeProviders::start(FakeOptions::default()).await.unwrap()
}

async fn push(
    c: &reqwest::Client,
    fakes: &FakeProviders,
    token: &str,
    jwt: Option<&str>,
    extra: &[(&str, &str)],
    body: &str,
) -> (u16, reqwest::header::HeaderMap, Value) {
    let mut req = c
        .post(format!("{}/3/device/{token}", fakes.apns.url()))
        .header("apns-topic", "com.example.app")
        .header("apns-push-type", "alert")
        .body(body.to_string());
    if let Some(jwt) = jwt {
        req = req.header("authorization", format!("bearer {jwt}"));
    }
    for (k, v) in extra {
        req = req.header(*k, *v);
    }
    let resp = req.send().await.unwrap();
    assert_eq!(resp.version(), reqwest::Version::HTTP_2);
    let status = resp.status().as_u16();
    let headers = resp.headers().clone();
    let bytes = resp.bytes().await.unwrap();
    let body = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
    (status, headers, body)
}

const ALERT: &str = r#"{"aps":{"alert":"hi"}}"#;

#[tokio::test]
async fn apns_token_auth_success_echoes_apns_id() {
    let fakes = start().await;
    let key = fakes.apns.create_token_key("TEAMID1234");
    let jwt = apns_jwt(&key, now_secs());
    let c = client(&fakes, None);
    let id = "123e4567-e89b-12d3-a456-426614174000";
    let (status, headers, body) =
        push(&c, &fakes, TOKEN, Some(&jwt), &[("apns-id", id)], ALERT).await;
    assert_eq!(status, 200);
    assert_eq!(headers["apns-id"], id);
    assert_eq!(body, Value::Null);

    let (status, headers, _) = push(&c, &fakes, TOKEN, Some(&jwt), &[], ALERT).await;
    assert_eq!(status, 200);
    let fresh = headers["apns-id"].to_str().unwrap();
    assert!(uuid::Uuid::parse_str(fresh).is_ok() && fresh == fresh.to_lowercase());

    assert_eq!(fakes.apns.accepted_count(), 2);
    assert_eq!(fakes.apns.distinct_jwt_count(), 1);
    let seen = fakes
        .apns
        .journal()
        .wait_for_requests(2, Duration::from_secs(2))
        .await
        .unwrap();
    assert_eq!(seen[0].token.as_deref(), Some(TOKEN));
    assert_eq!(seen[0].connection_id, seen[1].connection_id);
    assert_eq!((seen[0].stream_order, seen[1].stream_order), (0, 1));
    assert_eq!(
        seen[0].auth,
        AuthKind::ApnsJwt {
            key_id: key.key_id.clone(),
            team_id: "TEAMID1234".into()
        }
    );
    assert_eq!(seen[0].header("apns-topic"), Some("com.example.app"));
    assert!(seen[1].delivered);
}

#[tokio::test]
async fn apns_rejects_bad_and_missing_provider_tokens() {
    let fakes = start().await;
    let key = fakes.apns.create_token_key("TEAMID1234");
    // Same key id, but signed with a key the fake never saw.
    let other = fakes.apns.create_token_key("TEAMID1234");
    let forged = ApnsTokenKey {
        key_id: key.key_id.clone(),
        ..other
    };
    let c = client(&fakes, None);
    let (status, headers, body) = push(
        &c,
        &fakes,
        TOKEN,
        Some(&apns_jwt(&forged, now_secs())),
        &[],
        ALERT,
    )
    .await;
    assert_eq!(status, 403);
    assert_eq!(body, json!({"reason": "InvalidProviderToken"}));
    assert_eq!(headers["content-type"], "application/json");
    assert!(headers.contains_key("apns-id"));

    let (status, _, body) = push(&c, &fakes, TOKEN, None, &[], ALERT).await;
    assert_eq!(
        (status, body),
        (403, json!({"reason": "MissingProviderToken"}))
    );
    let (status, _, body) = push(&c, &fakes, TOKEN, Some("not.a.jwt"), &[], ALERT).await;
    assert_eq!(
        (status, body),
        (403, json!({"reason": "InvalidProviderToken"}))
    );
    assert_eq!(fakes.apns.accepted_count(), 0);
}

#[tokio::test]
async fn apns_jwt_age_and_update_rate_follow_apple() {
    let fakes = start().await;
    let key = fakes.apns.create_token_key("TEAMID1234");
    let c = client(&fakes, None);
    let first = apns_jwt(&key, now_secs());
    assert_eq!(
        push(&c, &fakes, TOKEN, Some(&first), &[], ALERT).await.0,
        200
    );

    // A different JWT on the same connection right away.
    let second = apns_jwt(&key, now_secs() - 1);
    let (status, _, body) = push(&c, &fakes, TOKEN, Some(&second), &[], ALERT).await;
    assert_eq!(
        (status, body),
        (429, json!({"reason": "TooManyProviderTokenUpdates"}))
    );

    // An hour later the first token is stale; a fresh one is welcome again.
    fakes.clock.advance(Duration::from_secs(3601));
    let (status, _, body) = push(&c, &fakes, TOKEN, Some(&first), &[], ALERT).await;
    assert_eq!(
        (status, body),
        (403, json!({"reason": "ExpiredProviderToken"}))
    );
    let third = apns_jwt(&key, fakes.clock.now_secs());
    assert_eq!(
        push(&c, &fakes, TOKEN, Some(&third), &[], ALERT).await.0,
        200
    );

    // Another team may not use this connection.
    let foreign = fakes.apns.create_token_key("OTHERTEAM1");
    fakes.clock.advance(Duration::from_secs(1300));
    let jwt = apns_jwt(&foreign, fakes.clock.now_secs());
    let (status, _, body) = push(&c, &fakes, TOKEN, Some(&jwt), &[], ALERT).await;
    assert_eq!(
        (status, body),
        (403, json!({"reason": "InvalidProviderToken"}))
    );
    assert_eq!(fakes.apns.distinct_jwt_count(), 4);
}

#[tokio::test]
async fn apns_token_registry() {
    let fakes = start().await;
    let key = fakes.apns.create_token_key("TEAMID1234");
    let jwt = apns_jwt(&key, now_secs());
    let c = client(&fakes, None);
    let cases = [
        (
            "aa01",
            ApnsTokenState::Unregistered {
                timestamp_ms: 1_700_000_000_000,
            },
            410,
            json!({"reason": "Unregistered", "timestamp": 1_700_000_000_000i64}),
        ),
        (
            "aa02",
            ApnsTokenState::Expired,
            410,
            json!({"reason": "ExpiredToken"}),
        ),
        (
            "aa03",
            ApnsTokenState::Bad,
            400,
            json!({"reason": "BadDeviceToken"}),
        ),
        (
            "aa04",
            ApnsTokenState::WrongTopic,
            400,
            json!({"reason": "DeviceTokenNotForTopic"}),
        ),
        (
            "aa05",
            ApnsTokenState::Throttled,
            429,
            json!({"reason": "TooManyRequests"}),
        ),
    ];
    for (tok, state, status, body) in cases {
        fakes.apns.set_token_state(tok, state);
        let got = push(&c, &fakes, tok, Some(&jwt), &[], ALERT).await;
        assert_eq!((got.0, got.2), (status, body), "token {tok}");
        assert!(!got.1.contains_key("retry-after"));
    }
}

#[tokio::test]
async fn apns_request_checks_in_pushy_order() {
    let fakes = start().await;
    let key = fakes.apns.create_token_key("TEAMID1234");
    let jwt = apns_jwt(&key, now_secs());
    let c = client(&fakes, None);
    let big = format!(r#"{{"aps":{{}},"x":"{}"}}"#, "a".repeat(4100));
    let long_collapse = "c".repeat(65);
    type Case<'a> = (&'a str, Vec<(&'a str, &'a str)>, &'a str, u16, &'a str);
    let cases: Vec<Case> = vec![
        (TOKEN, vec![("apns-id", "nope")], ALERT, 400, "BadMessageId"),
        (
            TOKEN,
            vec![("apns-collapse-id", &long_collapse)],
            ALERT,
            400,
            "BadCollapseId",
        ),
        (
            TOKEN,
            vec![("apns-priority", "7")],
            ALERT,
            400,
            "BadPriority",
        ),
        (
            TOKEN,
            vec![("apns-push-type", "bogus")],
            ALERT,
            400,
            "InvalidPushType",
        ),
        (
            TOKEN,
            vec![("apns-expiration", "-5")],
            ALERT,
            400,
            "BadExpirationDate",
        ),
        ("xyz!", vec![], ALERT, 400, "BadDeviceToken"),
        (
            TOKEN,
            vec![("apns-push-type", "voip")],
            ALERT,
            400,
            "DeviceTokenNotForTopic",
        ),
        (TOKEN, vec![], "", 400, "PayloadEmpty"),
        (TOKEN, vec![], "[1]", 400, "BadPayload"),
        (TOKEN, vec![], &big, 413, "PayloadTooLarge"),
    ];
    for (tok, headers, body, status, reason) in cases {
        // reqwest appends duplicate headers; send overrides through a fresh request.
        let mut req = c
            .post(format!("{}/3/device/{tok}", fakes.apns.url()))
            .header("authorization", format!("bearer {jwt}"))
            .body(body.to_string());
        let has = |name: &str| headers.iter().any(|(k, _)| *k == name);
        if !has("apns-topic") {
            req = req.header("apns-topic", "com.example.app");
        }
        if !has("apns-push-type") {
            req = req.header("apns-push-type", "alert");
        }
        for (k, v) in &headers {
            req = req.header(*k, *v);
        }
        let resp = req.send().await.unwrap();
        assert_eq!(resp.status().as_u16(), status, "{reason}");
        let v: Value = resp.json().await.unwrap();
        assert_eq!(v["reason"], reason);
    }

    let resp = c
        .get(format!("{}/3/device/{TOKEN}", fakes.apns.url()))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 405);
    let resp = c
        .post(format!("{}/4/device/{TOKEN}", fakes.apns.url()))
        .header("apns-topic", "t")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 404);
    let resp = c
        .post(format!("{}/3/device/{TOKEN}", fakes.apns.url()))
        .header("authorization", format!("bearer {jwt}"))
        .body(ALERT)
        .send()
        .await
        .unwrap();
    assert_eq!(
        resp.json::<Value>().await.unwrap()["reason"],
        "MissingTopic"
    );
    // A VoIP payload may be up to 5120 bytes, others 4096.
    for (push_type, topic, size, status) in [
        ("voip", "com.example.app.voip", 5000, 200),
        ("voip", "com.example.app.voip", 5200, 413),
        ("alert", "com.example.app", 5000, 413),
    ] {
        let resp = c
            .post(format!("{}/3/device/{TOKEN}", fakes.apns.url()))
            .header("authorization", format!("bearer {jwt}"))
            .header("apns-push-type", push_type)
            .header("apns-topic", topic)
            .body(format!(r#"{{"x":"{}"}}"#, "a".repeat(size)))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status().as_u16(), status, "{push_type} {size}");
    }
    let resp = c
        .post(format!("{}/3/device/{TOKEN}", fakes.apns.url()))
        .header("authorization", format!("bearer {jwt}"))
        .header("apns-topic", "com.example.app")
        .header("apns-topic", "com.example.app")
        .body(ALERT)
        .send()
        .await
        .unwrap();
    assert_eq!(
        resp.json::<Value>().await.unwrap()["reason"],
        "DuplicateHeaders"
    );
}

#[tokio::test]
async fn apns_certificate_auth_needs_no_jwt() {
    let fakes = start().await;
    let (cert, key) = fakes.apns.issue_client_certificate("com.example.app");
    let c = client(&fakes, Some((&cert, &key)));
    let resp = c
        .post(format!("{}/3/device/{TOKEN}", fakes.apns.url()))
        .header("apns-push-type", "voip")
        .header("apns-priority", "10")
        .header("apns-expiration", "0")
        .body(r#"{"call-id":"x"}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 200);
    let seen = fakes.apns.journal().requests();
    assert_eq!(
        seen[0].auth,
        AuthKind::ApnsCertificate {
            bundle: Some("com.example.app".into())
        }
    );
    let resp = c
        .post(format!("{}/3/device/{TOKEN}", fakes.apns.url()))
        .header("apns-topic", "org.other.app")
        .body(ALERT)
        .send()
        .await
        .unwrap();
    assert_eq!(
        resp.json::<Value>().await.unwrap()["reason"],
        "TopicDisallowed"
    );
}

#[tokio::test]
async fn apns_scripts_then_normal_state() {
    let fakes = start().await;
    let key = fakes.apns.create_token_key("TEAMID1234");
    let jwt = apns_jwt(&key, now_secs());
    let c = client(&fakes, None);
    fakes
        .apns
        .script(TOKEN, Scripted::status(503).times(2).retry_after(3));
    for _ in 0..2 {
        let (status, headers, body) = push(&c, &fakes, TOKEN, Some(&jwt), &[], ALERT).await;
        assert_eq!(
            (status, body),
            (503, json!({"reason": "ServiceUnavailable"}))
        );
        assert_eq!(headers["retry-after"], "3");
    }
    assert_eq!(push(&c, &fakes, TOKEN, Some(&jwt), &[], ALERT).await.0, 200);

    // A dropped connection fails the request; the client reconnects for the next one.
    fakes.apns.script(TOKEN, Scripted::drop_connection());
    let err = c
        .post(format!("{}/3/device/{TOKEN}", fakes.apns.url()))
        .header("apns-topic", "com.example.app")
        .header("authorization", format!("bearer {jwt}"))
        .body(ALERT)
        .send()
        .await;
    assert!(err.is_err());
    assert_eq!(push(&c, &fakes, TOKEN, Some(&jwt), &[], ALERT).await.0, 200);
    let seen = fakes.apns.journal().requests();
    assert_eq!(seen.len(), 5);
    assert_eq!(seen[3].status, None);
    assert_ne!(seen[3].connection_id, seen[4].connection_id);

    fakes.apns.script_all(Scripted::normal().delay_ms(300));
    let t0 = std::time::Instant::now();
    assert_eq!(
        push(&c, &fakes, "beef", Some(&jwt), &[], ALERT).await.0,
        200
    );
    assert!(t0.elapsed() >= Duration::from_millis(300));
}

fn sign_assertion(sa: &Value, aud: &str) -> String {
    let now = now_secs();
    let mut header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::RS256);
    header.kid = sa["private_key_id"].as_str().map(String::from);
    let key =
        jsonwebtoken::EncodingKey::from_rsa_pem(sa["private_key"].as_str().unwrap().as_bytes())
            .unwrap();
    let claims = json!({
        "iss": sa["client_email"],
        "scope": "https://www.googleapis.com/auth/firebase.messaging",
        "aud": aud,
        "iat": now - 10,
        "exp": now + 3590,
    });
    jsonwebtoken::encode(&header, &claims, &key).unwrap()
}

async fn access_token(c: &reqwest::Client, sa: &Value) -> reqwest::Response {
    let token_uri = sa["token_uri"].as_str().unwrap();
    c.post(token_uri)
        .form(&[
            ("grant_type", "urn:ietf:params:oauth:grant-type:jwt-bearer"),
            ("assertion", &sign_assertion(sa, token_uri)),
        ])
        .send()
        .await
        .unwrap()
}

async fn fcm_send(
    c: &reqwest::Client,
    fakes: &FakeProviders,
    project: &str,
    bearer: &str,
    body: Value,
) -> (u16, reqwest::header::HeaderMap, Value) {
    let resp = c
        .post(format!(
            "{}/v1/projects/{project}/messages:send",
            fakes.fcm.url()
        ))
        .bearer_auth(bearer)
        .json(&body)
        .send()
        .await
        .unwrap();
    let status = resp.status().as_u16();
    let headers = resp.headers().clone();
    (status, headers, resp.json().await.unwrap())
}

#[tokio::test]
async fn oauth_then_fcm_send() {
    let fakes = start().await;
    let sa: Value = serde_json::from_str(&fakes.fcm.service_account_json("proj-1")).unwrap();
    assert_eq!(sa["type"], "service_account");
    assert!(sa["private_key"]
        .as_str()
        .unwrap()
        .starts_with("-----BEGIN PRIVATE KEY-----"));
    assert_eq!(sa["token_uri"], format!("{}/token", fakes.oauth.url()));
    let c = client(&fakes, None);

    let resp = access_token(&c, &sa).await;
    assert_eq!(resp.status().as_u16(), 200);
    let tok: Value = resp.json().await.unwrap();
    assert_eq!(tok["token_type"], "Bearer");
    assert_eq!(tok["expires_in"], 3599);
    let bearer = tok["access_token"].as_str().unwrap().to_string();
    assert!(bearer.starts_with("ya29.fake-"));
    assert_eq!(fakes.oauth.token_fetches(), 1);

    let msg = json!({"message": {"token": "fcm-tok-1", "android": {"priority": "high", "ttl": "30s"},
                                 "data": {"event": "incoming_session", "call-id": "abc"}}});
    let (status, _, body) = fcm_send(&c, &fakes, "proj-1", &bearer, msg.clone()).await;
    assert_eq!(status, 200, "{body}");
    assert!(body["name"]
        .as_str()
        .unwrap()
        .starts_with("projects/proj-1/messages/"));
    assert_eq!(fakes.fcm.accepted_count(), 1);
    assert_eq!(fakes.fcm.delivered()[0].message["token"], "fcm-tok-1");

    let camel = json!({"validateOnly": true, "message": {"token": "fcm-tok-1",
                       "android": {"collapseKey": "k", "directBootOk": true}}});
    let (status, _, body) = fcm_send(&c, &fakes, "proj-1", &bearer, camel).await;
    assert_eq!(
        (status, body),
        (
            200,
            json!({"name": "projects/proj-1/messages/fake_message_id"})
        )
    );
    assert_eq!(fakes.fcm.accepted_count(), 1);

    let bad = json!({"message": {"token": "fcm-tok-1", "data": {"n": 12}}});
    let (status, _, body) = fcm_send(&c, &fakes, "proj-1", &bearer, bad).await;
    assert_eq!(status, 400);
    assert_eq!(body["error"]["status"], "INVALID_ARGUMENT");
    assert_eq!(
        body["error"]["message"],
        "Invalid value at 'message.data[0].value' (TYPE_STRING), 12"
    );
    assert_eq!(
        body["error"]["details"][0]["@type"],
        "type.googleapis.com/google.rpc.BadRequest"
    );
    assert_eq!(
        body["error"]["details"][0]["fieldViolations"][0]["field"],
        "message.data[0].value"
    );

    let (status, _, body) = fcm_send(&c, &fakes, "proj-2", &bearer, msg.clone()).await;
    assert_eq!(
        (status, body["error"]["status"].clone()),
        (403, json!("PERMISSION_DENIED"))
    );

    let (status, headers, body) = fcm_send(&c, &fakes, "proj-1", "ya29.nope", msg.clone()).await;
    assert_eq!(status, 401);
    assert_eq!(body["error"]["status"], "UNAUTHENTICATED");
    assert!(body["error"]["details"].as_array().unwrap().is_empty());
    assert!(headers["www-authenticate"]
        .to_str()
        .unwrap()
        .contains(r#"error="invalid_token""#));

    fakes.clock.advance(Duration::from_secs(3600));
    let (status, _, _) = fcm_send(&c, &fakes, "proj-1", &bearer, msg).await;
    assert_eq!(status, 401, "the access token expired");
}

#[tokio::test]
async fn oauth_refuses_bad_grants() {
    let fakes = start().await;
    let sa: Value = serde_json::from_str(&fakes.fcm.service_account_json("proj-1")).unwrap();
    let c = client(&fakes, None);
    let token_uri = sa["token_uri"].as_str().unwrap();
    let resp = c
        .post(token_uri)
        .form(&[("grant_type", "client_credentials")])
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 400);
    assert_eq!(
        resp.json::<Value>().await.unwrap()["error"],
        "unsupported_grant_type"
    );

    let signed = sign_assertion(&sa, token_uri);
    let at = signed.len() - 10;
    let flipped = if &signed[at..at + 1] == "A" { "B" } else { "A" };
    let tampered = format!("{}{flipped}{}", &signed[..at], &signed[at + 1..]);
    let resp = c
        .post(token_uri)
        .form(&[
            ("grant_type", "urn:ietf:params:oauth:grant-type:jwt-bearer"),
            ("assertion", tampered.as_str()),
        ])
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 400);
    assert_eq!(
        resp.json::<Value>().await.unwrap(),
        json!({"error": "invalid_grant", "error_description": "Invalid JWT Signature."})
    );
    assert_eq!(fakes.oauth.tokens_issued(), 0);
    assert_eq!(fakes.oauth.token_fetches(), 2);
}

#[tokio::test]
async fn fcm_registry_and_scripts() {
    let fakes = start().await;
    let sa: Value = serde_json::from_str(&fakes.fcm.service_account_json("p")).unwrap();
    let c = client(&fakes, None);
    let tok: Value = access_token(&c, &sa).await.json().await.unwrap();
    let bearer = tok["access_token"].as_str().unwrap();
    let send = |t: &str| json!({"message": {"token": t, "data": {"k": "v"}}});

    fakes
        .fcm
        .set_token_state("gone", FcmTokenState::Unregistered);
    let (status, _, body) = fcm_send(&c, &fakes, "p", bearer, send("gone")).await;
    assert_eq!(status, 404);
    assert_eq!(body["error"]["details"][0]["errorCode"], "UNREGISTERED");
    fakes.fcm.set_token_state("bad", FcmTokenState::Malformed);
    let (status, _, body) = fcm_send(&c, &fakes, "p", bearer, send("bad")).await;
    assert_eq!(status, 400);
    assert_eq!(
        body["error"]["message"],
        "The registration token is not a valid FCM registration token"
    );
    fakes
        .fcm
        .set_token_state("other", FcmTokenState::OtherSender);
    let (status, _, body) = fcm_send(&c, &fakes, "p", bearer, send("other")).await;
    assert_eq!(
        (status, body["error"]["details"][0]["errorCode"].clone()),
        (403, json!("SENDER_ID_MISMATCH"))
    );

    fakes
        .fcm
        .script("t1", Scripted::status(503).times(1).retry_after(2));
    let (status, headers, body) = fcm_send(&c, &fakes, "p", bearer, send("t1")).await;
    assert_eq!(status, 503);
    assert_eq!(headers["retry-after"], "2");
    assert_eq!(body["error"]["details"][0]["errorCode"], "UNAVAILABLE");
    let (status, _, _) = fcm_send(&c, &fakes, "p", bearer, send("t1")).await;
    assert_eq!(status, 200);
    assert_eq!(fakes.fcm.journal().requests_for_token("t1").len(), 2);

    for (body, want) in [
        (
            json!({"message": {"data": {"a": "b"}}}),
            "Recipient of the message is not set.",
        ),
        (json!({"message": {"token": "x", "topic": "y"}}), ""),
        (
            json!({"message": {"token": "x", "android": {"priority": "urgent"}}}),
            "",
        ),
        (
            json!({"message": {"token": "x", "android": {"ttl": "30"}}}),
            "",
        ),
        (
            json!({"message": {"token": "x", "android": {"ttl": "2419201s"}}}),
            "",
        ),
        (
            json!({"message": {"token": "x", "data": {"k": "v".repeat(5000)}}}),
            "Message is too big",
        ),
        (json!({"message": {"token": "x", "bogus": 1}}), ""),
    ] {
        let (status, _, got) = fcm_send(&c, &fakes, "p", bearer, body.clone()).await;
        assert_eq!(status, 400, "{body}");
        assert_eq!(got["error"]["status"], "INVALID_ARGUMENT");
        if !want.is_empty() {
            assert_eq!(got["error"]["message"], want);
        }
    }
}

#[tokio::test]
async fn stats_endpoint_and_sandbox_files() {
    let fakes = start().await;
    let c = client(&fakes, None);
    let stats: Value = c
        .get(format!("{}/_fake/stats", fakes.apns.url()))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(stats["accepted"], 0);

    let dir = std::env::temp_dir().join(format!("pushfleet-fakes-{}", uuid::Uuid::new_v4()));
    let files = fakes.write_sandbox_files(&dir).unwrap();
    assert!(std::fs::read_to_string(&files.ca_pem)
        .unwrap()
        .contains("BEGIN CERTIFICATE"));
    let p8 = std::fs::read_to_string(&files.apns_key_p8).unwrap();
    assert!(p8.starts_with("-----BEGIN PRIVATE KEY-----"));
    let sa: Value =
        serde_json::from_str(&std::fs::read_to_string(&files.fcm_service_account_json).unwrap())
            .unwrap();
    assert_eq!(sa["project_id"], files.fcm_project_id);

    let key = ApnsTokenKey {
        key_id: files.apns_key_id.clone(),
        team_id: files.apns_team_id.clone(),
        p8_pem: p8,
    };
    let jwt = apns_jwt(&key, now_secs());
    assert_eq!(push(&c, &fakes, TOKEN, Some(&jwt), &[], ALERT).await.0, 200);
    std::fs::remove_dir_all(&dir).unwrap();
}

#[tokio::test]
async fn journal_can_be_switched_off() {
    let options = FakeOptions {
        journal: false,
        apns: ApnsOptions {
            max_concurrent_streams: 1,
            ..ApnsOptions::default()
        },
        ..FakeOptions::default()
    };
    let fakes = FakeProviders::start(options).await.unwrap();
    let key = fakes.apns.create_token_key("TEAMID1234");
    let jwt = apns_jwt(&key, now_secs());
    let c = client(&fakes, None);
    let sends = (0..20).map(|_| push(&c, &fakes, TOKEN, Some(&jwt), &[], ALERT));
    for (status, _, _) in futures_util::future::join_all(sends).await {
        assert_eq!(status, 200);
    }
    assert_eq!(fakes.apns.accepted_count(), 20);
    assert!(fakes.apns.journal().requests().is_empty());
}

#[tokio::test]
async fn apns_shutdown_then_goaway_moves_client_to_a_new_connection() {
    let fakes = start().await;
    let key = fakes.apns.create_token_key("TEAMID1234");
    let jwt = apns_jwt(&key, now_secs());
    let c = client(&fakes, None);
    assert_eq!(push(&c, &fakes, TOKEN, Some(&jwt), &[], ALERT).await.0, 200);
    fakes
        .apns
        .script(TOKEN, Scripted::status(503).reason("Shutdown").goaway());
    let (status, _, body) = push(&c, &fakes, TOKEN, Some(&jwt), &[], ALERT).await;
    assert_eq!((status, body), (503, json!({"reason": "Shutdown"})));
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(push(&c, &fakes, TOKEN, Some(&jwt), &[], ALERT).await.0, 200);
    let seen = fakes.apns.journal().requests();
    assert_eq!(seen[0].connection_id, seen[1].connection_id);
    assert_ne!(seen[1].connection_id, seen[2].connection_id);
}

#[tokio::test]
async fn control_endpoints_script_the_fakes() {
    let fakes = start().await;
    let key = fakes.apns.create_token_key("TEAMID1234");
    let jwt = apns_jwt(&key, now_secs());
    let c = client(&fakes, None);
    let control = |base: String, what: &str, body: Value| {
        let c = c.clone();
        let url = format!("{base}/_fake/{what}");
        async move {
            c.post(url)
                .json(&body)
                .send()
                .await
                .unwrap()
                .status()
                .as_u16()
        }
    };
    let apns = fakes.apns.url();
    assert_eq!(
        control(
            apns.clone(),
            "token-state",
            json!({"token": "ab12", "state": "expired"})
        )
        .await,
        204
    );
    assert_eq!(
        control(apns.clone(), "script", json!({"status": 500, "times": 1})).await,
        204
    );
    assert_eq!(
        control(
            apns.clone(),
            "token-state",
            json!({"token": "ab12", "state": "??"})
        )
        .await,
        400
    );
    let (status, _, body) = push(&c, &fakes, TOKEN, Some(&jwt), &[], ALERT).await;
    assert_eq!(
        (status, body),
        (500, json!({"reason": "InternalServerError"}))
    );
    let (status, _, body) = push(&c, &fakes, "ab12", Some(&jwt), &[], ALERT).await;
    assert_eq!((status, body), (410, json!({"reason": "ExpiredToken"})));

    let fcm = fakes.fcm.url();
    assert_eq!(
        control(
            fcm.clone(),
            "script",
            json!({"token": "t", "status": 429, "retry_after": 7})
        )
        .await,
        204
    );
    assert_eq!(control(fcm, "delay", json!({"ms": 1})).await, 204);
    let sa: Value = serde_json::from_str(&fakes.fcm.service_account_json("p")).unwrap();
    let tok: Value = access_token(&c, &sa).await.json().await.unwrap();
    let msg = json!({"message": {"token": "t"}});
    let (status, headers, body) =
        fcm_send(&c, &fakes, "p", tok["access_token"].as_str().unwrap(), msg).await;
    assert_eq!(status, 429);
    assert_eq!(headers["retry-after"], "7");
    assert_eq!(body["error"]["details"][0]["errorCode"], "QUOTA_EXCEEDED");
}
