"""Offline API in the shape vLLM users know: ``LLM(model=...).generate(prompts, sampling_params)``."""

from __future__ import annotations

import itertools
from dataclasses import replace
from typing import Sequence

from baton.workers.config import CacheConfig, EngineConfig, SchedulerConfig
from baton.workers.engine import EngineCore
from baton.workers.outputs import CompletionOutput, RequestOutput
from baton.workers.sampling_params import SamplingParams

Prompt = str | Sequence[int]


class LLM:
    def __init__(
        self,
        model: str | None = None,
        *,
        tokenizer: str | None = None,
        dtype: str = "auto",
        device: str = "auto",
        block_size: int = 16,
        max_model_len: int | None = None,
        num_kv_blocks: int | None = None,
        gpu_memory_utilization: float = 0.85,
        max_num_batched_tokens: int = 2048,
        max_num_seqs: int = 256,
        kv_cache_dtype: str = "auto",
        enable_prefix_caching: bool = True,
        enable_chunked_prefill: bool = True,
        long_prefill_token_threshold: int | None = None,
        attention_backend: str = "auto",
        load_format: str = "auto",
        preemption_mode: str = "recompute",
        skip_tokenizer_init: bool = False,
        enforce_eager: bool = False,
        seed: int = 0,
    ) -> None:
        config = EngineConfig(
            model=model,
            tokenizer=tokenizer,
            skip_tokenizer_init=skip_tokenizer_init,
            enforce_eager=enforce_eager,
            dtype=dtype,
            device=device,
            load_format=load_format,
            attention_backend=attention_backend,
            max_model_len=max_model_len,
            seed=seed,
            cache=CacheConfig(
                block_size=block_size,
                num_kv_blocks=num_kv_blocks,
                gpu_memory_utilization=gpu_memory_utilization,
                kv_cache_dtype=kv_cache_dtype,
                enable_prefix_caching=enable_prefix_caching,
            ),
            scheduler=SchedulerConfig(
                max_num_seqs=max_num_seqs,
                max_num_batched_tokens=max_num_batched_tokens,
                enable_chunked_prefill=enable_chunked_prefill,
                long_prefill_token_threshold=long_prefill_token_threshold,
                preemption_mode=preemption_mode,  # type: ignore[arg-type]
            ),
        )
        self.engine = EngineCore(config)
        self.tokenizer = self.engine.tokenizer
        self._ids = itertools.count()

    def encode(self, prompt: Prompt) -> list[int]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError(
                    "text prompts need a tokenizer (skip_tokenizer_init=True was given)"
                )
            return list(self.tokenizer.encode(prompt))
        return [int(t) for t in prompt]

    def generate(
        self,
        prompts: Prompt | Sequence[Prompt],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
    ) -> list[RequestOutput]:
        """One ``RequestOutput`` per prompt, in order. All prompts are validated before any work starts."""
        if isinstance(prompts, str) or (
            isinstance(prompts, Sequence) and prompts and isinstance(prompts[0], int)
        ):
            prompts = [prompts]  # type: ignore[list-item]
        prompts = list(prompts)  # type: ignore[arg-type]
        if sampling_params is None:
            sampling_params = SamplingParams()
        params = (
            [sampling_params] * len(prompts)
            if isinstance(sampling_params, SamplingParams)
            else list(sampling_params)
        )
        if len(params) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(params)} sampling params")
        encoded = [self.encode(p) for p in prompts]
        for ids, p in zip(encoded, params):
            self.engine.validate(ids, p)
        plan: list[list[str]] = []
        for ids, p in zip(encoded, params):
            children = []
            for j in range(p.n):
                rid = f"llm-{next(self._ids)}"
                child = (
                    p if p.n == 1 else replace(p, n=1, seed=None if p.seed is None else p.seed + j)
                )
                self.engine.add_request(rid, ids, child)
                children.append(rid)
            plan.append(children)
        finished: dict[str, RequestOutput] = {}
        while self.engine.has_unfinished_requests():
            for out in self.engine.step():
                if out.finished:
                    finished[out.request_id] = out
        results = []
        for ids, children in zip(encoded, plan):
            outs = [finished[c] for c in children]
            completions = [
                CompletionOutput(
                    index=j,
                    token_ids=list(o.outputs[0].token_ids),
                    text=o.outputs[0].text,
                    delta_token_ids=[],
                    delta_text="",
                    finish_reason=o.outputs[0].finish_reason,
                    stop_reason=o.outputs[0].stop_reason,
                    logprobs=o.outputs[0].logprobs,
                )
                for j, o in enumerate(outs)
            ]
            results.append(
                RequestOutput(
                    request_id=children[0],
                    prompt_token_ids=ids,
                    outputs=completions,
                    finished=True,
                    num_cached_tokens=outs[0].num_cached_tokens,
                    num_preemptions=sum(o.num_preemptions for o in outs),
                )
            )
        return results

    def chat(
        self, messages: list[dict], sampling_params: SamplingParams | None = None
    ) -> RequestOutput:
        return self.generate([self.engine.chat_prompt(messages)], sampling_params)[0]
