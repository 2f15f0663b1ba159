//! Erasing a person (`pushfleet audit erase`): their registered device tokens and every audit
//! row that names them are deleted, not masked, in one transaction, and the erasure itself is
//! recorded in `erasures` with counts only, never the identifier it was given.

use std::collections::BTreeSet;

use crate::db::{DbError, GenericClient};
use crate::tokens::token_fingerprint;

/// Who is to be erased.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Person {
    /// A v2 account: its devices, and every push to the account or to one of its tokens.
    Account(String),
    /// A device id (in every account): its registrations, and every push naming it or its tokens.
    DeviceId(String),
    /// A raw device token: its registrations, and every push to it.
    Token(String),
}

impl Person {
    /// The `erasures.selector` value.
    pub fn selector(&self) -> &'static str {
        match self {
            Person::Account(_) => "account",
            Person::DeviceId(_) => "device_id",
            Person::Token(_) => "token",
        }
    }
}

/// How many rows an erasure deleted.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Erased {
    pub device_tokens: u64,
    pub deliveries: u64,
    pub delivery_attempts: u64,
    pub invalid_tokens: u64,
}

/// Erases `person`, recording that `by` did it.
pub async fn erase(
    client: &mut impl GenericClient,
    person: &Person,
    by: &str,
) -> Result<Erased, DbError> {
    let tx = client
        .transaction()
        .await
        .map_err(DbError::query("erasure"))?;
    let (registered, value): (&str, &str) = match person {
        Person::Account(account) => ("account = $1", account),
        Person::DeviceId(device) => ("device_id = $1", device),
        Person::Token(token) => ("(token = $1 OR background_token = $1)", token),
    };
    let devices = tx
        .query(
            &format!(
                "DELETE FROM device_tokens WHERE {registered} RETURNING token, background_token"
            ),
            &[&value],
        )
        .await
        .map_err(DbError::query("device_tokens"))?;
    // The fingerprints of every token the person had: pushes to them name no account (v1).
    let mut fingerprints = BTreeSet::new();
    for device in &devices {
        fingerprints.insert(token_fingerprint(device.get::<_, &str>(0)));
        if let Some(background) = device.get::<_, Option<&str>>(1) {
            fingerprints.insert(token_fingerprint(background));
        }
    }
    if let Person::Token(token) = person {
        fingerprints.insert(token_fingerprint(token));
    }
    let fingerprints: Vec<String> = fingerprints.into_iter().collect();
    let named = match person {
        Person::Account(_) => "account = $1",
        Person::DeviceId(_) => "device_id = $1",
        // The raw token is in no audit row: only its fingerprint.
        Person::Token(_) => "false AND $1::text IS NULL",
    };
    let jobs = tx
        .query(
            &format!(
                "DELETE FROM deliveries WHERE {named} OR token_fingerprint = ANY($2) RETURNING id"
            ),
            &[&value, &fingerprints],
        )
        .await
        .map_err(DbError::query("deliveries"))?;
    let job_ids: Vec<uuid::Uuid> = jobs.iter().map(|row| row.get(0)).collect();
    let delivery_attempts = tx
        .execute(
            "DELETE FROM delivery_attempts WHERE job_id = ANY($1)",
            &[&job_ids],
        )
        .await
        .map_err(DbError::query("delivery_attempts"))?;
    let invalid_tokens = tx
        .execute(
            "DELETE FROM invalid_tokens WHERE token_fingerprint = ANY($1)",
            &[&fingerprints],
        )
        .await
        .map_err(DbError::query("invalid_tokens"))?;
    let erased = Erased {
        device_tokens: devices.len() as u64,
        deliveries: job_ids.len() as u64,
        delivery_attempts,
        invalid_tokens,
    };
    let count = |n: u64| i64::try_from(n).unwrap_or(i64::MAX);
    tx.execute(
        "INSERT INTO erasures (erased_by, selector, device_tokens, deliveries, delivery_attempts,
                               invalid_tokens)
         VALUES ($1, $2, $3, $4, $5, $6)",
        &[
            &by,
            &person.selector(),
            &count(erased.device_tokens),
            &count(erased.deliveries),
            &count(erased.delivery_attempts),
            &count(erased.invalid_tokens),
        ],
    )
    .await
    .map_err(DbError::query("erasures"))?;
    tx.commit().await.map_err(DbError::query("erasure"))?;
    Ok(erased)
}
