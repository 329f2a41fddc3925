"""Validate jobs/k8s/*.yaml against KubeRay's CRD schemas (a developer check; CI has no CRDs and no network).

    python tools/check_k8s_manifests.py KUBERAY_CHECKOUT/ray-operator/config/crd/bases

Each manifest's `spec` is validated with jsonschema against the `openAPIV3Schema` of the CRD of its
kind (RayJob, RayCronJob, RayCluster, RayService) at version v1, and every field must be one the CRD
declares (the API server silently drops the others). Exit 1 and one line per error when a manifest does
not fit.
"""

from __future__ import annotations

import sys
from pathlib import Path

import jsonschema
import yaml

REPO = Path(__file__).resolve().parents[1]


def crd_schemas(crd_dir: Path) -> dict[str, dict]:
    out = {}
    for path in sorted(crd_dir.glob("ray.io_*.yaml")):
        crd = yaml.safe_load(path.read_text())
        for version in crd["spec"]["versions"]:
            if version["name"] == "v1":
                out[crd["spec"]["names"]["kind"]] = version["schema"]["openAPIV3Schema"]
    return out


def unknown_fields(doc, schema: dict, path: str = "") -> list[str]:
    """Fields the API server would silently prune (not in the schema's properties): typos, misplaced keys."""
    out = []
    if isinstance(doc, dict) and "properties" in schema and not schema.get("x-kubernetes-preserve-unknown-fields"):
        extra = schema.get("additionalProperties")
        for key, value in doc.items():
            if key in schema["properties"]:
                out += unknown_fields(value, schema["properties"][key], f"{path}/{key}")
            elif isinstance(extra, dict):
                out += unknown_fields(value, extra, f"{path}/{key}")
            elif not extra:
                out.append(f"{path}/{key}")
    elif isinstance(doc, list) and isinstance(schema.get("items"), dict):
        for i, item in enumerate(doc):
            out += unknown_fields(item, schema["items"], f"{path}/{i}")
    return out


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print(__doc__, file=sys.stderr)
        return 2
    schemas = crd_schemas(Path(argv[0]))
    failed = 0
    for manifest in sorted((REPO / "jobs" / "k8s").glob("*.yaml")):
        for doc in yaml.safe_load_all(manifest.read_text()):
            schema = schemas.get(doc["kind"])
            if schema is None:
                print(f"{manifest.name}: no CRD for kind {doc['kind']}")
                failed += 1
                continue
            errors = sorted(jsonschema.Draft7Validator(schema).iter_errors(doc), key=lambda e: list(e.path))
            for err in errors:
                print(f"{manifest.name}: {'/'.join(map(str, err.path))}: {err.message[:200]}")
            unknown = [f for f in unknown_fields(doc, schema) if not f.startswith(("/metadata/", "/apiVersion", "/kind"))]
            for field in unknown:
                print(f"{manifest.name}: {field}: not in the CRD (the API server would drop it)")
            errors += unknown
            failed += len(errors)
            if not errors:
                print(f"{manifest.name}: {doc['kind']} valid")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
