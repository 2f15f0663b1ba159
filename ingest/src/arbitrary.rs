//! Request bodies for the property tests of the request checks. Purely random objects stop at
//! the first check, so most bodies are a valid request of each API with a few fields replaced
//! by any JSON value or removed: every later check gets its share of the cases.

use std::path::Path;
use std::sync::OnceLock;

use proptest::prelude::*;
use proptest::test_runner::Config;
use pushfleet_core::config::{Platform, Settings};
use pushfleet_core::job::PushData;
use serde_json::{json, Map, Number, Value};

use crate::error::ApiError;
use crate::fcm_projects::FcmProjects;
use crate::limits;

/// Enough cases to reach every check, few enough for the unit tests to stay fast.
pub fn config() -> Config {
    Config::with_cases(256)
}

/// A Sylk and a Linphone app on each platform.
pub fn settings() -> &'static Settings {
    static SETTINGS: OnceLock<Settings> = OnceLock::new();
    SETTINGS.get_or_init(|| {
        // Any readable file passes for a credential: nothing here connects.
        let file = Path::new(env!("CARGO_MANIFEST_DIR")).join("Cargo.toml");
        let text = format!(
            r#"
            [[apps]]
            id = "com.example.sylk"
            platform = "apple"
            type = "sylk"
            apns = {{ cert_file = "{0}", cert_key_file = "{0}" }}
            [[apps]]
            id = "org.linphone.phone"
            platform = "apple"
            type = "linphone"
            apns = {{ cert_file = "{0}", cert_key_file = "{0}" }}
            [[apps]]
            id = "com.example.sylk"
            platform = "firebase"
            type = "sylk"
            fcm = {{ service_account_file = "{0}", project_id = "sylk-1234" }}
            [[apps]]
            id = "org.linphone.phone"
            platform = "firebase"
            type = "linphone"
            fcm = {{ service_account_file = "{0}", project_id = "linphone-1234" }}
            "#,
            file.display()
        );
        Settings::from_toml(&text, Vec::new(), Path::new(".")).expect("test settings")
    })
}

pub fn fcm_projects() -> &'static FcmProjects {
    static PROJECTS: OnceLock<FcmProjects> = OnceLock::new();
    PROJECTS.get_or_init(|| FcmProjects::load(settings()))
}

const APNS_TOKEN: &str = "a1b2c3d4e5f60718293a4b5c6d7e8f90a1b2c3d4e5f60718293a4b5c6d7e8f90";
const FCM_TOKEN: &str = "fcm-1:APA91bHun4MxP5egoKMwt2KZFBaFUH-1RYqx";

/// Words the checks look for, and values they refuse.
const WORDS: &[&str] = &[
    "",
    "com.example.sylk",
    "org.linphone.phone",
    "apple",
    "ios",
    "firebase",
    "fcm",
    "android",
    "apns",
    "apns.dev",
    "windows",
    "incoming_session",
    "incoming_conference_request",
    "cancel",
    "message",
    "transfer",
    "call",
    "background",
    "audio",
    "video",
    "chat",
    "1",
    "0",
    "yes",
    "off",
    APNS_TOKEN,
    FCM_TOKEN,
    "a\u{0}b",
    "\u{7f}",
    "\u{85}",
    "line\r\nbreak",
    "tab\there",
    "TEAM.com.example.sylk.voip",
    "ABCD1234.org.linphone.phone.remote&voip",
    "linphone-1234",
];

/// Field names of every API, in both spellings where there are two, and a few unknown ones.
const KEYS: &[&str] = &[
    "app-id",
    "app_id",
    "platform",
    "token",
    "device-id",
    "device_id",
    "call-id",
    "call_id",
    "from",
    "from-display-name",
    "from_display_name",
    "to",
    "media-type",
    "media_type",
    "event",
    "silent",
    "reason",
    "badge",
    "filename",
    "filetype",
    "account",
    "content",
    "content-type",
    "content_type",
    "user-agent",
    "user_agent",
    "contact",
    "pn-provider",
    "pn_provider",
    "pn-param",
    "pn-prid",
    "pn_prid",
    "pn-type",
    "pn-tok",
    "type",
    "x-unknown",
];

/// Texts that matter to the checks: known words, tokens of about the right shape, control
/// characters, long runs, and anything at all.
pub fn text() -> impl Strategy<Value = String> {
    prop_oneof![
        2 => prop::sample::select(WORDS).prop_map(str::to_string),
        1 => any::<String>(),
        1 => "[0-9a-fA-F]{60,204}",
        1 => "[A-Za-z0-9_:.-]{1,64}",
        2 => "[a-z]{0,4}[\\x00-\\x1F\\x7F\\x{80}-\\x{9F}][a-z]{0,4}",
        2 => (200usize..5000).prop_map(|n| "x".repeat(n)),
    ]
}

/// Any JSON value, a few levels deep.
pub fn json_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(Value::from),
        any::<f64>().prop_map(|f| Number::from_f64(f).map_or(Value::Null, Value::Number)),
        text().prop_map(Value::String),
    ];
    leaf.prop_recursive(3, 16, 4, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
            prop::collection::vec((key(), inner), 0..4)
                .prop_map(|entries| Value::Object(entries.into_iter().collect())),
        ]
    })
}

fn key() -> impl Strategy<Value = String> {
    prop_oneof![
        4 => prop::sample::select(KEYS).prop_map(str::to_string),
        1 => any::<String>(),
    ]
}

/// `base` with some fields replaced (mostly by text, what the limits are about) or removed.
fn mutated(base: Value) -> impl Strategy<Value = Map<String, Value>> {
    let value = prop_oneof![3 => text().prop_map(Value::String), 1 => json_value()];
    // Mostly the base's own fields, which each API reads.
    let own: Vec<String> = base
        .as_object()
        .expect("an object")
        .keys()
        .cloned()
        .collect();
    let name = prop_oneof![3 => prop::sample::select(own), 1 => key()];
    let changes = prop::collection::vec((name, prop::option::weighted(0.9, value)), 0..3);
    changes.prop_map(move |changes| {
        let mut body = base.as_object().expect("an object").clone();
        for (key, value) in changes {
            match value {
                Some(value) => body.insert(key, value),
                None => body.remove(&key),
            };
        }
        body
    })
}

/// Any object at all, or one of `bases` mutated.
fn bodies(bases: Vec<Value>) -> impl Strategy<Value = Map<String, Value>> {
    let any_object = prop::collection::vec((key(), json_value()), 0..8)
        .prop_map(|entries| entries.into_iter().collect::<Map<String, Value>>());
    prop_oneof![
        1 => any_object,
        4 => prop::sample::select(bases).prop_flat_map(mutated),
    ]
}

fn call_data() -> Value {
    json!({"call-id": "a84b4c76e66710@pc33.example.com", "from": "alice@example.com",
           "from-display-name": "Alice", "to": "bob@example.com", "media-type": "audio",
           "event": "incoming_session", "silent": "1", "reason": "busy", "badge": 2,
           "account": "bob@example.com", "content": "hi\nthere", "content-type": "text/plain"})
}

fn with(mut base: Value, extra: Value) -> Value {
    for (key, value) in extra.as_object().expect("an object") {
        base[key] = value.clone();
    }
    base
}

/// v1 `/push` bodies.
pub fn push_body() -> impl Strategy<Value = Map<String, Value>> {
    let device = |app: &str, platform: &str, token: &str| {
        with(
            call_data(),
            json!({"app-id": app, "platform": platform, "token": token, "device-id": "dev-1"}),
        )
    };
    bodies(vec![
        device("com.example.sylk", "apple", APNS_TOKEN),
        device("com.example.sylk", "firebase", FCM_TOKEN),
        device("org.linphone.phone", "ios", APNS_TOKEN),
        device("org.linphone.phone", "android", FCM_TOKEN),
    ])
}

/// v2 registration bodies.
pub fn registration_body() -> impl Strategy<Value = Map<String, Value>> {
    let device = |platform: &str, token: &str| {
        json!({"app-id": "com.example.sylk", "platform": platform, "token": token,
               "device-id": "<urn:uuid:dev9>", "silent": "0", "user-agent": "Sylk/3.5"})
    };
    bodies(vec![
        device("apple", APNS_TOKEN),
        device("apple", &format!("{APNS_TOKEN}-{APNS_TOKEN}")),
        device("firebase", FCM_TOKEN),
    ])
}

/// RFC 8599 bodies: the parameters as keys or in a contact, with percent escapes good and bad.
pub fn rfc8599_body() -> impl Strategy<Value = Map<String, Value>> {
    const CONTACT_PARTS: &[&str] = &[
        "<sip:bob@192.0.2.1",
        ";pn-provider=apns",
        ";pn-provider=fcm",
        ";pn-param=TEAM.com.example.sylk.voip",
        ";pn-param=ABCD1234.org.linphone.phone.remote%26voip",
        ";pn-param=linphone-1234",
        ";pn-prid=",
        APNS_TOKEN,
        FCM_TOKEN,
        ":remote",
        "&",
        ":voip",
        "%00",
        "%0A",
        "%C2%85",
        "%zz",
        "%",
        ">",
        "?X-Header=1",
        ";pn-type=apple",
        ";pn-tok=",
    ];
    let apns = with(
        call_data(),
        json!({"pn-provider": "apns", "pn-param": "TEAM.com.example.sylk.voip",
               "pn-prid": APNS_TOKEN}),
    );
    let pair = with(
        call_data(),
        json!({"pn-provider": "apns.dev", "pn-param": "ABCD1234.org.linphone.phone.remote&voip",
               "pn-prid": format!("{APNS_TOKEN}:remote&{APNS_TOKEN}:voip")}),
    );
    let fcm = with(
        call_data(),
        json!({"pn-provider": "fcm", "pn-param": "linphone-1234", "pn-prid": FCM_TOKEN}),
    );
    let legacy = with(
        call_data(),
        json!({"pn-type": "apple", "app-id": "org.linphone.phone.voip.prod", "pn-tok": APNS_TOKEN}),
    );
    let contact = prop::collection::vec(prop::sample::select(CONTACT_PARTS), 0..10)
        .prop_map(|parts| with(call_data(), json!({"contact": parts.concat()})));
    prop_oneof![
        3 => bodies(vec![apns, pair, fcm, legacy]),
        1 => contact.prop_flat_map(mutated),
    ]
}

/// A text as it may be stored or forwarded, checked without `crate::limits`' own code.
pub fn assert_clean(limit: &limits::Limit, value: &str) {
    assert!(
        value.chars().count() <= limit.max_chars,
        "{} longer than {}: {value:?}",
        limit.field,
        limit.max_chars
    );
    let allowed = |c: char| {
        let code = u32::from(c);
        let control = code <= 0x1F || (0x7F..=0x9F).contains(&code);
        !control || (limit.multiline && matches!(c, '\t' | '\n' | '\r'))
    };
    assert!(
        value.chars().all(allowed),
        "{} holds a control character: {value:?}",
        limit.field
    );
}

/// A device token of its platform's shape, checked without `crate::limits`' own code.
pub fn assert_token(platform: Platform, token: &str) {
    let shaped = match platform {
        Platform::Apple => {
            (64..=200).contains(&token.len())
                && token.len().is_multiple_of(2)
                && token.chars().all(|c| c.is_ascii_hexdigit())
        }
        Platform::Firebase => {
            (1..=4096).contains(&token.len())
                && token
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || "_:.-".contains(c))
        }
        Platform::UnifiedPush => token.len() <= 1000 && token.starts_with("https://"),
    };
    assert!(shaped, "not a {platform} token: {token:?}");
}

/// Every text of an accepted push is within its limits.
pub fn assert_push_clean(platform: Platform, push: &PushData) {
    assert_token(platform, &push.token);
    let optional = [
        (&limits::DEVICE_ID, &push.device_id),
        (&limits::FROM_DISPLAY_NAME, &push.from_display_name),
        (&limits::MEDIA_TYPE, &push.media_type),
        (&limits::REASON, &push.reason),
        (&limits::FILENAME, &push.filename),
        (&limits::FILETYPE, &push.filetype),
        (&limits::ACCOUNT, &push.account),
        (&limits::CONTENT, &push.content),
        (&limits::CONTENT_TYPE, &push.content_type),
    ];
    for (limit, value) in optional {
        if let Some(value) = value {
            assert_clean(limit, value);
        }
    }
    assert_clean(&limits::CALL_ID, &push.call_id);
    assert_clean(&limits::FROM, &push.from);
    assert_clean(&limits::TO, &push.to);
}

/// A refusal is the caller's 4xx, with a body that says so.
pub fn assert_refused(error: &ApiError) {
    let status = error.status();
    assert!(status.is_client_error(), "{status} for {error:?}");
    let body = error.body();
    if let Some(code) = body.get("code") {
        assert_eq!(code, &json!(status.as_u16()), "{body}");
    }
    assert!(!error.label().is_empty());
}
