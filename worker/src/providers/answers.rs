//! What a provider's answer means, in one table per provider. Every decision about an answer
//! reads it: whether the push is delivered, may succeed later, is refused for good or went to
//! a token that is gone; whether our credential was refused and may be replaced for one resend;
//! and which code a Sylk client is given. The rows follow the providers' documentation: Apple's
//! "Handling notification responses from APNs" and Firebase's FCM v1 `ErrorCode` reference.

use std::time::Duration;

use pushfleet_core::config::Platform;
use pushfleet_core::job::DeliveryStatus;

/// The class of a provider answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Class {
    Delivered,
    /// The token is gone for good (uninstalled, expired, wrong app): stop pushing to it.
    TokenGone,
    /// The provider refused this push for good (malformed request or payload).
    Rejected,
    /// Might succeed later: overload, outage, throttling, no answer.
    Retryable,
    /// Our credentials were refused: configuration, or a credential to replace.
    CredentialRejected,
}

impl Class {
    pub fn as_str(self) -> &'static str {
        match self {
            Class::Delivered => "delivered",
            Class::TokenGone => "token_invalid",
            Class::Rejected => "rejected",
            Class::Retryable => "retryable",
            Class::CredentialRejected => "credential",
        }
    }
}

/// What one answer means.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Answer {
    pub class: Class,
    /// The code a Sylk client is answered with: the provider's status, except 410 where the
    /// reference reports a gone token as such, and 502 when no answer came at all.
    pub sylk_code: u16,
    /// The answer refused a credential the client replaces by itself (an APNs provider token,
    /// an FCM access token): the push is worth one resend with the new one.
    pub refresh_credential: bool,
    /// The provider's `Retry-After`, which a retry waits for at least.
    pub retry_after: Option<Duration>,
}

impl Answer {
    pub fn token_gone(&self) -> bool {
        self.class == Class::TokenGone
    }

    pub fn credential_rejected(&self) -> bool {
        self.class == Class::CredentialRejected
    }

    /// The terminal state when no further attempt is made.
    pub fn terminal_status(&self) -> DeliveryStatus {
        match self.class {
            Class::Delivered => DeliveryStatus::Delivered,
            Class::TokenGone => DeliveryStatus::TokenInvalid,
            Class::Rejected => DeliveryStatus::Rejected,
            Class::Retryable | Class::CredentialRejected => DeliveryStatus::Failed,
        }
    }

    pub fn with_retry_after(self, retry_after: Option<Duration>) -> Answer {
        Answer {
            retry_after,
            ..self
        }
    }
}

/// Which HTTP statuses a row matches.
#[derive(Debug, Clone, Copy)]
enum Status {
    Is(u16),
    Between(u16, u16),
    /// No HTTP answer: connection refused or reset, timeout, TLS failure.
    None,
    Any,
}

/// What else the provider said that a row looks at.
#[derive(Debug, Clone, Copy)]
enum Said {
    Anything,
    /// The APNs `reason`, or FCM's `errorCode` (else `error.status`).
    Reason(&'static str),
    /// FCM's `error.message` contains this text: FCM answers 400 INVALID_ARGUMENT both for a
    /// malformed token and for a malformed message, and only the text tells them apart.
    MessageContains(&'static str),
}

/// The Sylk code of a row.
#[derive(Debug, Clone, Copy)]
enum Sylk {
    /// The provider's own status.
    Status,
    /// 410: the reference's word for a gone token.
    Gone,
    /// 502: the gateway got no answer (the reference crashed with a 500).
    BadGateway,
    /// A fixed code: a push the worker refused to send itself.
    Code(u16),
}

#[derive(Debug, Clone, Copy)]
struct Row {
    status: Status,
    said: Said,
    class: Class,
    sylk: Sylk,
    refresh_credential: bool,
}

const fn row(status: Status, said: Said, class: Class, sylk: Sylk) -> Row {
    Row {
        status,
        said,
        class,
        sylk,
        refresh_credential: false,
    }
}

/// A credential the client replaces by itself, then resends once.
const fn refreshable(status: u16, reason: &'static str) -> Row {
    Row {
        status: Status::Is(status),
        said: Said::Reason(reason),
        class: Class::CredentialRejected,
        sylk: Sylk::Status,
        refresh_credential: true,
    }
}

use Class::*;
use Said::*;
use Status::{Any, Between, Is};

/// APNs, first matching row wins.
const APNS: &[Row] = &[
    row(Between(200, 299), Anything, Delivered, Sylk::Status),
    // 410 Unregistered / ExpiredToken, with the instant the token stopped being valid.
    row(Is(410), Anything, TokenGone, Sylk::Status),
    row(Is(400), Reason("BadDeviceToken"), TokenGone, Sylk::Gone),
    row(
        Is(400),
        Reason("DeviceTokenNotForTopic"),
        TokenGone,
        Sylk::Status,
    ),
    refreshable(403, "ExpiredProviderToken"),
    refreshable(403, "InvalidProviderToken"),
    // BadCertificate, BadCertificateEnvironment, Forbidden, MissingProviderToken,
    // UnrelatedKeyIdInToken, BadEnvironmentKeyIdInToken: every 403 is about our credentials.
    row(Is(403), Anything, CredentialRejected, Sylk::Status),
    // TooManyRequests (to one device), TooManyProviderTokenUpdates.
    row(Is(429), Anything, Retryable, Sylk::Status),
    // InternalServerError, ServiceUnavailable, Shutdown.
    row(Between(500, 599), Anything, Retryable, Sylk::Status),
    row(Status::None, Anything, Retryable, Sylk::BadGateway),
    // BadTopic, PayloadEmpty, BadExpirationDate, MethodNotAllowed (405), PayloadTooLarge (413)...
    row(Any, Anything, Rejected, Sylk::Status),
];

/// FCM HTTP v1, first matching row wins.
const FCM: &[Row] = &[
    row(Between(200, 299), Anything, Delivered, Sylk::Status),
    row(Is(404), Anything, TokenGone, Sylk::Gone),
    row(Any, Reason("UNREGISTERED"), TokenGone, Sylk::Status),
    row(
        Is(403),
        Reason("SENDER_ID_MISMATCH"),
        TokenGone,
        Sylk::Status,
    ),
    row(
        Is(400),
        MessageContains("not a valid FCM registration token"),
        TokenGone,
        Sylk::Gone,
    ),
    // Our OAuth access token (a 401 without an FcmError detail).
    refreshable(401, "UNAUTHENTICATED"),
    // THIRD_PARTY_AUTH_ERROR: the APNs or web-push credential uploaded to Firebase.
    row(Is(401), Anything, CredentialRejected, Sylk::Status),
    // PERMISSION_DENIED: the service account may not send for this project.
    row(Is(403), Anything, CredentialRejected, Sylk::Status),
    // QUOTA_EXCEEDED, with a Retry-After.
    row(Is(429), Anything, Retryable, Sylk::Status),
    // UNAVAILABLE (503), INTERNAL (500).
    row(Between(500, 599), Anything, Retryable, Sylk::Status),
    row(Status::None, Anything, Retryable, Sylk::BadGateway),
    // INVALID_ARGUMENT about the message, and anything else FCM may add.
    row(Any, Anything, Rejected, Sylk::Status),
];

/// Reasons of WebPush pushes the worker refused to send: nothing went out, so no status came.
pub const ENDPOINT_NOT_ALLOWED: &str = "EndpointNotAllowed";
pub const PAYLOAD_TOO_LARGE: &str = "PayloadTooLarge";
pub const BAD_SUBSCRIPTION_KEY: &str = "BadSubscriptionKey";
/// NextPush answers an unknown or deleted endpoint token 401 `{"success":false}`.
pub const NEXTPUSH_UNKNOWN: &str = "success=false";

/// WebPush and UnifiedPush push services (RFC 8030, autopush, ntfy, NextPush, the XMPP
/// gateway), first matching row wins.
const WEBPUSH: &[Row] = &[
    row(
        Status::None,
        Reason(ENDPOINT_NOT_ALLOWED),
        Rejected,
        Sylk::Code(400),
    ),
    row(
        Status::None,
        Reason(BAD_SUBSCRIPTION_KEY),
        Rejected,
        Sylk::Code(400),
    ),
    row(
        Status::None,
        Reason(PAYLOAD_TOO_LARGE),
        Rejected,
        Sylk::Code(413),
    ),
    // 201 (RFC 8030, autopush), 200 (ntfy, NextPush), 202 (the XMPP gateway).
    row(Between(200, 299), Anything, Delivered, Sylk::Status),
    // The subscription is gone.
    row(Is(404), Anything, TokenGone, Sylk::Gone),
    row(Is(410), Anything, TokenGone, Sylk::Status),
    row(Is(401), Reason(NEXTPUSH_UNKNOWN), TokenGone, Sylk::Gone),
    // Our VAPID token refused: the key or subject is not what the subscription expects.
    row(Is(401), Anything, CredentialRejected, Sylk::Status),
    row(Is(403), Anything, CredentialRejected, Sylk::Status),
    // Slow down for this endpoint, honouring Retry-After.
    row(Is(429), Anything, Retryable, Sylk::Status),
    // 500, 502, 503, and ntfy's 507 (no subscriber yet).
    row(Between(500, 599), Anything, Retryable, Sylk::Status),
    row(Status::None, Anything, Retryable, Sylk::BadGateway),
    // 400 (bad headers or encryption), 413 (too large), 3xx (never followed), anything else.
    row(Any, Anything, Rejected, Sylk::Status),
];

/// What the provider's answer means. `status` is `None` when no HTTP answer came; `reason` is
/// the APNs reason or the FCM error code; `message` is FCM's error message.
pub fn classify(
    platform: Platform,
    status: Option<u16>,
    reason: Option<&str>,
    message: Option<&str>,
) -> Answer {
    let table = match platform {
        Platform::Apple => APNS,
        Platform::Firebase => FCM,
        Platform::UnifiedPush => WEBPUSH,
    };
    let row = table
        .iter()
        .find(|row| row.matches(status, reason, message))
        .expect("each table ends with a row that matches every answer");
    Answer {
        class: row.class,
        sylk_code: match (row.sylk, status) {
            (Sylk::Gone, _) => 410,
            (Sylk::Code(code), _) => code,
            (Sylk::Status, Some(status)) => status,
            (Sylk::Status | Sylk::BadGateway, _) => 502,
        },
        refresh_credential: row.refresh_credential,
        retry_after: None,
    }
}

impl Row {
    fn matches(&self, status: Option<u16>, reason: Option<&str>, message: Option<&str>) -> bool {
        let status_matches = match (self.status, status) {
            (Status::Any, _) => true,
            (Status::None, None) => true,
            (Status::Is(wanted), Some(status)) => status == wanted,
            (Status::Between(low, high), Some(status)) => (low..=high).contains(&status),
            _ => false,
        };
        status_matches
            && match self.said {
                Said::Anything => true,
                Said::Reason(wanted) => reason == Some(wanted),
                Said::MessageContains(text) => message.is_some_and(|m| m.contains(text)),
            }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// (status, reason, message) → (class, Sylk code, refresh the credential)
    type Case = (
        Option<u16>,
        Option<&'static str>,
        Option<&'static str>,
        Class,
        u16,
        bool,
    );

    fn check(platform: Platform, cases: &[Case]) {
        for &(status, reason, message, class, sylk_code, refresh) in cases {
            let answer = classify(platform, status, reason, message);
            assert_eq!(
                (answer.class, answer.sylk_code, answer.refresh_credential),
                (class, sylk_code, refresh),
                "{platform} {status:?} {reason:?} {message:?}"
            );
        }
    }

    #[test]
    fn apns_rows() {
        check(
            Platform::Apple,
            &[
                (Some(200), None, None, Delivered, 200, false),
                (Some(410), Some("Unregistered"), None, TokenGone, 410, false),
                (Some(410), Some("ExpiredToken"), None, TokenGone, 410, false),
                (
                    Some(400),
                    Some("BadDeviceToken"),
                    None,
                    TokenGone,
                    410,
                    false,
                ),
                (
                    Some(400),
                    Some("DeviceTokenNotForTopic"),
                    None,
                    TokenGone,
                    400,
                    false,
                ),
                (
                    Some(403),
                    Some("ExpiredProviderToken"),
                    None,
                    CredentialRejected,
                    403,
                    true,
                ),
                (
                    Some(403),
                    Some("InvalidProviderToken"),
                    None,
                    CredentialRejected,
                    403,
                    true,
                ),
                (
                    Some(403),
                    Some("BadCertificate"),
                    None,
                    CredentialRejected,
                    403,
                    false,
                ),
                (
                    Some(403),
                    Some("MissingProviderToken"),
                    None,
                    CredentialRejected,
                    403,
                    false,
                ),
                (
                    Some(429),
                    Some("TooManyRequests"),
                    None,
                    Retryable,
                    429,
                    false,
                ),
                (
                    Some(500),
                    Some("InternalServerError"),
                    None,
                    Retryable,
                    500,
                    false,
                ),
                (
                    Some(503),
                    Some("ServiceUnavailable"),
                    None,
                    Retryable,
                    503,
                    false,
                ),
                (Some(503), Some("Shutdown"), None, Retryable, 503, false),
                (None, None, None, Retryable, 502, false),
                (Some(400), Some("BadTopic"), None, Rejected, 400, false),
                (Some(400), Some("PayloadEmpty"), None, Rejected, 400, false),
                (
                    Some(413),
                    Some("PayloadTooLarge"),
                    None,
                    Rejected,
                    413,
                    false,
                ),
                (
                    Some(405),
                    Some("MethodNotAllowed"),
                    None,
                    Rejected,
                    405,
                    false,
                ),
            ],
        );
    }

    #[test]
    fn fcm_rows() {
        let bad_token = Some("The registration token is not a valid FCM registration token");
        let bad_message = Some("Invalid value at 'message.data[0].value'");
        check(
            Platform::Firebase,
            &[
                (Some(200), None, None, Delivered, 200, false),
                (Some(404), Some("UNREGISTERED"), None, TokenGone, 410, false),
                (Some(404), Some("NOT_FOUND"), None, TokenGone, 410, false),
                (Some(400), Some("UNREGISTERED"), None, TokenGone, 400, false),
                (
                    Some(403),
                    Some("SENDER_ID_MISMATCH"),
                    None,
                    TokenGone,
                    403,
                    false,
                ),
                (
                    Some(400),
                    Some("INVALID_ARGUMENT"),
                    bad_token,
                    TokenGone,
                    410,
                    false,
                ),
                (
                    Some(401),
                    Some("UNAUTHENTICATED"),
                    None,
                    CredentialRejected,
                    401,
                    true,
                ),
                (
                    Some(401),
                    Some("THIRD_PARTY_AUTH_ERROR"),
                    None,
                    CredentialRejected,
                    401,
                    false,
                ),
                (
                    Some(403),
                    Some("PERMISSION_DENIED"),
                    None,
                    CredentialRejected,
                    403,
                    false,
                ),
                (
                    Some(429),
                    Some("QUOTA_EXCEEDED"),
                    None,
                    Retryable,
                    429,
                    false,
                ),
                (Some(503), Some("UNAVAILABLE"), None, Retryable, 503, false),
                (Some(500), Some("INTERNAL"), None, Retryable, 500, false),
                (None, None, None, Retryable, 502, false),
                (
                    Some(400),
                    Some("INVALID_ARGUMENT"),
                    bad_message,
                    Rejected,
                    400,
                    false,
                ),
                (
                    Some(400),
                    Some("INVALID_ARGUMENT"),
                    None,
                    Rejected,
                    400,
                    false,
                ),
            ],
        );
    }

    #[test]
    fn webpush_rows() {
        check(
            Platform::UnifiedPush,
            &[
                (Some(201), None, None, Delivered, 201, false),
                (Some(200), None, None, Delivered, 200, false),
                (Some(202), None, None, Delivered, 202, false),
                (Some(404), None, None, TokenGone, 410, false),
                (Some(410), None, None, TokenGone, 410, false),
                (
                    Some(401),
                    Some(NEXTPUSH_UNKNOWN),
                    None,
                    TokenGone,
                    410,
                    false,
                ),
                (Some(401), None, None, CredentialRejected, 401, false),
                (Some(403), None, None, CredentialRejected, 403, false),
                (Some(400), None, None, Rejected, 400, false),
                (Some(413), None, None, Rejected, 413, false),
                (Some(301), None, None, Rejected, 301, false),
                (Some(307), None, None, Rejected, 307, false),
                (Some(429), None, None, Retryable, 429, false),
                (Some(500), None, None, Retryable, 500, false),
                (Some(503), None, None, Retryable, 503, false),
                (Some(507), None, None, Retryable, 507, false),
                (None, None, None, Retryable, 502, false),
                (None, Some(ENDPOINT_NOT_ALLOWED), None, Rejected, 400, false),
                (None, Some(BAD_SUBSCRIPTION_KEY), None, Rejected, 400, false),
                (None, Some(PAYLOAD_TOO_LARGE), None, Rejected, 413, false),
            ],
        );
    }

    #[test]
    fn every_answer_has_a_row() {
        for platform in [Platform::Apple, Platform::Firebase, Platform::UnifiedPush] {
            for status in (100..600).map(Some).chain([None]) {
                let answer = classify(platform, status, Some("SomethingNew"), None);
                assert_eq!(answer.retry_after, None);
            }
        }
    }

    #[test]
    fn terminal_states_follow_the_class() {
        let answer = |class| Answer {
            class,
            sylk_code: 200,
            refresh_credential: false,
            retry_after: None,
        };
        assert_eq!(
            answer(Delivered).terminal_status(),
            DeliveryStatus::Delivered
        );
        assert_eq!(
            answer(TokenGone).terminal_status(),
            DeliveryStatus::TokenInvalid
        );
        assert_eq!(
            answer(CredentialRejected).terminal_status(),
            DeliveryStatus::Failed
        );
        assert!(answer(TokenGone).token_gone());
        assert!(answer(CredentialRejected).credential_rejected());
    }
}
