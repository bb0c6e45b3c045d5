"""A thin client for supervisord: write a program's config, add it, remove it, list what runs.

The bottom of the process layer: the local stack (control_plane/stack/) and the local deployer define
their programs with `program` and run them with a Supervisor.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import time
import xmlrpc.client
from dataclasses import dataclass
from pathlib import Path

from control_plane.settings import Settings

log = logging.getLogger(__name__)
BIN = Path(sys.executable).parent  # this environment's console scripts (rq, bentoml, waitress-serve, ...)

BASE_CONF = """\
[unix_http_server]
file={sock}
chmod=0700

[supervisord]
logfile={log_dir}/supervisord.log
pidfile={dir}/supervisord.pid
childlogdir={log_dir}
nodaemon=false
minfds=1024

[rpcinterface:supervisor]
supervisor.rpcinterface_factory = supervisor.rpcinterface:make_main_rpcinterface

[supervisorctl]
serverurl=unix://{sock}

[include]
files = {dir}/conf.d/*.conf
"""


@dataclass(frozen=True)
class Program:
    """One supervised process."""

    name: str
    command: list[str]
    env: dict[str, str]
    directory: str
    autorestart: bool = True
    startsecs: int = 1
    stopwaitsecs: int = 15
    startretries: int = 10  # failed starts in a row before supervisord gives up (FATAL)

    def render(self, log_dir: Path) -> str:
        def q(s: str) -> str:
            return s.replace("%", "%%")

        env = ",".join(f'{k}="{q(v)}"' for k, v in sorted(self.env.items()))
        cmd = " ".join(q(_shell_quote(c)) for c in self.command)
        return (
            f"[program:{self.name}]\ncommand={cmd}\ndirectory={self.directory}\nenvironment={env}\n"
            f"autostart=true\nautorestart={'true' if self.autorestart else 'false'}\nstartsecs={self.startsecs}\n"
            f"startretries={self.startretries}\nstopsignal=TERM\nstopwaitsecs={self.stopwaitsecs}\nstopasgroup=true\n"
            f"killasgroup=true\nredirect_stderr=true\nstdout_logfile={log_dir}/{self.name}.log\n"
            f"stdout_logfile_maxbytes=20MB\nstdout_logfile_backups=2\n"
        )


def _shell_quote(arg: str) -> str:
    if arg and all(c.isalnum() or c in "-_./:=@,+" for c in arg):
        return arg
    return "'" + arg.replace("'", "'\"'\"'") + "'"


class Supervisor:
    """supervisord for one state directory, driven over its XML-RPC unix socket."""

    def __init__(self, state_dir: Path):
        self.dir = Path(state_dir) / "supervisor"
        self.log_dir = Path(state_dir) / "logs"
        self.sock = self.dir / "supervisor.sock"
        self.conf = self.dir / "supervisord.conf"

    # lifecycle ------------------------------------------------------------
    def rpc(self):
        from supervisor.xmlrpc import SupervisorTransport

        transport = SupervisorTransport(None, None, serverurl=f"unix://{self.sock}")
        return xmlrpc.client.ServerProxy("http://127.0.0.1", transport=transport)

    def running(self) -> bool:
        if not self.sock.exists():
            return False
        try:
            return self.rpc().supervisor.getState()["statename"] == "RUNNING"
        except (OSError, xmlrpc.client.Fault):
            return False

    def start(self) -> None:
        if self.running():
            return
        (self.dir / "conf.d").mkdir(parents=True, exist_ok=True)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.conf.write_text(BASE_CONF.format(sock=self.sock, dir=self.dir, log_dir=self.log_dir))
        supervisord = Path(sys.executable).with_name("supervisord")
        subprocess.run([str(supervisord), "-c", str(self.conf)], check=True)
        deadline = time.monotonic() + 20
        while not self.running():
            if time.monotonic() > deadline:
                raise RuntimeError(f"supervisord did not start; see {self.log_dir / 'supervisord.log'}")
            time.sleep(0.2)

    def pid(self) -> int | None:
        try:
            return int((self.dir / "supervisord.pid").read_text())
        except (OSError, ValueError):
            return None

    def shutdown(self, timeout_s: float = 60) -> None:
        """Stop every program and supervisord itself, and wait until they are gone."""
        pid = self.pid()
        if self.running():
            self.rpc().supervisor.shutdown()
        deadline = time.monotonic() + timeout_s
        while pid and _alive(pid) and time.monotonic() < deadline:
            time.sleep(0.2)
        for f in self.dir.glob("conf.d/*.conf"):
            f.unlink()

    # programs -------------------------------------------------------------
    def add(self, program: Program) -> None:
        """Write the program's config and start it (restarting it if the config changed)."""
        path = self.dir / "conf.d" / f"{program.name}.conf"
        path.parent.mkdir(parents=True, exist_ok=True)
        text = program.render(self.log_dir)
        if path.exists() and path.read_text() == text and program.name in self.processes():
            return
        tmp = path.with_suffix(".tmp")
        tmp.write_text(text)
        os.replace(tmp, path)
        self._update()

    def remove(self, name: str) -> None:
        path = self.dir / "conf.d" / f"{name}.conf"
        if path.exists():
            path.unlink()
        self._update()

    def _update(self) -> None:
        server = self.rpc().supervisor
        added, changed, removed = server.reloadConfig()[0]
        for name in removed + changed:
            self._stop_and_remove(server, name)
        for name in added + changed:
            server.addProcessGroup(name)

    def _stop_and_remove(self, server, name: str, timeout_s: float = 60) -> None:
        """Stop a group and wait until supervisord agrees it is down, then forget it."""
        try:
            server.stopProcessGroup(name, True)
        except xmlrpc.client.Fault as exc:
            if "NOT_RUNNING" not in exc.faultString and "BAD_NAME" not in exc.faultString:
                log.warning("stopping %s: %s", name, exc.faultString)
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                server.removeProcessGroup(name)
                return
            except xmlrpc.client.Fault as exc:
                if "BAD_NAME" in exc.faultString:
                    return
                if "STILL_RUNNING" not in exc.faultString or time.monotonic() > deadline:
                    raise
            time.sleep(0.3)

    def processes(self) -> dict[str, dict]:
        """name -> supervisor's process info (statename, pid, description, ...)."""
        if not self.running():
            return {}
        return {p["name"]: p for p in self.rpc().supervisor.getAllProcessInfo()}


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def program_env(settings: Settings, **extra: str) -> dict[str, str]:
    """A program's environment: the settings (Settings.to_env), this environment's scripts first on PATH."""
    env = settings.to_env()
    path = os.environ.get("PATH", "/usr/bin:/bin")
    # Prepend only once: a config that differs on every call would restart running Bentos on each deploy.
    env["PATH"] = path if path.split(":")[0] == str(BIN) else f"{BIN}:{path}"
    env.update(extra)
    return env


def program(settings: Settings, name: str, command: list[str], **kw) -> Program:
    """A Program run from the current directory with the settings' environment (plus `env`)."""
    env = kw.pop("env", {})
    return Program(
        name=name, command=command, env=program_env(settings, **env), directory=str(Path.cwd()), **kw
    )
