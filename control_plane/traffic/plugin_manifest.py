"""The `userassign` plugin's source as a ConfigMap, for a Traefik on Kubernetes to mount and load.

Traefik reads a local plugin from `./plugins-local/src/<moduleName>` under its working directory (`/` in
its image), so the ConfigMap is mounted at PLUGIN_MOUNT_PATH and the static configuration names the
module (infra/k8s/traefik/values.yaml). The ConfigMap lives in Traefik's namespace, as a pod mounts
only its own namespace's ConfigMaps; infra/k8s/render_versions.py writes it from the source beside
user_assignment.py, and tests/unit/test_k8s_manifests.py fails while the committed file differs.
"""

from __future__ import annotations

from typing import Any

import yaml

from control_plane.traffic.user_assignment import PLUGIN_MODULE, PLUGIN_SOURCE

PLUGIN_CONFIG_MAP = "recsys-userassign"
PLUGIN_MOUNT_PATH = f"/plugins-local/src/{PLUGIN_MODULE}"
TRAEFIK_NAMESPACE = "traefik"  # where its chart installs it (docs/kubernetes.md)


def plugin_files() -> dict[str, str]:
    """Every file of the plugin's source (the Go code, go.mod, the .traefik.yml manifest), by name."""
    return {p.name: p.read_text() for p in sorted(PLUGIN_SOURCE.iterdir()) if p.is_file()}


def plugin_config_map() -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {
            "name": PLUGIN_CONFIG_MAP,
            "namespace": TRAEFIK_NAMESPACE,
            "labels": {"app.kubernetes.io/part-of": "recsys-canary"},
        },
        "data": plugin_files(),
    }


def _literal(text: str, indent: str) -> str:
    """A YAML literal block holding `text` exactly (PyYAML quotes any string with a tab, as Go's are)."""
    chomp = "|+" if text.endswith("\n\n") else "|" if text.endswith("\n") else "|-"
    lines = text[:-1].split("\n") if text.endswith("\n") else text.split("\n")
    return chomp + "\n" + "".join(f"{indent}{line}\n" if line else "\n" for line in lines)


def plugin_config_map_text() -> str:
    """The ConfigMap as YAML, each file a literal block; yaml.safe_load of it gives plugin_config_map()."""
    head = {k: v for k, v in plugin_config_map().items() if k != "data"}
    data = "".join(f"  {name}: {_literal(text, '    ')}" for name, text in plugin_files().items())
    return (
        "# Written by infra/k8s/render_versions.py from control_plane/traffic/userassign: do not edit.\n"
        f"# The userassign plugin's source, which Traefik mounts at {PLUGIN_MOUNT_PATH}.\n"
        + yaml.safe_dump(head, sort_keys=False)
        + "data:\n"
        + data
    )
