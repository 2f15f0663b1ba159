//! Whether the worker may call a UnifiedPush endpoint a caller gave: checked when a device
//! registers one and when a v1 push names one, so that an internal address is refused with a 400
//! and never contacted. The worker checks again before each send, as DNS answers change.

use pushfleet_core::config::{AppSettings, Platform};
use pushfleet_core::webpush;
use tracing::info;

use crate::error::ApiError;

/// Resolves the endpoint's host and checks its addresses against the app's rules. Other
/// platforms pass.
pub async fn check_reachable(app: &AppSettings, endpoint: &str) -> Result<(), ApiError> {
    let (Platform::UnifiedPush, Some(settings)) = (app.platform, &app.webpush) else {
        return Ok(());
    };
    let refused = |error: webpush::EndpointError| {
        metrics::counter!(
            "pushfleet_webpush_endpoints_refused_total",
            "stage" => "ingest", "reason" => error.label()
        )
        .increment(1);
        info!(app = %app.id, error = %error, "UnifiedPush endpoint refused");
        ApiError::BadEndpoint(error)
    };
    let url = webpush::parse_endpoint(endpoint).map_err(refused)?;
    webpush::resolve_checked(settings, &url)
        .await
        .map(drop)
        .map_err(refused)
}
