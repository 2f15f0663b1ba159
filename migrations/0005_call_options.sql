-- pushfleet schema, version 6: what a device registered through RFC 8599 parameters carries
-- besides its tokens, and what registration wake-ups need.

-- An iOS device without a VoIP token (pn-param services 'remote' only): calls ring it by
-- alert pushes instead of PushKit.
ALTER TABLE device_tokens ADD COLUMN remote_only boolean NOT NULL DEFAULT false;
-- Its per-contact options as the Contact gave them: {"pn-call-str": "...", "pn-timeout": "5", ...}.
ALTER TABLE device_tokens ADD COLUMN push_options jsonb;
-- When the device's SIP registration expires; the wake-up scheduler wakes it before.
ALTER TABLE device_tokens ADD COLUMN registration_expires_at timestamptz;
-- The last wake-up push queued for the device: none again within [wakeup] wakeup_min_interval_secs.
ALTER TABLE device_tokens ADD COLUMN last_wakeup_at timestamptz;
-- The registration (its expiry) the scheduler last woke the device for: once per registration.
ALTER TABLE device_tokens ADD COLUMN scheduled_wakeup_for timestamptz;

-- The scheduler's scan: live registrations only.
CREATE INDEX device_tokens_registration_expiry ON device_tokens (registration_expires_at)
    WHERE registration_expires_at IS NOT NULL AND invalidated_at IS NULL;

-- Wake-ups asked for by RFC 8599 parameters, for devices the token API does not hold: the last
-- one per token, so that none comes again within [wakeup] wakeup_min_interval_secs.
CREATE TABLE wakeup_claims (
    app_id         text        NOT NULL,
    platform       text        NOT NULL CHECK (platform IN ('apple', 'firebase')),
    -- The token's fingerprint (16 hex digits of SHA-256), as deliveries and invalid_tokens keep it.
    token_fingerprint text     NOT NULL,
    last_wakeup_at timestamptz NOT NULL,
    PRIMARY KEY (app_id, platform, token_fingerprint)
);
