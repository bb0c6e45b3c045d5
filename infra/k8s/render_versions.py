"""Write the seed versions' manifests from the deployer's own object builders (k8s_objects.py), and the
ConfigMap holding the userassign plugin's source (control_plane/traffic/plugin_manifest.py).

    .venv/bin/python infra/k8s/render_versions.py

tests/unit/test_k8s_manifests.py fails while a committed file differs from what this writes (so the
plugin Traefik mounts is the repository's: run this after changing control_plane/traffic/userassign).
"""

from __future__ import annotations

from pathlib import Path

from control_plane.deployer.k8s_objects import BentoShape, manifest_text
from control_plane.traffic.plugin_manifest import plugin_config_map_text

HERE = Path(__file__).resolve().parent
PLUGIN_CONFIG_MAP_FILE = HERE / "traefik" / "userassign-plugin.yaml"
FILES = {
    HERE / "base" / "versions.yaml": (BentoShape(), False),
    HERE / "overlays" / "hpa" / "autoscalers.yaml": (BentoShape(autoscaler="hpa"), True),
    HERE / "overlays" / "keda" / "autoscalers.yaml": (BentoShape(autoscaler="keda"), True),
}


def main() -> None:
    for path, (shape, autoscalers) in FILES.items():
        path.write_text(manifest_text(shape, autoscalers=autoscalers))
        print(f"wrote {path.relative_to(HERE.parent.parent)}")
    PLUGIN_CONFIG_MAP_FILE.write_text(plugin_config_map_text())
    print(f"wrote {PLUGIN_CONFIG_MAP_FILE.relative_to(HERE.parent.parent)}")


if __name__ == "__main__":
    main()
