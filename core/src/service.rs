//! What every pushfleet binary does the same way: read its command line, set up logs and the
//! metrics recorder, and wait for a shutdown signal.

use std::path::PathBuf;

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use tracing_subscriber::EnvFilter;

use crate::config::{ConfigError, LogFormat, LogSettings, Settings};

/// A command line that cannot be run, with the usage text to show.
#[derive(Debug, thiserror::Error)]
pub enum CommandLineError {
    /// `--help` was asked for.
    #[error("{usage}")]
    Help { usage: String },
    #[error("{problem}\n{usage}")]
    Usage { problem: String, usage: String },
}

/// `<binary> --config <file> [command]`.
#[derive(Debug)]
pub struct CommandLine {
    pub config: PathBuf,
    pub command: Option<String>,
}

impl CommandLine {
    /// Parses the process arguments; `usage` lists the binary's commands for the help text.
    pub fn parse(binary: &str, usage: &str) -> Result<CommandLine, CommandLineError> {
        Self::parse_from(binary, usage, std::env::args().skip(1))
    }

    pub fn parse_from(
        binary: &str,
        usage: &str,
        args: impl IntoIterator<Item = String>,
    ) -> Result<CommandLine, CommandLineError> {
        let usage = format!("usage: {binary} --config <file> {usage}");
        let wrong = |problem: String| CommandLineError::Usage {
            problem,
            usage: usage.clone(),
        };
        let mut config = None;
        let mut command = None;
        let mut args = args.into_iter();
        while let Some(arg) = args.next() {
            match arg.as_str() {
                "--config" | "-c" => {
                    config = Some(
                        args.next()
                            .ok_or_else(|| wrong("--config needs a file".into()))?,
                    )
                }
                "--help" | "-h" => return Err(CommandLineError::Help { usage }),
                other if other.starts_with("--config=") => {
                    config = Some(other["--config=".len()..].to_string())
                }
                other if !other.starts_with('-') && command.is_none() => {
                    command = Some(other.to_string())
                }
                other => return Err(wrong(format!("unexpected argument {other:?}"))),
            }
        }
        let config = config.ok_or_else(|| wrong("missing --config <file>".into()))?;
        Ok(CommandLine {
            config: PathBuf::from(config),
            command,
        })
    }

    /// Loads the settings this command line names.
    pub fn settings(&self) -> Result<Settings, ConfigError> {
        Settings::load(&self.config)
    }
}

/// Logs to stderr; `RUST_LOG` overrides the configured level.
pub fn init_logging(settings: &LogSettings) {
    crate::logged::show_identities(settings.identities);
    let filter = EnvFilter::try_from_default_env()
        .or_else(|_| EnvFilter::try_new(&settings.level))
        .unwrap_or_else(|_| EnvFilter::new("info"));
    // Colour codes only for a person at a terminal, not in files and journals.
    use std::io::IsTerminal;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    let _ = match settings.format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().try_init(),
    };
}

/// Installs the process-wide Prometheus recorder (once; later calls return the same handle).
pub fn metrics_recorder() -> PrometheusHandle {
    static HANDLE: std::sync::OnceLock<PrometheusHandle> = std::sync::OnceLock::new();
    HANDLE
        .get_or_init(|| {
            let latency_buckets = [
                0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
            ];
            let batch_buckets = [1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0, 200.0, 256.0];
            let recorder = PrometheusBuilder::new()
                .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), &latency_buckets)
                .and_then(|b| {
                    b.set_buckets_for_metric(Matcher::Suffix("_batch_size".into()), &batch_buckets)
                })
                .expect("valid buckets")
                .build_recorder();
            let handle = recorder.handle();
            // A second recorder (several services in one test process) keeps the first.
            let _ = metrics::set_global_recorder(recorder);
            crate::webpush::describe_metrics();
            // Histogram samples pile up until folded into their buckets, which a scrape does;
            // without scrapes they would grow by every push.
            let upkeep = handle.clone();
            std::thread::Builder::new()
                .name("metrics-upkeep".into())
                .spawn(move || loop {
                    std::thread::sleep(std::time::Duration::from_secs(5));
                    upkeep.run_upkeep();
                })
                .expect("metrics upkeep thread");
            handle
        })
        .clone()
}

/// Resolves on SIGTERM or SIGINT.
pub async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("SIGTERM handler");
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<CommandLine, CommandLineError> {
        CommandLine::parse_from(
            "pushfleet-worker",
            "[migrate]",
            args.iter().map(|s| s.to_string()),
        )
    }

    #[test]
    fn config_and_command() {
        let c = parse(&["--config", "a.toml", "migrate"]).unwrap();
        assert_eq!(c.config, PathBuf::from("a.toml"));
        assert_eq!(c.command.as_deref(), Some("migrate"));
        assert!(parse(&["--config=b.toml"]).unwrap().command.is_none());
        assert!(matches!(
            parse(&[]),
            Err(CommandLineError::Usage { problem, .. }) if problem == "missing --config <file>"
        ));
        assert!(matches!(
            parse(&["--verbose"]),
            Err(CommandLineError::Usage { .. })
        ));
        assert!(matches!(
            parse(&["--help"]),
            Err(CommandLineError::Help { usage }) if usage.contains("[migrate]")
        ));
    }
}
