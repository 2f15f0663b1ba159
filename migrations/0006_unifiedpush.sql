-- pushfleet schema, version 6: UnifiedPush/WebPush endpoints as a third platform.

ALTER TABLE device_tokens DROP CONSTRAINT device_tokens_platform_check;
ALTER TABLE device_tokens ADD CONSTRAINT device_tokens_platform_check
    CHECK (platform IN ('apple', 'firebase', 'unifiedpush'));
ALTER TABLE invalid_tokens DROP CONSTRAINT invalid_tokens_platform_check;
ALTER TABLE invalid_tokens ADD CONSTRAINT invalid_tokens_platform_check
    CHECK (platform IN ('apple', 'firebase', 'unifiedpush'));

-- A WebPush subscription's keys (RFC 8291), base64url as the browser or distributor gave them.
-- Without them pushes go unencrypted.
ALTER TABLE device_tokens ADD COLUMN p256dh text, ADD COLUMN auth text;
ALTER TABLE device_tokens ADD CONSTRAINT device_tokens_webpush_keys
    CHECK ((p256dh IS NULL) = (auth IS NULL) AND (p256dh IS NULL OR platform = 'unifiedpush'));
COMMENT ON COLUMN device_tokens.p256dh IS 'unifiedpush: the subscription''s P-256 public key (base64url, 65 bytes uncompressed); NULL without encryption.';
COMMENT ON COLUMN device_tokens.auth IS 'unifiedpush: the subscription''s authentication secret (base64url, 16 bytes); set with p256dh.';
COMMENT ON COLUMN deliveries.platform IS 'apple, firebase or unifiedpush.';
COMMENT ON COLUMN invalid_tokens.platform IS 'apple, firebase or unifiedpush.';
COMMENT ON COLUMN audit_deliveries.platform IS 'apple, firebase or unifiedpush.';
