//! HELP texts and units of ingest's metrics (README "Metrics"), registered once at start-up.

use metrics::{describe_counter, describe_histogram, Unit};
use pushfleet_core::service::describe_common;

/// The routes whose sync waits can run out: the label values of
/// `pushfleet_ingest_sync_timeouts_total`, as `pushfleet_ingest_requests_total` names them.
const SYNC_ROUTES: [&str; 4] = [
    "/push",
    "/rfc8599/push",
    "/v2/tokens/{account}/push",
    "/v2/tokens/{account}/push/{device}",
];

pub fn describe() {
    describe_common();
    describe_counter!(
        "pushfleet_ingest_requests_total",
        "HTTP requests answered by ingest, by route, status and error kind (none when not refused)"
    );
    describe_histogram!(
        "pushfleet_ingest_request_duration_seconds",
        Unit::Seconds,
        "Time to answer an ingest request, by route"
    );
    describe_counter!(
        "pushfleet_ingest_jobs_total",
        "Jobs accepted and queued, by app, platform and event"
    );
    describe_histogram!(
        "pushfleet_ingest_jobs_per_publish",
        "Jobs per broker message ingest published (those accepted while the lane's previous publish awaited its confirm), by lane"
    );
    describe_counter!(
        "pushfleet_ingest_sync_timeouts_total",
        "Sync requests answered 202 because the worker's answer did not come within sync_timeout_ms, by route"
    );
    describe_counter!(
        "pushfleet_ingest_rate_limited_total",
        "Requests refused with 429 because their API key was over its rate limit, by tenant"
    );
    pushfleet_core::service::describe_postgres_probe();
    // Present from the start, so that the timeout ratio has both sides from the first request.
    for route in SYNC_ROUTES {
        metrics::counter!("pushfleet_ingest_sync_timeouts_total", "route" => route).increment(0);
    }
}
