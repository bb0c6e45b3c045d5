"""The local stack's program definitions: what each process is started with."""

from __future__ import annotations

import pytest

from control_plane.settings import Settings
from control_plane.stack import programs


def test_traefik_gets_one_go_processor_on_two_cores_and_go_s_default_on_more(monkeypatch):
    monkeypatch.delenv("GOMAXPROCS", raising=False)
    assert programs.traefik_env(2) == {"GOMAXPROCS": "1"}
    assert programs.traefik_env(8) == {}


def test_an_operator_s_gomaxprocs_wins(monkeypatch):
    monkeypatch.setenv("GOMAXPROCS", "2")
    assert programs.traefik_env(2) == {}


def test_the_traefik_program_carries_its_environment(monkeypatch, tmp_path):
    monkeypatch.delenv("GOMAXPROCS", raising=False)
    monkeypatch.setattr(programs.os, "cpu_count", lambda: 2)
    program = programs.traefik(Settings.from_env({"RECSYS_STATE_DIR": str(tmp_path)}))
    assert program.env["GOMAXPROCS"] == "1"
    assert program.command[-1] == f"--configFile={tmp_path / 'traefik' / 'traefik.yml'}"


def test_redis_clients_are_never_given_up_on_after_a_long_outage(tmp_path):
    settings = Settings.from_env({"RECSYS_STATE_DIR": str(tmp_path)})
    for program in (programs.worker(settings), programs.scheduler(settings)):
        assert program.startretries >= 1000
        assert "startretries=1000\n" in program.render(tmp_path)
    assert "startretries=10\n" in programs.traefik(settings).render(tmp_path)


def test_the_fast_proxy_switch_is_read_passed_on_and_checked(tmp_path):
    base = {"RECSYS_STATE_DIR": str(tmp_path)}
    assert Settings.from_env(base).traefik_fast_proxy is True
    off = Settings.from_env({**base, "RECSYS_TRAEFIK_FAST_PROXY": "off"})
    assert off.traefik_fast_proxy is False
    assert Settings.from_env(off.to_env()).traefik_fast_proxy is False  # a child sees the same
    with pytest.raises(ValueError, match="RECSYS_TRAEFIK_FAST_PROXY='maybe': expected on or off"):
        Settings.from_env({**base, "RECSYS_TRAEFIK_FAST_PROXY": "maybe"})


def test_the_access_log_mode_is_read_passed_on_and_checked(tmp_path):
    base = {"RECSYS_STATE_DIR": str(tmp_path)}
    assert Settings.from_env(base).traefik_access_log == "problems"
    every = Settings.from_env({**base, "RECSYS_TRAEFIK_ACCESS_LOG": "ALL"})
    assert every.traefik_access_log == "all"
    assert Settings.from_env(every.to_env()).traefik_access_log == "all"
    with pytest.raises(
        ValueError, match="RECSYS_TRAEFIK_ACCESS_LOG='sometimes': expected one of problems, all, off"
    ):
        Settings.from_env({**base, "RECSYS_TRAEFIK_ACCESS_LOG": "sometimes"})


def test_the_redis_password_is_in_0600_files_and_environments_never_on_a_command_line(tmp_path):
    from control_plane.stack.local import create_secrets

    (tmp_path / "state").mkdir()
    settings = create_secrets(Settings.from_env({"RECSYS_STATE_DIR": str(tmp_path / "state")}))
    password = settings.redis_password
    assert (
        password
        and Settings.from_env({"RECSYS_STATE_DIR": str(tmp_path / "state")}).redis_password == password
    )
    conf = programs.redis_config_path(settings)
    assert f'requirepass "{password}"' in conf.read_text() and conf.stat().st_mode & 0o777 == 0o600
    assert settings.effective_redis_url == f"redis://:{password}@127.0.0.1:{settings.embedded_redis_port}/0"
    worker, scheduler, redis = (
        programs.worker(settings),
        programs.scheduler(settings),
        programs.redis(settings),
    )
    for program in (worker, scheduler, redis):
        assert password not in " ".join(program.command), program.name
    assert worker.env["RQ_REDIS_URL"] == scheduler.env["REDIS_URL"] == settings.effective_redis_url
    assert "--serializer json" in worker.command[-1]  # /bin/sh -c "... exec rq worker ..."
    assert (tmp_path / "state").stat().st_mode & 0o777 == 0o700


def test_a_redis_url_from_the_environment_is_used_as_given(tmp_path):
    settings = Settings.from_env({"RECSYS_STATE_DIR": str(tmp_path), "REDIS_URL": "redis://:pw@r:6379/0"})
    (tmp_path / "redis-password").write_text("not-this-one")
    assert settings.effective_redis_url == "redis://:pw@r:6379/0" and settings.redis_password == ""


def test_the_mlflow_server_runs_its_basic_auth_app_configured_from_the_state_directory(tmp_path):
    settings = Settings.from_env({"RECSYS_STATE_DIR": str(tmp_path)})
    program = programs.mlflow(settings, "csrf-key")
    assert program.command[program.command.index("--app-name") + 1] == "basic-auth"
    assert program.env["MLFLOW_AUTH_CONFIG_PATH"] == str(tmp_path / "mlflow-auth.ini")
    assert program.env["MLFLOW_FLASK_SERVER_SECRET_KEY"] == "csrf-key"
    ini = programs.mlflow_auth_config(settings, "the-token")
    assert "admin_username = operator\n" in ini and "admin_password = the-token\n" in ini
    assert f"database_uri = sqlite:///{tmp_path / 'mlflow-auth.db'}\n" in ini


def test_the_control_plane_is_served_by_waitress_with_a_request_deadline_as_compose_serves_it(tmp_path):
    import json
    from pathlib import Path

    import yaml

    settings = Settings.from_env({"RECSYS_STATE_DIR": str(tmp_path), "RECSYS_CONTROL_PLANE_PORT": "8123"})
    local = programs.control_plane_server(settings)
    assert local[1:3] == ["-m", "control_plane.web.server"] and "--listen=127.0.0.1:8123" in local
    assert f"--request-timeout={programs.CONTROL_PLANE_REQUEST_TIMEOUT_S}" in local
    assert f"--max-request-body-size={settings.max_body_bytes}" in local
    assert "exec " + " ".join(local[:4]) in programs.control_plane(settings).command[-1]
    repo = Path(__file__).resolve().parents[2]
    compose = yaml.safe_load((repo / "docker-compose.yml").read_text())["services"]["control-plane"][
        "command"
    ]
    container = ["python", *programs.control_plane_server(settings, listen="0.0.0.0:8090")[1:]]
    assert compose == container
    dockerfile = (repo / "infra/docker/app.Dockerfile").read_text()
    assert f"CMD {json.dumps(container)}" in dockerfile
