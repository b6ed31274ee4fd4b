"""Offline throughput: Baton's engine vs HF transformers continuous batching, same model, GPU and workload.

Workload (the engine-core and benchmark issues): 256 requests, prompts of 100-1000 random tokens (seeded), 256
output tokens each (EOS ignored), Llama-3.2-1B shapes with random weights (no download), bf16. Both engines run
in this one process, one after the other, on the same GPU.

    python bench/engine_throughput.py [--requests 256] [--shape llama-3.2-1b] [--out DIR]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import write_random_weights_dir, write_result  # noqa: E402


def workload(n: int, vocab: int, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    lens = torch.randint(100, 1001, (n,), generator=g).tolist()
    return [torch.randint(10, vocab, (k,), generator=g).tolist() for k in lens]


def run_baton(model_dir: Path, prompts, max_tokens: int, backend: str) -> dict:
    from baton import LLM, SamplingParams

    llm = LLM(
        str(model_dir),
        device="cuda",
        dtype="bfloat16",
        skip_tokenizer_init=True,
        attention_backend=backend,
        max_num_batched_tokens=8192,
        max_num_seqs=256,
        gpu_memory_utilization=0.8,
    )
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    llm.generate(
        prompts[:8], SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True)
    )  # warm-up
    torch.cuda.synchronize()
    t = time.perf_counter()
    outs = llm.generate(prompts, params)
    torch.cuda.synchronize()
    dt = time.perf_counter() - t
    n_out = sum(len(o.outputs[0].token_ids) for o in outs)
    stats = llm.engine.stats()
    del llm
    torch.cuda.empty_cache()
    return dict(
        system=f"baton ({backend})",
        seconds=dt,
        output_tokens=n_out,
        output_tokens_per_s=n_out / dt,
        preemptions=stats.scheduler.num_preemptions,
        kv_blocks=stats.num_blocks,
    )


def run_hf_generate_batch(model_dir: Path, prompts, max_tokens: int) -> dict:
    from transformers import AutoModelForCausalLM, GenerationConfig

    model, err = None, None
    for impl in ("paged|sdpa", "sdpa_paged"):  # the name changed across transformers 5.x releases
        try:
            model = (
                AutoModelForCausalLM.from_pretrained(
                    model_dir, dtype=torch.bfloat16, attn_implementation=impl
                )
                .cuda()
                .eval()
            )
            break
        except ValueError as exc:
            err = exc
    if model is None:
        raise err  # type: ignore[misc]
    cfg = GenerationConfig(
        max_new_tokens=max_tokens,
        do_sample=False,
        eos_token_id=-1,
        pad_token_id=0,
        use_cuda_graph=False,
    )
    model.generate_batch(inputs=prompts[:8], generation_config=cfg, max_new_tokens=4)
    torch.cuda.synchronize()
    t = time.perf_counter()
    res = model.generate_batch(inputs=prompts, generation_config=cfg)
    torch.cuda.synchronize()
    dt = time.perf_counter() - t
    n_out = sum(len(r.generated_tokens) for r in res.values())
    return dict(
        system=f"transformers generate_batch ({model.config._attn_implementation})",
        seconds=dt,
        output_tokens=n_out,
        output_tokens_per_s=n_out / dt,
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--requests", type=int, default=256)
    ap.add_argument("--max-tokens", type=int, default=256)
    ap.add_argument("--shape", default="llama-3.2-1b")
    ap.add_argument("--backends", default="triton")
    ap.add_argument("--skip-hf", action="store_true")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    model_dir = write_random_weights_dir(Path(tempfile.mkdtemp()) / args.shape, args.shape)
    from transformers import AutoConfig

    vocab = AutoConfig.from_pretrained(model_dir).vocab_size
    prompts = workload(args.requests, vocab)
    rows = []
    for backend in args.backends.split(","):
        rows.append(run_baton(model_dir, prompts, args.max_tokens, backend))
        print(rows[-1], flush=True)
    if not args.skip_hf:
        try:
            rows.append(run_hf_generate_batch(model_dir, prompts, args.max_tokens))
        except Exception as exc:  # a baseline that cannot run is reported, not hidden
            rows.append(dict(system="transformers generate_batch", error=repr(exc)[:500]))
        print(rows[-1], flush=True)
    base = next(
        (r for r in rows if r["system"].startswith("transformers") and "seconds" in r), None
    )
    if base:
        for r in rows:
            if "output_tokens_per_s" in r:
                r["ratio_vs_transformers"] = r["output_tokens_per_s"] / base["output_tokens_per_s"]
    write_result(
        "engine_throughput",
        dict(shape=args.shape, requests=args.requests, max_tokens=args.max_tokens, rows=rows),
        args.out,
    )


if __name__ == "__main__":
    main()
