"""deploy/: the alert rules pass `promtool check rules` and their unit tests, each rule tested
firing and quiet (and its tests fail when it never fires); the example Prometheus configuration
passes `promtool check config`; every query of the rules and of the Grafana dashboard names only
metrics the system exports (parsed as PromQL); the dashboard is well formed."""

from __future__ import annotations

import json
import re
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import promql_parser
import pytest
import yaml

from plumbing.metrics import SCRAPE_FAMILIES, Metrics
from tests.helpers import prometheus_tool

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"
ALERTS = DEPLOY / "prometheus" / "alerts.yml"
ALERT_TESTS = DEPLOY / "prometheus" / "alerts_test.yml"
CONFIG = DEPLOY / "prometheus" / "prometheus.yml"
DASHBOARD = DEPLOY / "grafana" / "opconnect.json"

SEVERITIES = {"critical", "warning"}
PROMETHEUS_SERIES = {"up"}  # what Prometheus writes for every target it scrapes
HISTOGRAM_SUFFIXES = ("_bucket", "_sum", "_count")
# Grafana's interval variables, which are not PromQL: any duration parses the same.
GRAFANA_INTERVALS = ("$__rate_interval", "$__interval", "$__range")
LABEL_VALUES = re.compile(r"label_values\((?P<selector>.+),\s*\w+\)")


def _promtool(*args: str) -> subprocess.CompletedProcess[str]:
    command = [prometheus_tool("promtool"), *args]
    return subprocess.run(command, check=False, capture_output=True, text=True, timeout=120)


def _rules() -> list[dict[str, Any]]:
    document = yaml.safe_load(ALERTS.read_text())
    return [rule for group in document["groups"] for rule in group["rules"]]


def _exported() -> dict[str, str]:
    """Every metric name the system exports: the catalogue's families (a histogram's series by
    its family's name) and the families read at scrape time, with their type."""
    families = {
        (f"{family.name}_total" if family.type == "counter" else family.name): family.type
        for family in Metrics().registry.collect()
    }
    return families | dict.fromkeys(SCRAPE_FAMILIES, "gauge")


def _family(name: str, exported: dict[str, str]) -> str:
    """A series name as the family it belongs to (`x_bucket` -> `x` for a histogram `x`)."""
    for suffix in HISTOGRAM_SUFFIXES:
        base = name.removesuffix(suffix)
        if base != name and exported.get(base) == "histogram":
            return base
    return name


def _metric_names(expr: str) -> set[str]:
    """The metric name of every selector of a PromQL expression."""
    for variable in GRAFANA_INTERVALS:
        expr = expr.replace(variable, "5m")
    names: list[str | None] = []

    def visit(node: promql_parser.Expr) -> None:
        if isinstance(node, promql_parser.VectorSelector):
            names.append(node.name)

    promql_parser.walk(promql_parser.parse(expr), visit)
    assert all(names), f"a selector without a metric name in {expr!r}"
    return {name for name in names if name}


def _dashboard_panels(panels: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    for panel in panels:
        yield panel
        yield from _dashboard_panels(panel.get("panels", []))


def _dashboard_queries() -> list[str]:
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = [
        target["expr"]
        for panel in _dashboard_panels(dashboard["panels"])
        for target in panel.get("targets", [])
    ]
    for variable in dashboard["templating"]["list"]:
        if variable["type"] == "query":
            match = LABEL_VALUES.fullmatch(variable["query"]["query"])
            assert match, f"variable {variable['name']}: not label_values(selector, label)"
            exprs.append(match.group("selector"))
    return exprs


def test_the_alert_rules_pass_promtool_check() -> None:
    checked = _promtool("check", "rules", str(ALERTS))
    assert checked.returncode == 0, checked.stdout + checked.stderr


def test_the_alert_rules_pass_their_unit_tests() -> None:
    tested = _promtool("test", "rules", str(ALERT_TESTS))
    assert tested.returncode == 0, tested.stdout + tested.stderr


def test_the_example_prometheus_configuration_passes_promtool_check() -> None:
    checked = _promtool("check", "config", str(CONFIG))
    assert checked.returncode == 0, checked.stdout + checked.stderr


def test_every_alert_says_how_bad_it_is_and_what_to_do() -> None:
    for rule in _rules():
        assert rule["labels"]["severity"] in SEVERITIES, rule["alert"]
        assert rule["annotations"]["summary"].strip(), rule["alert"]
        assert len(rule["annotations"]["description"].split()) >= 10, rule["alert"]


def test_every_alert_is_tested_firing_and_quiet() -> None:
    tests = yaml.safe_load(ALERT_TESTS.read_text())["tests"]
    checks = [check for test in tests for check in test.get("alert_rule_test", [])]
    for rule in _rules():
        name = rule["alert"]
        mine = [check for check in checks if check["alertname"] == name]
        assert any(check.get("exp_alerts") for check in mine), f"{name} is never tested firing"
        assert any(not check.get("exp_alerts") for check in mine), f"{name} is never tested quiet"


def test_the_unit_tests_fail_for_a_rule_that_never_fires(tmp_path: Path) -> None:
    """Each rule in turn replaced by one that never fires: its own tests must fail. (One
    promtool run: a rule file and a test file of each rule's tests per rule.)"""
    tests = yaml.safe_load(ALERT_TESTS.read_text())
    files: dict[str, Path] = {}
    for index, name in enumerate(rule["alert"] for rule in _rules()):
        silenced = yaml.safe_load(ALERTS.read_text())
        for rule in (rule for group in silenced["groups"] for rule in group["rules"]):
            if rule["alert"] == name:
                rule["expr"] = "vector(1) < 0"
        (tmp_path / f"alerts_{index}.yml").write_text(yaml.safe_dump(silenced))
        mine = [
            test | {"alert_rule_test": checks}
            for test in tests["tests"]
            if (checks := [c for c in test["alert_rule_test"] if c["alertname"] == name])
        ]
        files[name] = tmp_path / f"alerts_{index}_test.yml"
        own = tests | {"rule_files": [f"alerts_{index}.yml"], "tests": mine}
        files[name].write_text(yaml.safe_dump(own))
    tested = _promtool("test", "rules", *map(str, files.values()))
    # On stdout, per file: "Unit Testing:  <file>", then "  SUCCESS" (on stderr: what failed).
    seen = re.findall(r"Unit Testing:\s+(\S+)", tested.stdout)
    assert sorted(seen) == sorted(map(str, files.values())), tested.stdout + tested.stderr
    passed = set(re.findall(r"Unit Testing:\s+(\S+)\n\s+SUCCESS", tested.stdout))
    unnoticed = [name for name, path in files.items() if str(path) in passed]
    assert not unnoticed, f"silenced, these rules still pass their tests: {unnoticed}"


@pytest.mark.parametrize("source", ["alerts", "dashboard"])
def test_every_query_names_only_metrics_the_system_exports(source: str) -> None:
    exprs = [rule["expr"] for rule in _rules()] if source == "alerts" else _dashboard_queries()
    exported = _exported()
    assert exprs
    unknown = {
        f"{name} (in {expr!r})"
        for expr in exprs
        for name in _metric_names(expr)
        if _family(name, exported) not in exported and name not in PROMETHEUS_SERIES
    }
    assert not unknown, "not exported: " + "; ".join(sorted(unknown))


def test_the_query_parser_finds_every_metric_name() -> None:
    expr = (
        'histogram_quantile(0.99, sum by (le) (rate(a_bucket{x=~"$v"}[$__rate_interval])))'
        " / on (le) group_left b + time() - max_over_time(c[1h:1m]) and d offset 5m"
    )
    assert _metric_names(expr) == {"a_bucket", "b", "c", "d"}
    exported = {"a": "histogram", "b_count": "counter"}
    assert _family("a_bucket", exported) == "a"
    assert _family("b_count", exported) == "b_count"  # a counter's name, not a histogram's


def test_the_dashboard_is_well_formed() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    panels = list(_dashboard_panels(dashboard["panels"]))
    ids = [panel["id"] for panel in panels]
    assert len(ids) == len(set(ids)), "panel ids are unique"
    variables = {variable["name"] for variable in dashboard["templating"]["list"]}
    assert "datasource" in variables
    for panel in panels:
        grid = panel["gridPos"]
        assert grid["x"] >= 0 and grid["x"] + grid["w"] <= 24, panel["title"]
        if panel["type"] == "row":
            continue
        assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
        assert panel.get("description"), panel["title"]
        refs = [target["refId"] for target in panel["targets"]]
        assert refs and len(refs) == len(set(refs)), panel["title"]
        used = set(re.findall(r"\$(\w+)", " ".join(t["expr"] for t in panel["targets"])))
        assert used - {"__rate_interval"} <= variables, panel["title"]
