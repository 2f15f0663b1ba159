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

/// The help texts `/metrics` shows for the families that carry one.
fn describe_metrics() {
    metrics::describe_counter!(
        "pushfleet_ringing_alerts_total",
        "alert pushes that rang an iOS device without a VoIP token (alert=ring) or told it how the call ended (alert=final)"
    );
    metrics::describe_counter!(
        "pushfleet_held_calls_ended_total",
        "cancels not sent because the call's push to the device was still held back by pn-timeout"
    );
    metrics::describe_counter!(
        "pushfleet_wakeups_total",
        "registration wake-ups asked for, by source (api, scheduler) and outcome (queued, suppressed, not_queued)"
    );
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
            // From accept to a worker, to the end, to the audit row: up to a message's 24 h TTL,
            // so that a p99 near a lane's TTL can be told apart (exact matches are tried first).
            let lifetime_buckets = [
                0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0,
                3600.0, 21600.0, 86400.0,
            ];
            let mut builder = PrometheusBuilder::new();
            for name in [
                "pushfleet_queue_wait_seconds",
                "pushfleet_push_latency_seconds",
                "pushfleet_audit_lag_seconds",
            ] {
                builder = builder
                    .set_buckets_for_metric(Matcher::Full(name.into()), &lifetime_buckets)
                    .expect("valid buckets");
            }
            let recorder = builder
                .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), &latency_buckets)
                .and_then(|b| {
                    b.set_buckets_for_metric(Matcher::Suffix("_batch_size".into()), &batch_buckets)
                })
                .expect("valid buckets")
                .build_recorder();
            let handle = recorder.handle();
            // A second recorder (several services in one test process) keeps the first.
            let _ = metrics::set_global_recorder(recorder);
            describe_metrics();
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

/// The release, as in Cargo.toml, and the commit it was built from (`build.rs`).
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
pub const COMMIT: &str = env!("PUSHFLEET_COMMIT");

/// HELP texts of the metrics every binary exports, and `pushfleet_build_info` set once: a
/// family appears on `/metrics` with its HELP once it has a value.
pub fn describe_common() {
    use metrics::{describe_counter, describe_gauge, Unit};
    // Descriptions given before the recorder exists would be lost.
    metrics_recorder();
    describe_gauge!(
        "pushfleet_build_info",
        "Always 1; the version and commit of the running binary as labels"
    );
    describe_gauge!(
        "pushfleet_broker_connected",
        "1 while the service (label service) is connected to RabbitMQ, 0 while it reconnects"
    );
    describe_counter!(
        "pushfleet_config_reloads_total",
        "Configuration reloads (SIGHUP or changed credential files) that took effect"
    );
    describe_counter!(
        "pushfleet_config_reload_failures_total",
        "Configuration reloads refused (invalid file or credentials): the previous configuration stays"
    );
    describe_gauge!(
        "process_resident_memory_bytes",
        Unit::Bytes,
        "Resident set size of the process"
    );
    describe_gauge!(
        "process_cpu_seconds_total",
        Unit::Seconds,
        "User and system CPU time the process has used (a counter: use rate())"
    );
    describe_gauge!("process_open_fds", "Open file descriptors of the process");
    metrics::gauge!("pushfleet_build_info", "version" => VERSION, "commit" => COMMIT).set(1.0);
    // Present from the start, so that rate() and increase() see the first failure.
    metrics::counter!("pushfleet_config_reloads_total").increment(0);
    metrics::counter!("pushfleet_config_reload_failures_total").increment(0);
    record_process_metrics();
}

/// HELP of the Postgres probe, for the binaries that report it.
pub fn describe_postgres_probe() {
    metrics::describe_gauge!(
        "pushfleet_postgres_up",
        "1 when Postgres answered the last probe (each scrape and /ready), 0 when not, by service"
    );
}

/// Whether Postgres answers within `timeout`, recorded as `pushfleet_postgres_up{service}`.
pub async fn probe_postgres(
    pool: &deadpool_postgres::Pool,
    settings: &crate::config::PostgresSettings,
    service: &'static str,
    timeout: std::time::Duration,
) -> bool {
    let up = matches!(
        tokio::time::timeout(timeout, crate::db::ping(pool, settings)).await,
        Ok(Ok(()))
    );
    metrics::gauge!("pushfleet_postgres_up", "service" => service).set(if up { 1.0 } else { 0.0 });
    up
}

/// The Prometheus text of `handle`, with the process figures read just before.
pub fn render_metrics(handle: &PrometheusHandle) -> String {
    record_process_metrics();
    handle.render()
}

/// Memory, CPU and descriptors from /proc (Linux); elsewhere nothing is recorded.
fn record_process_metrics() {
    if let Ok(status) = std::fs::read_to_string("/proc/self/status") {
        let rss_kb = status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok());
        if let Some(kb) = rss_kb {
            metrics::gauge!("process_resident_memory_bytes").set(kb * 1024.0);
        }
    }
    if let Ok(stat) = std::fs::read_to_string("/proc/self/stat") {
        if let Some(seconds) = cpu_seconds(&stat) {
            metrics::gauge!("process_cpu_seconds_total").set(seconds);
        }
    }
    if let Ok(fds) = std::fs::read_dir("/proc/self/fd") {
        metrics::gauge!("process_open_fds").set(fds.count() as f64);
    }
}

/// utime + stime of a `/proc/<pid>/stat` line, in seconds. Fields are counted after the
/// command name, which may hold spaces; the kernel reports them in USER_HZ, 100 on Linux.
fn cpu_seconds(stat: &str) -> Option<f64> {
    let rest = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let utime: f64 = fields.get(11)?.parse().ok()?;
    let stime: f64 = fields.get(12)?.parse().ok()?;
    Some((utime + stime) / 100.0)
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
    fn cpu_time_from_proc_stat() {
        let stat = "42 (a (b) c) S 1 42 42 0 -1 4194560 100 0 0 0 250 50 0 0 20 0 1 0 10 0 0";
        assert_eq!(cpu_seconds(stat), Some(3.0));
        assert_eq!(cpu_seconds("garbage"), None);
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
