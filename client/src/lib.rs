//! `pushfleet`: the command-line client. Without a subcommand it is `sylk-pushclient` (the v1
//! client OpenSIPS scripts call); with `push`, `add` or `remove` it is `sylk-pushclient-v2`;
//! both keep the reference's options, output lines and exit codes. It adds
//! `tokens list` against the API, `audit` (queries over the API or the database, summaries,
//! erasure), `import` of existing tokens and `keys` (the tenants' API keys) straight into
//! Postgres, `reload` (SIGHUP to the running services), and `wakeup-scheduler`, which wakes
//! devices before their registration expires.
//! Installed (or linked) under the name `sylk-pushclient` or `sylk-pushclient-v2`, it behaves as
//! that client whatever the arguments.
#![forbid(unsafe_code)]

pub mod args;
pub mod audit;
pub mod import;
pub mod inspect;
pub mod keys;
pub mod reload;
pub mod scheduler;
pub mod sylk;

use std::io::Write;

use crate::args::Args;

/// Exit codes, as the reference's clients and argparse use them.
pub const OK: i32 = 0;
pub const FAILED: i32 = 1;
pub const USAGE: i32 = 2;

pub const USAGE_TEXT: &str = "\
usage: pushfleet --url URL --platform P --appid A --token T --deviceid D --callid C
                 --from F --to T [--event E] [--from_name N] [--silent S] [--mediatype M]
       pushfleet [--url BASE] --account ACC add --platform P --appid A --token T --deviceid D
                 [--silent S] [--user_agent UA]
       pushfleet [--url BASE] --account ACC remove --appid A [--deviceid D]
       pushfleet [--url BASE] --account ACC push --callid C --from F --to T [--event E]
                 [--from_name N] [--mediatype M] [--reason R] [--badge B] [--deviceid D]
                 [--filename F] [--filetype T]
       pushfleet [--url BASE] [--api-key KEY] --account ACC tokens list [--json]
       pushfleet [--url BASE] [--api-key KEY] audit --callid C [--json]
       pushfleet audit (--config FILE | --database-url URL | [--url BASE] [--api-key KEY])
                 [--app A …] [--platform P] [--account A] [--device-id D] [--token T]
                 [--token-fingerprint F] [--call-id C] [--event E …] [--status S …]
                 [--since RFC3339] [--until RFC3339] [--limit N] [--after CURSOR] [--attempts]
                 [--format table|json|csv] [--all]
       pushfleet audit summary (connection and filters as above) [--by app,status,event]
                 [--format table|json|csv]
       pushfleet audit erase (--config FILE | --database-url URL)
                 (--account A | --device-id D | --token T) [--by WHO]
       pushfleet import pickle|opensips-csv FILE (--database-url URL | --config FILE)
       pushfleet keys create --tenant NAME --app APP_ID [--app …] --scope push|tokens|audit
                 [--scope …] [--pushes-per-second N [--burst M]] (--config FILE | --database-url URL)
       pushfleet keys list [--json] (--config FILE | --database-url URL)
       pushfleet keys revoke ID (--config FILE | --database-url URL)
       pushfleet reload [--service ingest|worker|all] [--config FILE] [--pid PID]
       pushfleet wakeup-scheduler --config FILE";

/// Runs the client as `program` (its argv[0]) with `args`; returns the exit code.
pub async fn run(
    program: &str,
    args: Vec<String>,
    out: &mut dyn Write,
    err: &mut dyn Write,
) -> i32 {
    let args = match Args::parse(args) {
        Ok(args) => args,
        Err(e) => return usage_error(err, &e),
    };
    if args.flag("help") || args.flag("h") {
        let _ = writeln!(out, "{USAGE_TEXT}");
        return OK;
    }
    let name = std::path::Path::new(program)
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or("pushfleet");
    let command = args.positional.first().map(String::as_str);
    let result = match (name, command) {
        ("sylk-pushclient", _) | (_, None) => sylk::v1(&args, out).await,
        ("sylk-pushclient-v2", _) | (_, Some("add" | "remove" | "push")) => {
            sylk::v2(&args, out).await
        }
        (_, Some("tokens")) => inspect::tokens(&args, out).await,
        (_, Some("audit")) => audit::run(&args, out, err).await,
        (_, Some("import")) => import::run(&args, out).await,
        (_, Some("keys")) => keys::run(&args, out).await,
        (_, Some("reload")) => reload::run(&args, out),
        (_, Some("wakeup-scheduler")) => scheduler::run(&args, out).await,
        (_, Some(other)) => Err(args::Error::Usage(format!("unknown command {other:?}"))),
    };
    match result {
        Ok(code) => code,
        Err(args::Error::Usage(e)) => usage_error(err, &e),
        Err(args::Error::Failed(e)) => {
            let _ = writeln!(err, "pushfleet: {e}");
            FAILED
        }
    }
}

fn usage_error(err: &mut dyn Write, message: &str) -> i32 {
    let _ = writeln!(err, "{USAGE_TEXT}\npushfleet: error: {message}");
    USAGE
}
