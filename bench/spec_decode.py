"""N-gram speculative decoding: decode tokens/s and acceptance vs the same engine without it, one run.

Two workloads, greedy (so outputs must be token-identical, which is checked):
- ``repetitive``: edit / summarise a given document (the answer copies long spans of the prompt),
- ``open``: open-ended questions (little to copy; drafting should switch itself off, goal <= 3 % loss).
Each at 1 and 8 requests in flight (a closed loop: ``--rounds`` requests per slot, a new one joins
as one ends, as on a server). Both engines live side by side, each warmed by one untimed pass of the
loop; then ``--repeats`` timed passes each, alternating which goes first (these GPUs drift
by 10 % between runs); the speed-up is the median of the paired ratios.
Default model: the bundled SmolLM2-135M-Instruct (a real model: random weights loop and would
inflate acceptance). Tokens/s counts output tokens after each request's first (prefill) token,
over the wall time from the first streamed token to the last.

    python bench/spec_decode.py [--model PATH] [--k 4] [--max-tokens 256] [--batch 1 8] [--rounds 3]
        [--repeats 3] [--profile] [--out DIR]
"""

from __future__ import annotations

import argparse
import cProfile
import gc
import inspect
import pstats
import statistics
import sys
import textwrap
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import write_result  # noqa: E402

OPEN_QUESTIONS = [
    "Write a short story about a dragon who learns to cook.",
    "Explain why the sky is blue to a ten year old.",
    "Give me five ideas for a birthday party in winter.",
    "What are the pros and cons of electric cars?",
    "Describe a day in the life of a lighthouse keeper.",
    "How do vaccines train the immune system?",
    "Plan a three day trip to Rome.",
    "Why do cats purr?",
]


def chat_ids(tokenizer, text: str) -> list[int]:
    ids = tokenizer.apply_chat_template(
        [{"role": "user", "content": text}], add_generation_prompt=True, tokenize=True
    )
    return list(ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "input_ids") else ids)


def repetitive_prompts(tokenizer) -> list[list[int]]:
    code = inspect.getsource(textwrap.TextWrapper._wrap_chunks)
    doc = inspect.getdoc(textwrap.TextWrapper) or ""
    asks = [
        f"Rename the variable `chunks` to `pieces` in this function and return the full code:\n{code}",
        f"Add a type hint to every argument of this function; return the full code:\n{code}",
        f"Repeat this documentation, fixing any typos:\n{doc}",
        f"Rewrite this function with `lines` renamed to `out`; return all of it:\n{code}",
        f"Summarise this text, quoting its key sentences verbatim:\n{doc}",
        f"Convert the comments in this function to upper case; return the full code:\n{code}",
        f"Copy this documentation and add a title line:\n{doc}",
        f"Return this function unchanged but with 2-space indentation:\n{code}",
    ]
    return [chat_ids(tokenizer, a) for a in asks]


def open_prompts(tokenizer) -> list[list[int]]:
    return [chat_ids(tokenizer, q) for q in OPEN_QUESTIONS]


def _closed_loop(eng, prompts, batch: int, n_total: int, params, tag: str, device: str, prof=None):
    """Keep ``batch`` requests in flight until ``n_total`` have run (a new one joins as one ends,
    as a server's concurrency slots do): a static batch would be timed by its slowest request,
    e.g. one that does not copy its prompt, and hide what drafting does for the others.
    Returns (outputs by request, seconds from the first streamed token to the last, step times)."""
    queue = [(f"{tag}{i}", prompts[i % len(prompts)]) for i in range(n_total)]
    queue.reverse()
    for _ in range(min(batch, n_total)):
        rid, ids = queue.pop()
        eng.add_request(rid, ids, params)
    outs: dict[str, list[int]] = {}
    t_first = None
    step_s: list[float] = []  # wall time of each engine step after the first token (host + GPU)
    if prof is not None:
        prof.enable()
    while eng.has_unfinished_requests():
        t_step = time.perf_counter()
        outputs = eng.step()
        if t_first is not None:
            if device == "cuda":
                torch.cuda.synchronize()
            step_s.append(time.perf_counter() - t_step)
        for o in outputs:
            if t_first is None and o.outputs[0].delta_token_ids:
                if device == "cuda":
                    torch.cuda.synchronize()
                t_first = time.perf_counter()
            if o.finished:
                outs[o.request_id] = list(o.outputs[0].token_ids)
                if queue:
                    rid, ids = queue.pop()
                    eng.add_request(rid, ids, params)
    if device == "cuda":
        torch.cuda.synchronize()
    dt = time.perf_counter() - (t_first or time.perf_counter())
    if prof is not None:  # where the host time of the timed pass went
        prof.disable()
        pstats.Stats(prof).sort_stats("tottime").print_stats(25)
    return outs, dt, step_s


def make_engine(model: str, spec: dict | None, device: str, prompts, batch: int, n_total: int,
                params):  # fmt: skip
    """An engine, warmed by one untimed pass of the closed loop (Triton compiles; the decode
    graphs are captured when the engine starts)."""
    from baton.workers.config import CacheConfig, EngineConfig, SchedulerConfig
    from baton.workers.engine import EngineCore

    eng = EngineCore(EngineConfig(
        model=model, device=device, dtype="bfloat16" if device == "cuda" else "float32",
        cache=CacheConfig(num_kv_blocks=2048),  # fixed: the two engines of a pair share the GPU
        scheduler=SchedulerConfig(max_num_batched_tokens=8192), speculative=spec,
    ))  # fmt: skip
    _closed_loop(eng, prompts, batch, n_total, params, "warm", device)
    return eng


def timed_pass(eng, prompts, batch: int, n_total: int, params, tag: str, device: str,
               profile: bool = False) -> dict:  # fmt: skip
    s0 = eng.stats()
    graphs = getattr(eng.runner, "graphs", None)
    captured0 = len(graphs.graphs) if graphs is not None else 0
    prof = cProfile.Profile() if profile else None
    outs, dt, step_s = _closed_loop(eng, prompts, batch, n_total, params, tag, device, prof)
    n_tok = sum(len(v) for v in outs.values()) - len(outs)  # first tokens come from prefill
    s = eng.stats()
    drafted = s.spec_draft_tokens - s0.spec_draft_tokens
    accepted = s.spec_accepted_tokens - s0.spec_accepted_tokens
    return dict(
        outputs=outs,
        decode_seconds=dt,
        decode_tokens=n_tok,
        tokens_per_s=n_tok / max(dt, 1e-9),
        drafted=drafted,
        accepted=accepted,
        acceptance_rate=accepted / drafted if drafted else 0.0,
        decode_steps=len(step_s),
        step_ms_p50=1e3 * sorted(step_s)[len(step_s) // 2] if step_s else 0.0,
        step_ms_max=1e3 * max(step_s, default=0.0),
        # decode graphs captured during the timed pass (each capture stalls a step)
        graphs_captured_timed=(len(graphs.graphs) - captured0) if graphs is not None else 0,
        # a failed capture turns decode eager for good (model_runner): that would explain slow steps
        graph_failures=eng.runner.graph_failures,
        graphs_on=eng.runner.graphs is not None,
        verify_steps=s.spec_verify_steps - s0.spec_verify_steps,
        spec_active_at_end=s.spec_active,
    )


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=None, help="model dir (default: bundled SmolLM2-135M)")
    ap.add_argument("--k", type=int, default=4)
    ap.add_argument("--max-tokens", type=int, default=256)
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--rounds", type=int, default=3, help="requests per concurrency slot")
    ap.add_argument("--repeats", type=int, default=3, help="timed passes per engine, alternating")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--profile", action="store_true", help="cProfile each timed pass (host time)")
    args = ap.parse_args()
    from baton.workers.default_model import default_model_path
    from transformers import AutoTokenizer

    model = args.model or str(default_model_path())
    device = "cuda" if torch.cuda.is_available() else "cpu"
    tok = AutoTokenizer.from_pretrained(model)
    workloads = {"repetitive": repetitive_prompts(tok), "open": open_prompts(tok)}
    spec = {"method": "ngram", "k": args.k, "n_min": 2, "n_max": 4}
    from baton.workers.sampling_params import SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=args.max_tokens)
    rows = []
    for name, prompts in workloads.items():
        for batch in args.batch:
            n_total = batch * args.rounds
            engines = {
                "base": make_engine(model, None, device, prompts, batch, n_total, params),
                "spec": make_engine(model, spec, device, prompts, batch, n_total, params),
            }
            passes: dict[str, list[dict]] = {"base": [], "spec": []}
            for r in range(args.repeats):  # alternate the order: drift hits both alike
                for label in ("base", "spec") if r % 2 == 0 else ("spec", "base"):
                    passes[label].append(timed_pass(
                        engines[label], prompts, batch, n_total, params, f"r{r}-", device,
                        args.profile))  # fmt: skip
            del engines
            gc.collect()
            if device == "cuda":
                torch.cuda.empty_cache()
            base, fast = passes["base"], passes["spec"]
            ratios = [f["tokens_per_s"] / b["tokens_per_s"] for b, f in zip(base, fast)]

            def med(runs: list[dict], key: str) -> float:
                return statistics.median(r[key] for r in runs)

            row = dict(
                workload=name, batch=batch, requests=n_total, k=args.k, repeats=args.repeats,
                base_tokens_per_s=med(base, "tokens_per_s"),
                spec_tokens_per_s=med(fast, "tokens_per_s"),
                speedup=statistics.median(ratios), speedup_per_repeat=ratios,
                acceptance_rate=sum(f["accepted"] for f in fast) / max(1, sum(f["drafted"] for f in fast)),
                drafted=sum(f["drafted"] for f in fast), accepted=sum(f["accepted"] for f in fast),
                verify_steps=sum(f["verify_steps"] for f in fast),
                steps=(med(base, "decode_steps"), med(fast, "decode_steps")),
                step_ms_p50=(med(base, "step_ms_p50"), med(fast, "step_ms_p50")),
                step_ms_max=(max(b["step_ms_max"] for b in base), max(f["step_ms_max"] for f in fast)),
                graphs_captured_timed=(sum(b["graphs_captured_timed"] for b in base),
                                       sum(f["graphs_captured_timed"] for f in fast)),
                graph_failures=(base[-1]["graph_failures"], fast[-1]["graph_failures"]),
                graphs_on=(base[-1]["graphs_on"], fast[-1]["graphs_on"]),
                spec_active_at_end=fast[-1]["spec_active_at_end"],
                identical=all(b["outputs"] == f["outputs"] for b, f in zip(base, fast)),
                decode_tokens=base[0]["decode_tokens"],
            )  # fmt: skip
            rows.append(row)
            print({k: (round(v, 3) if isinstance(v, float) else v) for k, v in row.items()})
    write_result(
        f"spec_decode_{device}", dict(model=model, max_tokens=args.max_tokens, rows=rows), args.out
    )


if __name__ == "__main__":
    main()
