#!/usr/bin/env python3
"""The checks of scripts/observe.sh (standard library only).

  observe_check.py dashboard DASHBOARD.json DATASOURCES.yml PROVIDER.yml COMPOSE.yaml
      The dashboard's structure: it parses, panel ids are unique, every panel sits inside the 24-column grid without
      overlapping another, every panel, target and variable names the provisioned datasource's uid, every target has
      a refId (unique in its panel) and an expression, and the provisioning paths are the ones docker-compose.yaml
      mounts.
  observe_check.py queries PROMETHEUS_URL ALERTS.yml DASHBOARD.json
      Every PromQL expression of the alert rules (as Prometheus loaded them, from /api/v1/rules) and of the dashboard
      (targets and variables) through /api/v1/query; fails on any that errors or returns no series. The rule for
      expressions that may be empty while all is well: an alert expression ending in `<op> <number>` that returns
      nothing is queried again without that comparison, and that must return series (so a wrong metric or label
      name still fails). Dashboard expressions get no such leeway. Grafana's variables are replaced as Grafana would
      with every instance selected: $__rate_interval -> 1m (Prometheus scrapes every second here), $instance -> .+
      (the variable's allValue); `label_values(SELECTOR, LABEL)` is queried as `count by (LABEL) (SELECTOR)`.
  observe_check.py alert PROMETHEUS_URL ALERTNAME INSTANCE SECONDS
      Waits (at most SECONDS) until ALERTNAME is firing for INSTANCE in /api/v1/alerts; prints when it went pending
      and when it fired.
  observe_check.py quiet PROMETHEUS_URL ALERTNAME
      Fails if ALERTNAME is pending or firing now.

Exit status: 0 when the check holds, 1 when it does not, 2 on bad usage.
"""

import json
import re
import sys
import time
import urllib.parse
import urllib.request

GRID_COLUMNS = 24
# A trailing comparison with a number, as Prometheus prints a parsed expression (`... > 0.05`, `... == 0`).
TRAILING_COMPARISON = re.compile(r"^(?P<lhs>.*?)\s*(?:==|!=|>=|<=|>|<)\s*(?:bool\s+)?-?[0-9.]+(?:e[-+]?[0-9]+)?\s*$", re.S)
LABEL_VALUES = re.compile(r"^\s*label_values\(\s*(?P<selector>.+?)\s*,\s*(?P<label>[a-zA-Z_][a-zA-Z0-9_]*)\s*\)\s*$", re.S)
SUBSTITUTIONS = [("$__rate_interval", "1m"), ("${instance}", ".+"), ("$instance", ".+")]


def fail(message):
    print(f"FAIL {message}")
    return 1


def walk_panels(panels):
    for panel in panels:
        yield panel
        yield from walk_panels(panel.get("panels", []))


def yaml_value(path, key):
    """The value of the first `key: value` line of a small YAML file of ours (no YAML library needed)."""
    with open(path, encoding="utf-8") as f:
        for line in f:
            m = re.match(rf"^\s*(?:-\s+)?{re.escape(key)}:\s*(\S+)\s*$", line)
            if m:
                return m.group(1).strip("'\"")
    return None


def check_dashboard(dashboard_path, datasources_path, provider_path, compose_path):
    errors = 0
    with open(dashboard_path, encoding="utf-8") as f:
        dash = json.load(f)
    uid = yaml_value(datasources_path, "uid")
    if not uid:
        return fail(f"{datasources_path}: no datasource uid")
    for key in ("uid", "title", "schemaVersion", "panels"):
        if key not in dash:
            errors += fail(f"dashboard without {key!r}")
    if not isinstance(dash.get("schemaVersion"), int):
        errors += fail("schemaVersion is not a number")
    ids = {}
    cells = {}
    exprs = 0
    for panel in walk_panels(dash.get("panels", [])):
        name = f"panel {panel.get('id')} ({panel.get('title')!r})"
        if panel.get("id") in ids:
            errors += fail(f"{name}: id already used by {ids[panel.get('id')]}")
        ids[panel.get("id")] = name
        grid = panel.get("gridPos", {})
        if not all(isinstance(grid.get(k), int) for k in ("x", "y", "w", "h")):
            errors += fail(f"{name}: gridPos needs integer x, y, w, h")
            continue
        if grid["x"] < 0 or grid["w"] < 1 or grid["h"] < 1 or grid["x"] + grid["w"] > GRID_COLUMNS:
            errors += fail(f"{name}: gridPos {grid} leaves the {GRID_COLUMNS}-column grid")
        for x in range(grid["x"], grid["x"] + grid["w"]):
            for y in range(grid["y"], grid["y"] + grid["h"]):
                if (x, y) in cells:
                    errors += fail(f"{name} overlaps {cells[(x, y)]} at column {x}, row {y}")
                    break
                cells[(x, y)] = name
            else:
                continue
            break
        if panel.get("type") == "row":
            continue
        if not panel.get("title"):
            errors += fail(f"{name}: no title")
        if panel.get("datasource", {}).get("uid") != uid:
            errors += fail(f"{name}: datasource {panel.get('datasource')} is not the provisioned uid {uid!r}")
        targets = panel.get("targets", [])
        if not targets:
            errors += fail(f"{name}: no targets")
        refs = set()
        for target in targets:
            if not target.get("refId") or target.get("refId") in refs:
                errors += fail(f"{name}: target refId missing or repeated: {target.get('refId')!r}")
            refs.add(target.get("refId"))
            if not str(target.get("expr", "")).strip():
                errors += fail(f"{name}: target {target.get('refId')} has no expr")
            if target.get("datasource", {}).get("uid") != uid:
                errors += fail(f"{name}: target {target.get('refId')} datasource is not {uid!r}")
            exprs += 1
    for var in dash.get("templating", {}).get("list", []):
        if var.get("type") == "query" and var.get("datasource", {}).get("uid") != uid:
            errors += fail(f"variable {var.get('name')}: datasource is not {uid!r}")
    mounted = yaml_value(provider_path, "path")
    with open(compose_path, encoding="utf-8") as f:
        compose = f.read()
    if not mounted or f"./deploy/grafana/dashboards:{mounted}" not in compose:
        errors += fail(f"{compose_path} does not mount deploy/grafana/dashboards at the provider's path {mounted!r}")
    if "./deploy/grafana/provisioning:/etc/grafana/provisioning" not in compose:
        errors += fail(f"{compose_path} does not mount deploy/grafana/provisioning")
    if "./deploy/prometheus:/etc/prometheus" not in compose:
        errors += fail(f"{compose_path} does not mount deploy/prometheus")
    if errors:
        return 1
    print(f"ok   dashboard {dashboard_path}: {len(ids)} panels, {exprs} expressions, datasource {uid!r}, mounts match")
    return 0


def get(prometheus, path, params=None):
    url = prometheus.rstrip("/") + path
    if params:
        url += "?" + urllib.parse.urlencode(params)
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return json.load(response)
    except urllib.error.HTTPError as err:  # 400 for a bad query still carries a JSON body
        return json.load(err)


def query(prometheus, expr):
    """(error, number of series)."""
    answer = get(prometheus, "/api/v1/query", {"query": expr})
    if answer.get("status") != "success":
        return f"{answer.get('errorType')}: {answer.get('error')}", 0
    result = answer["data"]["result"]
    if answer["data"]["resultType"] in ("scalar", "string"):
        return None, 1
    return None, len(result)


def short(expr):
    return " ".join(expr.split())


def check_queries(prometheus, alerts_path, dashboard_path):
    errors = 0
    with open(alerts_path, encoding="utf-8") as f:
        declared = len(re.findall(r"^\s*-\s*alert:", f.read(), re.M))
    rules = [
        rule
        for group in get(prometheus, "/api/v1/rules")["data"]["groups"]
        for rule in group["rules"]
        if rule["type"] == "alerting"
    ]
    if len(rules) != declared:
        errors += fail(f"Prometheus loaded {len(rules)} alerting rules, {alerts_path} declares {declared}")
    for rule in rules:
        what = f"alert {rule['name']}"
        if rule.get("health") != "ok" or rule.get("lastError"):
            errors += fail(f"{what}: health {rule.get('health')!r} {rule.get('lastError', '')}")
            continue
        expr = rule["query"]
        error, series = query(prometheus, expr)
        how = "as written"
        if not error and series == 0:
            m = TRAILING_COMPARISON.match(expr)
            if m:
                expr, how = m.group("lhs"), "without its comparison"
                error, series = query(prometheus, expr)
        if error or series == 0:
            errors += fail(f"{what}: {error or 'no series'} ({how}): {short(expr)}")
        else:
            print(f"ok   {what}: {series} series ({how}): {short(expr)}")
    with open(dashboard_path, encoding="utf-8") as f:
        dash = json.load(f)
    checks = []
    for panel in walk_panels(dash.get("panels", [])):
        for target in panel.get("targets", []):
            checks.append((f"panel {panel['title']!r} {target.get('refId')}", target.get("expr", "")))
    for var in dash.get("templating", {}).get("list", []):
        if var.get("type") != "query":
            continue
        raw = var.get("query")
        raw = raw.get("query", "") if isinstance(raw, dict) else raw or ""
        m = LABEL_VALUES.match(raw)
        checks.append((f"variable ${var['name']}", f"count by ({m.group('label')}) ({m.group('selector')})" if m else raw))
    for what, expr in checks:
        for name, value in SUBSTITUTIONS:
            expr = expr.replace(name, value)
        if "$" in expr:
            errors += fail(f"{what}: a Grafana variable this check does not know: {short(expr)}")
            continue
        error, series = query(prometheus, expr)
        if error or series == 0:
            errors += fail(f"{what}: {error or 'no series'}: {short(expr)}")
        else:
            print(f"ok   {what}: {series} series: {short(expr)}")
    print(f"{len(rules) + len(checks)} expressions, {errors} failed")
    return 1 if errors else 0


def alerts_named(prometheus, name):
    return [a for a in get(prometheus, "/api/v1/alerts")["data"]["alerts"] if a["labels"].get("alertname") == name]


def wait_firing(prometheus, name, instance, seconds):
    started = time.monotonic()
    pending_seen = None
    while time.monotonic() - started < seconds:
        for alert in alerts_named(prometheus, name):
            if alert["labels"].get("instance") != instance:
                continue
            if alert["state"] == "pending" and pending_seen is None:
                pending_seen = time.monotonic() - started
                print(f"     {name} pending for {instance} at +{pending_seen:.1f}s (active since {alert['activeAt']})")
            if alert["state"] == "firing":
                print(f"ok   {name} firing for {instance} at +{time.monotonic() - started:.1f}s "
                      f"(active since {alert['activeAt']}): {alert['annotations'].get('summary')}")
                return 0
        time.sleep(0.5)
    return fail(f"{name} not firing for {instance} within {seconds}s")


def quiet(prometheus, name):
    active = alerts_named(prometheus, name)
    if active:
        return fail(f"{name} is already {active[0]['state']}: {active[0]['labels']}")
    print(f"ok   {name} neither pending nor firing")
    return 0


def main(argv):
    commands = {
        "dashboard": (check_dashboard, 4),
        "queries": (check_queries, 3),
        "alert": (lambda p, n, i, s: wait_firing(p, n, i, float(s)), 4),
        "quiet": (quiet, 2),
    }
    if len(argv) < 2 or argv[1] not in commands or len(argv) - 2 != commands[argv[1]][1]:
        print(__doc__, file=sys.stderr)
        return 2
    return commands[argv[1]][0](*argv[2:])


if __name__ == "__main__":
    sys.exit(main(sys.argv))
