# agent-server: `just` lists the recipes.

# Put the repository's shared tools (a real Helm engine) on PATH when helm is missing.
export PATH := env_var('PATH') + ":" + justfile_directory() + "/../shared/tools"

default:
    @just --list

# Serve on the embedded default (SQLite and a generated key in ./data).
run:
    cargo run --release -p agent-server

# Everything CI runs: formatting, lints, unit and integration tests, chart checks, and
# the end-to-end scenarios on the local target.
test: lint
    cargo test --workspace --locked
    just chart-lint
    just e2e-local

# rustfmt and clippy, warnings are errors.
lint:
    cargo fmt --all --check
    cargo clippy --workspace --all-targets --locked -- -D warnings

# The web UI in headless Chromium (needs chromium and chromedriver); screenshots land in
# target/ui-artifacts/.
ui-test:
    cargo test -p agent-server --test it browser

# helm lint, render every chart/ci values file, validate against Kubernetes schemas, scan.
chart-lint:
    bash scripts/chart-check.sh

# End-to-end on a kind cluster (Docker, kind, kubectl, helm); flags pass through, e.g. --keep.
e2e *ARGS:
    cargo run -p e2e -- kind {{ARGS}}

# End-to-end on this machine: server processes, redis-server, PostgreSQL, nginx as ingress.
e2e-local *ARGS:
    cargo run -p e2e -- local {{ARGS}}

# Delete the kind cluster that `just e2e --keep` left behind.
e2e-down:
    kind delete cluster --name agent-server-e2e

# `just bench idle` runs one benchmark; `just bench storm --agents 5000` another size.
# Capacity benchmarks 1-6 against release builds, about 15 minutes (docs/benchmarks.md).
bench what="all" *ARGS:
    cargo build --release --locked -p agent-server -p e2e --bins
    cargo run --release --locked -q -p e2e --bin bench -- {{what}} {{ARGS}}

# The benchmarks at tiny sizes on debug builds, in about a minute: proves they run.
bench-smoke:
    cargo build --locked -p agent-server -p e2e --bins
    cargo run --locked -q -p e2e --bin bench -- --smoke all
