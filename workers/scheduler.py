"""Continuous batching with chunked prefill: ``schedule() -> SchedulerOutput``, then ``update(...)``.

Each step has a token budget. Running sequences go first, decodes before prefill chunks, so a long prompt never
stalls running streams; waiting sequences fill what is left, admitted by ``AdmissionPolicy`` (KV occupancy plus
predicted output). When a running sequence needs a block and none is free, the lowest-priority/newest sequence
not yet scheduled this step is preempted (recompute: its blocks go back to the pool, its full blocks stay in the
prefix cache, so the recompute is mostly a cache hit; or swap: its live blocks are copied to a bounded host pool
and back, chosen for long sequences, see ``SchedulerConfig.preemption_mode``). A running request is never aborted
for lack of memory.

Speculative decoding: a decoding request carrying ``draft_token_ids`` gets a chunk of 1 + d tokens
(``num_draft = d``, never more than budget or free blocks allow; drafts never cause a preemption);
``update`` takes the accepted tokens and rolls back the rest (``num_computed_tokens`` and the block table).

Sink-window eviction (``EvictionPolicy``): before a chunk starting at position s is computed, blocks whose keys
are all older than the window of every query >= s (and are not sink blocks) are freed and their table entries
point at the null block 0, which the masked kernels never read::

    table:  [sink | 0 | 0 | 0 | w | w | w | new]     keys visible to q >= s: [0, sinks) + (s - window, q]
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass

from baton.workers.admission import AdmissionPolicy, OutputLengthPredictor, blocks_for
from baton.workers.block_hash import CacheIdentity, chain_hash, namespace_root
from baton.workers.block_pool import BlockPool
from baton.workers.config import SchedulerConfig
from baton.workers.request import Request, RequestStatus
from baton.workers.swap import HostBlockAllocator, SwapOp


@dataclass(frozen=True)
class ScheduledChunk:
    request_id: str
    start: int  # position of the first token computed in this step
    token_ids: tuple[int, ...]
    block_ids: tuple[int, ...]  # the request's block table after allocation
    sample: bool  # the chunk reaches the last known token: sample the next one
    num_draft: int = (
        0  # trailing drafted tokens in token_ids: logits at the last num_draft + 1 rows
    )

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)


@dataclass(frozen=True)
class SchedulerOutput:
    chunks: tuple[ScheduledChunk, ...]
    preempted: tuple[str, ...]
    num_batched_tokens: int
    swap_out: tuple[SwapOp, ...] = ()  # run before swap_in and the forward
    swap_in: tuple[SwapOp, ...] = ()

    @property
    def empty(self) -> bool:
        return not self.chunks


@dataclass(frozen=True)
class SchedulerStats:
    num_running: int
    num_waiting: int
    num_held: int  # prefill-only requests holding KV for transfer
    kv_usage: float
    num_free_blocks: int
    num_total_blocks: int
    committed_blocks: int  # projected need of running sequences (admission's view)
    num_preemptions: int


@dataclass(frozen=True)
class EvictionPolicy:
    """Keep ``num_sink_tokens`` + the last ``window`` tokens' blocks (StreamingLLM)."""

    num_sink_tokens: int
    window: int
    block_size: int

    @property
    def sink_blocks(self) -> int:
        return blocks_for(self.num_sink_tokens, self.block_size)

    def max_blocks(self, chunk_tokens: int) -> int:
        """Most blocks a sequence holds while computing a chunk of ``chunk_tokens``."""
        return self.sink_blocks + blocks_for(self.window + chunk_tokens - 1, self.block_size) + 1

    def first_live_block(self, first_query_pos: int) -> int:
        """Blocks below this index (and above the sinks) hold only keys no query >= pos sees."""
        return max(0, first_query_pos - self.window + 1) // self.block_size


class Scheduler:
    def __init__(
        self,
        config: SchedulerConfig,
        pool: BlockPool,
        identity: CacheIdentity,
        max_model_len: int,
        *,
        eviction: EvictionPolicy | None = None,
        host_pool: HostBlockAllocator | None = None,
    ) -> None:
        self.config = config
        self.pool = pool
        self.block_size = pool.block_size
        self.identity = identity
        self.max_model_len = max_model_len
        self.policy = AdmissionPolicy(pool.num_usable, pool.block_size, config.admission_headroom)
        self.predictor = OutputLengthPredictor(config.admission_quantile, config.predictor_window)
        self.requests: dict[str, Request] = {}
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.num_preemptions = 0
        self.num_swap_preemptions = 0
        self.num_evicted_blocks = 0
        self.eviction = eviction
        self.host_pool = host_pool
        self._swap_out: list[SwapOp] = []
        self._swap_in: list[SwapOp] = []

    # -- requests ---------------------------------------------------------------------------
    def add(self, req: Request) -> None:
        if req.request_id in self.requests:
            raise ValueError(f"request id {req.request_id!r} is already in use")
        self.requests[req.request_id] = req
        self.waiting.append(req)

    def root_for(self, namespace: str) -> bytes:
        return namespace_root(self.identity, namespace)

    def _extend_hashes(self, req: Request, upto_tokens: int) -> None:
        bs = self.block_size
        while (len(req.block_hashes) + 1) * bs <= upto_tokens:
            i = len(req.block_hashes)
            parent = req.block_hashes[-1] if req.block_hashes else self.root_for(req.namespace)
            req.block_hashes.append(chain_hash(parent, req.token_slice(i * bs, (i + 1) * bs)))

    def _predicted_remaining(self, req: Request) -> int:
        if req.prefill_only:
            return 1
        if not req.predicted_output_len:
            req.predicted_output_len = self.predictor.predict(req.namespace, req.params.max_tokens)
        cap = min(req.params.max_tokens, self.max_model_len - req.num_prompt_tokens)
        predicted = min(cap, max(req.predicted_output_len, req.num_output_tokens + 1))
        return predicted - req.num_output_tokens

    def _projected(self, req: Request, predicted: int) -> int:
        blocks = self.policy.projected_blocks(req.num_tokens, predicted)
        if self.eviction is not None and not req.exact_context:
            chunk = self.config.long_prefill_token_threshold or self.config.max_num_batched_tokens
            blocks = min(blocks, self.eviction.max_blocks(chunk))
        return blocks

    def committed_blocks(self) -> int:
        return sum(self._projected(r, self._predicted_remaining(r)) for r in self.running)

    # -- scheduling ---------------------------------------------------------------------------
    def schedule(self) -> SchedulerOutput:
        budget = self.config.max_num_batched_tokens
        chunks: list[ScheduledChunk] = []
        preempted: list[str] = []
        # Decodes first, then prefill chunks; each group oldest first.
        order = sorted(
            self.running,
            key=lambda r: (r.num_tokens - r.num_computed_tokens > 1, r.arrival_time),
        )
        for idx, req in enumerate(order):
            if req.status is not RequestStatus.RUNNING or budget <= 0:
                continue
            num_new = self._chunk_len(req, budget)
            while not self._reserve(req, num_new):
                victim = self._pick_victim(order[idx + 1 :])
                if victim is None:
                    self._preempt(req)
                    preempted.append(req.request_id)
                    break
                self._preempt(victim)
                preempted.append(victim.request_id)
            if req.status is not RequestStatus.RUNNING:
                continue
            draft = self._fit_draft(req, num_new, budget)
            chunks.append(self._chunk(req, num_new, draft))
            budget -= num_new + len(draft)
        if not preempted:
            budget = self._admit_waiting(budget, chunks)
        swap_out, swap_in = tuple(self._swap_out), tuple(self._swap_in)
        self._swap_out, self._swap_in = [], []
        return SchedulerOutput(
            tuple(chunks),
            tuple(preempted),
            self.config.max_num_batched_tokens - budget,
            swap_out,
            swap_in,
        )

    def _fit_draft(self, req: Request, num_new: int, budget: int) -> tuple[int, ...]:
        """As many of the request's drafts as budget, context and free blocks allow (no preemption)."""
        draft = req.draft_token_ids
        if not draft or num_new != 1 or req.num_tokens - req.num_computed_tokens != 1:
            return ()
        end = req.num_computed_tokens + 1
        room = (len(req.block_ids) + self.pool.num_free) * self.block_size - end
        d = min(len(draft), budget - 1, self.max_model_len - end, room)
        if d <= 0:
            return ()
        self._reserve(req, 1 + d)
        return tuple(draft[:d])

    def _chunk_len(self, req: Request, budget: int) -> int:
        num_new = req.num_tokens - req.num_computed_tokens
        if self.config.long_prefill_token_threshold:
            num_new = min(num_new, self.config.long_prefill_token_threshold)
        return min(num_new, budget)

    def _chunk(self, req: Request, num_new: int, draft: tuple[int, ...] = ()) -> ScheduledChunk:
        start = req.num_computed_tokens
        if req.first_scheduled_time is None:
            req.first_scheduled_time = time.monotonic()
        return ScheduledChunk(
            req.request_id,
            start,
            tuple(req.token_slice(start, start + num_new)) + draft,
            tuple(req.block_ids),
            sample=start + num_new == req.num_tokens,
            num_draft=len(draft),
        )

    def _evict(self, req: Request) -> None:
        """Free blocks no future query of this request can see (sink-window eviction)."""
        if self.eviction is None or req.exact_context:
            return
        first = max(req.evict_cursor, self.eviction.sink_blocks)
        stop = min(self.eviction.first_live_block(req.num_computed_tokens), len(req.block_ids))
        dead = [req.block_ids[i] for i in range(first, stop) if req.block_ids[i]]
        if dead:
            self.pool.free(dead)
            for i in range(first, stop):
                req.block_ids[i] = 0
            req.num_evicted_blocks += len(dead)
            self.num_evicted_blocks += len(dead)
        req.evict_cursor = max(req.evict_cursor, stop)

    def _reserve(self, req: Request, num_new: int) -> bool:
        self._evict(req)
        need = blocks_for(req.num_computed_tokens + num_new, self.block_size) - len(req.block_ids)
        if need <= 0:
            return True
        if need > self.pool.num_free:
            return False
        req.block_ids.extend(self.pool.allocate(need))
        return True

    def _pick_victim(self, candidates: list[Request]) -> Request | None:
        live = [r for r in candidates if r.status is RequestStatus.RUNNING]
        if not live:
            return None
        return max(live, key=lambda r: (r.params.priority, r.arrival_time))

    def _should_swap(self, req: Request, live: int) -> bool:
        mode = self.config.preemption_mode
        if self.host_pool is None or mode == "recompute" or live == 0:
            return False
        if self.host_pool.num_free < live:
            return False  # host pool full: recompute (never wait, never fail)
        return mode == "swap" or req.num_computed_tokens >= self.config.swap_min_tokens

    def _preempt(self, req: Request) -> None:
        slots = [i for i, b in enumerate(req.block_ids) if b]
        live = [req.block_ids[i] for i in slots]
        req.draft_token_ids = []
        if self._should_swap(req, len(live)):
            assert self.host_pool is not None
            host = self.host_pool.allocate(len(live))
            self._swap_out.append(SwapOp(req.request_id, tuple(live), tuple(host)))
            self.pool.free(live)
            req.swap_host_ids, req.swap_slots = host, slots
            req.block_ids = [0] * len(req.block_ids)  # layout kept; contents on the host
            self.num_swap_preemptions += 1
        else:
            self.pool.free(live)
            req.block_ids = []
            req.num_computed_tokens = 0
            req.num_published_blocks = 0
            req.evict_cursor = 0
        req.status = RequestStatus.PREEMPTED
        req.num_preemptions += 1
        self.num_preemptions += 1
        self.running.remove(req)
        self.waiting.appendleft(req)

    def _admit_waiting(self, budget: int, chunks: list[ScheduledChunk]) -> int:
        committed = self.committed_blocks()
        while self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs:
            req = self.waiting[0]
            predicted = self._predicted_remaining(req)
            if self.running and not self.policy.can_admit(committed, req.num_tokens, predicted):
                break
            swapped = req.swap_host_ids is not None
            hits = self._prefix_hits(req) if not req.block_ids and not swapped else []
            computed = req.num_computed_tokens + len(hits) * self.block_size
            num_new = req.num_tokens - computed
            if self.config.long_prefill_token_threshold:
                num_new = min(num_new, self.config.long_prefill_token_threshold)
            if num_new > budget:
                if not self.config.enable_chunked_prefill and chunks:
                    break
                num_new = budget if self.config.enable_chunked_prefill else num_new
            need = blocks_for(computed + num_new, self.block_size) - len(req.block_ids) - len(hits)
            fresh = sum(1 for b in hits if self.pool.blocks[b].ref_count == 0)
            if swapped:
                fresh = len(req.swap_host_ids or ())
            if need + fresh > self.pool.num_free:
                break
            self.waiting.popleft()
            if swapped:
                self._swap_back(req)
            if hits:
                self.pool.acquire_cached(hits)
                req.block_ids = list(hits)
                req.num_computed_tokens = computed
                req.num_published_blocks = len(hits)
            if req.status is RequestStatus.WAITING:
                req.num_cached_tokens = len(hits) * self.block_size
            req.status = RequestStatus.RUNNING
            self.running.append(req)
            self._reserve(req, num_new)
            chunks.append(self._chunk(req, num_new))
            budget -= num_new
            committed += self._projected(req, predicted)
        return budget

    def _swap_back(self, req: Request) -> None:
        """Fresh device blocks for a swapped request; the engine copies the host blocks in."""
        assert self.host_pool is not None and req.swap_host_ids is not None
        host, slots = req.swap_host_ids, req.swap_slots or []
        device = self.pool.allocate(len(host))
        for i, b in zip(slots, device):
            req.block_ids[i] = b
        self._swap_in.append(SwapOp(req.request_id, tuple(device), tuple(host)))
        self.host_pool.free(host)  # the copy runs before any later swap-out can reuse them
        req.swap_host_ids, req.swap_slots = None, None
        req.num_published_blocks = 0  # new block ids: offer them to the prefix cache again

    def _prefix_hits(self, req: Request) -> list[int]:
        if not self.pool.enable_caching:
            return []
        # Leave at least one token to compute: its logits give the next token.
        max_blocks = (req.num_tokens - 1) // self.block_size
        self._extend_hashes(req, max_blocks * self.block_size)
        hits: list[int] = []
        for i in range(max_blocks):
            block_id = self.pool.lookup(
                req.block_hashes[i],
                req.token_slice(i * self.block_size, (i + 1) * self.block_size),
            )
            if block_id is None:
                break
            hits.append(block_id)
        if req.status is RequestStatus.WAITING:
            self.pool.record_query(req.num_prompt_tokens, len(hits) * self.block_size)
        return hits

    # -- after execution ------------------------------------------------------------------------
    def update(self, out: SchedulerOutput, sampled: dict[str, list[int]]) -> list[Request]:
        """Advance computed tokens, append sampled tokens, publish full blocks; returns touched requests.

        A chunk with drafts gets 1 + a tokens (a accepted drafts plus one); the rejected drafts' KV is
        rolled back: ``num_computed_tokens`` counts only accepted positions and blocks past what the
        sequence needs are freed (they were never published)."""
        touched = []
        for chunk in out.chunks:
            req = self.requests.get(chunk.request_id)
            if req is None or req.status is not RequestStatus.RUNNING:
                continue
            req.draft_token_ids = []
            if req.num_computed_tokens < len(req.prompt_token_ids):  # a prefill chunk (tracing)
                req.prefill_chunks.append((time.monotonic(), chunk.num_tokens))
            if not chunk.sample:
                req.num_computed_tokens += chunk.num_tokens
                self._publish_full_blocks(req)
                continue
            tokens = sampled[req.request_id]
            tokens = [tokens] if isinstance(tokens, int) else list(tokens)
            accepted = len(tokens) - 1
            if not 0 <= accepted <= chunk.num_draft:
                raise ValueError(
                    f"{req.request_id}: {len(tokens)} tokens for {chunk.num_draft} drafts"
                )
            req.num_computed_tokens += chunk.num_tokens - (chunk.num_draft - accepted)
            req.output_token_ids.extend(tokens)
            if chunk.num_draft:
                req.num_draft_tokens += chunk.num_draft
                req.num_accepted_tokens += accepted
                self._trim(req)
            self._publish_full_blocks(req)
            if req.first_token_time is None:
                req.first_token_time = time.monotonic()
            touched.append(req)
        return touched

    def _trim(self, req: Request) -> None:
        keep = blocks_for(req.num_tokens, self.block_size)
        extra = [b for b in req.block_ids[keep:] if b]
        if extra:
            self.pool.free(extra)
        del req.block_ids[keep:]

    def _publish_full_blocks(self, req: Request) -> None:
        if not self.pool.enable_caching:
            return
        full = req.num_computed_tokens // self.block_size
        self._extend_hashes(req, full * self.block_size)
        for i in range(req.num_published_blocks, full):
            if not req.block_ids[i]:
                continue  # evicted
            self.pool.cache_full_block(
                req.block_ids[i],
                req.block_hashes[i],
                req.token_slice(i * self.block_size, (i + 1) * self.block_size),
                req.namespace,
            )
        req.num_published_blocks = max(req.num_published_blocks, full)

    def finish(
        self,
        request_id: str,
        status: RequestStatus,
        stop_reason: str | int | None = None,
        error: str | None = None,
    ) -> Request | None:
        """End a request exactly once: free (or, for prefill-only, hold) its blocks."""
        req = self.requests.get(request_id)
        if req is None or req.status.finished:
            return None
        if req in self.running:
            self.running.remove(req)
        elif req in self.waiting:
            self.waiting.remove(req)
        req.stop_reason = stop_reason
        req.error = error
        req.finish_time = time.monotonic()
        if req.prefill_only and status is RequestStatus.PREFILLED:
            req.status = status
            return req
        req.draft_token_ids = []
        if req.swap_host_ids is not None and self.host_pool is not None:
            self.host_pool.free(req.swap_host_ids)
            req.swap_host_ids, req.swap_slots = None, None
        if req.block_ids:
            self.pool.free(req.live_block_ids)
            req.block_ids = []
        req.status = status
        if (
            status in (RequestStatus.FINISHED_STOPPED, RequestStatus.FINISHED_LENGTH)
            and not req.prefill_only
        ):
            self.predictor.observe(req.namespace, req.num_output_tokens)
        del self.requests[request_id]
        return req

    def release_held(self, request_id: str) -> bool:
        """Free a prefill-only request's blocks once decode acknowledged the transfer or its lease expired."""
        req = self.requests.get(request_id)
        if req is None or req.status is not RequestStatus.PREFILLED:
            return False
        self.pool.free(req.live_block_ids)
        req.block_ids = []
        req.status = RequestStatus.FINISHED_STOPPED
        del self.requests[request_id]
        return True

    def has_unfinished(self) -> bool:
        return bool(self.running or self.waiting)

    def stats(self) -> SchedulerStats:
        return SchedulerStats(
            num_running=len(self.running),
            num_waiting=len(self.waiting),
            num_held=sum(1 for r in self.requests.values() if r.status is RequestStatus.PREFILLED),
            kv_usage=self.pool.usage(),
            num_free_blocks=self.pool.num_free,
            num_total_blocks=self.pool.num_usable,
            committed_blocks=self.committed_blocks(),
            num_preemptions=self.num_preemptions,
        )

    def expected_refs(self) -> dict[int, int]:
        refs: dict[int, int] = {}
        for req in self.requests.values():
            for b in req.live_block_ids:
                refs[b] = refs.get(b, 0) + 1
        return refs

    def check_integrity(self) -> None:
        self.pool.check_integrity(self.expected_refs())
        if self.host_pool is not None:
            held = [h for r in self.requests.values() for h in (r.swap_host_ids or ())]
            self.host_pool.check_integrity(held)
