//! What a text must be before ingest stores it or forwards it: no control characters (Postgres
//! refuses a NUL in text, and a provider or a phone has no use for the others), a length that
//! fits its purpose, and a device token of the shape its platform issues. Every API applies these
//! rules from here, to the values as they will be stored or sent: after coercion, after
//! percent-decoding, after a token pair is split.

use std::ops::RangeInclusive;

use pushfleet_core::config::Platform;
use pushfleet_core::tokens::NewToken;
use serde_json::{Map, Value};

use crate::error::ApiError;
use crate::fields::field;

/// The longest a field may be, in characters (Unicode scalar values, as pydantic counts).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limit {
    pub field: &'static str,
    pub max_chars: usize,
    /// Only a message's text may span lines: it may hold TAB, LF and CR.
    pub multiline: bool,
}

const fn line(field: &'static str, max_chars: usize) -> Limit {
    Limit {
        field,
        max_chars,
        multiline: false,
    }
}

// The table. README's "Input limits" mirrors it (a test keeps them in step).
pub const ACCOUNT: Limit = line("account", 256);
pub const APP_ID: Limit = line("app-id", 256);
pub const DEVICE_ID: Limit = line("device-id", 256);
pub const CALL_ID: Limit = line("call-id", 256);
pub const FROM: Limit = line("from", 512);
pub const TO: Limit = line("to", 512);
pub const FROM_DISPLAY_NAME: Limit = line("from-display-name", 256);
pub const MEDIA_TYPE: Limit = line("media-type", 64);
pub const REASON: Limit = line("reason", 256);
pub const FILENAME: Limit = line("filename", 1024);
pub const FILETYPE: Limit = line("filetype", 256);
pub const CONTENT: Limit = Limit {
    field: "content",
    max_chars: 4096,
    multiline: true,
};
pub const CONTENT_TYPE: Limit = line("content-type", 256);
pub const USER_AGENT: Limit = line("user-agent", 512);
/// FCM's own maximum; APNs tokens are held to [`APNS_TOKEN_HEX_DIGITS`] below it.
pub const TOKEN: Limit = line("token", 4096);
pub const PN_PROVIDER: Limit = line("pn-provider", 64);
pub const PN_TYPE: Limit = line("pn-type", 64);
pub const PN_PARAM: Limit = line("pn-param", 256);
/// One FCM token, or an APNs `<token>:remote&<token>:voip` pair.
pub const PN_PRID: Limit = line("pn-prid", 4096);
pub const PN_TOK: Limit = line("pn-tok", 4096);
/// Each per-contact string and sound (`pn-call-str`, `pn-msg-snd`…).
pub const PN_STRING_MAX_CHARS: usize = 256;

/// The limit of one per-contact string or sound parameter.
pub const fn pn_string(field: &'static str) -> Limit {
    line(field, PN_STRING_MAX_CHARS)
}

/// Apple's device tokens are 32 bytes today; longer ones (up to 100 bytes) must still pass.
pub const APNS_TOKEN_HEX_DIGITS: RangeInclusive<usize> = 64..=200;

// The numbers in these texts are those of the constants above (a test checks).
const CONTROL: &str = "must not contain control characters";
const CONTROL_MULTILINE: &str =
    "must not contain control characters other than tab, line feed and carriage return";
const APNS_SHAPE: &str = "must be an APNs device token of 64 to 200 hex digits (an even number)";
const APNS_PAIR_SHAPE: &str = "must be an APNs device token, or a '<voip>-<background>' pair of them, each of 64 to 200 hex digits (an even number)";
const FCM_SHAPE: &str =
    "must be an FCM registration token of letters, digits, '_', ':', '.' and '-'";

/// Checks a text against its limit, reported under the limit's field name.
pub fn check(limit: &Limit, value: &str) -> Result<(), ApiError> {
    check_as(limit, limit.field, value)
}

/// Checks a text against `limit`, reported as `field` (where the caller named it differently).
pub fn check_as(limit: &Limit, field: &'static str, value: &str) -> Result<(), ApiError> {
    let mut chars = 0;
    for c in value.chars() {
        if c.is_control() && !(limit.multiline && matches!(c, '\t' | '\n' | '\r')) {
            let problem = if limit.multiline {
                CONTROL_MULTILINE
            } else {
                CONTROL
            };
            return Err(ApiError::InvalidField { field, problem });
        }
        chars += 1;
    }
    if chars > limit.max_chars {
        return Err(ApiError::TooLong {
            field,
            max_chars: limit.max_chars,
        });
    }
    Ok(())
}

pub fn check_optional(limit: &Limit, value: Option<&str>) -> Result<(), ApiError> {
    value.map_or(Ok(()), |v| check(limit, v))
}

fn is_apns_token(token: &str) -> bool {
    APNS_TOKEN_HEX_DIGITS.contains(&token.len())
        && token.len().is_multiple_of(2)
        && token.bytes().all(|b| b.is_ascii_hexdigit())
}

fn is_fcm_token(token: &str) -> bool {
    !token.is_empty()
        && token
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b':' | b'.' | b'-'))
}

/// A device token to push to, reported as `field` (`token`, or the RFC 8599 parameter it came
/// from).
pub fn check_token(platform: Platform, field: &'static str, token: &str) -> Result<(), ApiError> {
    check_as(&TOKEN, field, token)?;
    let (valid, problem) = match platform {
        Platform::Apple => (is_apns_token(token), APNS_SHAPE),
        Platform::Firebase => (is_fcm_token(token), FCM_SHAPE),
        // Whether the endpoint may be called is [`crate::endpoint`]'s to say.
        Platform::UnifiedPush => {
            return pushfleet_core::webpush::parse_endpoint(token)
                .map(drop)
                .map_err(ApiError::BadEndpoint)
        }
    };
    if valid {
        Ok(())
    } else {
        Err(ApiError::InvalidField { field, problem })
    }
}

/// A token as a v2 registration gives it: for Apple also Sylk's `<voip>-<background>` pair,
/// each part of which must be a token (split as the token store splits it).
pub fn check_registered_token(platform: Platform, raw: &str) -> Result<(), ApiError> {
    if platform != Platform::Apple || !raw.contains('-') {
        return check_token(platform, TOKEN.field, raw);
    }
    check(&TOKEN, raw)?;
    let (voip, background) = NewToken::split_token(platform, raw);
    if is_apns_token(&voip) && background.as_deref().is_none_or(is_apns_token) {
        Ok(())
    } else {
        Err(ApiError::InvalidField {
            field: TOKEN.field,
            problem: APNS_PAIR_SHAPE,
        })
    }
}

/// The call fields of a request (what a v2 push adds to each device's push), where they are
/// text: a bad request is refused before any device is looked up.
pub fn check_call_fields(request: &Map<String, Value>) -> Result<(), ApiError> {
    const CALL_FIELDS: [Limit; 11] = [
        CALL_ID,
        FROM,
        FROM_DISPLAY_NAME,
        TO,
        MEDIA_TYPE,
        REASON,
        FILENAME,
        FILETYPE,
        ACCOUNT,
        CONTENT,
        CONTENT_TYPE,
    ];
    for limit in &CALL_FIELDS {
        if let Some(Value::String(text)) = field(request, limit.field) {
            check(limit, text)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn problem(result: Result<(), ApiError>) -> String {
        result.unwrap_err().to_string()
    }

    #[test]
    fn control_characters_are_refused_where_they_do_not_belong() {
        assert!(check(&CALL_ID, "a84b4c76e66710@pc33.example.com").is_ok());
        assert!(check(&FROM_DISPLAY_NAME, "Zoë Ünal 🎧").is_ok());
        for bad in [
            "a\u{0}b",
            "a\u{1f}",
            "\u{7f}",
            "x\u{80}",
            "x\u{9f}y",
            "tab\there",
        ] {
            assert_eq!(
                problem(check(&CALL_ID, bad)),
                "must not contain control characters: call-id",
                "{bad:?}"
            );
        }
        assert!(check(&CONTENT, "line one\r\nline\ttwo\n").is_ok());
        assert_eq!(
            problem(check(&CONTENT, "a\u{0}b")),
            "must not contain control characters other than tab, line feed and carriage return: content"
        );
        assert_eq!(
            problem(check_as(&CALL_ID, "call_id", "\u{85}")),
            "must not contain control characters: call_id"
        );
    }

    #[test]
    fn lengths_count_characters() {
        assert!(check(&CALL_ID, &"é".repeat(256)).is_ok());
        assert_eq!(
            problem(check(&CALL_ID, &"x".repeat(257))),
            "ensure this value has at most 256 characters: call-id"
        );
        assert!(check(&CONTENT, &"x".repeat(4096)).is_ok());
        assert!(check(&CONTENT, &"x".repeat(4097)).is_err());
        assert!(check_optional(&REASON, None).is_ok());
    }

    #[test]
    fn apns_tokens_are_even_hex_of_apples_lengths() {
        let ok = |t: &str| check_token(Platform::Apple, "token", t).is_ok();
        assert!(ok(&"a1".repeat(32)));
        assert!(ok(&"AB".repeat(32)));
        assert!(ok(&"0f".repeat(100)));
        assert!(!ok(&"a".repeat(62)));
        assert!(!ok(&"a".repeat(65)));
        assert!(!ok(&"a".repeat(202)));
        assert!(!ok(&format!("{}g", "a".repeat(63))));
        assert!(!ok("tok"));
        assert!(!ok(""));
        assert_eq!(
            problem(check_token(Platform::Apple, "pn-prid", "y")),
            format!("{APNS_SHAPE}: pn-prid")
        );
    }

    #[test]
    fn fcm_tokens_keep_their_character_set() {
        let ok = |t: &str| check_token(Platform::Firebase, "token", t).is_ok();
        assert!(ok("fcm-1:APA91bH_x.y-z"));
        assert!(ok(&"A".repeat(4096)));
        assert!(!ok(&"A".repeat(4097)));
        assert!(!ok("with space"));
        assert!(!ok("slash/"));
        assert!(!ok("é"));
        assert!(!ok(""));
        assert_eq!(
            problem(check_token(Platform::Firebase, "token", "a\u{0}b")),
            "must not contain control characters: token"
        );
    }

    #[test]
    fn registered_apple_pairs_check_each_part() {
        let (voip, background) = ("ab".repeat(32), "cd".repeat(32));
        let check = |t: &str| check_registered_token(Platform::Apple, t);
        assert!(check(&voip).is_ok());
        assert!(check(&format!("{voip}-{background}")).is_ok());
        // An empty background part is dropped by the split, as before.
        assert!(check(&format!("{voip}-")).is_ok());
        for bad in [
            format!("{voip}-xyz"),
            format!("xyz-{background}"),
            format!("-{background}"),
            format!("{voip}--{background}"),
        ] {
            assert_eq!(problem(check(&bad)), format!("{APNS_PAIR_SHAPE}: token"));
        }
        assert_eq!(problem(check("xyz")), format!("{APNS_SHAPE}: token"));
        assert!(check_registered_token(Platform::Firebase, "fcm-1:APA").is_ok());
    }

    #[test]
    fn call_fields_of_a_request_are_checked_where_they_are_text() {
        let request = |v: Value| v.as_object().unwrap().clone();
        assert!(check_call_fields(&request(serde_json::json!({
            "call-id": 5, "from": ["a"], "to": "bob", "content": "a\nb"
        })))
        .is_ok());
        assert_eq!(
            problem(check_call_fields(&request(
                serde_json::json!({"from_display_name": "A\u{1b}[31m"})
            ))),
            "must not contain control characters: from-display-name"
        );
    }

    #[test]
    fn messages_name_the_limits_in_force() {
        let (low, high) = APNS_TOKEN_HEX_DIGITS.into_inner();
        for text in [APNS_SHAPE, APNS_PAIR_SHAPE] {
            assert!(
                text.contains(&format!("{low} to {high} hex digits")),
                "{text}"
            );
        }
    }

    const ALL: [Limit; 20] = [
        ACCOUNT,
        APP_ID,
        DEVICE_ID,
        CALL_ID,
        FROM,
        TO,
        FROM_DISPLAY_NAME,
        MEDIA_TYPE,
        REASON,
        FILENAME,
        FILETYPE,
        CONTENT,
        CONTENT_TYPE,
        USER_AGENT,
        TOKEN,
        PN_PROVIDER,
        PN_TYPE,
        PN_PARAM,
        PN_PRID,
        PN_TOK,
    ];

    /// The README's table lists every limit with its value.
    #[test]
    fn the_readme_table_matches() {
        let readme = include_str!("../../README.md");
        let row = |limit: &Limit| format!("| `{}` | {} |", limit.field, limit.max_chars);
        for limit in &ALL {
            assert!(
                readme.lines().any(|l| l.starts_with(&row(limit))),
                "README lacks the row {}",
                row(limit)
            );
        }
        let (low, high) = APNS_TOKEN_HEX_DIGITS.into_inner();
        assert!(readme.contains(&format!("{low} to {high} hex digits")));
    }
}
