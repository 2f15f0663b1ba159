-- pushfleet schema, version 2: dead tokens and audit lag.

-- Tokens a provider declared dead (APNs 410 / BadDeviceToken / DeviceTokenNotForTopic, FCM
-- UNREGISTERED / SENDER_ID_MISMATCH / malformed token), whether or not they were registered
-- through the token API: workers keep this list in memory and never send to them. Registering
-- the token again through the token API removes its row.
CREATE TABLE invalid_tokens (
    app_id             text        NOT NULL,
    platform           text        NOT NULL CHECK (platform IN ('apple', 'firebase')),
    -- Hex SHA-256 of the raw token: encode(sha256(convert_to(token, 'UTF8')), 'hex').
    token_hash         text        NOT NULL,
    reason             text        NOT NULL,
    -- APNs 410: the instant Apple says the token stopped being valid.
    provider_timestamp timestamptz,
    invalidated_at     timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (app_id, platform, token_hash)
);
CREATE INDEX invalid_tokens_invalidated_at ON invalid_tokens (invalidated_at);

-- When the audit sink wrote the row: recorded_at - finished_at is the audit lag.
ALTER TABLE deliveries ADD COLUMN recorded_at timestamptz NOT NULL DEFAULT now();
