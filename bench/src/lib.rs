//! Shared pieces of pushfleet's benchmark tools: command-line parsing, percentiles, the
//! `key=value` report that `ops/bench` reads, and the per-process resource figures from /proc.

use std::collections::BTreeMap;
use std::fmt::Display;
use std::future::Future;
use std::process::ExitCode;

use anyhow::{bail, Context, Result};

/// Minimal `--flag value` parsing: the tools take a handful of numeric and string options.
pub struct Args {
    usage: &'static str,
    values: BTreeMap<String, String>,
}

impl Args {
    /// Parses `std::env::args()` against the known flags (each takes one value); `--help` prints
    /// the usage and exits.
    pub fn parse(usage: &'static str, known: &[&str]) -> Result<Args> {
        let mut values = BTreeMap::new();
        let mut args = std::env::args().skip(1);
        while let Some(flag) = args.next() {
            if flag == "-h" || flag == "--help" {
                println!("{usage}");
                std::process::exit(0);
            }
            let Some(name) = flag.strip_prefix("--").filter(|n| known.contains(n)) else {
                bail!("unknown argument {flag}\n{usage}");
            };
            let value = args
                .next()
                .with_context(|| format!("{flag} needs a value\n{usage}"))?;
            values.insert(name.to_string(), value);
        }
        Ok(Args { usage, values })
    }

    pub fn string(&self, name: &str, default: &str) -> String {
        self.values
            .get(name)
            .cloned()
            .unwrap_or_else(|| default.to_string())
    }

    pub fn required(&self, name: &str) -> Result<String> {
        self.values
            .get(name)
            .cloned()
            .with_context(|| format!("--{name} is required\n{}", self.usage))
    }

    pub fn number<T: std::str::FromStr>(&self, name: &str, default: T) -> Result<T> {
        match self.values.get(name) {
            None => Ok(default),
            Some(v) => v
                .parse()
                .map_err(|_| anyhow::anyhow!("--{name}: not a number: {v}")),
        }
    }
}

/// A tool's `main`: parses its options (exit 2 on a bad one), runs it on a two-thread runtime —
/// the machine is shared with everything being measured — and reports a failure in one line.
pub fn main_of<P, Fut>(
    name: &str,
    parse: impl FnOnce() -> Result<P>,
    run: impl FnOnce(P) -> Fut,
) -> ExitCode
where
    Fut: Future<Output = Result<()>>,
{
    let plan = match parse() {
        Ok(p) => p,
        Err(e) => {
            eprintln!("{name}: {e:#}");
            return ExitCode::from(2);
        }
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime");
    match runtime.block_on(run(plan)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("{name}: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// The value at quantile `q` (0..=1) of sorted `values`, nearest-rank; 0 when empty.
pub fn quantile(sorted: &[u32], q: f64) -> u32 {
    if sorted.is_empty() {
        return 0;
    }
    let rank = (q * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// One `key=value` line of the machine-readable report on stdout.
pub fn report(key: &str, value: impl Display) {
    println!("{key}={value}");
}

/// CPU seconds (user + system) and peak resident set (kB) of a process, from /proc.
pub fn process_usage(pid: &str) -> Option<(f64, u64)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name, which is in parentheses and may hold spaces.
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of the whole line: 12 and 13 after the name.
    let ticks: u64 = fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let hwm_kb = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0);
    // USER_HZ is 100 on every Linux platform this runs on.
    Some((ticks as f64 / 100.0, hwm_kb))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_rank_quantiles() {
        let v: Vec<u32> = (1..=100).collect();
        assert_eq!(quantile(&v, 0.5), 50);
        assert_eq!(quantile(&v, 0.99), 99);
        assert_eq!(quantile(&v, 1.0), 100);
        assert_eq!(quantile(&[7], 0.99), 7);
        assert_eq!(quantile(&[], 0.5), 0);
    }

    #[test]
    fn own_usage_is_readable() {
        let (cpu, hwm) = process_usage("self").expect("/proc/self");
        assert!(cpu >= 0.0);
        assert!(hwm > 0);
    }
}
