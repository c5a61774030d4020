#!/usr/bin/env bash
# The OpenAPI contract against a live server: starts agent-server on the embedded default
# (SQLite and a generated key in a temporary DATA_DIR) on free ports, fetches
# /api/v1/openapi.json without a token, validates it (openapi-spec-validator), mints an
# admin token with `agent-server token` and runs schemathesis against every operation:
# no generated input may get a 5xx, every response must have a documented status,
# content type, headers and body, and input the document calls invalid must get a 4xx.
# Both tools come from PyPI into target/contract-venv (first run only; needs python3 with
# venv, which scripts/test.sh installs).
#
# Usage: scripts/contract.sh [SCHEMATHESIS RUN FLAGS…]
#   CONTRACT_EXAMPLES   examples per operation and phase (default 100)
#   CONTRACT_SEED       schemathesis' random seed (default: a new one each run, printed)
# `just test` runs it with few examples as a smoke test of about a minute; run it with
# the default, or more, after changing a route. Reports land in target/contract/.
set -euo pipefail
cd "$(dirname "$0")/.."

venv=target/contract-venv
# Pinned, so that a new release cannot change what passes; raise them on purpose.
tools=(schemathesis==4.32.5 openapi-spec-validator==0.9.0)
if [ ! -x "$venv/bin/schemathesis" ] || [ ! -x "$venv/bin/openapi-spec-validator" ] ||
    [ "$(cat "$venv/.tools" 2>/dev/null)" != "${tools[*]}" ]; then
    echo "installing ${tools[*]} into $venv (first run only)"
    python3 -m venv "$venv" || { echo "python3 -m venv failed; install python3-venv" >&2; exit 2; }
    "$venv/bin/python" -m pip install --quiet --disable-pip-version-check "${tools[@]}" >"$venv/pip.log" 2>&1 ||
        { echo "pip install failed; see $venv/pip.log" >&2; exit 2; }
    echo "${tools[*]}" >"$venv/.tools"
fi

# The same build `cargo test --workspace` makes (features are unified across the
# workspace and its dev-dependencies), so that after the tests nothing is rebuilt.
cargo test --workspace --locked --no-run --quiet 2>/dev/null || cargo test --workspace --locked --no-run
target_dir=${CARGO_TARGET_DIR:-target}
bin=$target_dir/debug/agent-server
out=target/contract
rm -rf "$out"
mkdir -p "$out"
data=$(mktemp -d)
free_port() { python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
port=$(free_port)
metrics_port=$(free_port)
base="http://127.0.0.1:$port"

# Nothing of the caller's environment may point the server elsewhere.
unset DATABASE_URL DATABASE_URL_FILE REDIS_HOST REDIS_SENTINELS SECRET_KEY SECRET_KEY_FILE \
    TLS_CERT_FILE TLS_KEY_FILE
export SERVER_HOST=127.0.0.1 SERVER_PORT=$port METRICS_PORT=$metrics_port DATA_DIR=$data \
    SERVER_URL=$base LOG_LEVEL=${LOG_LEVEL:-warn} LOG_FORMAT=text
"$bin" >"$out/server.log" 2>&1 &
server=$!
cleanup() {
    kill "$server" 2>/dev/null || true
    wait "$server" 2>/dev/null || true
    rm -rf "$data"
}
trap cleanup EXIT

ready=false
for _ in $(seq 1 150); do
    if curl -fsS "$base/readyz" >/dev/null 2>&1; then
        ready=true
        break
    fi
    kill -0 "$server" 2>/dev/null || { cat "$out/server.log" >&2; exit 1; }
    sleep 0.2
done
$ready || { echo "the server did not become ready in 30 s" >&2; cat "$out/server.log" >&2; exit 1; }

curl -fsS "$base/api/v1/openapi.json" -o "$out/openapi.json"
"$venv/bin/openapi-spec-validator" "$out/openapi.json"

token=$("$bin" token --sub contract --role admin --ttl 2h)

# Real resources, so that generated requests also reach the handlers' own logic instead
# of 404s: their ids are offered, among generated ones, through schemathesis
# dictionaries (target/contract/schemathesis.toml).
BASE=$base TOKEN=$token python3 - "$out/schemathesis.toml" <<'PY'
import json, os, sys, urllib.request

base, token = os.environ["BASE"], os.environ["TOKEN"]

def call(method, path, body=None, content_type="application/json"):
    data = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
    req = urllib.request.Request(base + path, data=data, method=method)
    req.add_header("Authorization", "Bearer " + token)
    if data is not None:
        req.add_header("Content-Type", content_type)
    with urllib.request.urlopen(req, timeout=10) as resp:
        return json.load(resp)

agent = "contract-agent"
minted = call("POST", "/api/v1/tokens", {"client_id": agent, "name": "contract"})
call("POST", f"/api/v1/agents/{agent}/inventory", {"os": "linux", "cpus": 2})
command = call("POST", f"/api/v1/agents/{agent}/commands", {"name": "ping"})
job = call("POST", "/api/v1/jobs", {"name": "ping", "target": {"ids": [agent]}})
binary = call("POST", "/api/v1/binaries?name=agent&version=1.0.0&os=linux&arch=x86_64",
              b"\x7fELF contract", "application/octet-stream")
rollout = call("POST", "/api/v1/rollouts", {"binary_id": binary["id"]})
secret = call("POST", "/api/v1/enroll-secrets", {"name": "contract", "labels": ["contract"]})

dictionaries = {
    "agents": [agent],
    "commands": [command["id"]],
    "tokens": [minted["id"]],
    "enroll_secrets": [secret["id"]],
    "secrets": [secret["secret"]],
    "binaries": [binary["id"]],
    "rollouts": [rollout["id"]],
    "jobs": [job["id"]],
}
ids = {
    "^/api/v1/commands/": "commands",
    "^/api/v1/tokens/": "tokens",
    "^/api/v1/enroll-secrets/": "enroll_secrets",
    "^/api/v1/binaries/": "binaries",
    "^/api/v1/rollouts/": "rollouts",
    "^/api/v1/jobs/": "jobs",
}
q = json.dumps
lines = []
for name, values in dictionaries.items():
    lines += [f"[dictionaries.{name}]", f"values = {q(values)}", ""]
# A refused WebSocket handshake is a 426 before the id is looked at (http/ws.rs checks
# in the order a person fixes them), and a body over a route's bound is a 413: both
# are rejections.
lines += ["[checks.negative_data_rejection]",
          'expected-statuses = ["400", "401", "403", "404", "405", "406", "409", "413", "415", "422", "426", "428", "429"]',
          ""]
lines += ["[parameters]",
          f'"path.client_id" = {{ dictionary = "agents", probability = 0.7 }}',
          f'"body.client_id" = {{ dictionary = "agents", probability = 0.3 }}',
          f'"body.binary_id" = {{ dictionary = "binaries", probability = 0.7 }}',
          f'"body.secret" = {{ dictionary = "secrets", probability = 0.7 }}', ""]
for regex, name in ids.items():
    lines += ["[[operations]]", f"include-path-regex = {q(regex)}",
              f'parameters = {{ "path.id" = {{ dictionary = "{name}", probability = 0.7 }} }}', ""]
open(sys.argv[1], "w").write("\n".join(lines))
PY

seed=${CONTRACT_SEED:-$RANDOM$RANDOM}
echo "schemathesis against $base, seed $seed (CONTRACT_SEED=$seed reproduces the run)"

# From inside $out, where schemathesis keeps its cache (.schemathesis/) and reports.
# Excluded: GET /api/v1/events is a Server-Sent Event stream that ends only when the
# replica drains, so a request to it never completes.
root=$PWD
cd "$out"
status=0
"$root/$venv/bin/schemathesis" --config-file schemathesis.toml run openapi.json \
    --url "$base" \
    --header "Authorization: Bearer $token" \
    --checks not_a_server_error,status_code_conformance,content_type_conformance,response_headers_conformance,response_schema_conformance,negative_data_rejection \
    --exclude-path /api/v1/events \
    --phases examples,coverage,fuzzing \
    --max-examples "${CONTRACT_EXAMPLES:-100}" \
    --seed "$seed" \
    --request-timeout 10 \
    --suppress-health-check all \
    --report junit,ndjson --report-dir . \
    --no-color \
    "$@" || status=$?
cd "$root"
if grep -E '(panicked|ERROR)' "$out/server.log" >/dev/null; then
    echo "the server logged errors during the run:" >&2
    grep -E '(panicked|ERROR)' "$out/server.log" | head -20 >&2
    status=1
fi
exit $status
