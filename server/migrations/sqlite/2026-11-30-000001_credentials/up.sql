-- Credentials: agent credential generations, API tokens, enroll secrets and the audit
-- log. Timestamps are milliseconds since the Unix epoch, as in the first migration.

-- One row per client_id whose credentials were ever revoked (or enrolled). It outlives
-- the agent on purpose: deleting an agent bumps its generation, so the tokens it held
-- cannot create it again. A token carries the generation it was minted for (claim
-- `gen`, 0 when absent) and is refused once the generation here is higher.
CREATE TABLE agent_credentials (
    client_id  TEXT   PRIMARY KEY,
    generation BIGINT NOT NULL,
    updated_at BIGINT NOT NULL
);

-- Tokens minted through the API or by enrollment, by their `jti`. The token itself is
-- never stored. last_used_at is written in batches, not per request.
CREATE TABLE api_tokens (
    jti          TEXT   PRIMARY KEY,
    name         TEXT,
    role         TEXT   NOT NULL,
    subject      TEXT   NOT NULL,
    created_at   BIGINT NOT NULL,
    expires_at   BIGINT NOT NULL,
    last_used_at BIGINT,
    revoked_at   BIGINT
);
CREATE INDEX api_tokens_created ON api_tokens (created_at, jti);
CREATE INDEX api_tokens_subject ON api_tokens (subject);

-- Enroll secrets (FleetDM enroll secrets, Teleport join tokens). Only the SHA-256 of
-- the secret is stored; the secret is shown once, when it is created. labels is a JSON
-- array of strings given to every agent that enrolls with it.
CREATE TABLE enroll_secrets (
    id             TEXT    PRIMARY KEY,
    name           TEXT    NOT NULL,
    secret_sha256  TEXT    NOT NULL UNIQUE,
    labels         TEXT    NOT NULL,
    allow_reenroll BOOLEAN NOT NULL,
    created_at     BIGINT  NOT NULL,
    expires_at     BIGINT,
    max_uses       BIGINT,
    use_count      BIGINT  NOT NULL,
    last_used_at   BIGINT,
    revoked_at     BIGINT
);
CREATE INDEX enroll_secrets_created ON enroll_secrets (created_at, id);

-- Every change made through the API or the UI. Rows are only ever appended, and
-- pruned by age (AUDIT_RETENTION). Pages are keyed on id, newest first.
CREATE TABLE audit_log (
    id         INTEGER PRIMARY KEY AUTOINCREMENT,
    at         BIGINT NOT NULL,
    actor_kind TEXT   NOT NULL,
    actor      TEXT   NOT NULL,
    actor_jti  TEXT,
    source     TEXT,
    action     TEXT   NOT NULL,
    target     TEXT,
    detail     TEXT
);
CREATE INDEX audit_log_at ON audit_log (at);
CREATE INDEX audit_log_actor ON audit_log (actor, id);
CREATE INDEX audit_log_action ON audit_log (action, id);
