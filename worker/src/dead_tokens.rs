//! Tokens providers declared dead, kept in memory so that no push is sent to them. The list is
//! `invalid_tokens` in Postgres, reloaded periodically (other workers add to it, a new
//! registration removes from it) and added to at once when this worker learns of a dead token.

use std::collections::{HashMap, HashSet};
use std::sync::RwLock;
use std::time::Duration;

use deadpool_postgres::Pool;
use pushfleet_core::config::Platform;
use pushfleet_core::db::DbError;
use pushfleet_core::tokens::{self, token_digest, FingerprintBytes};
use tokio::sync::watch;
use tracing::{debug, info};

type Digest = FingerprintBytes;

/// Platform → app id → token digests: looked up by `&str`, without allocating per push.
type ByApp = HashMap<Platform, HashMap<String, HashSet<Digest>>>;

#[derive(Default)]
pub struct DeadTokens {
    by_app: RwLock<ByApp>,
}

impl DeadTokens {
    pub fn contains(&self, app_id: &str, platform: Platform, token: &str) -> bool {
        let by_app = self.by_app.read().expect("dead tokens lock");
        // Most apps have no dead token listed: no hashing on the hot path then.
        match by_app.get(&platform).and_then(|apps| apps.get(app_id)) {
            Some(set) if !set.is_empty() => set.contains(&token_digest(token)),
            _ => false,
        }
    }

    pub fn insert(&self, app_id: &str, platform: Platform, token: &str) {
        self.by_app
            .write()
            .expect("dead tokens lock")
            .entry(platform)
            .or_default()
            .entry(app_id.to_string())
            .or_default()
            .insert(token_digest(token));
    }

    /// Replaces the list with the database's.
    pub async fn reload(&self, pool: &Pool) -> Result<usize, DbError> {
        let listed = tokens::dead_tokens(&**pool.get().await?).await?;
        let count = listed.len();
        let mut by_app = ByApp::new();
        for dead in listed {
            by_app
                .entry(dead.platform)
                .or_default()
                .entry(dead.app_id)
                .or_default()
                .insert(dead.digest);
        }
        *self.by_app.write().expect("dead tokens lock") = by_app;
        Ok(count)
    }

    /// Reloads every `every` until shutdown. While Postgres is away the last list stays in use.
    pub async fn keep_loaded(
        &self,
        pool: Pool,
        every: Duration,
        mut shutdown: watch::Receiver<bool>,
    ) {
        let mut first = true;
        loop {
            match self.reload(&pool).await {
                Ok(count) if first => info!(count, "dead tokens loaded"),
                Ok(_) => {}
                Err(e) => debug!(error = %e, "dead tokens not reloaded"),
            }
            first = false;
            tokio::select! {
                _ = tokio::time::sleep(every) => {}
                _ = shutdown.changed() => return,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listed_tokens_are_found_per_app() {
        let dead = DeadTokens::default();
        assert!(!dead.contains("a", Platform::Apple, "tok"));
        dead.insert("a", Platform::Apple, "tok");
        assert!(dead.contains("a", Platform::Apple, "tok"));
        assert!(!dead.contains("a", Platform::Firebase, "tok"));
        assert!(!dead.contains("b", Platform::Apple, "tok"));
        assert!(!dead.contains("a", Platform::Apple, "other"));
    }
}
