"""The control plane's web layer: JSON API, operator UI and /metrics, built by `create_app`."""

from control_plane.web.app import create_app

__all__ = ["create_app"]
