#!/usr/bin/env bash
# README's test command: installs what this machine lacks for `just test`, starts a
# local PostgreSQL that is installed but stopped, then runs `just test` (everything
# CI runs). `.ci/run` calls it too.
#
# Usage: scripts/test.sh                 set up, then `just test`
#        scripts/test.sh --setup-only    set up and stop (nothing is tested)
#
# What it installs, where it can:
#   just                           with `cargo install just --locked` (any user)
#   cargo-fuzz                     with `cargo install cargo-fuzz --locked` (any user;
#                                  the fuzz smoke run of `just test`)
#   Debian packages                with apt-get, as root on Debian or Ubuntu:
#     build-essential pkg-config libpq-dev libsqlite3-dev   (building the server)
#     chromium chromium-driver                              (the web UI test)
#     nginx redis-server                                    (e2e-local, cluster tests)
#     iproute2                                              (network-cut tests)
#     python3 python3-venv curl                             (chart checks and the OpenAPI
#                                                            contract: their Python tools go
#                                                            into venvs under target/)
# What it only checks, and says how to get: Rust (rustup), the nightly toolchain
# (`rustup toolchain install nightly --profile minimal`: the fuzz build passes sanitizer
# flags), helm (the chart checks), and a PostgreSQL on 127.0.0.1:5432 that user `postgres` may use without a
# password (or TEST_POSTGRES_URL). A PostgreSQL cluster that is installed but
# stopped is started with pg_ctlcluster; a running one is never stopped or
# reconfigured.
#
# Not root, or not Debian: it prints what to install and exits 1 before testing.
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo"
export PATH="$HOME/.cargo/bin:$PATH"
# The chart checks use a Helm binary kept beside the repository when none is installed.
if [ -d "$repo/../shared/tools" ]; then
  PATH="$PATH:$(cd "$repo/../shared/tools" && pwd)"
fi

setup_only=false
case "${1:-}" in
  "") ;;
  --setup-only) setup_only=true ;;
  -h | --help)
    sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'
    exit 0
    ;;
  *)
    echo "scripts/test.sh: unknown argument '$1' (try --help)" >&2
    exit 64
    ;;
esac

step() { printf '\n==> %s\n' "$*"; }
have() { command -v "$1" >/dev/null 2>&1; }

is_root=false
[ "$(id -u)" -eq 0 ] && is_root=true
is_debian=false
if have apt-get && have dpkg-query && [ -r /etc/os-release ] &&
  grep -Eq '^(ID|ID_LIKE)=.*\b(debian|ubuntu)\b' /etc/os-release; then
  is_debian=true
fi

# Debian packages that are missing, and steps this script cannot take.
packages=()
manual=()

deb_installed() { dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q 'install ok installed'; }

# --- what is missing ----------------------------------------------------------

step "checking what \`just test\` needs"

if ! have cargo; then
  manual+=("Rust (cargo): install it with rustup, https://rustup.rs, then open a new shell")
fi

# Building the server links libpq and SQLite from the system (the image build
# bundles them instead). The C compiler and pkg-config find them.
if $is_debian; then
  for p in build-essential pkg-config libpq-dev libsqlite3-dev; do
    deb_installed "$p" || packages+=("$p")
  done
else
  have cc || packages+=(build-essential)
  have pkg-config || packages+=(pkg-config)
  if have pkg-config; then
    pkg-config --exists libpq || packages+=(libpq-dev)
    pkg-config --exists sqlite3 || packages+=(libsqlite3-dev)
  fi
fi

# The web UI is tested in a real headless browser.
have chromium || have chromium-browser || packages+=(chromium)
have chromedriver || packages+=(chromium-driver)

# e2e-local uses nginx as its ingress; it and the cluster tests start redis-server.
# Both live in /usr/sbin, which a non-root PATH may lack.
have nginx || [ -x /usr/sbin/nginx ] || packages+=(nginx)
have redis-server || [ -x /usr/sbin/redis-server ] || packages+=(redis-server)
# The network-cut tests make network namespaces and veth pairs with `ip`.
have ip || [ -x /usr/sbin/ip ] || [ -x /sbin/ip ] || packages+=(iproute2)

# scripts/chart-check.sh installs kubernetes-validate and checkov with pip into
# target/chart-venv on its first run; that needs the venv module (and ensurepip,
# which Debian ships separately in python3-venv).
# The OpenAPI contract (scripts/contract.sh) polls the server it starts with curl and
# installs schemathesis into target/contract-venv the same way.
have curl || packages+=(curl)
if ! have python3; then
  packages+=(python3 python3-venv)
elif { [ ! -x target/chart-venv/bin/checkov ] || [ ! -x target/contract-venv/bin/schemathesis ]; } &&
  ! python3 -c 'import ensurepip, venv' 2>/dev/null; then
  packages+=(python3-venv)
fi

# The fuzz targets build with `cargo +nightly fuzz` (sanitizer flags need nightly).
if have cargo && ! cargo +nightly --version >/dev/null 2>&1; then
  manual+=("the nightly Rust toolchain (the fuzz smoke run): rustup toolchain install nightly --profile minimal")
fi

if ! have helm; then
  manual+=("helm (chart checks: helm lint and helm template): https://helm.sh/docs/intro/install/")
fi

# --- install what can be installed --------------------------------------------

if [ ${#packages[@]} -gt 0 ]; then
  if $is_debian && $is_root; then
    step "installing ${packages[*]}"
    export DEBIAN_FRONTEND=noninteractive
    # Another apt run may hold the lock for a while; wait for it rather than fail.
    apt-get -o DPkg::Lock::Timeout=600 update -qq
    apt-get -o DPkg::Lock::Timeout=600 install -y -qq --no-install-recommends "${packages[@]}"
  elif $is_debian; then
    manual+=("as root: apt-get update && apt-get install -y ${packages[*]}")
  else
    manual+=("these packages, under their names on your system (Debian names given): ${packages[*]}")
  fi
fi

if ! have just; then
  if have cargo; then
    step "installing just (cargo install just --locked)"
    cargo install just --locked --quiet
  else
    manual+=("just: cargo install just --locked (after installing Rust)")
  fi
fi

if ! have cargo-fuzz; then
  if have cargo; then
    step "installing cargo-fuzz (cargo install cargo-fuzz --locked)"
    cargo install cargo-fuzz --locked --quiet
  else
    manual+=("cargo-fuzz: cargo install cargo-fuzz --locked (after installing Rust)")
  fi
fi

# --- PostgreSQL ---------------------------------------------------------------

# True when something accepts TCP connections on 127.0.0.1:5432.
pg_listening() {
  if have pg_isready; then
    pg_isready -q -h 127.0.0.1 -p 5432
  else
    (exec 3<>/dev/tcp/127.0.0.1/5432) 2>/dev/null
  fi
}

if [ -n "${TEST_POSTGRES_URL:-}" ]; then
  step "PostgreSQL: TEST_POSTGRES_URL is set; using it as it is"
elif pg_listening; then
  step "PostgreSQL: running on 127.0.0.1:5432"
else
  step "PostgreSQL: nothing answers on 127.0.0.1:5432"
  stopped=()
  if have pg_lsclusters; then
    # Columns: version, cluster, port, status, ...; only port 5432 is used by the tests.
    while read -r ver name port status _; do
      [ "$port" = 5432 ] && [ "$status" = down ] && stopped+=("$ver $name")
    done < <(pg_lsclusters --no-header 2>/dev/null || true)
  fi
  if [ ${#stopped[@]} -gt 0 ] && $is_root; then
    for cluster in "${stopped[@]}"; do
      echo "  starting the stopped cluster $cluster"
      # shellcheck disable=SC2086 # "version name": two arguments
      pg_ctlcluster --skip-systemctl-redirect $cluster start
    done
    for _ in $(seq 1 30); do
      pg_listening && break
      sleep 1
    done
    pg_listening || manual+=("PostgreSQL was started but does not answer on 127.0.0.1:5432; see /var/log/postgresql/")
  elif [ ${#stopped[@]} -gt 0 ]; then
    manual+=("start PostgreSQL, as root: pg_ctlcluster ${stopped[0]} start")
  else
    manual+=("PostgreSQL on 127.0.0.1:5432 where user postgres connects without a password (Debian: apt-get install postgresql, then put 'host all postgres 127.0.0.1/32 trust' first in its pg_hba.conf and reload), or set TEST_POSTGRES_URL=postgres://USER:PASSWORD@HOST:PORT/postgres for a user that may create databases")
  fi
fi

# --- verdict ------------------------------------------------------------------

if [ ${#manual[@]} -gt 0 ]; then
  {
    echo
    if ! $is_debian; then
      echo "scripts/test.sh: this is not Debian or Ubuntu, so nothing was installed."
    elif ! $is_root; then
      echo "scripts/test.sh: not running as root, so no system package was installed."
    fi
    echo "scripts/test.sh: \`just test\` cannot run yet. Install or do the following, then run scripts/test.sh again:"
    printf '  - %s\n' "${manual[@]}"
  } >&2
  exit 1
fi

# A Helm that sets itself up on first use (the offline one beside the repository installs
# its engine into a venv) does so now, once: the chart tests run in parallel and would
# race to create it.
if have helm; then
  step "helm: $(helm version 2>&1 | tail -n 1)"
fi

if $setup_only; then
  step "set-up complete (--setup-only: not running the tests)"
  exit 0
fi

step "just test"
exec just test
