//! `pushfleet reload`: makes running `pushfleet-ingest` and `pushfleet-worker` processes re-read
//! their configuration, by sending them SIGHUP (what `systemctl reload` does for the units).
//! Processes are found by their program name in `/proc`; `--service` narrows to one binary,
//! `--config FILE` to the processes started with that file, `--pid` names one process.

use std::io::Write;
use std::path::{Path, PathBuf};

use crate::args::{Args, Error};
use crate::OK;

const SERVICES: [&str; 2] = ["pushfleet-ingest", "pushfleet-worker"];

/// A running service process.
#[derive(Debug, PartialEq)]
struct Running {
    pid: u32,
    binary: &'static str,
    /// Its `--config` argument, made absolute against its working directory.
    config: Option<PathBuf>,
}

pub fn run(args: &Args, out: &mut dyn Write) -> Result<i32, Error> {
    let wanted: Vec<&str> = match args.get("service") {
        None | Some("all") => SERVICES.to_vec(),
        Some("ingest") => vec![SERVICES[0]],
        Some("worker") => vec![SERVICES[1]],
        Some(other) => {
            return Err(Error::Usage(format!(
                "--service {other:?}: expected ingest, worker or all"
            )))
        }
    };
    let config = args.get("config").map(absolute);
    let pid = match args.get("pid") {
        Some(pid) => Some(
            pid.parse::<u32>()
                .map_err(|_| Error::Usage(format!("--pid {pid:?}: not a process id")))?,
        ),
        None => None,
    };
    let targets: Vec<Running> = running()
        .into_iter()
        .filter(|p| wanted.contains(&p.binary))
        .filter(|p| pid.is_none_or(|pid| p.pid == pid))
        .filter(|p| config.is_none() || p.config == config)
        .collect();
    if targets.is_empty() {
        return Err(Error::Failed(
            "no running pushfleet-ingest or pushfleet-worker matches".into(),
        ));
    }
    for target in &targets {
        let sent = std::process::Command::new("kill")
            .args(["-HUP", &target.pid.to_string()])
            .status()
            .map_err(|e| Error::Failed(format!("cannot run kill: {e}")))?;
        if !sent.success() {
            return Err(Error::Failed(format!(
                "cannot signal {} (pid {}): not allowed?",
                target.binary, target.pid
            )));
        }
        let _ = writeln!(
            out,
            "sent SIGHUP to {} (pid {}): it reloads its configuration; the log says what changed",
            target.binary, target.pid
        );
    }
    Ok(OK)
}

fn absolute(path: &str) -> PathBuf {
    let path = Path::new(path);
    let joined = std::env::current_dir()
        .map(|cwd| cwd.join(path))
        .unwrap_or_else(|_| path.to_path_buf());
    joined.canonicalize().unwrap_or(joined)
}

/// Every service process this user can see.
fn running() -> Vec<Running> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .filter_map(Result::ok)
        .filter_map(|entry| {
            let pid: u32 = entry.file_name().to_str()?.parse().ok()?;
            let cmdline = std::fs::read(entry.path().join("cmdline")).ok()?;
            let cwd = std::fs::read_link(entry.path().join("cwd")).ok();
            service_of(pid, &cmdline, cwd.as_deref())
        })
        .collect()
}

/// The service a `/proc/<pid>/cmdline` runs; not `migrate`, which ends by itself.
fn service_of(pid: u32, cmdline: &[u8], cwd: Option<&Path>) -> Option<Running> {
    let args: Vec<&str> = cmdline
        .split(|b| *b == 0)
        .filter(|a| !a.is_empty())
        .map(|a| std::str::from_utf8(a).unwrap_or(""))
        .collect();
    let program = Path::new(args.first()?).file_name()?.to_str()?;
    let binary = SERVICES.into_iter().find(|s| *s == program)?;
    if args.contains(&"migrate") {
        return None;
    }
    let config = args.iter().enumerate().find_map(|(i, arg)| match *arg {
        "--config" | "-c" => args.get(i + 1).copied(),
        other => other.strip_prefix("--config="),
    });
    let config = config.map(|c| {
        let path = cwd.map_or_else(|| PathBuf::from(c), |cwd| cwd.join(c));
        path.canonicalize().unwrap_or(path)
    });
    Some(Running {
        pid,
        binary,
        config,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn services_are_told_from_their_command_lines() {
        let worker = service_of(
            7,
            b"/usr/bin/pushfleet-worker\0--config\0etc/p.toml\0",
            Some(Path::new("/srv")),
        );
        assert_eq!(
            worker,
            Some(Running {
                pid: 7,
                binary: "pushfleet-worker",
                config: Some(PathBuf::from("/srv/etc/p.toml")),
            })
        );
        let ingest = service_of(8, b"pushfleet-ingest\0--config=/etc/p.toml\0", None).unwrap();
        assert_eq!(ingest.config, Some(PathBuf::from("/etc/p.toml")));
        assert_eq!(
            service_of(9, b"pushfleet-worker\0--config\0p.toml\0migrate\0", None),
            None
        );
        assert_eq!(service_of(10, b"bash\0-c\0pushfleet-worker\0", None), None);
        assert_eq!(service_of(11, b"", None), None);
    }
}
