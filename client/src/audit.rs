//! `pushfleet audit`: the audit trail by any filter, page by page or whole (`--all`), as a
//! table, JSON or CSV; `audit summary`; and `audit erase`, which deletes a person's data.
//!
//! With `--config FILE` (or `--database-url URL`) the command reads the database itself, with
//! the same queries ingest runs; otherwise it asks the API at `--url` with `--api-key`.

use std::io::Write;

use deadpool_postgres::Object;
use pushfleet_core::audit::csv;
use pushfleet_core::audit::erase::{self, Person};
use pushfleet_core::audit::query::{self, Page, PageRequest, SummaryRequest};
use serde_json::{json, Value};

use crate::args::{Args, Error};
use crate::inspect::{get, refused, text};
use crate::keys::connect;
use crate::sylk::{api_url, base_url};
use crate::{FAILED, OK};

/// Command-line options that are filters, with the query parameter each becomes.
const FILTERS: &[(&str, &str)] = &[
    ("app", "app"),
    ("appid", "app"),
    ("app_id", "app"),
    ("platform", "platform"),
    ("account", "account"),
    ("device_id", "device_id"),
    ("deviceid", "device_id"),
    ("token", "token"),
    ("token_fingerprint", "token_fingerprint"),
    ("callid", "call_id"),
    ("call_id", "call_id"),
    ("event", "event"),
    ("status", "status"),
    ("since", "since"),
    ("until", "until"),
];

/// Where the rows come from.
enum Source<'a> {
    Database(Box<Object>),
    Api(&'a Args),
}

impl Source<'_> {
    async fn open(args: &Args) -> Result<Source<'_>, Error> {
        if args.get("config").is_some() || args.get("database_url").is_some() {
            let (postgres, _) = crate::import::database(args)?;
            Ok(Source::Database(Box::new(connect(&postgres).await?)))
        } else {
            Ok(Source::Api(args))
        }
    }

    /// One page, or the API's refusal (status and body).
    async fn page(&self, params: &[(String, String)]) -> Result<Result<Page, (u16, Value)>, Error> {
        match self {
            Source::Database(client) => {
                let request = PageRequest::from_params(params)
                    .map_err(|e| Error::Usage(format!("argument --{}", e_text(&e))))?;
                let page = query::page(&****client, &request, None)
                    .await
                    .map_err(|e| Error::Failed(e.to_string()))?;
                Ok(Ok(page))
            }
            Source::Api(args) => {
                let (status, body) = get(args, api_query(args, &["audit"], params)?).await?;
                if status != 200 {
                    return Ok(Err((status, body)));
                }
                let rows = body["rows"].as_array().cloned().unwrap_or_default();
                let next = body["next"].as_str().map(str::to_string);
                Ok(Ok(Page { rows, next }))
            }
        }
    }

    async fn summary(
        &self,
        params: &[(String, String)],
    ) -> Result<Result<Value, (u16, Value)>, Error> {
        match self {
            Source::Database(client) => {
                let request = SummaryRequest::from_params(params)
                    .map_err(|e| Error::Usage(format!("argument --{}", e_text(&e))))?;
                query::summary(&****client, &request, None)
                    .await
                    .map(Ok)
                    .map_err(|e| Error::Failed(e.to_string()))
            }
            Source::Api(args) => {
                let url = api_query(args, &["audit", "summary"], params)?;
                let (status, body) = get(args, url).await?;
                Ok(if status == 200 {
                    Ok(body)
                } else {
                    Err((status, body))
                })
            }
        }
    }
}

/// A filter error as a usage message: the option, then the problem.
fn e_text(error: &query::FilterError) -> String {
    match error {
        query::FilterError::Invalid { field, problem } => format!("{field}: {problem}"),
        other => other.to_string(),
    }
}

fn api_query(
    args: &Args,
    path: &[&str],
    params: &[(String, String)],
) -> Result<reqwest::Url, Error> {
    let mut url = api_url(base_url(args), path)?;
    url.query_pairs_mut()
        .extend_pairs(params.iter().map(|(k, v)| (k.as_str(), v.as_str())));
    Ok(url)
}

/// The filters given on the command line, as query parameters.
fn filters(args: &Args) -> Vec<(String, String)> {
    let mut params = Vec::new();
    for (option, parameter) in FILTERS {
        for value in args.all(option) {
            params.push((parameter.to_string(), value.to_string()));
        }
    }
    params
}

const CONNECTION: &[&str] = &["url", "api_key", "config", "database_url"];

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Format {
    Table,
    Json,
    Csv,
}

fn format(args: &Args) -> Result<Format, Error> {
    match args.get("format") {
        None if args.flag("json") => Ok(Format::Json),
        None | Some("table") => Ok(Format::Table),
        Some("json") => Ok(Format::Json),
        Some("csv") => Ok(Format::Csv),
        Some(other) => Err(Error::Usage(format!(
            "argument --format: invalid choice: {other:?} (choose from table, json, csv)"
        ))),
    }
}

/// `pushfleet audit …`: the subcommand, or the rows.
pub async fn run(args: &Args, out: &mut dyn Write, err: &mut dyn Write) -> Result<i32, Error> {
    match args.positional.get(1).map(String::as_str) {
        None => rows(args, out, err).await,
        Some("summary") => summary(args, out).await,
        Some("erase") => erase(args, out).await,
        Some(other) => Err(Error::Usage(format!(
            "unknown audit command {other:?} (known: summary, erase)"
        ))),
    }
}

fn known_options(extra: &[&'static str]) -> Vec<&'static str> {
    let mut known: Vec<&str> = CONNECTION.to_vec();
    known.extend(FILTERS.iter().map(|(option, _)| *option));
    known.extend_from_slice(extra);
    known
}

async fn rows(args: &Args, out: &mut dyn Write, err: &mut dyn Write) -> Result<i32, Error> {
    args.only(&known_options(&["format", "limit", "after"]))?;
    let format = format(args)?;
    let mut params = filters(args);
    let call_id = args.get("callid").or_else(|| args.get("call_id"));
    if let Some(limit) = args.get("limit") {
        params.push(("limit".into(), limit.into()));
    }
    let with_attempts = args.flag("attempts");
    if with_attempts {
        params.push(("attempts".into(), "1".into()));
    }
    let source = Source::open(args).await?;
    let mut after = args.get("after").map(str::to_string);
    let mut all_rows = Vec::new();
    let mut pages = 0;
    let mut seen = 0usize;
    let last_next = loop {
        let mut page_params = params.clone();
        if let Some(cursor) = &after {
            page_params.push(("after".into(), cursor.clone()));
        }
        let page = match source.page(&page_params).await? {
            Ok(page) => page,
            Err((status, body)) => return Ok(refused(out, status, &body)),
        };
        pages += 1;
        seen += page.rows.len();
        if pages > 1 || (args.flag("all") && page.next.is_some()) {
            let _ = writeln!(err, "audit: page {pages}, {seen} rows so far");
        }
        match format {
            Format::Table => {
                if pages == 1 {
                    let _ = writeln!(out, "{}", TABLE_HEADER);
                }
                for row in &page.rows {
                    let _ = writeln!(out, "{}", table_line(row));
                }
            }
            Format::Csv => {
                if pages == 1 {
                    let _ = write!(out, "{}", csv::header(with_attempts));
                }
                let _ = write!(out, "{}", csv::lines(&page.rows, with_attempts));
            }
            Format::Json => all_rows.extend(page.rows),
        }
        if !args.flag("all") || page.next.is_none() {
            break page.next;
        }
        after = page.next;
    };
    if format == Format::Json {
        let _ = writeln!(out, "{}", json!({"rows": all_rows, "next": last_next}));
    }
    if let Some(next) = &last_next {
        let _ = writeln!(err, "audit: more rows: --after {next} (or --all)");
    }
    if seen == 0 {
        if let Some(call_id) = call_id {
            let _ = writeln!(out, "no pushes recorded for call-id {call_id}");
            return Ok(FAILED);
        }
    }
    Ok(OK)
}

const TABLE_HEADER: &str =
    "received_at\tjob_id\tevent\tplatform\tapp-id\taccount\tdevice-id\tstatus\tprovider\tattempts";

fn table_line(d: &Value) -> String {
    format!(
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
        text(&d["attempt_count"]),
    )
}

/// `pushfleet audit summary [filters] [--by app,status,event] [--format table|json]`.
async fn summary(args: &Args, out: &mut dyn Write) -> Result<i32, Error> {
    args.only(&known_options(&["format", "by"]))?;
    let format = format(args)?;
    let mut params = filters(args);
    if let Some(by) = args.get("by") {
        params.push(("by".into(), by.into()));
    }
    let source = Source::open(args).await?;
    let summary = match source.summary(&params).await? {
        Ok(summary) => summary,
        Err((status, body)) => return Ok(refused(out, status, &body)),
    };
    match format {
        Format::Json => {
            let _ = writeln!(out, "{summary}");
        }
        Format::Table | Format::Csv => {
            let by: Vec<String> = summary["by"]
                .as_array()
                .into_iter()
                .flatten()
                .map(text)
                .collect();
            let mut header = by.clone();
            header.extend(
                [
                    "count",
                    "expired_before_delivery",
                    "latency_median_ms",
                    "latency_p99_ms",
                ]
                .map(String::from),
            );
            let groups = summary["groups"].as_array().cloned().unwrap_or_default();
            if format == Format::Csv {
                let names: Vec<Value> = header.iter().map(|h| json!(h)).collect();
                let _ = write!(out, "{}", csv::line(&names));
                for group in &groups {
                    let _ = write!(out, "{}", csv::line(header.iter().map(|c| &group[c])));
                }
            } else {
                let _ = writeln!(out, "{}", header.join("\t"));
                for group in &groups {
                    let line: Vec<String> = header.iter().map(|c| text(&group[c])).collect();
                    let _ = writeln!(out, "{}", line.join("\t"));
                }
            }
        }
    }
    Ok(OK)
}

/// `pushfleet audit erase (--config F | --database-url URL) (--account A | --device-id D |
/// --token T) [--by WHO]`.
async fn erase(args: &Args, out: &mut dyn Write) -> Result<i32, Error> {
    args.only(&[
        "config",
        "database_url",
        "account",
        "device_id",
        "deviceid",
        "token",
        "by",
    ])?;
    let given: Vec<Person> = [
        args.get("account").map(|a| Person::Account(a.into())),
        args.get("device_id")
            .or_else(|| args.get("deviceid"))
            .map(|d| Person::DeviceId(d.into())),
        args.get("token").map(|t| Person::Token(t.into())),
    ]
    .into_iter()
    .flatten()
    .collect();
    let [person] = given.as_slice() else {
        return Err(Error::Usage(
            "audit erase: give exactly one of --account, --device-id, --token".into(),
        ));
    };
    if matches!(person, Person::Account(v) | Person::DeviceId(v) | Person::Token(v) if v.is_empty())
    {
        return Err(Error::Usage("audit erase: the identifier is empty".into()));
    }
    let by = match args.get("by") {
        Some(by) if !by.trim().is_empty() => by.to_string(),
        Some(_) => return Err(Error::Usage("argument --by: must not be empty".into())),
        None => operating_system_user(),
    };
    let (postgres, _) = crate::import::database(args)?;
    let mut client = connect(&postgres).await?;
    let erased = erase::erase(&mut **client, person, &by)
        .await
        .map_err(|e| Error::Failed(e.to_string()))?;
    let _ = writeln!(
        out,
        "erased by {} ({}): {} device tokens, {} deliveries, {} delivery attempts, {} dead-token entries",
        person.selector(),
        by,
        erased.device_tokens,
        erased.deliveries,
        erased.delivery_attempts,
        erased.invalid_tokens
    );
    Ok(OK)
}

/// Who runs the command, for the erasure record.
fn operating_system_user() -> String {
    ["USER", "LOGNAME"]
        .iter()
        .find_map(|name| std::env::var(name).ok().filter(|u| !u.is_empty()))
        .unwrap_or_else(|| "unknown".into())
}
