"""Starting and stopping one Bento per model version."""

from control_plane.deployer.base import Deployer

__all__ = ["Deployer"]
