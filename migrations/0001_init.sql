-- pushfleet schema, version 1: device tokens and the delivery audit.

CREATE TABLE device_tokens (
    id               bigserial PRIMARY KEY,
    account          text        NOT NULL,
    app_id           text        NOT NULL,
    device_id        text        NOT NULL,
    platform         text        NOT NULL CHECK (platform IN ('apple', 'firebase')),
    token            text        NOT NULL,
    -- Sylk splits an Apple "voip-background" token pair at the first '-'.
    background_token text,
    silent           boolean     NOT NULL DEFAULT true,
    user_agent       text,
    created_at       timestamptz NOT NULL DEFAULT now(),
    updated_at       timestamptz NOT NULL DEFAULT now(),
    invalidated_at   timestamptz,
    invalid_reason   text,
    UNIQUE (account, app_id, device_id)
);
CREATE INDEX device_tokens_app_token ON device_tokens (app_id, token);

-- One row per accepted push, written once it reaches its terminal state.
-- Partitioned by month on received_at so that old audit data is dropped a partition at a time.
CREATE TABLE deliveries (
    id                  uuid        NOT NULL,
    received_at         timestamptz NOT NULL,
    app_id              text        NOT NULL,
    platform            text        NOT NULL,
    event               text        NOT NULL,
    call_id             text        NOT NULL,
    account             text,
    device_id           text,
    -- First 16 hex digits of SHA-256(token): never the raw token.
    token_fingerprint   text        NOT NULL,
    lane                text        NOT NULL,
    status              text        NOT NULL CHECK (status IN
                            ('delivered', 'rejected', 'token_invalid', 'expired', 'failed', 'cancelled')),
    attempts            integer     NOT NULL,
    provider_status     integer,
    provider_reason     text,
    provider_message_id text,
    -- From acceptance by ingest to the terminal outcome.
    latency_ms          bigint      NOT NULL,
    finished_at         timestamptz NOT NULL,
    PRIMARY KEY (id, received_at)
) PARTITION BY RANGE (received_at);
CREATE TABLE deliveries_default PARTITION OF deliveries DEFAULT;
CREATE INDEX deliveries_call_id ON deliveries (call_id);
CREATE INDEX deliveries_app_received ON deliveries (app_id, received_at);
CREATE INDEX deliveries_account_received ON deliveries (account, received_at);

-- One row per send to a provider.
CREATE TABLE delivery_attempts (
    job_id          uuid        NOT NULL,
    attempt         integer     NOT NULL,
    attempted_at    timestamptz NOT NULL,
    provider_status integer,
    reason          text,
    duration_ms     bigint      NOT NULL,
    worker          text        NOT NULL,
    PRIMARY KEY (job_id, attempt, attempted_at)
) PARTITION BY RANGE (attempted_at);
CREATE TABLE delivery_attempts_default PARTITION OF delivery_attempts DEFAULT;

-- Creates the monthly partitions of both audit tables for the month holding `day` (idempotent).
CREATE FUNCTION pushfleet_ensure_month_partitions(day date) RETURNS void
LANGUAGE plpgsql AS $$
DECLARE
    first_day date := date_trunc('month', day)::date;
    next_day  date := (date_trunc('month', day) + interval '1 month')::date;
    suffix    text := to_char(first_day, 'YYYY_MM');
BEGIN
    -- Workers call this concurrently; serialise so that none sees "already exists".
    PERFORM pg_advisory_xact_lock(hashtext('pushfleet_ensure_month_partitions'));
    EXECUTE format(
        'CREATE TABLE IF NOT EXISTS deliveries_%s PARTITION OF deliveries FOR VALUES FROM (%L) TO (%L)',
        suffix, first_day, next_day);
    EXECUTE format(
        'CREATE TABLE IF NOT EXISTS delivery_attempts_%s PARTITION OF delivery_attempts FOR VALUES FROM (%L) TO (%L)',
        suffix, first_day, next_day);
END;
$$;
