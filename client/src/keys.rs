//! `pushfleet keys create|list|revoke`: the API keys of tenants, written straight into Postgres
//! (the database of `--config` or `--database-url`). A new key is printed once, as the last line
//! of `create`; only its hash is stored. Every ingest picks up a new or revoked key within
//! `[ingest] api_keys_refresh_ms`.

use std::io::Write;

use deadpool_postgres::Object;
use pushfleet_core::config::{PostgresSettings, Settings};
use pushfleet_core::db;
use pushfleet_core::keys::{self, KeyError, KeyInfo, NewKey, Revoked, Scope};

use crate::args::{Args, Error};
use crate::import::database;
use crate::{FAILED, OK};

const USAGE: &str = "usage: keys create --tenant NAME --app APP_ID [--app APP_ID …] \
--scope push|tokens|audit [--scope …] [--pushes-per-second N [--burst M]] | keys list [--json] \
| keys revoke ID  (each with --config FILE or --database-url URL)";

pub async fn run(args: &Args, out: &mut dyn Write) -> Result<i32, Error> {
    let words: Vec<&str> = args.positional.iter().map(String::as_str).collect();
    match words.as_slice() {
        [_, "create"] => create(args, out).await,
        [_, "list"] => list(args, out).await,
        [_, "revoke", id] => revoke(args, id, out).await,
        _ => Err(Error::Usage(USAGE.into())),
    }
}

pub(crate) async fn connect(postgres: &PostgresSettings) -> Result<Object, Error> {
    let failed = |e: db::DbError| Error::Failed(e.to_string());
    let pool = db::pool(postgres).map_err(failed)?;
    db::ping(&pool, postgres).await.map_err(failed)?;
    pool.get()
        .await
        .map_err(|e| failed(db::DbError::Connection(e)))
}

/// Each value once, in the order first given.
fn distinct(values: Vec<&str>) -> Vec<&str> {
    let mut seen = Vec::new();
    for value in values {
        if !seen.contains(&value) {
            seen.push(value);
        }
    }
    seen
}

fn count(args: &Args, name: &str) -> Result<u32, Error> {
    match args.get(name) {
        None => Ok(0),
        Some(text) => text.parse().map_err(|_| {
            Error::Usage(format!(
                "argument --{}: invalid count: {text:?} (a whole number, 0 = unlimited)",
                name.replace('_', "-")
            ))
        }),
    }
}

fn new_key(args: &Args, settings: Option<&Settings>) -> Result<NewKey, Error> {
    let [tenant] = args.required(["tenant"])?;
    let apps = distinct(args.all("app"));
    let scope_names = distinct(args.all("scope"));
    if apps.is_empty() || scope_names.is_empty() {
        return Err(Error::Usage(
            "the following arguments are required: --app, --scope".into(),
        ));
    }
    let scopes = scope_names
        .iter()
        .map(|name| {
            Scope::parse(name).ok_or_else(|| {
                Error::Usage(format!(
                    "argument --scope: invalid choice: {name:?} (choose from 'push', 'tokens', 'audit')"
                ))
            })
        })
        .collect::<Result<Vec<_>, _>>()?;
    // Against a configuration, a key for an app it does not serve is a typo.
    if let Some(settings) = settings {
        if let Some(app) = apps
            .iter()
            .find(|a| !settings.apps.iter().any(|c| c.id == **a))
        {
            return Err(Error::Failed(format!(
                "app {app} is not configured ([[apps]] of the --config file)"
            )));
        }
    }
    Ok(NewKey {
        tenant: tenant.to_string(),
        apps: apps.into_iter().map(str::to_string).collect(),
        scopes,
        pushes_per_second: count(args, "pushes_per_second")?,
        burst: count(args, "burst")?,
    })
}

fn rate(info: &KeyInfo) -> String {
    match (info.pushes_per_second, info.burst) {
        (0, _) => "unlimited".into(),
        (rate, 0) => format!("{rate} pushes per second, burst {rate} (one second's worth)"),
        (rate, burst) => format!("{rate} pushes per second, burst {burst}"),
    }
}

async fn create(args: &Args, out: &mut dyn Write) -> Result<i32, Error> {
    args.only(&[
        "config",
        "database_url",
        "tenant",
        "app",
        "scope",
        "pushes_per_second",
        "burst",
    ])?;
    let (postgres, settings) = database(args)?;
    let new = new_key(args, settings.as_ref())?;
    let mut client = connect(&postgres).await?;
    let created = keys::create(&mut **client, &new)
        .await
        .map_err(|e| match e {
            KeyError::Invalid(problem) => Error::Usage(problem),
            other => Error::Failed(other.to_string()),
        })?;
    let info = &created.info;
    let _ = writeln!(
        out,
        "created API key {} for tenant {}",
        info.id, info.tenant
    );
    let _ = writeln!(out, "apps: {}", info.apps.join(", "));
    let _ = writeln!(out, "scopes: {}", info.scopes.join(", "));
    let _ = writeln!(out, "rate limit: {}", rate(info));
    let _ = writeln!(
        out,
        "the key follows; it is not shown again (only its hash is stored):"
    );
    let _ = writeln!(out, "{}", created.key);
    Ok(OK)
}

fn text(value: Option<&str>) -> &str {
    value.unwrap_or("-")
}

async fn list(args: &Args, out: &mut dyn Write) -> Result<i32, Error> {
    args.only(&["config", "database_url"])?;
    let (postgres, _) = database(args)?;
    let client = connect(&postgres).await?;
    let listed = keys::list(&**client)
        .await
        .map_err(|e| Error::Failed(e.to_string()))?;
    if args.flag("json") {
        let all: Vec<_> = listed.iter().map(KeyInfo::to_json).collect();
        let _ = writeln!(out, "{}", serde_json::Value::Array(all));
        return Ok(OK);
    }
    let _ = writeln!(
        out,
        "id\ttenant\tapps\tscopes\tpushes_per_second\tburst\tcreated\trevoked"
    );
    for key in &listed {
        let _ = writeln!(
            out,
            "{}\t{}\t{}\t{}\t{}\t{}\t{}\t{}",
            key.id,
            key.tenant,
            key.apps.join(","),
            key.scopes.join(","),
            key.pushes_per_second,
            key.burst,
            key.created_at,
            text(key.revoked_at.as_deref()),
        );
    }
    Ok(OK)
}

async fn revoke(args: &Args, id: &str, out: &mut dyn Write) -> Result<i32, Error> {
    args.only(&["config", "database_url"])?;
    let (postgres, _) = database(args)?;
    let client = connect(&postgres).await?;
    let revoked = keys::revoke(&**client, id)
        .await
        .map_err(|e| Error::Failed(e.to_string()))?;
    Ok(match revoked {
        Revoked::Now(key) => {
            let _ = writeln!(
                out,
                "revoked API key {} of tenant {}; every ingest refuses it within [ingest] api_keys_refresh_ms",
                key.id, key.tenant
            );
            OK
        }
        Revoked::Already(key) => {
            let _ = writeln!(
                out,
                "API key {} of tenant {} was already revoked at {}",
                key.id,
                key.tenant,
                text(key.revoked_at.as_deref())
            );
            OK
        }
        Revoked::Unknown => {
            let _ = writeln!(out, "no API key {id}");
            FAILED
        }
    })
}
