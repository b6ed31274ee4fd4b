"""``baton generate``: one prompt through the offline engine, in a plain process (no Ray)."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "generate", help="generate text for one prompt with the offline engine (no Ray)"
    )
    p.add_argument(
        "--model", default=None, help="HF model directory (default: bundled SmolLM2-135M)"
    )
    p.add_argument("--prompt", required=True, help="prompt text")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--chat", action="store_true", help="wrap the prompt with the chat template")
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from baton.workers.llm import LLM
    from baton.workers.sampling_params import SamplingParams

    params = SamplingParams(
        max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p, seed=args.seed
    )
    llm = LLM(args.model, device=args.device, dtype=args.dtype)
    if args.chat:
        out = llm.chat([{"role": "user", "content": args.prompt}], params)
    else:
        out = llm.generate([args.prompt], params)[0]
    comp = out.outputs[0]
    print(comp.text)
    print(
        f"[{len(out.prompt_token_ids)} prompt tokens, {len(comp.token_ids)} generated, "
        f"finish_reason={comp.finish_reason}]"
    )
    return 0
