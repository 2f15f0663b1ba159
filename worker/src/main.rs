//! `pushfleet-worker --config <file> [migrate]`: delivers pushes until SIGTERM or SIGINT, or
//! applies the database migrations and exits.

use std::process::ExitCode;

use pushfleet_core::db;
use pushfleet_core::reload::Hangups;
use pushfleet_core::service::{init_logging, shutdown_signal, CommandLine};
use pushfleet_worker::Worker;
use tracing::info;

#[tokio::main]
async fn main() -> ExitCode {
    match run().await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("pushfleet-worker: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn run() -> Result<(), Box<dyn std::error::Error>> {
    let command_line = CommandLine::parse("pushfleet-worker", "[migrate]")?;
    let settings = command_line.settings()?;
    init_logging(&settings.log);
    match command_line.command.as_deref() {
        None => {
            let worker = Worker::bind(settings).await?;
            let mut hangups = Hangups::install()?;
            let shutdown = shutdown_signal();
            tokio::pin!(shutdown);
            loop {
                tokio::select! {
                    () = &mut shutdown => break,
                    // A failure is logged and counted; the configuration in force stays.
                    () = hangups.next() => {
                        worker.reload(&command_line.config);
                    }
                }
            }
            info!("shutting down: finishing jobs in hand");
            worker.stop().await;
            Ok(())
        }
        Some("migrate") => {
            let pool = db::pool(&settings.postgres)?;
            db::ping(&pool, &settings.postgres).await?;
            let applied = db::migrate(&pool).await?;
            db::ensure_partitions(&pool).await?;
            println!("migrations applied: {applied:?}");
            Ok(())
        }
        Some(other) => Err(format!("unknown command {other:?} (known: migrate)").into()),
    }
}
