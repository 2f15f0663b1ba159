//! Re-reading the configuration of a running process (SIGHUP, `pushfleet reload`): the new file
//! is loaded and validated as at start-up; a file that does not load is refused, logged and
//! counted, and the configuration in force stays. Each binary then applies what it can change
//! while running; settings read only at start-up are logged as needing a restart.

use std::path::Path;
use std::time::SystemTime;

use tracing::{error, info, warn};

use std::fmt;

use crate::config::{AppSettings, Settings};

/// The settings in `path`, or `None` (logged and counted) when they cannot be used.
pub fn reread(path: &Path, current: &Settings) -> Option<Settings> {
    match Settings::load(path) {
        Ok(new) => {
            for key in current.changes_needing_restart(&new) {
                warn!(
                    key,
                    "configuration reload: this setting changed but only takes effect after a restart"
                );
            }
            Some(new)
        }
        Err(e) => {
            refused(&e);
            None
        }
    }
}

/// A reload that cannot be applied: logged once, counted, the previous configuration kept.
pub fn refused(reason: &dyn std::error::Error) {
    error!(
        error = %reason,
        "configuration reload refused; the previous configuration stays in force"
    );
    count_failure();
}

/// Counts a reload that failed in part, logged by the part that failed.
pub fn count_failure() {
    metrics::counter!("pushfleet_config_reload_failures_total").increment(1);
}

/// A reload that took effect.
pub fn applied(what: &str) {
    info!(changes = what, "configuration reloaded");
    metrics::counter!("pushfleet_config_reloads_total").increment(1);
}

/// When a file last changed (and its length, as mtimes can be coarse); `None` when it cannot
/// be read, which is a change too once it comes back.
pub type FileStamp = Option<(SystemTime, u64)>;

pub fn stamp(path: &Path) -> FileStamp {
    let meta = std::fs::metadata(path).ok()?;
    Some((meta.modified().ok()?, meta.len()))
}

/// Resolves at each SIGHUP; never on other platforms.
pub struct Hangups {
    #[cfg(unix)]
    signal: tokio::signal::unix::Signal,
}

impl Hangups {
    /// Installs the handler: from now on SIGHUP no longer ends the process.
    pub fn install() -> std::io::Result<Hangups> {
        Ok(Hangups {
            #[cfg(unix)]
            signal: tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())?,
        })
    }

    pub async fn next(&mut self) {
        #[cfg(unix)]
        if self.signal.recv().await.is_some() {
            return;
        }
        std::future::pending::<()>().await
    }
}

/// What a reload changed among the apps, each named `<platform> <id>`.
#[derive(Debug, Default, PartialEq)]
pub struct AppChanges {
    pub added: Vec<String>,
    pub removed: Vec<String>,
    pub changed: Vec<String>,
}

impl AppChanges {
    /// The apps of `new` that `old` lacks or configures otherwise, and those it drops.
    pub fn between(old: &[AppSettings], new: &[AppSettings]) -> AppChanges {
        let find = |apps: &'_ [AppSettings], app: &AppSettings| {
            apps.iter()
                .find(|a| a.id == app.id && a.platform == app.platform)
                .cloned()
        };
        let mut changes = AppChanges::default();
        for app in new {
            match find(old, app) {
                None => changes.added.push(label(app)),
                Some(before) if before != *app => changes.changed.push(label(app)),
                Some(_) => {}
            }
        }
        changes.removed = old
            .iter()
            .filter(|app| find(new, app).is_none())
            .map(label)
            .collect();
        changes
    }
}

pub fn label(app: &AppSettings) -> String {
    format!("{} {}", app.platform, app.id)
}

impl fmt::Display for AppChanges {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let described: Vec<String> = [
            ("added", &self.added),
            ("removed", &self.removed),
            ("changed", &self.changed),
        ]
        .iter()
        .filter(|(_, apps)| !apps.is_empty())
        .map(|(what, apps)| format!("{what}: {}", apps.join(", ")))
        .collect();
        if described.is_empty() {
            f.write_str("no app changed")
        } else {
            f.write_str(&described.join("; "))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn app(id: &str, endpoint: &str) -> AppSettings {
        let text = format!(
            "[[apps]]\nid = \"{id}\"\nplatform = \"firebase\"\ntype = \"sylk\"\n\
             fcm = {{ service_account_file = \"Cargo.toml\", endpoint = \"{endpoint}\" }}\n"
        );
        let base = Path::new(env!("CARGO_MANIFEST_DIR"));
        let settings = Settings::from_toml(&text, [], base).unwrap();
        settings.apps[0].clone()
    }

    #[test]
    fn app_changes_name_what_was_added_removed_and_changed() {
        let old = [app("a", "https://a"), app("b", "https://b")];
        let new = [app("b", "https://b2"), app("c", "https://c")];
        let changes = AppChanges::between(&old, &new);
        assert_eq!(
            changes.to_string(),
            "added: firebase c; removed: firebase a; changed: firebase b"
        );
        assert_eq!(
            AppChanges::between(&old, &old).to_string(),
            "no app changed"
        );
    }
}
