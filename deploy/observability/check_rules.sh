#!/usr/bin/env bash
# Check the alerts of prometheusrule.yaml with promtool: its `spec` is extracted to a plain
# rules file (promtool reads rules files, not the PrometheusRule resource), then
# `promtool check rules` and the unit tests of rules.test.yaml run on it. The dashboard's
# queries are parsed by promtool too, as recording rules of a scratch file (Grafana's
# $__rate_interval as 5m, $model as .*).
#
#   bash deploy/observability/check_rules.sh [--out DIR]   (default: build/observability)
#
# promtool comes from Debian's `prometheus` package, installed with apt-get when missing.
# PYTHON needs ruamel.yaml (a routeyard dependency): default <repo>/.venv/bin/python when
# that exists, else python3.
set -euo pipefail

HERE="$(cd "$(dirname "$0")" && pwd)"
ROOT="$(cd "$HERE/../.." && pwd)"
OUT="$ROOT/build/observability"
if [ -z "${PYTHON:-}" ]; then
  if [ -x "$ROOT/.venv/bin/python" ]; then PYTHON="$ROOT/.venv/bin/python"; else PYTHON=python3; fi
fi
case "${1:-}" in
  --out) OUT="$2" ;;
  "") ;;
  *) echo "check_rules.sh: unknown argument $1" >&2; exit 2 ;;
esac

as_root() { if [ "$(id -u)" = 0 ]; then "$@"; elif command -v sudo >/dev/null; then sudo -n "$@"; else return 1; fi; }
if ! command -v promtool >/dev/null; then
  # --no-install-recommends: promtool needs none of the web UI's packages.
  { as_root apt-get update -qq && DEBIAN_FRONTEND=noninteractive \
      as_root apt-get install -y -q --no-install-recommends prometheus; } >/dev/null \
    || { echo "check_rules.sh: could not install promtool (Debian package prometheus)" >&2; exit 1; }
fi

mkdir -p "$OUT"
"$PYTHON" - "$HERE" "$OUT" <<'PY'
import json
import sys
from pathlib import Path

from ruamel.yaml import YAML

here, out = Path(sys.argv[1]), Path(sys.argv[2])
yaml = YAML(typ="safe")
rule = yaml.load(here / "prometheusrule.yaml")
assert rule["kind"] == "PrometheusRule", rule["kind"]
yaml.dump(rule["spec"], out / "routeyard-rules.yaml")
dashboard = json.loads((here / "routeyard-dashboard.json").read_text())
queries = [
    {"record": f"routeyard_dashboard:panel_{panel['id']}_{target['refId']}",
     "expr": target["expr"].replace("$__rate_interval", "5m").replace("$model", ".*")}
    for panel in dashboard["panels"] for target in panel.get("targets", [])
]
yaml.dump({"groups": [{"name": "dashboard-queries", "rules": queries}]},
          out / "dashboard-queries.yaml")
PY
cp "$HERE/rules.test.yaml" "$OUT/rules.test.yaml"
promtool check rules "$OUT/routeyard-rules.yaml" "$OUT/dashboard-queries.yaml"
promtool test rules "$OUT/rules.test.yaml"
