-- pushfleet schema, version 4: the audit trail for auditors. One fingerprint form, an index per
-- filter of GET /audit, retention that moves stray rows out of the default partitions, erasure
-- records, a documented view, and a read-only role.

-- One fingerprint form everywhere: the first 16 hex digits of SHA-256(token), as deliveries
-- already keep it, so that invalid_tokens and deliveries join on equal values. Rows whose
-- shortened hashes meet (a collision of 64 bits, or nothing) keep the latest verdict.
DELETE FROM invalid_tokens a
 USING invalid_tokens b
 WHERE a.app_id = b.app_id AND a.platform = b.platform
   AND left(a.token_hash, 16) = left(b.token_hash, 16)
   AND (a.invalidated_at, a.token_hash) < (b.invalidated_at, b.token_hash);
ALTER TABLE invalid_tokens RENAME COLUMN token_hash TO token_fingerprint;
UPDATE invalid_tokens SET token_fingerprint = left(token_fingerprint, 16)
 WHERE length(token_fingerprint) > 16;
CREATE INDEX invalid_tokens_fingerprint ON invalid_tokens (token_fingerprint);

-- An index for every filter of GET /audit, each ending in received_at so that a filtered page
-- is read in the keyset order (received_at, id) without a sort.
CREATE INDEX deliveries_received_id ON deliveries (received_at, id);
CREATE INDEX deliveries_device_received ON deliveries (device_id, received_at);
CREATE INDEX deliveries_fingerprint_received ON deliveries (token_fingerprint, received_at);
CREATE INDEX deliveries_status_received ON deliveries (status, received_at);
CREATE INDEX deliveries_event_received ON deliveries (event, received_at);
DROP INDEX deliveries_call_id;
CREATE INDEX deliveries_call_id_received ON deliveries (call_id, received_at);

-- Erasures of a person's data (pushfleet audit erase): who ran it, when, what kind of
-- identifier it was given and how many rows went. Never the identifier itself.
CREATE TABLE erasures (
    id                bigserial   PRIMARY KEY,
    erased_at         timestamptz NOT NULL DEFAULT now(),
    erased_by         text        NOT NULL,
    selector          text        NOT NULL CHECK (selector IN ('account', 'device_id', 'token')),
    device_tokens     bigint      NOT NULL,
    deliveries        bigint      NOT NULL,
    delivery_attempts bigint      NOT NULL,
    invalid_tokens    bigint      NOT NULL
);

-- Creates the monthly partitions of both audit tables for the month holding `day`
-- (idempotent). Rows of that month already in a default partition (written while the partition
-- was missing) are moved into the new partition first: Postgres refuses to create a partition
-- whose rows sit in the default one.
CREATE OR REPLACE FUNCTION pushfleet_ensure_month_partitions(day date) RETURNS void
LANGUAGE plpgsql AS $$
DECLARE
    first_day date := date_trunc('month', day)::date;
    next_day  date := (date_trunc('month', day) + interval '1 month')::date;
    suffix    text := to_char(first_day, 'YYYY_MM');
    parent    text;
    time_column text;
BEGIN
    -- Workers call this concurrently; serialise so that none sees "already exists".
    PERFORM pg_advisory_xact_lock(hashtext('pushfleet_ensure_month_partitions'));
    FOREACH parent IN ARRAY ARRAY['deliveries', 'delivery_attempts'] LOOP
        IF to_regclass(format('%I', parent || '_' || suffix)) IS NOT NULL THEN
            CONTINUE;
        END IF;
        time_column := CASE parent WHEN 'deliveries' THEN 'received_at' ELSE 'attempted_at' END;
        -- No insert may reach the default partition between the move and the creation.
        EXECUTE format('LOCK TABLE %I IN EXCLUSIVE MODE', parent || '_default');
        EXECUTE format('CREATE TEMP TABLE pushfleet_moving (LIKE %I) ON COMMIT DROP', parent);
        EXECUTE format(
            'WITH moved AS (DELETE FROM %I WHERE %I >= %L AND %I < %L RETURNING *)
             INSERT INTO pushfleet_moving SELECT * FROM moved',
            parent || '_default', time_column, first_day, time_column, next_day);
        EXECUTE format(
            'CREATE TABLE %I PARTITION OF %I FOR VALUES FROM (%L) TO (%L)',
            parent || '_' || suffix, parent, first_day, next_day);
        EXECUTE format('INSERT INTO %I SELECT * FROM pushfleet_moving', parent);
        DROP TABLE pushfleet_moving;
    END LOOP;
END;
$$;

-- What an auditor usually wants in one place: each push with its key's tenant, whether its token
-- is on the dead-token list, and its attempts as a JSON array.
CREATE VIEW audit_deliveries AS
SELECT d.id AS job_id, d.received_at, d.finished_at, d.recorded_at, d.app_id, d.platform,
       d.event, d.call_id, d.account, d.device_id, d.token_fingerprint, d.lane, d.status,
       d.attempts AS attempt_count, d.provider_status, d.provider_reason, d.provider_message_id,
       d.latency_ms, d.api_key_id, k.tenant,
       (d.status = 'expired') AS expired_before_delivery,
       i.invalidated_at AS token_invalidated_at, i.reason AS token_invalid_reason,
       (SELECT coalesce(json_agg(json_build_object(
                   'attempt', a.attempt, 'attempted_at', a.attempted_at,
                   'provider_status', a.provider_status, 'reason', a.reason,
                   'duration_ms', a.duration_ms, 'worker', a.worker)
                 ORDER BY a.attempt, a.attempted_at), '[]'::json)
          FROM delivery_attempts a
         -- A day's slack for the clocks of ingest and worker hosts; lets Postgres skip the
         -- older partitions of delivery_attempts.
         WHERE a.job_id = d.id AND a.attempted_at >= d.received_at - interval '1 day') AS attempts
  FROM deliveries d
  LEFT JOIN api_keys k ON k.id = d.api_key_id
  LEFT JOIN invalid_tokens i
         ON i.app_id = d.app_id AND i.platform = d.platform
        AND i.token_fingerprint = d.token_fingerprint;

COMMENT ON TABLE deliveries IS
    'One row per accepted push, written by the audit sink once the push reached its terminal state. Partitioned by month on received_at (deliveries_YYYY_MM); partitions wholly older than [audit] retention_days are dropped.';
COMMENT ON COLUMN deliveries.id IS 'The job id ingest gave the push (returned to the caller); primary key with received_at.';
COMMENT ON COLUMN deliveries.received_at IS 'When ingest accepted the push: the partition key and the order of GET /audit.';
COMMENT ON COLUMN deliveries.app_id IS 'The app-id of the request (bundle id / package name), as configured in [[apps]].';
COMMENT ON COLUMN deliveries.platform IS 'apple or firebase.';
COMMENT ON COLUMN deliveries.event IS 'incoming_session, incoming_conference_request, cancel, message or transfer.';
COMMENT ON COLUMN deliveries.call_id IS 'The call-id of the request (SIP Call-ID or message id).';
COMMENT ON COLUMN deliveries.account IS 'The v2 account the token was registered under; NULL for a v1 push, which names no account.';
COMMENT ON COLUMN deliveries.device_id IS 'The device-id of the request or of the registered token.';
COMMENT ON COLUMN deliveries.token_fingerprint IS 'First 16 hex digits of SHA-256 of the device token (never the token itself); pushfleet audit --token computes it. Empty for a job that could not be read.';
COMMENT ON COLUMN deliveries.lane IS 'The queue the job went through: calls or messages.';
COMMENT ON COLUMN deliveries.status IS 'Terminal state: delivered, rejected (refused for good by the provider), token_invalid (token gone), expired (deadline passed before a provider accepted it), failed (retries exhausted or credential error), cancelled (superseded by a cancel or a duplicate).';
COMMENT ON COLUMN deliveries.attempts IS 'How many sends to the provider were made (0: none, e.g. expired in the queue). GET /audit calls it attempt_count.';
COMMENT ON COLUMN deliveries.provider_status IS 'HTTP status of the provider''s last answer; NULL when none came (no send, timeout, connection error).';
COMMENT ON COLUMN deliveries.provider_reason IS 'The provider''s reason (APNs reason, FCM error code) or pushfleet''s own for a push it did not send.';
COMMENT ON COLUMN deliveries.provider_message_id IS 'apns-id or FCM message name of the accepted push.';
COMMENT ON COLUMN deliveries.latency_ms IS 'Milliseconds from acceptance by ingest to the terminal outcome.';
COMMENT ON COLUMN deliveries.finished_at IS 'When the push reached its terminal state.';
COMMENT ON COLUMN deliveries.recorded_at IS 'When the audit sink wrote the row; recorded_at - finished_at is the audit lag.';

COMMENT ON TABLE delivery_attempts IS
    'One row per send to a provider. Partitioned by month on attempted_at (delivery_attempts_YYYY_MM), dropped with the deliveries of the same months.';
COMMENT ON COLUMN delivery_attempts.job_id IS 'deliveries.id of the push.';
COMMENT ON COLUMN delivery_attempts.attempt IS 'Attempt number, 1 for the first send.';
COMMENT ON COLUMN delivery_attempts.attempted_at IS 'When the send started: the partition key.';
COMMENT ON COLUMN delivery_attempts.provider_status IS 'HTTP status of the provider''s answer; NULL when none came.';
COMMENT ON COLUMN delivery_attempts.reason IS 'The provider''s reason, or the connection error.';
COMMENT ON COLUMN delivery_attempts.duration_ms IS 'Milliseconds the provider took to answer (or to fail).';
COMMENT ON COLUMN delivery_attempts.worker IS 'The [worker] id of the process that sent it.';

COMMENT ON TABLE invalid_tokens IS
    'Tokens a provider declared dead, whether or not registered through the token API; workers never send to them. Registering the token again removes its row; rows older than [audit] retention_days are pruned.';
COMMENT ON COLUMN invalid_tokens.app_id IS 'The app the token belongs to.';
COMMENT ON COLUMN invalid_tokens.platform IS 'apple or firebase.';
COMMENT ON COLUMN invalid_tokens.token_fingerprint IS 'First 16 hex digits of SHA-256 of the token, as deliveries.token_fingerprint: the two join on it.';
COMMENT ON COLUMN invalid_tokens.reason IS 'The provider''s reason (Unregistered, BadDeviceToken, UNREGISTERED…).';
COMMENT ON COLUMN invalid_tokens.provider_timestamp IS 'APNs 410: the instant Apple says the token stopped being valid.';
COMMENT ON COLUMN invalid_tokens.invalidated_at IS 'When pushfleet listed the token.';

COMMENT ON TABLE erasures IS
    'One row per pushfleet audit erase: who erased, when, by what kind of identifier and how many rows went. The identifier itself is not kept.';
COMMENT ON COLUMN erasures.id IS 'Sequence number of the erasure.';
COMMENT ON COLUMN erasures.erased_at IS 'When the erasure was committed.';
COMMENT ON COLUMN erasures.erased_by IS 'The --by value, or the operating-system user who ran the command.';
COMMENT ON COLUMN erasures.selector IS 'What identified the person: account, device_id or token.';
COMMENT ON COLUMN erasures.device_tokens IS 'device_tokens rows deleted.';
COMMENT ON COLUMN erasures.deliveries IS 'deliveries rows deleted.';
COMMENT ON COLUMN erasures.delivery_attempts IS 'delivery_attempts rows deleted.';
COMMENT ON COLUMN erasures.invalid_tokens IS 'invalid_tokens rows deleted.';

COMMENT ON VIEW audit_deliveries IS
    'deliveries joined with what an auditor needs next to each push: the tenant of its API key, whether its token is on the dead-token list, and its attempts as a JSON array.';
COMMENT ON COLUMN audit_deliveries.job_id IS 'deliveries.id.';
COMMENT ON COLUMN audit_deliveries.received_at IS 'When ingest accepted the push.';
COMMENT ON COLUMN audit_deliveries.finished_at IS 'When the push reached its terminal state.';
COMMENT ON COLUMN audit_deliveries.recorded_at IS 'When the audit sink wrote the row.';
COMMENT ON COLUMN audit_deliveries.app_id IS 'The app-id of the request.';
COMMENT ON COLUMN audit_deliveries.platform IS 'apple or firebase.';
COMMENT ON COLUMN audit_deliveries.event IS 'The event of the push.';
COMMENT ON COLUMN audit_deliveries.call_id IS 'The call-id of the request.';
COMMENT ON COLUMN audit_deliveries.account IS 'The v2 account, NULL for a v1 push.';
COMMENT ON COLUMN audit_deliveries.device_id IS 'The device-id.';
COMMENT ON COLUMN audit_deliveries.token_fingerprint IS 'First 16 hex digits of SHA-256 of the token.';
COMMENT ON COLUMN audit_deliveries.lane IS 'calls or messages.';
COMMENT ON COLUMN audit_deliveries.status IS 'The terminal state.';
COMMENT ON COLUMN audit_deliveries.attempt_count IS 'deliveries.attempts: sends made.';
COMMENT ON COLUMN audit_deliveries.provider_status IS 'HTTP status of the provider''s last answer.';
COMMENT ON COLUMN audit_deliveries.provider_reason IS 'The provider''s (or pushfleet''s) reason.';
COMMENT ON COLUMN audit_deliveries.provider_message_id IS 'apns-id or FCM message name.';
COMMENT ON COLUMN audit_deliveries.latency_ms IS 'Acceptance to terminal outcome, in milliseconds.';
COMMENT ON COLUMN audit_deliveries.api_key_id IS 'The API key that sent the push, NULL without one.';
COMMENT ON COLUMN audit_deliveries.tenant IS 'The tenant of that key.';
COMMENT ON COLUMN audit_deliveries.expired_before_delivery IS 'True when the push expired before a provider accepted it.';
COMMENT ON COLUMN audit_deliveries.token_invalidated_at IS 'When the token was listed dead, if it is on the dead-token list.';
COMMENT ON COLUMN audit_deliveries.token_invalid_reason IS 'Why the provider declared the token dead.';
COMMENT ON COLUMN audit_deliveries.attempts IS 'The delivery_attempts rows of the push as a JSON array, in attempt order.';

-- A role a DBA grants to auditors: read the audit, nothing else. Roles belong to the whole
-- cluster while grants belong to each database, and several databases may be migrated at once:
-- a concurrent creation is a duplicate, which is what was wanted.
DO $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'pushfleet_auditor') THEN
        BEGIN
            CREATE ROLE pushfleet_auditor NOLOGIN;
        EXCEPTION WHEN duplicate_object OR unique_violation THEN
            NULL;
        END;
    END IF;
END;
$$;
GRANT USAGE ON SCHEMA public TO pushfleet_auditor;
-- The view reads api_keys with its owner's rights: the auditor sees a key's tenant, never its hash.
GRANT SELECT ON deliveries, delivery_attempts, invalid_tokens, erasures, audit_deliveries
   TO pushfleet_auditor;
