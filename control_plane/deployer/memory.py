"""An in-memory deployer for unit tests: same interface, no processes."""

from __future__ import annotations

from control_plane.errors import DeployFailed


class InMemoryDeployer:
    """Pretends to run Bentos; versions in `broken` fail to start, as a real canary might."""

    def __init__(self, broken: set[int] | None = None, base_port: int = 3100):
        self._running: dict[int, str] = {}
        self.broken = set(broken or ())
        self.base_port = base_port

    def deploy(self, version: int) -> str:
        if version in self.broken:
            raise DeployFailed(f"version {version} did not become ready")
        url = f"http://127.0.0.1:{self.base_port + version}"
        self._running[version] = url
        return url

    def start_many(self, versions: list[int]) -> dict[int, str]:
        return {v: self.deploy(v) for v in versions}

    def undeploy(self, version: int) -> None:
        self._running.pop(version, None)

    def endpoints(self) -> dict[int, str]:
        return dict(self._running)
