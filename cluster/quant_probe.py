"""KV-quantization drift probe: a canary prompt set run through an fp8-KV engine and an unquantized
one, exporting top-1 agreement and KL divergence (``baton:kv_quant_top1_agreement``,
``baton:kv_quant_kl_divergence``).

Teacher forcing keeps the two paths comparable: the reference engine decodes each canary greedily
(``num_tokens`` steps, top-``top_k`` logprobs per step); the quantized engine is then asked for
its next-token distribution at every one of those positions, given the reference's own prefix (one
``max_tokens=1`` request per position; its prefix cache makes that cheap). Per position:

- top-1 agreement: the quantized argmax equals the reference's greedy token;
- KL(ref || quant) over the reference's top-k tokens; a token missing from the quantized top-k gets
  the quantized list's smallest logprob (an upper bound on its probability, so the KL is never
  overstated by truncation).

Engines are anything with ``generate(prompts, params) -> list[RequestOutput]`` (the offline
``LLM``). ``QuantProbe.run_forever`` repeats the probe on a thread at an interval and hands each
``ProbeResult`` to a callback (the router sets its gauges from it).
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from baton.workers.sampling_params import SamplingParams

DEFAULT_CANARIES: tuple[str, ...] = (
    "The capital of France is",
    "def fibonacci(n):\n    ",
    "Translate to German: Good morning, how are you?",
    "List three prime numbers:",
    "Once upon a time, in a small village,",
    "The chemical formula of water is",
    "Q: What is 12 times 7?\nA:",
    "Summarize: The meeting was moved from Monday to Wednesday because",
)


@dataclass(frozen=True)
class ProbeResult:
    kv_dtype: str
    top1_agreement: float  # 0..1 over all probed positions
    kl_mean: float  # nats, mean over positions
    kl_max: float
    positions: int
    prompts: int
    seconds: float
    finished_unix: float


def _kl(ref: dict[int, float], quant: dict[int, float]) -> float:
    floor = min(quant.values()) if quant else -30.0
    return sum(math.exp(lp) * (lp - quant.get(t, floor)) for t, lp in ref.items())


def run_probe(
    reference: Any,
    quantized: Any,
    prompts: Sequence[str | Sequence[int]] = DEFAULT_CANARIES,
    *,
    num_tokens: int = 8,
    top_k: int = 20,
    kv_dtype: str = "fp8",
) -> ProbeResult:
    t0 = time.monotonic()
    greedy = SamplingParams(max_tokens=num_tokens, temperature=0.0, ignore_eos=True, logprobs=top_k)
    refs = reference.generate(list(prompts), greedy)
    contexts: list[list[int]] = []
    targets: list[tuple[int, dict[int, float]]] = []
    for out in refs:
        comp = out.outputs[0]
        for i, lp in enumerate(comp.logprobs or []):
            contexts.append(list(out.prompt_token_ids) + list(comp.token_ids[:i]))
            targets.append((comp.token_ids[i], dict(lp.top)))
    one = SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True, logprobs=top_k)
    quants = quantized.generate(contexts, one)
    agree, kls = 0, []
    for (token, ref_top), out in zip(targets, quants):
        q_lp = out.outputs[0].logprobs[0]
        q_top = dict(q_lp.top)
        q_arg = max(q_top, key=q_top.__getitem__) if q_top else q_lp.token_id
        agree += int(q_arg == token)
        kls.append(max(0.0, _kl(ref_top, q_top)))
    n = max(1, len(targets))
    return ProbeResult(
        kv_dtype,
        agree / n,
        sum(kls) / n,
        max(kls, default=0.0),
        len(targets),
        len(refs),
        time.monotonic() - t0,
        time.time(),
    )


class QuantProbe:
    """Runs ``run_probe`` every ``interval_s`` on a daemon thread; ``stop()`` ends it."""

    def __init__(
        self,
        reference: Any,
        quantized: Any,
        publish: Callable[[ProbeResult], None],
        *,
        interval_s: float = 900.0,
        prompts: Sequence[str] = DEFAULT_CANARIES,
        kv_dtype: str = "fp8",
        num_tokens: int = 8,
    ) -> None:
        self.reference, self.quantized, self.publish = reference, quantized, publish
        self.interval_s, self.prompts, self.kv_dtype = interval_s, prompts, kv_dtype
        self.num_tokens = num_tokens
        self.last: ProbeResult | None = None
        self.errors = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def run_once(self) -> ProbeResult:
        result = run_probe(
            self.reference,
            self.quantized,
            self.prompts,
            num_tokens=self.num_tokens,
            kv_dtype=self.kv_dtype,
        )
        self.last = result
        self.publish(result)
        return result

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="kv-quant-probe", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self.run_once()
            except Exception:  # noqa: BLE001 - a failed probe must not take the process down
                self.errors += 1
            self._stop.wait(self.interval_s)

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
