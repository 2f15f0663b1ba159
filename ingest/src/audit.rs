//! `GET /audit` and `GET /audit/summary`: the audit trail the workers write, filtered, paged and
//! summarised (`pushfleet_core::audit::query`), as JSON or CSV. A caller with a key sees only the
//! rows of the key's apps.

use axum::extract::rejection::QueryRejection;
use axum::extract::{Query, State};
use axum::http::{header, HeaderMap, HeaderValue};
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use pushfleet_core::audit::csv;
use pushfleet_core::audit::query::{self, FilterError, PageRequest, SummaryRequest};

use crate::auth::Caller;
use crate::error::ApiError;
use crate::state::Shared;

/// The query string as given: a repeated parameter (`status`, `app`) keeps every value.
type QueryParams = Vec<(String, String)>;

/// The header of a CSV answer that carries the cursor of the next page.
pub const NEXT_CURSOR_HEADER: &str = "x-next-cursor";

/// Whether the caller wants CSV: `format=csv`, or an `Accept` naming `text/csv`.
fn wants_csv(params: &QueryParams, headers: &HeaderMap) -> Result<bool, ApiError> {
    match params.iter().rev().find(|(name, _)| name == "format") {
        Some((_, format)) if format == "csv" => Ok(true),
        Some((_, format)) if format == "json" => Ok(false),
        Some(_) => Err(FilterError::Invalid {
            field: "format",
            problem: "must be json or csv",
        }
        .into()),
        None => Ok(headers
            .get_all(header::ACCEPT)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .any(|accept| accept.to_ascii_lowercase().contains("text/csv"))),
    }
}

/// `GET /audit`: `{"rows": [...], "next": cursor | null}`, or CSV with the cursor in
/// `X-Next-Cursor`.
pub async fn audit(
    State(state): State<Shared>,
    Extension(caller): Extension<Caller>,
    headers: HeaderMap,
    params: Result<Query<QueryParams>, QueryRejection>,
) -> Result<Response, ApiError> {
    let Query(params) = params.map_err(ApiError::InvalidQuery)?;
    let csv = wants_csv(&params, &headers)?;
    let request = PageRequest::from_params(&params)?;
    let page = query::page(&**state.db_client().await?, &request, caller.apps()).await?;
    if !csv {
        return Ok(Json(page.to_json()).into_response());
    }
    let mut text = csv::header(request.with_attempts);
    text.push_str(&csv::lines(&page.rows, request.with_attempts));
    let mut response = ([(header::CONTENT_TYPE, "text/csv; charset=utf-8")], text).into_response();
    if let Some(next) = page.next.and_then(|n| HeaderValue::try_from(n).ok()) {
        response.headers_mut().insert(NEXT_CURSOR_HEADER, next);
    }
    Ok(response)
}

/// `GET /audit/summary`.
pub async fn summary(
    State(state): State<Shared>,
    Extension(caller): Extension<Caller>,
    params: Result<Query<QueryParams>, QueryRejection>,
) -> Result<Response, ApiError> {
    let Query(params) = params.map_err(ApiError::InvalidQuery)?;
    if params
        .iter()
        .any(|(name, value)| name == "format" && value != "json")
    {
        return Err(FilterError::Invalid {
            field: "format",
            problem: "must be json",
        }
        .into());
    }
    let request = SummaryRequest::from_params(&params)?;
    let summary = query::summary(&**state.db_client().await?, &request, caller.apps()).await?;
    Ok(Json(summary).into_response())
}
