//! FCM HTTP v1: `messages:send` with a cached OAuth access token, and FCM's error envelope turned
//! into [`ProviderResponse`]s.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use pushfleet_core::config::{FcmSettings, Platform};
use reqwest::header::{HeaderValue, CONTENT_TYPE};
use reqwest::Url;
use serde_json::{json, Value};

use super::oauth::{AccessTokens, ServiceAccount};
use super::{
    classify, error_chain, reason_phrase, retry_after, send_error, shared_tls_builder, Alpn,
    ConnectionLimits, Connections, PoolKey, ProviderError, ProviderResponse, RawAnswer, SharedTls,
    Transport,
};

const FCM_ERROR_TYPE: &str = "type.googleapis.com/google.firebase.fcm.v1.FcmError";

/// A client for one FCM app (one project, one service account).
pub struct FcmClient {
    connections: Arc<Connections>,
    send_url: String,
    /// `send_url` parsed once, rather than by every request.
    send_target: Url,
    /// Shared with every other client of the same service account.
    tokens: Arc<AccessTokens>,
}

impl FcmClient {
    pub fn new(
        settings: &FcmSettings,
        request_timeout: Duration,
    ) -> Result<FcmClient, ProviderError> {
        FcmClient::with_transport(
            settings,
            &Transport::direct(request_timeout),
            ConnectionLimits::default(),
        )
    }

    /// The connections are shared with every FCM app of the same origin, roots and transport
    /// (see [`Connections::shared`]): the OAuth bearer token goes with each request.
    pub fn with_transport(
        settings: &FcmSettings,
        transport: &Transport,
        limits: ConnectionLimits,
    ) -> Result<FcmClient, ProviderError> {
        let account = ServiceAccount::load(&settings.service_account_file)?;
        let project = settings
            .project_id
            .clone()
            .or_else(|| account.project_id.clone())
            .ok_or_else(|| {
                ProviderError::bad_file(
                    &settings.service_account_file,
                    "no project_id in the service account; set fcm.project_id",
                )
            })?;
        // HTTP/2 is negotiated by ALPN where the server offers it (fcm.googleapis.com does).
        let tls = SharedTls::get(settings.ca_file.as_deref(), Alpn::Http2OrHttp1)?;
        let send_url = format!(
            "{}/v1/projects/{project}/messages:send",
            settings.endpoint.trim_end_matches('/')
        );
        let send_target = Url::parse(&send_url).map_err(|e| ProviderError::BadEndpoint {
            url: send_url.clone(),
            problem: e.to_string(),
        })?;
        let key = PoolKey::new("FCM", None, &send_target, &tls, transport, limits);
        let transport = transport.clone();
        let build = move || {
            shared_tls_builder(&tls, &transport)
                .build()
                .map_err(|e| ProviderError::HttpClient {
                    provider: "FCM",
                    detail: error_chain(&e),
                })
        };
        let connections = Connections::shared(key, Box::new(build), limits)?;
        Ok(FcmClient {
            send_target,
            send_url,
            tokens: AccessTokens::shared(account, connections.first()),
            connections,
        })
    }

    pub fn send_url(&self) -> &str {
        &self.send_url
    }

    #[cfg(test)]
    pub(super) fn connections(&self) -> &Arc<Connections> {
        &self.connections
    }

    pub fn access_tokens(&self) -> &AccessTokens {
        &self.tokens
    }

    /// One `messages:send` with `message`, the encoded `{"message": {...}}` body.
    pub async fn send(&self, message: &Bytes) -> ProviderResponse {
        let started = Instant::now();
        let url = self.send_url.clone();
        let token = match self.tokens.get().await {
            Ok(token) => token,
            Err(e) => {
                return ProviderResponse::transport_failure(
                    Platform::Firebase,
                    url,
                    format!("no OAuth access token: {e}"),
                    started,
                )
            }
        };
        let sent = self
            .connections
            .send(|http| {
                http.post(self.send_target.clone())
                    .bearer_auth(&token)
                    .header(CONTENT_TYPE, HeaderValue::from_static("application/json"))
                    // Bytes: a resend shares the body instead of copying it.
                    .body(message.clone())
            })
            .await;
        let answer = match sent {
            Ok(answer) => answer,
            Err(e) => {
                return ProviderResponse::transport_failure(
                    Platform::Firebase,
                    url,
                    send_error(e),
                    started,
                )
            }
        };
        let response = parse_answer(url, answer, started);
        if response.answer.refresh_credential {
            self.tokens.invalidate_if_current(&token).await;
        }
        response
    }
}

/// `errorCode` of the FcmError entry in `error.details`.
fn fcm_error_code(body: &Value) -> Option<&str> {
    body.pointer("/error/details")?
        .as_array()?
        .iter()
        .find(|d| d.get("@type").and_then(Value::as_str) == Some(FCM_ERROR_TYPE))?
        .get("errorCode")?
        .as_str()
}

fn parse_answer(url: String, answer: RawAnswer, started: Instant) -> ProviderResponse {
    let reason = fcm_error_code(&answer.body)
        .or_else(|| answer.body.pointer("/error/status").and_then(Value::as_str))
        .map(str::to_string);
    let message = answer
        .body
        .pointer("/error/message")
        .and_then(Value::as_str);
    let meaning = classify(
        Platform::Firebase,
        Some(answer.status),
        reason.as_deref(),
        message,
    )
    .with_retry_after(retry_after(&answer.headers));
    let message_id = if answer.status == 200 {
        answer
            .body
            .get("name")
            .and_then(Value::as_str)
            .map(str::to_string)
    } else {
        None
    };
    ProviderResponse {
        status: Some(answer.status),
        reason,
        message_id,
        apns_timestamp_ms: None,
        url,
        transport_error: answer.body_error,
        body: answer.body,
        duration: started.elapsed(),
        answer: meaning,
    }
}

/// FCM part of [`super::sylk_result`]: the reason text, and a body that imitates the
/// `requests.Response` object the reference serialised into its answers.
pub(super) fn sylk_result(status: u16, response: &ProviderResponse) -> (String, Value) {
    let phrase = reason_phrase(status);
    let body = json!({
        "_content": response.body,
        "_content_consumed": true,
        "status_code": status,
        "url": response.url,
        "encoding": "utf-8",
        "reason": phrase,
    });
    if status == 200 {
        return (phrase.to_string(), body);
    }
    let message = response
        .body
        .pointer("/error/message")
        .and_then(Value::as_str)
        .unwrap_or("");
    let reason = format!("{phrase} {message}").trim().to_string();
    (reason, body)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::providers::oauth::tests::service_account_json;
    use crate::providers::sylk_result as sylk;
    use pushfleet_core::Platform;

    const URL: &str = "https://fcm.googleapis.com/v1/projects/p/messages:send";

    fn answer(status: u16, headers: &[(&str, &str)], body: Value) -> ProviderResponse {
        let raw = RawAnswer::for_test(status, headers, body);
        parse_answer(URL.into(), raw, Instant::now())
    }

    fn fcm_error(code: u16, status: &str, message: &str, error_code: Option<&str>) -> Value {
        let details: Vec<Value> = error_code
            .map(|c| json!({"@type": FCM_ERROR_TYPE, "errorCode": c}))
            .into_iter()
            .collect();
        json!({"error": {"code": code, "message": message, "status": status, "details": details}})
    }

    #[test]
    fn success_carries_the_message_name() {
        let r = answer(200, &[], json!({"name": "projects/p/messages/0:123"}));
        assert_eq!(r.status, Some(200));
        assert_eq!(r.message_id.as_deref(), Some("projects/p/messages/0:123"));
        assert_eq!(r.reason, None);
    }

    #[test]
    fn errors_prefer_the_fcm_error_code() {
        let r = answer(
            404,
            &[],
            fcm_error(
                404,
                "NOT_FOUND",
                "Requested entity was not found.",
                Some("UNREGISTERED"),
            ),
        );
        assert_eq!(r.reason.as_deref(), Some("UNREGISTERED"));
        let r = answer(
            401,
            &[],
            fcm_error(
                401,
                "UNAUTHENTICATED",
                "Request is missing required authentication credential.",
                None,
            ),
        );
        assert_eq!(r.reason.as_deref(), Some("UNAUTHENTICATED"));
        let r = answer(
            429,
            &[("retry-after", "17")],
            fcm_error(
                429,
                "RESOURCE_EXHAUSTED",
                "Quota exceeded.",
                Some("QUOTA_EXCEEDED"),
            ),
        );
        assert_eq!(r.reason.as_deref(), Some("QUOTA_EXCEEDED"));
        assert_eq!(r.answer.retry_after, Some(Duration::from_secs(17)));
    }

    #[test]
    fn sylk_result_wraps_the_body_like_the_reference() {
        let r = answer(200, &[], json!({"name": "projects/p/messages/1"}));
        assert_eq!(
            sylk(Platform::Firebase, &r),
            (
                200,
                "OK".into(),
                json!({
                    "_content": {"name": "projects/p/messages/1"},
                    "_content_consumed": true,
                    "status_code": 200,
                    "url": URL,
                    "encoding": "utf-8",
                    "reason": "OK",
                })
            )
        );
    }

    #[test]
    fn sylk_result_maps_gone_tokens_to_410() {
        let unregistered = answer(
            404,
            &[],
            fcm_error(
                404,
                "NOT_FOUND",
                "Requested entity was not found.",
                Some("UNREGISTERED"),
            ),
        );
        let (code, reason, body) = sylk(Platform::Firebase, &unregistered);
        assert_eq!(code, 410);
        assert_eq!(reason, "Not Found Requested entity was not found.");
        assert_eq!(body["status_code"], 404);
        assert_eq!(body["reason"], "Not Found");

        let malformed = answer(
            400,
            &[],
            fcm_error(
                400,
                "INVALID_ARGUMENT",
                "The registration token is not a valid FCM registration token",
                Some("INVALID_ARGUMENT"),
            ),
        );
        assert_eq!(sylk(Platform::Firebase, &malformed).0, 410);

        let bad_payload = answer(
            400,
            &[],
            fcm_error(
                400,
                "INVALID_ARGUMENT",
                "Invalid value at 'message.data[0].value'",
                None,
            ),
        );
        assert_eq!(sylk(Platform::Firebase, &bad_payload).0, 400);

        let down = answer(503, &[], json!({}));
        assert_eq!(
            sylk(Platform::Firebase, &down),
            (
                503,
                "Service Unavailable".into(),
                json!({
                    "_content": {},
                    "_content_consumed": true,
                    "status_code": 503,
                    "url": URL,
                    "encoding": "utf-8",
                    "reason": "Service Unavailable",
                })
            )
        );
    }

    #[test]
    fn project_comes_from_settings_or_the_key_file() {
        let dir = std::env::temp_dir().join(format!("pushfleet-fcm-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let with_project = dir.join("with.json");
        let without_project = dir.join("without.json");
        std::fs::write(
            &with_project,
            service_account_json(Some("from-file"), "https://x/token"),
        )
        .expect("write");
        std::fs::write(
            &without_project,
            service_account_json(None, "https://x/token"),
        )
        .expect("write");
        let settings = |file: &std::path::Path, project: Option<&str>| FcmSettings {
            service_account_file: file.to_path_buf(),
            endpoint: "https://fcm.example/".into(),
            ca_file: None,
            project_id: project.map(str::to_string),
        };
        let timeout = Duration::from_secs(5);
        let client = FcmClient::new(&settings(&with_project, None), timeout).expect("builds");
        assert_eq!(
            client.send_url(),
            "https://fcm.example/v1/projects/from-file/messages:send"
        );
        let client =
            FcmClient::new(&settings(&with_project, Some("override")), timeout).expect("builds");
        assert_eq!(
            client.send_url(),
            "https://fcm.example/v1/projects/override/messages:send"
        );
        let Err(e) = FcmClient::new(&settings(&without_project, None), timeout) else {
            panic!("no project must fail");
        };
        assert!(
            matches!(&e, ProviderError::BadFile { path, problem }
                if path.ends_with("without.json") && problem.contains("project_id")),
            "{e:?}"
        );
        let Err(e) = FcmClient::new(&settings(&dir.join("missing.json"), None), timeout) else {
            panic!("missing file must fail");
        };
        assert!(
            matches!(&e, ProviderError::Unreadable { path, .. } if path.ends_with("missing.json")),
            "{e:?}"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// A token endpoint and `messages:send` on plain HTTP, just enough to watch the token cache.
    mod against_a_local_server {
        use super::*;
        use axum::extract::State;
        use axum::http::{HeaderMap, StatusCode};
        use axum::routing::post;
        use axum::{Json, Router};
        use std::collections::HashSet;
        use std::sync::atomic::{AtomicU64, Ordering};
        use std::sync::{Arc, Mutex};

        #[derive(Default)]
        struct Fake {
            issued: AtomicU64,
            revoked: Mutex<HashSet<String>>,
        }

        async fn token(State(fake): State<Arc<Fake>>, body: String) -> (StatusCode, Json<Value>) {
            if !body.contains("grant_type=urn%3Aietf%3Aparams%3Aoauth%3Agrant-type%3Ajwt-bearer")
                || !body.contains("assertion=")
            {
                return (
                    StatusCode::BAD_REQUEST,
                    Json(json!({"error": "invalid_request"})),
                );
            }
            // Slow enough for concurrent senders to pile up behind the fetch.
            tokio::time::sleep(Duration::from_millis(50)).await;
            let n = fake.issued.fetch_add(1, Ordering::SeqCst) + 1;
            (
                StatusCode::OK,
                Json(
                    json!({"access_token": format!("tok-{n}"), "expires_in": 3599, "token_type": "Bearer"}),
                ),
            )
        }

        async fn send(
            State(fake): State<Arc<Fake>>,
            headers: HeaderMap,
        ) -> (StatusCode, Json<Value>) {
            let bearer = headers
                .get("authorization")
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.strip_prefix("Bearer "))
                .unwrap_or("");
            let known = bearer.starts_with("tok-");
            if !known || fake.revoked.lock().expect("lock").contains(bearer) {
                return (
                    StatusCode::UNAUTHORIZED,
                    Json(
                        json!({"error": {"code": 401, "message": "Request had invalid authentication credentials.", "status": "UNAUTHENTICATED"}}),
                    ),
                );
            }
            (
                StatusCode::OK,
                Json(json!({"name": "projects/p/messages/1"})),
            )
        }

        async fn start() -> (Arc<Fake>, String) {
            let fake = Arc::new(Fake::default());
            let app = Router::new()
                .route("/token", post(token))
                .route("/v1/projects/p/messages:send", post(send))
                .with_state(fake.clone());
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
                .await
                .expect("bind");
            let url = format!("http://{}", listener.local_addr().expect("address"));
            tokio::spawn(async move {
                let _ = axum::serve(listener, app).await;
            });
            (fake, url)
        }

        fn client(url: &str) -> FcmClient {
            client_with_token_uri(url, &format!("{url}/token"))
        }

        fn client_with_token_uri(url: &str, token_uri: &str) -> FcmClient {
            let path =
                std::env::temp_dir().join(format!("pushfleet-sa-{}.json", uuid::Uuid::new_v4()));
            std::fs::write(&path, service_account_json(Some("p"), token_uri))
                .expect("write service account");
            let settings = FcmSettings {
                service_account_file: path.clone(),
                endpoint: url.to_string(),
                ca_file: None,
                project_id: None,
            };
            let client = FcmClient::new(&settings, Duration::from_secs(5)).expect("builds");
            let _ = std::fs::remove_file(path);
            client
        }

        #[tokio::test]
        async fn concurrent_sends_share_one_token_fetch() {
            let (fake, url) = start().await;
            let client = client(&url);
            let message = Bytes::from(json!({"message": {"token": "t", "data": {}}}).to_string());
            let sends = (0..20).map(|_| client.send(&message));
            for response in futures_util::future::join_all(sends).await {
                assert_eq!(response.status, Some(200), "{response:?}");
                assert_eq!(
                    response.message_id.as_deref(),
                    Some("projects/p/messages/1")
                );
            }
            assert_eq!(client.access_tokens().fetches(), 1);
            assert_eq!(fake.issued.load(Ordering::SeqCst), 1);
        }

        #[tokio::test]
        async fn a_rejected_token_is_replaced_once() {
            let (fake, url) = start().await;
            let client = client(&url);
            let message = Bytes::from(json!({"message": {"token": "t", "data": {}}}).to_string());
            assert_eq!(client.send(&message).await.status, Some(200));
            fake.revoked.lock().expect("lock").insert("tok-1".into());

            let rejected = client.send(&message).await;
            assert_eq!(rejected.status, Some(401));
            assert_eq!(rejected.reason.as_deref(), Some("UNAUTHENTICATED"));
            let retried = client.send(&message).await;
            assert_eq!(retried.status, Some(200));
            assert_eq!(client.access_tokens().fetches(), 2);

            assert_eq!(client.send(&message).await.status, Some(200));
            assert_eq!(client.access_tokens().fetches(), 2);
        }

        #[tokio::test]
        async fn an_unreachable_token_endpoint_is_a_transport_failure() {
            let (_fake, url) = start().await;
            let client = client_with_token_uri(&url, "http://127.0.0.1:9/token");
            let response = client.send(&Bytes::from_static(br#"{"message":{}}"#)).await;
            assert_eq!(response.status, None);
            let error = response.transport_error.clone().expect("described");
            assert!(error.contains("127.0.0.1:9/token"), "{error}");
            let (code, reason, _) = sylk(Platform::Firebase, &response);
            assert_eq!(code, 502);
            assert!(
                reason.starts_with("Bad Gateway: no OAuth access token"),
                "{reason}"
            );
        }
    }
}
