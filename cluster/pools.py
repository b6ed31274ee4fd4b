"""Prefill/decode/colocated worker pools on Ray: start, resize, health, stop.

API used by ``baton serve`` (and the tests)::

    pools = start_pools(PoolConfig(...), ray_init_kwargs={"num_cpus": 4})  # embedded Ray unless config.address
    client = pools.client()            # ClusterClient over the live workers (or ClusterClient.discover(config))
    pools.resize(num_prefill=2, num_decode=3)   # at run time; removed workers are drained by abort
    pools.health()                     # {worker_id: True/False}
    pools.stop()
    ensure_pools(PoolConfig(...))      # KubeRay: router replicas get-or-create detached workers

Workers are named Ray actors (``<kind>-<n>`` in ``config.ray_namespace``) so a router in another process (a Serve
replica) finds them with ``ClusterClient.discover``. Fractional ``num_gpus_per_worker`` (0.5) lets one GPU hold a
prefill and a decode worker. One transport serves the whole pool: ``choose_transport`` decides it from the device
and whether the Ray cluster has one node (cuda_ipc) or several (nccl); CPU pools use gloo unless told otherwise.
"""

from __future__ import annotations

import itertools
import logging
import time
from dataclasses import dataclass, field
from typing import Any

from baton.cluster.actors import WORKER_CLASSES, WorkerInfo
from baton.cluster.pool_config import PoolConfig
from baton.cluster.transfer import choose_transport

log = logging.getLogger(__name__)

START_TIMEOUT_S = 300.0


@dataclass
class WorkerEntry:
    info: WorkerInfo
    actor: Any  # ray.actor.ActorHandle


@dataclass
class Pools:
    config: PoolConfig
    transport: str
    workers: dict[str, WorkerEntry] = field(default_factory=dict)
    # Per-kind numbering: a 1+1 pool is prefill-0 + decode-0, the names ensure_pools expects.
    _counters: dict[str, itertools.count] = field(
        default_factory=lambda: {k: itertools.count() for k in WORKER_CLASSES}
    )

    def by_kind(self, kind: str) -> list[WorkerEntry]:
        return [w for w in self.workers.values() if w.info.kind == kind]

    def _spawn(self, kind: str, n: int) -> list[str]:
        import ray

        cfg = self.config
        pending = []
        for _ in range(n):
            wid = f"{kind}-{next(self._counters[kind])}"
            actor = _actor_options(kind, wid, cfg).remote(wid, cfg, self.transport)
            pending.append((wid, actor, actor.info.remote()))
        infos = ray.get([p[2] for p in pending], timeout=START_TIMEOUT_S)
        for (wid, actor, _), info in zip(pending, infos):
            self.workers[wid] = WorkerEntry(info, actor)
        return [p[0] for p in pending]

    def resize(
        self,
        num_prefill: int | None = None,
        num_decode: int | None = None,
        num_colocated: int | None = None,
    ) -> None:
        """Grow by starting workers, shrink by stopping the newest ones (their streams end with an error
        the client turns into a resume on another decode worker)."""
        for kind, want in (
            ("prefill", num_prefill),
            ("decode", num_decode),
            ("colocated", num_colocated),
        ):
            if want is None:
                continue
            have = self.by_kind(kind)
            if want > len(have):
                self._spawn(kind, want - len(have))
            for entry in have[want:][::-1] if want < len(have) else []:
                self.remove(entry.info.worker_id)

    def remove(self, worker_id: str) -> None:
        import ray

        entry = self.workers.pop(worker_id, None)
        if entry is None:
            return
        try:
            ray.get(entry.actor.shutdown.remote(), timeout=10)
        except Exception:  # noqa: BLE001 - already dead is fine
            pass
        ray.kill(entry.actor, no_restart=True)

    def health(self, timeout_s: float = 5.0) -> dict[str, bool]:
        import ray

        refs = {wid: w.actor.info.remote() for wid, w in self.workers.items()}
        out: dict[str, bool] = {}
        for wid, ref in refs.items():
            try:
                ray.get(ref, timeout=timeout_s)
                out[wid] = True
            except Exception:  # noqa: BLE001
                out[wid] = False
        return out

    def client(self):
        from baton.cluster.client import ClusterClient

        return ClusterClient(self.config, {w: (e.info, e.actor) for w, e in self.workers.items()})

    def stop(self) -> None:
        for wid in list(self.workers):
            self.remove(wid)


def _actor_options(kind: str, worker_id: str, cfg: PoolConfig, **extra: Any) -> Any:
    import ray

    res = cfg.resources_for(kind)
    return ray.remote(WORKER_CLASSES[kind]).options(  # type: ignore[attr-defined]
        name=worker_id,
        namespace=cfg.ray_namespace,
        num_cpus=res.num_cpus,
        num_gpus=res.num_gpus,
        resources=dict(res.resources),
        max_concurrency=1000,
        **{"max_restarts": 0, **extra},
    )


def _transport(config: PoolConfig) -> str:
    import ray

    alive_nodes = [n for n in ray.nodes() if n.get("Alive")]
    return choose_transport(
        config.transport, device_type=config.device_type, same_node=len(alive_nodes) <= 1
    )


def config_tag(config: PoolConfig, model_version: str = "") -> str:
    """Stable across processes (dataclass repr, SHA-256): which config a worker was made for.
    ``model_version`` adds what the path does not say (weights replaced in place)."""
    import dataclasses
    import hashlib

    plain = dataclasses.replace(config, address=None)
    return hashlib.sha256(f"{plain!r}|{model_version}".encode()).hexdigest()[:16]


def ensure_pools(
    config: PoolConfig, *, model_version: str = "", timeout_s: float = START_TIMEOUT_S
) -> dict[str, WorkerInfo]:
    """Get or create the configured workers as named, detached actors ``<kind>-<i>`` (KubeRay:
    nobody runs ``baton serve``, so the router replicas do this). ``get_if_exists`` makes it
    race-free: replicas that start together end up with one pool, not one each. A worker made for
    another config (a rolled model or engine setting) is replaced, so a new router never talks to
    an old model. Blocks until every worker answers ``info`` (model loaded): call it off the event
    loop. Ray must be initialized."""
    import ray

    tag = config_tag(config, model_version)
    transport = _transport(config)
    names = [
        f"{kind}-{i}"
        for kind, n in (
            ("prefill", config.num_prefill),
            ("decode", config.num_decode),
            ("colocated", config.num_colocated),
        )
        for i in range(n)
    ]

    def get(wid: str) -> Any:
        kind = wid.rsplit("-", 1)[0]
        return _actor_options(kind, wid, config, lifetime="detached", get_if_exists=True).remote(
            wid, config, transport, tag
        )

    deadline = time.monotonic() + timeout_s
    out: dict[str, WorkerInfo] = {}
    todo = names
    while todo:
        actors = {wid: get(wid) for wid in todo}
        left = max(1.0, deadline - time.monotonic())
        refs = {wid: a.info.remote() for wid, a in actors.items()}
        todo = []
        for wid, ref in refs.items():
            try:
                info = ray.get(ref, timeout=left)
            except ray.exceptions.RayActorError:  # replaced by a racing replica: get it again
                todo.append(wid)
                continue
            if info.config_tag and info.config_tag != tag:  # "": baton serve's own pool
                log.info("replacing %s: made for config %s, want %s", wid, info.config_tag, tag)
                ray.kill(actors[wid], no_restart=True)
                todo.append(wid)
                continue
            out[wid] = info
        if todo and time.monotonic() > deadline:
            raise TimeoutError(f"workers {todo} not ready in {timeout_s} s")
        if todo:
            time.sleep(0.5)  # let the killed names free up
    log.info("pools ensured: %s (transport %s, config %s)", names, transport, tag)
    return out


def start_pools(config: PoolConfig, *, ray_init_kwargs: dict[str, Any] | None = None) -> Pools:
    """Start Ray if needed (``config.address`` or an embedded local cluster) and the configured workers."""
    import ray

    if not ray.is_initialized():
        ray.init(address=config.address, namespace=config.ray_namespace, **(ray_init_kwargs or {}))
    pools = Pools(config, _transport(config))
    for kind, n in (
        ("prefill", config.num_prefill),
        ("decode", config.num_decode),
        ("colocated", config.num_colocated),
    ):
        if n:
            pools._spawn(kind, n)
    log.info("pools up: %s (transport %s)", sorted(pools.workers), pools.transport)
    return pools
