-- pushfleet schema, version 7: the UnifiedPush-over-XMPP gateway's registrations.

-- One row per (distributor JID, public token): what the component handed out. The endpoint
-- token is the secret part of the endpoint URL that application servers POST to; it is random
-- (128 bits or more) and is the only authentication of /UP.
CREATE TABLE xmpp_registrations (
    endpoint_token text PRIMARY KEY,
    jid            text NOT NULL,
    public_token   text NOT NULL,
    created_at     timestamptz NOT NULL DEFAULT now(),
    UNIQUE (jid, public_token)
);
COMMENT ON TABLE xmpp_registrations IS 'UnifiedPush over XMPP: endpoints handed out to distributors by the component.';
COMMENT ON COLUMN xmpp_registrations.jid IS 'The distributor''s full JID (with resource), as the register IQ came from.';
COMMENT ON COLUMN xmpp_registrations.public_token IS 'The distributor''s token, sent back as the <subject> of each push.';
