"""Router admission: pool-wide KV budget by predicted output length, a bounded per-tenant fair queue
with a deadline, and per-tenant concurrency and token-rate limits.

The arithmetic is the engine's own (``baton.workers.admission``: ``OutputLengthPredictor``,
``AdmissionPolicy``), applied to the decode pool's total blocks: a request is admitted when the
projected blocks of every admitted request (current tokens + predicted remaining, updated as deltas
arrive) plus its own fit the budget minus headroom. Otherwise it waits in its tenant's queue;
tenants are served round-robin so one tenant's burst cannot starve another. Past ``queue_timeout_s``
(or with the queue full) it gets 429 with ``Retry-After``. Outgrowing a prediction is the engine's
problem to absorb by preemption: nothing admitted is ever aborted here. A request whose ``n``
sequences could never run side by side within the whole budget is refused at once (400,
``check_fan_out``) instead of queueing into a 429.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass, field

from baton.cluster.serve_config import AdmissionSection, TenantLimits
from baton.router.errors import APIError, bad_request, rejected
from baton.workers.admission import AdmissionPolicy, OutputLengthPredictor


@dataclass(eq=False)
class Ticket:
    """One admitted (or waiting) sequence; ``generated`` grows with every delta."""

    request_id: str
    tenant: str
    key: str
    prompt_tokens: int
    max_tokens: int
    predicted: int
    enqueued_at: float
    generated: int = 0
    admitted_at: float | None = None
    future: asyncio.Future[None] | None = field(default=None, repr=False)

    def remaining(self) -> int:
        predicted = min(self.max_tokens, max(self.predicted, self.generated + 1))
        return predicted - self.generated

    @property
    def queue_time_s(self) -> float:
        return (self.admitted_at or self.enqueued_at) - self.enqueued_at


class _Bucket:
    """Token bucket: ``rate`` tokens per second up to ``capacity``."""

    def __init__(self, per_minute: int, now: float) -> None:
        self.capacity = float(per_minute)
        self.rate = per_minute / 60.0
        self.level = self.capacity
        self.stamp = now

    def take(self, amount: int, now: float) -> float:
        """Take ``amount`` (capped at capacity); 0.0 on success, else seconds until it would succeed."""
        self.level = min(self.capacity, self.level + (now - self.stamp) * self.rate)
        self.stamp = now
        need = min(float(amount), self.capacity)
        if self.level >= need:
            self.level -= need
            return 0.0
        return (need - self.level) / self.rate


class AdmissionController:
    def __init__(
        self,
        config: AdmissionSection,
        *,
        total_blocks: int,
        block_size: int,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.config = config
        self._clock = clock
        self.predictor = OutputLengthPredictor(config.quantile, config.window, config.min_samples)
        self.policy = AdmissionPolicy(max(1, total_blocks), block_size, config.headroom)
        # False until a pool reports its blocks (or kv_blocks_override): no fan-out verdicts before
        self.capacity_known = config.kv_blocks_override is not None
        self._admitted: dict[str, Ticket] = {}
        self._per_tenant: dict[str, int] = {}
        self._queues: OrderedDict[str, deque[Ticket]] = OrderedDict()
        self._queued = 0
        self._buckets: dict[str, _Bucket] = {}
        self._rr = itertools.count()
        self._ema_duration_s = 1.0
        self.rejections: dict[str, int] = {}

    # -- capacity ---------------------------------------------------------------------------------
    def set_capacity(self, total_blocks: int, block_size: int) -> None:
        if total_blocks <= 0:
            return
        self.capacity_known = True
        if (total_blocks, block_size) != (self.policy.total_blocks, self.policy.block_size):
            self.policy = AdmissionPolicy(total_blocks, block_size, self.config.headroom)
            self._pump()

    def committed_blocks(self) -> int:
        pb = self.policy.projected_blocks
        return sum(
            pb(t.prompt_tokens + t.generated, t.remaining()) for t in self._admitted.values()
        )

    @property
    def num_admitted(self) -> int:
        return len(self._admitted)

    @property
    def num_queued(self) -> int:
        return self._queued

    def limits(self, tenant: str) -> TenantLimits:
        return self.config.tenant_limits.get(tenant, self.config.default_limits)

    def check_fan_out(self, n: int, prompt_tokens: int, max_tokens: int) -> None:
        """400 when ``n`` sequences of one request, each at its worst case (prompt + max_tokens),
        exceed the whole KV budget together. The count is deterministic (no prediction, no current
        load), so the same request always gets the same answer, and the message says what fits."""
        if n <= 1 or not self.capacity_known:
            return
        each = self.policy.projected_blocks(prompt_tokens, max_tokens)
        need, budget = n * each, self.policy.budget_blocks
        if need <= budget:
            return
        raise bad_request(
            f"n={n} sequences of {prompt_tokens} prompt tokens and max_tokens={max_tokens} need "
            f"{need} KV blocks side by side ({each} each); the server's KV budget is {budget} "
            f"blocks, so at most n={budget // each} fit with this prompt and max_tokens. Lower n "
            "or max_tokens, or send the copies as separate requests.",
            "n",
            n=n,
            prompt_tokens=prompt_tokens,
            max_tokens=max_tokens,
            kv_blocks_needed=need,
            kv_budget_blocks=budget,
        )

    # -- acquire / release ------------------------------------------------------------------------
    async def acquire(
        self, request_id: str, tenant: str, key: str, prompt_tokens: int, max_tokens: int
    ) -> Ticket:
        now = self._clock()
        limits = self.limits(tenant)
        if limits.tokens_per_minute is not None:
            bucket = self._buckets.get(tenant)
            if bucket is None:
                bucket = self._buckets[tenant] = _Bucket(limits.tokens_per_minute, now)
            wait = bucket.take(prompt_tokens + max_tokens, now)
            if wait > 0:
                raise self._reject(
                    "rate_limited",
                    f"tenant {tenant!r} is over its token rate limit "
                    f"({limits.tokens_per_minute} tokens/minute)",
                    wait,
                )
        predicted = self.predictor.predict(key, max_tokens)
        t = Ticket(request_id, tenant, key, prompt_tokens, max_tokens, predicted, now)
        if self._queued == 0 and self._fits(t):
            self._admit(t)
            return t
        q = self._queues.get(tenant)
        if (
            self._queued >= self.config.max_queue_total
            or (q is not None and len(q) >= self.config.max_queue_per_tenant)
            or self.config.max_queue_per_tenant == 0
        ):
            raise self._reject(
                "queue_full",
                "the server is at capacity and the admission queue is full; retry later",
                self._retry_after(),
            )
        t.future = asyncio.get_running_loop().create_future()
        self._queues.setdefault(tenant, deque()).append(t)
        self._queued += 1
        self._pump()
        try:
            await asyncio.wait_for(asyncio.shield(t.future), self.config.queue_timeout_s)
        except TimeoutError:
            if t.admitted_at is None:
                self._dequeue(t)
                raise self._reject(
                    "queue_timeout",
                    "the request waited longer than "
                    f"{self.config.queue_timeout_s:g}s for capacity; retry later",
                    self._retry_after(),
                ) from None
        except asyncio.CancelledError:  # client gone while queued: leave no trace
            if t.admitted_at is None:
                self._dequeue(t)
            else:
                self.release(t, None)
            raise
        return t

    def progress(self, ticket: Ticket, new_tokens: int) -> None:
        ticket.generated += new_tokens

    def release(self, ticket: Ticket, finish_reason: str | None) -> None:
        if self._admitted.pop(ticket.request_id, None) is None:
            return
        n = self._per_tenant.get(ticket.tenant, 1) - 1
        if n > 0:
            self._per_tenant[ticket.tenant] = n
        else:
            self._per_tenant.pop(ticket.tenant, None)
        if finish_reason in ("stop", "length"):
            self.predictor.observe(ticket.key, ticket.generated)
            if ticket.admitted_at is not None:
                dur = self._clock() - ticket.admitted_at
                self._ema_duration_s = 0.9 * self._ema_duration_s + 0.1 * dur
        self._pump()

    # -- internals --------------------------------------------------------------------------------
    def _fits(self, t: Ticket) -> bool:
        limit = self.limits(t.tenant).max_concurrency
        if limit is not None and self._per_tenant.get(t.tenant, 0) >= limit:
            return False
        if not self._admitted:
            return True  # an empty pool always takes one request (the engine checks hard capacity)
        return self.policy.can_admit(self.committed_blocks(), t.prompt_tokens, t.remaining())

    def _admit(self, t: Ticket) -> None:
        t.admitted_at = self._clock()
        self._admitted[t.request_id] = t
        self._per_tenant[t.tenant] = self._per_tenant.get(t.tenant, 0) + 1
        if t.future is not None and not t.future.done():
            t.future.set_result(None)

    def _dequeue(self, t: Ticket) -> None:
        q = self._queues.get(t.tenant)
        if q is not None and t in q:
            q.remove(t)
            self._queued -= 1
            if not q:
                del self._queues[t.tenant]

    def _pump(self) -> None:
        """Admit queued heads round-robin across tenants until a full round admits nothing."""
        while self._queues:
            progressed = False
            tenants = list(self._queues)
            start = next(self._rr) % len(tenants)
            for tenant in tenants[start:] + tenants[:start]:
                q = self._queues.get(tenant)
                if not q:
                    continue
                head = q[0]
                if head.future is not None and head.future.done():  # cancelled while queued
                    self._dequeue(head)
                    progressed = True
                    continue
                if self._fits(head):
                    self._dequeue(head)
                    self._admit(head)
                    progressed = True
            if not progressed:
                return

    def _retry_after(self) -> float:
        running = max(1, len(self._admitted))
        return min(60.0, max(1.0, self._ema_duration_s * (self._queued + 1) / running))

    def _reject(self, reason: str, message: str, retry_after_s: float) -> APIError:
        self.rejections[reason] = self.rejections.get(reason, 0) + 1
        return rejected(reason, message, retry_after_s)


def route_key(namespace: str, route: str) -> str:
    """Predictor key: output lengths are learned per tenant namespace and route (chat vs completions)."""
    return f"{namespace}|{route}"


__all__ = ["AdmissionController", "APIError", "Ticket", "route_key"]
