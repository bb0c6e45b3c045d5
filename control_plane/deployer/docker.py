"""Containers: one Bento image and one container per model version, on the compose network.

A new version's Bento is built here (from the MLflow registry, as the local deployer does), sent with
bento.Dockerfile to the Docker engine as `recsys-bento:v<N>`, and run as `<project>-bento-v<N>`, reachable
by Traefik at http://bento-v<N>:3000. Every Docker call goes through the Docker gate (docker_gate.py),
never the socket itself.
"""

from __future__ import annotations

import hashlib
import io
import logging
import re
import tarfile
import time
from pathlib import Path

from control_plane.credentials import ensure_request_id_key
from control_plane.deployer.docker_api import DockerApi, DockerApiError
from control_plane.deployer.docker_gate import BENTO_DOCKERFILE, BENTO_LABEL, SPILL_TARGET, spill_volume
from control_plane.deployer.local import build_version_bento, is_ready
from control_plane.errors import DeployFailed
from control_plane.settings import Settings
from control_plane.stack.prometheus_config import write_bento_targets

log = logging.getLogger(__name__)

BENTO_IMAGE_REPO = "recsys-bento"
BENTO_PORT = 3000
# The image is rebuilt when its key changes: another MLflow run behind the version, another Dockerfile or
# another app image name.
BUILD_KEY_LABEL = "recsys.build_key"
MAX_STARTS = 3  # a container restarted this often while starting will not come up


class DockerDeployer:
    """Builds `recsys-bento:v<N>` if needed, runs it with a restart policy, waits for /readyz."""

    def __init__(self, settings: Settings, api: DockerApi | None = None, ready_timeout_s: float = 180):
        self.settings = settings
        self.api = api or DockerApi(settings.docker_host)
        self.ready_timeout_s = ready_timeout_s
        self._name = re.compile(rf"^{re.escape(settings.docker_project)}-bento-v(\d+)$")

    @staticmethod
    def image(version: int) -> str:
        return f"{BENTO_IMAGE_REPO}:v{version}"

    def container(self, version: int) -> str:
        return f"{self.settings.docker_project}-bento-v{version}"

    @staticmethod
    def url(version: int) -> str:
        return f"http://bento-v{version}:{BENTO_PORT}"

    def build(self, version: int) -> str:
        """The version's Bento image, built unless one from the same MLflow run exists; its name."""
        tag = build_version_bento(self.settings, version)
        import bentoml

        bento = bentoml.bentos.get(tag)
        run_id = _mlflow_run_id(bento)
        key = hashlib.sha256(
            b"\0".join([BENTO_DOCKERFILE.read_bytes(), run_id.encode(), self.settings.app_image.encode()])
        ).hexdigest()[:16]
        image = self.image(version)
        labels = self.api.image_labels(image)
        if labels is not None and labels.get(BUILD_KEY_LABEL) == key:
            return image
        t0 = time.monotonic()
        models = {str(m.tag): Path(bentoml.models.get(m.tag).path) for m in bento.info.all_models}
        self.api.build(
            image,
            bento_context(Path(bento.path), models),
            buildargs={"APP_IMAGE": self.settings.app_image},
            labels={
                BUILD_KEY_LABEL: key,
                "recsys.mlflow_run_id": run_id,
                "recsys.model_version": str(version),
            },
        )
        log.info("built image", extra={"image": image, "seconds": round(time.monotonic() - t0, 1)})
        return image

    def spec(self, version: int) -> dict:
        """The container: read-only root, /tmp in memory, no privileges, restarted when it dies."""
        s = self.settings
        env = {
            "DATABASE_URL": s.database_url,
            "BENTOML_DO_NOT_TRACK": "true",
            "RECSYS_MAX_BODY_BYTES": str(s.max_body_bytes),
            # The Bento signs the request ids it issues; /feedback checks them with the same key.
            "RECSYS_REQUEST_ID_KEY": ensure_request_id_key(s),
            # Rows the database did not take, on the project's spill volume: a restarted container (the
            # same version) replays them.
            "RECSYS_SPILL_DIR": f"{SPILL_TARGET}/v{version}",
        }
        return {
            "Image": self.image(version),
            "Env": [f"{k}={v}" for k, v in env.items()],
            "Labels": {"recsys.model_version": str(version)},
            "ExposedPorts": {f"{BENTO_PORT}/tcp": {}},
            "StopTimeout": 10,
            "HostConfig": {
                "NetworkMode": s.effective_docker_network,
                "RestartPolicy": {"Name": "unless-stopped"},
                "ReadonlyRootfs": True,
                "Tmpfs": {"/tmp": "rw,nosuid,nodev,size=256m"},
                "Mounts": [
                    {"Type": "volume", "Source": spill_volume(s.docker_project), "Target": SPILL_TARGET}
                ],
                "CapDrop": ["ALL"],
                "SecurityOpt": ["no-new-privileges"],
                "Init": True,
            },
        }

    def _start(self, version: int) -> None:
        name = self.container(version)
        state = self.api.state(name)
        if state is not None and state.running:
            return
        if state is not None:
            self.api.remove(name)
        self.api.create(name, self.spec(version))
        self.api.start(name)
        self._publish_targets()

    def _publish_targets(self) -> None:
        try:
            write_bento_targets(self.settings, self.endpoints())
        except OSError as exc:  # Prometheus misses a target; deploys go on
            log.warning("could not write Prometheus's Bento targets: %s", exc)

    def deploy(self, version: int) -> str:
        self.build(version)
        self._start(version)
        return self._wait_ready(version)

    def _wait_ready(self, version: int) -> str:
        url, name = self.url(version), self.container(version)
        deadline = time.monotonic() + self.ready_timeout_s
        while not is_ready(url):
            state = self.api.state(name)
            crashed = state is None or state.restart_count >= MAX_STARTS or state.status in ("exited", "dead")
            if crashed or time.monotonic() > deadline:
                tail = self.api.logs_tail(name)
                self.undeploy(version)
                why = (
                    f"container {name} stopped ({state.status if state else 'gone'}, "
                    f"{state.restart_count if state else 0} restarts)"
                    if crashed
                    else f"did not answer {url}/readyz within {self.ready_timeout_s:.0f} s"
                )
                raise DeployFailed(f"version {version}: {why}" + (f"; its log ends:\n{tail}" if tail else ""))
            time.sleep(0.5)
        log.info("deployed", extra={"version": version, "url": url})
        return url

    def start_many(self, versions: list[int]) -> dict[int, str]:
        """Build every image, start every container (they load in parallel), then wait for all."""
        for v in versions:
            self.build(v)
        for v in versions:
            self._start(v)
        return {v: self._wait_ready(v) for v in versions}

    def undeploy(self, version: int) -> None:
        """Stop and remove the container, then its image (built again if the version comes back)."""
        name = self.container(version)
        self.api.stop(name, timeout_s=10)
        self.api.remove(name)
        self._publish_targets()
        image = self.image(version)
        try:
            kept = self.api.remove_image(image)
        except DockerApiError as exc:  # the version is retired all the same; its image stays
            log.warning("could not remove image", extra={"image": image, "reason": str(exc)})
            return
        if kept:  # gone already, or a container (another compose project's) still uses it
            log.info("kept image", extra={"image": image, "reason": kept})

    def endpoints(self) -> dict[int, str]:
        out = {}
        for name in self.api.containers(BENTO_LABEL):
            m = self._name.match(name)
            if m:
                out[int(m.group(1))] = self.url(int(m.group(1)))
        return out


def bento_context(bento_dir: Path, models: dict[str, Path] | None = None) -> bytes:
    """The build context: bento.Dockerfile as `Dockerfile`, the built Bento under `bento/`, and its models.

    A Bento in the store only names its models; served from a directory, BentoML looks for them in
    `bento/models/<name>/<version>` (as `bentoml export` lays them out), so they are copied there.
    """
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        data = BENTO_DOCKERFILE.read_bytes()
        info = tarfile.TarInfo("Dockerfile")
        info.size, info.mode = len(data), 0o644
        tar.addfile(info, io.BytesIO(data))
        tar.add(str(bento_dir), arcname="bento", filter=_readable)
        for tag, path in (models or {}).items():
            name, _, version = tag.partition(":")
            tar.add(str(path), arcname=f"bento/models/{name}/{version}", filter=_readable)
            latest = version.encode()
            info = tarfile.TarInfo(f"bento/models/{name}/latest")
            info.size, info.mode = len(latest), 0o644
            tar.addfile(info, io.BytesIO(latest))
    return buf.getvalue()


def _readable(info: tarfile.TarInfo) -> tarfile.TarInfo:
    """Owned by root, readable by all: the image's user (10001) reads it, nobody writes it."""
    info.uid = info.gid = 0
    info.uname = info.gname = "root"
    info.mode = (info.mode | 0o444 | (0o111 if info.isdir() or info.mode & 0o100 else 0)) & ~0o022
    return info


def _mlflow_run_id(bento) -> str:
    """The MLflow run of the model inside the Bento (stamped on the image; empty if unknown)."""
    import bentoml

    for model in bento.info.all_models:
        try:
            return str(bentoml.models.get(model.tag).info.metadata.get("mlflow_run_id", ""))
        except Exception:  # the model store lost it: the image is rebuilt, which is safe
            return ""
    return ""
