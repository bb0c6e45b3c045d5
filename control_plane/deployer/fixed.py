"""Bentos that something else runs (compose containers, a Kubernetes Deployment): known URLs, no starting."""

from __future__ import annotations

from control_plane.deployer.local import is_ready
from control_plane.errors import DeployFailed


class FixedDeployer:
    """Endpoints come from settings (RECSYS_BENTO_URLS); deploy only checks the version is there and ready."""

    def __init__(self, urls: dict[int, str]):
        self.urls = dict(urls)

    def deploy(self, version: int) -> str:
        url = self.urls.get(version)
        if url is None:
            raise DeployFailed(
                f"version {version} has no container here; build its image (bentoml containerize recsys:v{version}) "
                "and add it to RECSYS_BENTO_URLS"
            )
        if not is_ready(url):
            raise DeployFailed(f"version {version} at {url} does not answer /readyz")
        return url

    def start_many(self, versions: list[int]) -> dict[int, str]:
        return {v: self.deploy(v) for v in versions}

    def undeploy(self, version: int) -> None:
        """Containers are stopped by their orchestrator, not from here."""

    def endpoints(self) -> dict[int, str]:
        return dict(self.urls)
