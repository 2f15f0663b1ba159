//! The UnifiedPush-over-XMPP gateway's shared part: the registrations the component hands out
//! (distributor JID + public token → endpoint token) and the endpoint URLs built from them.
//! The worker holding the component writes them; ingest's `/UP` reads them.

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use ring::rand::{SecureRandom, SystemRandom};
use tokio_postgres::GenericClient;

use crate::db::DbError;
use crate::job::XmppTarget;

/// The largest push `/UP` takes, as UnifiedPush distributors do (ntfy, the XMPP gateway).
pub const MAX_PUSH_BYTES: usize = 4096;

/// The random bytes of an endpoint token: 256 bits, far beyond guessing.
const ENDPOINT_TOKEN_BYTES: usize = 32;

/// The endpoint an application server POSTs to.
pub fn endpoint_url(endpoint_base: &str, endpoint_token: &str) -> String {
    format!("{endpoint_base}?token={endpoint_token}")
}

/// A fresh endpoint token: random bytes from the system's generator, base64url.
pub fn new_endpoint_token() -> String {
    let mut bytes = [0u8; ENDPOINT_TOKEN_BYTES];
    SystemRandom::new()
        .fill(&mut bytes)
        .expect("the system random generator works");
    URL_SAFE_NO_PAD.encode(bytes)
}

/// The endpoint token of `jid`'s registration of `public_token`: the one it already has, or a
/// new one. Registering again returns the same endpoint, so a distributor that lost the answer
/// gets what it was given before.
pub async fn register(
    db: &impl GenericClient,
    jid: &str,
    public_token: &str,
) -> Result<String, DbError> {
    let row = db
        .query_one(
            "INSERT INTO xmpp_registrations (endpoint_token, jid, public_token)
             VALUES ($1, $2, $3)
             ON CONFLICT (jid, public_token) DO UPDATE SET jid = EXCLUDED.jid
             RETURNING endpoint_token",
            &[&new_endpoint_token(), &jid, &public_token],
        )
        .await
        .map_err(DbError::query("xmpp register"))?;
    Ok(row.get(0))
}

/// Forgets `jid`'s registration of `public_token`; false when there was none.
pub async fn unregister(
    db: &impl GenericClient,
    jid: &str,
    public_token: &str,
) -> Result<bool, DbError> {
    let removed = db
        .execute(
            "DELETE FROM xmpp_registrations WHERE jid = $1 AND public_token = $2",
            &[&jid, &public_token],
        )
        .await
        .map_err(DbError::query("xmpp unregister"))?;
    Ok(removed > 0)
}

/// Where a push to `endpoint_token` goes; `None` for a token never handed out or unregistered.
pub async fn target(
    db: &impl GenericClient,
    endpoint_token: &str,
) -> Result<Option<XmppTarget>, DbError> {
    let row = db
        .query_opt(
            "SELECT jid, public_token FROM xmpp_registrations WHERE endpoint_token = $1",
            &[&endpoint_token],
        )
        .await
        .map_err(DbError::query("xmpp endpoint lookup"))?;
    Ok(row.map(|row| XmppTarget {
        jid: row.get(0),
        public_token: row.get(1),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoint_tokens_are_long_random_and_url_safe() {
        let a = new_endpoint_token();
        let b = new_endpoint_token();
        assert_ne!(a, b);
        assert_eq!(URL_SAFE_NO_PAD.decode(&a).unwrap().len(), 32);
        assert!(a
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_'));
        assert_eq!(
            endpoint_url("https://push.example.org/UP", &a),
            format!("https://push.example.org/UP?token={a}")
        );
    }
}
