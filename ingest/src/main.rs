//! `pushfleet-ingest --config <file>`: serves the push API until SIGTERM or SIGINT.

use std::error::Error;
use std::process::ExitCode;

use pushfleet_core::service::{init_logging, shutdown_signal, CommandLine};
use pushfleet_ingest::Ingest;
use tracing::info;

#[tokio::main]
async fn main() -> ExitCode {
    match run().await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("pushfleet-ingest: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn run() -> Result<(), Box<dyn Error>> {
    let command_line = CommandLine::parse("pushfleet-ingest", "")?;
    if let Some(command) = command_line.command {
        return Err(format!("unknown command {command:?}").into());
    }
    let settings = command_line.settings()?;
    init_logging(&settings.log);
    let ingest = Ingest::bind(settings).await?;
    tokio::select! {
        () = shutdown_signal() => {}
        () = reload_tls_on_hangup(&ingest) => {}
    }
    info!("shutting down: finishing in-flight requests");
    Ok(ingest.stop().await?)
}

/// SIGHUP re-reads the HTTPS certificate. Without HTTPS, SIGHUP keeps its default (it ends the
/// process), as before.
async fn reload_tls_on_hangup(ingest: &Ingest) {
    if !ingest.serves_tls() {
        return std::future::pending().await;
    }
    let mut hangups = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
        .expect("SIGHUP handler");
    while hangups.recv().await.is_some() {
        // A failure is logged by the reload, and the previous certificate stays.
        let _ = ingest.reload_tls();
    }
    std::future::pending().await
}
