//! Sylk Pushserver v1 `POST /push`: one push to the token in the request.

use std::net::SocketAddr;

use axum::body::Body;
use axum::extract::{ConnectInfo, State};
use axum::response::Response;

use crate::error::ApiError;
use crate::pipeline;
use crate::request::json_object;
use crate::state::Shared;

/// `POST /push`.
pub async fn push(
    State(state): State<Shared>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    body: Body,
) -> Result<Response, ApiError> {
    let body = json_object(body, state.body_limit()).await?;
    pipeline::accept(&state, peer, &body).await
}
