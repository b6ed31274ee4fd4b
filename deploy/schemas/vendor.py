"""Regenerate the vendored schemas in this folder (run by hand when bumping a version; CI never runs
it).

The schemas are trimmed copies of upstream files: only the parts Baton's manifests are validated
against, ``description`` texts dropped (they are ~80 % of the bytes and carry no constraint).
Nothing else changes: ``additionalProperties: false`` is added at check time by
``baton.cluster.deploy_check``, not here.

    python deploy/schemas/vendor.py \\
        --kuberay-git /path/to/kuberay/.git --kuberay-ref v1.7.0 \\
        --k8s-defs .../kubernetes_validate/kubernetes-json-schema/v1.33.0-local/_definitions.json \\
        --schemastore-git /path/to/schemastore/.git --schemastore-ref <commit>

Sources and pinned versions are recorded in README.md next to this file.
"""

from __future__ import annotations

import argparse
import json
import subprocess
from pathlib import Path
from typing import Any

import yaml

HERE = Path(__file__).resolve().parent
CRD_PATH = "ray-operator/config/crd/bases/ray.io_rayservices.yaml"
KUSTOMIZE_PATH = "src/schemas/json/kustomization.json"
# Kubernetes kinds the manifests use outside the RayService (plus ObjectMeta for every metadata
# block).
K8S_ROOTS = {
    "v1/Service": "io.k8s.api.core.v1.Service",
    "v1/Secret": "io.k8s.api.core.v1.Secret",
    "v1/ConfigMap": "io.k8s.api.core.v1.ConfigMap",
    "ObjectMeta": "io.k8s.apimachinery.pkg.apis.meta.v1.ObjectMeta",
}
K8S_REF_PREFIX = "#/$defs/"  # refs inside _definitions.json are local


def strip_descriptions(node: Any) -> Any:
    if isinstance(node, dict):
        out = {}
        for key, value in node.items():
            # `description` as a key of `properties` is a field name (e.g. a CRD's .description),
            # keep it.
            if key == "description" and isinstance(value, str):
                continue
            out[key] = strip_descriptions(value)
        return out
    if isinstance(node, list):
        return [strip_descriptions(v) for v in node]
    return node


def git_show(git_dir: str, ref: str, path: str) -> tuple[str, str]:
    commit = subprocess.check_output(
        ["git", "--git-dir", git_dir, "rev-parse", f"{ref}^{{commit}}"], text=True
    ).strip()
    text = subprocess.check_output(
        ["git", "--git-dir", git_dir, "show", f"{commit}:{path}"], text=True
    )
    return commit, text


def vendor_rayservice(git_dir: str, ref: str) -> dict[str, Any]:
    commit, text = git_show(git_dir, ref, CRD_PATH)
    crd = yaml.safe_load(text)
    (version,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    return {
        "$comment": f"ray-project/kuberay {ref} ({commit}) {CRD_PATH}: spec.versions[v1]"
        ".schema.openAPIV3Schema, descriptions removed. Apache-2.0.",
        "schema": strip_descriptions(version["schema"]["openAPIV3Schema"]),
    }


def _refs(node: Any, found: set[str]) -> None:
    if isinstance(node, dict):
        ref = node.get("$ref")
        if isinstance(ref, str) and ref.startswith(K8S_REF_PREFIX):
            found.add(ref[len(K8S_REF_PREFIX) :])
        for value in node.values():
            _refs(value, found)
    elif isinstance(node, list):
        for value in node:
            _refs(value, found)


def vendor_kubernetes(defs_file: str) -> dict[str, Any]:
    defs = json.loads(Path(defs_file).read_text())["$defs"]
    keep: set[str] = set()
    todo = list(K8S_ROOTS.values())
    while todo:
        name = todo.pop()
        if name in keep:
            continue
        keep.add(name)
        found: set[str] = set()
        _refs(defs[name], found)
        todo.extend(found - keep)
    return {
        "$comment": f"Kubernetes OpenAPI definitions as JSON Schema, from kubernetes-validate's "
        f"{Path(defs_file).parent.name}/_definitions.json (closure of the roots below), "
        "descriptions removed. Apache-2.0.",
        "roots": K8S_ROOTS,
        "$defs": {k: strip_descriptions(defs[k]) for k in sorted(keep)},
    }


def vendor_kustomization(git_dir: str, ref: str) -> dict[str, Any]:
    commit, text = git_show(git_dir, ref, KUSTOMIZE_PATH)
    schema = json.loads(text)
    schema["$comment"] = (
        f"SchemaStore/schemastore {commit} {KUSTOMIZE_PATH}, descriptions removed. Apache-2.0."
    )
    return strip_descriptions(schema)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--kuberay-git", required=True)
    ap.add_argument("--kuberay-ref", required=True)
    ap.add_argument("--k8s-defs", required=True)
    ap.add_argument("--schemastore-git", required=True)
    ap.add_argument("--schemastore-ref", required=True)
    a = ap.parse_args()
    outputs = {
        "rayservice-v1.json": vendor_rayservice(a.kuberay_git, a.kuberay_ref),
        "kubernetes-core-v1.json": vendor_kubernetes(a.k8s_defs),
        "kustomization.json": vendor_kustomization(a.schemastore_git, a.schemastore_ref),
    }
    for name, data in outputs.items():
        (HERE / name).write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")
        print(f"wrote {name}: {(HERE / name).stat().st_size} bytes")


if __name__ == "__main__":
    main()
