"""Prometheus configs and rules (checked by promtool), the Grafana provisioning and the "RecSys Canary" dashboard.

`metric_names_in` and `used_metric_names` are shared with tests/e2e/test_observability.py, which checks the
names against what the running parts export.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from control_plane.settings import Settings
from control_plane.stack.prometheus_config import (
    bento_targets_path,
    local_prometheus_config,
    render_local_prometheus,
    write_bento_targets,
)

REPO = Path(__file__).resolve().parents[2]
PROMETHEUS_DIR = REPO / "infra" / "prometheus"
COMPOSE_CONFIG = PROMETHEUS_DIR / "prometheus.yml"
RULES = PROMETHEUS_DIR / "rules.yml"
RULES_TEST = PROMETHEUS_DIR / "rules_test.yml"
GRAFANA_DIR = REPO / "infra" / "grafana"
DASHBOARD = GRAFANA_DIR / "dashboards" / "recsys-canary.json"
DATASOURCE_UID = "prometheus"

# Series Prometheus makes itself for every target, not exported by any part.
PROMETHEUS_OWN = frozenset({"up"})
_KEYWORDS = frozenset(
    {"by", "without", "on", "ignoring", "group_left", "group_right", "offset", "bool", "and", "or", "unless",
     "atan2", "inf", "nan", "start", "end"}
)  # fmt: skip
_GRAFANA_VARIABLES = {"$__rate_interval": "5m", "$__interval": "1m", "$__range": "1h"}


# ---- helpers shared with the e2e test ----


def metric_names_in(expr: str) -> set[str]:
    """Metric names a PromQL expression selects, as written (`_bucket`, `_total` kept): no functions,
    keywords, label names, label values, durations or numbers."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`', '""', expr)  # string literals
    text = re.sub(r"#[^\n]*", " ", text)  # comments
    text = re.sub(r"\{[^}]*\}", " ", text)  # label matchers
    text = re.sub(r"\[[^\]]*\]", " ", text)  # ranges and subqueries
    text = re.sub(
        r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", text
    )  # label lists
    names = set()
    for m in re.finditer(r"(?<![\w.$])([A-Za-z_:][\w:]*)(\s*\()?", text):
        name, is_call = m.group(1), m.group(2)
        if not is_call and name.lower() not in _KEYWORDS:
            names.add(name)
    return names


def family_of(name: str) -> str:
    """The metric family a sample name belongs to (histogram and counter suffixes stripped)."""
    return re.sub(r"_(?:bucket|sum|count|total|created)$", "", name)


def rule_exprs() -> dict[str, str]:
    """Every rule's expression, keyed by its alert or record name."""
    groups = yaml.safe_load(RULES.read_text())["groups"]
    return {r.get("alert") or r["record"]: r["expr"] for g in groups for r in g["rules"]}


def recorded_names() -> set[str]:
    groups = yaml.safe_load(RULES.read_text())["groups"]
    return {r["record"] for g in groups for r in g["rules"] if "record" in r}


def dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def data_panels(dash: dict) -> list[dict]:
    """Panels that show data (rows only group them), nested ones included."""
    out = []
    for panel in dash["panels"]:
        out += [p for p in panel.get("panels", []) if p.get("type") != "row"]
        if panel.get("type") != "row":
            out.append(panel)
    return out


def dashboard_exprs() -> dict[str, str]:
    """Every query of the dashboard and its annotations, keyed by where it is."""
    dash = dashboard()
    exprs = {f"{p['title']} / {t['refId']}": t["expr"] for p in data_panels(dash) for t in p["targets"]}
    for a in dash["annotations"]["list"]:
        if a.get("datasource", {}).get("uid") == DATASOURCE_UID:
            exprs[f"annotation {a['name']}"] = a["expr"]
    return exprs


def used_metric_names() -> set[str]:
    """Names the dashboard and the rules read that some running part must export (recording rules and
    Prometheus's own `up` left out)."""
    names = set()
    for expr in [*rule_exprs().values(), *dashboard_exprs().values()]:
        names |= metric_names_in(expr)
    return names - recorded_names() - PROMETHEUS_OWN


def _promtool() -> str:
    binary = shutil.which("promtool")
    if binary is None:
        pytest.skip("promtool is not installed (Debian's `prometheus` package; `make system-deps`)")
    return binary


def _run(*args: str | Path, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([str(a) for a in args], cwd=cwd, capture_output=True, text=True, timeout=60)


@pytest.fixture
def settings(tmp_path) -> Settings:
    return Settings(
        state_dir=tmp_path / ".recsys",
        bind_host="127.0.0.1",
        traefik_api_port=18081,
        control_plane_port=18090,
        prometheus_port=19090,
    )


# ---- Prometheus ----


def test_the_compose_config_passes_promtool():
    result = _run(_promtool(), "check", "config", COMPOSE_CONFIG)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "1 rule files found" in result.stdout


def test_the_local_config_passes_promtool_with_bento_targets(settings, tmp_path):
    write_bento_targets(settings, {1: "http://127.0.0.1:3101", 2: "http://127.0.0.1:3102"})
    path = tmp_path / "prometheus.yml"
    path.write_text(render_local_prometheus(settings))
    result = _run(_promtool(), "check", "config", path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "1 rule files found" in result.stdout


def test_the_alert_rules_pass_promtool():
    result = _run(_promtool(), "check", "rules", RULES)
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_alert_rules_unit_tests_pass():
    result = _run(_promtool(), "test", "rules", RULES_TEST.name, cwd=PROMETHEUS_DIR)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_the_rules_alert_on_what_the_issue_asks():
    alerts = {name for name in rule_exprs() if name not in recorded_names()}
    assert {
        "CanaryErrorRateAboveBaseline",
        "CanaryP99OverGuardrail",
        "RolloutEvaluationsStopped",
        "PredictionLogSpillGrowing",
        "SampleRatioMismatch",
    } <= alerts


def test_the_rules_unit_tests_cover_the_canary_error_rate_alert():
    tested = {
        case["alertname"]
        for t in yaml.safe_load(RULES_TEST.read_text())["tests"]
        for case in t.get("alert_rule_test", [])
    }
    assert "CanaryErrorRateAboveBaseline" in tested


def _targets(config: dict) -> dict[str, list[str]]:
    return {
        job["job_name"]: [t for sc in job.get("static_configs", []) for t in sc["targets"]]
        for job in config["scrape_configs"]
    }


def test_local_and_compose_scrape_the_same_jobs(settings):
    compose = yaml.safe_load(COMPOSE_CONFIG.read_text())
    local = local_prometheus_config(settings)
    assert (
        set(_targets(local))
        == set(_targets(compose))
        == {"traefik", "bentos", "control-plane", "worker", "prometheus"}
    )


def test_compose_scrapes_the_compose_services():
    targets = _targets(yaml.safe_load(COMPOSE_CONFIG.read_text()))
    assert targets["traefik"] == ["traefik:8081"]
    assert targets["control-plane"] == ["control-plane:8090"]
    assert targets["worker"] == ["worker:9101"]


def test_compose_finds_the_bento_containers_where_the_deployer_lists_them():
    """The DockerDeployer writes bento_targets_path() with RECSYS_STATE_DIR=/var/lib/recsys (compose)."""
    config = yaml.safe_load(COMPOSE_CONFIG.read_text())
    bentos = next(j for j in config["scrape_configs"] if j["job_name"] == "bentos")
    in_compose = Settings(state_dir=Path("/var/lib/recsys"))
    assert bentos["file_sd_configs"][0]["files"] == [str(bento_targets_path(in_compose))]


def test_the_local_config_scrapes_the_settings_ports_on_loopback(settings):
    config = local_prometheus_config(settings)
    targets = _targets(config)
    assert targets["traefik"] == ["127.0.0.1:18081"]
    assert targets["control-plane"] == ["127.0.0.1:18090"]
    assert targets["worker"] == ["127.0.0.1:9101"]
    assert targets["prometheus"] == ["127.0.0.1:19090"]
    bentos = next(j for j in config["scrape_configs"] if j["job_name"] == "bentos")
    assert bentos["file_sd_configs"][0]["files"] == [str(bento_targets_path(settings))]
    assert config["rule_files"] == [str(RULES)]


def test_a_wildcard_bind_is_scraped_on_loopback(settings):
    from dataclasses import replace

    targets = _targets(local_prometheus_config(replace(settings, bind_host="0.0.0.0")))
    assert targets["traefik"] == ["127.0.0.1:18081"]


def test_bento_targets_are_labelled_with_their_version_and_replaced_whole(settings):
    write_bento_targets(settings, {3: "http://127.0.0.1:3103", 1: "http://127.0.0.1:3101"})
    write_bento_targets(settings, {2: "http://127.0.0.1:3102", 3: "http://127.0.0.1:3103"})
    path = bento_targets_path(settings)
    assert json.loads(path.read_text()) == [
        {"targets": ["127.0.0.1:3102"], "labels": {"model_version": "2"}},
        {"targets": ["127.0.0.1:3103"], "labels": {"model_version": "3"}},
    ]
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temp file left behind
    write_bento_targets(settings, {})
    assert json.loads(path.read_text()) == []


def test_a_bento_endpoint_without_a_port_is_refused(settings):
    with pytest.raises(ValueError, match="version 4"):
        write_bento_targets(settings, {4: "http://bento"})


# ---- Grafana ----


def test_the_datasource_is_the_compose_prometheus_with_the_dashboards_uid():
    provisioning = yaml.safe_load(
        (GRAFANA_DIR / "provisioning" / "datasources" / "prometheus.yml").read_text()
    )
    [source] = provisioning["datasources"]
    assert source["type"] == "prometheus"
    assert source["uid"] == DATASOURCE_UID
    assert source["url"] == "http://prometheus:9090"


def test_the_dashboards_are_provisioned_from_the_mounted_directory():
    provisioning = yaml.safe_load((GRAFANA_DIR / "provisioning" / "dashboards" / "recsys.yml").read_text())
    [provider] = provisioning["providers"]
    assert provider["type"] == "file"
    assert provider["options"]["path"] == "/var/lib/grafana/dashboards"


def test_the_dashboard_is_titled_recsys_canary_and_every_panel_queries_prometheus():
    dash = dashboard()
    assert dash["title"] == "RecSys Canary"
    panels = data_panels(dash)
    assert len(panels) >= 10
    for panel in panels:
        assert panel["datasource"]["uid"] == DATASOURCE_UID, panel["title"]
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == DATASOURCE_UID, panel["title"]
            assert target["expr"].strip(), panel["title"]
    assert len({p["id"] for p in dash["panels"]}) == len(dash["panels"])


def test_the_dashboard_shows_what_the_issue_asks():
    exprs = " ".join(dashboard_exprs().values())
    titles = {p["title"] for p in data_panels(dashboard())}
    assert {"Request rate", "Error rate", "Latency p50 and p99", "Traffic weights", "Rollout phase",
            "Label coverage per role", "Accuracy per role"} <= titles  # fmt: skip
    assert "by (model_version, role)" in exprs
    assert "histogram_quantile(0.5," in exprs and "histogram_quantile(0.99," in exprs
    [decisions] = [a for a in dashboard()["annotations"]["list"] if a["name"] == "Decisions"]
    assert "recsys_decisions_total" in decisions["expr"]


def test_the_dashboard_queries_are_valid_promql(tmp_path):
    """promtool parses each query as a recording rule (Grafana's interval variables filled in)."""
    rules = []
    for i, expr in enumerate(dashboard_exprs().values()):
        for var, value in _GRAFANA_VARIABLES.items():
            expr = expr.replace(var, value)
        rules.append({"record": f"dashboard:query_{i}", "expr": expr})
    path = tmp_path / "dashboard-queries.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    result = _run(_promtool(), "check", "rules", path)
    assert result.returncode == 0, result.stdout + result.stderr


# ---- metric names ----


@pytest.mark.parametrize(
    ("expr", "names"),
    [
        ("recsys_canary_weight", {"recsys_canary_weight"}),
        ('sum by (role, le) (rate(recsys_request_duration_seconds_bucket{role="canary"}[5m]))',
         {"recsys_request_duration_seconds_bucket"}),
        ("histogram_quantile(0.99, sum(rate(x_bucket[$__rate_interval])) by (le))", {"x_bucket"}),
        ('a{status=~"5.."} / ignoring(role) group_left b offset 5m > bool 1e-3', {"a", "b"}),
        ("time() - max(last_ts) > 300 or absent(last_ts) and on() vector(1)", {"last_ts"}),
        ('label_replace(up, "dst", "$1", "instance", "(.*):.*")', {"up"}),
        ("recsys:requests:rate5m{role='canary'} > 0.33  # a comment naming not_a_metric", {"recsys:requests:rate5m"}),
    ],
)  # fmt: skip
def test_metric_names_in_finds_only_metric_names(expr, names):
    assert metric_names_in(expr) == names


def test_family_of_strips_sample_suffixes():
    assert family_of("recsys_request_duration_seconds_bucket") == "recsys_request_duration_seconds"
    assert family_of("recsys_decisions_total") == "recsys_decisions"
    assert family_of("recsys_canary_weight") == "recsys_canary_weight"


def test_the_dashboard_and_rules_read_these_metrics():
    """The list the e2e test checks against the running parts; a new name here needs an exporter there."""
    assert used_metric_names() == {
        # Bentos (bentos/metrics.py)
        "recsys_requests_total",
        "recsys_request_duration_seconds_bucket",
        "recsys_model_load_seconds",
        "recsys_predlog_queue_depth",
        "recsys_predlog_spill_bytes",
        "recsys_predlog_db_up",
        "recsys_predlog_disk_ok",
        "recsys_predlog_rows_lost_total",
        "recsys_predlog_rows_rejected_total",
        "recsys_predlog_rows_corrupt_total",
        # Traefik
        "traefik_service_requests_total",
        # control plane (control_plane/web/metrics.py)
        "recsys_canary_weight",
        "recsys_traffic_weight",
        "recsys_rollout_phase",
        "recsys_rollout_last_evaluation_timestamp_seconds",
        "recsys_decisions_total",
        "recsys_last_evaluation_stat",
        "recsys_last_evaluation_rule_passed",
        "recsys_label_coverage",
        "recsys_accuracy",
        "recsys_label_spill_rows_total",
        # worker (control_plane/worker_metrics.py)
        "recsys_job_duration_seconds_bucket",
        "recsys_jobs_total",
    }
