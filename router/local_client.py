"""``LocalEngineClient``: one in-process ``EngineCore`` driven by a background thread, behind
``EngineClient``.

This is the colocated single-process mode (``pools.mode: colocated``), the engine of the router
tests and the reference the overhead benchmark compares against. The engine is single-threaded, so
every touch of it happens on the engine thread: callers put commands on a thread-safe queue and get
results through futures; output deltas are handed to each request's asyncio queue with
``call_soon_threadsafe`` on the loop that asked.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, replace
from typing import Any, TypeVar

from baton.router.client_protocol import Route, WorkerLoad
from baton.workers.config import EngineConfig
from baton.workers.messages import GenerateDelta, GenerateRequest
from baton.workers.outputs import RequestOutput
from baton.workers.roles import EngineLoop, to_delta

log = logging.getLogger(__name__)
T = TypeVar("T")


@dataclass
class _Stream:
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue[GenerateDelta]
    num_prompt_tokens: int
    finished: bool = False


class LocalEngineClient:
    """``EngineClient`` over one ``EngineCore``; build it with a config or hand it an engine (tests)."""

    def __init__(
        self,
        config: EngineConfig | None = None,
        *,
        engine: Any | None = None,
        worker_id: str = "local-0",
        check_integrity_when_idle: bool = False,
    ) -> None:
        if engine is None:
            from baton.workers.engine import EngineCore

            if config is None:
                raise ValueError("LocalEngineClient needs an EngineConfig or an engine")
            engine = EngineCore(config, worker_id=worker_id)
        self.engine = engine
        self.worker_id = worker_id
        self._check_idle = check_integrity_when_idle
        self._integrity_error: str | None = None
        self._streams: dict[str, _Stream] = {}
        self._was_busy = False
        # The same engine thread the pool workers use (workers/roles.py): commands, steps, and a step
        # failure ending every live request once with an error.
        self.loop = EngineLoop(engine)
        self.loop.add_ticker(self._after_step)

    # -- engine thread ----------------------------------------------------------------------------
    def _after_step(self) -> None:
        """Integrity check each time the engine goes idle (tests turn it on)."""
        busy = self.engine.has_unfinished_requests()
        if self._check_idle and self._was_busy and not busy:
            self._check()
        self._was_busy = busy

    def _check(self) -> None:
        try:
            self.engine.check_integrity()
        except AssertionError as exc:
            self._integrity_error = str(exc) or "integrity check failed"
            log.error("engine %s: %s", self.worker_id, self._integrity_error)

    def _dispatch(self, out: RequestOutput) -> None:
        st = self._streams.get(out.request_id)
        if st is None:
            return
        delta = to_delta(out, self.worker_id)
        if out.finished and delta.finish_reason is None:  # ends exactly once, with a reason
            delta = replace(delta, finish_reason="error" if out.error else "stop")
        if out.finished:
            st.finished = True
            self._streams.pop(out.request_id, None)
        st.loop.call_soon_threadsafe(st.queue.put_nowait, delta)

    def call(self, fn: Callable[[Any], T]) -> concurrent.futures.Future[T]:
        """Run ``fn(engine)`` on the engine thread (the only safe place to touch it)."""
        return self.loop.call(fn)

    async def _acall(self, fn: Callable[[Any], T]) -> T:
        return await asyncio.wrap_future(self.call(fn))

    # -- EngineClient -----------------------------------------------------------------------------
    async def generate(
        self, request: GenerateRequest, route: Route | None = None
    ) -> AsyncIterator[GenerateDelta]:
        rid = request.request_id
        st = _Stream(asyncio.get_running_loop(), asyncio.Queue(), len(request.prompt_token_ids))

        def add(eng: Any) -> None:
            eng.add_request(
                rid, request.prompt_token_ids, request.params, namespace=request.namespace
            )
            self._streams[rid] = st
            self.loop.register(rid, self._dispatch)

        try:
            await self._acall(
                add
            )  # validation errors (context, vocab) surface here, before any delta
            while True:
                delta = await st.queue.get()
                yield delta
                if delta.finish_reason is not None:
                    return
        finally:
            if not st.finished:
                self.call(lambda eng: self._abort_now(rid))

    def _abort_now(self, rid: str) -> None:  # engine thread
        st = self._streams.pop(rid, None)
        if st is not None:
            st.finished = True
        self.engine.abort_request(rid)

    async def abort(self, request_id: str) -> None:
        """Abort by id (gRPC ``Abort``): the stream still ends exactly once, with ``abort``."""

        def run(eng: Any) -> None:
            st = self._streams.get(request_id)
            self._abort_now(request_id)
            if st is not None:
                st.loop.call_soon_threadsafe(
                    st.queue.put_nowait,
                    GenerateDelta(
                        request_id,
                        (),
                        "",
                        finish_reason="abort",
                        num_prompt_tokens=st.num_prompt_tokens,
                        worker_id=self.worker_id,
                    ),
                )

        self.call(run)

    async def health(self) -> bool:
        return self.loop.alive and self._integrity_error is None

    async def stats(self) -> list[WorkerLoad]:
        def snap(eng: Any) -> WorkerLoad:
            s = eng.stats()
            sch = s.scheduler
            return WorkerLoad(
                worker_id=self.worker_id,
                role="colocated",
                ready=True,
                num_running=sch.num_running,
                num_waiting=sch.num_waiting,
                kv_usage=sch.kv_usage,
                num_total_blocks=sch.num_total_blocks,
                num_free_blocks=sch.num_free_blocks,
                block_size=s.block_size,
                num_preemptions=sch.num_preemptions,
                prefix_queries=s.prefix_queries,
                prefix_hits=s.prefix_hits,
                integrity_error=self._integrity_error,
            )

        load = await self._acall(snap)
        return [load if self.loop.alive else WorkerLoad(self.worker_id, "colocated", False)]

    async def check_integrity(self) -> str | None:
        """Run the engine's block-accounting check now; the error text, or None when sound."""
        await self._acall(lambda eng: self._check())
        return self._integrity_error

    async def reset_prefix_cache(self, namespace: str | None = None) -> int:
        return int(await self._acall(lambda eng: eng.reset_prefix_cache(namespace)))

    async def close(self) -> None:
        await asyncio.get_running_loop().run_in_executor(None, self.loop.stop, 5.0)
