"""``EngineCore``: the incremental engine that every Baton role drives (offline LLM, prefill, decode).

``add_request`` / ``step`` / ``abort_request``, plus the KV hand-over pair for disaggregation: a prefill-only
request stops after its first token and holds its blocks (``export_kv`` then ``release_request``); the decode side
inserts it with ``add_prefilled_request`` (KV copied into fresh blocks) or, when the KV is missing or does not
fit, recomputes the prefill itself. One step: ``schedule() -> SchedulerOutput`` -> ``runner.execute`` ->
``sample`` -> ``scheduler.update`` -> stop checks and detokenization -> ``RequestOutput`` deltas.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch

from baton.kernels.attention import get_backend
from baton.workers.block_hash import CacheIdentity
from baton.workers.block_pool import BlockPool
from baton.workers.cache_events import CacheEvent
from baton.workers.config import EngineConfig
from baton.workers.detokenizer import IncrementalDetokenizer
from baton.workers.model_runner import ModelRunner, block_bytes, kv_cache_dtype_for
from baton.workers.outputs import CompletionOutput, RequestOutput
from baton.workers.request import Request, RequestStatus
from baton.workers.sampler import SamplingRow, sample
from baton.workers.sampling_params import SamplingParams
from baton.workers.scheduler import Scheduler, SchedulerStats

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


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


class EngineCore:
    def __init__(self, config: EngineConfig, *, worker_id: str = "engine") -> None:
        from transformers import AutoTokenizer

        from baton.workers import identity
        from baton.workers.model_loader import load_model

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
        self.runner = ModelRunner(self.model, self.device, num_blocks, bs, self.kv_dtype)
        self.pool = BlockPool(num_blocks, bs, config.cache.enable_prefix_caching)
        self.tokenizer_hash = (
            "no-tokenizer" if self.tokenizer is None else identity.tokenizer_hash(self.tokenizer)
        )
        self.model_fingerprint = identity.model_fingerprint(
            model_path, dummy_seed=config.seed if config.load_format == "dummy" else None
        )
        self.identity = CacheIdentity(
            config.cache.namespace,
            self.tokenizer_hash,
            self.model_fingerprint,
            str(self.kv_dtype).removeprefix("torch."),
            config.cache.cache_salt,
        )
        self.scheduler = Scheduler(config.scheduler, self.pool, self.identity, self.max_model_len)
        tok_eos = getattr(self.tokenizer, "eos_token_id", None)
        self.eos_token_ids = frozenset(self.spec.eos_token_ids) | ({tok_eos} if tok_eos is not None else set())
        self.generator = torch.Generator(device=self.device).manual_seed(config.seed)
        self._detok: dict[str, IncrementalDetokenizer] = {}
        self._pending: list[RequestOutput] = []
        self.prompt_tokens_computed = 0
        self.kv_bytes_received = 0
        log.info(
            "engine %s: model=%s device=%s backend=%s blocks=%d x %d tokens kv_dtype=%s",
            worker_id, model_path, self.device, backend_name, num_blocks - 1, bs, self.kv_dtype,
        )

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
        capacity = self.pool.num_usable * self.pool.block_size
        if n + params.max_tokens > capacity:
            raise ValueError(
                f"prompt ({n} tokens) + max_tokens ({params.max_tokens}) exceeds the KV cache capacity "
                f"of this worker ({capacity} tokens)"
            )
        vocab = self.spec.vocab_size
        if params.stop and self.tokenizer is None:
            raise ValueError("stop strings need a tokenizer (the engine runs with skip_tokenizer_init)")
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

    def export_kv(self, request_id: str) -> torch.Tensor:
        """The held prompt KV as one contiguous ``[L, 2, n, bs, H, D]`` buffer (on the engine's device)."""
        return self.runner.gather_blocks(self.held_blocks(request_id))

    def release_request(self, request_id: str) -> bool:
        return self.scheduler.release_held(request_id)

    # -- the step ---------------------------------------------------------------------------------
    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished() or bool(self._pending)

    def step(self) -> list[RequestOutput]:
        outputs, self._pending = self._pending, []
        sched = self.scheduler.schedule()
        if sched.empty:
            return outputs
        logits = self.runner.execute(sched)
        sampling = [self.scheduler.requests[c.request_id] for c in sched.chunks if c.sample]
        for c in sched.chunks:
            req = self.scheduler.requests[c.request_id]
            if c.start < req.num_prompt_tokens:
                self.prompt_tokens_computed += min(c.start + c.num_tokens, req.num_prompt_tokens) - c.start
        rows = [self._row(r) for r in sampling]
        tokens, logprobs = sample(logits, rows, self.generator)
        for req, lp in zip(sampling, logprobs):
            if lp is not None:
                req.logprobs.append(lp)
        touched = self.scheduler.update(sched, {r.request_id: t for r, t in zip(sampling, tokens)})
        for req in touched:
            out = self._after_token(req)
            if out is not None:
                outputs.append(out)
        return outputs

    def _row(self, req: Request) -> SamplingRow:
        p = req.params
        blocked: tuple[int, ...] = ()
        if req.num_output_tokens < p.min_tokens:
            blocked = tuple(self.eos_token_ids | set(p.stop_token_ids))
        return SamplingRow(p, req.prompt_token_ids, req.output_token_ids, req.generator, blocked)

    def _after_token(self, req: Request) -> RequestOutput | None:
        p = req.params
        token = req.output_token_ids[-1]
        det = self._detok.get(req.request_id)
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
            return self._output(req, finished=True)
        if status is not None:
            self.scheduler.finish(req.request_id, status, reason)
            out = self._output(req, finished=True)
            self._detok.pop(req.request_id, None)
            return out
        return self._output(req, finished=False)

    def _output(self, req: Request, finished: bool) -> RequestOutput:
        det = self._detok.get(req.request_id)
        delta_text = ""
        if det is not None:
            delta_text = det.flush() if finished else det.take_delta(finished=False)
        text = det.text if det is not None else ""
        new_tokens = req.output_token_ids[-1:] if req.output_token_ids else []
        if finished and req.status is RequestStatus.FINISHED_ABORTED:
            new_tokens = []
        delta_lp = req.logprobs[-1:] if (req.logprobs and new_tokens) else None
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
        return RequestOutput(
            request_id=req.request_id,
            prompt_token_ids=req.prompt_token_ids,
            outputs=[comp],
            finished=finished,
            num_cached_tokens=req.num_cached_tokens,
            num_preemptions=req.num_preemptions,
            error=req.error,
            metrics=metrics,
        )

    # -- introspection ----------------------------------------------------------------------------
    def stats(self) -> EngineStats:
        ps = self.pool.stats()
        return EngineStats(
            scheduler=self.scheduler.stats(),
            num_blocks=ps.num_blocks,
            block_size=self.pool.block_size,
            prefix_queries=ps.prefix_queries,
            prefix_hits=ps.prefix_hits,
            prompt_tokens_computed=self.prompt_tokens_computed,
            kv_bytes_received=self.kv_bytes_received,
        )

    def check_integrity(self) -> None:
        self.scheduler.check_integrity()

    def drain_cache_events(self) -> list[CacheEvent]:
        return self.pool.drain_events()

    def reset_prefix_cache(self, namespace: str | None = None) -> int:
        return self.pool.reset_prefix_cache(namespace)

    def chat_prompt(self, messages: list[dict[str, Any]]) -> list[int]:
        """Token ids of a chat conversation through the tokenizer's chat template."""
        ids = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        if isinstance(ids, dict) or hasattr(ids, "input_ids"):
            ids = ids["input_ids"]
        return list(ids)
