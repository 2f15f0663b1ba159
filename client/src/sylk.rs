//! The drop-ins for `sylk-pushclient` (v1) and `sylk-pushclient-v2`: the same options, request
//! bodies, output lines and exit codes, so that OpenSIPS scripts keep working.

use std::io::Write;
use std::time::Duration;

use reqwest::{Method, Url};
use serde_json::{json, Value};

use crate::args::{Args, Error};
use crate::{FAILED, OK};

/// The reference clients' request timeout.
const TIMEOUT: Duration = Duration::from_secs(5);

/// `audio`/`video` as the SDP-derived media lists OpenSIPS passes ("audio, video") reduce.
fn media_type(media: &str) -> &str {
    if media.contains("video") {
        "video"
    } else if media.contains("audio") {
        "audio"
    } else {
        media
    }
}

/// One leading and one trailing `"` go, as the v1 client does with `--from`.
fn unquote_once(text: &str) -> &str {
    let text = text.strip_prefix('"').unwrap_or(text);
    text.strip_suffix('"').unwrap_or(text)
}

/// The v1 client's token handling: a token with exactly one `-` is a voip-background pair;
/// `cancel` uses the second part, everything else the first (whatever the platform).
fn pick_token<'a>(token: &'a str, event: &str) -> &'a str {
    match token.split_once('-') {
        Some((_, background)) if !background.contains('-') && event == "cancel" => background,
        Some((voip, background)) if !background.contains('-') => voip,
        _ => token,
    }
}

fn http() -> Result<reqwest::Client, Error> {
    reqwest::Client::builder()
        .timeout(TIMEOUT)
        .build()
        .map_err(|e| Error::Failed(format!("HTTP client: {e}")))
}

/// Sends one JSON request; `None` when no usable answer came (connection refused, timeout).
async fn send(method: Method, url: &str, body: &Value) -> Option<(u16, String)> {
    let client = http().ok()?;
    let response = client.request(method, url).json(body).send().await.ok()?;
    let status = response.status().as_u16();
    let text = response.text().await.ok()?;
    Some((status, text))
}

/// `sylk-pushclient`: one v1 push; exit 0 only on a 200 with a JSON body.
pub async fn v1(args: &Args, out: &mut dyn Write) -> Result<i32, Error> {
    args.only(&[
        "url",
        "platform",
        "appid",
        "token",
        "deviceid",
        "callid",
        "event",
        "from",
        "from_name",
        "to",
        "silent",
        "mediatype",
    ])?;
    let [url, platform, appid, token, deviceid, callid, from, to] = args.required([
        "url", "platform", "appid", "token", "deviceid", "callid", "from", "to",
    ])?;
    let event = args.or("event", "incoming_session");
    let from = unquote_once(from);
    let from_name = args
        .get("from_name")
        .map(|n| n.trim_matches('"'))
        .filter(|n| !n.is_empty())
        .unwrap_or(from);
    let body = json!({
        "platform": platform,
        "app-id": appid,
        "token": pick_token(token, event),
        "media-type": media_type(args.or("mediatype", "audio")),
        "event": event,
        "from": from,
        "from-display-name": from_name,
        "to": to,
        "device-id": deviceid,
        "call-id": callid,
        "silent": args.or("silent", "1"),
    });
    let answer = send(Method::POST, url, &body).await;
    let prefix = format!("{event} push for {callid} to {url}");
    let code = match answer {
        Some((200, text)) if serde_json::from_str::<Value>(&text).is_ok() => {
            let _ = writeln!(out, "{prefix} response 200 OK: {text}");
            OK
        }
        Some((200, _)) | None => {
            let _ = writeln!(out, "{prefix} failed: connection error");
            FAILED
        }
        Some((status, text)) => {
            let _ = writeln!(out, "{prefix} failed: {status}: {text}");
            FAILED
        }
    };
    Ok(code)
}

/// `<base>/v2/tokens/<account>[/<more>…]`, each segment escaped.
pub fn api_url(base: &str, segments: &[&str]) -> Result<Url, Error> {
    let mut url = Url::parse(base)
        .map_err(|e| Error::Usage(format!("argument --url: invalid URL {base:?}: {e}")))?;
    url.path_segments_mut()
        .map_err(|_| Error::Usage(format!("argument --url: {base:?} cannot be a base")))?
        .pop_if_empty()
        .extend(segments);
    Ok(url)
}

/// The API base: `--url` (default `http://localhost:8400`) less one trailing `/`.
pub fn base_url(args: &Args) -> &str {
    let url = args.or("url", "http://localhost:8400");
    url.strip_suffix('/').unwrap_or(url)
}

/// `sylk-pushclient-v2 [--url BASE] --account ACC {add,remove,push} …`.
pub async fn v2(args: &Args, out: &mut dyn Write) -> Result<i32, Error> {
    let [account] = args.required(["account"])?;
    let base = base_url(args);
    let endpoint = format!("{base}/v2/tokens/{account}");
    let command = args
        .positional
        .first()
        .map(String::as_str)
        .ok_or_else(|| Error::Usage("a command is required: push, add or remove".into()))?;
    let (action, method, url, shown, body) = match command {
        "add" => {
            args.only(&[
                "url",
                "account",
                "platform",
                "appid",
                "token",
                "deviceid",
                "silent",
                "user_agent",
            ])?;
            let [appid, token, deviceid] = args.required(["appid", "token", "deviceid"])?;
            let body = json!({
                "platform": args.get("platform"),
                "app-id": appid,
                "token": token,
                "device-id": deviceid,
                "silent": args.or("silent", "1"),
                "user-agent": args.or("user_agent", "None"),
            });
            let url = api_url(base, &["v2", "tokens", account])?;
            ("Add", Method::POST, url, endpoint, body)
        }
        "remove" => {
            args.only(&["url", "account", "appid", "deviceid"])?;
            let [appid] = args.required(["appid"])?;
            let body = json!({"app-id": appid, "device-id": args.get("deviceid")});
            let url = api_url(base, &["v2", "tokens", account])?;
            ("Remove", Method::DELETE, url, endpoint, body)
        }
        "push" => {
            args.only(&[
                "url",
                "account",
                "callid",
                "from",
                "to",
                "event",
                "from_name",
                "mediatype",
                "reason",
                "badge",
                "deviceid",
                "filename",
                "filetype",
            ])?;
            let [callid, from, to] = args.required(["callid", "from", "to"])?;
            let body = json!({
                "media-type": media_type(args.or("mediatype", "audio")),
                "event": args.or("event", "incoming_session"),
                "from": from,
                "from-display-name": args.get("from_name").unwrap_or(from),
                "to": to,
                "call-id": callid,
                // An int by default, the given text otherwise, as the reference sends it.
                "badge": args.get("badge").map_or(json!(1), |b| json!(b)),
                "reason": args.get("reason"),
                "filename": args.get("filename"),
                "filetype": args.get("filetype"),
            });
            let (url, shown) = match args.get("deviceid") {
                Some(device) => (
                    api_url(base, &["v2", "tokens", account, "push", device])?,
                    format!("{endpoint}/push/{device}"),
                ),
                None => (
                    api_url(base, &["v2", "tokens", account, "push"])?,
                    format!("{endpoint}/push"),
                ),
            };
            ("Push", Method::POST, url, shown, body)
        }
        other => {
            return Err(Error::Usage(format!(
                "argument command: invalid choice: {other:?} (choose from 'push', 'add', 'remove')"
            )))
        }
    };
    let code = match send(method, url.as_str(), &body).await {
        None => {
            let _ = writeln!(out, "{action} request to {shown} failed: connection error");
            FAILED
        }
        Some((status, text)) => {
            let _ = writeln!(out, "{action} request to {shown} - {status}: {text}");
            if (200..300).contains(&status) || status == 410 {
                OK
            } else {
                let _ = writeln!(out, "{action} request to {shown} failed: {status}: {text}");
                FAILED
            }
        }
    };
    Ok(code)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reference_processing() {
        assert_eq!(pick_token("voip-bg", "cancel"), "bg");
        assert_eq!(pick_token("voip-bg", "incoming_session"), "voip");
        assert_eq!(pick_token("ok-1", "cancel"), "1");
        assert_eq!(pick_token("a-b-c", "cancel"), "a-b-c");
        assert_eq!(media_type("audio, video"), "video");
        assert_eq!(media_type("chat"), "chat");
        assert_eq!(unquote_once("\"\"alice\"\""), "\"alice\"");
        assert_eq!(
            api_url("http://h:8400", &["v2", "tokens", "a b/c", "push"])
                .unwrap()
                .as_str(),
            "http://h:8400/v2/tokens/a%20b%2Fc/push"
        );
    }
}
