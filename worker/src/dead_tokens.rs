//! Tokens providers declared dead, kept in memory so that no push is sent to them. The list is
//! `invalid_tokens` in Postgres, reloaded periodically (other workers add to it, a new
//! registration removes from it) and added to at once when this worker learns of a dead token.

use std::collections::{HashMap, HashSet};
use std::sync::RwLock;
use std::time::Duration;

use deadpool_postgres::Pool;
use pushfleet_core::config::Platform;
use pushfleet_core::job::token_digest;
use tokio::sync::watch;
use tracing::{debug, info};

type Digest = [u8; 32];

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
    pub async fn reload(&self, pool: &Pool) -> Result<usize, String> {
        let client = pool.get().await.map_err(|e| e.to_string())?;
        let rows = client
            .query(
                "SELECT app_id, platform, token_hash FROM invalid_tokens",
                &[],
            )
            .await
            .map_err(|e| e.to_string())?;
        let mut by_app = ByApp::new();
        for row in &rows {
            let app_id: String = row.get(0);
            let platform: String = row.get(1);
            let hash: String = row.get(2);
            let (Some(platform), Some(digest)) = (Platform::from_alias(&platform), unhex(&hash))
            else {
                continue;
            };
            by_app
                .entry(platform)
                .or_default()
                .entry(app_id)
                .or_default()
                .insert(digest);
        }
        *self.by_app.write().expect("dead tokens lock") = by_app;
        Ok(rows.len())
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

fn unhex(text: &str) -> Option<Digest> {
    let mut digest = [0u8; 32];
    if text.len() != 64 {
        return None;
    }
    for (i, byte) in digest.iter_mut().enumerate() {
        *byte = u8::from_str_radix(text.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(digest)
}

#[cfg(test)]
mod tests {
    use super::*;
    use pushfleet_core::job::token_hash;

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

    #[test]
    fn database_hashes_decode() {
        assert_eq!(unhex(&token_hash("tok")), Some(token_digest("tok")));
        assert_eq!(unhex("zz"), None);
    }
}
