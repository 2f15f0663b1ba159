//! `tokens list` and `audit`: what pushfleet knows about an account's devices and a call's
//! pushes, read from the API.

use std::io::Write;

use serde_json::Value;

use crate::args::{Args, Error};
use crate::sylk::{api_url, base_url};
use crate::{FAILED, OK};

/// GETs `url`, with `--api-key` as the bearer key when given.
async fn get(args: &Args, url: reqwest::Url) -> Result<(u16, Value), Error> {
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

fn text(value: &Value) -> String {
    match value {
        Value::Null => "-".into(),
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// An answer that is not a 200: its description, and exit code 1.
fn refused(out: &mut dyn Write, status: u16, body: &Value) -> i32 {
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

/// `pushfleet audit --callid C [--json]`: exit 1 when nothing was recorded for the call.
pub async fn audit(args: &Args, out: &mut dyn Write) -> Result<i32, Error> {
    args.only(&["url", "callid", "call_id", "api_key"])?;
    let call_id = args
        .get("callid")
        .or_else(|| args.get("call_id"))
        .ok_or_else(|| Error::Usage("the following arguments are required: --callid".into()))?;
    let mut url = api_url(base_url(args), &["audit"])?;
    url.query_pairs_mut().append_pair("call_id", call_id);
    let (status, body) = get(args, url).await?;
    if status != 200 {
        return Ok(refused(out, status, &body));
    }
    let deliveries = body["deliveries"].as_array().cloned().unwrap_or_default();
    if args.flag("json") {
        let _ = writeln!(out, "{body}");
    } else {
        let _ = writeln!(
            out,
            "received_at\tjob_id\tevent\tplatform\tapp-id\taccount\tdevice-id\tstatus\tprovider\tattempts"
        );
        for d in &deliveries {
            let _ = writeln!(
                out,
                "{}\t{}\t{}\t{}\t{}\t{}\t{}\t{}\t{} {}\t{}",
                text(&d["received_at"]),
                text(&d["job_id"]),
                text(&d["event"]),
                text(&d["platform"]),
                text(&d["app_id"]),
                text(&d["account"]),
                text(&d["device_id"]),
                text(&d["status"]),
                text(&d["provider_status"]),
                text(&d["provider_reason"]),
                text(&d["attempts"]),
            );
        }
    }
    if deliveries.is_empty() {
        let _ = writeln!(out, "no pushes recorded for call-id {call_id}");
        return Ok(FAILED);
    }
    Ok(OK)
}
