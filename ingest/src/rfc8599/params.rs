//! The RFC 8599 push parameters of a request: from its own keys, or from the `contact` URI (or
//! bare `;k=v` list) a SIP registrar stored for the device.

use std::collections::HashMap;

use serde_json::{Map, Value};

use crate::call_options::CallOptions;
use crate::error::ApiError;
use crate::fields::field;
use crate::limits::{self, Limit};

/// Parameter name (lower case) → value.
pub type Params = HashMap<String, String>;

/// The keys a request may give directly; they win over the contact's. Their values are checked
/// against their limits as they will be used: decoded.
const KEYS: [Limit; 5] = [
    limits::PN_PROVIDER,
    limits::PN_PARAM,
    limits::PN_PRID,
    limits::PN_TYPE,
    limits::PN_TOK,
];

pub fn parameters(body: &Map<String, Value>) -> Result<Params, ApiError> {
    let mut params = Params::new();
    if let Some(contact) = field(body, "contact") {
        let contact = contact.as_str().ok_or(ApiError::InvalidField {
            field: "contact",
            problem: "str type expected",
        })?;
        read_contact(contact, &mut params);
    }
    for limit in &KEYS {
        let key = limit.field;
        if let Some(value) = field(body, key).filter(|v| !v.is_null()) {
            let value = value.as_str().ok_or(ApiError::InvalidField {
                field: key,
                problem: "str type expected",
            })?;
            params.insert(key.to_string(), value.trim().to_string());
        }
    }
    // The per-contact options may be given as keys too (numbers as numbers); checked where
    // they are read (`crate::call_options`).
    for key in CallOptions::PARAMS {
        match field(body, key) {
            None | Some(Value::Null) => {}
            Some(Value::String(text)) => {
                params.insert(key.to_string(), text.trim().to_string());
            }
            Some(Value::Number(number)) => {
                params.insert(key.to_string(), number.to_string());
            }
            Some(_) => {
                return Err(ApiError::InvalidField {
                    field: key,
                    problem: "str type expected",
                })
            }
        }
    }
    for limit in &KEYS {
        if let Some(value) = params.get(limit.field) {
            limits::check(limit, value)?;
        }
    }
    Ok(params)
}

/// The URI parameters of a contact. They end where the URI's headers begin; `<…>` around the
/// URI is allowed.
fn read_contact(contact: &str, params: &mut Params) {
    let uri = contact.trim().trim_start_matches('<');
    let uri = uri.split(['>', '?']).next().unwrap_or_default();
    for param in uri.split(';').skip(usize::from(!uri.starts_with("pn-"))) {
        if let Some((key, value)) = param.split_once('=') {
            params.insert(
                key.trim().to_ascii_lowercase(),
                percent_decode(value.trim()),
            );
        }
    }
}

/// `%XX` escapes, as SIP URIs may carry them; anything malformed is kept as written.
fn percent_decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = bytes
            .get(i + 1..i + 3)
            .and_then(|h| std::str::from_utf8(h).ok())
            .and_then(|h| u8::from_str_radix(h, 16).ok());
        match (bytes[i], hex) {
            (b'%', Some(byte)) => {
                out.push(byte);
                i += 3;
            }
            (byte, _) => {
                out.push(byte);
                i += 1;
            }
        }
    }
    String::from_utf8(out).unwrap_or_else(|_| text.to_string())
}

/// A parameter that must be there and not empty.
pub fn required<'p>(params: &'p Params, key: &'static str) -> Result<&'p str, ApiError> {
    params
        .get(key)
        .map(String::as_str)
        .filter(|v| !v.is_empty())
        .ok_or(ApiError::MissingField(key))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escapes_are_decoded_and_malformed_ones_kept() {
        assert_eq!(percent_decode("remote%26voip"), "remote&voip");
        assert_eq!(percent_decode("100%"), "100%");
        assert_eq!(percent_decode("%zz"), "%zz");
    }

    #[test]
    fn contact_parameters_stop_at_the_headers() {
        let mut params = Params::new();
        read_contact(
            "<sip:bob@host;PN-Provider=fcm;pn-prid=t?X-Header=1>",
            &mut params,
        );
        assert_eq!(params.get("pn-provider").map(String::as_str), Some("fcm"));
        assert_eq!(params.get("pn-prid").map(String::as_str), Some("t"));
        assert!(!params.contains_key("x-header"));
    }

    #[test]
    fn decoded_parameters_are_checked() {
        let body = |contact: &str| {
            serde_json::json!({ "contact": contact })
                .as_object()
                .unwrap()
                .clone()
        };
        let error = parameters(&body("<sip:bob@host;pn-provider=fcm;pn-prid=ab%00cd>"))
            .unwrap_err()
            .to_string();
        assert_eq!(error, "must not contain control characters: pn-prid");
        let long = format!("sip:bob@host;pn-param={}", "x".repeat(257));
        assert_eq!(
            parameters(&body(&long)).unwrap_err().to_string(),
            "ensure this value has at most 256 characters: pn-param"
        );
        // Parameters pushfleet does not use are not its business.
        assert!(parameters(&body("sip:bob@host;pn-provider=fcm;x-note=a%01b")).is_ok());
    }
}
