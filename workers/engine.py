"""``EngineCore``: the incremental engine that every Baton role drives (offline LLM, prefill, decode).

``add_request`` / ``step`` / ``abort_request``, plus the KV hand-over pair for disaggregation: a prefill-only
request stops after its first token and holds its blocks (``export_kv`` then ``release_request``); the decode side
inserts it with ``add_prefilled_request`` (KV copied into fresh blocks) or, when the KV is missing or does not
fit, recomputes the prefill itself. One step: ``schedule() -> SchedulerOutput`` -> ``runner.execute`` ->
``sample`` -> ``scheduler.update`` -> stop checks and detokenization -> ``RequestOutput`` deltas.

Optional, by config: swap preemption (``workers/swap.py``), speculative decoding with verification in the
same forward pass (``workers/spec_decode.py``; a step may then emit several tokens per request), and
sink-window KV eviction (``CacheConfig.kv_eviction``). Eviction keeps ORIGINAL positions: every attention
layer gets ``sliding_window=eviction_window`` and ``num_sink_tokens`` (combined with a model's own window),
so a sequence is exactly what the model computes under a StreamingLLM mask; the evicted blocks are simply
never read. Re-rotating keys to cache positions would let positions stay small, but it breaks the prefix
cache (a block's keys would depend on how much was evicted) and needs a RoPE pass over the cache each step.
Consequence: the total length stays bounded by ``max_model_len``; the KV memory is what eviction bounds.
A request may opt out with ``SamplingParams(extra={"kv_eviction": "none"})``: it must then fit in the
window (where the mask is exact) or it gets the context error with the window as its limit.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
from baton.kernels.attention import LayerAttentionParams, get_backend
from baton.kernels.checksum import copy_with_wsum32x2, verified_copier
from baton.workers.block_hash import CacheIdentity
from baton.workers.block_pool import BlockPool
from baton.workers.cache_events import CacheEvent
from baton.workers.config import EngineConfig
from baton.workers.detokenizer import IncrementalDetokenizer
from baton.workers.kv_handle import ALGO_WSUM32, kv_checksum, wsum32_expected
from baton.workers.model_runner import ModelRunner, block_bytes, kv_cache_dtype_for
from baton.workers.outputs import CompletionOutput, RequestOutput
from baton.workers.request import Request, RequestStatus
from baton.workers.sampler import SamplingRow, mask_greedy_rows, sample, verify
from baton.workers.sampling_params import SamplingParams
from baton.workers.scheduler import (
    EvictionPolicy,
    ScheduledChunk,
    Scheduler,
    SchedulerOutput,
    SchedulerStats,
)
from baton.workers.spec_decode import DraftQuery, SpecDecoder
from baton.workers.swap import HostBlockAllocator, SwapSpace, SwapStats

log = logging.getLogger(__name__)


class ContextLengthError(ValueError):
    """Prompt plus requested output does not fit the context window (no silent truncation)."""

    def __init__(self, prompt_tokens: int, max_tokens: int, max_model_len: int) -> None:
        self.prompt_tokens = prompt_tokens
        self.max_tokens = max_tokens
        self.max_model_len = max_model_len
        super().__init__(
            f"prompt has {prompt_tokens} tokens and max_tokens is {max_tokens}: "
            f"{prompt_tokens + max_tokens} > max_model_len {max_model_len} "
            f"(the prompt may be at most {max_model_len - max_tokens} tokens)"
        )


@dataclass(frozen=True)
class EngineStats:
    scheduler: SchedulerStats
    num_blocks: int
    block_size: int
    prefix_queries: int
    prefix_hits: int
    prompt_tokens_computed: int
    kv_bytes_received: int
    # swap preemption
    num_swap_preemptions: int = 0
    swap_host_blocks: int = 0
    swap_host_blocks_free: int = 0
    swapped_out_blocks: int = 0
    swapped_in_blocks: int = 0
    swap_out_bytes: int = 0
    swap_in_bytes: int = 0
    swap_out_seconds: float = 0.0
    swap_in_seconds: float = 0.0
    # sink-window eviction
    evicted_blocks: int = 0
    # speculative decoding
    spec_draft_tokens: int = 0
    spec_accepted_tokens: int = 0
    spec_verify_steps: int = 0
    spec_active: bool = False


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


class EngineCore:
    def __init__(self, config: EngineConfig, *, worker_id: str = "engine") -> None:
        from baton.workers import identity
        from baton.workers.model_loader import load_model
        from transformers import AutoTokenizer

        self.config = config
        self.worker_id = worker_id
        self.device = resolve_device(config.device)
        model_path = config.model
        if model_path is None:
            from baton.workers.default_model import default_model_path

            model_path = str(default_model_path())
        self.model_path = model_path
        if not Path(model_path).exists():
            raise FileNotFoundError(f"model directory {model_path} does not exist")
        backend_name = config.attention_backend
        if backend_name == "auto":
            backend_name = "triton" if self.device.type == "cuda" else "torch"
        self.model, self.hf_config = load_model(
            model_path,
            dtype=config.dtype,
            device=self.device,
            attn_backend=get_backend(backend_name),
            load_format=config.load_format,
        )
        self.spec = self.model.spec
        self.tokenizer = (
            None
            if config.skip_tokenizer_init
            else AutoTokenizer.from_pretrained(config.tokenizer or model_path)
        )
        self.max_model_len = min(
            config.max_model_len or self.spec.max_position_embeddings,
            self.spec.max_position_embeddings,
        )
        if config.max_model_len and config.max_model_len > self.spec.max_position_embeddings:
            raise ValueError(
                f"max_model_len={config.max_model_len} exceeds the model's "
                f"max_position_embeddings={self.spec.max_position_embeddings}"
            )
        model_dtype = next(self.model.parameters()).dtype
        self.kv_dtype = kv_cache_dtype_for(config.cache.kv_cache_dtype, model_dtype)
        bs = config.cache.block_size
        num_blocks = self._num_blocks(block_bytes(self.spec, bs, self.kv_dtype))
        self.runner = ModelRunner(
            self.model,
            self.device,
            num_blocks,
            bs,
            self.kv_dtype,
            cuda_graphs=not config.enforce_eager and backend_name == "triton",
            # a verification step runs 1 + k decode rows per sequence: graphs cover those rows too
            max_num_seqs=config.scheduler.max_num_seqs
            * (1 + (config.speculative.k if config.speculative is not None else 0)),
            max_model_len=self.max_model_len,
        )
        self.pool = BlockPool(num_blocks, bs, config.cache.enable_prefix_caching)
        self.tokenizer_hash = (
            "no-tokenizer" if self.tokenizer is None else identity.tokenizer_hash(self.tokenizer)
        )
        self.model_fingerprint = identity.model_fingerprint(
            model_path, dummy_seed=config.seed if config.load_format == "dummy" else None
        )
        salt = config.cache.cache_salt
        if config.cache.kv_eviction != "none":  # KV computed under a window mask differs
            c = config.cache
            salt += f"|kv_eviction={c.kv_eviction}:{c.num_sink_tokens}:{c.eviction_window}"
        self.identity = CacheIdentity(
            config.cache.namespace,
            self.tokenizer_hash,
            self.model_fingerprint,
            str(self.kv_dtype).removeprefix("torch."),
            salt,
        )
        self.eviction = self._setup_eviction()
        self.swap: SwapSpace | None = None
        host_pool = None
        if config.cache.swap_space_bytes > 0:
            host_blocks = config.cache.swap_space_bytes // block_bytes(self.spec, bs, self.kv_dtype)
            if host_blocks > 0:
                self.swap = SwapSpace(self.runner, host_blocks)
                host_pool = HostBlockAllocator(host_blocks)
        self.scheduler = Scheduler(
            config.scheduler,
            self.pool,
            self.identity,
            self.max_model_len,
            eviction=self.eviction,
            host_pool=host_pool,
        )
        self.spec_decoder = (
            SpecDecoder(config.speculative) if config.speculative is not None else None
        )
        tok_eos = getattr(self.tokenizer, "eos_token_id", None)
        self.eos_token_ids = frozenset(self.spec.eos_token_ids) | (
            {tok_eos} if tok_eos is not None else set()
        )
        self.generator = torch.Generator(device=self.device).manual_seed(config.seed)
        self._detok: dict[str, IncrementalDetokenizer] = {}
        self._pending: list[RequestOutput] = []
        self.prompt_tokens_computed = 0
        self.kv_bytes_received = 0
        if self.device.type == "cuda":
            try:
                self._warm_up()
            except Exception:  # noqa: BLE001 - a speed-up only: requests still compile on first use
                log.exception("start-up warm-up failed; kernels compile on the first requests")
        log.info(
            "engine %s: model=%s device=%s backend=%s blocks=%d x %d tokens kv_dtype=%s",
            worker_id,
            model_path,
            self.device,
            backend_name,
            num_blocks - 1,
            bs,
            self.kv_dtype,
        )

    def _setup_eviction(self) -> EvictionPolicy | None:
        """Mask every attention layer to sinks + window; check the bounded KV fits the pool."""
        cache = self.config.cache
        if cache.kv_eviction == "none":
            return None
        policy = EvictionPolicy(cache.num_sink_tokens, cache.eviction_window, cache.block_size)
        sched = self.config.scheduler
        chunk = sched.long_prefill_token_threshold or sched.max_num_batched_tokens
        if policy.max_blocks(chunk) > self.pool.num_usable:
            raise ValueError(
                f"invalid engine config cache.eviction_window={cache.eviction_window}: sinks + window "
                f"+ one chunk of {chunk} tokens need {policy.max_blocks(chunk)} blocks, the pool has "
                f"{self.pool.num_usable}"
            )
        for module in self.model.modules():
            params = getattr(module, "params", None)
            if isinstance(params, LayerAttentionParams):
                own = params.sliding_window
                window = cache.eviction_window if own is None else min(own, cache.eviction_window)
                module.params = dataclasses.replace(
                    params, sliding_window=window, num_sink_tokens=cache.num_sink_tokens
                )
        return policy

    # -- sizing -----------------------------------------------------------------------------------
    def _num_blocks(self, per_block: int) -> int:
        cache = self.config.cache
        if cache.num_kv_blocks is not None:
            return cache.num_kv_blocks + 1  # + the null block
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            free, total = torch.cuda.mem_get_info(self.device)
            used_by_others = total - free - torch.cuda.memory_allocated(self.device)
            # Activation peak: a forward of a full token budget needs roughly this much; keep a margin.
            act = self.config.scheduler.max_num_batched_tokens * self.spec.hidden_size * 4 * 24
            logits = self.config.scheduler.max_num_seqs * self.spec.vocab_size * 4 * 3
            budget = total * cache.gpu_memory_utilization - used_by_others
            budget -= torch.cuda.memory_allocated(self.device) + act + logits
            n = int(budget // per_block)
            if n < 2:
                raise ValueError(
                    f"gpu_memory_utilization={cache.gpu_memory_utilization} leaves no room for KV blocks "
                    f"(total {total / 2**30:.1f} GiB, weights {torch.cuda.memory_allocated() / 2**30:.1f} GiB)"
                )
            return n + 1
        return max(2, cache.cpu_kv_cache_bytes // per_block) + 1

    # -- requests ---------------------------------------------------------------------------------
    def validate(self, prompt_token_ids: Sequence[int], params: SamplingParams) -> None:
        n = len(prompt_token_ids)
        if n == 0:
            raise ValueError("prompt is empty: at least one token is needed")
        if n + params.max_tokens > self.max_model_len:
            raise ContextLengthError(n, params.max_tokens, self.max_model_len)
        mode = params.extra.get("kv_eviction") if params.extra else None
        if mode not in (None, "none", "sink_window"):
            raise ValueError(
                f"invalid sampling parameter kv_eviction={mode!r}: none or sink_window"
            )
        if mode == "sink_window" and self.eviction is None:
            raise ValueError(
                "kv_eviction=sink_window needs an engine started with "
                "CacheConfig(kv_eviction='sink_window') (the attention mask is engine-wide)"
            )
        capacity = self.pool.num_usable * self.pool.block_size
        if self.eviction is not None:
            if mode == "none" and n + params.max_tokens > self.eviction.window:
                # Beyond the window this engine's mask is no longer exact: refuse, never truncate.
                raise ContextLengthError(n, params.max_tokens, self.eviction.window)
            if mode != "none":
                capacity = self.max_model_len  # KV is bounded by eviction (checked at start-up)
        if n + params.max_tokens > capacity:
            raise ValueError(
                f"prompt ({n} tokens) + max_tokens ({params.max_tokens}) exceeds the KV cache capacity "
                f"of this worker ({capacity} tokens)"
            )
        vocab = self.spec.vocab_size
        if params.stop and self.tokenizer is None:
            raise ValueError(
                "stop strings need a tokenizer (the engine runs with skip_tokenizer_init)"
            )
        bad = next((t for t in prompt_token_ids if not 0 <= int(t) < vocab), None)
        if bad is not None:
            raise ValueError(f"prompt token id {bad} is outside the vocabulary [0, {vocab})")

    def add_request(
        self,
        request_id: str,
        prompt_token_ids: Sequence[int],
        params: SamplingParams,
        *,
        namespace: str | None = None,
        prefill_only: bool = False,
        arrival_time: float | None = None,
    ) -> None:
        self.validate(prompt_token_ids, params)
        req = self._new_request(request_id, prompt_token_ids, params, namespace, prefill_only)
        if arrival_time is not None:
            req.arrival_time = arrival_time
        self.scheduler.add(req)

    def _new_request(
        self,
        request_id: str,
        prompt_token_ids: Sequence[int],
        params: SamplingParams,
        namespace: str | None,
        prefill_only: bool,
    ) -> Request:
        gen = None
        if params.seed is not None:
            gen = torch.Generator(device=self.device).manual_seed(params.seed)
        req = Request(
            request_id,
            [int(t) for t in prompt_token_ids],
            params,
            namespace=namespace or self.config.cache.namespace,
            prefill_only=prefill_only,
            generator=gen,
        )
        req.exact_context = (
            self.eviction is not None and (params.extra or {}).get("kv_eviction") == "none"
        )
        if self.tokenizer is not None:
            self._detok[request_id] = IncrementalDetokenizer.start(
                self.tokenizer, req.prompt_token_ids, params
            )
        return req

    def add_prefilled_request(
        self,
        request_id: str,
        prompt_token_ids: Sequence[int],
        output_token_ids: Sequence[int],
        params: SamplingParams,
        kv: torch.Tensor | None,
        *,
        namespace: str | None = None,
        num_cached_tokens: int = 0,
    ) -> bool:
        """Insert a sequence whose prompt KV was computed elsewhere. ``kv``: ``[L, 2, n, bs, H, D]`` covering
        the prompt. Returns False when it had to fall back to recomputing the prefill here (no KV given, or no
        room for it now); the request runs to completion either way."""
        self.validate(prompt_token_ids, params)
        req = self._new_request(request_id, prompt_token_ids, params, namespace, False)
        req.num_cached_tokens = num_cached_tokens
        det = self._detok.get(request_id)
        for t in output_token_ids:
            req.output_token_ids.append(int(t))
            if det is not None:
                det.append(int(t))
        req.first_token_time = time.monotonic()
        n_prompt = len(req.prompt_token_ids)
        need = (n_prompt + self.pool.block_size - 1) // self.pool.block_size
        placed = False
        if kv is not None and kv.shape[2] == need and need <= self.pool.num_free:
            req.block_ids = self.pool.allocate(need)
            self.runner.scatter_blocks(kv, req.block_ids)
            self.kv_bytes_received += kv.numel() * kv.element_size()
            req.num_computed_tokens = n_prompt
            req.status = RequestStatus.RUNNING
            placed = True
        self.scheduler.add(req)
        if placed:
            self.scheduler.waiting.remove(req)
            self.scheduler.running.append(req)
        return placed

    def abort_request(self, request_id: str) -> bool:
        """Cancel a request anywhere in its life; its blocks are freed at once. True if it was live."""
        req = self.scheduler.requests.get(request_id)
        if req is None:
            return False
        if req.status is RequestStatus.PREFILLED:
            return self.scheduler.release_held(request_id)
        done = self.scheduler.finish(request_id, RequestStatus.FINISHED_ABORTED)
        if self.spec_decoder is not None:
            self.spec_decoder.forget(request_id)
        if done is not None:
            self._pending.append(self._output(done, finished=True))
            self._detok.pop(request_id, None)
        return done is not None

    # -- KV hand-over (prefill side) -------------------------------------------------------------
    def held_blocks(self, request_id: str) -> list[int]:
        req = self.scheduler.requests.get(request_id)
        if req is None or req.status is not RequestStatus.PREFILLED:
            raise KeyError(f"request {request_id!r} holds no prefilled KV")
        return list(req.block_ids)

    def export_kv(self, request_id: str, out: torch.Tensor | None = None) -> torch.Tensor:
        """The held prompt KV as one contiguous ``[L, 2, n, bs, H, D]`` buffer (on the engine's device),
        gathered into ``out`` when given."""
        return self.runner.gather_blocks(self.held_blocks(request_id), out=out)

    def release_request(self, request_id: str) -> bool:
        return self.scheduler.release_held(request_id)

    # -- the step ---------------------------------------------------------------------------------
    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished() or bool(self._pending)

    def step(self) -> list[RequestOutput]:
        outputs, self._pending = self._pending, []
        if self.spec_decoder is not None:
            self._draft()
        sched = self.scheduler.schedule()
        if self.swap is not None:  # outs first: they read blocks that swap-ins may overwrite
            for op in sched.swap_out:
                self.swap.swap_out(op)
            for op in sched.swap_in:
                self.swap.swap_in(op)
        if sched.empty:
            return outputs
        logits = self.runner.execute(sched)  # [sum over sampling chunks of 1 + num_draft, V]
        sampling = [c for c in sched.chunks if c.sample]
        for c in sched.chunks:
            req = self.scheduler.requests[c.request_id]
            if c.start < req.num_prompt_tokens:
                self.prompt_tokens_computed += (
                    min(c.start + c.num_tokens, req.num_prompt_tokens) - c.start
                )
        new_tokens = self._sample(logits, sampling)
        touched = self.scheduler.update(sched, new_tokens)
        for req in touched:
            out = self._after_tokens(req, len(new_tokens[req.request_id]))
            if out is not None:
                outputs.append(out)
        if self.spec_decoder is not None:
            for c in sampling:
                if c.num_draft:
                    self.spec_decoder.observe(
                        c.request_id, c.num_draft, len(new_tokens[c.request_id]) - 1
                    )
            for out in outputs:
                if out.finished:
                    self.spec_decoder.forget(out.request_id)
        return outputs

    @torch.inference_mode()
    def _warm_up(self) -> None:
        """Run one sequence's prefill in three chunks (8, 40 and 100 tokens: each of the extend
        kernel's tile configs, the later ones over cached blocks as a prefix hit or a next chunk
        is), the sampler and the KV transfer kernels (gather, checksum, a cuda_ipc sink's fused
        copy, scatter; their size arguments are not specialised, so one variant serves every
        request) once at start, so Triton compiles them now and not in the first request's time to
        first token (H100, Llama-3.2-1B shapes, empty Triton cache: the first request's TTFT was
        1.3 s, the next ones ~40 ms). Outside the scheduler: no request, no stats; the blocks go
        back to the pool."""
        bs = self.pool.block_size
        bounds = [b for b in (0, 8, 48, 148) if b < self.max_model_len]
        n = bounds[-1]
        if n < 1 or -(-n // bs) > self.pool.num_free:
            return
        vocab = self.spec.vocab_size
        ids = tuple(1 + i % max(1, vocab - 1) for i in range(n))
        blocks = self.pool.allocate(-(-n // bs))
        try:
            for start, end in zip(bounds, bounds[1:]):
                chunk = ScheduledChunk(
                    "warm-up", start, ids[start:end], tuple(blocks), sample=end == n
                )
                logits = self.runner.execute(SchedulerOutput((chunk,), (), end - start))
            logits.argmax(dim=-1).tolist()
            buf = self.runner.gather_blocks(blocks)
            kv_checksum(buf)
            self.runner.scatter_blocks(buf, blocks)
            if self.device.type == "cuda":  # a cuda_ipc sink's copy + checksum, both export kinds
                copy_with_wsum32x2(buf.reshape(-1).view(torch.uint8), torch.empty_like(buf))
                copy_with_wsum32x2(buf, torch.empty_like(buf))
                self._warm_verified_copy(buf.reshape(-1).view(torch.uint8))
                torch.cuda.synchronize(self.device)
        finally:
            self.pool.free(blocks)

    def _warm_verified_copy(self, raw: torch.Tensor) -> None:
        """Compile the device-verified copy (a cuda_ipc sink's receive) with and without a tail
        block, and check that its verdict works here: a wrong sum must say mismatch."""
        copier = verified_copier(self.device)
        for n in (raw.numel(), raw.numel() - 4):
            if n >= 4:
                src = raw[:n]
                want = wsum32_expected(kv_checksum(src, ALGO_WSUM32))
                assert want is not None
                dst = torch.empty_like(src)
                if not copier.copy(src, dst, n, want) or copier.copy(src, dst, n, (~want[0], 0)):
                    raise RuntimeError("the device-verified copy gave a wrong verdict")

    @torch.inference_mode()  # the runner's logits are inference tensors; penalties edit them in place
    def _sample(self, logits: torch.Tensor, chunks: list[Any]) -> dict[str, list[int]]:
        """Plain rows through ``sample`` in one batch; chunks with drafts through ``verify``."""
        reqs = [self.scheduler.requests[c.request_id] for c in chunks]
        offsets, off = [], 0
        for c in chunks:
            offsets.append(off)
            off += 1 + c.num_draft
        plain = [i for i, c in enumerate(chunks) if not c.num_draft]
        out: dict[str, list[int]] = {}
        if plain:
            rows_logits = logits if len(plain) == off else logits[[offsets[i] for i in plain]]
            tokens, logprobs = sample(
                rows_logits, [self._row(reqs[i]) for i in plain], self.generator
            )
            for i, t, lp in zip(plain, tokens, logprobs):
                out[reqs[i].request_id] = [t]
                if lp is not None:
                    reqs[i].logprobs.append(lp)
        drafted = [i for i, c in enumerate(chunks) if c.num_draft]
        rows_of = {
            i: [self._row(reqs[i], chunks[i].token_ids[-chunks[i].num_draft :][:j])
                for j in range(chunks[i].num_draft + 1)]
            for i in drafted
        }  # fmt: skip
        # Greedy verifications without logprobs share one argmax and one host sync per step
        # instead of one per drafting request.
        batched = [i for i in drafted if reqs[i].params.greedy and reqs[i].params.logprobs is None]
        targets: dict[int, list[int]] = {}
        if batched:
            sel: list[int] = []
            for i in batched:
                n = chunks[i].num_draft + 1
                mask_greedy_rows(logits[offsets[i] : offsets[i] + n], rows_of[i])
                sel.extend(range(offsets[i], offsets[i] + n))
            flat = logits[sel].argmax(dim=-1).tolist()
            at = 0
            for i in batched:
                n = chunks[i].num_draft + 1
                targets[i], at = flat[at : at + n], at + n
        for i in drafted:
            c, req = chunks[i], reqs[i]
            draft = list(c.token_ids[-c.num_draft :])
            block = logits[offsets[i] : offsets[i] + c.num_draft + 1]
            tokens, logprobs = verify(block, rows_of[i], draft, self.generator, targets.get(i))
            out[req.request_id] = tokens
            req.logprobs.extend(lp for lp in logprobs if lp is not None)
        return out

    def _draft(self) -> None:
        """Ask the proposer for drafts for every decoding request (the scheduler fits them in)."""
        assert self.spec_decoder is not None
        k_max = self.spec_decoder.config.k
        reqs, queries = [], []
        for req in self.scheduler.running:
            if (
                req.status is not RequestStatus.RUNNING
                or req.prefill_only
                or not req.output_token_ids
                or req.num_tokens - req.num_computed_tokens != 1
                or (req.params.seed is not None and not req.params.greedy)
            ):
                continue  # a seeded draw must not depend on engine-wide drafting state
            k = min(
                k_max,
                req.params.max_tokens - req.num_output_tokens - 1,
                self.max_model_len - req.num_tokens - 1,
            )
            if k > 0:
                reqs.append(req)
                queries.append(
                    DraftQuery(req.request_id, req.prompt_token_ids, req.output_token_ids, k)
                )
        for req, draft in zip(reqs, self.spec_decoder.propose(queries)):
            req.draft_token_ids = draft

    def _row(self, req: Request, draft: Sequence[int] = ()) -> SamplingRow:
        """Sampling state after the output so far plus ``draft`` (penalties, min_tokens)."""
        p = req.params
        output = req.output_token_ids if not draft else req.output_token_ids + list(draft)
        blocked: tuple[int, ...] = ()
        if len(output) < p.min_tokens:
            blocked = tuple(self.eos_token_ids | set(p.stop_token_ids))
        return SamplingRow(p, req.prompt_token_ids, output, req.generator, blocked)

    def _after_tokens(self, req: Request, n: int) -> RequestOutput | None:
        """Stop checks token by token over the ``n`` tokens this step appended; the ones after a
        stop are dropped (speculative steps can emit past a stop string, EOS or max_tokens)."""
        p = req.params
        new = req.output_token_ids[-n:]
        del req.output_token_ids[-n:]
        new_lps: list[Any] = []
        if p.logprobs is not None and len(req.logprobs) >= n:
            new_lps = req.logprobs[-n:]
            del req.logprobs[-n:]
        det = self._detok.get(req.request_id)
        for i, token in enumerate(new):
            req.output_token_ids.append(token)
            if new_lps:
                req.logprobs.append(new_lps[i])
            stop_str = det.append(token) if det is not None else None
            status: RequestStatus | None = None
            reason: str | int | None = None
            if stop_str is not None:
                status, reason = RequestStatus.FINISHED_STOPPED, stop_str
            elif token in p.stop_token_ids:
                status, reason = RequestStatus.FINISHED_STOPPED, token
            elif not p.ignore_eos and token in self.eos_token_ids:
                status = RequestStatus.FINISHED_STOPPED
            elif req.num_output_tokens >= p.max_tokens or req.num_tokens >= self.max_model_len:
                status = RequestStatus.FINISHED_LENGTH
            elif req.prefill_only:
                self.scheduler.finish(req.request_id, RequestStatus.PREFILLED)
                return self._output(req, finished=True, num_new=i + 1)
            if status is not None:
                self.scheduler.finish(req.request_id, status, reason)
                out = self._output(req, finished=True, num_new=i + 1)
                self._detok.pop(req.request_id, None)
                return out
        return self._output(req, finished=False, num_new=len(new))

    def _output(self, req: Request, finished: bool, num_new: int = 1) -> RequestOutput:
        det = self._detok.get(req.request_id)
        delta_text = ""
        if det is not None:
            # A prefill-only request "finishes" at its first token, but its text does not end
            # there: keep streaming semantics (stop-string hold-back, incomplete UTF-8 held), so
            # the first token's text the router streams is a prefix of what decode produces.
            ends_text = finished and req.status is not RequestStatus.PREFILLED
            delta_text = det.flush() if ends_text else det.take_delta(finished=False)
        text = det.text if det is not None else ""
        new_tokens = req.output_token_ids[-num_new:] if req.output_token_ids and num_new else []
        if finished and req.status is RequestStatus.FINISHED_ABORTED:
            new_tokens = []
        delta_lp = req.logprobs[-len(new_tokens) :] if (req.logprobs and new_tokens) else None
        comp = CompletionOutput(
            index=0,
            token_ids=req.output_token_ids,
            text=text,
            delta_token_ids=new_tokens,
            delta_text=delta_text,
            finish_reason=req.finish_reason,
            stop_reason=req.stop_reason,
            logprobs=req.logprobs if req.params.logprobs is not None else None,
            delta_logprobs=delta_lp if req.params.logprobs is not None else None,
        )
        metrics = {"arrival_time": req.arrival_time}
        if req.first_token_time is not None:
            metrics["first_token_time"] = req.first_token_time
        if req.first_scheduled_time is not None:
            metrics["first_scheduled_time"] = req.first_scheduled_time
        if req.finish_time is not None:
            metrics["finish_time"] = req.finish_time
        if req.num_draft_tokens:
            metrics["spec_draft_tokens"] = float(req.num_draft_tokens)
            metrics["spec_accepted_tokens"] = float(req.num_accepted_tokens)
        return RequestOutput(
            request_id=req.request_id,
            prompt_token_ids=req.prompt_token_ids,
            outputs=[comp],
            finished=finished,
            num_cached_tokens=req.num_cached_tokens,
            num_preemptions=req.num_preemptions,
            error=req.error,
            metrics=metrics,
            prefill_chunks=req.prefill_chunks,
            kv_evicted=req.num_evicted_blocks > 0,
            num_evicted_tokens=req.num_evicted_blocks * self.pool.block_size,
        )

    # -- introspection ----------------------------------------------------------------------------
    def stats(self) -> EngineStats:
        ps = self.pool.stats()
        hp, sd = self.scheduler.host_pool, self.spec_decoder
        sw = self.swap.stats if self.swap is not None else SwapStats()
        return EngineStats(
            scheduler=self.scheduler.stats(),
            num_blocks=ps.num_blocks,
            block_size=self.pool.block_size,
            prefix_queries=ps.prefix_queries,
            prefix_hits=ps.prefix_hits,
            prompt_tokens_computed=self.prompt_tokens_computed,
            kv_bytes_received=self.kv_bytes_received,
            num_swap_preemptions=self.scheduler.num_swap_preemptions,
            swap_host_blocks=hp.num_blocks if hp is not None else 0,
            swap_host_blocks_free=hp.num_free if hp is not None else 0,
            swapped_out_blocks=sw.blocks_out,
            swapped_in_blocks=sw.blocks_in,
            swap_out_bytes=sw.bytes_out,
            swap_in_bytes=sw.bytes_in,
            swap_out_seconds=sw.seconds_out,
            swap_in_seconds=sw.seconds_in,
            evicted_blocks=self.scheduler.num_evicted_blocks,
            spec_draft_tokens=sd.num_drafted if sd is not None else 0,
            spec_accepted_tokens=sd.num_accepted if sd is not None else 0,
            spec_verify_steps=sd.num_verify_steps if sd is not None else 0,
            spec_active=sd is not None and sd.active,
        )

    def check_integrity(self) -> None:
        self.scheduler.check_integrity()

    def drain_cache_events(self) -> list[CacheEvent]:
        return self.pool.drain_events()

    def reset_prefix_cache(self, namespace: str | None = None) -> int:
        return self.pool.reset_prefix_cache(namespace)

    def chat_prompt(self, messages: list[dict[str, Any]]) -> list[int]:
        """Token ids of a chat conversation through the tokenizer's chat template."""
        ids = self.tokenizer.apply_chat_template(
            messages, add_generation_prompt=True, tokenize=True
        )
        if isinstance(ids, dict) or hasattr(ids, "input_ids"):
            ids = ids["input_ids"]
        return list(ids)
