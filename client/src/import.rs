//! `pushfleet import`: brings existing device tokens into `device_tokens`, from a Sylk
//! Pushserver pickle store (`<spool_dir>/webrtc_device_tokens`) or from a CSV export of
//! OpenSIPS's `push_tokens` table. Idempotent: a token already stored with the same values is
//! left alone and counted as unchanged. Every record that cannot be imported is named with the
//! reason; the exit code is 1 when any was rejected.

use std::io::Write;
use std::path::Path;

use pushfleet_core::config::{PostgresSettings, Settings};
use pushfleet_core::db::{self, DbError};
use pushfleet_core::tokens::{self, NewToken, Registered};
use pushfleet_core::Platform;
use serde_pickle::{HashableValue, Value as Pickled};

use crate::args::{Args, Error};
use crate::{FAILED, OK};

/// One record read from a store: where it came from, and the token or why it cannot be used.
pub type Record = (String, Result<NewToken, String>);

/// Why an import wrote nothing: the records go in one transaction.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error(transparent)]
    Database(#[from] DbError),
    /// The database refused one record.
    #[error("{record}: {error}")]
    Record { record: String, error: DbError },
}

#[derive(Debug, Default, PartialEq, Eq)]
pub struct Report {
    pub inserted: usize,
    pub updated: usize,
    pub unchanged: usize,
    pub rejected: Vec<String>,
}

pub async fn run(args: &Args, out: &mut dyn Write) -> Result<i32, Error> {
    args.only(&["database_url", "config"])?;
    let (format, file) = match args.positional.as_slice() {
        [_, format, file] => (format.as_str(), file.as_str()),
        _ => {
            return Err(Error::Usage(
                "usage: import pickle|opensips-csv FILE (--database-url URL | --config FILE)"
                    .into(),
            ))
        }
    };
    let (postgres, settings) = database(args)?;
    let records = match format {
        "pickle" => read_pickle(Path::new(file)),
        "opensips-csv" | "csv" => read_opensips_csv(Path::new(file)),
        other => {
            return Err(Error::Usage(format!(
                "unknown import format {other:?} (pickle or opensips-csv)"
            )))
        }
    }
    .map_err(Error::Failed)?;
    let report = store(&postgres, settings.as_ref(), records)
        .await
        .map_err(|e| Error::Failed(e.to_string()))?;
    for rejected in &report.rejected {
        let _ = writeln!(out, "rejected {rejected}");
    }
    let _ = writeln!(
        out,
        "imported {} tokens from {file} ({} new, {} updated, {} unchanged), rejected {}",
        report.inserted + report.updated + report.unchanged,
        report.inserted,
        report.updated,
        report.unchanged,
        report.rejected.len()
    );
    Ok(if report.rejected.is_empty() {
        OK
    } else {
        FAILED
    })
}

/// The database of `--config FILE` (its `[postgres]`) or `--database-url URL` (which wins), and
/// the configuration when one was given.
pub fn database(args: &Args) -> Result<(PostgresSettings, Option<Settings>), Error> {
    let settings = match args.get("config") {
        Some(path) => {
            Some(Settings::load(Path::new(path)).map_err(|e| Error::Failed(e.to_string()))?)
        }
        None => None,
    };
    let mut postgres = settings
        .as_ref()
        .map(|s| s.postgres.clone())
        .unwrap_or_default();
    match (args.get("database_url"), &settings) {
        (Some(url), _) => postgres.url = url.to_string(),
        (None, Some(_)) => {}
        (None, None) => {
            return Err(Error::Usage(
                "one of --database-url or --config is required".into(),
            ))
        }
    }
    Ok((postgres, settings))
}

/// Writes the records in one transaction; with `settings`, tokens of apps it does not configure
/// are rejected.
pub async fn store(
    postgres: &PostgresSettings,
    settings: Option<&Settings>,
    records: Vec<Record>,
) -> Result<Report, StoreError> {
    let pool = db::pool(postgres)?;
    db::ping(&pool, postgres).await?;
    let mut client = pool.get().await.map_err(DbError::from)?;
    let tx = client
        .transaction()
        .await
        .map_err(DbError::query("import transaction"))?;
    let mut report = Report::default();
    for (source, record) in records {
        let token = match record {
            Ok(token) => token,
            Err(reason) => {
                report.rejected.push(format!("{source}: {reason}"));
                continue;
            }
        };
        if let Some(settings) = settings {
            if settings.app(&token.app_id, token.platform).is_none() {
                report.rejected.push(format!(
                    "{source}: {} {} app is not configured",
                    token.platform.title(),
                    token.app_id
                ));
                continue;
            }
        }
        let registered = tokens::register(&*tx, &token, false).await;
        match registered.map_err(|error| StoreError::Record {
            record: source,
            error,
        })? {
            Registered::Inserted => report.inserted += 1,
            Registered::Updated => report.updated += 1,
            Registered::Unchanged => report.unchanged += 1,
        }
    }
    tx.commit()
        .await
        .map_err(DbError::query("import transaction"))?;
    Ok(report)
}

/// The checks every imported record passes, whatever its store.
#[allow(clippy::too_many_arguments)]
fn token(
    account: &str,
    app_id: &str,
    platform: &str,
    device_id: &str,
    token: &str,
    background_token: Option<String>,
    silent: bool,
    user_agent: Option<String>,
) -> Result<NewToken, String> {
    let platform =
        Platform::from_alias(platform).ok_or_else(|| format!("unknown platform {platform:?}"))?;
    for (name, value) in [
        ("account", account),
        ("app-id", app_id),
        ("device-id", device_id),
        ("token", token),
    ] {
        if value.is_empty() {
            return Err(format!("{name} is empty"));
        }
    }
    // A pair not yet split by the store (OpenSIPS keeps what the phone sent) is split as the
    // token API does.
    let (token, background_token) = match background_token.filter(|b| !b.is_empty()) {
        Some(background) => (token.to_string(), Some(background)),
        None => NewToken::split_token(platform, token),
    };
    Ok(NewToken {
        account: account.to_string(),
        app_id: app_id.to_string(),
        platform,
        device_id: device_id.to_string(),
        token,
        background_token,
        silent,
        user_agent: user_agent.filter(|u| !u.is_empty() && u != "None"),
        extras: Default::default(),
        webpush_keys: None,
    })
}

fn pickled_text(value: Option<&Pickled>) -> Option<String> {
    match value? {
        Pickled::String(s) => Some(s.clone()),
        Pickled::Bytes(b) => String::from_utf8(b.clone()).ok(),
        Pickled::I64(i) => Some(i.to_string()),
        _ => None,
    }
}

fn pickled_bool(value: Option<&Pickled>) -> Result<bool, String> {
    match value {
        None | Some(Pickled::None) => Ok(true),
        Some(Pickled::Bool(b)) => Ok(*b),
        Some(Pickled::I64(i)) => Ok(*i != 0),
        Some(Pickled::String(s)) => parse_silent(s),
        Some(other) => Err(format!("silent is not a boolean: {other:?}")),
    }
}

fn parse_silent(text: &str) -> Result<bool, String> {
    match text.trim().to_ascii_lowercase().as_str() {
        "" | "null" | "\\n" | "1" | "true" | "yes" | "on" => Ok(true),
        "0" | "false" | "no" | "off" => Ok(false),
        other => Err(format!("silent is not a boolean: {other:?}")),
    }
}

fn key_text(key: &HashableValue) -> Option<String> {
    match key {
        HashableValue::String(s) => Some(s.clone()),
        HashableValue::Bytes(b) => String::from_utf8(b.clone()).ok(),
        _ => None,
    }
}

/// Sylk Pushserver's store: `{account: {"<app_id>-<device_id>": {app_id, platform, token,
/// device_id, silent, user_agent, background_token, …}}}`. Extra keys (request fields the
/// reference leaked into its records) are ignored.
pub fn read_pickle(path: &Path) -> Result<Vec<Record>, String> {
    let file = std::fs::File::open(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let value = serde_pickle::value_from_reader(
        std::io::BufReader::new(file),
        serde_pickle::DeOptions::new().replace_unresolved_globals(),
    )
    .map_err(|e| format!("{}: not a Sylk Pushserver token store: {e}", path.display()))?;
    let Pickled::Dict(accounts) = value else {
        return Err(format!(
            "{}: not a Sylk Pushserver token store (the top level is not a dict)",
            path.display()
        ));
    };
    let mut records = Vec::new();
    for (account, devices) in &accounts {
        let account = key_text(account).unwrap_or_default();
        let Pickled::Dict(devices) = devices else {
            records.push((account.clone(), Err("devices are not a dict".into())));
            continue;
        };
        for (key, device) in devices {
            let source = format!("{account} {}", key_text(key).unwrap_or_default());
            let Pickled::Dict(device) = device else {
                records.push((source, Err("device record is not a dict".into())));
                continue;
            };
            let get = |name: &str| device.get(&HashableValue::String(name.into()));
            let text = |name: &str| pickled_text(get(name)).unwrap_or_default();
            let record = pickled_bool(get("silent")).and_then(|silent| {
                token(
                    &account,
                    &text("app_id"),
                    &text("platform"),
                    &text("device_id"),
                    &text("token"),
                    pickled_text(get("background_token")),
                    silent,
                    pickled_text(get("user_agent")),
                )
            });
            records.push((source, record));
        }
    }
    Ok(records)
}

/// RFC 4180 fields of one CSV text, line by line (quoted fields may hold newlines).
fn csv_rows(text: &str) -> Vec<(usize, Vec<String>)> {
    let mut rows = Vec::new();
    let mut row = Vec::new();
    let mut field = String::new();
    let (mut line, mut row_line) = (1, 1);
    let mut quoted = false;
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        match (quoted, c) {
            (true, '"') if chars.peek() == Some(&'"') => {
                chars.next();
                field.push('"');
            }
            (true, '"') => quoted = false,
            (false, '"') if field.is_empty() => quoted = true,
            (false, ',') => row.push(std::mem::take(&mut field)),
            (false, '\r') => {}
            (false, '\n') => {
                row.push(std::mem::take(&mut field));
                if row.iter().any(|f| !f.is_empty()) {
                    rows.push((row_line, std::mem::take(&mut row)));
                }
                row.clear();
                line += 1;
                row_line = line;
            }
            (_, c) => {
                if c == '\n' {
                    line += 1;
                }
                field.push(c);
            }
        }
    }
    row.push(field);
    if row.iter().any(|f| !f.is_empty()) {
        rows.push((row_line, row));
    }
    rows
}

/// OpenSIPS's `push_tokens(username, domain, platform, app, token, sip_instance, user_agent,
/// last_modified, silent)`: a header row naming the columns is used when present, otherwise
/// the columns are taken in this order. The account is `username@domain`; the device id is the
/// `sip_instance`, kept exactly as stored.
pub fn read_opensips_csv(path: &Path) -> Result<Vec<Record>, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let mut rows = csv_rows(&text).into_iter();
    const COLUMNS: [&str; 9] = [
        "username",
        "domain",
        "platform",
        "app",
        "token",
        "sip_instance",
        "user_agent",
        "last_modified",
        "silent",
    ];
    let mut header: Vec<String> = COLUMNS.iter().map(|c| c.to_string()).collect();
    let mut first = rows.next();
    if let Some((_, row)) = &first {
        if row
            .first()
            .is_some_and(|c| c.trim().eq_ignore_ascii_case("username"))
        {
            header = row.iter().map(|c| c.trim().to_ascii_lowercase()).collect();
            first = None;
        }
    }
    let name = path.display().to_string();
    Ok(first
        .into_iter()
        .chain(rows)
        .map(|(line, row)| {
            let column = |c: &str| {
                header
                    .iter()
                    .position(|h| h == c)
                    .and_then(|i| row.get(i))
                    .map(|v| v.trim())
                    .filter(|v| !matches!(*v, "NULL" | "\\N"))
                    .unwrap_or_default()
                    .to_string()
            };
            let (username, domain) = (column("username"), column("domain"));
            let account = match (username.is_empty(), domain.is_empty()) {
                (false, false) => format!("{username}@{domain}"),
                _ => username,
            };
            let record = parse_silent(&column("silent")).and_then(|silent| {
                token(
                    &account,
                    &column("app"),
                    &column("platform"),
                    &column("sip_instance"),
                    &column("token"),
                    None,
                    silent,
                    Some(column("user_agent")),
                )
            });
            (format!("{name}:{line}"), record)
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn csv_fields_and_quotes() {
        let rows = csv_rows("a,\"b,c\",\"d\"\"e\"\n\n\"multi\nline\",x\r\n");
        assert_eq!(
            rows,
            vec![
                (1, vec!["a".into(), "b,c".into(), "d\"e".into()]),
                (3, vec!["multi\nline".into(), "x".into()]),
            ]
        );
    }
}
