#!/usr/bin/env bash
# Checks the Helm chart in chart/ the way CI does:
#   1. helm lint --strict with every chart/ci/*-values.yaml;
#   2. helm template for each of them, every manifest validated with
#      kubernetes-validate --strict against Kubernetes 1.31 and the newest
#      release the installed kubernetes-validate knows; the CRD kinds it has no
#      schema for (ServiceMonitor, HTTPRoute, PrometheusRule, Traefik's
#      Middleware) are checked here instead;
#   3. every chart/tests/bad-values/*.yaml must make helm template fail, with
#      the message named on its `# expect:` line;
#   4. checkov on the rendered manifests (chart/.checkov.yaml lists, with
#      reasons, the checks that do not apply);
#   5. chart/README.md's values table matches the `## @param` lines of
#      values.yaml, and every value is documented;
#   6. the PrometheusRule as rendered with chart/ci/monitoring-values.yaml
#      passes `promtool check rules` and the unit tests in
#      chart/tests/monitoring; every query of the Grafana dashboard
#      (chart/files/grafana-dashboard.json) parses; the rules and the dashboard
#      read only series that server/src/metrics.rs registers;
#   7. the chart as a subchart: an umbrella chart generated in target/ (with
#      `global` values and the `agent-server.enabled` condition) is linted,
#      rendered and validated like the ci files, and renders nothing of this
#      chart when the condition is false.
# Every step runs even when an earlier one failed; the exit status is non-zero
# if any failed.
#
# Usage: scripts/chart-check.sh            run the checks
#        scripts/chart-check.sh --readme   rewrite the values table in chart/README.md
#
# Needs python3 and helm. When helm is not on PATH, the one in ../shared/tools
# beside the repository is used. kubernetes-validate and checkov come from
# target/chart-venv, else from PATH; when neither has them they are installed
# with pip into target/chart-venv, which later runs reuse.
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
chart="$repo/chart"
out="$repo/target/chart-check"
venv="$repo/target/chart-venv"
release=agent-server
namespace=agent-system
baseline_kube=1.31.0
# Kubernetes 1.29 lacks the native preStop sleep: one render checks that path.
fallback_kube=1.29.0

failed=()
step() { printf '\n==> %s\n' "$*"; }
ok() { printf '  ok    %s\n' "$*"; }
bad() { printf '  FAIL  %s\n' "$*"; failed+=("$*"); }

if ! command -v helm >/dev/null 2>&1 && [ -x "$repo/../shared/tools/helm" ]; then
  PATH="$(cd "$repo/../shared/tools" && pwd):$PATH"
  export PATH
fi
if ! command -v helm >/dev/null 2>&1; then
  echo "chart-check: helm not found on PATH nor in $repo/../shared/tools" >&2
  exit 2
fi

# --- tools -------------------------------------------------------------------

step "Python tools (kubernetes-validate, checkov)"
if [ -x "$venv/bin/kubernetes-validate" ] && [ -x "$venv/bin/checkov" ]; then
  py="$venv/bin/python" kubernetes_validate="$venv/bin/kubernetes-validate" checkov="$venv/bin/checkov"
elif command -v kubernetes-validate >/dev/null 2>&1 && command -v checkov >/dev/null 2>&1 &&
  python3 -c 'import yaml, kubernetes_validate' 2>/dev/null; then
  py=python3 kubernetes_validate=kubernetes-validate checkov=checkov
else
  echo "  installing into ${venv#"$repo"/} with pip (first run only)..."
  if ! python3 -m venv "$venv"; then
    echo "chart-check: python3 -m venv failed; install python3-venv (Debian/Ubuntu)," \
      "or pip install kubernetes-validate checkov" >&2
    exit 2
  fi
  "$venv/bin/python" -m pip install --quiet --disable-pip-version-check \
    'kubernetes-validate>=1.31' 'checkov>=3'
  py="$venv/bin/python" kubernetes_validate="$venv/bin/kubernetes-validate" checkov="$venv/bin/checkov"
fi
latest_kube="$("$py" -c 'import kubernetes_validate.utils as u; print(u.latest_version())')"
ok "helm $(helm version 2>/dev/null | sed -n 's/^[^"]*Version:"\([^"]*\)".*/\1/p'), kubernetes-validate $("$kubernetes_validate" --version), $("$checkov" --version | sed 's/^/checkov /'), schemas up to $latest_kube"

# Python used by several steps: CRD checks and the README values table.
helper="$out/chart_check.py"
mkdir -p "$out"
cat >"$helper" <<'PY'
"""Helpers of scripts/chart-check.sh (written by it on each run)."""
import json
import re
import sys

import yaml

# Kinds that kubernetes-validate has no schema for, and that this file checks.
CRD_KINDS = {
    ("monitoring.coreos.com/v1", "ServiceMonitor"),
    ("gateway.networking.k8s.io/v1", "HTTPRoute"),
    ("monitoring.coreos.com/v1", "PrometheusRule"),
    ("traefik.io/v1alpha1", "Middleware"),
}
PROM_DURATION = re.compile(r"^(0|(([0-9]+)y)?(([0-9]+)w)?(([0-9]+)d)?(([0-9]+)h)?(([0-9]+)m)?(([0-9]+)s)?(([0-9]+)ms)?)$")
GATEWAY_DURATION = re.compile(r"^([0-9]{1,5}(h|m|s|ms)){1,4}$")
DNS_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$")
HOSTNAME = re.compile(r"^(\*\.)?[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")


def gateway_seconds(text):
    units = {"h": 3600, "m": 60, "s": 1, "ms": 0.001}
    return sum(int(n) * units[u] for n, u in re.findall(r"([0-9]+)(ms|h|m|s)", text))


def check_service_monitor(doc, services, errors):
    name = doc.get("metadata", {}).get("name")
    spec = doc.get("spec") or {}
    where = "ServiceMonitor/%s" % name
    if not name:
        errors.append("%s: metadata.name is required" % where)
    selector = spec.get("selector")
    if not isinstance(selector, dict) or not (selector.get("matchLabels") or selector.get("matchExpressions")):
        errors.append("%s: spec.selector is required and must select something" % where)
        selector = {}
    endpoints = spec.get("endpoints")
    if not isinstance(endpoints, list) or not endpoints:
        errors.append("%s: spec.endpoints must list at least one endpoint" % where)
        endpoints = []
    wanted = selector.get("matchLabels") or {}
    matching = [s for s in services if all(s["labels"].get(k) == v for k, v in wanted.items())]
    if wanted and not matching:
        errors.append("%s: spec.selector matches no Service of the release" % where)
    for i, ep in enumerate(endpoints):
        if not ep.get("port") and ep.get("targetPort") is None:
            errors.append("%s: endpoints[%d] needs port or targetPort" % (where, i))
        if ep.get("port") and matching and not any(ep["port"] in s["portNames"] for s in matching):
            errors.append("%s: endpoints[%d].port %r is not a port name of the selected Service" % (where, i, ep["port"]))
        for key in ("interval", "scrapeTimeout"):
            if key in ep and not PROM_DURATION.match(str(ep[key])):
                errors.append("%s: endpoints[%d].%s %r is not a Prometheus duration" % (where, i, key, ep[key]))
        if "path" in ep and not str(ep["path"]).startswith("/"):
            errors.append("%s: endpoints[%d].path must start with /" % (where, i))
        unknown = set(ep) - {"port", "targetPort", "path", "interval", "scrapeTimeout", "scheme",
                             "honorLabels", "relabelings", "metricRelabelings", "tlsConfig", "params",
                             "bearerTokenSecret", "authorization", "basicAuth", "followRedirects"}
        if unknown:
            errors.append("%s: endpoints[%d] has unknown fields %s" % (where, i, sorted(unknown)))


def check_http_route(doc, services, errors):
    name = doc.get("metadata", {}).get("name")
    spec = doc.get("spec") or {}
    where = "HTTPRoute/%s" % name
    if not name:
        errors.append("%s: metadata.name is required" % where)
    parents = spec.get("parentRefs")
    if not isinstance(parents, list) or not parents:
        errors.append("%s: spec.parentRefs must name at least one Gateway" % where)
        parents = []
    for i, ref in enumerate(parents):
        if not isinstance(ref, dict) or not DNS_SUBDOMAIN.match(str(ref.get("name", ""))):
            errors.append("%s: parentRefs[%d].name is required (a DNS subdomain)" % (where, i))
    for host in spec.get("hostnames") or []:
        if not HOSTNAME.match(str(host)):
            errors.append("%s: hostname %r is not valid" % (where, host))
    rules = spec.get("rules") or []
    if not 1 <= len(rules) <= 16:
        errors.append("%s: spec.rules must have 1 to 16 rules" % where)
    for i, rule in enumerate(rules):
        unknown = set(rule) - {"name", "matches", "filters", "backendRefs", "timeouts", "retry", "sessionPersistence"}
        if unknown:
            errors.append("%s: rules[%d] has unknown fields %s" % (where, i, sorted(unknown)))
        for match in rule.get("matches") or []:
            path = match.get("path") or {}
            if path.get("type", "PathPrefix") not in ("Exact", "PathPrefix", "RegularExpression"):
                errors.append("%s: rules[%d] path type %r is not valid" % (where, i, path.get("type")))
            if not str(path.get("value", "/")).startswith("/"):
                errors.append("%s: rules[%d] path value must start with /" % (where, i))
        for j, backend in enumerate(rule.get("backendRefs") or []):
            if not backend.get("name"):
                errors.append("%s: rules[%d].backendRefs[%d].name is required" % (where, i, j))
            if backend.get("kind", "Service") == "Service":
                if "port" not in backend:
                    errors.append("%s: rules[%d].backendRefs[%d].port is required for a Service" % (where, i, j))
                svc = [s for s in services if s["name"] == backend.get("name")]
                if not svc or backend.get("port") not in svc[0]["ports"]:
                    errors.append("%s: rules[%d].backendRefs[%d] names no port of a rendered Service" % (where, i, j))
        timeouts = rule.get("timeouts") or {}
        for key, value in timeouts.items():
            if key not in ("request", "backendRequest"):
                errors.append("%s: rules[%d].timeouts.%s is not a field" % (where, i, key))
            elif not GATEWAY_DURATION.match(str(value)):
                errors.append("%s: rules[%d].timeouts.%s %r is not a Gateway API duration" % (where, i, key, value))
        if "request" in timeouts and "backendRequest" in timeouts:
            request, backend = gateway_seconds(str(timeouts["request"])), gateway_seconds(str(timeouts["backendRequest"]))
            if request != 0 and backend > request:
                errors.append("%s: rules[%d].timeouts.backendRequest exceeds request" % (where, i))


def check_traefik_middleware(doc, ingresses, errors):
    """A Buffering Middleware (the only kind the chart renders) that some Ingress uses."""
    meta = doc.get("metadata", {})
    name = meta.get("name")
    where = "Middleware/%s" % name
    if not name or not DNS_SUBDOMAIN.match(str(name)):
        errors.append("%s: metadata.name is required (a DNS subdomain)" % where)
    spec = doc.get("spec") or {}
    if set(spec) != {"buffering"}:
        errors.append("%s: spec must hold exactly one middleware, buffering" % where)
    buffering = spec.get("buffering") or {}
    unknown = set(buffering) - {"maxRequestBodyBytes", "memRequestBodyBytes", "maxResponseBodyBytes",
                                "memResponseBodyBytes", "retryExpression"}
    if unknown:
        errors.append("%s: buffering has unknown fields %s" % (where, sorted(unknown)))
    for key in ("maxRequestBodyBytes", "memRequestBodyBytes", "maxResponseBodyBytes", "memResponseBodyBytes"):
        if key in buffering and (not isinstance(buffering[key], int) or isinstance(buffering[key], bool) or buffering[key] < 0):
            errors.append("%s: buffering.%s must be a whole number of bytes" % (where, key))
    ref = "%s-%s@kubernetescrd" % (meta.get("namespace"), name)
    used = [i for i in ingresses
            if ref in str((i.get("metadata", {}).get("annotations") or {}).get("traefik.ingress.kubernetes.io/router.middlewares", "")).split(",")]
    if not used:
        errors.append("%s: no Ingress names it (%s)" % (where, ref))


def check_prometheus_rule(doc, errors):
    """The resource's shape; the rules themselves are checked by promtool (step 6)."""
    name = doc.get("metadata", {}).get("name")
    where = "PrometheusRule/%s" % name
    if not name:
        errors.append("%s: metadata.name is required" % where)
    groups = (doc.get("spec") or {}).get("groups")
    if not isinstance(groups, list) or not groups:
        errors.append("%s: spec.groups must list at least one group" % where)
        groups = []
    for group in groups:
        if not group.get("name") or not group.get("rules"):
            errors.append("%s: every group needs a name and rules" % where)
        if "interval" in group and not PROM_DURATION.match(str(group["interval"])):
            errors.append("%s: group interval %r is not a Prometheus duration" % (where, group["interval"]))
        for rule in group.get("rules") or []:
            if "alert" in rule and not (rule.get("annotations") or {}).get("runbook_url"):
                errors.append("%s: alert %s has no runbook_url" % (where, rule["alert"]))


def split(rendered, core_path):
    """Writes the built-in kinds to core_path and checks the CRD kinds; prints errors."""
    docs = [d for d in yaml.safe_load_all(open(rendered)) if d]
    services = [{
        "name": d["metadata"]["name"],
        "labels": d["metadata"].get("labels") or {},
        "ports": [p.get("port") for p in d["spec"].get("ports", [])],
        "portNames": [p.get("name") for p in d["spec"].get("ports", [])],
    } for d in docs if d.get("kind") == "Service"]
    core, errors = [], []
    for doc in docs:
        key = (doc.get("apiVersion"), doc.get("kind"))
        if key == ("monitoring.coreos.com/v1", "ServiceMonitor"):
            check_service_monitor(doc, services, errors)
        elif key == ("gateway.networking.k8s.io/v1", "HTTPRoute"):
            check_http_route(doc, services, errors)
        elif key == ("monitoring.coreos.com/v1", "PrometheusRule"):
            check_prometheus_rule(doc, errors)
        elif key == ("traefik.io/v1alpha1", "Middleware"):
            check_traefik_middleware(doc, [d for d in docs if d.get("kind") == "Ingress"], errors)
        elif "." in str(key[0]).split("/")[0] and not str(key[0]).split("/")[0].endswith(".k8s.io"):
            errors.append("%s %s: a custom resource this script has no check for" % key)
        else:
            core.append(doc)
    with open(core_path, "w") as f:
        yaml.safe_dump_all(core, f, sort_keys=False)
    for e in errors:
        print(e)
    return 1 if errors else 0


# --- README values table ---------------------------------------------------

START, END = "<!-- values-table:start -->", "<!-- values-table:end -->"


def params(values_path):
    """(sections, documented keys) from the `## @section` / `## @param` lines."""
    sections, keys = [], set()
    for line in open(values_path):
        line = line.strip()
        m = re.match(r"^## @section (.+)$", line)
        if m:
            sections.append((m.group(1).strip(), []))
            continue
        m = re.match(r"^## @param (\S+) (.+)$", line)
        if m:
            if not sections:
                sections.append(("Parameters", []))
            sections[-1][1].append((m.group(1), m.group(2).strip()))
            keys.add(m.group(1))
    return sections, keys


def lookup(values, dotted):
    node = values
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            raise KeyError(dotted)
        node = node[part]
    return node


def leaves(node, prefix=""):
    if isinstance(node, dict) and node:
        for k, v in node.items():
            yield from leaves(v, prefix + k + ".")
    else:
        yield prefix[:-1]


def table(values_path):
    values = yaml.safe_load(open(values_path))
    sections, _ = params(values_path)
    lines = []
    for title, rows in sections:
        lines += ["", "### " + title, "", "| Name | Description | Default |", "| ---- | ----------- | ------- |"]
        for key, desc in rows:
            default = json.dumps(lookup(values, key), separators=(",", ":"))
            lines.append("| `%s` | %s | `%s` |" % (key, desc.replace("|", "\\|"), default.replace("|", "\\|")))
    return "\n".join(lines + [""])


def readme(values_path, readme_path, write):
    values = yaml.safe_load(open(values_path))
    _, keys = params(values_path)
    errors = []
    for key in sorted(keys):
        try:
            lookup(values, key)
        except KeyError:
            errors.append("values.yaml: @param %s names no value" % key)
    for leaf in leaves(values):
        parts = leaf.split(".")
        if not any(".".join(parts[:n]) in keys for n in range(1, len(parts) + 1)):
            errors.append("values.yaml: %s has no @param line (nor has any parent)" % leaf)
    text = open(readme_path).read()
    if START not in text or END not in text:
        errors.append("%s: the %s / %s markers are missing" % (readme_path, START, END))
    else:
        head, rest = text.split(START, 1)
        _, tail = rest.split(END, 1)
        wanted = head + START + "\n" + table(values_path) + END + tail
        if write:
            open(readme_path, "w").write(wanted)
        elif wanted != text:
            errors.append("%s: the values table is out of date; run scripts/chart-check.sh --readme" % readme_path)
    for e in errors:
        print(e)
    return 1 if errors else 0


if __name__ == "__main__":
    cmd = sys.argv[1]
    if cmd == "split":
        sys.exit(split(sys.argv[2], sys.argv[3]))
    if cmd == "readme":
        sys.exit(readme(sys.argv[2], sys.argv[3], sys.argv[4] == "write"))
    sys.exit("unknown command %s" % cmd)
PY

if [ "${1:-}" = "--readme" ]; then
  "$py" "$helper" readme "$chart/values.yaml" "$chart/README.md" write
  echo "chart/README.md: values table rewritten"
  exit 0
fi

shopt -s nullglob
ci_files=("$chart"/ci/*-values.yaml)
bad_files=("$chart"/tests/bad-values/*.yaml)
if [ ${#ci_files[@]} -eq 0 ]; then
  echo "chart-check: no chart/ci/*-values.yaml" >&2
  exit 2
fi
rm -rf "$out/render" "$out/checkov"
mkdir -p "$out/render" "$out/checkov"

# --- 1. lint -----------------------------------------------------------------

step "helm lint --strict, ${#ci_files[@]} values files"
for values in "${ci_files[@]}"; do
  name="${values#"$chart"/}"
  if log="$(helm lint --strict --namespace "$namespace" "$chart" -f "$values" 2>&1)"; then
    ok "$name"
  else
    bad "helm lint $name"
    printf '%s\n' "$log" | sed 's/^/        /'
  fi
done

# --- 2. render and validate --------------------------------------------------

# These renders have no cluster behind them, where the chart (secrets.generate:
# auto) refuses to make up secrets that would change on every render. Like a
# cluster's `lookup`, --set secrets.generate=true lets it, except for the values
# files that choose secrets.generate themselves (the GitOps ones).
generate_flag() {
  grep -q '^secrets:' "$1" || echo "--set secrets.generate=true"
}

# render NAME VALUES KUBE_VERSION -> renders into $out/render/NAME-KUBE.yaml and
# validates it; returns non-zero on any failure.
render_and_validate() {
  local name="$1" values="$2" kube="$3" file log
  file="$out/render/$name-$kube.yaml"
  # shellcheck disable=SC2046 # generate_flag prints zero or two words
  if ! log="$(helm template "$release" "$chart" --namespace "$namespace" -f "$values" $(generate_flag "$values") --kube-version "$kube" 2>&1 >"$file")"; then
    bad "helm template $name (Kubernetes $kube)"
    printf '%s\n' "$log" | sed 's/^/        /'
    return 1
  fi
  if ! log="$("$py" "$helper" split "$file" "${file%.yaml}.core.yaml" 2>&1)"; then
    bad "custom resources of $name (Kubernetes $kube)"
    printf '%s\n' "$log" | sed 's/^/        /'
    return 1
  fi
  # --quiet prints only failures and warnings; with the custom resources
  # removed, a warning (no schema for a kind) is a failure too.
  if ! log="$("$kubernetes_validate" --strict --quiet -k "$kube" "${file%.yaml}.core.yaml" 2>&1)" || [ -n "$log" ]; then
    bad "kubernetes-validate --strict $name (Kubernetes $kube)"
    printf '%s\n' "$log" | sed 's/^/        /'
    return 1
  fi
  ok "$name: $(grep -c '^kind:' "$file") manifests valid for Kubernetes $kube"
}

step "helm template | kubernetes-validate --strict, Kubernetes $baseline_kube and $latest_kube"
for values in "${ci_files[@]}"; do
  name="$(basename "$values" .yaml)"
  for kube in "$baseline_kube" "$latest_kube"; do
    render_and_validate "$name" "$values" "$kube" || true
  done
  cp "$out/render/$name-$latest_kube.yaml" "$out/checkov/$name.yaml" 2>/dev/null || true
done
render_and_validate "default-values" "$chart/ci/default-values.yaml" "$fallback_kube" || true

# --- 3. values the chart must refuse -----------------------------------------

step "helm template refuses ${#bad_files[@]} bad values files"
for values in "${bad_files[@]}"; do
  name="${values#"$chart"/}"
  expect="$(sed -n 's/^# expect: //p' "$values" | head -n 1)"
  # shellcheck disable=SC2046 # generate_flag prints zero or two words
  if log="$(helm template "$release" "$chart" --namespace "$namespace" -f "$values" $(generate_flag "$values") 2>&1 >/dev/null)"; then
    bad "$name was accepted"
  elif [ -n "$expect" ] && ! grep -qF -- "$expect" <<<"$log"; then
    bad "$name was refused, but not for '$expect'"
    printf '%s\n' "$log" | sed 's/^/        /'
  else
    ok "$name refused (${expect:-no expectation given})"
  fi
done
if [ ${#bad_files[@]} -eq 0 ]; then
  bad "no chart/tests/bad-values/*.yaml"
fi

# --- 4. checkov ---------------------------------------------------------------

step "checkov (kubernetes framework) on the rendered manifests"
if log="$("$checkov" -d "$out/checkov" --config-file "$chart/.checkov.yaml" 2>&1)"; then
  ok "$(grep -E 'Passed checks' <<<"$log" | head -n 1 | sed 's/^ *//')"
else
  bad "checkov"
  printf '%s\n' "$log" | sed 's/^/        /'
fi

# --- 5. README -----------------------------------------------------------------

step "chart/README.md values table matches values.yaml"
if log="$("$py" "$helper" readme "$chart/values.yaml" "$chart/README.md" check 2>&1)"; then
  ok "every value documented, table up to date"
else
  bad "values documentation"
  printf '%s\n' "$log" | sed 's/^/        /'
fi

# --- 6. alert rules and dashboard (promtool) --------------------------------------

# promtool comes from PATH, else from target/promtool, where it is unpacked from
# Debian's `prometheus` package (apt-get download: no root needed, and no
# Prometheus server installed or started). Without it the step is a loud skip,
# and a failure in CI.
step "alert rules and dashboard: promtool check rules, promtool test rules"
monitoring_values="$chart/ci/monitoring-values.yaml"
monitoring_tests="$chart/tests/monitoring"
promdir="$out/promtool"
rm -rf "$promdir" && mkdir -p "$promdir"
if ! log="$(helm template "$release" "$chart" --namespace "$namespace" -f "$monitoring_values" --set secrets.generate=true 2>&1 >"$promdir/rendered.yaml")"; then
  bad "helm template with ${monitoring_values#"$chart"/}"
  printf '%s\n' "$log" | sed 's/^/        /'
elif ! log="$("$py" "$repo/scripts/monitoring-check.py" rules "$promdir/rendered.yaml" "$promdir/rules.yaml" 2>&1)"; then
  bad "PrometheusRule in the rendered chart"
  printf '%s\n' "$log" | sed 's/^/        /'
fi
# The dashboard's queries become recording rules, so that promtool parses them.
if log="$("$py" "$repo/scripts/monitoring-check.py" dashboard "$chart/files/grafana-dashboard.json" "$promdir/dashboard-rules.yaml" 2>&1)"; then
  ok "dashboard: chart/files/grafana-dashboard.json parses, every panel has queries"
else
  rm -f "$promdir/dashboard-rules.yaml"
  bad "dashboard chart/files/grafana-dashboard.json"
  printf '%s\n' "$log" | sed 's/^/        /'
fi
promtool_bin=""
if command -v promtool >/dev/null 2>&1; then
  promtool_bin="$(command -v promtool)"
elif [ -x "$repo/target/promtool/usr/bin/promtool" ]; then
  promtool_bin="$repo/target/promtool/usr/bin/promtool"
elif command -v apt-get >/dev/null 2>&1; then
  echo "  unpacking promtool from Debian's prometheus package into target/promtool (first run only)..."
  mkdir -p "$repo/target/promtool"
  fetch_promtool() {
    (cd "$repo/target/promtool" && rm -f prometheus_*.deb && apt-get download -q prometheus >/dev/null 2>&1 &&
      dpkg-deb --fsys-tarfile prometheus_*.deb | tar -x ./usr/bin/promtool && rm -f prometheus_*.deb)
  }
  # A machine that never ran `apt-get update` has no package lists yet.
  if fetch_promtool || { [ "$(id -u)" -eq 0 ] && apt-get update -qq && fetch_promtool; }; then
    promtool_bin="$repo/target/promtool/usr/bin/promtool"
  fi
fi
if [ -z "$promtool_bin" ]; then
  if [ -n "${CI:-}" ]; then
    bad "promtool not found (Debian: apt-get install prometheus, or put promtool on PATH)"
  else
    echo "  SKIP  promtool not found, alert rules not checked (Debian: apt-get install prometheus, or put promtool on PATH); CI fails here"
  fi
else
  if [ -f "$promdir/rules.yaml" ]; then
    if log="$("$promtool_bin" check rules "$promdir/rules.yaml" 2>&1)"; then
      ok "promtool check rules: $(grep -o '[0-9]* rules found' <<<"$log")"
    else
      bad "promtool check rules"
      printf '%s\n' "$log" | sed 's/^/        /'
    fi
    # The tests name `rules.yaml` beside them: run them from the render directory.
    cp "$monitoring_tests"/*.test.yaml "$promdir/"
    if log="$(cd "$promdir" && "$promtool_bin" test rules ./*.test.yaml 2>&1)"; then
      ok "promtool test rules: $(grep -c '^  - name:' "$monitoring_tests"/*.test.yaml | awk -F: '{n += $NF} END {print n}') tests of chart/tests/monitoring pass"
    else
      bad "promtool test rules (chart/tests/monitoring)"
      printf '%s\n' "$log" | sed 's/^/        /'
    fi
  fi
  if [ -f "$promdir/dashboard-rules.yaml" ]; then
    if log="$("$promtool_bin" check rules "$promdir/dashboard-rules.yaml" 2>&1)"; then
      ok "dashboard: all $(grep -o '[0-9]* rules found' <<<"$log" | cut -d' ' -f1) PromQL queries parse"
    else
      bad "dashboard queries (chart/files/grafana-dashboard.json)"
      printf '%s\n' "$log" | sed 's/^/        /'
    fi
  fi
fi
# Without promtool too: every series the rules and the dashboard read exists.
name_files=("$chart/files/grafana-dashboard.json")
if [ -f "$promdir/rules.yaml" ]; then
  name_files+=("$promdir/rules.yaml")
fi
if log="$("$py" "$repo/scripts/monitoring-check.py" names "$repo/server/src/metrics.rs" "${name_files[@]}" 2>&1)"; then
  ok "every series the alert rules and the dashboard read is registered in server/src/metrics.rs (or comes from Prometheus, kube-state-metrics or process metrics)"
else
  bad "series names in the alert rules or the dashboard"
  printf '%s\n' "$log" | sed 's/^/        /'
fi

# --- 7. as a subchart ------------------------------------------------------------

step "as a subchart of an umbrella chart"
umbrella="$out/umbrella"
rm -rf "$umbrella"
mkdir -p "$umbrella/charts" "$umbrella/templates"
cp -R "$chart" "$umbrella/charts/agent-server"
chart_version="$(sed -n 's/^version: *//p' "$chart/Chart.yaml")"
cat >"$umbrella/Chart.yaml" <<EOF
apiVersion: v2
name: platform
description: An umbrella chart that bundles agent-server, as users' platform charts do.
version: 1.0.0
dependencies:
  - name: agent-server
    version: "$chart_version"
    condition: agent-server.enabled
EOF
cat >"$umbrella/values.yaml" <<'EOF'
# Helm hands `global` to every subchart, so the subchart's schema must accept it.
global:
  imageRegistry: registry.example.com
  environment: staging
agent-server:
  enabled: true
  secrets:
    generate: true
  ingress:
    enabled: true
    host: agent.platform.example.com
EOF
cat >"$umbrella/templates/environment.yaml" <<'EOF'
apiVersion: v1
kind: ConfigMap
metadata:
  name: {{ .Release.Name }}-environment
  namespace: {{ .Release.Namespace }}
data:
  environment: {{ .Values.global.environment | quote }}
EOF
if log="$(helm lint --strict --namespace "$namespace" "$umbrella" 2>&1)"; then
  ok "helm lint --strict of the umbrella chart"
else
  bad "helm lint of the umbrella chart"
  printf '%s\n' "$log" | sed 's/^/        /'
fi
for kube in "$baseline_kube" "$latest_kube"; do
  file="$out/render/umbrella-$kube.yaml"
  if ! log="$(helm template platform "$umbrella" --namespace "$namespace" --kube-version "$kube" 2>&1 >"$file")"; then
    bad "helm template of the umbrella chart (Kubernetes $kube)"
    printf '%s\n' "$log" | sed 's/^/        /'
  elif ! grep -q '^  name: platform-agent-server$' "$file"; then
    bad "the umbrella chart rendered no platform-agent-server objects (Kubernetes $kube)"
  elif ! log="$("$py" "$helper" split "$file" "${file%.yaml}.core.yaml" 2>&1)" ||
    ! log="$("$kubernetes_validate" --strict --quiet -k "$kube" "${file%.yaml}.core.yaml" 2>&1)" || [ -n "$log" ]; then
    bad "kubernetes-validate --strict of the umbrella chart (Kubernetes $kube)"
    printf '%s\n' "$log" | sed 's/^/        /'
  else
    ok "umbrella: $(grep -c '^kind:' "$file") manifests valid for Kubernetes $kube"
  fi
done
if log="$(helm template platform "$umbrella" --namespace "$namespace" --set agent-server.enabled=false 2>&1)" &&
  ! grep -q 'agent-server' <<<"$log"; then
  ok "umbrella with agent-server.enabled=false renders none of it"
else
  bad "umbrella with agent-server.enabled=false"
  printf '%s\n' "$log" | head -n 20 | sed 's/^/        /'
fi

# --- result -------------------------------------------------------------------

echo
if [ ${#failed[@]} -gt 0 ]; then
  echo "chart-check: ${#failed[@]} failure(s):"
  printf '  - %s\n' "${failed[@]}"
  exit 1
fi
echo "chart-check: all checks passed"
