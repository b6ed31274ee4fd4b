"""Set-up shared by the serving comparisons: the run plan, model directory (dummy Llama shapes with
a synthetic full-vocab tokenizer, or the tiny test model), API keys of two tenants in one prefix
namespace, Serve/pool configs per configuration, and the real router app served by uvicorn on a
thread.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import socket
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from baton.bench.common import shape_config, write_config_dir
from baton.bench.workloads import LengthScale

KEYS = {"product-a": "sk-bench-a", "product-b": "sk-bench-b", "admin": "sk-bench-admin"}
MODEL_NAME = "bench"


@dataclass(frozen=True)
class Plan:
    """Sizes and durations of one run (full GPU run or --quick CPU smoke)."""

    device: str
    dtype: str
    max_model_len: int
    num_kv_blocks: int  # per engine: the same KV per worker in every configuration
    chunk_tokens: int
    scale: LengthScale
    rates: tuple[float, ...]
    window_s: float  # workload (a) arrival window per rate
    drain_s: float  # after the window, stragglers get this long before the client stops
    b_duration_s: float
    b_streams: int
    b_long_every_s: float
    burst_prompt: int
    burst_output: int
    burst_cap: int
    nocache_rate: float
    gpus: float  # per worker of a colocated config on one GPU (disagg: half each)
    cpus: float
    num_gpus: int = 1  # >1: every config gets this many whole GPUs (see pool_config)


def full_plan(rates: tuple[float, ...] | None) -> Plan:
    return Plan(
        "cuda",
        "bfloat16",
        10240,
        8192,
        2048,
        LengthScale(1.0, 0.4),
        rates or (4.0, 10.0),
        10.0,
        14.0,
        20.0,
        16,
        2.5,
        1536,
        64,
        1200,
        (rates or (4.0, 10.0))[-1],
        1.0,
        1.0,
    )


def quick_plan(rates: tuple[float, ...] | None) -> Plan:
    return Plan(
        "cpu",
        "float32",
        1024,
        256,
        64,
        LengthScale(0.08, 0.03),
        rates or (2.0, 4.0),
        2.5,
        20.0,
        6.0,
        3,
        1.5,
        1536,
        64,
        160,
        (rates or (2.0, 4.0))[-1],
        0.0,
        0.5,
    )


CONFIGS = {  # name -> (kind, chunked, prefix cache)
    "disagg": ("disagg", True, True),
    "chunked": ("colocated", True, True),
    "unchunked": ("colocated", False, True),
    "nocache": ("disagg", True, False),
}


def log(t0: float, msg: str) -> None:
    print(f"[{time.monotonic() - t0:6.1f}s] {msg}", flush=True)


# -- model, keys -----------------------------------------------------------------------------------
def synthetic_tokenizer(vocab_size: int) -> Any:
    """A word-level tokenizer with one word per id: every id decodes, no files to download."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, vocab_size)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##")
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<unk>",
    )
    fast.chat_template = "{% for m in messages %}{{ m['content'] }} {% endfor %}"
    return fast


def model_dir(plan: Plan, root: Path, shape: str) -> tuple[Path, str, int]:
    """(directory, load_format, vocab size)."""
    if plan.device == "cpu":
        sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
        from tiny_models import build_model_dir

        path = build_model_dir(root / "tiny", "llama", max_position_embeddings=plan.max_model_len)
        return path, "auto", int(json.loads((path / "config.json").read_text())["vocab_size"])
    path = write_config_dir(root / shape, shape, min_positions=plan.max_model_len)
    vocab = int(shape_config(shape).vocab_size)
    synthetic_tokenizer(vocab).save_pretrained(path)
    return path, "dummy", vocab


def keys_file(root: Path) -> Path | None:
    """Two products, two tenants, one shared prefix namespace (JSON is YAML)."""
    try:
        import yaml  # noqa: F401 - the router's keys-file loader needs it
    except ImportError:
        return None
    path = root / "keys.yaml"
    path.write_text(
        json.dumps(
            {
                "tenants": {
                    "product-a": {
                        "keys": [KEYS["product-a"]],
                        "prefix_namespace": "shared-products",
                    },
                    "product-b": {
                        "keys": [KEYS["product-b"]],
                        "prefix_namespace": "shared-products",
                    },
                },
                "admin_keys": [KEYS["admin"]],
            }
        )
    )
    return path


def serve_config(plan: Plan, path: Path, load_format: str, keys: Path | None, cache: bool) -> Any:
    from baton.cluster.serve_config import ServeConfig

    return ServeConfig.model_validate(
        {
            "model": {"path": str(path), "name": MODEL_NAME},
            "engine": {
                "device": plan.device,
                "dtype": plan.dtype,
                "max_model_len": plan.max_model_len,
                "num_kv_blocks": plan.num_kv_blocks,
                "load_format": load_format,
                "max_num_batched_tokens": plan.chunk_tokens,
                "enable_prefix_caching": cache,
            },
            "pools": {"mode": "disaggregated"},
            "tenants": {"api_keys_file": str(keys) if keys else None},
            "server": {"grpc_port": 0},
        }
    )


def pool_config(plan: Plan, cfg: Any, name: str) -> Any:
    from baton.cluster.pool_config import PoolConfig

    kind, chunked, _ = CONFIGS[name]
    engine = cfg.engine_config()
    sched = dataclasses.replace(
        engine.scheduler,
        enable_chunked_prefill=chunked,
        max_num_batched_tokens=plan.chunk_tokens if chunked else plan.max_model_len,
    )
    engine = dataclasses.replace(engine, scheduler=sched)
    common = {"engine": engine, "num_cpus_per_worker": plan.cpus, "ray_namespace": f"bench-{name}"}
    n = plan.num_gpus
    if n > 1 and plan.device == "cuda":
        # Equal hardware: disagg splits the GPUs into prefill and decode workers, colocated runs
        # one worker per GPU. Ray gives each worker only its own GPU, so cuda_ipc (which maps the
        # peer's memory) cannot reach across them: KV goes over NCCL pair groups. Colocated
        # workers never hand KV to each other (threshold above any prompt): each request is
        # prefilled and decoded by one worker, spread by the router's least-loaded pick.
        if kind == "disagg":
            return PoolConfig(
                num_prefill=n // 2, num_decode=n - n // 2, num_gpus_per_worker=1.0,
                transport="nccl", **common,
            )  # fmt: skip
        return PoolConfig(
            num_prefill=0, num_decode=0, num_colocated=n, num_gpus_per_worker=1.0,
            disagg_threshold_tokens=plan.max_model_len + 1, **common,
        )  # fmt: skip
    if kind == "disagg":
        return PoolConfig(num_prefill=1, num_decode=1, num_gpus_per_worker=plan.gpus / 2, **common)
    return PoolConfig(
        num_prefill=0, num_decode=0, num_colocated=1, num_gpus_per_worker=plan.gpus, **common
    )


# -- the router on a thread ------------------------------------------------------------------------
class InProcessRouter:
    """The real router app under uvicorn on its own thread and event loop, over the given pools."""

    def __init__(self, cfg: Any, pools: Any) -> None:
        self.cfg, self.pools = cfg, pools
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = int(s.getsockname()[1])
        self.url = f"http://127.0.0.1:{self.port}"
        self._ready = threading.Event()
        self._server: Any = None
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=lambda: asyncio.run(self._main()), daemon=True)

    async def _main(self) -> None:
        import uvicorn
        from baton.router.app import build_core
        from baton.router.cluster_adapter import ClusterEngineClient
        from baton.router.openai_api import create_app

        core = None
        try:
            core = await build_core(self.cfg, client=ClusterEngineClient(self.pools.client()))
            self._server = uvicorn.Server(
                uvicorn.Config(
                    create_app(core),
                    host="127.0.0.1",
                    port=self.port,
                    log_level="warning",
                    lifespan="off",
                    backlog=4096,
                    timeout_keep_alive=120,
                )
            )
            task = asyncio.create_task(self._server.serve())
            while not self._server.started and not task.done():
                await asyncio.sleep(0.05)
            self._ready.set()
            await task
        except BaseException as exc:  # noqa: BLE001 - reported by start()
            self.error = exc
        finally:
            self._ready.set()
            if core is not None:
                await core.close()

    def start(self, timeout_s: float = 120.0) -> None:
        self._thread.start()
        if not self._ready.wait(timeout_s):
            raise TimeoutError(f"router did not start in {timeout_s:g}s")
        if self.error is not None:
            raise RuntimeError(f"router failed to start: {self.error!r}") from self.error

    def stop(self) -> None:
        if self._server is not None:
            self._server.should_exit = True
        self._thread.join(30)


async def get_json(url: str, key: str | None) -> tuple[int, Any]:
    import aiohttp

    headers = {"Authorization": f"Bearer {key}"} if key else {}
    timeout = aiohttp.ClientTimeout(total=30)
    async with aiohttp.ClientSession() as s, s.get(url, headers=headers, timeout=timeout) as r:
        return r.status, (await r.json() if r.status == 200 else await r.text())


def wait_healthy(url: str, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            status, body = asyncio.run(get_json(url + "/health", None))
            if status == 200:
                return
        except Exception as exc:  # noqa: BLE001 - not up yet
            body = repr(exc)
        if time.monotonic() > deadline:
            raise TimeoutError(f"{url}/health not 200 after {timeout_s:g}s: {str(body)[:300]}")
        time.sleep(0.25)
