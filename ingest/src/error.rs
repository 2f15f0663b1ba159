//! Every answer that is not a success, in one place: each error knows its HTTP status, its JSON
//! body and the label it is counted under. Bad input is the caller's mistake and gets a 4xx that
//! says what is wrong; nothing a caller sends can produce a 500.
//!
//! Most bodies have the Sylk Pushserver shape `{"code", "description", "data": ""}`. Those the
//! reference answers through FastAPI itself (a body that is not JSON, no such route, a wrong
//! method) keep FastAPI's `{"detail": ...}`, and the few v2 answers that name what was not found
//! keep the reference's own shapes.

use std::time::Duration;

use axum::extract::rejection::{PathRejection, QueryRejection};
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use pushfleet_core::audit::query::FilterError;
use pushfleet_core::config::Platform;
use pushfleet_core::db::DbError;
use pushfleet_core::keys::Scope;
use pushfleet_core::tokens::RegisterError;
use pushfleet_core::topology::BrokerError;
use pushfleet_core::webpush::{EndpointError, KeyError, MAX_CLEARTEXT_BYTES};
use serde_json::{json, Value};
use tracing::warn;

/// What went wrong with a request. The `Display` text is the description (or detail) the caller
/// reads.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    // The reference's own checks, in its wording.
    #[error("Field '{0}' required")]
    RequiredField(&'static str),
    #[error("'{}' item(s) missing.", .0.join(" ,"))]
    MissingItems(Vec<&'static str>),
    #[error("Field media-type required")]
    MissingMediaType,
    #[error("media-type must be 'audio', 'video', 'chat', 'sms', 'file-transfer', 'image'")]
    InvalidMediaType,
    #[error("event must be 'incoming_session', 'incoming_conference_request', 'cancel' or 'message', 'transfer': event")]
    UnknownEvent,
    /// Linphone apps only ring.
    #[error("event not found (must be incoming_sesion)")]
    OnlyIncomingSession,
    #[error("'{0}' platform is not configured")]
    UnknownPlatform(String),
    /// A v2 registration words the same problem differently.
    #[error("The '{0}' platform is not configured")]
    UnknownRegistrationPlatform(String),
    #[error("{} {app_id} app is not configured", platform.title())]
    UnknownApp { platform: Platform, app_id: String },

    // A field as pydantic reports it: `<problem>: <field>`.
    #[error("field required: {0}")]
    MissingField(&'static str),
    #[error("{problem}: {field}")]
    InvalidField {
        field: &'static str,
        problem: &'static str,
    },
    /// Text that is there but empty, where it must address something.
    #[error("{0} must not be empty: {0}")]
    EmptyField(&'static str),
    /// Text longer than its limit (`crate::limits`), in pydantic's `max_length` wording.
    #[error("ensure this value has at most {max_chars} characters: {field}")]
    TooLong {
        field: &'static str,
        max_chars: usize,
    },

    // UnifiedPush / WebPush.
    /// An endpoint the worker must not or cannot call; it is never contacted.
    #[error("not a usable UnifiedPush endpoint: {0}: token")]
    BadEndpoint(EndpointError),
    #[error("{problem}: {field}")]
    BadWebPushKey {
        field: &'static str,
        problem: KeyError,
    },
    #[error("the push is too large for UnifiedPush: its payload may reach {bytes} bytes, and an encrypted push carries at most {MAX_CLEARTEXT_BYTES}: shorten content")]
    WebPushTooLarge { bytes: usize },
    /// `/UP` with a token that was never handed out or was unregistered.
    #[error("no such UnifiedPush endpoint")]
    UnknownEndpoint,
    /// A push to `/UP` that is not UTF-8: an XMPP message carries text.
    #[error("a UnifiedPush push over XMPP must be UTF-8 text")]
    NotText,

    // RFC 8599 push parameters.
    #[error("pn-provider '{0}' is not supported (apns, apns.dev, fcm)")]
    UnsupportedProvider(String),
    #[error("pn-param must be <TeamID>.<BundleID>[.<service>]: {0}")]
    MalformedPnParam(String),
    #[error(
        "pn-prid must hold one token per service of pn-param ('<token>:remote&<token>:voip'): {0}"
    )]
    MalformedPnPrid(String),
    #[error("type must be 'call', 'message' or 'background': type")]
    UnknownType,
    #[error("no Firebase app is configured for pn-param '{pn_param}' (give its app-id)")]
    NoFirebaseApp { pn_param: String },
    /// A wake-up for an iOS device registered with a VoIP token only.
    #[error(
        "pn-param names no remote service: a VoIP token cannot take a background push: pn-param"
    )]
    NoBackgroundToken,

    // The request as a whole.
    #[error("request body is empty")]
    EmptyBody,
    #[error("request body must be a JSON object")]
    NotAnObject,
    #[error("There was an error parsing the body")]
    UnparsableBody,
    #[error("request body is larger than {0} bytes")]
    TooLarge(usize),
    #[error("invalid {what} in the path: {rejection}")]
    InvalidPath {
        what: &'static str,
        rejection: PathRejection,
    },
    #[error("invalid query string: {0}")]
    InvalidQuery(QueryRejection),
    /// A filter of the audit query.
    #[error("{0}")]
    BadFilter(#[from] FilterError),
    #[error("access denied by access list")]
    AccessDenied,

    // API keys (`crate::auth`).
    /// No key where one is required, or a key that is not (or no longer) valid.
    #[error("{0}")]
    Unauthorized(Unauthorized),
    #[error("API key {key_id} does not have the '{scope}' scope")]
    MissingScope { key_id: String, scope: Scope },
    #[error("API key {key_id} is not allowed for app {app_id}")]
    AppNotAllowed { key_id: String, app_id: String },
    #[error("API key {key_id} is over its rate limit of {per_second} pushes per second (burst {burst}): retry after {} s", retry_after.as_secs())]
    RateLimited {
        key_id: String,
        per_second: f64,
        burst: f64,
        retry_after: Duration,
    },
    #[error("Not Found")]
    NoRoute,
    #[error("Method Not Allowed")]
    MethodNotAllowed,

    // v2: what the account does not have.
    #[error("Push request was not sent: user not found")]
    UserNotFound { account: String },
    #[error("Push request was not sent: device not found")]
    DeviceNotFound { device_id: String },
    /// The reference's DELETE misses answer `{"result": …}`.
    #[error("User not found")]
    NoAccountToRemove,
    #[error("Not found")]
    NoDeviceToRemove,
    /// A new device for an account that holds as many as it may.
    #[error("the account already has {limit} devices, the most [ingest] max_devices_per_account allows: remove one before registering another")]
    TooManyDevices { limit: usize },

    // What pushfleet depends on is away.
    #[error("push queue unavailable: {0}")]
    QueueUnavailable(#[from] BrokerError),
    /// The caller reads only that storage is away; the log gets the detail.
    #[error("token storage unavailable")]
    StorageUnavailable(#[from] DbError),
    /// A probe: what ingest cannot reach (RabbitMQ, Postgres).
    #[error("not connected to {0}")]
    NotReady(&'static str),

    // The HTTP limits (`[http]`).
    /// More requests in progress than `max_in_flight_requests`: refused before any work.
    #[error("too many requests in progress, retry later")]
    Overloaded,
    #[error("request body not received within {} ms", .0.as_millis())]
    BodyTimeout(Duration),
}

impl ApiError {
    pub fn status(&self) -> StatusCode {
        use ApiError::*;
        match self {
            RequiredField(_)
            | MissingItems(_)
            | MissingMediaType
            | InvalidMediaType
            | UnknownEvent
            | MissingField(_)
            | InvalidField { .. }
            | EmptyField(_)
            | TooLong { .. }
            | UnsupportedProvider(_)
            | MalformedPnParam(_)
            | MalformedPnPrid(_)
            | UnknownType
            | NoBackgroundToken
            | EmptyBody
            | NotAnObject
            | UnparsableBody
            | InvalidPath { .. }
            | InvalidQuery(_)
            | BadEndpoint(_)
            | BadWebPushKey { .. }
            | BadFilter(_) => StatusCode::BAD_REQUEST,
            WebPushTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            UnknownEndpoint => StatusCode::NOT_FOUND,
            NotText => StatusCode::BAD_REQUEST,
            AccessDenied | MissingScope { .. } | AppNotAllowed { .. } => StatusCode::FORBIDDEN,
            Unauthorized(_) => StatusCode::UNAUTHORIZED,
            RateLimited { .. } => StatusCode::TOO_MANY_REQUESTS,
            OnlyIncomingSession
            | UnknownPlatform(_)
            | UnknownRegistrationPlatform(_)
            | UnknownApp { .. }
            | NoFirebaseApp { .. }
            | NoRoute
            | UserNotFound { .. }
            | DeviceNotFound { .. }
            | NoAccountToRemove
            | NoDeviceToRemove => StatusCode::NOT_FOUND,
            MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            TooManyDevices { .. } => StatusCode::CONFLICT,
            TooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            QueueUnavailable(_) | StorageUnavailable(_) | NotReady(_) | Overloaded => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            BodyTimeout(_) => StatusCode::REQUEST_TIMEOUT,
        }
    }

    /// The `error` label of `pushfleet_ingest_requests_total`: a few kinds, so that a dashboard
    /// can tell callers' mistakes from pushfleet's own trouble.
    pub fn label(&self) -> &'static str {
        use ApiError::*;
        match self {
            RequiredField(_) | MissingItems(_) | MissingMediaType | MissingField(_) => {
                "missing_field"
            }
            InvalidMediaType
            | UnknownEvent
            | InvalidField { .. }
            | EmptyField(_)
            | TooLong { .. }
            | MalformedPnParam(_)
            | MalformedPnPrid(_)
            | UnknownType
            | BadFilter(_)
            | BadWebPushKey { .. }
            | NoBackgroundToken => "invalid_field",
            BadEndpoint(_) => "invalid_endpoint",
            WebPushTooLarge { .. } => "too_large",
            UnknownEndpoint => "unknown_endpoint",
            NotText => "not_text",
            OnlyIncomingSession => "unsupported_event",
            UnknownPlatform(_) | UnknownRegistrationPlatform(_) => "unknown_platform",
            UnknownApp { .. } | NoFirebaseApp { .. } => "unknown_app",
            UnsupportedProvider(_) => "unsupported_provider",
            EmptyBody => "empty_body",
            NotAnObject => "not_an_object",
            UnparsableBody => "unparsable_body",
            TooLarge(_) => "too_large",
            InvalidPath { .. } => "invalid_path",
            InvalidQuery(_) => "invalid_query",
            AccessDenied => "access_denied",
            Unauthorized(_) => "unauthorized",
            MissingScope { .. } | AppNotAllowed { .. } => "forbidden",
            RateLimited { .. } => "rate_limited",
            NoRoute => "not_found",
            MethodNotAllowed => "method_not_allowed",
            UserNotFound { .. } | NoAccountToRemove => "user_not_found",
            DeviceNotFound { .. } | NoDeviceToRemove => "device_not_found",
            TooManyDevices { .. } => "too_many_devices",
            QueueUnavailable(_) => "queue_unavailable",
            StorageUnavailable(_) => "storage_unavailable",
            NotReady(_) => "not_ready",
            Overloaded => "overloaded",
            BodyTimeout(_) => "body_timeout",
        }
    }

    /// The request field a field-level error is about.
    pub fn field(&self) -> Option<&'static str> {
        match self {
            ApiError::MissingField(field)
            | ApiError::EmptyField(field)
            | ApiError::InvalidField { field, .. }
            | ApiError::TooLong { field, .. }
            | ApiError::BadWebPushKey { field, .. } => Some(field),
            ApiError::BadEndpoint(_) => Some("token"),
            _ => None,
        }
    }

    /// The JSON body the caller gets.
    pub fn body(&self) -> Value {
        let description = self.to_string();
        match self {
            ApiError::UnparsableBody | ApiError::NoRoute | ApiError::MethodNotAllowed => {
                json!({ "detail": description })
            }
            ApiError::AccessDenied => {
                json!({"code": 403, "description": description, "data": {}})
            }
            ApiError::UserNotFound { account } => json!({
                "code": 404, "description": description, "data": {"account": account},
            }),
            ApiError::DeviceNotFound { device_id } => json!({
                "code": 404, "description": description, "data": {"device_id": device_id},
            }),
            ApiError::NoAccountToRemove | ApiError::NoDeviceToRemove => {
                json!({ "result": description })
            }
            _ => json!({
                "code": self.status().as_u16(),
                "description": description,
                "data": "",
            }),
        }
    }
}

/// What a shed caller is told to wait: in-flight requests mostly finish within a second.
const RETRY_AFTER_SECS: &str = "1";

/// Why a request was not authenticated.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Unauthorized {
    #[error("API key required: send it as Authorization: Bearer <key>")]
    Missing,
    #[error("malformed Authorization header: expected Bearer <key>")]
    Malformed,
    /// Unknown, revoked or with the wrong secret: the caller is not told which.
    #[error("invalid or revoked API key")]
    Invalid,
}

impl From<RegisterError> for ApiError {
    fn from(error: RegisterError) -> ApiError {
        match error {
            RegisterError::AccountFull { limit } => ApiError::TooManyDevices { limit },
            RegisterError::Db(error) => ApiError::StorageUnavailable(error),
        }
    }
}

/// Set on an error response for the request counter, which sees only the response.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ErrorLabel(pub &'static str);

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        if let ApiError::StorageUnavailable(error) = &self {
            warn!(error = %error, "device token storage failed");
        }
        let mut response = (self.status(), Json(self.body())).into_response();
        response.extensions_mut().insert(ErrorLabel(self.label()));
        match &self {
            ApiError::Overloaded => {
                response.headers_mut().insert(
                    header::RETRY_AFTER,
                    HeaderValue::from_static(RETRY_AFTER_SECS),
                );
            }
            ApiError::RateLimited { retry_after, .. } => {
                response.headers_mut().insert(
                    header::RETRY_AFTER,
                    HeaderValue::from(retry_after.as_secs()),
                );
            }
            ApiError::Unauthorized(_) => {
                response
                    .headers_mut()
                    .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
            }
            _ => {}
        }
        response
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn answer(error: ApiError) -> (StatusCode, Option<ErrorLabel>, String) {
        let response = error.into_response();
        let label = response.extensions().get::<ErrorLabel>().copied();
        let status = response.status();
        let body = axum::body::to_bytes(response.into_body(), 4096)
            .await
            .expect("body");
        (
            status,
            label,
            String::from_utf8(body.to_vec()).expect("UTF-8"),
        )
    }

    #[tokio::test]
    async fn bodies_keep_their_bytes() {
        assert_eq!(
            answer(ApiError::MissingField("to")).await,
            (
                StatusCode::BAD_REQUEST,
                Some(ErrorLabel("missing_field")),
                r#"{"code":400,"data":"","description":"field required: to"}"#.into()
            )
        );
        assert_eq!(
            answer(ApiError::UnparsableBody).await.2,
            r#"{"detail":"There was an error parsing the body"}"#
        );
        assert_eq!(
            answer(ApiError::AccessDenied).await,
            (
                StatusCode::FORBIDDEN,
                Some(ErrorLabel("access_denied")),
                r#"{"code":403,"data":{},"description":"access denied by access list"}"#.into()
            )
        );
        assert_eq!(
            answer(ApiError::UserNotFound {
                account: "bob".into()
            })
            .await
            .2,
            r#"{"code":404,"data":{"account":"bob"},"description":"Push request was not sent: user not found"}"#
        );
        assert_eq!(
            answer(ApiError::NoDeviceToRemove).await,
            (
                StatusCode::NOT_FOUND,
                Some(ErrorLabel("device_not_found")),
                r#"{"result":"Not found"}"#.into()
            )
        );
        assert_eq!(
            answer(ApiError::QueueUnavailable(BrokerError::Disconnected)).await,
            (
                StatusCode::SERVICE_UNAVAILABLE,
                Some(ErrorLabel("queue_unavailable")),
                r#"{"code":503,"data":"","description":"push queue unavailable: not connected to RabbitMQ"}"#.into()
            )
        );
    }

    #[tokio::test]
    async fn limit_answers_have_the_sylk_shape() {
        let response = ApiError::Overloaded.into_response();
        assert_eq!(response.headers()[header::RETRY_AFTER], "1");
        assert_eq!(
            answer(ApiError::Overloaded).await,
            (
                StatusCode::SERVICE_UNAVAILABLE,
                Some(ErrorLabel("overloaded")),
                r#"{"code":503,"data":"","description":"too many requests in progress, retry later"}"#.into()
            )
        );
        assert_eq!(
            answer(ApiError::BodyTimeout(Duration::from_millis(1500))).await,
            (
                StatusCode::REQUEST_TIMEOUT,
                Some(ErrorLabel("body_timeout")),
                r#"{"code":408,"data":"","description":"request body not received within 1500 ms"}"#.into()
            )
        );
    }

    #[tokio::test]
    async fn key_refusals_have_the_sylk_shape() {
        let response = ApiError::Unauthorized(Unauthorized::Missing).into_response();
        assert_eq!(response.headers()[header::WWW_AUTHENTICATE], "Bearer");
        assert_eq!(
            answer(ApiError::Unauthorized(Unauthorized::Invalid)).await,
            (
                StatusCode::UNAUTHORIZED,
                Some(ErrorLabel("unauthorized")),
                r#"{"code":401,"data":"","description":"invalid or revoked API key"}"#.into()
            )
        );
        assert_eq!(
            answer(ApiError::MissingScope {
                key_id: "0123456789abcdef".into(),
                scope: Scope::Audit
            })
            .await,
            (
                StatusCode::FORBIDDEN,
                Some(ErrorLabel("forbidden")),
                r#"{"code":403,"data":"","description":"API key 0123456789abcdef does not have the 'audit' scope"}"#.into()
            )
        );
        let limited = || ApiError::RateLimited {
            key_id: "0123456789abcdef".into(),
            per_second: 2.5,
            burst: 5.0,
            retry_after: Duration::from_secs(3),
        };
        assert_eq!(
            limited().into_response().headers()[header::RETRY_AFTER],
            "3"
        );
        assert_eq!(
            answer(limited()).await,
            (
                StatusCode::TOO_MANY_REQUESTS,
                Some(ErrorLabel("rate_limited")),
                r#"{"code":429,"data":"","description":"API key 0123456789abcdef is over its rate limit of 2.5 pushes per second (burst 5): retry after 3 s"}"#.into()
            )
        );
    }

    #[test]
    fn descriptions_keep_the_reference_wording() {
        assert_eq!(
            ApiError::MissingItems(vec!["silent", "event"]).to_string(),
            "'silent ,event' item(s) missing."
        );
        assert_eq!(
            ApiError::UnknownApp {
                platform: Platform::Apple,
                app_id: "com.unknown".into()
            }
            .to_string(),
            "Apple com.unknown app is not configured"
        );
        assert_eq!(
            ApiError::EmptyField("token").to_string(),
            "token must not be empty: token"
        );
        assert_eq!(ApiError::TooLarge(65536).status().as_u16(), 413);
    }

    #[tokio::test]
    async fn limits_answer_in_the_sylk_shape() {
        assert_eq!(
            answer(ApiError::TooLong {
                field: "call-id",
                max_chars: 256
            })
            .await,
            (
                StatusCode::BAD_REQUEST,
                Some(ErrorLabel("invalid_field")),
                r#"{"code":400,"data":"","description":"ensure this value has at most 256 characters: call-id"}"#.into()
            )
        );
        let (status, label, body) = answer(RegisterError::AccountFull { limit: 20 }.into()).await;
        assert_eq!(
            (status, label),
            (StatusCode::CONFLICT, Some(ErrorLabel("too_many_devices")))
        );
        let body: Value = serde_json::from_str(&body).expect("JSON");
        assert_eq!((&body["code"], &body["data"]), (&json!(409), &json!("")));
        let description = body["description"].as_str().expect("a description");
        assert!(
            description.contains("20 devices") && description.contains("max_devices_per_account"),
            "{description}"
        );
    }
}
