//! `pushfleet-ingest --config <file>`: serves the push API until SIGTERM or SIGINT.

use std::error::Error;
use std::process::ExitCode;

use pushfleet_core::reload::Hangups;
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
    let mut hangups = Hangups::install()?;
    let shutdown = shutdown_signal();
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            () = &mut shutdown => break,
            // The configuration and the HTTPS certificate; a failure is logged and counted,
            // and what is in force stays.
            () = hangups.next() => {
                ingest.reload(&command_line.config);
            }
        }
    }
    info!("shutting down: finishing in-flight requests");
    Ok(ingest.stop().await?)
}
