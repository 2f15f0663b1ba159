//! What a provider's answer means for the job: one table, in one place. Every APNs status and
//! reason and every FCM status and errorCode lands in exactly one class.

use pushfleet_core::config::Platform;
use pushfleet_core::job::DeliveryStatus;

use crate::providers::ProviderResponse;

/// The class of a provider answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Class {
    Delivered,
    /// The token is gone for good (uninstalled, expired, wrong app): stop pushing to it.
    TokenInvalid,
    /// The provider refused this push for good (malformed request or payload).
    Rejected,
    /// Might succeed later: overload, outage, throttling, no answer.
    Retryable,
    /// Our credentials were refused: refresh them once, then alarm.
    Credential,
}

impl Class {
    /// The terminal state when no further attempt is made.
    pub fn terminal_status(self) -> DeliveryStatus {
        match self {
            Class::Delivered => DeliveryStatus::Delivered,
            Class::TokenInvalid => DeliveryStatus::TokenInvalid,
            Class::Rejected => DeliveryStatus::Rejected,
            Class::Retryable | Class::Credential => DeliveryStatus::Failed,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Class::Delivered => "delivered",
            Class::TokenInvalid => "token_invalid",
            Class::Rejected => "rejected",
            Class::Retryable => "retryable",
            Class::Credential => "credential",
        }
    }
}

/// Classifies one provider answer (protocols.md A5, B4).
pub fn classify(platform: Platform, response: &ProviderResponse) -> Class {
    let Some(status) = response.status else {
        return Class::Retryable;
    };
    let reason = response.reason.as_deref().unwrap_or("");
    match platform {
        Platform::Apple => match (status, reason) {
            (200..=299, _) => Class::Delivered,
            (410, _) => Class::TokenInvalid,
            (400, "BadDeviceToken" | "DeviceTokenNotForTopic") => Class::TokenInvalid,
            (403, "ExpiredProviderToken" | "InvalidProviderToken" | "MissingProviderToken")
            | (403, "BadCertificate" | "BadCertificateEnvironment" | "Forbidden")
            | (403, "UnrelatedKeyIdInToken" | "BadEnvironmentKeyIdInToken") => Class::Credential,
            (403, _) => Class::Credential,
            (429, _) | (500..=599, _) => Class::Retryable,
            _ => Class::Rejected,
        },
        Platform::Firebase => match (status, reason) {
            (200..=299, _) => Class::Delivered,
            (404, _) | (_, "UNREGISTERED") => Class::TokenInvalid,
            (403, "SENDER_ID_MISMATCH") => Class::TokenInvalid,
            (400, _) if is_bad_fcm_token(response) => Class::TokenInvalid,
            // A 401 without FcmError detail is our OAuth token; THIRD_PARTY_AUTH_ERROR is the
            // APNs or web-push credential uploaded to Firebase. Both are configuration.
            (401, _) | (403, _) => Class::Credential,
            (429, _) | (500..=599, _) => Class::Retryable,
            _ => Class::Rejected,
        },
    }
}

/// FCM answers 400 INVALID_ARGUMENT both for a malformed token and for a malformed message;
/// only the message text tells them apart.
fn is_bad_fcm_token(response: &ProviderResponse) -> bool {
    response.body["error"]["message"]
        .as_str()
        .is_some_and(|m| m.contains("not a valid FCM registration token"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use std::time::Duration;

    fn answer(status: Option<u16>, reason: &str, body: serde_json::Value) -> ProviderResponse {
        ProviderResponse {
            status,
            reason: (!reason.is_empty()).then(|| reason.to_string()),
            body,
            message_id: None,
            retry_after: None,
            apns_timestamp_ms: None,
            url: String::new(),
            transport_error: None,
            duration: Duration::ZERO,
        }
    }

    #[test]
    fn apns_table() {
        let rows = [
            (Some(200), "", Class::Delivered),
            (Some(410), "Unregistered", Class::TokenInvalid),
            (Some(410), "ExpiredToken", Class::TokenInvalid),
            (Some(400), "BadDeviceToken", Class::TokenInvalid),
            (Some(400), "DeviceTokenNotForTopic", Class::TokenInvalid),
            (Some(400), "BadTopic", Class::Rejected),
            (Some(400), "PayloadEmpty", Class::Rejected),
            (Some(413), "PayloadTooLarge", Class::Rejected),
            (Some(403), "ExpiredProviderToken", Class::Credential),
            (Some(403), "InvalidProviderToken", Class::Credential),
            (Some(403), "BadCertificate", Class::Credential),
            (Some(429), "TooManyRequests", Class::Retryable),
            (Some(500), "InternalServerError", Class::Retryable),
            (Some(503), "ServiceUnavailable", Class::Retryable),
            (Some(503), "Shutdown", Class::Retryable),
            (None, "", Class::Retryable),
        ];
        for (status, reason, class) in rows {
            assert_eq!(
                classify(Platform::Apple, &answer(status, reason, json!({}))),
                class,
                "{status:?} {reason}"
            );
        }
    }

    #[test]
    fn fcm_table() {
        let bad_token = json!({"error": {"message": "The registration token is not a valid FCM registration token"}});
        let bad_message = json!({"error": {"message": "Invalid value at 'message.data[0].value'"}});
        let rows = [
            (Some(200), "", json!({}), Class::Delivered),
            (Some(404), "UNREGISTERED", json!({}), Class::TokenInvalid),
            (
                Some(403),
                "SENDER_ID_MISMATCH",
                json!({}),
                Class::TokenInvalid,
            ),
            (
                Some(400),
                "INVALID_ARGUMENT",
                bad_token,
                Class::TokenInvalid,
            ),
            (Some(400), "INVALID_ARGUMENT", bad_message, Class::Rejected),
            (Some(401), "UNAUTHENTICATED", json!({}), Class::Credential),
            (
                Some(401),
                "THIRD_PARTY_AUTH_ERROR",
                json!({}),
                Class::Credential,
            ),
            (Some(403), "PERMISSION_DENIED", json!({}), Class::Credential),
            (Some(429), "QUOTA_EXCEEDED", json!({}), Class::Retryable),
            (Some(503), "UNAVAILABLE", json!({}), Class::Retryable),
            (Some(500), "INTERNAL", json!({}), Class::Retryable),
            (None, "", json!({}), Class::Retryable),
        ];
        for (status, reason, body, class) in rows {
            assert_eq!(
                classify(Platform::Firebase, &answer(status, reason, body)),
                class,
                "{status:?} {reason}"
            );
        }
    }
}
