//! The token store: device tokens registered per account (`device_tokens`) and the list of
//! tokens providers declared dead (`invalid_tokens`). Ingest registers, lists and removes tokens
//! for the v2 API, the import registers them in bulk, and a provider's verdict that a token is
//! gone reaches both tables through [`invalidate`], from the audit sink and from ingest's v2
//! answers. Registering a token makes it alive again: its invalidation is cleared and its
//! `invalid_tokens` entry removed.
//!
//! Audit rows and listings never hold a raw token: [`token_fingerprint`] identifies one.

use std::time::SystemTime;

use serde_json::{json, Value};
use tokio_postgres::{GenericClient, Row};

use crate::config::Platform;
use crate::db::DbError;
use crate::job::WebPushKeys;

/// The bytes a token's fingerprint is made of: the first 8 bytes of its SHA-256.
pub type FingerprintBytes = [u8; 8];

/// The first 8 bytes of the SHA-256 of a token.
pub fn token_digest(token: &str) -> FingerprintBytes {
    let mut bytes = [0u8; 8];
    bytes.copy_from_slice(
        &ring::digest::digest(&ring::digest::SHA256, token.as_bytes()).as_ref()[..8],
    );
    bytes
}

/// The one form in which pushfleet keeps a token it must not keep whole: the first 16 hex
/// digits of its SHA-256, in `deliveries`, `invalid_tokens`, listings and logs alike, so that
/// an auditor who has a token finds every row of it.
pub fn token_fingerprint(token: &str) -> String {
    hex(&token_digest(token))
}

/// Lower-case hex, written into one string: fingerprints are taken on every push.
fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut text = String::with_capacity(bytes.len() * 2);
    for byte in bytes {
        text.push(char::from(DIGITS[usize::from(byte >> 4)]));
        text.push(char::from(DIGITS[usize::from(byte & 0xf)]));
    }
    text
}

fn unhex(text: &str) -> Option<FingerprintBytes> {
    let mut digest = [0u8; 8];
    if text.len() != 16 {
        return None;
    }
    for (i, byte) in digest.iter_mut().enumerate() {
        *byte = u8::from_str_radix(text.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(digest)
}

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
    /// What a registration through RFC 8599 parameters adds.
    pub extras: RegistrationExtras,
    /// unifiedpush: the subscription's encryption keys, when it has them.
    pub webpush_keys: Option<WebPushKeys>,
}

/// A device's registration beyond its tokens: whether it has a VoIP token at all, its
/// per-contact push options, and when its SIP registration expires.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RegistrationExtras {
    pub remote_only: bool,
    /// `{"pn-call-str": "...", "pn-timeout": "5", ...}`, as the Contact gave them.
    pub push_options: Option<Value>,
    /// Epoch seconds.
    pub registration_expires_at: Option<f64>,
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
    pub remote_only: bool,
    pub push_options: Option<Value>,
    pub registration_expires_at: Option<String>,
    pub webpush_keys: Option<WebPushKeys>,
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
            remote_only: row.get("remote_only"),
            push_options: row.get("push_options"),
            registration_expires_at: row.get("registration_expires_at"),
            webpush_keys: match (row.get("p256dh"), row.get("auth")) {
                (Some(p256dh), Some(auth)) => Some(WebPushKeys { p256dh, auth }),
                _ => None,
            },
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
            "remote_only": self.remote_only,
            "push_options": self.push_options,
            "registration_expires_at": self.registration_expires_at,
        })
    }
}

const SELECT_TOKENS: &str =
    "SELECT app_id, platform, device_id, token, background_token, silent, user_agent,
        to_json(created_at) #>> '{}' AS created_at, to_json(updated_at) #>> '{}' AS updated_at,
        to_json(invalidated_at) #>> '{}' AS invalidated_at, invalid_reason, remote_only,
        push_options, to_json(registration_expires_at) #>> '{}' AS registration_expires_at, p256dh, auth
   FROM device_tokens WHERE account = $1 ORDER BY created_at, id";

/// Upserts on (account, app_id, device_id). `force` rewrites the row even when nothing changed
/// (the API: a registration is also a sign of life); without it an identical row is left alone
/// (the import: running it twice changes nothing).
pub async fn register(
    client: &impl GenericClient,
    token: &NewToken,
    force: bool,
) -> Result<Registered, DbError> {
    let row = client
        .query_opt(
            "WITH up AS (
                 INSERT INTO device_tokens AS d
                        (account, app_id, device_id, platform, token, background_token, silent,
                         user_agent, remote_only, push_options, registration_expires_at, p256dh, auth)
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $10, $11, to_timestamp($12::float8),
                         $13, $14)
                 ON CONFLICT (account, app_id, device_id) DO UPDATE
                    SET platform = EXCLUDED.platform, token = EXCLUDED.token,
                        background_token = EXCLUDED.background_token, silent = EXCLUDED.silent,
                        user_agent = EXCLUDED.user_agent, remote_only = EXCLUDED.remote_only,
                        push_options = EXCLUDED.push_options,
                        registration_expires_at = EXCLUDED.registration_expires_at,
                        p256dh = EXCLUDED.p256dh, auth = EXCLUDED.auth,
                        updated_at = now(), invalidated_at = NULL, invalid_reason = NULL
                  WHERE $9 OR (d.platform, d.token, d.background_token, d.silent, d.user_agent,
                               d.remote_only, d.push_options, d.registration_expires_at,
                               d.p256dh, d.auth)
                        IS DISTINCT FROM (EXCLUDED.platform, EXCLUDED.token,
                        EXCLUDED.background_token, EXCLUDED.silent, EXCLUDED.user_agent,
                        EXCLUDED.remote_only, EXCLUDED.push_options,
                        EXCLUDED.registration_expires_at, EXCLUDED.p256dh, EXCLUDED.auth)
                 RETURNING (xmax = 0) AS inserted
             ), revived AS (
                 DELETE FROM invalid_tokens
                  WHERE EXISTS (SELECT 1 FROM up) AND app_id = $2 AND platform = $4
                    AND token_fingerprint IN (
                        left(encode(sha256(convert_to($5, 'UTF8')), 'hex'), 16),
                        left(encode(sha256(convert_to(coalesce($6, ''), 'UTF8')), 'hex'), 16))
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
                &token.extras.remote_only,
                &token.extras.push_options,
                &token.extras.registration_expires_at,
                &token.webpush_keys.as_ref().map(|k| k.p256dh.as_str()),
                &token.webpush_keys.as_ref().map(|k| k.auth.as_str()),
            ],
        )
        .await
        .map_err(DbError::query("device_tokens"))?;
    Ok(match row {
        Some(row) if row.get::<_, bool>(0) => Registered::Inserted,
        Some(_) => Registered::Updated,
        None => Registered::Unchanged,
    })
}

/// Why [`register_within`] did not register.
#[derive(Debug, thiserror::Error)]
pub enum RegisterError {
    /// A new device for an account that already holds `limit`.
    #[error("the account already has {limit} devices")]
    AccountFull { limit: usize },
    #[error(transparent)]
    Db(#[from] DbError),
}

/// [`register`] (forced, as the API registers) for an account that may hold at most
/// `max_devices` devices. A device the account already has (same app and device id) is always
/// updated, even when the account holds more than the limit (a lowered limit, an import); a new
/// one beyond the limit is refused. Dead devices count until they are removed.
///
/// With `apps` (a tenant's API key) only the devices of those apps count, so that one tenant
/// cannot fill an account name another tenant uses.
///
/// Registrations for one account are serialised by a transaction-scoped advisory lock: without
/// it two concurrent registrations could both count the last free place and both take it.
pub async fn register_within(
    client: &mut impl GenericClient,
    token: &NewToken,
    max_devices: usize,
    apps: Option<&[String]>,
) -> Result<Registered, RegisterError> {
    let tx = client
        .transaction()
        .await
        .map_err(DbError::query("device_tokens"))?;
    // Its own statement: a count in the same statement would read a snapshot taken before the
    // lock was granted.
    tx.execute(
        "SELECT pg_advisory_xact_lock(hashtext('pushfleet_device_tokens'), hashtext($1))",
        &[&token.account],
    )
    .await
    .map_err(DbError::query("device_tokens lock"))?;
    let row = tx
        .query_one(
            "SELECT count(*), count(*) FILTER (WHERE app_id = $2 AND device_id = $3) > 0
               FROM device_tokens
              WHERE account = $1 AND ($4::text[] IS NULL OR app_id = ANY($4))",
            &[&token.account, &token.app_id, &token.device_id, &apps],
        )
        .await
        .map_err(DbError::query("device_tokens"))?;
    let (devices, known): (i64, bool) = (row.get(0), row.get(1));
    if !known && usize::try_from(devices).unwrap_or(usize::MAX) >= max_devices {
        tx.rollback()
            .await
            .map_err(DbError::query("device_tokens"))?;
        return Err(RegisterError::AccountFull { limit: max_devices });
    }
    let registered = register(&tx, token, true).await?;
    tx.commit().await.map_err(DbError::query("device_tokens"))?;
    Ok(registered)
}

/// Removes the device (or, without one, every device of the app) from the account; returns how
/// many rows went.
pub async fn remove(
    client: &impl GenericClient,
    account: &str,
    app_id: &str,
    device_id: Option<&str>,
) -> Result<u64, DbError> {
    client
        .execute(
            "DELETE FROM device_tokens
              WHERE account = $1 AND app_id = $2 AND ($3::text IS NULL OR device_id = $3)",
            &[&account, &app_id, &device_id],
        )
        .await
        .map_err(DbError::query("device_tokens"))
}

pub async fn account_exists(client: &impl GenericClient, account: &str) -> Result<bool, DbError> {
    let row = client
        .query_one(
            "SELECT EXISTS (SELECT 1 FROM device_tokens WHERE account = $1)",
            &[&account],
        )
        .await
        .map_err(DbError::query("device_tokens"))?;
    Ok(row.get(0))
}

/// Every device of the account, oldest registration first.
pub async fn list(client: &impl GenericClient, account: &str) -> Result<Vec<StoredToken>, DbError> {
    Ok(client
        .query(SELECT_TOKENS, &[&account])
        .await
        .map_err(DbError::query("device_tokens"))?
        .iter()
        .map(StoredToken::from_row)
        .collect())
}

/// A provider's verdict that a token is gone.
pub struct Invalidation<'a> {
    pub app_id: &'a str,
    pub platform: Platform,
    pub token: &'a str,
    pub reason: &'a str,
    /// APNs 410: when the token stopped being valid; a registration after it keeps it alive.
    pub since: Option<SystemTime>,
}

/// What [`invalidate`] changed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Invalidated {
    /// Registrations marked dead.
    pub registrations: u64,
    /// Whether the token is now on the dead-token list.
    pub listed: bool,
}

/// Marks a token dead: its registrations in `device_tokens`, and the `invalid_tokens` list
/// workers check before sending. Idempotent. A token registered again after the provider's
/// `since` stays alive.
pub async fn invalidate(
    client: &impl GenericClient,
    dead: &Invalidation<'_>,
) -> Result<Invalidated, DbError> {
    let platform = dead.platform.as_str();
    let registrations = client
        .execute(
            "UPDATE device_tokens SET invalidated_at = now(), invalid_reason = $4
             WHERE app_id = $1 AND platform = $2 AND (token = $3 OR background_token = $3)
               AND invalidated_at IS NULL AND ($5::timestamptz IS NULL OR updated_at < $5)",
            &[
                &dead.app_id,
                &platform,
                &dead.token,
                &dead.reason,
                &dead.since,
            ],
        )
        .await
        .map_err(DbError::query("device_tokens"))?;
    let listed = client
        .execute(
            "INSERT INTO invalid_tokens (app_id, platform, token_fingerprint, reason, provider_timestamp)
             SELECT $1, $2, $3, $4, $5
             WHERE NOT EXISTS (
                 SELECT 1 FROM device_tokens
                 WHERE app_id = $1 AND platform = $2 AND (token = $6 OR background_token = $6)
                   AND $5::timestamptz IS NOT NULL AND updated_at >= $5)
             ON CONFLICT (app_id, platform, token_fingerprint) DO UPDATE
                 SET reason = EXCLUDED.reason, provider_timestamp = EXCLUDED.provider_timestamp,
                     invalidated_at = now()",
            &[
                &dead.app_id,
                &platform,
                &token_fingerprint(dead.token),
                &dead.reason,
                &dead.since,
                &dead.token,
            ],
        )
        .await
        .map_err(DbError::query("invalid_tokens"))?;
    Ok(Invalidated {
        registrations,
        listed: listed > 0,
    })
}

/// One entry of the dead-token list.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeadToken {
    pub app_id: String,
    pub platform: Platform,
    pub digest: FingerprintBytes,
}

/// The whole dead-token list, as workers keep it in memory.
pub async fn dead_tokens(client: &impl GenericClient) -> Result<Vec<DeadToken>, DbError> {
    let rows = client
        .query(
            "SELECT app_id, platform, token_fingerprint FROM invalid_tokens",
            &[],
        )
        .await
        .map_err(DbError::query("invalid_tokens"))?;
    Ok(rows
        .iter()
        .filter_map(|row| {
            Some(DeadToken {
                app_id: row.get(0),
                platform: Platform::from_alias(row.get(1))?,
                digest: unhex(row.get(2))?,
            })
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fingerprint_is_a_sha256_prefix() {
        // sha256("abc") = ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad
        assert_eq!(token_fingerprint("abc"), "ba7816bf8f01cfea");
    }

    #[test]
    fn database_hashes_decode() {
        assert_eq!(unhex(&token_fingerprint("tok")), Some(token_digest("tok")));
        assert_eq!(unhex("zz"), None);
    }

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
