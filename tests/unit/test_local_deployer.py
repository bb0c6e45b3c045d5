"""LocalDeployer gives up on a Bento that keeps dying while it starts, instead of waiting out its timeout."""

from __future__ import annotations

import time

import pytest

from control_plane.deployer.local import LocalDeployer, bento_program
from control_plane.errors import DeployFailed
from control_plane.settings import Settings


class ScriptedSupervisor:
    """Supervisor's interface (add, remove, processes), replaying a list of process states."""

    def __init__(self, states: list[dict]):
        self.states = list(states)
        self.programs: dict[str, object] = {}
        self.removed: list[str] = []

    def add(self, program) -> None:
        self.programs[program.name] = program

    def remove(self, name: str) -> None:
        self.removed.append(name)
        self.programs.pop(name, None)

    def processes(self) -> dict[str, dict]:
        state = self.states.pop(0) if len(self.states) > 1 else self.states[0]
        return {name: {"name": name, **state} for name in self.programs}


@pytest.fixture
def deployer(tmp_path, monkeypatch):
    def make(states, ready_after: float | None = None, timeout_s: float = 60):
        settings = Settings.from_env({"RECSYS_STATE_DIR": str(tmp_path)})
        d = LocalDeployer(settings, ScriptedSupervisor(states), ready_timeout_s=timeout_s)
        started = time.monotonic()
        monkeypatch.setattr(d, "build", lambda v: f"recsys:v{v}")
        monkeypatch.setattr(d, "_publish_targets", lambda: None)
        monkeypatch.setattr(
            d, "ready", lambda url: ready_after is not None and time.monotonic() - started >= ready_after
        )
        monkeypatch.setattr("control_plane.deployer.local.time.sleep", lambda s: None)
        settings.log_dir.mkdir(parents=True, exist_ok=True)
        (settings.log_dir / "bento-v4.log").write_text(
            "loading\nTraceback ...\nImportError: no module named x\n"
        )
        return d

    return make


def test_a_bento_that_keeps_exiting_fails_fast_with_the_end_of_its_log(deployer):
    d = deployer(
        [
            {"statename": "STARTING", "pid": 11},
            {"statename": "BACKOFF", "pid": 0},
            {"statename": "STARTING", "pid": 12},
            {"statename": "BACKOFF", "pid": 0},
            {"statename": "STARTING", "pid": 13},
        ]
    )
    started = time.monotonic()
    with pytest.raises(DeployFailed) as err:
        d.deploy(4)
    assert time.monotonic() - started < 5
    assert "exited 2 times while starting" in str(err.value)
    assert "ImportError: no module named x" in str(err.value)
    assert d.supervisor.removed == ["bento-v4"]


def test_supervisor_giving_up_is_a_failure_at_once(deployer):
    d = deployer([{"statename": "FATAL", "pid": 0}])
    with pytest.raises(DeployFailed, match="could not be started"):
        d.deploy(4)


def test_a_slow_but_healthy_start_is_waited_for(deployer):
    d = deployer([{"statename": "STARTING", "pid": 21}, {"statename": "RUNNING", "pid": 21}], ready_after=0.3)
    assert d.deploy(4) == d.url(4)
    assert d.supervisor.removed == []


def test_a_bento_that_never_answers_times_out(deployer):
    d = deployer([{"statename": "RUNNING", "pid": 31}], timeout_s=0.2)
    with pytest.raises(DeployFailed, match="did not answer"):
        d.deploy(4)


def test_the_bento_is_built_into_the_home_the_stack_serves_from(tmp_path, monkeypatch):
    settings = Settings.from_env({"RECSYS_STATE_DIR": str(tmp_path)})
    homes = []
    monkeypatch.setattr(
        "bentos.build.build_bento", lambda v, **kw: homes.append(kw["bentoml_home"]) or f"recsys:v{v}"
    )
    assert LocalDeployer(settings, ScriptedSupervisor([{}])).build(3) == "recsys:v3"
    assert homes == [settings.bentoml_home]
    served_from = bento_program(settings, 3).env["BENTOML_HOME"]
    assert served_from == str(settings.bentoml_home)


@pytest.mark.parametrize(
    "cls",
    [
        LocalDeployer,
        "control_plane.deployer.fixed.FixedDeployer",
        "control_plane.deployer.memory.InMemoryDeployer",
        "control_plane.deployer.kubernetes.KubernetesDeployer",
    ],
)
def test_every_deployer_has_the_whole_interface(cls):
    import importlib

    from control_plane.deployer.base import Deployer

    if isinstance(cls, str):
        module, _, name = cls.rpartition(".")
        cls = getattr(importlib.import_module(module), name)
    wanted = {n for n in vars(Deployer) if not n.startswith("_")}
    assert wanted == {"deploy", "start_many", "undeploy", "endpoints"}
    assert all(callable(getattr(cls, n, None)) for n in wanted), wanted - set(dir(cls))


def test_the_running_endpoints_are_told_after_every_change(tmp_path, monkeypatch):
    settings = Settings.from_env({"RECSYS_STATE_DIR": str(tmp_path)})
    told = []
    d = LocalDeployer(
        settings, ScriptedSupervisor([{"statename": "RUNNING", "pid": 1}] * 4), on_endpoints=told.append
    )
    monkeypatch.setattr(d, "build", lambda v: f"recsys:v{v}")
    monkeypatch.setattr(d, "ready", lambda url: True)
    assert d.start_many([1, 2]) == {1: d.url(1), 2: d.url(2)}
    d.undeploy(1)
    assert told[-1] == {2: d.url(2)} and {1: d.url(1), 2: d.url(2)} in told
