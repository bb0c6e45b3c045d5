"""/metrics: rollout state read from the database at scrape time, plus per-process HTTP counters.

Rollout metrics come from the database on every scrape, so every gunicorn worker answers the same
and no worker-local state can go stale. The HTTP counters are per process; when
PROMETHEUS_MULTIPROC_DIR is set (gunicorn), they are written there and summed at scrape time.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from flask import Flask, Response, g, request
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from control_plane import services
from control_plane.analysis.types import Phase
from control_plane.context import Context

log = logging.getLogger(__name__)


class RolloutCollector(Collector):
    """Reads traffic, the latest rollout, the ledger and the window metrics when Prometheus scrapes."""

    def __init__(self, get_ctx: Callable[[], Context]):
        self._get_ctx = get_ctx

    def describe(self):
        return []  # nothing is read at registration time

    def collect(self) -> Iterator:
        up = GaugeMetricFamily(
            "recsys_control_plane_database_up", "1 if the last scrape could read the database"
        )
        started = time.perf_counter()
        try:
            families = list(self._families(self._get_ctx()))
        except Exception as exc:  # a scrape must still answer when the database is down
            log.warning("metrics scrape could not read state", extra={"error": repr(exc)[:200]})
            families, ok = [], 0
        else:
            ok = 1
        up.add_metric([], ok)
        yield up
        yield GaugeMetricFamily(
            "recsys_control_plane_scrape_duration_seconds",
            "Time spent reading state for this scrape",
            value=time.perf_counter() - started,
        )
        yield from families

    def _families(self, ctx: Context) -> Iterator:
        traffic = services.traffic(ctx)
        weights, versions = traffic["weights"], traffic["versions"]
        yield GaugeMetricFamily(
            "recsys_canary_weight", "Current canary weight (percent)", value=weights.get("canary", 0)
        )
        tw = GaugeMetricFamily(
            "recsys_traffic_weight", "Weight in force per role (percent)", labels=["role", "version"]
        )
        for role, weight in sorted(weights.items()):
            version = versions.get(role)
            tw.add_metric([role, "" if version is None else str(version)], weight)
        yield tw
        mirror = GaugeMetricFamily(
            "recsys_shadow_mirror_percent",
            "Share of the weighted requests Traefik copies to a shadow candidate (percent; absent: no shadow)",
            labels=["version"],
        )
        if traffic["shadow"] is not None:
            mirror.add_metric([str(traffic["shadow"]["version"])], traffic["shadow"]["percent"])
        yield mirror

        latest = ctx.ledger.list(1)
        phase = GaugeMetricFamily(
            "recsys_rollout_phase", "1 for the latest rollout's current phase", labels=["rollout_id", "phase"]
        )
        if latest:
            for p in Phase:
                phase.add_metric([str(latest[0].id), str(p)], 1 if latest[0].phase is p else 0)
        yield phase

        counts, last_eval = ctx.ledger.action_counts(), ctx.ledger.last_evaluation()
        total = CounterMetricFamily("recsys_decisions", "Ledger rows by action", labels=["action"])
        for action, n in sorted(counts.items()):
            total.add_metric([action], n)
        yield total
        overrides = CounterMetricFamily(
            "recsys_overrides",
            "Operator promotions and rollbacks that overrode the analysis (ledger actions override_*)",
            labels=["action"],
        )
        for action in ("promote", "rollback"):
            overrides.add_metric([action], counts.get(f"override_{action}", 0))
        yield overrides

        last_ts = GaugeMetricFamily(
            "recsys_rollout_last_evaluation_timestamp_seconds", "When the latest evaluation was recorded"
        )
        stat = _gauge(
            "recsys_last_evaluation_stat", "Numeric statistics behind the latest evaluation", "name"
        )
        rule_value = _gauge(
            "recsys_last_evaluation_rule_value", "Value each rule compared at the latest evaluation", "rule"
        )
        rule_threshold = _gauge(
            "recsys_last_evaluation_rule_threshold", "Threshold of each rule at the latest evaluation", "rule"
        )
        rule_passed = _gauge(
            "recsys_last_evaluation_rule_passed", "1 if the rule held, 0 if not (absent: no data)", "rule"
        )
        if last_eval is not None:
            last_ts.add_metric([], last_eval["ts"])
            for name, value in flatten_numbers(last_eval["stats"] or {}):
                stat.add_metric([name], value)
            for rule in last_eval["rules"] or []:
                name = str(rule.get("name"))
                for family, key in ((rule_value, "value"), (rule_threshold, "threshold")):
                    if _is_number(rule.get(key)):
                        family.add_metric([name], float(rule[key]))
                if rule.get("passed") is not None:
                    rule_passed.add_metric([name], 1 if rule["passed"] else 0)
        yield from (last_ts, stat, rule_value, rule_threshold, rule_passed)

        window = services.window_counts(ctx)
        coverage = _gauge("recsys_label_coverage", "Labelled predictions / requests over the window", "role")
        accuracy = _gauge("recsys_accuracy", "Accuracy of labelled predictions over the window", "role")
        requests = _gauge("recsys_window_requests", "Weighted requests over the window", "role")
        errors = _gauge("recsys_window_error_rate", "Share of 5xx over the window", "role")
        users = _gauge(
            "recsys_window_users",
            "Distinct users (X-User-Id) with a weighted request over the window",
            "role",
        )
        exposures = _gauge(
            "recsys_window_exposures",
            "/recommend answers whose attribution window closed over the window",
            "role",
        )
        ranking = _gauge(
            "recsys_ranking_metric",
            "/recommend ranking metrics from clicks over the window: ctr_at_10, mrr, ndcg",
            "role",
            "metric",
        )
        for role, arm in sorted(window.items()):
            rank = arm["ranking"]
            exposures.add_metric([role], rank["exposures"])
            for name in ("ctr_at_k", "mrr", "ndcg"):
                if rank[name] is not None:
                    ranking.add_metric([role, name.replace("_k", f"_{rank['k']}")], rank[name])
            users.add_metric([role], arm["users"])
            requests.add_metric([role], arm["requests"])
            errors.add_metric([role], arm["error_rate"])
            coverage.add_metric([role], arm["labelled"] / arm["requests"] if arm["requests"] else 0.0)
            if arm["accuracy"] is not None:
                accuracy.add_metric([role], arm["accuracy"])
        yield from (coverage, accuracy, requests, errors, users, exposures, ranking)


def _gauge(name: str, documentation: str, *labels: str) -> GaugeMetricFamily:
    """A gauge family with these label names."""
    return GaugeMetricFamily(name, documentation, labels=list(labels))


def flatten_numbers(value: Any, prefix: str = "") -> Iterator[tuple[str, float]]:
    """Numeric leaves of nested stats as (dotted name, value); intervals become name.lo / name.hi."""
    if isinstance(value, dict):
        for k, v in value.items():
            yield from flatten_numbers(v, f"{prefix}.{k}" if prefix else str(k))
    elif isinstance(value, list | tuple):
        names = ("lo", "hi") if len(value) == 2 else tuple(str(i) for i in range(len(value)))
        for name, v in zip(names, value, strict=True):
            yield from flatten_numbers(v, f"{prefix}.{name}")
    elif _is_number(value) and prefix:
        yield prefix, float(value)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not (isinstance(value, float) and not math.isfinite(value))


LABEL_ROWS_EXTENSION = "recsys_label_rows"  # app.extensions: counts the label spill's outcomes
LABEL_OUTCOMES = ("spilled", "replayed", "dead_letter", "refused", "lost")


def install_metrics(app: Flask, get_ctx: Callable[[], Context], multiproc_dir: Path | None = None) -> None:
    """Count requests per endpoint and status, and serve /metrics (every process's, from `multiproc_dir`)."""
    registry = CollectorRegistry()
    # In multiprocess mode the values live in files, so the metric objects belong to no registry.
    http_registry = None if multiproc_dir else registry
    http_requests = Counter(
        "recsys_http_requests",
        "HTTP requests answered by this control plane",
        ["endpoint", "status"],
        registry=http_registry,
    )
    http_seconds = Histogram(
        "recsys_http_request_duration_seconds",
        "Time to answer an HTTP request",
        ["endpoint"],
        registry=http_registry,
    )
    label_rows = Counter(
        "recsys_label_spill_rows",
        "Labels by what the spill did with them: spilled, replayed, dead_letter (moved aside), "
        "refused (database down and the disk full: the client got 503), lost (not even moved aside)",
        ["outcome"],
        registry=http_registry,
    )
    for outcome in LABEL_OUTCOMES:  # every series from the start, at 0: increase() sees the first one
        label_rows.labels(outcome)
    app.extensions[LABEL_ROWS_EXTENSION] = lambda outcome, n: label_rows.labels(outcome).inc(n)
    registry.register(RolloutCollector(get_ctx))

    @app.after_request
    def _count(response: Response) -> Response:
        endpoint = request.endpoint or "unmatched"
        http_requests.labels(endpoint, str(response.status_code)).inc()
        if "started" in g:
            http_seconds.labels(endpoint).observe(time.perf_counter() - g.started)
        return response

    @app.get("/metrics")
    def metrics():
        if multiproc_dir:
            from prometheus_client import multiprocess

            scrape = CollectorRegistry()
            multiprocess.MultiProcessCollector(scrape)
            body = generate_latest(scrape) + generate_latest(registry)
        else:
            body = generate_latest(registry)
        return Response(body, content_type=CONTENT_TYPE_LATEST)
