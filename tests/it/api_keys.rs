//! API keys and tenants: every route family wants a key with its scope and app, tenants see and
//! change only their own apps, revocation reaches ingest within seconds, per-key rate limits,
//! the start-up refusal of an open listener, the access list next to keys, the key id in the
//! audit, and `pushfleet keys create|list|revoke`.

use std::time::{Duration, Instant};

use pushfleet_core::keys::{self, CreatedKey, NewKey, Scope};
use pushfleet_ingest::{Ingest, StartError};
use reqwest::header::{HeaderMap, AUTHORIZATION, RETRY_AFTER, WWW_AUTHENTICATE};
use serde_json::{json, Value};
use tokio::net::TcpListener;
use uuid::Uuid;

use crate::support::*;

/// A tenant name of this test run's own.
fn tenant(name: &str) -> String {
    format!("{name}-{}", Uuid::new_v4().simple())
}

async fn create_key(
    tenant: &str,
    apps: &[&str],
    scopes: &[Scope],
    rate: u32,
    burst: u32,
) -> CreatedKey {
    let pool = migrated_pool().await;
    let mut client = pool.get().await.unwrap();
    keys::create(
        &mut **client,
        &NewKey {
            tenant: tenant.into(),
            apps: apps.iter().map(|a| a.to_string()).collect(),
            scopes: scopes.to_vec(),
            pushes_per_second: rate,
            burst,
        },
    )
    .await
    .expect("key created")
}

async fn revoke(id: &str) {
    let pool = migrated_pool().await;
    let client = pool.get().await.unwrap();
    keys::revoke(&**client, id).await.expect("revoked");
}

/// Options for a stack whose ingest requires keys.
fn keys_required() -> StackOptions {
    StackOptions {
        env: vec![("PUSHFLEET__INGEST__REQUIRE_API_KEY".into(), "true".into())],
        ..Default::default()
    }
}

/// Sends a request with `authorization` as the header (when given); returns the status, the
/// JSON answer and the headers.
async fn send_with(
    stack: &Stack,
    method: &str,
    path: &str,
    body: Option<&Value>,
    authorization: Option<&str>,
) -> (u16, Value, HeaderMap) {
    let method = reqwest::Method::from_bytes(method.as_bytes()).unwrap();
    let mut request = stack
        .http
        .request(method, stack.url(path))
        .header("content-type", "application/json")
        .body(body.map(Value::to_string).unwrap_or_default());
    if let Some(value) = authorization {
        request = request.header(AUTHORIZATION, value);
    }
    let response = request.send().await.expect("ingest answers");
    let status = response.status().as_u16();
    let headers = response.headers().clone();
    let text = response.text().await.unwrap();
    let json = serde_json::from_str(&text)
        .unwrap_or_else(|_| panic!("answer {status} is not JSON: {text:?}"));
    (status, json, headers)
}

/// The same with a key (`None`: anonymous).
async fn send(
    stack: &Stack,
    method: &str,
    path: &str,
    body: Option<&Value>,
    key: Option<&CreatedKey>,
) -> (u16, Value) {
    let bearer = key.map(|k| format!("Bearer {}", k.key));
    let (status, json, _) = send_with(stack, method, path, body, bearer.as_deref()).await;
    (status, json)
}

fn account() -> String {
    format!("bob-{}@example.com", Uuid::new_v4().simple())
}

fn register_body(app: &str, platform: &str, token: &str, device: &str) -> Value {
    json!({"app-id": app, "platform": platform, "token": token, "device-id": device})
}

fn call_data(call_id: &str) -> Value {
    json!({"call-id": call_id, "from": "alice@example.com", "to": "bob@example.com",
           "media-type": "audio", "event": "incoming_session"})
}

fn rfc8599_body(token: &str, call_id: &str) -> Value {
    json!({"pn-provider": "apns", "pn-param": format!("TEAM1234.{SYLK}.voip"), "pn-prid": token,
           "call-id": call_id, "from": "alice@example.com", "to": "bob@example.com"})
}

fn unauthorized(description: &str) -> Value {
    json!({"code": 401, "description": description, "data": ""})
}

/// Polls until `check` holds, at most `within`; returns how long it took.
async fn eventually<F, Fut>(within: Duration, mut check: F) -> Duration
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let started = Instant::now();
    loop {
        if check().await {
            return started.elapsed();
        }
        assert!(
            started.elapsed() < within,
            "not within {} ms",
            within.as_millis()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn every_route_family_wants_a_key_with_its_scope_and_app() {
    let t = tenant("acme");
    let push = create_key(&t, &[SYLK], &[Scope::Push], 0, 0).await;
    let tokens = create_key(&t, &[SYLK], &[Scope::Tokens], 0, 0).await;
    let audit = create_key(&t, &[SYLK], &[Scope::Audit], 0, 0).await;
    let everything = [Scope::Push, Scope::Tokens, Scope::Audit];
    let other_app = create_key(&tenant("other"), &[LINPHONE], &everything, 0, 0).await;
    let stack = Stack::start_with(keys_required()).await;

    let missing = unauthorized("API key required: send it as Authorization: Bearer <key>");
    let missing_scope = |key: &CreatedKey, scope: &str| {
        json!({"code": 403, "data": "",
               "description": format!("API key {} does not have the '{scope}' scope", key.info.id)})
    };
    let other_apps = |app: &str| {
        json!({"code": 403, "data": "",
               "description": format!("API key {} is not allowed for app {app}", other_app.info.id)})
    };

    // v1 push.
    let call = call_id();
    let v1 = v1_body(SYLK, "apple", &apns_token(), "incoming_session", &call);
    let (status, answer, headers) = send_with(&stack, "POST", "/push", Some(&v1), None).await;
    assert_eq!((status, &answer), (401, &missing));
    assert_eq!(headers[WWW_AUTHENTICATE], "Bearer");
    for (header, description) in [
        (
            "Basic dXNlcjpwdw==",
            "malformed Authorization header: expected Bearer <key>",
        ),
        ("Bearer pfk_nonsense", "invalid or revoked API key"),
        (
            &format!("Bearer pfk_{}_{}", push.info.id, "0".repeat(64)),
            "invalid or revoked API key",
        ),
    ] {
        let (status, answer, _) = send_with(&stack, "POST", "/push", Some(&v1), Some(header)).await;
        assert_eq!(
            (status, answer),
            (401, unauthorized(description)),
            "{header}"
        );
    }
    let (status, answer) = send(&stack, "POST", "/push", Some(&v1), Some(&tokens)).await;
    assert_eq!((status, answer), (403, missing_scope(&tokens, "push")));
    let (status, answer) = send(&stack, "POST", "/push", Some(&v1), Some(&other_app)).await;
    assert_eq!((status, answer), (403, other_apps(SYLK)));
    let (status, answer) = send(&stack, "POST", "/push", Some(&v1), Some(&push)).await;
    assert_eq!(status, 200, "{answer}");

    // v2 registration, listing, pushes and removal.
    let account = account();
    let path = format!("/v2/tokens/{account}");
    let device = register_body(SYLK, "android", &fcm_token(), "pixel");
    let (status, answer) = send(&stack, "POST", &path, Some(&device), None).await;
    assert_eq!((status, answer), (401, missing.clone()));
    let (status, answer) = send(&stack, "POST", &path, Some(&device), Some(&push)).await;
    assert_eq!((status, answer), (403, missing_scope(&push, "tokens")));
    let (status, answer) = send(&stack, "POST", &path, Some(&device), Some(&other_app)).await;
    assert_eq!((status, answer), (403, other_apps(SYLK)));
    let (status, answer) = send(&stack, "POST", &path, Some(&device), Some(&tokens)).await;
    assert_eq!(status, 200, "{answer}");

    let (status, _) = send(&stack, "GET", &path, None, None).await;
    assert_eq!(status, 401);
    let (status, answer) = send(&stack, "GET", &path, None, Some(&audit)).await;
    assert_eq!((status, answer), (403, missing_scope(&audit, "tokens")));
    let (status, answer) = send(&stack, "GET", &path, None, Some(&tokens)).await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["devices"][0]["device-id"], "pixel");

    let push_path = format!("{path}/push");
    let v2_call = call_id();
    for route in [push_path.clone(), format!("{push_path}/pixel")] {
        let (status, _) = send(&stack, "POST", &route, Some(&call_data(&v2_call)), None).await;
        assert_eq!(status, 401, "{route}");
        let (status, answer) = send(
            &stack,
            "POST",
            &route,
            Some(&call_data(&v2_call)),
            Some(&tokens),
        )
        .await;
        assert_eq!(
            (status, answer),
            (403, missing_scope(&tokens, "push")),
            "{route}"
        );
        let (status, answer) = send(
            &stack,
            "POST",
            &route,
            Some(&call_data(&v2_call)),
            Some(&push),
        )
        .await;
        assert_eq!(status, 200, "{route}: {answer}");
        assert_eq!(answer["data"][0]["device_id"], "pixel");
    }

    let removal = json!({"app-id": SYLK, "device-id": "pixel"});
    let (status, _) = send(&stack, "DELETE", &path, Some(&removal), None).await;
    assert_eq!(status, 401);
    let (status, answer) = send(&stack, "DELETE", &path, Some(&removal), Some(&push)).await;
    assert_eq!((status, answer), (403, missing_scope(&push, "tokens")));
    let (status, answer) = send(&stack, "DELETE", &path, Some(&removal), Some(&other_app)).await;
    assert_eq!((status, answer), (403, other_apps(SYLK)));
    let (status, answer) = send(&stack, "DELETE", &path, Some(&removal), Some(&tokens)).await;
    assert_eq!(status, 200, "{answer}");

    // RFC 8599: the app the parameters resolve to decides.
    let rfc_call = call_id();
    let rfc = rfc8599_body(&apns_token(), &rfc_call);
    let (status, _) = send(&stack, "POST", "/rfc8599/push", Some(&rfc), None).await;
    assert_eq!(status, 401);
    let (status, answer) = send(&stack, "POST", "/rfc8599/push", Some(&rfc), Some(&audit)).await;
    assert_eq!((status, answer), (403, missing_scope(&audit, "push")));
    let (status, answer) = send(
        &stack,
        "POST",
        "/rfc8599/push",
        Some(&rfc),
        Some(&other_app),
    )
    .await;
    assert_eq!((status, answer), (403, other_apps(SYLK)));
    let (status, answer) = send(&stack, "POST", "/rfc8599/push", Some(&rfc), Some(&push)).await;
    assert_eq!(status, 200, "{answer}");

    // The audit query.
    stack.deliveries(&call, 1).await;
    let audit_path = format!("/audit?call_id={}", call.replace('@', "%40"));
    let (status, _) = send(&stack, "GET", &audit_path, None, None).await;
    assert_eq!(status, 401);
    let (status, answer) = send(&stack, "GET", &audit_path, None, Some(&push)).await;
    assert_eq!((status, answer), (403, missing_scope(&push, "audit")));
    let (status, answer) = send(&stack, "GET", &audit_path, None, Some(&audit)).await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["rows"][0]["api_key_id"], push.info.id.as_str());
    // Another tenant's key sees nothing of these apps.
    let (status, answer) = send(&stack, "GET", &audit_path, None, Some(&other_app)).await;
    assert_eq!((status, answer["rows"].clone()), (200, json!([])));

    // What load balancers and monitoring call needs no key.
    for path in ["/", "/health", "/ready"] {
        let (status, _) = send(&stack, "GET", path, None, None).await;
        assert_eq!(status, 200, "{path}");
    }
    let metrics = stack.http.get(stack.url("/metrics")).send().await.unwrap();
    assert_eq!(metrics.status(), 200);
    let text = metrics.text().await.unwrap();
    assert!(
        text.contains(r#"error="unauthorized""#) && text.contains(r#"error="forbidden""#),
        "{text}"
    );
    stack.stop().await;
}

#[tokio::test]
async fn tenants_see_and_change_only_their_own_apps() {
    let everything = [Scope::Push, Scope::Tokens, Scope::Audit];
    let a = create_key(&tenant("a"), &[SYLK], &everything, 0, 0).await;
    let b = create_key(&tenant("b"), &[LINPHONE], &everything, 0, 0).await;
    let mut options = keys_required();
    options.env.push((
        "PUSHFLEET__INGEST__MAX_DEVICES_PER_ACCOUNT".into(),
        "1".into(),
    ));
    let stack = Stack::start_with(options).await;

    // One account name, a device of each tenant's app.
    let account = account();
    let path = format!("/v2/tokens/{account}");
    let a_device = register_body(SYLK, "apple", &apns_token(), "a-phone");
    let b_device = register_body(LINPHONE, "android", &fcm_token(), "b-phone");
    assert_eq!(
        send(&stack, "POST", &path, Some(&a_device), Some(&a))
            .await
            .0,
        200
    );
    assert_eq!(
        send(&stack, "POST", &path, Some(&b_device), Some(&b))
            .await
            .0,
        200
    );
    // Neither registers for the other's app.
    assert_eq!(
        send(&stack, "POST", &path, Some(&b_device), Some(&a))
            .await
            .0,
        403
    );
    // Each tenant's devices count against the account's limit for that tenant only: B's device
    // took no place of A's, and A's second device is one too many.
    let a_second = register_body(SYLK, "apple", &apns_token(), "a-tablet");
    let (status, answer) = send(&stack, "POST", &path, Some(&a_second), Some(&a)).await;
    assert_eq!((status, &answer["code"]), (409, &json!(409)), "{answer}");

    let listed = |answer: &Value| -> Vec<String> {
        answer["devices"]
            .as_array()
            .unwrap()
            .iter()
            .map(|d| d["device-id"].as_str().unwrap().to_string())
            .collect()
    };
    let (status, answer) = send(&stack, "GET", &path, None, Some(&a)).await;
    assert_eq!(
        (status, listed(&answer)),
        (200, vec!["a-phone".to_string()])
    );
    let (status, answer) = send(&stack, "GET", &path, None, Some(&b)).await;
    assert_eq!(
        (status, listed(&answer)),
        (200, vec!["b-phone".to_string()])
    );

    // A push to the account reaches only the caller's devices; the other's device is not there.
    let call = call_id();
    let (status, answer) = send(
        &stack,
        "POST",
        &format!("{path}/push"),
        Some(&call_data(&call)),
        Some(&a),
    )
    .await;
    assert_eq!(status, 200, "{answer}");
    let items = answer["data"].as_array().unwrap();
    assert_eq!(items.len(), 1, "{answer}");
    assert_eq!(items[0]["device_id"], "a-phone");
    let (status, answer) = send(
        &stack,
        "POST",
        &format!("{path}/push/b-phone"),
        Some(&call_data(&call)),
        Some(&a),
    )
    .await;
    assert_eq!(
        (status, &answer["data"]),
        (404, &json!({"device_id": "b-phone"}))
    );

    // A cannot remove B's device, by device or by app.
    let (status, _) = send(
        &stack,
        "DELETE",
        &path,
        Some(&json!({"app-id": LINPHONE, "device-id": "b-phone"})),
        Some(&a),
    )
    .await;
    assert_eq!(status, 403);
    let (status, answer) = send(
        &stack,
        "DELETE",
        &path,
        Some(&json!({"app-id": SYLK})),
        Some(&a),
    )
    .await;
    assert_eq!(status, 200, "{answer}");
    // Now the account holds only B's device: for A it does not exist.
    let (status, answer) = send(&stack, "GET", &path, None, Some(&a)).await;
    assert_eq!(
        (status, answer["data"].clone()),
        (404, json!({"account": account}))
    );
    let (status, answer) = send(
        &stack,
        "DELETE",
        &path,
        Some(&json!({"app-id": SYLK})),
        Some(&a),
    )
    .await;
    assert_eq!((status, answer), (404, json!({"result": "User not found"})));
    let (status, answer) = send(&stack, "GET", &path, None, Some(&b)).await;
    assert_eq!(
        (status, listed(&answer)),
        (200, vec!["b-phone".to_string()])
    );

    // The audit of one call pushed by both shows each only its own rows.
    let (status, answer) = send(
        &stack,
        "POST",
        &format!("{path}/push"),
        Some(&call_data(&call)),
        Some(&b),
    )
    .await;
    assert_eq!(status, 200, "{answer}");
    let rows = stack.deliveries(&call, 2).await;
    assert_eq!(rows.len(), 2);
    let audit_path = format!("/audit?call_id={}", call.replace('@', "%40"));
    for (key, app) in [(&a, SYLK), (&b, LINPHONE)] {
        let (status, answer) = send(&stack, "GET", &audit_path, None, Some(key)).await;
        assert_eq!(status, 200, "{answer}");
        let deliveries = answer["rows"].as_array().unwrap();
        assert_eq!(deliveries.len(), 1, "{answer}");
        assert_eq!(deliveries[0]["app_id"], app);
        assert_eq!(deliveries[0]["api_key_id"], key.info.id.as_str());
    }
    stack.stop().await;
}

#[tokio::test]
async fn revoked_keys_are_refused_and_new_keys_accepted_within_seconds() {
    let key = create_key(&tenant("rev"), &[SYLK], &[Scope::Push], 0, 0).await;
    // The default reload interval, as deployed.
    let stack = Stack::start_with(StackOptions {
        mode: "async",
        ..keys_required()
    })
    .await;
    assert_eq!(stack.settings.ingest.api_keys_refresh_ms, 2000);
    let body = v1_body(SYLK, "apple", &apns_token(), "incoming_session", &call_id());
    assert_eq!(
        send(&stack, "POST", "/push", Some(&body), Some(&key))
            .await
            .0,
        202
    );

    revoke(&key.info.id).await;
    let took = eventually(Duration::from_secs(5), || async {
        send(&stack, "POST", "/push", Some(&body), Some(&key))
            .await
            .0
            == 401
    })
    .await;
    println!("revocation took effect after {} ms", took.as_millis());

    // A key created while ingest runs works as soon as the table is reloaded.
    let fresh = create_key(&tenant("fresh"), &[SYLK], &[Scope::Push], 0, 0).await;
    eventually(Duration::from_secs(5), || async {
        send(&stack, "POST", "/push", Some(&body), Some(&fresh))
            .await
            .0
            == 202
    })
    .await;
    stack.stop().await;
}

/// `pushfleet_ingest_rate_limited_total` of `tenant`, from ingest's `/metrics`.
async fn rate_limited(stack: &Stack, tenant: &str) -> u64 {
    let text = stack
        .http
        .get(stack.url("/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let series = format!("pushfleet_ingest_rate_limited_total{{tenant=\"{tenant}\"}} ");
    text.lines()
        .find_map(|line| line.strip_prefix(&series))
        .map_or(0, |count| count.trim().parse().unwrap())
}

/// A v1 push of a call of its own.
async fn v1_push(stack: &Stack, key: Option<&CreatedKey>) -> (u16, Value) {
    let body = v1_body(SYLK, "apple", &apns_token(), "incoming_session", &call_id());
    send(stack, "POST", "/push", Some(&body), key).await
}

#[tokio::test]
async fn pushes_beyond_a_keys_rate_get_429_with_retry_after() {
    let t = tenant("limited");
    let key = create_key(&t, &[SYLK], &[Scope::Push, Scope::Tokens], 1, 3).await;
    // Keys not required: a key that is sent is still used, limit included.
    let stack = Stack::start_async().await;

    for _ in 0..3 {
        let (status, answer) = v1_push(&stack, Some(&key)).await;
        assert_eq!(status, 202, "{answer}");
    }
    let body = v1_body(SYLK, "apple", &apns_token(), "incoming_session", &call_id());
    let bearer = format!("Bearer {}", key.key);
    let (status, answer, headers) =
        send_with(&stack, "POST", "/push", Some(&body), Some(&bearer)).await;
    assert_eq!(status, 429, "{answer}");
    assert_eq!(
        (&answer["code"], &answer["data"]),
        (&json!(429), &json!(""))
    );
    let description = answer["description"].as_str().unwrap();
    assert!(
        description.contains(&key.info.id) && description.contains("1 pushes per second"),
        "{description}"
    );
    let retry_after: u64 = headers[RETRY_AFTER].to_str().unwrap().parse().unwrap();
    assert!((1..=2).contains(&retry_after), "{retry_after}");
    assert_eq!(rate_limited(&stack, &t).await, 1);
    // Anonymous callers are not limited by anyone's key.
    for _ in 0..5 {
        assert_eq!(v1_push(&stack, None).await.0, 202);
    }

    // After the wait it asked for, the key pushes again.
    tokio::time::sleep(Duration::from_secs(retry_after)).await;
    assert_eq!(v1_push(&stack, Some(&key)).await.0, 202);

    // A v2 push to three devices counts three pushes: once the bucket refilled it passes, and
    // leaves nothing for a v1 push right after it.
    let account = account();
    let path = format!("/v2/tokens/{account}");
    for device in ["d1", "d2", "d3"] {
        let body = register_body(SYLK, "android", &fcm_token(), device);
        assert_eq!(
            send(&stack, "POST", &path, Some(&body), Some(&key)).await.0,
            200
        );
    }
    tokio::time::sleep(Duration::from_secs(3)).await;
    let (status, answer) = send(
        &stack,
        "POST",
        &format!("{path}/push"),
        Some(&call_data(&call_id())),
        Some(&key),
    )
    .await;
    assert_eq!(status, 202, "{answer}");
    assert_eq!(answer["data"]["jobs"].as_array().unwrap().len(), 3);
    assert_eq!(v1_push(&stack, Some(&key)).await.0, 429);
    assert_eq!(rate_limited(&stack, &t).await, 2);
    stack.stop().await;
}

#[tokio::test]
async fn an_open_listener_is_refused_unless_keys_hosts_or_anonymous_are_chosen() {
    let stack = Stack::start_with(StackOptions {
        start_worker: false,
        ..Default::default()
    })
    .await;
    let start = |change: fn(&mut pushfleet_core::Settings)| {
        let mut settings = stack.settings.clone();
        change(&mut settings);
        async move {
            let listener = TcpListener::bind("0.0.0.0:0").await.unwrap();
            Ingest::start(settings, listener).await
        }
    };
    let error = start(|_| {})
        .await
        .err()
        .expect("an open listener is refused");
    assert!(
        matches!(error, StartError::OpenListener { addr } if addr.ip().is_unspecified()),
        "{error}"
    );
    let message = error.to_string();
    assert!(!message.contains('\n'), "{message}");
    for key in [
        "[ingest] require_api_key = true",
        "[ingest] allowed_hosts",
        "[ingest] allow_anonymous = true",
    ] {
        assert!(message.contains(key), "{message}");
    }

    let choices: [fn(&mut pushfleet_core::Settings); 3] = [
        |s| s.ingest.allow_anonymous = true,
        |s| s.ingest.require_api_key = true,
        |s| s.ingest.allowed_hosts = vec!["127.0.0.1".into()],
    ];
    for choice in choices {
        let ingest = start(choice).await.expect("ingest starts");
        let health = reqwest::get(format!("http://127.0.0.1:{}/health", ingest.addr.port()))
            .await
            .unwrap();
        assert_eq!(health.status(), 200);
        ingest.stop().await.unwrap();
    }

    // The binary says it in one line and exits non-zero.
    let exe = std::env::current_exe().unwrap();
    let bin = exe
        .parent()
        .unwrap()
        .parent()
        .unwrap()
        .join("pushfleet-ingest");
    assert!(
        bin.exists(),
        "{} is missing: build the workspace first",
        bin.display()
    );
    let output = tokio::process::Command::new(&bin)
        .arg("--config")
        .arg(&stack.config_path)
        .env("PUSHFLEET__INGEST__LISTEN", "0.0.0.0:0")
        .output()
        .await
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(
        stderr.starts_with("pushfleet-ingest: ingest listens on 0.0.0.0:")
            && stderr.contains("allow_anonymous"),
        "{stderr}"
    );
    stack.stop().await;
}

#[tokio::test]
async fn the_access_list_and_keys_are_both_enforced() {
    let key = create_key(&tenant("acl"), &[SYLK], &[Scope::Push], 0, 0).await;
    let body = || v1_body(SYLK, "apple", &apns_token(), "incoming_session", &call_id());

    // Keys and a list the caller is not on: a valid key does not open the door.
    let elsewhere = Stack::start_with(StackOptions {
        mode: "async",
        allowed_hosts: vec!["192.0.2.0/24".into()],
        ..keys_required()
    })
    .await;
    let (status, answer) = send(&elsewhere, "POST", "/push", Some(&body()), Some(&key)).await;
    assert_eq!(
        (status, answer),
        (
            403,
            json!({"code": 403, "description": "access denied by access list", "data": {}})
        )
    );
    elsewhere.stop().await;

    // Keys and a list the caller is on: the key is still needed.
    let listed = Stack::start_with(StackOptions {
        mode: "async",
        allowed_hosts: vec!["127.0.0.0/8".into()],
        ..keys_required()
    })
    .await;
    assert_eq!(
        send(&listed, "POST", "/push", Some(&body()), None).await.0,
        401
    );
    assert_eq!(
        send(&listed, "POST", "/push", Some(&body()), Some(&key))
            .await
            .0,
        202
    );
    listed.stop().await;

    // The list alone, as Sylk setups that send no header use it.
    let sylk = Stack::start_with(StackOptions {
        mode: "async",
        allowed_hosts: vec!["127.0.0.0/8".into()],
        ..Default::default()
    })
    .await;
    assert_eq!(
        send(&sylk, "POST", "/push", Some(&body()), None).await.0,
        202
    );
    sylk.stop().await;
}

#[tokio::test]
async fn every_audit_row_names_the_key_that_sent_the_push() {
    let key = create_key(
        &tenant("audited"),
        &[SYLK],
        &[Scope::Push, Scope::Audit],
        0,
        0,
    )
    .await;
    // Keys not required: anonymous and keyed pushes side by side.
    let stack = Stack::start().await;
    let call = call_id();
    let (anonymous_token, keyed_token) = (apns_token(), apns_token());
    let anonymous = v1_body(SYLK, "apple", &anonymous_token, "incoming_session", &call);
    let keyed = v1_body(SYLK, "apple", &keyed_token, "incoming_session", &call);
    assert_eq!(
        send(&stack, "POST", "/push", Some(&anonymous), None)
            .await
            .0,
        200
    );
    assert_eq!(
        send(&stack, "POST", "/push", Some(&keyed), Some(&key))
            .await
            .0,
        200
    );
    // A bad key is refused even where keys are optional.
    let (status, _, _) =
        send_with(&stack, "POST", "/push", Some(&keyed), Some("Bearer pfk_x")).await;
    assert_eq!(status, 401);

    stack.deliveries(&call, 2).await;
    let rows = stack
        .query(
            "SELECT token_fingerprint, api_key_id FROM deliveries WHERE call_id = $1",
            &[&call],
        )
        .await;
    let key_of = |token: &str| {
        let fingerprint = pushfleet_core::tokens::token_fingerprint(token);
        rows.iter()
            .find(|r| r.get::<_, String>(0) == fingerprint)
            .map(|r| r.get::<_, Option<String>>(1))
            .expect("a row")
    };
    assert_eq!(key_of(&anonymous_token), None);
    assert_eq!(key_of(&keyed_token), Some(key.info.id.clone()));

    // Through the API: anonymous callers see both rows, the key sees its apps' rows.
    let audit_path = format!("/audit?call_id={}", call.replace('@', "%40"));
    let (status, answer) = send(&stack, "GET", &audit_path, None, None).await;
    assert_eq!(status, 200);
    let mut ids: Vec<Value> = answer["rows"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["api_key_id"].clone())
        .collect();
    ids.sort_by_key(Value::is_null);
    assert_eq!(ids, vec![json!(key.info.id), Value::Null]);
    stack.stop().await;
}

#[tokio::test]
async fn the_keys_cli_creates_lists_and_revokes() {
    let stack = Stack::start_with(StackOptions {
        mode: "async",
        ..keys_required()
    })
    .await;
    let config = stack.config_path.display().to_string();
    let t = tenant("cli");
    let (code, out, err) = pushfleet(&[
        "keys",
        "create",
        "--config",
        &config,
        "--tenant",
        &t,
        "--app",
        SYLK,
        "--app",
        LINPHONE,
        "--scope",
        "push",
        "--scope",
        "tokens",
        "--pushes-per-second",
        "50",
        "--burst",
        "100",
    ])
    .await;
    assert_eq!(code, 0, "{out}{err}");
    let key = out.lines().last().unwrap().to_string();
    let (id, secret) = keys::parse_key(&key).expect("the last line is the key");
    assert!(
        out.contains(&format!("created API key {id} for tenant {t}")),
        "{out}"
    );

    // The new key works within a reload.
    let body = v1_body(SYLK, "apple", &apns_token(), "incoming_session", &call_id());
    let bearer = format!("Bearer {key}");
    eventually(Duration::from_secs(5), || async {
        send_with(&stack, "POST", "/push", Some(&body), Some(&bearer))
            .await
            .0
            == 202
    })
    .await;

    // Listed with its grants, never with its secret.
    let (code, out, _) = pushfleet(&["keys", "list", "--config", &config]).await;
    assert_eq!(code, 0);
    let line = out.lines().find(|l| l.starts_with(id)).expect("listed");
    let fields: Vec<&str> = line.split('\t').collect();
    assert_eq!(
        fields[..6],
        [
            id,
            t.as_str(),
            &format!("{SYLK},{LINPHONE}"),
            "push,tokens",
            "50",
            "100"
        ]
    );
    assert_eq!(fields[7], "-");
    assert!(!out.contains(secret), "{out}");
    let (code, out, _) = pushfleet(&["keys", "list", "--json", "--config", &config]).await;
    assert_eq!(code, 0);
    let listed: Value = serde_json::from_str(&out).unwrap();
    let entry = listed
        .as_array()
        .unwrap()
        .iter()
        .find(|k| k["id"] == id)
        .expect("listed");
    assert_eq!(
        (&entry["tenant"], &entry["revoked_at"]),
        (&json!(t), &Value::Null)
    );
    assert!(!out.contains(secret));

    // Revoked: refused within seconds, listed as revoked; revoking again changes nothing.
    let (code, out, _) = pushfleet(&["keys", "revoke", id, "--config", &config]).await;
    assert_eq!(code, 0, "{out}");
    assert!(
        out.starts_with(&format!("revoked API key {id} of tenant {t}")),
        "{out}"
    );
    eventually(Duration::from_secs(5), || async {
        send_with(&stack, "POST", "/push", Some(&body), Some(&bearer))
            .await
            .0
            == 401
    })
    .await;
    let (code, out, _) = pushfleet(&["keys", "revoke", id, "--config", &config]).await;
    assert_eq!(code, 0);
    assert!(out.contains("was already revoked at"), "{out}");
    let (_, out, _) = pushfleet(&["keys", "list", "--config", &config]).await;
    let line = out
        .lines()
        .find(|l| l.starts_with(id))
        .expect("still listed");
    assert_ne!(line.split('\t').nth(7), Some("-"), "{line}");

    // Mistakes.
    let (code, out, _) =
        pushfleet(&["keys", "revoke", "0000000000000000", "--config", &config]).await;
    assert_eq!((code, out.as_str()), (1, "no API key 0000000000000000\n"));
    let (code, _, err) = pushfleet(&[
        "keys",
        "create",
        "--config",
        &config,
        "--tenant",
        &t,
        "--app",
        "com.unknown",
        "--scope",
        "push",
    ])
    .await;
    assert_eq!(code, 1);
    assert!(err.contains("app com.unknown is not configured"), "{err}");
    let (code, _, err) = pushfleet(&[
        "keys", "create", "--config", &config, "--tenant", &t, "--app", SYLK, "--scope", "admin",
    ])
    .await;
    assert_eq!(code, 2);
    assert!(err.contains("argument --scope: invalid choice"), "{err}");
    let (code, _, err) = pushfleet(&["keys", "create", "--config", &config, "--tenant", &t]).await;
    assert_eq!(code, 2);
    assert!(err.contains("--app, --scope"), "{err}");
    let (code, _, err) = pushfleet(&["keys", "list"]).await;
    assert_eq!(code, 2);
    assert!(
        err.contains("one of --database-url or --config is required"),
        "{err}"
    );
    stack.stop().await;
}
