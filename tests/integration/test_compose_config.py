"""docker-compose.yml: valid for docker-compose, every part present, started in a safe order."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
# The secrets docker-compose.yml requires (make compose-up creates them: infra/docker/compose-secrets.sh).
SECRETS = {
    "POSTGRES_PASSWORD": "pg-secret",
    "REDIS_PASSWORD": "redis-secret",
    "RECSYS_API_TOKEN": "operator-secret",
    "RECSYS_LABEL_TOKEN": "label-secret",
    "RECSYS_REQUEST_ID_KEY": "id-key",
    "MLFLOW_SECRET_KEY": "csrf-key",
}
BASE_ENV = {"PATH": "/usr/bin:/bin:/usr/local/bin", **SECRETS}
LONG_RUNNING = (
    "postgres",
    "redis",
    "mlflow",
    "docker-gate",
    "traefik",
    "control-plane",
    "worker",
    "scheduler",
    "prometheus",
    "grafana",
)
ONE_SHOT = ("migrate", "state-init", "seed")


@pytest.fixture(scope="module")
def compose():
    """The configuration as docker-compose resolves it (anchors merged, variables at their defaults)."""
    binary = shutil.which("docker-compose")
    if binary is None:
        pytest.skip("docker-compose is not installed (.ci/run installs it)")
    env = BASE_ENV
    check = subprocess.run([binary, "config", "-q"], cwd=REPO, env=env, capture_output=True, text=True)
    assert check.returncode == 0, check.stderr
    out = subprocess.run([binary, "config"], cwd=REPO, env=env, capture_output=True, text=True, check=True)
    return yaml.safe_load(out.stdout)


def test_every_part_of_the_production_shape_is_a_service(compose):
    assert set(LONG_RUNNING) | set(ONE_SHOT) == set(compose["services"])


@pytest.mark.parametrize("name", LONG_RUNNING)
def test_long_running_services_have_health_checks(compose, name):
    assert compose["services"][name]["healthcheck"]["test"]


@pytest.mark.parametrize(
    ("name", "needs"),
    [
        ("mlflow", {"postgres": "service_healthy"}),
        ("migrate", {"postgres": "service_healthy"}),
        ("traefik", {"state-init": "service_completed_successfully"}),
        (
            "seed",
            {
                "mlflow": "service_healthy",
                "migrate": "service_completed_successfully",
                "docker-gate": "service_healthy",
            },
        ),
        (
            "control-plane",
            {
                "postgres": "service_healthy",
                "redis": "service_healthy",
                "mlflow": "service_healthy",
                "seed": "service_completed_successfully",
            },
        ),
        ("worker", {"redis": "service_healthy", "migrate": "service_completed_successfully"}),
        ("scheduler", {"redis": "service_healthy"}),
        ("prometheus", {"traefik": "service_healthy"}),
        ("grafana", {"prometheus": "service_healthy"}),
    ],
)
def test_services_wait_for_what_they_need(compose, name, needs):
    depends = compose["services"][name]["depends_on"]
    assert {dep: depends[dep]["condition"] for dep in needs} == needs


def test_the_mlflow_server_starts_no_job_runner(compose):
    assert compose["services"]["mlflow"]["environment"]["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] == "false"


def test_app_services_get_the_production_urls(compose):
    for name in ("control-plane", "worker", "scheduler"):
        env = compose["services"][name]["environment"]
        assert env["DATABASE_URL"].startswith("postgresql+psycopg2://recsys:")
        assert env["DATABASE_URL"].endswith("@postgres:5432/recsys")
        assert env["REDIS_URL"] == env["RQ_REDIS_URL"] == "redis://:redis-secret@redis:6379/0"
        assert env["RECSYS_DOCKER_HOST"] == "tcp://docker-gate:2375"
        assert env["MLFLOW_TRACKING_URI"] == "http://mlflow:5000"
        assert (env["MLFLOW_TRACKING_USERNAME"], env["MLFLOW_TRACKING_PASSWORD"]) == (
            "operator",
            "operator-secret",
        )
        assert (env["RECSYS_LABEL_TOKEN"], env["RECSYS_REQUEST_ID_KEY"]) == ("label-secret", "id-key")
    assert "control_plane.web.app:create_app" in compose["services"]["control-plane"]["command"]
    assert compose["services"]["control-plane"]["command"][:3] == ["python", "-m", "control_plane.web.server"]
    # JSON jobs, never pickle; no password on any command line.
    assert compose["services"]["worker"]["command"] == [
        "rq",
        "worker",
        "--serializer",
        "json",
        "--worker-class",
        "control_plane.worker_metrics.MetricsWorker",
        "recsys",
    ]
    assert compose["services"]["scheduler"]["command"] == ["python", "-m", "control_plane.jobs"]
    for name, service in compose["services"].items():
        assert "redis-secret" not in str(service.get("command", "")), name


def test_secrets_are_required_not_defaulted():
    binary = shutil.which("docker-compose")
    if binary is None:
        pytest.skip("docker-compose is not installed (.ci/run installs it)")
    env = {k: v for k, v in BASE_ENV.items() if k != "REDIS_PASSWORD"}
    check = subprocess.run([binary, "config", "-q"], cwd=REPO, env=env, capture_output=True, text=True)
    assert check.returncode != 0 and "REDIS_PASSWORD" in check.stderr, check.stderr


def test_mlflow_runs_its_basic_auth_app(compose):
    mlflow = compose["services"]["mlflow"]
    command = " ".join(mlflow["command"])
    assert "--app-name basic-auth" in command
    assert mlflow["environment"]["MLFLOW_FLASK_SERVER_SECRET_KEY"] == "csrf-key"
    assert "operator-secret" not in command  # the admin password reaches the ini file from the environment


def test_traefik_runs_the_official_image_with_the_repo_config(compose):
    traefik = compose["services"]["traefik"]
    assert traefik["image"] == "traefik:v3.7"
    static = yaml.safe_load((REPO / "infra/traefik/traefik.yml").read_text())
    mounts = {v.split(":")[1]: v.split(":")[0] for v in traefik["volumes"]}
    assert mounts["/etc/traefik/traefik.yml"] == str(REPO / "infra/traefik/traefik.yml")
    # The watched directory is on the volume the control plane and worker write through.
    watched = static["providers"]["file"]["directory"]
    assert watched == "/var/lib/recsys/traefik/dynamic"
    for name in ("traefik", "control-plane", "worker"):
        volumes = compose["services"][name]["volumes"]
        assert any(v.startswith("traefik-state:/var/lib/recsys/traefik") for v in volumes), name


def test_only_the_docker_gate_holds_the_socket_on_an_internal_network(compose):
    """Bentos are the DockerDeployer's containers, not services; it reaches Docker only through the gate."""
    holders = [
        name
        for name, service in compose["services"].items()
        if any("docker.sock" in str(v) for v in service.get("volumes", []))
    ]
    assert holders == ["docker-gate"]
    assert list(compose["services"]["docker-gate"]["networks"]) == ["docker-api"]
    assert compose["networks"]["docker-api"]["internal"] is True
    assert not [name for name in compose["services"] if name.startswith("bento")]
    for name in ("seed", "control-plane", "worker"):
        assert "docker-api" in compose["services"][name]["networks"], name


def test_the_local_build_path_swaps_images_only():
    binary = shutil.which("docker-compose")
    if binary is None:
        pytest.skip("docker-compose is not installed (.ci/run installs it)")
    env = {**BASE_ENV, "COMPOSE_FILE": "docker-compose.yml:infra/docker/compose.local.yml"}
    local = yaml.safe_load(
        subprocess.run(
            [binary, "config"], cwd=REPO, env=env, capture_output=True, text=True, check=True
        ).stdout
    )
    official = yaml.safe_load(
        subprocess.run(
            [binary, "config"],
            cwd=REPO,
            env=BASE_ENV,
            capture_output=True,
            text=True,
            check=True,
        ).stdout
    )

    def normal(value):  # merging files reorders lists and spells an empty network {} instead of null
        if isinstance(value, list):
            return sorted(map(str, value))
        if isinstance(value, dict):
            return {k: normal(v) or None for k, v in value.items()}
        return value

    for name, service in official["services"].items():
        changed = {k for k in service if normal(service[k]) != normal(local["services"][name].get(k))}
        assert changed <= {"image"}, (name, changed)
    assert local["services"]["postgres"]["image"] == "recsys-postgres:bookworm"


def test_no_image_is_latest_and_ports_stay_on_loopback(compose):
    for name, service in compose["services"].items():
        image = service.get("image", "")
        assert ":" in image and not image.endswith(":latest"), name
        for port in service.get("ports", []):
            published = port if isinstance(port, str) else f"{port['host_ip']}:{port['published']}"
            assert published.startswith("127.0.0.1:"), (name, port)


def test_monitoring_config_paths_are_mounted(compose):
    prometheus = " ".join(compose["services"]["prometheus"]["volumes"])
    assert f"{REPO}/infra/prometheus/prometheus.yml:/etc/prometheus/prometheus.yml" in prometheus
    grafana = compose["services"]["grafana"]
    volumes = " ".join(grafana["volumes"])
    assert f"{REPO}/infra/grafana/provisioning:/etc/grafana/provisioning" in volumes
    assert f"{REPO}/infra/grafana/dashboards:/var/lib/grafana/dashboards" in volumes
    assert grafana["environment"]["GF_AUTH_ANONYMOUS_ENABLED"] == "true"
    assert grafana["environment"]["GF_AUTH_ANONYMOUS_ORG_ROLE"] == "Viewer"
