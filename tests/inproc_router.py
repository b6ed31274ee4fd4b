"""The real router (FastAPI under uvicorn + the grpcio aio server) in THIS process, without Ray.

Why: fuzzing and security checks send thousands of small requests; driving them through Ray Serve's
proxy on 2 CPU cores costs minutes, while the code under test (auth, parsing, context checks,
admission, the colocated engine) is the same ``RouterCore`` that the Serve ingress runs. Everything
lives on one background event loop thread, like inside a Serve replica.

    with inproc_router(args) as r:     # args: ServeConfig's shape (see serve_harness.router_args)
        r.base_url, r.grpc_target, r.core, r.run(coro)
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import httpx


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class InprocRouter:
    base_url: str
    grpc_target: str
    core: Any  # baton.router.core.RouterCore
    loop: asyncio.AbstractEventLoop
    app: Any  # the FastAPI app

    def run(self, coro: Any, timeout: float = 60.0) -> Any:
        """Run a coroutine on the router's loop (where the engine client lives) and wait for it."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def engine_stats(self) -> Any:
        return self.run(self.core.client.stats())[0]

    def assert_no_leak(self, timeout: float = 30.0) -> Any:
        """Wait for the engine to go idle; then every block is free, integrity sound, no ticket."""
        deadline = time.monotonic() + timeout
        while True:
            w = self.engine_stats()
            idle = not (w.num_running or w.num_waiting or self.core.admission.num_admitted)
            if idle or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        assert self.run(self.core.client.check_integrity()) is None
        assert w.num_running == 0 and w.num_waiting == 0, w
        assert w.num_free_blocks == w.num_total_blocks, w
        assert self.core.admission.num_admitted == 0 and self.core.admission.num_queued == 0
        assert self.run(self.core.client.health()), "the engine thread died"
        return w


@contextlib.contextmanager
def inproc_router(args: dict[str, Any], *, log_level: str = "warning") -> Iterator[InprocRouter]:
    import uvicorn
    from baton.cluster.serve_config import ServeConfig
    from baton.router.app import build_core
    from baton.router.grpc_server import start_grpc_server
    from baton.router.openai_api import create_app

    config = ServeConfig.model_validate(args)
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, name="inproc-router", daemon=True)
    thread.start()

    def on_loop(coro: Any, timeout: float = 120.0) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, loop).result(timeout)

    core = on_loop(build_core(config))
    app = create_app(core)
    port = _free_port()
    server = uvicorn.Server(
        uvicorn.Config(app, host="127.0.0.1", port=port, log_level=log_level, lifespan="off")
    )
    serving = asyncio.run_coroutine_threadsafe(server.serve(), loop)
    grpc_server, grpc_port = on_loop(start_grpc_server(core, "127.0.0.1", 0))
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while True:
        try:
            if httpx.get(base + "/health", timeout=2).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            raise TimeoutError("in-process router did not become healthy in 30 s")
        time.sleep(0.05)
    try:
        yield InprocRouter(base, f"127.0.0.1:{grpc_port}", core, loop, app)
    finally:
        server.should_exit = True
        with contextlib.suppress(Exception):
            serving.result(10)
        with contextlib.suppress(Exception):
            on_loop(grpc_server.stop(grace=0.5), 10)
        with contextlib.suppress(Exception):
            on_loop(core.close(), 10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(5)
