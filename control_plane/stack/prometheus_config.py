"""Prometheus for the local stack: the same jobs as infra/prometheus/prometheus.yml, on loopback ports.

The Bentos come and go with deployments, so they are a file_sd target list that the deployer rewrites
(`write_bento_targets`); Prometheus watches the file and needs no reload.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import yaml

from control_plane.settings import Settings

BENTO_TARGETS_FILENAME = "bentos.json"
# The rule file compose mounts; the local config points at it where the source tree is (an editable install).
RULES_PATH = Path(__file__).resolve().parents[2] / "infra" / "prometheus" / "rules.yml"
DEFAULT_WORKER_METRICS_PORT = 9101  # control_plane.worker_metrics.DEFAULT_PORT, without importing rq here
SCRAPE_INTERVAL = "5s"  # a laptop demo wants quick feedback; compose scrapes every 15 s


def prometheus_dir(settings: Settings) -> Path:
    return settings.state_dir / "prometheus"


def bento_targets_path(settings: Settings) -> Path:
    return prometheus_dir(settings) / BENTO_TARGETS_FILENAME


def worker_metrics_port(settings: Settings) -> int:
    """The worker's metrics port: Settings.worker_metrics_port once it exists, else the worker's default."""
    return int(getattr(settings, "worker_metrics_port", DEFAULT_WORKER_METRICS_PORT))


def _reachable(host: str) -> str:
    """Where to scrape a server bound to `host`: a wildcard bind is reached on loopback."""
    return "127.0.0.1" if host in ("", "0.0.0.0", "::", "[::]") else host


def local_prometheus_config(settings: Settings, rules_path: Path | None = RULES_PATH) -> dict[str, Any]:
    """The configuration as a dict: Traefik, the Bentos (file_sd), the control plane, the worker, itself."""
    host = _reachable(settings.bind_host)

    def static(job: str, port: int) -> dict[str, Any]:
        return {"job_name": job, "static_configs": [{"targets": [f"{host}:{port}"]}]}

    return {
        "global": {
            "scrape_interval": SCRAPE_INTERVAL,
            "evaluation_interval": SCRAPE_INTERVAL,
            "external_labels": {"system": "recsys-canary"},
        },
        "rule_files": [str(rules_path)] if rules_path is not None and rules_path.exists() else [],
        "scrape_configs": [
            static("traefik", settings.traefik_api_port),
            {
                "job_name": "bentos",
                # recsys_* series carry model_version themselves; the target's copy must not rename them.
                "honor_labels": True,
                "file_sd_configs": [
                    {"files": [str(bento_targets_path(settings))], "refresh_interval": "30s"}
                ],
            },
            static("control-plane", settings.control_plane_port),
            static("worker", worker_metrics_port(settings)),
            static("prometheus", settings.prometheus_port),
        ],
    }


def render_local_prometheus(settings: Settings) -> str:
    """The configuration as YAML text, for `prometheus --config.file=...`."""
    header = "# Written by control_plane.stack.prometheus_config on every `recsys up`; edits are lost.\n"
    return header + yaml.safe_dump(
        local_prometheus_config(settings), sort_keys=False, default_flow_style=False
    )


def bento_targets(endpoints: Mapping[int, str]) -> list[dict[str, Any]]:
    """file_sd entries, one per version: host:port of its URL, labelled with the model version."""
    entries = []
    for version, url in sorted(endpoints.items()):
        parts = urlsplit(url if "//" in url else f"http://{url}")
        if not parts.hostname or parts.port is None:
            raise ValueError(f"Bento endpoint for version {version} has no host:port: {url!r}")
        labels = {"model_version": str(version)}
        if parts.scheme == "https":
            labels["__scheme__"] = "https"
        entries.append({"targets": [parts.netloc], "labels": labels})
    return entries


def write_bento_targets(settings: Settings, endpoints: Mapping[int, str]) -> None:
    """Replace the Bento target file atomically (temp file + rename), so Prometheus never reads half of it."""
    path = bento_targets_path(settings)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(bento_targets(endpoints), indent=2) + "\n"
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
