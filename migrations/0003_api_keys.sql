-- pushfleet schema, version 3: tenants, their API keys, and the key behind every audit row.

CREATE TABLE tenants (
    name       text        PRIMARY KEY CHECK (name <> ''),
    created_at timestamptz NOT NULL DEFAULT now()
);
COMMENT ON TABLE tenants IS
    'Customers of a shared dispatcher. A tenant is created with its first API key (pushfleet keys create --tenant NAME) and owns nothing but its keys: what it may reach is the apps of each key.';
COMMENT ON COLUMN tenants.name IS 'The name given to pushfleet keys create --tenant; the tenant label of pushfleet_ingest_rate_limited_total.';

CREATE TABLE api_keys (
    id                text        PRIMARY KEY,
    tenant            text        NOT NULL REFERENCES tenants (name),
    secret_sha256     bytea       NOT NULL CHECK (octet_length(secret_sha256) = 32),
    apps              text[]      NOT NULL CHECK (cardinality(apps) > 0),
    scopes            text[]      NOT NULL
                          CHECK (cardinality(scopes) > 0 AND scopes <@ ARRAY['push', 'tokens', 'audit']),
    pushes_per_second integer     NOT NULL DEFAULT 0 CHECK (pushes_per_second >= 0),
    burst             integer     NOT NULL DEFAULT 0 CHECK (burst >= 0),
    created_at        timestamptz NOT NULL DEFAULT now(),
    revoked_at        timestamptz
);
CREATE INDEX api_keys_tenant ON api_keys (tenant);
COMMENT ON TABLE api_keys IS
    'API keys callers send as Authorization: Bearer pfk_<id>_<secret>. Ingest reloads the keys not revoked every [ingest] api_keys_refresh_ms; rows are revoked, never deleted, so that audit rows keep naming a known key.';
COMMENT ON COLUMN api_keys.id IS 'The public part of the key (16 hex digits), written into deliveries.api_key_id and shown by pushfleet keys list.';
COMMENT ON COLUMN api_keys.secret_sha256 IS 'SHA-256 of the secret part of the key; the secret itself is shown once by pushfleet keys create and stored nowhere.';
COMMENT ON COLUMN api_keys.apps IS 'App ids (the app-id of requests, any platform) the key may push to and whose tokens and audit rows it sees.';
COMMENT ON COLUMN api_keys.scopes IS 'What the key may do: push (POST /push, /v2/tokens/{account}/push[/{device}], /rfc8599/push), tokens (register, list and remove v2 tokens), audit (GET /audit).';
COMMENT ON COLUMN api_keys.pushes_per_second IS 'Token-bucket rate of pushes (a v2 account push counts one per device); 0 = unlimited. Each ingest allows [ingest] rate_limit_share of it.';
COMMENT ON COLUMN api_keys.burst IS 'Bucket size: pushes allowed at once after an idle spell; 0 = one second''s worth of pushes_per_second.';
COMMENT ON COLUMN api_keys.revoked_at IS 'Set by pushfleet keys revoke; every ingest refuses the key within api_keys_refresh_ms.';

-- The audit names the key that sent each push. No foreign key: the audit sink must never be
-- refused a row, and keys are only ever revoked.
ALTER TABLE deliveries ADD COLUMN api_key_id text;
COMMENT ON COLUMN deliveries.api_key_id IS 'api_keys.id of the key the push was sent with; NULL for an anonymous request.';
