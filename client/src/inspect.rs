//! `tokens list`: what pushfleet knows about an account's devices, read from the API; and the
//! API helpers `audit` shares.

use std::io::Write;

use serde_json::Value;

use crate::args::{Args, Error};
use crate::sylk::{api_url, base_url};
use crate::{FAILED, OK};

/// GETs `url`, with `--api-key` as the bearer key when given.
pub(crate) async fn get(args: &Args, url: reqwest::Url) -> Result<(u16, Value), Error> {
    let shown = url.to_string();
    let mut request = reqwest::Client::new()
        .get(url)
        .timeout(std::time::Duration::from_secs(10));
    if let Some(key) = args.get("api_key") {
        request = request.bearer_auth(key);
    }
    let response = request
        .send()
        .await
        .map_err(|e| Error::Failed(format!("{shown}: connection error: {e}")))?;
    let status = response.status().as_u16();
    let body = response
        .json()
        .await
        .map_err(|e| Error::Failed(format!("{shown}: answer {status} is not JSON: {e}")))?;
    Ok((status, body))
}

pub(crate) fn text(value: &Value) -> String {
    match value {
        Value::Null => "-".into(),
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// An answer that is not a 200: its description, and exit code 1.
pub(crate) fn refused(out: &mut dyn Write, status: u16, body: &Value) -> i32 {
    let description = body
        .get("description")
        .or_else(|| body.get("detail"))
        .map(text)
        .unwrap_or_else(|| body.to_string());
    let _ = writeln!(out, "{status}: {description}");
    FAILED
}

/// `pushfleet --account ACC tokens list [--json]`.
pub async fn tokens(args: &Args, out: &mut dyn Write) -> Result<i32, Error> {
    if args.positional.get(1).map(String::as_str) != Some("list") {
        return Err(Error::Usage("usage: tokens list".into()));
    }
    args.only(&["url", "account", "api_key"])?;
    let [account] = args.required(["account"])?;
    let (status, body) = get(args, api_url(base_url(args), &["v2", "tokens", account])?).await?;
    if status != 200 {
        return Ok(refused(out, status, &body));
    }
    if args.flag("json") {
        let _ = writeln!(out, "{body}");
        return Ok(OK);
    }
    let _ = writeln!(
        out,
        "device-id\tapp-id\tplatform\ttoken\tsilent\tupdated\tstate"
    );
    for device in body["devices"].as_array().into_iter().flatten() {
        let state = match &device["invalidated_at"] {
            Value::Null => "alive".to_string(),
            at => format!(
                "invalid since {} ({})",
                text(at),
                text(&device["invalid_reason"])
            ),
        };
        let _ = writeln!(
            out,
            "{}\t{}\t{}\t{}\t{}\t{}\t{state}",
            text(&device["device-id"]),
            text(&device["app-id"]),
            text(&device["platform"]),
            text(&device["token_fingerprint"]),
            text(&device["silent"]),
            text(&device["updated_at"]),
        );
    }
    Ok(OK)
}
