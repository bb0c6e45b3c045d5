"""The deployer interface: a version in, a ready HTTP endpoint out."""

from __future__ import annotations

from typing import Protocol


class Deployer(Protocol):
    """Runs one Bento per version; `deploy` returns only once the endpoint answers /readyz."""

    def deploy(self, version: int) -> str:
        """Build (if needed) and start `version`; return its base URL once ready. Raises DeployFailed."""
        ...

    def start_many(self, versions: list[int]) -> dict[int, str]:
        """Deploy several versions (at once where the deployer can: they load in parallel); every URL."""
        ...

    def undeploy(self, version: int) -> None:
        """Stop `version`'s Bento; a no-op if it is not running."""
        ...

    def endpoints(self) -> dict[int, str]:
        """Every running version and its base URL."""
        ...
