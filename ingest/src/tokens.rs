//! Device tokens in Postgres (`device_tokens`): what the v2 token API and the import read and
//! write. Registering a token makes it alive again: its invalidation is cleared and its
//! `invalid_tokens` entry (kept by the workers after a 410-class answer) is removed.

use pushfleet_core::config::Platform;
use pushfleet_core::job::token_fingerprint;
use serde_json::{json, Value};
use std::time::SystemTime;

use tokio_postgres::GenericClient;
use tokio_postgres::Row;

/// A token to register under an account.
#[derive(Debug, Clone, PartialEq)]
pub struct NewToken {
    pub account: String,
    pub app_id: String,
    pub platform: Platform,
    pub device_id: String,
    pub token: String,
    pub background_token: Option<String>,
    pub silent: bool,
    pub user_agent: Option<String>,
}

impl NewToken {
    /// Sylk's Apple "voip-background" pair: the part before the first `-` is the VoIP token,
    /// the rest the background token (used for `cancel` and `message`). Firebase tokens are
    /// kept whole.
    pub fn split_token(platform: Platform, token: &str) -> (String, Option<String>) {
        match (platform, token.split_once('-')) {
            (Platform::Apple, Some((voip, background))) => (
                voip.to_string(),
                Some(background.to_string()).filter(|b| !b.is_empty()),
            ),
            _ => (token.to_string(), None),
        }
    }
}

/// What a registration did to the stored row.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Registered {
    Inserted,
    Updated,
    /// Only when not forced: the row already held exactly these values.
    Unchanged,
}

/// One stored device of an account.
#[derive(Debug, Clone)]
pub struct StoredToken {
    pub app_id: String,
    pub platform: String,
    pub device_id: String,
    pub token: String,
    pub background_token: Option<String>,
    pub silent: bool,
    pub user_agent: Option<String>,
    pub created_at: String,
    pub updated_at: String,
    pub invalidated_at: Option<String>,
    pub invalid_reason: Option<String>,
}

impl StoredToken {
    fn from_row(row: &Row) -> StoredToken {
        StoredToken {
            app_id: row.get("app_id"),
            platform: row.get("platform"),
            device_id: row.get("device_id"),
            token: row.get("token"),
            background_token: row.get("background_token"),
            silent: row.get("silent"),
            user_agent: row.get("user_agent"),
            created_at: row.get("created_at"),
            updated_at: row.get("updated_at"),
            invalidated_at: row.get("invalidated_at"),
            invalid_reason: row.get("invalid_reason"),
        }
    }

    /// The listing form: tokens only as fingerprints.
    pub fn redacted(&self) -> Value {
        json!({
            "app-id": self.app_id,
            "platform": self.platform,
            "device-id": self.device_id,
            "token_fingerprint": token_fingerprint(&self.token),
            "background_token_fingerprint": self.background_token.as_deref().map(token_fingerprint),
            "silent": self.silent,
            "user-agent": self.user_agent,
            "created_at": self.created_at,
            "updated_at": self.updated_at,
            "invalidated_at": self.invalidated_at,
            "invalid_reason": self.invalid_reason,
        })
    }
}

const SELECT_TOKENS: &str =
    "SELECT app_id, platform, device_id, token, background_token, silent, user_agent,
        to_json(created_at) #>> '{}' AS created_at, to_json(updated_at) #>> '{}' AS updated_at,
        to_json(invalidated_at) #>> '{}' AS invalidated_at, invalid_reason
   FROM device_tokens WHERE account = $1 ORDER BY created_at, id";

/// Upserts on (account, app_id, device_id). `force` rewrites the row even when nothing changed
/// (the API: a registration is also a sign of life); without it an identical row is left alone
/// (the import: running it twice changes nothing).
pub async fn register(
    client: &impl GenericClient,
    token: &NewToken,
    force: bool,
) -> Result<Registered, tokio_postgres::Error> {
    let row = client
        .query_opt(
            "WITH up AS (
                 INSERT INTO device_tokens AS d
                        (account, app_id, device_id, platform, token, background_token, silent, user_agent)
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8)
                 ON CONFLICT (account, app_id, device_id) DO UPDATE
                    SET platform = EXCLUDED.platform, token = EXCLUDED.token,
                        background_token = EXCLUDED.background_token, silent = EXCLUDED.silent,
                        user_agent = EXCLUDED.user_agent, updated_at = now(),
                        invalidated_at = NULL, invalid_reason = NULL
                  WHERE $9 OR (d.platform, d.token, d.background_token, d.silent, d.user_agent)
                        IS DISTINCT FROM (EXCLUDED.platform, EXCLUDED.token,
                        EXCLUDED.background_token, EXCLUDED.silent, EXCLUDED.user_agent)
                 RETURNING (xmax = 0) AS inserted
             ), revived AS (
                 DELETE FROM invalid_tokens
                  WHERE EXISTS (SELECT 1 FROM up) AND app_id = $2 AND platform = $4
                    AND token_hash IN (encode(sha256(convert_to($5, 'UTF8')), 'hex'),
                                       encode(sha256(convert_to(coalesce($6, ''), 'UTF8')), 'hex'))
             )
             SELECT inserted FROM up",
            &[
                &token.account,
                &token.app_id,
                &token.device_id,
                &token.platform.as_str(),
                &token.token,
                &token.background_token,
                &token.silent,
                &token.user_agent,
                &force,
            ],
        )
        .await?;
    Ok(match row {
        Some(row) if row.get::<_, bool>(0) => Registered::Inserted,
        Some(_) => Registered::Updated,
        None => Registered::Unchanged,
    })
}

/// Removes the device (or, without one, every device of the app) from the account; returns how
/// many rows went.
pub async fn remove(
    client: &impl GenericClient,
    account: &str,
    app_id: &str,
    device_id: Option<&str>,
) -> Result<u64, tokio_postgres::Error> {
    client
        .execute(
            "DELETE FROM device_tokens
              WHERE account = $1 AND app_id = $2 AND ($3::text IS NULL OR device_id = $3)",
            &[&account, &app_id, &device_id],
        )
        .await
}

pub async fn account_exists(
    client: &impl GenericClient,
    account: &str,
) -> Result<bool, tokio_postgres::Error> {
    let row = client
        .query_one(
            "SELECT EXISTS (SELECT 1 FROM device_tokens WHERE account = $1)",
            &[&account],
        )
        .await?;
    Ok(row.get(0))
}

/// Every device of the account, oldest registration first.
pub async fn list(
    client: &impl GenericClient,
    account: &str,
) -> Result<Vec<StoredToken>, tokio_postgres::Error> {
    Ok(client
        .query(SELECT_TOKENS, &[&account])
        .await?
        .iter()
        .map(StoredToken::from_row)
        .collect())
}

/// A device whose token a provider declared dead.
pub struct DeadToken<'a> {
    pub account: &'a str,
    pub app_id: &'a str,
    pub device_id: &'a str,
    pub token: &'a str,
    pub reason: &'a str,
    /// APNs 410: when the token stopped being valid; a registration after it keeps it alive.
    pub since: Option<SystemTime>,
}

/// Marks a device's token dead after a 410-class answer, as the worker's audit sink does (this
/// makes it visible to the very next push); a later registration makes it alive again.
pub async fn mark_invalid(
    client: &impl GenericClient,
    dead: &DeadToken<'_>,
) -> Result<u64, tokio_postgres::Error> {
    client
        .execute(
            "UPDATE device_tokens SET invalidated_at = now(), invalid_reason = $5
              WHERE account = $1 AND app_id = $2 AND device_id = $3
                AND (token = $4 OR background_token = $4) AND invalidated_at IS NULL
                AND ($6::timestamptz IS NULL OR updated_at < $6)",
            &[
                &dead.account,
                &dead.app_id,
                &dead.device_id,
                &dead.token,
                &dead.reason,
                &dead.since,
            ],
        )
        .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn apple_pairs_split_at_the_first_dash() {
        assert_eq!(
            NewToken::split_token(Platform::Apple, "voip-back-ground"),
            ("voip".to_string(), Some("back-ground".to_string()))
        );
        assert_eq!(
            NewToken::split_token(Platform::Apple, "abc"),
            ("abc".to_string(), None)
        );
        assert_eq!(
            NewToken::split_token(Platform::Firebase, "fcm-1:APA"),
            ("fcm-1:APA".to_string(), None)
        );
    }
}
