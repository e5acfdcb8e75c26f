"""Check the Grafana dashboard and the alert rules against the metrics impression-server exports.

Usage: check-queries.py DASHBOARD RULES METRICS OUT_RULES

Fails when a query names a metric missing from METRICS, or uses `_bucket`, `_sum` or `_count`
of a metric that is not a histogram. Writes every dashboard query, with its template variables
replaced by sample values, as a recording rule to OUT_RULES, so that `promtool check rules`
can parse them.
"""

import json
import re
import sys

METRIC = re.compile(r"\bimpression_server_[a-z_]+")
HISTOGRAM_SUFFIXES = ("_bucket", "_sum", "_count")
# Sample values for the dashboard's template variables. Only the syntax is checked.
VARIABLES = {"$__rate_interval": "5m", "$job": "impression-server", "$instance": ".*"}


def read_metrics(path):
    metrics = {}
    with open(path, encoding="utf-8") as file:
        for line in file:
            line = line.strip()
            if line and not line.startswith("#"):
                kind, name = line.split()
                metrics[name] = kind
    return metrics


def unknown_metrics(expr, metrics):
    problems = []
    for name in METRIC.findall(expr):
        if name in metrics:
            continue
        base = next((name[: -len(s)] for s in HISTOGRAM_SUFFIXES if name.endswith(s)), None)
        if base is None or metrics.get(base) != "histogram":
            problems.append(name)
    return problems


def dashboard_queries(dashboard):
    for panel in dashboard["panels"]:
        for target in panel.get("targets", []):
            yield panel["title"], target["expr"]


def main(dashboard_path, rules_path, metrics_path, out_rules_path):
    metrics = read_metrics(metrics_path)
    with open(dashboard_path, encoding="utf-8") as file:
        dashboard = json.load(file)
    with open(rules_path, encoding="utf-8") as file:
        rules_text = file.read()

    failures = []
    recording_rules = []
    for title, expr in dashboard_queries(dashboard):
        for name in unknown_metrics(expr, metrics):
            failures.append(f"{dashboard_path}: panel {title!r}: unknown metric {name}")
        for variable, value in VARIABLES.items():
            expr = expr.replace(variable, value)
        recording_rules.append({"record": f"dashboard:query:{len(recording_rules)}", "expr": expr})
    for name in unknown_metrics(rules_text, metrics):
        failures.append(f"{rules_path}: unknown metric {name}")
    if not recording_rules:
        failures.append(f"{dashboard_path}: no queries found")

    # JSON is valid YAML, which promtool reads.
    with open(out_rules_path, "w", encoding="utf-8") as file:
        json.dump({"groups": [{"name": "dashboard", "rules": recording_rules}]}, file)
    for failure in failures:
        print(failure, file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    if len(sys.argv) != 5:
        sys.exit(__doc__)
    sys.exit(main(*sys.argv[1:]))
