//! WebPush and UnifiedPush delivery (RFC 8030): the device's token is its push service
//! endpoint, the body is encrypted for the subscription (RFC 8291) when it has keys, and every
//! request carries a VAPID token (RFC 8292) for the endpoint's origin.
//!
//! Endpoints come from clients, so the client never reaches what ingest would have refused:
//! only `https://`, only public addresses unless the app lists the host, checked again here
//! because DNS answers change; the resolver that checks the addresses is the one whose
//! addresses are connected to. Redirects are never followed and no proxy is used.

mod crypto;
mod resolve;
pub mod vapid;

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use pushfleet_core::clock::now_ms;
use pushfleet_core::config::{Platform, WebPushSettings};
use pushfleet_core::job::Job;
use pushfleet_core::policy::Lane;
use pushfleet_core::webpush::{self, EndpointError, MAX_CLEARTEXT_BYTES};
use reqwest::header::{HeaderValue, AUTHORIZATION, CONTENT_ENCODING, CONTENT_TYPE, LOCATION};
use serde_json::{json, Value};

use self::vapid::Vapid;
use super::answers::{
    BAD_SUBSCRIPTION_KEY, ENDPOINT_NOT_ALLOWED, NEXTPUSH_UNKNOWN, PAYLOAD_TOO_LARGE,
};
use super::{
    classify, client_builder, error_chain, header_str, read_answer, reason_phrase, retry_after,
    send_error, ProviderError, ProviderResponse, RawAnswer, Transport,
};

/// A client for one UnifiedPush app: connections pooled per endpoint origin, HTTP/2 where the
/// push service offers it, HTTP/1.1 otherwise.
pub struct WebPushClient {
    http: reqwest::Client,
    settings: Arc<WebPushSettings>,
    vapid: Vapid,
}

impl WebPushClient {
    pub fn new(
        settings: &WebPushSettings,
        request_timeout: Duration,
    ) -> Result<WebPushClient, ProviderError> {
        let settings = Arc::new(settings.clone());
        let vapid = Vapid::load(&settings.vapid_key_file, &settings.vapid_subject)?;
        // Never through a proxy, [worker] https_proxy included: the proxy would connect to
        // addresses the resolver never checked.
        let direct = Transport::direct(request_timeout);
        let http = client_builder(settings.ca_file.as_deref(), &direct)?
            .redirect(reqwest::redirect::Policy::none())
            .dns_resolver(Arc::new(resolve::CheckedResolver::new(settings.clone())))
            // Many origins, each with few pushes: idle connections go after a while.
            .pool_idle_timeout(Duration::from_secs(90))
            .pool_max_idle_per_host(8)
            .build()
            .map_err(|e| ProviderError::HttpClient {
                provider: "WebPush",
                detail: error_chain(&e),
            })?;
        Ok(WebPushClient {
            http,
            settings,
            vapid,
        })
    }

    pub fn vapid_public_key(&self) -> &str {
        self.vapid.public_key()
    }

    /// One POST of `cleartext` (the app type's JSON body) to the job's endpoint.
    pub async fn send(&self, job: &Job, cleartext: Bytes) -> ProviderResponse {
        let started = Instant::now();
        let endpoint = job.push.token.as_str();
        let url = match self.allowed_url(endpoint) {
            Ok(url) => url,
            Err(error) => {
                return refused(endpoint, ENDPOINT_NOT_ALLOWED, error.to_string(), started)
            }
        };
        if cleartext.len() > MAX_CLEARTEXT_BYTES {
            let problem = format!(
                "the payload has {} bytes, an encrypted push at most {MAX_CLEARTEXT_BYTES}",
                cleartext.len()
            );
            return refused(endpoint, PAYLOAD_TOO_LARGE, problem, started);
        }
        let encrypted = match &job.push.webpush_keys {
            None => None,
            Some(keys) => {
                let sealed = webpush::decode_keys(keys)
                    .map_err(|(field, problem)| format!("{field}: {problem}"))
                    .and_then(|keys| crypto::encrypt(&cleartext, &keys).map_err(|e| e.to_string()));
                match sealed {
                    Ok(body) => Some(Bytes::from(body)),
                    Err(problem) => {
                        return refused(endpoint, BAD_SUBSCRIPTION_KEY, problem, started)
                    }
                }
            }
        };
        let now = now_ms();
        // RFC 8030's TTL is whole seconds; a push with 300 ms left is still offered for one.
        let ttl = job.deadline_ms.saturating_sub(now).div_ceil(1000);
        let urgency = match job.lane {
            Lane::Calls => "high",
            Lane::Messages => "normal",
        };
        let origin = url.origin().ascii_serialization();
        let mut request = self
            .http
            .post(url)
            .header("ttl", ttl)
            .header("urgency", urgency)
            .header("topic", webpush::topic(&job.push.call_id))
            .header(AUTHORIZATION, self.vapid.authorization(&origin, now / 1000));
        request = match encrypted {
            Some(body) => request
                .header(CONTENT_ENCODING, HeaderValue::from_static("aes128gcm"))
                .header(
                    CONTENT_TYPE,
                    HeaderValue::from_static("application/octet-stream"),
                )
                .body(body),
            None => request
                .header(CONTENT_TYPE, HeaderValue::from_static("application/json"))
                .body(cleartext),
        };
        match request.send().await {
            Ok(response) => parse_answer(endpoint, read_answer(response).await, started),
            Err(error) => match refusal_in(&error) {
                Some(refusal) => {
                    refused(endpoint, ENDPOINT_NOT_ALLOWED, refusal.to_string(), started)
                }
                None => ProviderResponse::transport_failure(
                    Platform::UnifiedPush,
                    endpoint.to_string(),
                    send_error(error),
                    started,
                ),
            },
        }
    }

    /// The endpoint as a URL the client may call. A host name is checked by the resolver as it
    /// is connected to; an address literal never reaches a resolver, so it is checked here.
    fn allowed_url(&self, endpoint: &str) -> Result<reqwest::Url, EndpointError> {
        let url = webpush::parse_endpoint(endpoint)?;
        if let Some(url::Host::Ipv4(_) | url::Host::Ipv6(_)) = url.host() {
            let host = url.host_str().unwrap_or_default();
            let address = host
                .trim_start_matches('[')
                .trim_end_matches(']')
                .parse()
                .map_err(|_| EndpointError::NoHost)?;
            webpush::check_address(&self.settings, host, address)?;
        }
        Ok(url)
    }
}

/// The resolver's refusal, when that is why no connection was made.
fn refusal_in(error: &reqwest::Error) -> Option<&EndpointError> {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(error);
    while let Some(e) = source {
        if let Some(refusal) = e.downcast_ref::<EndpointError>() {
            return matches!(refusal, EndpointError::NotPublic { .. }).then_some(refusal);
        }
        source = e.source();
    }
    None
}

/// A push the worker did not send: why, in the table's words.
fn refused(endpoint: &str, reason: &str, problem: String, started: Instant) -> ProviderResponse {
    if reason == ENDPOINT_NOT_ALLOWED {
        metrics::counter!(
            "pushfleet_webpush_endpoints_refused_total",
            "stage" => "worker", "reason" => "not_public"
        )
        .increment(1);
    }
    ProviderResponse {
        status: None,
        reason: Some(reason.to_string()),
        body: json!({}),
        message_id: None,
        apns_timestamp_ms: None,
        url: endpoint.to_string(),
        transport_error: Some(problem),
        duration: started.elapsed(),
        answer: classify(Platform::UnifiedPush, None, Some(reason), None),
    }
}

/// A short reason from the bodies push services answer with: NextPush's `{"success":false}`,
/// autopush's `{"errno", "error", "message"}`, ntfy's `{"error", "code"}`.
fn reason_of(body: &Value) -> Option<String> {
    if body.get("success") == Some(&Value::Bool(false)) {
        return Some(NEXTPUSH_UNKNOWN.to_string());
    }
    body.get("error")
        .or_else(|| body.get("reason"))
        .and_then(Value::as_str)
        .map(str::to_string)
}

fn parse_answer(endpoint: &str, answer: RawAnswer, started: Instant) -> ProviderResponse {
    let reason = if (200..300).contains(&answer.status) {
        None
    } else {
        reason_of(&answer.body)
    };
    let meaning = classify(
        Platform::UnifiedPush,
        Some(answer.status),
        reason.as_deref(),
        None,
    )
    .with_retry_after(retry_after(&answer.headers));
    // RFC 8030's message resource; ntfy's message id.
    let message_id = header_str(&answer.headers, LOCATION.as_str())
        .map(str::to_string)
        .or_else(|| {
            answer
                .body
                .get("id")
                .and_then(Value::as_str)
                .map(str::to_string)
        })
        .filter(|_| (200..300).contains(&answer.status));
    ProviderResponse {
        status: Some(answer.status),
        reason,
        message_id,
        apns_timestamp_ms: None,
        url: endpoint.to_string(),
        transport_error: answer.body_error,
        body: answer.body,
        duration: started.elapsed(),
        answer: meaning,
    }
}

/// WebPush part of [`super::sylk_result`]: the status phrase, and the push service's body.
pub(super) fn sylk_result(status: u16, response: &ProviderResponse) -> (String, Value) {
    let phrase = reason_phrase(status);
    let text = match &response.reason {
        Some(reason) if reason != phrase => format!("{phrase} {reason}"),
        _ => phrase.to_string(),
    };
    (text, response.body.clone())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::providers::answers::Class;

    fn answer(status: u16, headers: &[(&str, &str)], body: Value) -> ProviderResponse {
        let raw = RawAnswer::for_test(status, headers, body);
        parse_answer("https://push.example.org/up/1", raw, Instant::now())
    }

    #[test]
    fn answers_of_the_known_push_services() {
        let r = answer(
            201,
            &[("location", "https://push.example.org/m/1")],
            json!({}),
        );
        assert_eq!(r.answer.class, Class::Delivered);
        assert_eq!(
            r.message_id.as_deref(),
            Some("https://push.example.org/m/1")
        );
        let r = answer(200, &[], json!({"id": "hJ2v", "event": "message"}));
        assert_eq!(
            (r.answer.class, r.message_id.as_deref()),
            (Class::Delivered, Some("hJ2v"))
        );
        let r = answer(401, &[], json!({"success": false}));
        assert_eq!(r.answer.class, Class::TokenGone);
        let r = answer(429, &[("retry-after", "7")], json!({}));
        assert_eq!(r.answer.class, Class::Retryable);
        assert_eq!(r.answer.retry_after, Some(Duration::from_secs(7)));
        let r = answer(404, &[], json!({"errno": 102, "error": "Not Found"}));
        assert_eq!(
            (r.answer.class, r.reason.as_deref()),
            (Class::TokenGone, Some("Not Found"))
        );
    }
}
