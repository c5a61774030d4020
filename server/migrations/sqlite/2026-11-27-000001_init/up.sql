-- Timestamps are milliseconds since the Unix epoch (BIGINT) so that PostgreSQL and SQLite
-- share one schema and one set of queries.
CREATE TABLE agents (
    id           TEXT PRIMARY KEY,
    created_at   BIGINT  NOT NULL,
    online       BOOLEAN NOT NULL DEFAULT 0,
    pod          TEXT,
    -- Grows by one per connection; fences stale connections (see ARCHITECTURE.md).
    epoch        BIGINT  NOT NULL DEFAULT 0,
    connected_at BIGINT,
    last_seen    BIGINT,
    version      TEXT,
    hostname     TEXT,
    os           TEXT,
    arch         TEXT
);
CREATE INDEX agents_online_id ON agents (online, id);
CREATE INDEX agents_pod ON agents (pod) WHERE pod IS NOT NULL;

CREATE TABLE commands (
    id           TEXT PRIMARY KEY,
    agent_id     TEXT    NOT NULL REFERENCES agents (id) ON DELETE CASCADE,
    name         TEXT    NOT NULL,
    args         TEXT    NOT NULL,
    status       TEXT    NOT NULL,
    output       TEXT,
    created_at   BIGINT  NOT NULL,
    delivered_at BIGINT,
    completed_at BIGINT,
    expires_at   BIGINT,
    attempts     INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX commands_agent_created ON commands (agent_id, created_at, id);
CREATE INDEX commands_open ON commands (agent_id, status) WHERE status IN ('pending', 'delivered');

CREATE TABLE inventories (
    agent_id    TEXT   PRIMARY KEY REFERENCES agents (id) ON DELETE CASCADE,
    body        TEXT   NOT NULL,
    size_bytes  BIGINT NOT NULL,
    received_at BIGINT NOT NULL
);
