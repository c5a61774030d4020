#!/usr/bin/env bash
# The OpenAPI contract against a live server: starts agent-server on the embedded default
# (SQLite and a generated key in a temporary DATA_DIR) on free ports, fetches
# /api/v1/openapi.json, validates it (openapi-spec-validator), mints an admin token with
# `agent-server token` and runs schemathesis against every operation: no generated input
# may get a 500, and every response must match its documented status codes and schema.
# Both tools come from PyPI into target/contract-venv (first run only).
#
# CONTRACT_EXAMPLES (default 100) bounds the examples per operation, so that the run is a
# smoke test of a few minutes.
set -euo pipefail
cd "$(dirname "$0")/.."

venv=target/contract-venv
if [ ! -x "$venv/bin/schemathesis" ] || [ ! -x "$venv/bin/openapi-spec-validator" ]; then
    echo "installing openapi-spec-validator and schemathesis into $venv (first run only)"
    python3 -m venv "$venv" || { echo "python3 -m venv failed; install python3-venv" >&2; exit 2; }
    "$venv/bin/python" -m pip install --quiet --disable-pip-version-check \
        'openapi-spec-validator>=0.7' 'schemathesis>=4' >"$venv/pip.log" 2>&1 ||
        { echo "pip install failed; see $venv/pip.log" >&2; exit 2; }
fi

# With the tests, so that the binary shares the build `cargo test` already made.
cargo build --locked -p agent-server --tests
bin=target/debug/agent-server
out=target/contract
mkdir -p "$out"
data=$(mktemp -d)
free_port() { python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
port=$(free_port)
metrics_port=$(free_port)
base="http://127.0.0.1:$port"

export SERVER_HOST=127.0.0.1 SERVER_PORT=$port METRICS_PORT=$metrics_port DATA_DIR=$data \
    SERVER_URL=$base LOG_LEVEL=${LOG_LEVEL:-warn}
"$bin" >"$out/server.log" 2>&1 &
server=$!
cleanup() {
    kill "$server" 2>/dev/null || true
    wait "$server" 2>/dev/null || true
    rm -rf "$data"
}
trap cleanup EXIT

for _ in $(seq 1 100); do
    curl -fsS "$base/readyz" >/dev/null 2>&1 && break
    kill -0 "$server" 2>/dev/null || { cat "$out/server.log" >&2; exit 1; }
    sleep 0.1
done
curl -fsS "$base/readyz" >/dev/null || { echo "the server did not become ready" >&2; cat "$out/server.log" >&2; exit 1; }

curl -fsS "$base/api/v1/openapi.json" -o "$out/openapi.json"
"$venv/bin/openapi-spec-validator" "$out/openapi.json"

token=$("$bin" token --sub contract --role admin --ttl 1h)

# From inside $out, where schemathesis keeps its cache (.schemathesis/) and reports.
root=$PWD
cd "$out"
# Excluded: GET /api/v1/events is a server-sent event stream that never ends, so a
# request to it cannot complete. DELETE /api/v1/session would only clear a cookie the
# run does not use, but it is harmless and stays in.
"$root/$venv/bin/schemathesis" run openapi.json \
    --url "$base" \
    --header "Authorization: Bearer $token" \
    --checks not_a_server_error,status_code_conformance,response_schema_conformance,content_type_conformance \
    --exclude-path /api/v1/events \
    --max-examples "${CONTRACT_EXAMPLES:-100}" \
    --phases examples,coverage,fuzzing \
    --request-timeout 10 \
    --no-color \
    --suppress-health-check all \
    --report junit --report-dir . \
    "$@"
