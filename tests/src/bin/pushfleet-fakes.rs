//! Runs the fake APNs, FCM, OAuth and WebPush servers for a sandbox or a benchmark.
//!
//! ```text
//! pushfleet-fakes --dir <dir> [--apns-port N] [--fcm-port N] [--oauth-port N]
//!                 [--webpush-port N] [--webpush-mode MODE] [--delay-ms N] [--max-streams N] [--no-journal]
//!                 [--team-id ID] [--bundle ID] [--project ID]
//! ```
//! Writes the credentials and `fakes.json` into `<dir>`, prints one line per server and
//! serves until SIGINT or SIGTERM.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use pushfleet_fakes::{FakeOptions, FakeProviders, SandboxSpec};

const USAGE: &str = "usage: pushfleet-fakes --dir <dir> [--apns-port N] [--fcm-port N] \
[--oauth-port N] [--webpush-port N] [--webpush-mode autopush|ntfy|next_push|xmpp_gateway] [--delay-ms N] [--max-streams N] [--no-journal] [--team-id ID] \
[--bundle ID] [--project ID]";

struct Args {
    dir: PathBuf,
    options: FakeOptions,
    spec: SandboxSpec,
}

fn parse_args() -> Result<Args> {
    let mut dir = None;
    let mut options = FakeOptions::default();
    let mut spec = SandboxSpec::default();
    let mut args = std::env::args().skip(1);
    while let Some(flag) = args.next() {
        let mut value = || {
            args.next()
                .with_context(|| format!("{flag} needs a value\n{USAGE}"))
        };
        let number = |v: String| -> Result<u64> {
            v.parse()
                .with_context(|| format!("{flag}: not a number: {v}"))
        };
        match flag.as_str() {
            "--dir" => dir = Some(PathBuf::from(value()?)),
            "--apns-port" => options.apns.port = number(value()?)?.try_into()?,
            "--fcm-port" => options.fcm.port = number(value()?)?.try_into()?,
            "--oauth-port" => options.oauth_port = number(value()?)?.try_into()?,
            "--webpush-port" => options.webpush.port = number(value()?)?.try_into()?,
            "--webpush-mode" => {
                let mode = value()?;
                options.webpush.mode =
                    serde_json::from_value(serde_json::Value::String(mode.clone()))
                        .with_context(|| format!("--webpush-mode: unknown mode {mode}\n{USAGE}"))?;
            }
            "--delay-ms" => {
                options = options.with_response_delay(Duration::from_millis(number(value()?)?))
            }
            "--max-streams" => {
                options.apns.max_concurrent_streams = number(value()?)?.try_into()?
            }
            "--no-journal" => options.journal = false,
            "--team-id" => spec.team_id = value()?,
            "--bundle" => spec.bundle = value()?,
            "--project" => spec.project_id = value()?,
            "-h" | "--help" => {
                println!("{USAGE}");
                std::process::exit(0);
            }
            other => bail!("unknown argument {other}\n{USAGE}"),
        }
    }
    Ok(Args {
        dir: dir.with_context(|| format!("--dir is required\n{USAGE}"))?,
        options,
        spec,
    })
}

async fn run(args: Args) -> Result<()> {
    let fakes = FakeProviders::start(args.options).await?;
    let files = fakes.write_sandbox_files_with(&args.dir, &args.spec)?;
    let manifest = args.dir.join("fakes.json");
    std::fs::write(&manifest, serde_json::to_string_pretty(&files)?)
        .with_context(|| format!("writing {}", manifest.display()))?;

    println!(
        "apns  {} key_id={} team_id={} bundle={}",
        files.apns_url, files.apns_key_id, files.apns_team_id, files.apns_bundle
    );
    println!("fcm   {} project={}", files.fcm_url, files.fcm_project_id);
    println!("oauth {}/token", files.oauth_url);
    println!(
        "webpush {} subscription={}",
        files.webpush_url, files.webpush_endpoint
    );
    println!("files {}", manifest.display());

    shutdown_signal().await;
    Ok(())
}

async fn shutdown_signal() {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .expect("installing SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}

#[tokio::main]
async fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    let args = match parse_args() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("pushfleet-fakes: {e:#}");
            return ExitCode::from(2);
        }
    };
    match run(args).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("pushfleet-fakes: {e:#}");
            ExitCode::FAILURE
        }
    }
}
