//! HELP texts and units of the worker's metrics (README "Metrics"), registered once at start-up.

use metrics::{describe_counter, describe_gauge, describe_histogram, Unit};
use pushfleet_core::service::{describe_common, describe_postgres_probe};

pub fn describe() {
    describe_common();
    describe_postgres_probe();
    describe_deliveries();
    describe_providers();
    describe_audit();
    describe_xmpp();
    crate::ledger_view::describe();
    // Counters without labels are shown from the start, at 0: an alert on their increase then
    // sees the first one.
    for name in [
        "pushfleet_jobs_unreadable_total",
        "pushfleet_jobs_panicked_total",
        "pushfleet_jobs_already_concluded_total",
        "pushfleet_provider_connections_opened_total",
        "pushfleet_provider_resends_total",
        "pushfleet_audit_outcomes_written_total",
        "pushfleet_audit_write_errors_total",
    ] {
        metrics::counter!(name).increment(0);
    }
    for reason in ["data", "unreadable"] {
        metrics::counter!("pushfleet_audit_rejected_total", "reason" => reason).increment(0);
    }
}

fn describe_deliveries() {
    describe_counter!(
        "pushfleet_deliveries_total",
        "Jobs finished, by app, platform, event and terminal state (outcome)"
    );
    describe_histogram!(
        "pushfleet_push_latency_seconds",
        Unit::Seconds,
        "From ingest accepting a push to its terminal state (for a delivered push: the provider's acceptance), by lane and outcome"
    );
    describe_histogram!(
        "pushfleet_queue_wait_seconds",
        Unit::Seconds,
        "From ingest accepting a push to a worker taking it from its lane (first attempts only), by lane"
    );
    describe_counter!(
        "pushfleet_retries_total",
        "Pushes parked in a retry queue for another attempt, by app and platform"
    );
    describe_counter!(
        "pushfleet_duplicates_total",
        "Duplicate pushes not sent again, by app and event"
    );
    describe_counter!(
        "pushfleet_jobs_unreadable_total",
        "Jobs that could not be parsed, sent to the dead letters"
    );
    describe_counter!(
        "pushfleet_jobs_panicked_total",
        "Jobs whose handler panicked (requeued once, then dead-lettered)"
    );
    describe_counter!(
        "pushfleet_tokens_invalidated_total",
        "Tokens listed as dead, by app, platform and reason"
    );
    describe_counter!(
        "pushfleet_jobs_already_concluded_total",
        "Jobs of a batch message skipped when it came back because a worker had concluded them before"
    );
    describe_counter!(
        "pushfleet_dead_letter_jobs_requeued_total",
        "Jobs of a batch message that expired with its earliest job, queued again alone because they still had time, by lane"
    );
    describe_histogram!(
        "pushfleet_outcome_batch_size",
        "Outcome events per broker message a worker published"
    );
}

fn describe_providers() {
    describe_counter!(
        "pushfleet_provider_requests_total",
        "Requests sent to APNs or FCM, by app, platform and HTTP status (none: no answer)"
    );
    describe_histogram!(
        "pushfleet_provider_latency_seconds",
        Unit::Seconds,
        "Round trip of a request to the provider, by app and platform"
    );
    describe_counter!(
        "pushfleet_credential_refreshes_total",
        "Credentials replaced after the provider refused them, push sent again, by app and platform"
    );
    describe_counter!(
        "pushfleet_credential_failures_total",
        "Pushes failed because the provider refused fresh credentials, by app and platform"
    );
    describe_counter!(
        "pushfleet_provider_connections_opened_total",
        "Extra provider connections opened because the open ones were saturated"
    );
    describe_counter!(
        "pushfleet_provider_resends_total",
        "Requests sent again because the provider refused them unprocessed (GOAWAY, REFUSED_STREAM)"
    );
}

fn describe_xmpp() {
    describe_gauge!(
        "pushfleet_xmpp_component_held",
        "1 while this worker holds the UnifiedPush-over-XMPP component (answers IQs, sends the XMPP pushes), 0 while standing by"
    );
    describe_counter!(
        "pushfleet_xmpp_registrations_total",
        "UnifiedPush register and unregister IQs answered by the XMPP component, by action and result (ok, error)"
    );
}

fn describe_audit() {
    describe_counter!(
        "pushfleet_audit_outcomes_written_total",
        "Outcomes written to Postgres by the audit sink"
    );
    describe_histogram!(
        "pushfleet_audit_write_seconds",
        Unit::Seconds,
        "Duration of one audit batch write"
    );
    describe_histogram!(
        "pushfleet_audit_lag_seconds",
        Unit::Seconds,
        "From an outcome's end (terminal state or attempt) to its audit row's commit"
    );
    describe_counter!(
        "pushfleet_audit_write_errors_total",
        "Audit writes that failed for want of the database (retried)"
    );
    describe_counter!(
        "pushfleet_audit_rejected_total",
        "Outcomes parked in the audit dead letters instead of written, by reason (data, unreadable)"
    );
    describe_counter!(
        "pushfleet_dead_letters_total",
        "Dead letters audited, by reason (expired, rejected, retries-exhausted), app and lane"
    );
}
