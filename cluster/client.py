"""``ClusterClient``: what the router calls (from inside a Serve replica) to run a request on the pools.

``generate(req, hint)`` picks a decode worker (and a prefill worker when the uncached prompt is at least
``disagg_threshold_tokens``; shorter ones are prefilled on the decode worker: conditional disaggregation),
runs prefill -> KV handle -> decode pull -> stream, and yields ``GenerateDelta``s. The first token is yielded
as soon as the prefill worker returns it (with its text); the decode worker streams from the second on.
Failure semantics:

- prefill worker dead or timed out: the decode worker recomputes the prefill (once);
- transfer error, checksum mismatch, expired lease: handled inside the decode worker (recompute once);
- decode worker dead mid-stream: the request resumes on another decode worker from its prompt plus the tokens
  already streamed (greedy output identical; text already sent is not repeated); with no worker left the stream
  ends with one terminal ``error`` delta;
- the consumer stops iterating (client disconnect): the request is aborted where it runs.

All waits are bounded and nothing blocks the event loop (Ray refs are awaited, never ``ray.get``).
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from typing import Any, AsyncIterator

from baton.cluster.actors import PrefillOffer, SourceRef, WorkerInfo
from baton.cluster.pool_config import PoolConfig
from baton.workers.messages import GenerateDelta, GenerateRequest
from baton.workers.roles import WorkerStats

log = logging.getLogger(__name__)

PREFILL_KINDS = ("prefill", "colocated")
DECODE_KINDS = ("decode", "colocated")


@dataclass(frozen=True)
class RoutingHint:
    """The router's advice: preferred workers (prefix/load aware) and how much of the prompt is cached."""

    prefill_worker: str | None = None
    decode_worker: str | None = None
    num_cached_tokens: int = 0


def _dead(exc: BaseException) -> bool:
    from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError

    return isinstance(exc, (RayActorError, ActorDiedError, ActorUnavailableError))


def _error_delta(req: GenerateRequest, message: str) -> GenerateDelta:
    return GenerateDelta(
        req.request_id,
        (),
        "",
        finish_reason="error",
        error=message,
        num_prompt_tokens=len(req.prompt_token_ids),
    )


class ClusterClient:
    def __init__(self, config: PoolConfig, workers: dict[str, tuple[WorkerInfo, Any]]) -> None:
        self.config = config
        self._workers = dict(workers)
        self._inflight: dict[str, int] = {w: 0 for w in workers}
        self._where: dict[str, str] = {}  # request id -> decode worker id
        self.num_prefill_fallbacks = 0
        self.num_resumes = 0

    @classmethod
    async def discover(cls, config: PoolConfig, timeout_s: float = 10.0) -> ClusterClient:
        """Find the pool's named actors (from another process, e.g. a Serve replica)."""
        client = cls(config, {})
        await client.refresh(timeout_s)
        return client

    async def refresh(self, timeout_s: float = 10.0) -> None:
        """Re-read the worker set (after a resize or a failure)."""
        import ray

        ns = self.config.ray_namespace
        names = [
            a["name"]
            for a in ray.util.list_named_actors(all_namespaces=True)
            if a.get("namespace") == ns and a["name"].split("-")[0] in WORKER_KINDS
        ]
        found: dict[str, tuple[WorkerInfo, Any]] = {}
        for name in names:
            try:
                actor = ray.get_actor(name, namespace=ns)
                info = await asyncio.wait_for(actor.info.remote(), timeout_s)
            except Exception:  # noqa: BLE001 - gone between listing and lookup
                continue
            found[name] = (info, actor)
        self._workers = found
        self._inflight = {w: self._inflight.get(w, 0) for w in found}

    def workers(self) -> dict[str, WorkerInfo]:
        return {w: info for w, (info, _) in self._workers.items()}

    def _pick(self, kinds: tuple[str, ...], prefer: str | None, exclude: set[str]) -> str | None:
        ids = [
            w for w, (info, _) in self._workers.items() if info.kind in kinds and w not in exclude
        ]
        if prefer in ids:
            return prefer
        return min(ids, key=lambda w: (self._inflight.get(w, 0), w), default=None)

    def _drop(self, worker_id: str) -> None:
        self._workers.pop(worker_id, None)
        self._inflight.pop(worker_id, None)

    def _source(self, worker_id: str) -> SourceRef:
        info, actor = self._workers[worker_id]
        return SourceRef(worker_id, actor, info.endpoint)

    async def _prefill(self, req: GenerateRequest, pid: str) -> PrefillOffer | None:
        """The prefill worker's offer, or None when it died/timed out (the decode side recomputes)."""
        actor = self._workers[pid][1]
        self._inflight[pid] = self._inflight.get(pid, 0) + 1
        try:
            return await asyncio.wait_for(actor.prefill.remote(req), self.config.prefill_timeout_s)
        except ValueError:
            raise
        except Exception as exc:  # noqa: BLE001
            if _dead(exc):
                self._drop(pid)
            self.num_prefill_fallbacks += 1
            log.warning(
                "prefill of %s on %s failed (%s): decode recomputes",
                req.request_id,
                pid,
                type(exc).__name__,
            )
            return None
        finally:
            if pid in self._inflight:
                self._inflight[pid] -= 1

    async def generate(
        self, req: GenerateRequest, hint: RoutingHint | None = None
    ) -> AsyncIterator[GenerateDelta]:
        hint = hint or RoutingHint()
        rid = req.request_id
        dead: set[str] = set()
        did = self._pick(DECODE_KINDS, hint.decode_worker, dead)
        if did is None:
            yield _error_delta(req, "no decode worker is available")
            return
        uncached = len(req.prompt_token_ids) - hint.num_cached_tokens
        pid = None
        if uncached >= self.config.disagg_threshold_tokens:
            pid = self._pick(PREFILL_KINDS, hint.prefill_worker, {did})
        streamed: list[int] = []
        first_unsent: tuple[int, ...] = ()
        emitted_chars = 0
        skip_chars = 0
        finished = False
        held_by: str | None = None  # a prefill worker holding KV that no decode worker took yet
        try:
            start: dict[str, Any] = {"conditional": pid is None}
            if pid is not None:
                try:
                    offer = await self._prefill(req, pid)
                except ValueError as exc:
                    yield _error_delta(req, str(exc))
                    return
                if offer is not None and offer.result.final is not None:
                    finished = True
                    yield offer.result.final
                    return
                if offer is not None:
                    # Stream the first token now: TTFT does not wait for the KV transfer and the
                    # decode worker's first step. The decode worker skips it (``first_sent``) and
                    # its text (``skip_chars``); a resume elsewhere counts it as streamed.
                    res = offer.result
                    first = GenerateDelta(
                        request_id=rid,
                        token_ids=(res.first_token_id,),
                        text=res.first_text,
                        logprobs=(res.first_logprob,) if res.first_logprob is not None else None,
                        num_prompt_tokens=len(req.prompt_token_ids),
                        num_cached_tokens=res.num_cached_tokens,
                        worker_id=pid,
                    )
                    streamed.append(res.first_token_id)
                    emitted_chars = skip_chars = len(res.first_text)
                    start = {"offer": offer, "source": self._source(pid), "first_sent": True}
                    held_by = pid
                    yield first
                else:
                    start = {"conditional": False}
            while True:  # one iteration per decode worker tried
                self._where[rid] = did
                self._inflight[did] = self._inflight.get(did, 0) + 1
                actor = self._workers[did][1]
                try:
                    held_by = None  # the decode worker acks (or the lease frees) from here on
                    await asyncio.wait_for(
                        actor.start.remote(req, **start), self.config.prefill_timeout_s
                    )
                    last = time.monotonic()
                    while True:
                        deltas = await asyncio.wait_for(
                            actor.poll.remote(rid, self.config.poll_wait_s),
                            self.config.poll_wait_s + self.config.transfer_timeout_s,
                        )
                        if not deltas:
                            if time.monotonic() - last > self.config.stream_idle_timeout_s:
                                await self._abort_on(did, rid)
                                finished = True
                                yield _error_delta(req, f"decode worker {did} stalled")
                                return
                            continue
                        last = time.monotonic()
                        for d in deltas:
                            streamed.extend(d.token_ids)
                            first_unsent = ()
                            cut = min(skip_chars, len(d.text))
                            skip_chars -= cut
                            if cut:
                                d = GenerateDelta(**{**d.__dict__, "text": d.text[cut:]})
                            emitted_chars += len(d.text)
                            finished = d.finish_reason is not None
                            yield d
                            if finished:
                                return
                except ValueError as exc:
                    finished = True
                    yield _error_delta(req, str(exc))
                    return
                except Exception as exc:  # noqa: BLE001 - decide: resume elsewhere or one error
                    if not (_dead(exc) or isinstance(exc, (asyncio.TimeoutError, KeyError))):
                        raise
                    log.warning(
                        "decode worker %s lost %s (%s): resuming", did, rid, type(exc).__name__
                    )
                    dead.add(did)
                    if _dead(exc):
                        self._drop(did)
                    else:
                        await self._abort_on(did, rid)
                finally:
                    if did in self._inflight:
                        self._inflight[did] -= 1
                did = self._pick(DECODE_KINDS, None, dead)
                if did is None:
                    finished = True
                    yield _error_delta(req, "decode worker died and no other decode worker is left")
                    return
                self.num_resumes += 1
                tokens = tuple(streamed) + first_unsent
                skip_chars = emitted_chars
                start = (
                    {"resume_tokens": tokens, "unsent_from": len(streamed)}
                    if tokens
                    else {"conditional": False}
                )
        finally:
            self._where.pop(rid, None)
            if not finished and held_by is not None:
                await self._abort_on(held_by, rid)  # left after the first token: free the KV now
            elif not finished and did is not None and did not in dead:
                await self._abort_on(did, rid)  # the consumer went away

    async def _abort_on(self, worker_id: str, request_id: str) -> None:
        entry = self._workers.get(worker_id)
        if entry is None:
            return
        try:
            await asyncio.wait_for(entry[1].abort.remote(request_id), 10.0)
        except Exception:  # noqa: BLE001 - a dead worker has nothing left to free
            pass

    async def abort(self, request_id: str) -> bool:
        did = self._where.get(request_id)
        if did is None:
            return False
        await self._abort_on(did, request_id)
        return True

    async def health(self, timeout_s: float = 5.0) -> dict[str, bool]:
        async def ping(actor: Any) -> bool:
            try:
                await asyncio.wait_for(actor.info.remote(), timeout_s)
                return True
            except Exception:  # noqa: BLE001
                return False

        ids = list(self._workers)
        alive = await asyncio.gather(*(ping(self._workers[w][1]) for w in ids))
        return dict(zip(ids, alive))

    async def stats(self, timeout_s: float = 10.0) -> dict[str, WorkerStats | None]:
        """Per worker: KV usage, running/waiting, free/total blocks, transfer counters (None if unreachable)."""

        async def one(actor: Any) -> WorkerStats | None:
            try:
                return await asyncio.wait_for(actor.stats.remote(), timeout_s)
            except Exception:  # noqa: BLE001
                return None

        ids = list(self._workers)
        got = await asyncio.gather(*(one(self._workers[w][1]) for w in ids))
        return dict(zip(ids, got))

    async def reset_prefix_cache(
        self, namespace: str | None = None, timeout_s: float = 30.0
    ) -> dict[str, int | None]:
        """Drop cached blocks on every worker (one namespace, or all): blocks dropped per worker,
        None where the worker could not be reached."""

        async def one(actor: Any) -> int | None:
            try:
                return int(
                    await asyncio.wait_for(actor.reset_prefix_cache.remote(namespace), timeout_s)
                )
            except Exception:  # noqa: BLE001 - reported per worker
                return None

        ids = list(self._workers)
        got = await asyncio.gather(*(one(self._workers[w][1]) for w in ids))
        return dict(zip(ids, got))


WORKER_KINDS = ("prefill", "decode", "colocated")
