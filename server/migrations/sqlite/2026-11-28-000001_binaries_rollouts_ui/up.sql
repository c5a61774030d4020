-- Agent binaries, fleet rollouts, agent labels and web UI sessions. Timestamps are
-- milliseconds since the Unix epoch, as in the first migration.

-- The file of a binary lives on BINARY_STORAGE_PATH under its sha256; this is its metadata.
CREATE TABLE binaries (
    id         TEXT PRIMARY KEY,
    name       TEXT   NOT NULL,
    version    TEXT   NOT NULL,
    os         TEXT   NOT NULL,
    arch       TEXT   NOT NULL,
    notes      TEXT,
    size_bytes BIGINT NOT NULL,
    sha256     TEXT   NOT NULL,
    created_at BIGINT NOT NULL,
    UNIQUE (name, version, os, arch)
);
CREATE INDEX binaries_sha256 ON binaries (sha256);
CREATE INDEX binaries_created ON binaries (created_at, id);

-- The desired version for one os/arch. At most one is active per os/arch; a new one
-- supersedes it. version/os/arch are copied from the binary for history.
CREATE TABLE rollouts (
    id             TEXT PRIMARY KEY,
    binary_id      TEXT    NOT NULL REFERENCES binaries (id),
    os             TEXT    NOT NULL,
    arch           TEXT    NOT NULL,
    version        TEXT    NOT NULL,
    label          TEXT,
    percentage     INTEGER NOT NULL,
    max_concurrent INTEGER NOT NULL,
    status         TEXT    NOT NULL,
    created_at     BIGINT  NOT NULL,
    ended_at       BIGINT
);
CREATE UNIQUE INDEX rollouts_one_active ON rollouts (os, arch) WHERE status = 'active';
CREATE INDEX rollouts_binary ON rollouts (binary_id);

-- One row per agent a rollout sent an `update` to: `updating` holds one of the rollout's
-- max_concurrent slots until the agent comes back with the new version (`updated`) or
-- ROLLOUT_UPDATE_TIMEOUT passes (`timed_out`).
CREATE TABLE rollout_agents (
    rollout_id    TEXT   NOT NULL REFERENCES rollouts (id) ON DELETE CASCADE,
    agent_id      TEXT   NOT NULL REFERENCES agents (id) ON DELETE CASCADE,
    status        TEXT   NOT NULL,
    from_version  TEXT,
    offered_at    BIGINT NOT NULL,
    -- The connection the update was last sent on; a new connection gets it again.
    offered_epoch BIGINT NOT NULL,
    finished_at   BIGINT,
    PRIMARY KEY (rollout_id, agent_id)
);
CREATE INDEX rollout_agents_agent ON rollout_agents (agent_id, status);
CREATE INDEX rollout_agents_status ON rollout_agents (rollout_id, status);

-- Labels an agent reports in its hello; rollouts may target one.
CREATE TABLE agent_labels (
    agent_id TEXT NOT NULL REFERENCES agents (id) ON DELETE CASCADE,
    label    TEXT NOT NULL,
    PRIMARY KEY (agent_id, label)
);
CREATE INDEX agent_labels_label ON agent_labels (label, agent_id);

-- Web UI sign-ins. Only a hash of the cookie is stored, so a database dump cannot be
-- replayed as a session.
CREATE TABLE ui_sessions (
    id_hash    TEXT   PRIMARY KEY,
    created_at BIGINT NOT NULL,
    expires_at BIGINT NOT NULL
);
CREATE INDEX ui_sessions_expires ON ui_sessions (expires_at);
