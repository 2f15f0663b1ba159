//! The audit rows as CSV (RFC 4180): a header line, then one line per row. A field holding a
//! comma, a quote or a line break is quoted, its quotes doubled; NULL is an empty field; the
//! attempts of a row, when asked for, are one field of JSON.

use serde_json::Value;

use super::query::COLUMNS;

/// The header line of rows with (or without) their attempts.
pub fn header(with_attempts: bool) -> String {
    let mut line = COLUMNS.join(",");
    if with_attempts {
        line.push_str(",attempts");
    }
    line.push_str("\r\n");
    line
}

/// The lines of `rows`, without the header.
pub fn lines(rows: &[Value], with_attempts: bool) -> String {
    let attempts = with_attempts.then_some("attempts");
    rows.iter()
        .map(|row| line(COLUMNS.iter().copied().chain(attempts).map(|c| &row[c])))
        .collect()
}

/// One line of fields.
pub fn line<'a>(fields: impl IntoIterator<Item = &'a Value>) -> String {
    let mut out = String::new();
    for (index, value) in fields.into_iter().enumerate() {
        if index > 0 {
            out.push(',');
        }
        push_field(&mut out, &field_text(value));
    }
    out.push_str("\r\n");
    out
}

fn field_text(value: &Value) -> String {
    match value {
        Value::Null => String::new(),
        Value::String(text) => text.clone(),
        other => other.to_string(),
    }
}

fn push_field(out: &mut String, text: &str) {
    if text.contains([',', '"', '\n', '\r']) {
        out.push('"');
        out.push_str(&text.replace('"', "\"\""));
        out.push('"');
    } else {
        out.push_str(text);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn fields_are_quoted_only_when_they_must_be() {
        let row = json!({"job_id": "j", "call_id": "a,\"b\"\nc", "attempt_count": 2,
                         "account": null, "attempts": [{"attempt": 1}]});
        let text = lines(&[row], true);
        assert!(text.starts_with("j,,,,,,,\"a,\"\"b\"\"\nc\",,"), "{text}");
        assert!(text.ends_with(",\"[{\"\"attempt\"\":1}]\"\r\n"), "{text}");
        assert!(header(false).starts_with("job_id,received_at,"));
    }
}
