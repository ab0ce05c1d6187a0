"""deploy/observability: the Grafana dashboard and the alerts query only what routeyard exports.

The metric names come from the registry ``router.metrics.Metrics`` builds, so a renamed or
removed metric fails here before a dashboard panel goes blank or an alert silently never
fires. PromQL syntax and the alerts' behaviour are promtool's to check
(``deploy/observability/check_rules.sh``, run by ``.ci/run``).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from ruamel.yaml import YAML

from router.metrics import Metrics

ROOT = Path(__file__).resolve().parents[2]
OBSERVABILITY = ROOT / "deploy" / "observability"
DASHBOARD = OBSERVABILITY / "routeyard-dashboard.json"
RULES = OBSERVABILITY / "prometheusrule.yaml"

#: A metric name in PromQL: an identifier followed by a selector, a range, or the end of
#: the expression or an operator; functions (followed by "(") and the words of PromQL
#: (by, without, on, ...) are not metric names.
_NAME = re.compile(r"\b(routeyard_[a-zA-Z0-9_:]*)\b(?!\s*\()")
_HISTOGRAM_SERIES = ("_bucket", "_sum", "_count")


def exported_series() -> set[str]:
    """Every series name routeyard's registry exports (counters with ``_total``, histograms
    with ``_bucket``, ``_sum`` and ``_count``)."""
    names: set[str] = set()
    for family in Metrics().registry.collect():
        if family.type == "counter":
            names.add(family.name + "_total")
        elif family.type == "histogram":
            names.update(family.name + suffix for suffix in _HISTOGRAM_SERIES)
        else:
            names.add(family.name)
    return names


def queried_names(expr: str) -> set[str]:
    """The routeyard metric names one PromQL expression reads; recording rules' own names
    (with a colon) are not metrics."""
    return {name for name in _NAME.findall(expr) if ":" not in name}


def dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def dashboard_exprs() -> list[str]:
    exprs = [t["expr"] for p in dashboard()["panels"] for t in p.get("targets", [])]
    for variable in dashboard()["templating"]["list"]:
        if variable["type"] == "query":
            exprs.append(variable["query"]["query"])
    return exprs


def rules() -> list[dict]:
    resource = YAML(typ="safe").load(RULES)
    assert resource["kind"] == "PrometheusRule"
    return [rule for group in resource["spec"]["groups"] for rule in group["rules"]]


@pytest.fixture(scope="module")
def exported() -> set[str]:
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("PROMETHEUS_MULTIPROC_DIR", raising=False)  # the in-process registry
        return exported_series()


def test_the_name_parser_finds_selectors_ranges_and_bare_names() -> None:
    expr = ('sum by (model) (rate(routeyard_requests_total{code=~"5.."}[5m])) / '
            "histogram_quantile(0.99, rate(routeyard_ttfb_bucket[5m])) + routeyard_up == 0 "
            "and label_values(routeyard_x, model) or routeyard_dashboard:panel_1_A")
    assert queried_names(expr) == {"routeyard_requests_total", "routeyard_ttfb_bucket",
                                   "routeyard_up", "routeyard_x"}


def test_the_registry_names_are_read(exported: set[str]) -> None:
    assert {"routeyard_requests_total", "routeyard_time_to_first_byte_seconds_bucket",
            "routeyard_backend_up", "routeyard_config_reloads_total"} <= exported
    assert "routeyard_requests" not in exported  # counters are exported with _total


def test_dashboard_queries_only_exported_metrics(exported: set[str]) -> None:
    used = set().union(*map(queried_names, dashboard_exprs()))
    assert used, "no metric found in the dashboard"
    assert used - exported == set(), "the dashboard queries metrics routeyard does not export"


def test_alerts_query_only_exported_metrics(exported: set[str]) -> None:
    used = set().union(*(queried_names(rule["expr"]) for rule in rules()))
    assert used - exported == set(), "an alert queries metrics routeyard does not export"


def test_the_alerts_cover_the_operators_questions() -> None:
    alerts = {rule["alert"]: rule for rule in rules()}
    wanted = {"RouteyardNoHealthyBackend": "routeyard_model_backends_up",
              "RouteyardHighErrorRatio": "routeyard_requests_total",
              "RouteyardConfigReloadRefused": "routeyard_config_reloads_total",
              "RouteyardBatchStuck": "routeyard_batch_lines_total"}
    for alert, metric in wanted.items():
        assert metric in queried_names(alerts[alert]["expr"]), alert
    for rule in alerts.values():
        assert rule["labels"]["severity"] in ("critical", "warning")
        assert rule["annotations"]["summary"] and rule["annotations"]["description"]


def test_dashboard_is_a_grafana_dashboard_with_unique_panel_ids() -> None:
    board = dashboard()
    panels = board["panels"]
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    assert board["uid"] and board["title"] and board["schemaVersion"] >= 36
    variables = {v["name"]: v for v in board["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    assert variables["model"]["query"]["query"].startswith("label_values(")
    for panel in panels:
        if panel["type"] == "row":
            continue
        assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
        assert panel["targets"], panel["title"]
        assert all(t["datasource"]["uid"] == "${datasource}" for t in panel["targets"])
        grid = panel["gridPos"]
        assert grid["x"] >= 0 and grid["x"] + grid["w"] <= 24, panel["title"]
    cells = [(x, y) for p in panels for g in [p["gridPos"]]
             for x in range(g["x"], g["x"] + g["w"]) for y in range(g["y"], g["y"] + g["h"])]
    assert len(cells) == len(set(cells)), "panels overlap"
    titles = " ".join(p["title"].lower() for p in panels)
    for topic in ("requests", "error", "duration", "first byte", "tokens", "backend",
                  "queue", "batch"):
        assert topic in titles, topic
