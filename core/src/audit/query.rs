//! Reading the audit trail: the filters of `GET /audit` and `pushfleet audit`, one page of rows
//! in keyset order, and the grouped summary. Ingest and the client both run these queries, so
//! the API and the command line answer alike.

use std::fmt::Write as _;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use serde_json::{json, Map, Value};
use tokio_postgres::types::ToSql;
use uuid::Uuid;

use crate::config::Platform;
use crate::db::{DbError, GenericClient};
use crate::policy::Event;
use crate::tokens::token_fingerprint;
use crate::DeliveryStatus;

/// Rows per page unless `limit` says otherwise, and the most one page may hold.
pub const DEFAULT_LIMIT: i64 = 100;
pub const MAX_LIMIT: i64 = 1000;
/// The longest text a filter may hold (ids, accounts, call-ids are far shorter).
const MAX_FILTER_CHARS: usize = 1024;

/// A filter the caller got wrong: the text names it, as `<problem>: <filter>`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FilterError {
    #[error("{problem}: {field}")]
    Invalid {
        field: &'static str,
        problem: &'static str,
    },
    #[error("unknown filter (known: {known}): {0}", known = KNOWN_PARAMETERS.join(", "))]
    Unknown(String),
}

impl FilterError {
    fn invalid(field: &'static str, problem: &'static str) -> FilterError {
        FilterError::Invalid { field, problem }
    }

    /// The parameter at fault.
    pub fn field(&self) -> &str {
        match self {
            FilterError::Invalid { field, .. } => field,
            FilterError::Unknown(name) => name,
        }
    }
}

/// Every query parameter the audit routes read, under its canonical name.
pub const KNOWN_PARAMETERS: &[&str] = &[
    "app",
    "platform",
    "account",
    "device_id",
    "token",
    "token_fingerprint",
    "call_id",
    "event",
    "status",
    "since",
    "until",
    "limit",
    "after",
    "attempts",
    "format",
    "by",
];

/// The canonical name of a parameter, accepting the spellings of the Sylk API (`call-id`,
/// `app-id`, `device-id`).
fn canonical(name: &str) -> Option<&'static str> {
    let name = match name {
        "app_id" | "app-id" => "app",
        "call-id" => "call_id",
        "device-id" => "device_id",
        "token-fingerprint" => "token_fingerprint",
        other => other,
    };
    KNOWN_PARAMETERS
        .iter()
        .copied()
        .find(|known| *known == name)
}

/// Which deliveries an auditor asks for. Empty lists and `None` leave a column unfiltered;
/// several values of one filter match any of them.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct AuditFilter {
    pub apps: Vec<String>,
    pub platform: Option<Platform>,
    pub account: Option<String>,
    pub device_id: Option<String>,
    /// Given as the raw `token` (fingerprinted here, never stored) or as `token_fingerprint`.
    pub token_fingerprint: Option<String>,
    pub call_id: Option<String>,
    pub events: Vec<Event>,
    pub statuses: Vec<DeliveryStatus>,
    /// `received_at >= since`.
    pub since: Option<SystemTime>,
    /// `received_at < until`.
    pub until: Option<SystemTime>,
}

/// Where a page starts: just after this row in (received_at, id) order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cursor {
    pub received_at: SystemTime,
    pub id: Uuid,
}

impl Cursor {
    /// Opaque to callers: microseconds since the epoch and the job id, base64url.
    pub fn encode(&self) -> String {
        let micros = self
            .received_at
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_micros() as i64)
            .unwrap_or_else(|before| -(before.duration().as_micros() as i64));
        let mut bytes = [0u8; 24];
        bytes[..8].copy_from_slice(&micros.to_be_bytes());
        bytes[8..].copy_from_slice(self.id.as_bytes());
        URL_SAFE_NO_PAD.encode(bytes)
    }

    pub fn decode(text: &str) -> Result<Cursor, FilterError> {
        let bad = || FilterError::invalid("after", "must be the next cursor of an earlier page");
        let bytes = URL_SAFE_NO_PAD.decode(text).map_err(|_| bad())?;
        let bytes: [u8; 24] = bytes.try_into().map_err(|_| bad())?;
        let micros = i64::from_be_bytes(bytes[..8].try_into().map_err(|_| bad())?);
        // Years 1 to 9999, as RFC 3339 writes them: Postgres refuses what lies far beyond.
        if !(-62_135_596_800_000_000..=253_402_300_799_999_999).contains(&micros) {
            return Err(bad());
        }
        let offset = Duration::from_micros(micros.unsigned_abs());
        let received_at = if micros >= 0 {
            UNIX_EPOCH.checked_add(offset)
        } else {
            UNIX_EPOCH.checked_sub(offset)
        }
        .ok_or_else(bad)?;
        let id = Uuid::from_slice(&bytes[8..]).map_err(|_| bad())?;
        Ok(Cursor { received_at, id })
    }
}

/// One page asked for.
#[derive(Debug, Clone, PartialEq)]
pub struct PageRequest {
    pub filter: AuditFilter,
    pub limit: i64,
    pub after: Option<Cursor>,
    /// Each row with its `delivery_attempts` under `attempts`.
    pub with_attempts: bool,
}

impl Default for PageRequest {
    fn default() -> Self {
        PageRequest {
            filter: AuditFilter::default(),
            limit: DEFAULT_LIMIT,
            after: None,
            with_attempts: false,
        }
    }
}

/// What a summary groups by.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GroupBy {
    App,
    Platform,
    Event,
    Status,
    Lane,
    /// The UTC day of received_at.
    Day,
}

impl GroupBy {
    const ALL: [GroupBy; 6] = [
        GroupBy::App,
        GroupBy::Platform,
        GroupBy::Event,
        GroupBy::Status,
        GroupBy::Lane,
        GroupBy::Day,
    ];

    pub fn name(self) -> &'static str {
        match self {
            GroupBy::App => "app",
            GroupBy::Platform => "platform",
            GroupBy::Event => "event",
            GroupBy::Status => "status",
            GroupBy::Lane => "lane",
            GroupBy::Day => "day",
        }
    }

    fn expression(self) -> &'static str {
        match self {
            GroupBy::App => "d.app_id",
            GroupBy::Platform => "d.platform",
            GroupBy::Event => "d.event",
            GroupBy::Status => "d.status",
            GroupBy::Lane => "d.lane",
            GroupBy::Day => "to_char(d.received_at AT TIME ZONE 'UTC', 'YYYY-MM-DD')",
        }
    }
}

/// A summary asked for.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SummaryRequest {
    pub filter: AuditFilter,
    pub by: Vec<GroupBy>,
}

/// The query parameters as given, in order (a repeated one keeps every value).
pub type Params = [(String, String)];

/// Parses the filters of `params`; `extra` names the parameters the caller reads itself
/// (`limit`, `after`, `attempts` for pages; `by` for summaries; `format`).
fn parse_filter(params: &Params, extra: &[&str]) -> Result<AuditFilter, FilterError> {
    let mut filter = AuditFilter::default();
    let mut raw_token = None;
    for (name, value) in params {
        let name = canonical(name).ok_or_else(|| FilterError::Unknown(name.clone()))?;
        let field = name;
        check_text(field, value)?;
        match name {
            "app" => filter.apps.push(non_empty(field, value)?.to_string()),
            "platform" => {
                filter.platform = Some(
                    Platform::from_alias(value)
                        .ok_or(FilterError::invalid(field, "must be apple or firebase"))?,
                )
            }
            "account" => filter.account = Some(non_empty(field, value)?.to_string()),
            "device_id" => filter.device_id = Some(non_empty(field, value)?.to_string()),
            "call_id" => filter.call_id = Some(non_empty(field, value)?.to_string()),
            "token" => raw_token = Some(non_empty(field, value)?.to_string()),
            "token_fingerprint" => {
                let fingerprint = value.to_ascii_lowercase();
                if fingerprint.len() != 16 || !fingerprint.bytes().all(|b| b.is_ascii_hexdigit()) {
                    return Err(FilterError::invalid(field, "must be 16 hex digits"));
                }
                filter.token_fingerprint = Some(fingerprint);
            }
            "event" => filter.events.push(Event::parse(value).ok_or(FilterError::invalid(
                field,
                "must be incoming_session, incoming_conference_request, cancel, message or transfer",
            ))?),
            "status" => {
                for status in value.split(',') {
                    filter.statuses.push(parse_status(status.trim()).ok_or(
                        FilterError::invalid(
                            field,
                            "must be delivered, rejected, token_invalid, expired, failed or cancelled",
                        ),
                    )?);
                }
            }
            "since" => filter.since = Some(parse_time(field, value)?),
            "until" => filter.until = Some(parse_time(field, value)?),
            known if extra.contains(&known) => {}
            unknown => return Err(FilterError::Unknown(unknown.to_string())),
        }
    }
    if let Some(token) = raw_token {
        let fingerprint = token_fingerprint(&token);
        if filter
            .token_fingerprint
            .as_ref()
            .is_some_and(|given| *given != fingerprint)
        {
            return Err(FilterError::invalid(
                "token",
                "names another token than token_fingerprint",
            ));
        }
        filter.token_fingerprint = Some(fingerprint);
    }
    if let (Some(since), Some(until)) = (filter.since, filter.until) {
        if until < since {
            return Err(FilterError::invalid("until", "must not be before since"));
        }
    }
    Ok(filter)
}

/// The value of the last `name` in `params` (under any of its spellings).
fn last<'a>(params: &'a Params, name: &str) -> Option<&'a str> {
    params
        .iter()
        .rev()
        .find(|(key, _)| canonical(key) == Some(name))
        .map(|(_, value)| value.as_str())
}

impl PageRequest {
    /// `GET /audit`'s parameters: the filters, `limit`, `after`, `attempts` (and `format`,
    /// which the caller reads).
    pub fn from_params(params: &Params) -> Result<PageRequest, FilterError> {
        let filter = parse_filter(params, &["limit", "after", "attempts", "format"])?;
        let limit = match last(params, "limit") {
            None => DEFAULT_LIMIT,
            Some(text) => text
                .parse::<i64>()
                .ok()
                .filter(|n| (1..=MAX_LIMIT).contains(n))
                .ok_or(FilterError::invalid(
                    "limit",
                    "must be a whole number from 1 to 1000",
                ))?,
        };
        let after = last(params, "after")
            .filter(|a| !a.is_empty())
            .map(Cursor::decode)
            .transpose()?;
        let with_attempts = match last(params, "attempts") {
            None | Some("0" | "false" | "") => false,
            Some("1" | "true") => true,
            Some(_) => return Err(FilterError::invalid("attempts", "must be 1 or 0")),
        };
        Ok(PageRequest {
            filter,
            limit,
            after,
            with_attempts,
        })
    }
}

impl SummaryRequest {
    /// `GET /audit/summary`'s parameters: the filters and `by` (a comma-separated list).
    pub fn from_params(params: &Params) -> Result<SummaryRequest, FilterError> {
        let filter = parse_filter(params, &["by", "format"])?;
        let mut by = Vec::new();
        for name in last(params, "by")
            .unwrap_or("")
            .split(',')
            .map(str::trim)
            .filter(|n| !n.is_empty())
        {
            let group =
                GroupBy::ALL
                    .into_iter()
                    .find(|g| g.name() == name)
                    .ok_or(FilterError::invalid(
                        "by",
                        "must list app, platform, event, status, lane or day",
                    ))?;
            if !by.contains(&group) {
                by.push(group);
            }
        }
        Ok(SummaryRequest { filter, by })
    }
}

fn check_text(field: &'static str, value: &str) -> Result<(), FilterError> {
    if value.chars().any(char::is_control) {
        return Err(FilterError::invalid(
            field,
            "must not contain control characters",
        ));
    }
    if value.chars().count() > MAX_FILTER_CHARS {
        return Err(FilterError::invalid(
            field,
            "must be at most 1024 characters",
        ));
    }
    Ok(())
}

fn non_empty<'a>(field: &'static str, value: &'a str) -> Result<&'a str, FilterError> {
    if value.is_empty() {
        Err(FilterError::invalid(field, "must not be empty"))
    } else {
        Ok(value)
    }
}

pub fn parse_status(name: &str) -> Option<DeliveryStatus> {
    [
        DeliveryStatus::Delivered,
        DeliveryStatus::Rejected,
        DeliveryStatus::TokenInvalid,
        DeliveryStatus::Expired,
        DeliveryStatus::Failed,
        DeliveryStatus::Cancelled,
    ]
    .into_iter()
    .find(|s| s.as_str() == name)
}

/// An RFC 3339 instant (`2026-12-01T10:00:00Z`, `…+01:00`, fractions allowed).
pub fn parse_time(field: &'static str, value: &str) -> Result<SystemTime, FilterError> {
    time::OffsetDateTime::parse(value, &time::format_description::well_known::Rfc3339)
        .map(SystemTime::from)
        .map_err(|_| {
            FilterError::invalid(
                field,
                "must be an RFC 3339 time such as 2026-12-01T10:00:00Z",
            )
        })
}

/// An instant as RFC 3339 in UTC, as the progress line and summaries show it.
pub fn format_time(at: SystemTime) -> String {
    time::OffsetDateTime::from(at)
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default()
}

type Param = Box<dyn ToSql + Sync + Send>;

/// A WHERE clause and its parameters, numbered as they are added.
#[derive(Default)]
struct Conditions {
    sql: String,
    params: Vec<Param>,
}

impl Conditions {
    /// Adds `condition`, where `$` stands for the new parameter.
    fn add(&mut self, condition: &str, value: Param) {
        self.params.push(value);
        let placeholder = format!("${}", self.params.len());
        self.sql.push_str(if self.sql.is_empty() {
            " WHERE "
        } else {
            " AND "
        });
        self.sql.push_str(&condition.replace('$', &placeholder));
    }

    fn of(filter: &AuditFilter, scope: Option<&[String]>) -> Conditions {
        let mut c = Conditions::default();
        if let Some(apps) = scope {
            c.add("d.app_id = ANY($)", Box::new(apps.to_vec()));
        }
        match filter.apps.as_slice() {
            [] => {}
            [app] => c.add("d.app_id = $", Box::new(app.clone())),
            apps => c.add("d.app_id = ANY($)", Box::new(apps.to_vec())),
        }
        if let Some(platform) = filter.platform {
            c.add("d.platform = $", Box::new(platform.as_str()));
        }
        let text = [
            ("d.account = $", &filter.account),
            ("d.device_id = $", &filter.device_id),
            ("d.token_fingerprint = $", &filter.token_fingerprint),
            ("d.call_id = $", &filter.call_id),
        ];
        for (condition, value) in text {
            if let Some(value) = value {
                c.add(condition, Box::new(value.clone()));
            }
        }
        match filter.events.as_slice() {
            [] => {}
            [event] => c.add("d.event = $", Box::new(event.as_str())),
            events => c.add(
                "d.event = ANY($)",
                Box::new(events.iter().map(|e| e.as_str()).collect::<Vec<_>>()),
            ),
        }
        match filter.statuses.as_slice() {
            [] => {}
            [status] => c.add("d.status = $", Box::new(status.as_str())),
            statuses => c.add(
                "d.status = ANY($)",
                Box::new(statuses.iter().map(|s| s.as_str()).collect::<Vec<_>>()),
            ),
        }
        if let Some(since) = filter.since {
            c.add("d.received_at >= $", Box::new(since));
        }
        if let Some(until) = filter.until {
            c.add("d.received_at < $", Box::new(until));
        }
        c
    }
}

/// The columns of a row, in the order CSV and tables show them. `attempt_count` is
/// `deliveries.attempts` (the number of sends); `attempts` is the list of them.
pub const COLUMNS: &[&str] = &[
    "job_id",
    "received_at",
    "finished_at",
    "recorded_at",
    "app_id",
    "platform",
    "event",
    "call_id",
    "account",
    "device_id",
    "token_fingerprint",
    "lane",
    "status",
    "attempt_count",
    "provider_status",
    "provider_reason",
    "provider_message_id",
    "latency_ms",
    "api_key_id",
];

const ROW: &str = "json_build_object(
    'job_id', d.id, 'received_at', d.received_at, 'finished_at', d.finished_at,
    'recorded_at', d.recorded_at, 'app_id', d.app_id, 'platform', d.platform, 'event', d.event,
    'call_id', d.call_id, 'account', d.account, 'device_id', d.device_id,
    'token_fingerprint', d.token_fingerprint, 'lane', d.lane, 'status', d.status,
    'attempt_count', d.attempts, 'provider_status', d.provider_status,
    'provider_reason', d.provider_reason, 'provider_message_id', d.provider_message_id,
    'latency_ms', d.latency_ms, 'api_key_id', d.api_key_id)";

/// A push's attempts. They follow its acceptance (give or take a day of clock skew between
/// ingest and worker hosts), which lets Postgres skip the older partitions of delivery_attempts.
const ATTEMPTS: &str = "(SELECT coalesce(json_agg(json_build_object(
        'attempt', a.attempt, 'attempted_at', a.attempted_at,
        'provider_status', a.provider_status, 'reason', a.reason,
        'duration_ms', a.duration_ms, 'worker', a.worker) ORDER BY a.attempt, a.attempted_at),
        '[]'::json)
   FROM delivery_attempts a
  WHERE a.job_id = d.id AND a.attempted_at >= d.received_at - interval '1 day')";

/// The SQL of a page and its parameters (also for `EXPLAIN` in tests).
pub fn page_sql(
    request: &PageRequest,
    scope: Option<&[String]>,
) -> (String, Vec<Box<dyn ToSql + Sync + Send>>) {
    let mut conditions = Conditions::of(&request.filter, scope);
    if let Some(after) = request.after {
        conditions.add(
            "(d.received_at, d.id) > ($::timestamptz",
            Box::new(after.received_at),
        );
        conditions.params.push(Box::new(after.id));
        let _ = write!(conditions.sql, ", ${}::uuid)", conditions.params.len());
    }
    // One more row than asked: whether there is a next page.
    conditions.params.push(Box::new(request.limit + 1));
    let attempts = if request.with_attempts {
        format!(", {ATTEMPTS}")
    } else {
        String::new()
    };
    let sql = format!(
        "SELECT {ROW}, d.received_at, d.id{attempts} FROM deliveries d{}
          ORDER BY d.received_at, d.id LIMIT ${}",
        conditions.sql,
        conditions.params.len()
    );
    (sql, conditions.params)
}

/// One page of rows and the cursor of the next, if there are more.
#[derive(Debug, Clone, PartialEq)]
pub struct Page {
    pub rows: Vec<Value>,
    pub next: Option<String>,
}

impl Page {
    pub fn to_json(&self) -> Value {
        json!({"rows": self.rows, "next": self.next})
    }
}

/// The rows of `request` a caller limited to `scope` (a key's apps; `None`: all) may see.
pub async fn page(
    client: &impl GenericClient,
    request: &PageRequest,
    scope: Option<&[String]>,
) -> Result<Page, DbError> {
    let (sql, params) = page_sql(request, scope);
    let params: Vec<&(dyn ToSql + Sync)> =
        params.iter().map(|p| &**p as &(dyn ToSql + Sync)).collect();
    let found = client
        .query(&sql, &params)
        .await
        .map_err(DbError::query("audit query"))?;
    let limit = usize::try_from(request.limit).unwrap_or(usize::MAX);
    let mut rows = Vec::with_capacity(found.len().min(limit));
    let mut next = None;
    for (index, row) in found.iter().enumerate() {
        if index == limit {
            let last = &found[index - 1];
            next = Some(
                Cursor {
                    received_at: last.get(1),
                    id: last.get(2),
                }
                .encode(),
            );
            break;
        }
        let mut value: Value = row.get(0);
        if request.with_attempts {
            if let Value::Object(map) = &mut value {
                map.insert("attempts".into(), row.get(3));
            }
        }
        rows.push(value);
    }
    Ok(Page { rows, next })
}

/// The SQL of a summary and its parameters.
pub fn summary_sql(
    request: &SummaryRequest,
    scope: Option<&[String]>,
) -> (String, Vec<Box<dyn ToSql + Sync + Send>>) {
    let conditions = Conditions::of(&request.filter, scope);
    let groups: Vec<String> = request
        .by
        .iter()
        .map(|g| format!("{} AS {}", g.expression(), g.name()))
        .collect();
    let mut select = groups.join(", ");
    if !select.is_empty() {
        select.push_str(", ");
    }
    let group_by = if request.by.is_empty() {
        String::new()
    } else {
        let positions: Vec<String> = (1..=request.by.len()).map(|i| i.to_string()).collect();
        format!(" GROUP BY {0} ORDER BY {0}", positions.join(", "))
    };
    // Latency from acceptance to the provider's answer: the rows a provider answered.
    let sql = format!(
        "SELECT {select}count(*) AS count,
                count(*) FILTER (WHERE d.status = 'expired') AS expired_before_delivery,
                percentile_cont(0.5) WITHIN GROUP (ORDER BY d.latency_ms)
                    FILTER (WHERE d.provider_status IS NOT NULL) AS latency_median_ms,
                percentile_cont(0.99) WITHIN GROUP (ORDER BY d.latency_ms)
                    FILTER (WHERE d.provider_status IS NOT NULL) AS latency_p99_ms
           FROM deliveries d{}{group_by}",
        conditions.sql
    );
    (sql, conditions.params)
}

/// Counts per group: `{"by": [...], "groups": [{<group columns>, count,
/// expired_before_delivery, latency_median_ms, latency_p99_ms}], "total": n}`.
pub async fn summary(
    client: &impl GenericClient,
    request: &SummaryRequest,
    scope: Option<&[String]>,
) -> Result<Value, DbError> {
    let (sql, params) = summary_sql(request, scope);
    let params: Vec<&(dyn ToSql + Sync)> =
        params.iter().map(|p| &**p as &(dyn ToSql + Sync)).collect();
    let found = client
        .query(&sql, &params)
        .await
        .map_err(DbError::query("audit summary"))?;
    let mut groups = Vec::with_capacity(found.len());
    let mut total = 0;
    for row in &found {
        let mut group = Map::new();
        for (index, by) in request.by.iter().enumerate() {
            group.insert(by.name().into(), json!(row.get::<_, String>(index)));
        }
        let at = request.by.len();
        let count: i64 = row.get(at);
        if count == 0 {
            // No GROUP BY over no rows still yields one row of zeros.
            continue;
        }
        total += count;
        group.insert("count".into(), json!(count));
        group.insert(
            "expired_before_delivery".into(),
            json!(row.get::<_, i64>(at + 1)),
        );
        group.insert(
            "latency_median_ms".into(),
            json!(row.get::<_, Option<f64>>(at + 2)),
        );
        group.insert(
            "latency_p99_ms".into(),
            json!(row.get::<_, Option<f64>>(at + 3)),
        );
        groups.push(Value::Object(group));
    }
    let by: Vec<&str> = request.by.iter().map(|g| g.name()).collect();
    Ok(json!({
        "since": request.filter.since.map(format_time),
        "until": request.filter.until.map(format_time),
        "by": by,
        "groups": groups,
        "total": total,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn filters_parse_under_every_spelling() {
        let request = PageRequest::from_params(&params(&[
            ("app-id", "a"),
            ("app", "b"),
            ("platform", "ios"),
            ("call-id", "c1"),
            ("status", "delivered,failed"),
            ("status", "expired"),
            ("token", "abc"),
            ("since", "2026-12-01T10:00:00Z"),
            ("until", "2026-12-01T11:00:00.5+01:00"),
            ("limit", "50"),
            ("attempts", "1"),
        ]))
        .unwrap();
        let f = &request.filter;
        assert_eq!(f.apps, ["a", "b"]);
        assert_eq!(f.platform, Some(Platform::Apple));
        assert_eq!(f.call_id.as_deref(), Some("c1"));
        assert_eq!(
            f.statuses,
            [
                DeliveryStatus::Delivered,
                DeliveryStatus::Failed,
                DeliveryStatus::Expired
            ]
        );
        assert_eq!(f.token_fingerprint.as_deref(), Some("ba7816bf8f01cfea"));
        assert_eq!((request.limit, request.with_attempts), (50, true));
    }

    #[test]
    fn bad_filters_are_named() {
        let field = |pairs: &[(&str, &str)]| {
            PageRequest::from_params(&params(pairs))
                .unwrap_err()
                .field()
                .to_string()
        };
        assert_eq!(field(&[("since", "yesterday")]), "since");
        assert_eq!(field(&[("limit", "1001")]), "limit");
        assert_eq!(field(&[("limit", "0")]), "limit");
        assert_eq!(field(&[("status", "lost")]), "status");
        assert_eq!(field(&[("event", "ring")]), "event");
        assert_eq!(field(&[("platform", "windows")]), "platform");
        assert_eq!(field(&[("token_fingerprint", "xyz")]), "token_fingerprint");
        assert_eq!(field(&[("after", "not-a-cursor")]), "after");
        assert_eq!(field(&[("acount", "bob")]), "acount");
        assert_eq!(field(&[("call_id", "a\0b")]), "call_id");
        assert_eq!(
            field(&[
                ("since", "2026-12-02T00:00:00Z"),
                ("until", "2026-12-01T00:00:00Z")
            ]),
            "until"
        );
        assert_eq!(
            SummaryRequest::from_params(&params(&[("by", "app,colour")]))
                .unwrap_err()
                .field(),
            "by"
        );
    }

    #[test]
    fn cursors_round_trip_to_the_microsecond() {
        let cursor = Cursor {
            received_at: UNIX_EPOCH + Duration::from_micros(1_764_583_200_123_456),
            id: Uuid::new_v4(),
        };
        assert_eq!(Cursor::decode(&cursor.encode()), Ok(cursor));
        let mut far = [0u8; 24];
        far[..8].copy_from_slice(&i64::MAX.to_be_bytes());
        assert!(Cursor::decode(&URL_SAFE_NO_PAD.encode(far)).is_err());
    }

    #[test]
    fn placeholders_are_numbered_in_order() {
        let request =
            PageRequest::from_params(&params(&[("account", "bob"), ("status", "delivered")]))
                .unwrap();
        let (sql, params) = page_sql(
            &PageRequest {
                after: Some(Cursor {
                    received_at: UNIX_EPOCH,
                    id: Uuid::nil(),
                }),
                ..request
            },
            Some(&["a".to_string()]),
        );
        assert_eq!(params.len(), 6);
        assert!(sql.contains("d.app_id = ANY($1)"), "{sql}");
        assert!(sql.contains("d.account = $2"), "{sql}");
        assert!(sql.contains("d.status = $3"), "{sql}");
        assert!(
            sql.contains("(d.received_at, d.id) > ($4::timestamptz, $5::uuid)"),
            "{sql}"
        );
        assert!(sql.ends_with("LIMIT $6"), "{sql}");
    }
}
