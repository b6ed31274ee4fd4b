"""``baton cache purge|stats`` (the global prefix directory) and ``baton info`` (a model's cache
identity).

``baton info`` prints what decides whether two deployments may share KV blocks: the tokenizer hash
and the model fingerprint (``workers/identity.py``), plus the architecture. ``baton cache purge``
drops a tenant's (or every) directory entry in a running cluster; workers keep their local blocks,
only routing forgets them.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any


def register(sub: argparse._SubParsersAction) -> None:
    cache = sub.add_parser("cache", help="inspect or purge the global prefix-cache directory")
    actions = cache.add_subparsers(dest="cache_command", metavar="ACTION")
    actions.required = True

    purge = actions.add_parser("purge", help="drop directory entries of one tenant or of all")
    who = purge.add_mutually_exclusive_group(required=True)
    who.add_argument("--tenant", help="tenant namespace to purge")
    who.add_argument("--all", action="store_true", help="purge every tenant")
    _cluster_args(purge)
    purge.set_defaults(func=run_purge)

    stats = actions.add_parser("stats", help="print the directory's entry counts and memory (JSON)")
    _cluster_args(stats)
    stats.set_defaults(func=run_stats)

    info = sub.add_parser(
        "info", help="print a model's tokenizer hash, fingerprint and architecture"
    )
    info.add_argument(
        "--model", default=None, help="HF model directory or GGUF file (default: bundled)"
    )
    info.add_argument("--revision", default=None, help="hub commit standing in for weight digests")
    info.add_argument("--dummy-seed", type=int, default=None, help="fingerprint as dummy weights")
    info.add_argument("--json", action="store_true", help="print JSON")
    info.set_defaults(func=run_info)


def _cluster_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--address", default="auto", help="Ray cluster address (default: auto)")
    p.add_argument(
        "--name", default=None, help="directory actor name (default from DirectoryConfig)"
    )
    p.add_argument("--ray-namespace", default=None, help="Ray namespace of the directory actor")


def _directory(args: argparse.Namespace) -> Any:
    import ray
    from baton.cluster.prefix_directory import DirectoryConfig, get_directory

    defaults = DirectoryConfig()
    config = DirectoryConfig(
        name=args.name or defaults.name, ray_namespace=args.ray_namespace or defaults.ray_namespace
    )
    if not ray.is_initialized():
        try:
            ray.init(
                address=args.address,
                namespace=config.ray_namespace,
                log_to_driver=False,
                logging_level="ERROR",
            )
        except ConnectionError as exc:
            raise ValueError(f"cannot reach a Ray cluster at {args.address!r}: {exc}") from exc
    return get_directory(config)


def run_purge(args: argparse.Namespace) -> int:
    import ray

    tenant = None if args.all else args.tenant
    removed = ray.get(_directory(args).purge.remote(namespace=tenant), timeout=60)
    print(f"purged {removed} entries ({'all tenants' if tenant is None else f'tenant {tenant!r}'})")
    return 0


def run_stats(args: argparse.Namespace) -> int:
    import ray

    print(
        json.dumps(ray.get(_directory(args).stats.remote(), timeout=60), indent=2, sort_keys=True)
    )
    return 0


def _architecture(path: Path) -> str:
    if path.is_file() and path.suffix == ".gguf":
        from gguf import GGUFReader

        field = GGUFReader(str(path)).fields.get("general.architecture")
        return bytes(field.parts[field.data[0]]).decode() if field is not None else "unknown"
    config = path / "config.json"
    if not config.is_file():
        return "unknown"
    doc = json.loads(config.read_text())
    archs = doc.get("architectures") or []
    return str(archs[0]) if archs else str(doc.get("model_type", "unknown"))


def _load_tokenizer(path: Path) -> Any:
    from transformers import AutoTokenizer

    if path.is_file():
        return AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    return AutoTokenizer.from_pretrained(str(path))


def model_info(
    model: str | Path | None, *, revision: str | None = None, dummy_seed: int | None = None
) -> dict[str, str]:
    """Identity of a model: the same dict ``baton info`` prints and ``/v1/models`` can embed."""
    from baton.workers.identity import model_fingerprint, tokenizer_hash

    if model is None:
        from baton.workers.default_model import default_model_path

        path = default_model_path()
    else:
        path = Path(model).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"model path {path} does not exist")
    return {
        "model": str(path),
        "architecture": _architecture(path),
        "tokenizer_hash": tokenizer_hash(_load_tokenizer(path)),
        "model_fingerprint": model_fingerprint(path, revision=revision, dummy_seed=dummy_seed),
    }


def run_info(args: argparse.Namespace) -> int:
    info = model_info(args.model, revision=args.revision, dummy_seed=args.dummy_seed)
    if args.json:
        print(json.dumps(info, indent=2))
    else:
        width = max(map(len, info))
        for key, value in info.items():
            print(f"{key:<{width}}  {value}")
    return 0
