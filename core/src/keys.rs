//! Tenants and their API keys (`tenants`, `api_keys`). A key reads `pfk_<id>_<secret>`: the id
//! is public (audit rows and listings name it, and ingest finds the key by it), the secret is
//! 256 random bits shown once at creation and stored only as its SHA-256. A key grants scopes
//! (`push`, `tokens`, `audit`) for a set of app ids, optionally under a push rate limit. Keys
//! are revoked, never deleted.

use std::fmt;

use ring::rand::{SecureRandom, SystemRandom};
use serde_json::{json, Value};
use tokio_postgres::{GenericClient, Row};

use crate::db::DbError;

/// What every key starts with, so that a leaked one is recognisable (secret scanners, logs).
pub const KEY_PREFIX: &str = "pfk_";
/// Hex digits of a key id.
const ID_LEN: usize = 16;
/// Hex digits of a key secret: 32 random bytes.
const SECRET_LEN: usize = 64;

/// Longest tenant name, so that it fits a metric label and a log line.
pub const MAX_TENANT_CHARS: usize = 128;
/// As the API's app-id limit.
pub const MAX_APP_CHARS: usize = 256;
/// Highest rate and burst a key may be given: beyond anything one ingest can take.
pub const MAX_RATE: u32 = 1_000_000;

/// What a key may be used for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Scope {
    /// Pushes: `POST /push`, `/v2/tokens/{account}/push[/{device}]`, `/rfc8599/push`.
    Push,
    /// v2 token registration, listing and removal.
    Tokens,
    /// `GET /audit`.
    Audit,
}

impl Scope {
    pub const ALL: [Scope; 3] = [Scope::Push, Scope::Tokens, Scope::Audit];

    pub fn as_str(self) -> &'static str {
        match self {
            Scope::Push => "push",
            Scope::Tokens => "tokens",
            Scope::Audit => "audit",
        }
    }

    pub fn parse(name: &str) -> Option<Scope> {
        Scope::ALL.into_iter().find(|s| s.as_str() == name)
    }
}

impl fmt::Display for Scope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A key to create.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewKey {
    pub tenant: String,
    pub apps: Vec<String>,
    pub scopes: Vec<Scope>,
    /// 0: unlimited.
    pub pushes_per_second: u32,
    /// 0: one second's worth of `pushes_per_second`.
    pub burst: u32,
}

/// Why a key was not created.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    /// The request itself is wrong; the text names what.
    #[error("{0}")]
    Invalid(String),
    #[error("no secure random numbers: {0}")]
    Random(String),
    #[error(transparent)]
    Db(#[from] DbError),
}

fn clean(text: &str) -> bool {
    !text.trim().is_empty() && !text.chars().any(char::is_control)
}

impl NewKey {
    /// Checks what the database would accept, in words a person at the command line can act on.
    pub fn validate(&self) -> Result<(), KeyError> {
        let invalid = |problem: String| Err(KeyError::Invalid(problem));
        if !clean(&self.tenant) || self.tenant.chars().count() > MAX_TENANT_CHARS {
            return invalid(format!(
                "tenant {:?}: must be 1 to {MAX_TENANT_CHARS} characters, no control characters",
                self.tenant
            ));
        }
        if self.apps.is_empty() {
            return invalid("a key needs at least one app".into());
        }
        if let Some(app) = self
            .apps
            .iter()
            .find(|a| !clean(a) || a.chars().count() > MAX_APP_CHARS)
        {
            return invalid(format!(
                "app {app:?}: must be 1 to {MAX_APP_CHARS} characters, no control characters"
            ));
        }
        if self.scopes.is_empty() {
            return invalid("a key needs at least one scope (push, tokens, audit)".into());
        }
        if self.pushes_per_second > MAX_RATE || self.burst > MAX_RATE {
            return invalid(format!(
                "pushes per second and burst must be at most {MAX_RATE}"
            ));
        }
        if self.pushes_per_second == 0 && self.burst > 0 {
            return invalid("a burst needs a rate: give pushes per second as well".into());
        }
        Ok(())
    }
}

/// A key as ingest holds it in memory: what it grants, and the digest its secret must match.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiKey {
    pub id: String,
    pub tenant: String,
    pub apps: Vec<String>,
    pub scopes: Vec<Scope>,
    pub pushes_per_second: u32,
    pub burst: u32,
    secret_sha256: [u8; 32],
}

impl ApiKey {
    /// Whether `secret` is this key's. The digests are compared in constant time: how long a
    /// refusal takes says nothing about how much of a guess was right.
    pub fn verify(&self, secret: &str) -> bool {
        let presented = sha256(secret);
        let difference = presented
            .iter()
            .zip(self.secret_sha256.iter())
            .fold(0u8, |acc, (a, b)| acc | (a ^ b));
        std::hint::black_box(difference) == 0
    }

    pub fn has_scope(&self, scope: Scope) -> bool {
        self.scopes.contains(&scope)
    }

    pub fn allows_app(&self, app_id: &str) -> bool {
        self.apps.iter().any(|a| a == app_id)
    }

    /// A key whose secret is `secret`, without rate limits (set the fields for those).
    pub fn new(id: &str, tenant: &str, apps: &[&str], scopes: &[Scope], secret: &str) -> ApiKey {
        ApiKey {
            id: id.into(),
            tenant: tenant.into(),
            apps: apps.iter().map(|a| a.to_string()).collect(),
            scopes: scopes.to_vec(),
            pushes_per_second: 0,
            burst: 0,
            secret_sha256: sha256(secret),
        }
    }

    fn from_row(row: &Row) -> Option<ApiKey> {
        let digest: Vec<u8> = row.get("secret_sha256");
        let scopes: Vec<String> = row.get("scopes");
        Some(ApiKey {
            id: row.get("id"),
            tenant: row.get("tenant"),
            apps: row.get("apps"),
            scopes: scopes.iter().filter_map(|s| Scope::parse(s)).collect(),
            pushes_per_second: u32::try_from(row.get::<_, i32>("pushes_per_second")).ok()?,
            burst: u32::try_from(row.get::<_, i32>("burst")).ok()?,
            secret_sha256: digest.try_into().ok()?,
        })
    }
}

fn sha256(text: &str) -> [u8; 32] {
    let mut bytes = [0u8; 32];
    bytes.copy_from_slice(ring::digest::digest(&ring::digest::SHA256, text.as_bytes()).as_ref());
    bytes
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Splits a presented key into its id and secret; `None` for text that cannot be a key.
pub fn parse_key(text: &str) -> Option<(&str, &str)> {
    let (id, secret) = text.strip_prefix(KEY_PREFIX)?.split_once('_')?;
    let hex_digits = |s: &str, len: usize| {
        s.len() == len
            && s.bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    };
    (hex_digits(id, ID_LEN) && hex_digits(secret, SECRET_LEN)).then_some((id, secret))
}

/// A key as listed: everything but the secret.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyInfo {
    pub id: String,
    pub tenant: String,
    pub apps: Vec<String>,
    pub scopes: Vec<String>,
    pub pushes_per_second: i32,
    pub burst: i32,
    pub created_at: String,
    pub revoked_at: Option<String>,
}

impl KeyInfo {
    fn from_row(row: &Row) -> KeyInfo {
        KeyInfo {
            id: row.get("id"),
            tenant: row.get("tenant"),
            apps: row.get("apps"),
            scopes: row.get("scopes"),
            pushes_per_second: row.get("pushes_per_second"),
            burst: row.get("burst"),
            created_at: row.get("created_at"),
            revoked_at: row.get("revoked_at"),
        }
    }

    pub fn to_json(&self) -> Value {
        json!({
            "id": self.id,
            "tenant": self.tenant,
            "apps": self.apps,
            "scopes": self.scopes,
            "pushes_per_second": self.pushes_per_second,
            "burst": self.burst,
            "created_at": self.created_at,
            "revoked_at": self.revoked_at,
        })
    }
}

const KEY_INFO: &str = "id, tenant, apps, scopes, pushes_per_second, burst,
    to_json(created_at) #>> '{}' AS created_at, to_json(revoked_at) #>> '{}' AS revoked_at";

/// A key just created: its listing and the full key text, which exists nowhere else.
#[derive(Debug, Clone)]
pub struct CreatedKey {
    pub info: KeyInfo,
    pub key: String,
}

/// Creates a key (and its tenant, the first time it is named).
pub async fn create(client: &mut impl GenericClient, new: &NewKey) -> Result<CreatedKey, KeyError> {
    new.validate()?;
    let mut random = [0u8; ID_LEN / 2 + SECRET_LEN / 2];
    SystemRandom::new()
        .fill(&mut random)
        .map_err(|e| KeyError::Random(e.to_string()))?;
    let (id, secret) = random.split_at(ID_LEN / 2);
    let (id, secret) = (hex(id), hex(secret));
    let scopes: Vec<&str> = new.scopes.iter().map(|s| s.as_str()).collect();
    let tx = client
        .transaction()
        .await
        .map_err(DbError::query("api_keys"))?;
    tx.execute(
        "INSERT INTO tenants (name) VALUES ($1) ON CONFLICT DO NOTHING",
        &[&new.tenant],
    )
    .await
    .map_err(DbError::query("tenants"))?;
    let row = tx
        .query_one(
            &format!(
                "INSERT INTO api_keys (id, tenant, secret_sha256, apps, scopes, pushes_per_second, burst)
                 VALUES ($1, $2, $3, $4, $5, $6, $7) RETURNING {KEY_INFO}"
            ),
            &[
                &id,
                &new.tenant,
                &sha256(&secret).as_slice(),
                &new.apps,
                &scopes,
                &(new.pushes_per_second as i32),
                &(new.burst as i32),
            ],
        )
        .await
        .map_err(DbError::query("api_keys"))?;
    tx.commit().await.map_err(DbError::query("api_keys"))?;
    Ok(CreatedKey {
        info: KeyInfo::from_row(&row),
        key: format!("{KEY_PREFIX}{id}_{secret}"),
    })
}

/// Every key, revoked ones included, oldest first.
pub async fn list(client: &impl GenericClient) -> Result<Vec<KeyInfo>, DbError> {
    Ok(client
        .query(
            &format!("SELECT {KEY_INFO} FROM api_keys ORDER BY created_at, id"),
            &[],
        )
        .await
        .map_err(DbError::query("api_keys"))?
        .iter()
        .map(KeyInfo::from_row)
        .collect())
}

/// What [`revoke`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Revoked {
    Now(KeyInfo),
    /// Revoked before, at the instant it holds.
    Already(KeyInfo),
    Unknown,
}

/// Revokes a key; a key already revoked keeps its first revocation time.
pub async fn revoke(client: &impl GenericClient, id: &str) -> Result<Revoked, DbError> {
    let revoked = client
        .query_opt(
            &format!(
                "UPDATE api_keys SET revoked_at = now() WHERE id = $1 AND revoked_at IS NULL
                 RETURNING {KEY_INFO}"
            ),
            &[&id],
        )
        .await
        .map_err(DbError::query("api_keys"))?;
    if let Some(row) = revoked {
        return Ok(Revoked::Now(KeyInfo::from_row(&row)));
    }
    let known = client
        .query_opt(
            &format!("SELECT {KEY_INFO} FROM api_keys WHERE id = $1"),
            &[&id],
        )
        .await
        .map_err(DbError::query("api_keys"))?;
    Ok(match known {
        Some(row) => Revoked::Already(KeyInfo::from_row(&row)),
        None => Revoked::Unknown,
    })
}

/// The keys in force (not revoked), as ingest loads them.
pub async fn active(client: &impl GenericClient) -> Result<Vec<ApiKey>, DbError> {
    Ok(client
        .query(
            "SELECT id, tenant, secret_sha256, apps, scopes, pushes_per_second, burst
               FROM api_keys WHERE revoked_at IS NULL",
            &[],
        )
        .await
        .map_err(DbError::query("api_keys"))?
        .iter()
        .filter_map(ApiKey::from_row)
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn new_key() -> NewKey {
        NewKey {
            tenant: "acme".into(),
            apps: vec!["com.example".into()],
            scopes: vec![Scope::Push],
            pushes_per_second: 0,
            burst: 0,
        }
    }

    #[test]
    fn keys_parse_into_id_and_secret() {
        let id = "0123456789abcdef";
        let secret = "ab".repeat(32);
        let key = format!("pfk_{id}_{secret}");
        assert_eq!(parse_key(&key), Some((id, secret.as_str())));
        for bad in [
            "",
            "pfk_",
            &format!("pfk_{id}{secret}"),
            &format!("pfk_{id}_{}", &secret[1..]),
            &format!("pfk_{}_{secret}", id.to_uppercase()),
            &format!("xyz_{id}_{secret}"),
            &format!("pfk_{id}_{secret}_"),
        ] {
            assert_eq!(parse_key(bad), None, "{bad}");
        }
    }

    #[test]
    fn only_the_right_secret_verifies() {
        let key = ApiKey::new("k", "acme", &["a"], &[Scope::Audit], "secret-1");
        assert!(key.verify("secret-1"));
        assert!(!key.verify("secret-2"));
        assert!(!key.verify(""));
        assert!(key.has_scope(Scope::Audit) && !key.has_scope(Scope::Push));
        assert!(key.allows_app("a") && !key.allows_app("b"));
    }

    #[test]
    fn new_keys_are_checked() {
        assert!(new_key().validate().is_ok());
        let problem = |change: fn(&mut NewKey)| {
            let mut key = new_key();
            change(&mut key);
            match key.validate() {
                Err(KeyError::Invalid(problem)) => problem,
                other => panic!("{other:?}"),
            }
        };
        assert!(problem(|k| k.tenant = " ".into()).starts_with("tenant"));
        assert!(problem(|k| k.tenant = "a\nb".into()).starts_with("tenant"));
        assert!(problem(|k| k.apps.clear()).contains("at least one app"));
        assert!(problem(|k| k.apps.push("x\u{0}".into())).starts_with("app"));
        assert!(problem(|k| k.scopes.clear()).contains("scope"));
        assert!(problem(|k| k.burst = 5).contains("burst needs a rate"));
        assert!(problem(|k| k.pushes_per_second = MAX_RATE + 1).contains("at most"));
        assert_eq!(
            Scope::ALL.map(|s| Scope::parse(s.as_str())),
            Scope::ALL.map(Some)
        );
    }
}
