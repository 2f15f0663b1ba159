//! Reading a request safely: the body as the JSON object every API route takes, within the size
//! limit, and the account (and device) a v2 path names. Whatever a caller sends, the answer is a
//! 4xx that says what is wrong.

use axum::body::{Body, Bytes};
use axum::extract::rejection::PathRejection;
use axum::extract::Path;
use serde_json::{Map, Value};

use crate::error::ApiError;
use crate::limits;

/// Reads the whole body, refusing more than `limit` bytes.
pub async fn read_body(body: Body, limit: usize) -> Result<Bytes, ApiError> {
    axum::body::to_bytes(body, limit)
        .await
        .map_err(|_| ApiError::TooLarge(limit))
}

/// Parses a request body as a JSON object.
pub async fn json_object(body: Body, limit: usize) -> Result<Map<String, Value>, ApiError> {
    let bytes = read_body(body, limit).await?;
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return Err(ApiError::EmptyBody);
    }
    let value: Value = serde_json::from_slice(&bytes).map_err(|_| ApiError::UnparsableBody)?;
    match value {
        Value::Object(map) => Ok(map),
        _ => Err(ApiError::NotAnObject),
    }
}

/// The account from the path; a path that is not valid text, or an account beyond the limits
/// of `crate::limits`, is the caller's 400.
pub fn account(path: Result<Path<String>, PathRejection>) -> Result<String, ApiError> {
    let account = path
        .map(|Path(account)| account)
        .map_err(|rejection| ApiError::InvalidPath {
            what: "account",
            rejection,
        })?;
    limits::check(&limits::ACCOUNT, &account)?;
    Ok(account)
}

/// The account and device from the path.
pub fn account_and_device(
    path: Result<Path<(String, String)>, PathRejection>,
) -> Result<(String, String), ApiError> {
    let (account, device) =
        path.map(|Path(names)| names)
            .map_err(|rejection| ApiError::InvalidPath {
                what: "account or device",
                rejection,
            })?;
    limits::check(&limits::ACCOUNT, &account)?;
    limits::check(&limits::DEVICE_ID, &device)?;
    Ok((account, device))
}
