"""Checks of the chart's alert rules and Grafana dashboard (scripts/chart-check.sh, step 6).

  monitoring-check.py rules RENDERED OUT      writes the `spec` of every PrometheusRule in
                                              the rendered chart to OUT, a rule file that
                                              promtool reads
  monitoring-check.py dashboard JSON OUT      parses the dashboard, writes each panel query
                                              to OUT as a recording rule (Grafana variables
                                              replaced) so that `promtool check rules`
                                              parses every expression
  monitoring-check.py names METRICS_RS FILE.. every metric a rule file or dashboard reads
                                              is one that server/src/metrics.rs registers,
                                              or a known series of another exporter

Errors go to stdout, one a line; the exit status is 1 when there is any.
"""

import json
import re
import sys

import yaml

# Series that come from elsewhere than the server, and which the rules may read.
EXTERNAL = {
    "up": "Prometheus (one per scrape target)",
    "kube_pod_status_ready": "kube-state-metrics",
    "kube_pod_owner": "kube-state-metrics",
    # The standard process-collector names. The server does not export them (yet):
    # until it does, AgentServerOpenFilesNearLimit cannot fire.
    "process_open_fds": "process metrics (not exported by the server)",
    "process_max_fds": "process metrics (not exported by the server)",
}

# Stand-ins for Grafana's variables, so that a query parses as PromQL.
GRAFANA_VARIABLES = {
    "__rate_interval": "5m",
    "__interval": "1m",
    "__range": "1h",
}


def rules(rendered, out):
    groups = []
    for doc in yaml.safe_load_all(open(rendered)):
        if doc and doc.get("kind") == "PrometheusRule":
            groups += doc["spec"]["groups"]
    if not groups:
        print("%s: no PrometheusRule with groups" % rendered)
        return 1
    with open(out, "w") as f:
        yaml.safe_dump({"groups": groups}, f, sort_keys=False)
    return 0


def panels(node):
    for panel in node.get("panels", []):
        yield panel
        yield from panels(panel)


def dashboard(path, out):
    errors = []
    try:
        board = json.load(open(path))
    except ValueError as e:
        print("%s: not JSON: %s" % (path, e))
        return 1
    for key in ("title", "uid", "panels", "schemaVersion"):
        if key not in board:
            errors.append("%s: no %s" % (path, key))
    variables = {v["name"] for v in board.get("templating", {}).get("list", [])}
    recorded, ids = [], set()
    for panel in panels(board):
        if panel.get("type") == "row":
            continue
        title = panel.get("title", "?")
        if panel.get("id") in ids:
            errors.append("%s: panel id %s is used twice" % (path, panel.get("id")))
        ids.add(panel.get("id"))
        targets = panel.get("targets") or []
        if not targets:
            errors.append("%s: panel %r has no query" % (path, title))
        for i, target in enumerate(targets):
            expr = target.get("expr", "")
            if not expr:
                errors.append("%s: panel %r target %d has no expr" % (path, title, i))
                continue

            def substitute(m):
                name = m.group(1) or m.group(2)
                if name in GRAFANA_VARIABLES:
                    return GRAFANA_VARIABLES[name]
                if name not in variables:
                    errors.append("%s: panel %r uses $%s, which is not a dashboard variable" % (path, title, name))
                return "placeholder"

            promql = re.sub(r"\$\{(\w+)\}|\$(\w+)", substitute, expr)
            recorded.append({
                "record": "dashboard:panel_%s_%d" % (panel.get("id"), i),
                "expr": promql,
            })
    with open(out, "w") as f:
        yaml.safe_dump({"groups": [{"name": "dashboard", "rules": recorded}]}, f, sort_keys=False)
    for e in errors:
        print(e)
    return 1 if errors else 0


def server_series(metrics_rs):
    """Every series name the server exposes, from the registrations in metrics.rs."""
    text = open(metrics_rs).read()
    kinds = {}
    for var, expr in re.findall(r"let (\w+)\s*=\s*([^;]+);", text):
        kinds[var] = "counter" if "Counter" in expr else "histogram" if "Histogram" in expr else "gauge"
    prefix = re.search(r'Registry::with_prefix\("(\w+)"\)', text).group(1)
    series = set()
    calls = re.findall(r"registry\.(register(?:_with_unit)?)\(\s*\"(\w+)\",\s*\"[^\"]*\",\s*(?:[\w:]+::Unit::(\w+),\s*)?(\w+)", text)
    for _, name, unit, var in calls:
        base = "%s_%s" % (prefix, name)
        if unit:
            base += "_" + unit.lower()
        kind = kinds.get(var, "gauge")
        if kind == "counter":
            series.add(base + "_total")
        elif kind == "histogram":
            series |= {base + "_bucket", base + "_sum", base + "_count"}
        else:
            series.add(base)
    return series


PROMQL_WORDS = {
    "by", "without", "on", "ignoring", "group_left", "group_right", "and", "or", "unless",
    "offset", "bool", "le",
}


def names(metrics_rs, files):
    known = server_series(metrics_rs)
    errors = []
    for path in files:
        if path.endswith(".json"):
            board = json.load(open(path))
            exprs = [t.get("expr", "") for p in panels(board) for t in p.get("targets") or []]
        else:
            exprs = [r["expr"] for g in yaml.safe_load(open(path))["groups"] for r in g["rules"]]
        for expr in exprs:
            used = set(re.findall(r"\b(agent_server_\w+)", expr))
            # Any other identifier directly followed by a selector is a metric too.
            used |= {m for m in re.findall(r"\b([a-zA-Z_:][\w:]*)\s*\{", expr) if m not in PROMQL_WORDS}
            for metric in sorted(used):
                if metric in known:
                    continue
                if metric in EXTERNAL and not path.endswith(".json"):
                    continue
                errors.append("%s: %s is not a series that server/src/metrics.rs registers" % (path, metric))
    for e in errors:
        print(e)
    return 1 if errors else 0


if __name__ == "__main__":
    command, args = sys.argv[1], sys.argv[2:]
    if command == "rules":
        sys.exit(rules(*args))
    if command == "dashboard":
        sys.exit(dashboard(*args))
    if command == "names":
        sys.exit(names(args[0], args[1:]))
    sys.exit("unknown command %s" % command)
