"""Alerting rules and the Grafana dashboard of the Helm chart.

* ``promtool check rules`` / ``promtool test rules`` (Debian's prometheus
  package) on ``helm/mmpipe/files/alerts.yaml`` and its unit tests, which
  make every alert fire on the series it is about and stay quiet otherwise;
* every metric name in the dashboard's and the alerts' PromQL is one a real
  ``mmpipe`` process exports, read from a live ``/metrics`` scrape of
  ``mmpipe predict`` (labelled families with no samples yet still carry
  ``# HELP``/``# TYPE`` lines).  Ray's ``ray_*`` and Triton's ``nv_*``
  metrics are allowed only in panels about Ray or Triton, and two metrics of
  other exporters only where listed below.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from pipeline.ports import free_port

ROOT = Path(__file__).resolve().parents[2]
FILES = ROOT / "helm" / "mmpipe" / "files"
ALERTS = FILES / "alerts.yaml"
ALERT_TESTS = FILES / "tests" / "alerts_test.yaml"
DASHBOARD = FILES / "dashboard.json"

EXTERNAL_METRICS = {
    "push_time_seconds": "the Pushgateway's own time of a group's last push (MmpipeNightlyJobFailed)",
    "kube_job_status_failed": "kube-state-metrics: a failed Job of the batch CronJob (MmpipeNightlyJobPodFailed)",
}
"""Metrics of other exporters the alerts rely on, each for one stated reason."""

PANEL_PREFIXES = {"Triton": "nv_", "Ray": "ray_"}
"""A panel whose title starts with the key may use that system's own metrics."""
ALERT_PREFIXES = {"MmpipeTriton": "nv_"}
"""An alert whose name starts with the key may use that system's own metrics
(Triton serving is watched through Triton's nv_* metrics)."""

_PROMQL_WORDS = {
    "by", "without", "on", "ignoring", "group_left", "group_right", "bool", "and", "or", "unless", "offset",
    "sum", "min", "max", "avg", "count", "stddev", "stdvar", "topk", "bottomk", "quantile", "count_values", "group",
    "inf", "nan",
}


def promtool() -> str:
    found = shutil.which("promtool") or ("/usr/bin/promtool" if Path("/usr/bin/promtool").exists() else None)
    if not found:
        pytest.skip("promtool is not installed (Debian package prometheus; .ci/bootstrap.sh test installs it)")
    return found


def metric_names(expr: str) -> set[str]:
    """Metric names a PromQL expression selects (functions, keywords, label
    names and Grafana variables are not)."""
    s = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)              # string literals
    s = re.sub(r"\{[^}]*\}", "", s)                             # label matchers
    s = re.sub(r"\[[^\]]*\]", "", s)                            # range selectors
    s = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", r"\1", s)  # label lists
    s = re.sub(r"\$\w+", "", s)                                 # $__rate_interval, $workload
    names = set()
    for m in re.finditer(r"(?<![\w.])([A-Za-z_:][A-Za-z0-9_:]*)(\s*\()?", s):
        word, call = m.group(1), m.group(2)
        if call or word.lower() in _PROMQL_WORDS:
            continue
        names.add(word)
    return names


def test_metric_names_parser() -> None:
    expr = ('histogram_quantile(0.99, sum by (le, path) (rate(mmpipe_request_seconds_bucket{path=~"online|x"}'
            '[$__rate_interval]))) / on (job) group_left max(time() - foo_total offset 5m) > 26 * 3600')
    assert metric_names(expr) == {"mmpipe_request_seconds_bucket", "foo_total"}


# --- promtool ---------------------------------------------------------------------------------------


def test_promtool_check_rules() -> None:
    res = subprocess.run([promtool(), "check", "rules", str(ALERTS)], capture_output=True, text=True,
                         timeout=120, check=False)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "SUCCESS" in res.stdout + res.stderr


def test_promtool_unit_tests() -> None:
    res = subprocess.run([promtool(), "test", "rules", str(ALERT_TESTS)], capture_output=True, text=True,
                         timeout=300, check=False, cwd=ALERT_TESTS.parent)
    assert res.returncode == 0, res.stdout + res.stderr


def test_every_alert_is_tested_firing_and_quiet() -> None:
    """Each alert has a unit test where it fires and one where it must not."""
    alerts = {r["alert"] for g in yaml.safe_load(ALERTS.read_text())["groups"] for r in g["rules"] if "alert" in r}
    required = {"MmpipeHighErrorRatio", "MmpipeHighP99Latency", "MmpipeConsumerLagGrowing", "MmpipeDeadLetterRate",
                "MmpipeNightlyJobMissed", "MmpipeNightlyJobFailed"}
    assert required <= alerts
    fires: set[str] = set()
    quiet: set[str] = set()
    for test in yaml.safe_load(ALERT_TESTS.read_text())["tests"]:
        series = len(test["input_series"])
        for case in test.get("alert_rule_test", []):
            fired = case.get("exp_alerts") or []
            (fires if fired else quiet).add(case["alertname"])
            # a firing case with fewer alerts than label sets in play proves the others stayed quiet
            if fired and series > len(fired):
                quiet.add(case["alertname"])
    assert alerts <= fires, f"never fired in a test: {sorted(alerts - fires)}"
    assert alerts <= quiet, f"never shown quiet in a test: {sorted(alerts - quiet)}"


def test_promtool_test_can_fail(tmp_path: Path) -> None:
    """A wrong expectation makes promtool fail: the unit tests really check."""
    tests = yaml.safe_load(ALERT_TESTS.read_text())
    tests["rule_files"] = [str(ALERTS)]
    first = tests["tests"][0]["alert_rule_test"][-1]
    first["exp_alerts"][0]["exp_labels"]["workload"] = "not-the-one"
    bad = tmp_path / "bad_test.yaml"
    bad.write_text(yaml.safe_dump(tests))
    res = subprocess.run([promtool(), "test", "rules", str(bad)], capture_output=True, text=True,
                         timeout=300, check=False)
    assert res.returncode != 0


# --- metric names against a live scrape -------------------------------------------------------------


@pytest.fixture(scope="module")
def exported_metrics(tiny_packages: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> set[str]:
    """Sample names a real ``mmpipe predict`` serves on /metrics (every series
    name Prometheus would store: counters' ``_total``, histograms' ``_bucket``
    ``_sum`` ``_count``, ...)."""
    tmp = tmp_path_factory.mktemp("metrics")
    port = free_port()
    cfg = tmp / "settings.yaml"
    cfg.write_text(yaml.safe_dump({"metrics": {"port": port}, "log_level": "WARNING"}))
    exe = Path(sys.executable).parent / "mmpipe"
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "pipeline"]
    proc = subprocess.Popen([*cmd, "predict", "--config", str(cfg), "--package", str(tiny_packages["retail"])],
                            stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        text = None
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
                    text = r.read().decode()
                break
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                time.sleep(0.5)
        if text is None:
            err = proc.stderr.read().decode()[-2000:] if proc.poll() is not None and proc.stderr else ""
            pytest.fail(f"mmpipe predict never served /metrics on port {port}: {err}")
    finally:
        if proc.stdin:
            proc.stdin.close()  # end of input: predict finishes and exits
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    names: set[str] = set()
    suffixes = {"counter": ("_total", "_created"), "histogram": ("_bucket", "_sum", "_count", "_created"),
                "summary": ("_sum", "_count", "_created"), "gauge": ("",), "info": ("_info",)}
    for fam in text_string_to_metric_families(text):
        names.update(fam.name + suf for suf in suffixes.get(fam.type, ("",)))
        names.update(s.name for s in fam.samples)
    assert "mmpipe_records_total" in names, "the scrape holds no mmpipe metrics"
    return names


def _dashboard_panels() -> list[dict[str, Any]]:
    def walk(panels: list[dict[str, Any]]) -> list[dict[str, Any]]:
        out = []
        for p in panels:
            out.append(p)
            out += walk(p.get("panels", []))
        return out

    return walk(json.loads(DASHBOARD.read_text())["panels"])


def test_dashboard_uses_only_exported_metrics(exported_metrics: set[str]) -> None:
    used_mmpipe: set[str] = set()
    checked = 0
    for panel in _dashboard_panels():
        allowed_prefix = next((pre for title, pre in PANEL_PREFIXES.items() if panel["title"].startswith(title)), None)
        for target in panel.get("targets", []):
            for name in metric_names(target["expr"]):
                checked += 1
                if allowed_prefix and name.startswith(allowed_prefix):
                    continue
                assert name in exported_metrics, (
                    f"panel {panel['title']!r} queries {name}, which mmpipe does not export")
                used_mmpipe.add(name)
    assert checked > 20
    templating = json.loads(DASHBOARD.read_text())["templating"]["list"]
    for var in templating:
        if var.get("type") == "query":
            for name in metric_names(re.sub(r"label_values\((\w+),.*\)", r"\1", var["definition"])):
                assert name in exported_metrics, f"variable {var['name']} queries {name}"
    # and the dashboard shows every metric family of the shared set
    suffix = r"_(total|bucket|sum|count|created)$"
    families = {re.sub(suffix, "", n) for n in exported_metrics if n.startswith("mmpipe_")}
    shown = {re.sub(suffix, "", n) for n in used_mmpipe}
    assert families <= shown, f"metrics no panel shows: {sorted(families - shown)}"


def test_alerts_use_only_exported_metrics(exported_metrics: set[str]) -> None:
    rules = [r for g in yaml.safe_load(ALERTS.read_text())["groups"] for r in g["rules"]]
    for rule in rules:
        own = [p for a, p in ALERT_PREFIXES.items() if str(rule.get("alert", "")).startswith(a)]
        for name in metric_names(rule["expr"]):
            if any(name.startswith(p) for p in own):
                continue
            assert name in exported_metrics or name in EXTERNAL_METRICS, (
                f"alert {rule.get('alert')} uses {name}, which mmpipe does not export")
