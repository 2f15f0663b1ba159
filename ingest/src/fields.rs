//! Reading the fields of a JSON request the way the reference (Python, pydantic v1) reads them:
//! dashed names with their underscore spelling, Python truthiness, and pydantic's coercions and
//! messages. Sylk clients and SIP proxies rely on what the reference accepted.

use serde_json::{Map, Value};

use crate::error::ApiError;

/// Looks a field up under its dashed name (the reference's only accepted spelling) or the
/// underscore spelling its README uses (`from_display_name`).
pub fn field<'v>(body: &'v Map<String, Value>, dashed: &str) -> Option<&'v Value> {
    body.get(dashed).or_else(|| {
        // Only a dashed name has another spelling to try (most absent fields are looked up).
        if dashed.contains('-') {
            body.get(&dashed.replace('-', "_"))
        } else {
            None
        }
    })
}

/// Present and not null: the reference tests `values.get(k) is None`.
pub fn given<'v>(body: &'v Map<String, Value>, dashed: &str) -> Option<&'v Value> {
    field(body, dashed).filter(|v| !v.is_null())
}

/// Python truthiness, as the reference's `if not values.get(...)` checks.
pub fn truthy(value: Option<&Value>) -> bool {
    match value {
        None | Some(Value::Null) => false,
        Some(Value::Bool(b)) => *b,
        Some(Value::Number(n)) => n.as_f64() != Some(0.0),
        Some(Value::String(s)) => !s.is_empty(),
        Some(Value::Array(a)) => !a.is_empty(),
        Some(Value::Object(o)) => !o.is_empty(),
    }
}

/// How a value prints in the reference's messages (Python's `str()` of it).
pub fn python_str(value: &Value) -> String {
    match value {
        Value::String(s) => s.clone(),
        Value::Bool(true) => "True".into(),
        Value::Bool(false) => "False".into(),
        Value::Null => "None".into(),
        other => other.to_string(),
    }
}

const NONE_NOT_ALLOWED: &str = "none is not an allowed value";

/// pydantic v1's `str`: strings, and numbers coerced to their text.
fn coerce_str(value: &Value) -> Result<String, &'static str> {
    match value {
        Value::String(s) => Ok(s.clone()),
        Value::Number(_) | Value::Bool(_) => Ok(python_str(value)),
        Value::Null => Err(NONE_NOT_ALLOWED),
        _ => Err("str type expected"),
    }
}

pub fn required_str(body: &Map<String, Value>, name: &'static str) -> Result<String, ApiError> {
    match field(body, name) {
        None => Err(ApiError::MissingField(name)),
        Some(v) => coerce_str(v).map_err(|problem| invalid(name, problem)),
    }
}

pub fn optional_str(
    body: &Map<String, Value>,
    name: &'static str,
) -> Result<Option<String>, ApiError> {
    match field(body, name) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => coerce_str(v)
            .map(Some)
            .map_err(|problem| invalid(name, problem)),
    }
}

/// A required text that must not be empty either.
pub fn non_empty_str(body: &Map<String, Value>, name: &'static str) -> Result<String, ApiError> {
    let value = required_str(body, name)?;
    if value.is_empty() {
        return Err(ApiError::EmptyField(name));
    }
    Ok(value)
}

/// A pydantic `bool` field, `default` when absent.
pub fn bool_or(
    body: &Map<String, Value>,
    name: &'static str,
    default: bool,
) -> Result<bool, ApiError> {
    field(body, name).map_or(Ok(default), |v| {
        parse_bool(v).map_err(|problem| invalid(name, problem))
    })
}

/// A pydantic `int` field, `default` when absent.
pub fn int_or(
    body: &Map<String, Value>,
    name: &'static str,
    default: i64,
) -> Result<i64, ApiError> {
    field(body, name).map_or(Ok(default), |v| {
        parse_int(v).map_err(|problem| invalid(name, problem))
    })
}

fn invalid(field: &'static str, problem: &'static str) -> ApiError {
    ApiError::InvalidField { field, problem }
}

/// pydantic v1's `bool`.
fn parse_bool(value: &Value) -> Result<bool, &'static str> {
    const INVALID: &str = "value could not be parsed to a boolean";
    match value {
        Value::Bool(b) => Ok(*b),
        Value::Number(n) => match n.as_f64() {
            Some(1.0) => Ok(true),
            Some(0.0) => Ok(false),
            _ => Err(INVALID),
        },
        Value::String(s) => match s.to_ascii_lowercase().as_str() {
            "1" | "on" | "t" | "true" | "y" | "yes" => Ok(true),
            "0" | "off" | "f" | "false" | "n" | "no" => Ok(false),
            _ => Err(INVALID),
        },
        Value::Null => Err(NONE_NOT_ALLOWED),
        _ => Err(INVALID),
    }
}

/// pydantic v1's `int`: integers, integral text, and floats truncated.
fn parse_int(value: &Value) -> Result<i64, &'static str> {
    const INVALID: &str = "value is not a valid integer";
    match value {
        Value::Number(n) => n
            .as_i64()
            .or_else(|| {
                n.as_f64()
                    .filter(|f| f.is_finite())
                    .map(|f| f.trunc() as i64)
            })
            .ok_or(INVALID),
        Value::Bool(b) => Ok(i64::from(*b)),
        Value::String(s) => s.trim().parse().map_err(|_| INVALID),
        Value::Null => Err(NONE_NOT_ALLOWED),
        _ => Err(INVALID),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn body(value: Value) -> Map<String, Value> {
        value.as_object().expect("an object").clone()
    }

    #[test]
    fn both_spellings_are_read() {
        let b = body(json!({"from_display_name": "Alice", "device-id": "d"}));
        assert_eq!(field(&b, "from-display-name"), Some(&json!("Alice")));
        assert_eq!(field(&b, "device-id"), Some(&json!("d")));
        assert_eq!(field(&b, "token"), None);
    }

    #[test]
    fn coercions_follow_pydantic() {
        let b = body(json!({"n": 12, "t": true, "list": [1], "null": null, "f": 2.9, "s": " 3 "}));
        assert_eq!(required_str(&b, "n").unwrap(), "12");
        assert_eq!(required_str(&b, "t").unwrap(), "True");
        assert!(matches!(
            required_str(&b, "list"),
            Err(ApiError::InvalidField {
                field: "list",
                problem: "str type expected"
            })
        ));
        assert!(matches!(
            required_str(&b, "x"),
            Err(ApiError::MissingField("x"))
        ));
        assert_eq!(optional_str(&b, "null").unwrap(), None);
        assert_eq!(int_or(&b, "f", 1).unwrap(), 2);
        assert_eq!(int_or(&b, "s", 1).unwrap(), 3);
        assert_eq!(int_or(&b, "absent", 1).unwrap(), 1);
        assert!(bool_or(&b, "t", false).unwrap());
        assert!(matches!(
            bool_or(&b, "null", true),
            Err(ApiError::InvalidField {
                field: "null",
                problem: NONE_NOT_ALLOWED
            })
        ));
        assert!(matches!(
            non_empty_str(&body(json!({"token": ""})), "token"),
            Err(ApiError::EmptyField("token"))
        ));
    }

    #[test]
    fn python_truthiness() {
        assert!(!truthy(Some(&json!(0))));
        assert!(!truthy(Some(&json!(""))));
        assert!(!truthy(None));
        assert!(truthy(Some(&json!("x"))));
        assert_eq!(python_str(&json!(false)), "False");
    }
}
