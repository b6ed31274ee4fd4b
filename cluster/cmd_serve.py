"""``baton serve``: an embedded local Ray cluster (or ``--address``), the worker pools and the
router.

Flags override ``--config FILE`` (the ``ServeConfig`` YAML, the same schema KubeRay's serveConfigV2
args use). With no ``--model`` the bundled default model is served (no download).
"""

from __future__ import annotations

import argparse
import signal
import threading
from typing import Any


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="serve the OpenAI HTTP and gRPC APIs on Ray Serve")
    p.add_argument(
        "--model", default=None, help="HF model directory (default: bundled SmolLM2-135M)"
    )
    p.add_argument("--served-model-name", default=None)
    p.add_argument("--host", default=None, help="bind address (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=None, help="HTTP port (default 8000)")
    p.add_argument("--grpc-port", type=int, default=None, help="gRPC port (default 9000; 0: off)")
    p.add_argument("--api-keys", default=None, help="tenants YAML (none: single-tenant dev mode)")
    p.add_argument("--prefill-workers", type=int, default=None)
    p.add_argument("--decode-workers", type=int, default=None)
    p.add_argument(
        "--transport", default=None, choices=["auto", "cuda_ipc", "nccl", "gloo", "grpc"]
    )
    p.add_argument("--max-model-len", type=int, default=None)
    p.add_argument(
        "--mode",
        default=None,
        choices=["auto", "colocated", "disaggregated"],
        help="colocated: one engine inside the router (dev); default auto",
    )
    p.add_argument("--device", default=None, help="auto | cpu | cuda")
    p.add_argument("--config", default=None, help="ServeConfig YAML file")
    p.add_argument("--address", default=None, help="existing Ray cluster (default: embedded local)")
    p.set_defaults(func=run)


def config_from_args(args: argparse.Namespace) -> dict[str, Any]:
    """The ``ServeConfig`` dict: the file (if any) with the given flags laid over it, validated."""
    from baton.cluster.serve_config import ServeConfig, merge

    base: dict[str, Any] = {}
    if args.config:
        base = ServeConfig.from_file(args.config).model_dump(mode="json", exclude_unset=True)
    flags: dict[str, Any] = {}

    def put(section: str, key: str, value: Any) -> None:
        if value is not None:
            flags.setdefault(section, {})[key] = value

    put("model", "path", args.model)
    put("model", "name", args.served_model_name)
    put("server", "host", args.host)
    put("server", "port", args.port)
    put("server", "grpc_port", args.grpc_port)
    put("tenants", "api_keys_file", args.api_keys)
    put("engine", "max_model_len", args.max_model_len)
    put("engine", "device", args.device)
    put("pools", "transport", args.transport)
    put("pools", "mode", args.mode)
    if args.prefill_workers is not None:
        flags.setdefault("pools", {}).setdefault("prefill", {})["replicas"] = args.prefill_workers
    if args.decode_workers is not None:
        flags.setdefault("pools", {}).setdefault("decode", {})["replicas"] = args.decode_workers
    merged = merge(base, flags)
    return ServeConfig.model_validate(merged).model_dump(mode="json")


def run(args: argparse.Namespace) -> int:
    import ray
    from baton.cluster.serve_config import ServeConfig
    from baton.router.app import build_app, resolve_mode
    from ray import serve

    try:
        cfg = config_from_args(args)
    except Exception as exc:  # pydantic ValidationError names the field
        raise ValueError(str(exc)) from None
    conf = ServeConfig.model_validate(cfg)
    ray.init(address=args.address, namespace="baton", ignore_reinit_error=True, log_to_driver=True)
    pools = None
    if resolve_mode(conf) == "disaggregated":
        from baton.cluster.pools import start_pools
        from baton.cluster.prefix_directory import get_or_create_directory
        from baton.router.cluster_adapter import pool_config

        get_or_create_directory()  # before the workers, so their first heartbeat finds it
        pools = start_pools(pool_config(conf, args.address))
    serve.start(http_options={"host": conf.server.host, "port": conf.server.port})
    serve.run(build_app(cfg), name="baton", route_prefix="/")
    s = conf.server
    print(
        f"baton: serving {conf.model.served_name()} — HTTP http://{s.host}:{s.port}/v1 "
        f"(OpenAI), gRPC {s.host}:{s.grpc_port or 'off'}; Ctrl-C stops",
        flush=True,
    )
    stop = threading.Event()
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    stop.wait()
    serve.shutdown()
    if pools is not None:
        pools.stop()
    ray.shutdown()
    return 0
