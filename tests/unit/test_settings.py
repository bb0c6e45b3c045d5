"""Settings: each field read from its variable once, handed on to children, refused with the variable's name."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from control_plane.settings import DEFAULT_WEIGHTS, Settings


def test_defaults_live_under_the_state_directory(tmp_path):
    s = Settings.from_env({"RECSYS_STATE_DIR": str(tmp_path)})
    assert s.database_url == f"sqlite:///{tmp_path / 'recsys.db'}"
    assert s.mlflow_tracking_uri == f"sqlite:///{tmp_path / 'mlflow.db'}"
    assert s.bentoml_home == tmp_path / "bentoml" and s.spill_dir == tmp_path / "spill"
    assert s.traffic_weights == DEFAULT_WEIGHTS and s.gateway_port == 8080 and s.predlog == "on"


def test_every_field_names_one_variable_and_no_two_share_it():
    names = [f.metadata["env"].name for f in dataclasses.fields(Settings)]
    assert len(names) == len(set(names)) == len(dataclasses.fields(Settings))


def test_values_are_parsed_by_type_and_an_empty_variable_counts_as_unset(tmp_path):
    s = Settings.from_env(
        {
            "RECSYS_STATE_DIR": str(tmp_path),
            "RECSYS_GATEWAY_PORT": "9000",
            "RECSYS_LOG_SETTLE_S": "0.5",
            "RECSYS_TRAEFIK_FAST_PROXY": "off",
            "RECSYS_ACCESS_LOG": "yes",
            "TRAFFIC_WEIGHTS": "baseline=90,control=10",
            "RECSYS_BENTO_URLS": "1=http://a:3000",
            "RECSYS_SPILL_DIR": str(tmp_path / "elsewhere"),
            "RECSYS_PREDLOG": "process",
            "DATABASE_URL": "",
        }
    )
    assert (s.gateway_port, s.log_settle_s, s.traefik_fast_proxy, s.bento_access_log) == (
        9000,
        0.5,
        False,
        True,
    )
    assert s.traffic_weights == {"baseline": 90, "control": 10} and s.bento_urls == {1: "http://a:3000"}
    assert s.spill_dir == tmp_path / "elsewhere" and s.predlog == "on"
    assert s.database_url.startswith("sqlite:///")


@pytest.mark.parametrize(
    "name, value",
    [
        ("RECSYS_GATEWAY_PORT", "eighty"),
        ("RECSYS_PREDLOG", "sometimes"),
        ("RECSYS_DEPLOYER", "swarm"),
        ("RECSYS_TRAEFIK_FAST_PROXY", "maybe"),
        ("TRAFFIC_WEIGHTS", "baseline"),
    ],
)
def test_a_bad_value_is_refused_naming_its_variable(name, value):
    with pytest.raises(ValueError, match=name):
        Settings.from_env({name: value})


def test_a_child_gets_the_same_settings_and_no_secret(tmp_path):
    parent = Settings.from_env(
        {
            "RECSYS_STATE_DIR": str(tmp_path),
            "RECSYS_EVAL_INTERVAL_S": "7",
            "RECSYS_TRAEFIK_ACCESS_LOG": "all",
            "RECSYS_API_TOKEN": "secret-token",
            "RECSYS_REDIS_PASSWORD": "pw",
        }
    )
    env = parent.to_env()
    assert "RECSYS_API_TOKEN" not in env and "RECSYS_REDIS_PASSWORD" not in env
    assert env["REDIS_URL"] == "redis://:pw@127.0.0.1:6390/0"  # the embedded Redis, its password in the URL
    child = Settings.from_env(env)
    same = (
        "state_dir",
        "database_url",
        "eval_interval_s",
        "traefik_access_log",
        "traffic_weights",
        "bentoml_home",
    )
    assert all(getattr(child, f) == getattr(parent, f) for f in same)


def test_a_redis_url_carries_its_own_password(tmp_path):
    (tmp_path / "redis-password").write_text("from-file")
    embedded = Settings.from_env({"RECSYS_STATE_DIR": str(tmp_path)})
    assert embedded.redis_password == "from-file"
    given = Settings.from_env({"RECSYS_STATE_DIR": str(tmp_path), "REDIS_URL": "redis://r:6379/0"})
    assert given.redis_password == "" and given.effective_redis_url == "redis://r:6379/0"
    assert Path(given.to_env()["RECSYS_STATE_DIR"]) == tmp_path
