//! Every answer that is not a success, as JSON. Bad input is the caller's mistake and gets a 4xx
//! that says what is wrong; nothing a caller sends can produce a 500.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::{json, Value};

#[derive(Debug, Clone, PartialEq)]
pub struct ApiError {
    pub status: StatusCode,
    pub body: Value,
}

impl ApiError {
    /// The Sylk Pushserver error shape: `{"code", "description", "data": ""}`.
    pub fn sylk(status: StatusCode, description: impl Into<String>) -> ApiError {
        ApiError {
            status,
            body: json!({
                "code": status.as_u16(),
                "description": description.into(),
                "data": "",
            }),
        }
    }

    pub fn bad_request(description: impl Into<String>) -> ApiError {
        ApiError::sylk(StatusCode::BAD_REQUEST, description)
    }

    pub fn not_found(description: impl Into<String>) -> ApiError {
        ApiError::sylk(StatusCode::NOT_FOUND, description)
    }

    /// Malformed JSON: the reference's (FastAPI's) own wording and shape.
    pub fn unparsable_body() -> ApiError {
        ApiError {
            status: StatusCode::BAD_REQUEST,
            body: json!({"detail": "There was an error parsing the body"}),
        }
    }

    pub fn too_large(limit: usize) -> ApiError {
        ApiError::sylk(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("request body is larger than {limit} bytes"),
        )
    }

    pub fn unavailable(description: impl Into<String>) -> ApiError {
        ApiError::sylk(StatusCode::SERVICE_UNAVAILABLE, description)
    }

    pub fn detail(status: StatusCode, detail: &str) -> ApiError {
        ApiError {
            status,
            body: json!({ "detail": detail }),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.status, Json(self.body)).into_response()
    }
}
