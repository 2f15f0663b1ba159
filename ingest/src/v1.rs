//! Sylk Pushserver v1 `POST /push`: one push to the token in the request.

use std::net::SocketAddr;

use axum::body::Body;
use axum::extract::{ConnectInfo, State};
use axum::response::Response;
use axum::Extension;

use crate::auth::Caller;
use crate::call_options::CallOptions;
use crate::error::ApiError;
use crate::pipeline;
use crate::request::json_object;
use crate::state::Shared;

/// `POST /push`.
pub async fn push(
    State(state): State<Shared>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    Extension(caller): Extension<Caller>,
    body: Body,
) -> Result<Response, ApiError> {
    let body = json_object(body, state.body_limit()).await?;
    pipeline::accept(
        &state,
        peer,
        &caller,
        &body,
        &CallOptions::default(),
        "/push",
    )
    .await
}
