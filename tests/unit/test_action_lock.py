"""The action lock over a SQLite file and in memory: one holder at a time, across threads and processes."""

from __future__ import annotations

import signal
import threading
import time

import pytest

from control_plane.action_lock import ActionLock, FileLock, ProcessLock, backend_for
from control_plane.db.engine import make_engine
from control_plane.errors import ActionBusy, RolloutConflict
from tests.action_lock_support import held_by_another_process, held_by_another_thread, take_turns


@pytest.fixture
def file_url(tmp_path):
    return f"sqlite:///{tmp_path / 'recsys.db'}"


def test_each_database_gets_the_lock_that_reaches_every_process_sharing_it(tmp_path, file_url):
    backend = backend_for(make_engine(file_url))
    assert isinstance(backend, FileLock)
    assert backend.path == tmp_path / "recsys.db.action-lock"
    assert isinstance(backend_for(make_engine("sqlite://")), ProcessLock)
    assert isinstance(backend_for(make_engine("sqlite:///:memory:")), ProcessLock)


@pytest.mark.parametrize("url", ["file", "memory"])
def test_a_second_thread_waits_until_the_first_has_finished(url, file_url):
    lock = ActionLock(make_engine(file_url if url == "file" else "sqlite://"), wait_s=10)
    assert take_turns(lock) == ["first done", "second in"]


@pytest.mark.parametrize("url", ["file", "memory"])
def test_a_caller_that_waited_long_enough_is_told_who_holds_it(url, file_url):
    engine = make_engine(file_url if url == "file" else "sqlite://")
    waiter = ActionLock(engine, wait_s=0.2)
    with held_by_another_thread(ActionLock(engine), "start_canary by cli"):
        started = time.monotonic()
        with pytest.raises(ActionBusy) as info, waiter.held("pause by ui"):
            pytest.fail("ran while another action held the lock")
        assert time.monotonic() - started >= 0.2
    assert isinstance(info.value, RolloutConflict) and info.value.http_status == 409
    assert "start_canary by cli" in str(info.value) and "try again" in str(info.value)


def test_it_is_taken_once_by_a_write_that_calls_another_and_let_go_after_an_error(file_url):
    lock = ActionLock(make_engine(file_url), wait_s=0.2)
    with lock.held("restore_previous_baseline by cli"), lock.held("rollback_now by cli"):
        pass
    with pytest.raises(ValueError), lock.held("set_weights by ui"):
        raise ValueError("the action failed")
    other = ActionLock(make_engine(file_url), wait_s=0.2)
    taken = []

    def another_process() -> None:
        with other.held("evaluate by scheduler"):
            taken.append(True)

    t = threading.Thread(target=another_process)
    t.start()
    t.join(5)
    assert taken, "the lock was kept after the action's error"


def test_a_holder_that_is_killed_lets_go_and_others_are_told_its_pid_until_then(file_url):
    holder = held_by_another_process(file_url, "deploy_role by cli")
    try:
        busy = ActionLock(make_engine(file_url), wait_s=0.2)
        with (
            pytest.raises(ActionBusy, match=rf"deploy_role by cli, pid {holder.pid}, for \d+ s"),
            busy.held("evaluate by scheduler"),
        ):
            pass
        holder.send_signal(signal.SIGKILL)
        holder.wait(10)
        with ActionLock(make_engine(file_url), wait_s=5).held("evaluate by scheduler"):
            pass
    finally:
        holder.kill()
        holder.wait()
