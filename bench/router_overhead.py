"""Router-added latency per request, with the engine replaced by an instant ``EchoClient`` (CPU).

Three numbers, p50/p99 over ``--requests`` sequential chat completions (non-streaming, a short chat):
  in_process : the router's FastAPI app driven as raw ASGI (auth, parse, chat template, context check,
               admission, routing, response) — the router's own cost; the goal is p50 < 2 ms
  serve_http : the same app as a Ray Serve ingress behind Serve's HTTP proxy, over real HTTP
  serve_floor: a trivial Serve FastAPI deployment that reads and parses the body and answers JSON, over the
               same proxy (what Serve itself costs), so
               serve_http - serve_floor is again the router's share
Writes ``bench/results/router_overhead.json``.  Usage: ``python bench/router_overhead.py [--requests N]``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from fastapi import Request

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

BODY = {
    "model": "tiny",
    "max_tokens": 4,
    "temperature": 0,
    "messages": [
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": "What is the capital of France?"},
    ],
}


def pct(xs: list[float], q: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, int(q * len(s)))]


def summary(xs: list[float]) -> dict[str, float]:
    ms = [x * 1e3 for x in xs]
    return {
        "p50_ms": round(pct(ms, 0.5), 3),
        "p99_ms": round(pct(ms, 0.99), 3),
        "mean_ms": round(statistics.fmean(ms), 3),
        "n": len(ms),
    }


def config(model_dir: Path) -> Any:
    from baton.cluster.serve_config import ServeConfig

    return ServeConfig.model_validate(
        {
            "model": {"path": str(model_dir), "name": "tiny"},
            "engine": {"device": "cpu", "dtype": "float32"},
            "pools": {"mode": "colocated"},
            "server": {"grpc_port": 0},
        }
    )


async def build(cfg: Any) -> Any:
    from baton.router.app import build_core
    from baton.router.core import ModelInfo
    from baton.router.openai_api import create_app
    from echo_client import EchoClient

    core = await build_core(cfg, client=EchoClient(), model=ModelInfo.load(cfg))
    core.refresh_interval_s = 3600
    return create_app(core)


async def asgi_call(app: Any, body: bytes) -> tuple[int, bytes]:
    """One POST /v1/chat/completions through the ASGI interface, no HTTP stack."""
    sent = False
    out: list[bytes] = []
    status = 0

    async def receive() -> dict[str, Any]:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        await asyncio.sleep(3600)
        return {"type": "http.disconnect"}

    async def send(msg: dict[str, Any]) -> None:
        nonlocal status
        if msg["type"] == "http.response.start":
            status = msg["status"]
        elif msg["type"] == "http.response.body":
            out.append(msg.get("body", b""))

    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": "/v1/chat/completions",
        "raw_path": b"/v1/chat/completions",
        "query_string": b"",
        "root_path": "",
        "client": ("127.0.0.1", 1),
        "server": ("127.0.0.1", 8000),
        "headers": [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
        ],
    }
    await app(scope, receive, send)
    return status, b"".join(out)


def bench_in_process(model_dir: Path, n: int) -> dict[str, float]:
    async def run() -> list[float]:
        app = await build(config(model_dir))
        body = json.dumps(BODY).encode()
        for _ in range(50):
            await asgi_call(app, body)
        times = []
        for _ in range(n):
            t0 = time.perf_counter()
            status, _ = await asgi_call(app, body)
            times.append(time.perf_counter() - t0)
            assert status == 200
        return times

    return summary(asyncio.run(run()))


def bench_serve(model_dir: Path, n: int) -> dict[str, dict[str, float]]:
    import httpx
    import ray
    from fastapi import FastAPI
    from ray import serve

    cfg = config(model_dir)

    @serve.deployment(ray_actor_options={"num_cpus": 0}, max_ongoing_requests=1000)
    @serve.ingress()
    class EchoRouter:
        async def __init__(self, args: dict[str, Any], paths: list[str]) -> None:
            sys.path[:0] = paths  # echo_client lives in bench/, not in the package
            from baton.cluster.serve_config import ServeConfig

            self._echo_app = await build(ServeConfig.model_validate(args))

        def __serve_build_asgi_app__(self) -> Any:
            return self._echo_app

    floor_app = FastAPI()

    @floor_app.post("/v1/chat/completions")
    async def floor(request: Request) -> dict[str, Any]:
        body = json.loads(await request.body())  # read the body too: in Serve that is a proxy hop
        return {"id": "x", "object": "chat.completion", "model": body["model"], "choices": []}

    @serve.deployment(ray_actor_options={"num_cpus": 0}, max_ongoing_requests=1000)
    @serve.ingress(floor_app)
    class Floor:
        pass

    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(
            EchoRouter.bind(cfg.model_dump(mode="json"), sys.path[:2]),
            name="router",
            route_prefix="/r",
        )
        serve.run(Floor.bind(), name="floor", route_prefix="/f")
        out = {}
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30) as c:
            for name, prefix in (("serve_http", "/r"), ("serve_floor", "/f")):
                for _ in range(50):
                    c.post(prefix + "/v1/chat/completions", json=BODY)
                times = []
                for _ in range(n):
                    t0 = time.perf_counter()
                    r = c.post(prefix + "/v1/chat/completions", json=BODY)
                    times.append(time.perf_counter() - t0)
                    assert r.status_code == 200, r.text
                out[name] = summary(times)
        return out
    finally:
        serve.shutdown()
        ray.shutdown()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=1000)
    ap.add_argument("--skip-serve", action="store_true")
    args = ap.parse_args()
    from tiny_models import build_model_dir

    model_dir = build_model_dir(Path(tempfile.mkdtemp()) / "tiny", "llama")
    result: dict[str, Any] = {
        "bench": "router_overhead",
        "requests": args.requests,
        "in_process": bench_in_process(model_dir, args.requests),
    }
    if not args.skip_serve:
        result.update(bench_serve(model_dir, max(100, args.requests // 2)))
        result["router_share_p50_ms"] = round(
            result["serve_http"]["p50_ms"] - result["serve_floor"]["p50_ms"], 3
        )
    from common import RESULTS

    try:
        from common import environment  # type: ignore[attr-defined]

        result["environment"] = environment()
    except ImportError:
        import platform

        result["environment"] = {
            "python": platform.python_version(),
            "machine": platform.machine(),
            "cpus": __import__("os").cpu_count(),
        }
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / "router_overhead.json"
    path.write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
