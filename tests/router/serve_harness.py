"""A real Ray Serve router on CPU for one test module: local Ray (2 CPUs), Serve on free ports, the
tiny model.

``serve_router(args)`` yields a ``Harness`` with the HTTP base URL and gRPC target; it waits for
``/health`` and tears Serve and Ray down afterwards. e2e tests import it with ``tests/router`` on
``sys.path``.
"""

from __future__ import annotations

import contextlib
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

MODEL_NAME = "tiny"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def router_args(model_dir: Path, **sections: dict[str, Any]) -> dict[str, Any]:
    """A small colocated config: fp32 CPU engine, few KV blocks, short context."""
    args: dict[str, Any] = {
        "model": {"path": str(model_dir), "name": MODEL_NAME},
        "engine": {
            "device": "cpu",
            "dtype": "float32",
            "num_kv_blocks": 64,
            "max_model_len": 256,
            "block_size": 16,
            "max_num_batched_tokens": 512,
        },
        "pools": {"mode": "colocated"},
        "server": {"grpc_port": 0},
    }
    for key, value in sections.items():
        args[key] = {**args.get(key, {}), **value}
    return args


@dataclass
class Harness:
    base_url: str
    grpc_target: str | None
    admin_key: str | None = None

    def client(self, key: str | None = None, timeout: float = 60.0) -> httpx.Client:
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        return httpx.Client(base_url=self.base_url, headers=headers, timeout=timeout)

    def admin_stats(self) -> dict[str, Any]:
        with self.client(self.admin_key) as c:
            r = c.get("/admin/stats")
            r.raise_for_status()
            return r.json()

    def wait_idle(self, timeout: float = 30.0) -> dict[str, Any]:
        """Wait until no sequence runs or waits anywhere; returns the final admin stats."""
        deadline = time.monotonic() + timeout
        while True:
            st = self.admin_stats()
            busy = (
                st["admitted"]
                or st["queued"]
                or any(w["num_running"] or w["num_waiting"] for w in st["workers"])
            )
            if not busy or time.monotonic() > deadline:
                return st
            time.sleep(0.1)

    def assert_no_leak(self) -> dict[str, Any]:
        st = self.wait_idle()
        assert st["integrity_error"] is None, st["integrity_error"]
        for w in st["workers"]:
            assert w["num_running"] == 0 and w["num_waiting"] == 0, w
            assert w["num_free_blocks"] == w["num_total_blocks"], w
        assert st["admitted"] == 0 and st["queued"] == 0, st
        return st


@contextlib.contextmanager
def serve_router(
    args: dict[str, Any], *, grpc: bool = False, admin_key: str | None = None
) -> Iterator[Harness]:
    import ray
    from baton.router.app import build_app
    from ray import serve

    http_port = free_port()
    grpc_port = free_port() if grpc else 0
    args = {**args, "server": {**args.get("server", {}), "grpc_port": grpc_port}}
    ray.init(
        num_cpus=2,
        include_dashboard=False,
        namespace="baton-test",
        log_to_driver=False,
        configure_logging=False,
    )
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": http_port})
        serve.run(build_app(args), name="baton", route_prefix="/")
        h = Harness(
            f"http://127.0.0.1:{http_port}", f"127.0.0.1:{grpc_port}" if grpc else None, admin_key
        )
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(h.base_url + "/health", timeout=5).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError("router did not become healthy in 60 s")
            time.sleep(0.2)
        yield h
    finally:
        with contextlib.suppress(Exception):
            serve.shutdown()
        ray.shutdown()
