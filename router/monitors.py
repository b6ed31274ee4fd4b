"""Signals that catch production failures early, computed on the router's request path.

- ``FinishRatio``: the fraction of ``finish_reason=length`` over the last N finished sequences
  (``baton:finish_length_ratio``); a rising value means clients' ``max_tokens`` cut answers off.
- ``InjectionDetector``: prompt-injection indicators on prompts and on streamed outputs, from a
  configurable pattern list plus heuristics (hidden Unicode controls, long encoded blobs, chat-role
  tokens in user text). It returns indicator *names* only; text never leaves this module.
- ``DriftMonitor``: per route, output length and a hashed token-id histogram over a recent window
  compared against a slow rolling baseline; the score is |z| of the mean length plus the
  Jensen-Shannon divergence of the token histograms.
"""

from __future__ import annotations

import math
import re
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

DEFAULT_INJECTION_PATTERNS: dict[str, str] = {
    "ignore_instructions": r"\b(ignore|disregard|forget)\b.{0,40}"
    r"\b(previous|prior|above|all|earlier)\b.{0,20}"
    r"\b(instructions?|rules|prompts?|directions)",
    "reveal_system_prompt": r"\b(reveal|print|show|repeat|output)\b.{0,40}\b(system prompt|"
    r"hidden (instructions|prompt)|initial instructions)",
    "role_override": r"\byou are (now|no longer)\b|\bact as (an? )?(unfiltered|jailbroken|dan)\b|"
    r"\bdeveloper mode\b|\bDAN\b",
    "exfiltration": r"\b(send|post|upload|exfiltrate)\b.{0,40}\b(api[_ ]?key|password|secret|"
    r"credentials?|token)s?\b.{0,40}\b(to|http)",
}
_HIDDEN = re.compile(
    "[\u200b-\u200f\u202a-\u202e\u2060-\u2064\u2066-\u2069\ufeff\U000e0000-\U000e007f]"
)
_BLOB = re.compile(r"[A-Za-z0-9+/]{200,}={0,2}")
_ROLE_TOKENS = re.compile(
    r"<\|(im_start|im_end|system|start_header_id|eot_id)\|>|\[/?INST\]|"
    r"^\s*(system|assistant)\s*:",
    re.IGNORECASE | re.MULTILINE,
)
HEURISTICS = ("hidden_unicode", "encoded_blob", "role_tokens")


class FinishRatio:
    """Fraction of ``length`` finishes over the last ``window`` finished sequences."""

    def __init__(self, window: int = 1000) -> None:
        self._last: deque[bool] = deque(maxlen=window)
        self._length = 0

    def observe(self, reason: str) -> float:
        if len(self._last) == self._last.maxlen and self._last[0]:
            self._length -= 1
        is_length = reason == "length"
        self._last.append(is_length)
        self._length += is_length
        return self.value

    @property
    def value(self) -> float:
        return self._length / len(self._last) if self._last else 0.0


class InjectionDetector:
    """Names of the indicators that fire on a text (configured patterns + built-in heuristics)."""

    def __init__(self, patterns: Mapping[str, str] | None = None, heuristics: bool = True) -> None:
        src = DEFAULT_INJECTION_PATTERNS if patterns is None else patterns
        flags = re.IGNORECASE | re.DOTALL
        self.patterns = {name: re.compile(rx, flags) for name, rx in src.items()}
        self.heuristics = heuristics

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(self.patterns) + (HEURISTICS if self.heuristics else ())

    def scan(self, text: str) -> set[str]:
        hits = {name for name, rx in self.patterns.items() if rx.search(text)}
        if self.heuristics:
            if _HIDDEN.search(text):
                hits.add("hidden_unicode")
            if _BLOB.search(text):
                hits.add("encoded_blob")
            if _ROLE_TOKENS.search(text):
                hits.add("role_tokens")
        return hits


class StreamScanner:
    """Scans a streamed output incrementally: each indicator counts at most once per sequence, and a
    tail of the previous text is kept so a phrase split across deltas still matches."""

    def __init__(self, detector: InjectionDetector, tail: int = 256) -> None:
        self.detector, self.tail = detector, tail
        self._buf = ""
        self.seen: set[str] = set()

    def feed(self, text: str) -> set[str]:
        if not text:
            return set()
        self._buf = (self._buf + text)[-(self.tail + len(text)) :]
        new = self.detector.scan(self._buf) - self.seen
        self.seen |= new
        self._buf = self._buf[-self.tail :]
        return new


@dataclass(frozen=True)
class DriftReading:
    recent_mean_tokens: float
    baseline_mean_tokens: float
    length_z: float
    token_js: float  # Jensen-Shannon divergence (bits, 0..1) of hashed token histograms
    score: float


class _RouteStats:
    def __init__(self, buckets: int, recent: int, baseline_alpha: float) -> None:
        self.buckets, self.alpha = buckets, baseline_alpha
        self.recent_lengths: deque[int] = deque(maxlen=recent)
        self.recent_hist: deque[list[int]] = deque(maxlen=recent)
        self.base_mean = self.base_var = 0.0
        self.base_hist = [0.0] * buckets
        self.n = 0

    def add(self, num_tokens: int, token_ids: Sequence[int]) -> None:
        h = [0] * self.buckets
        for t in token_ids:
            h[t % self.buckets] += 1
        self.recent_lengths.append(num_tokens)
        self.recent_hist.append(h)
        self.n += 1
        a = 1.0 / self.n if self.n <= 1.0 / self.alpha else self.alpha  # warm start, then EWMA
        d = num_tokens - self.base_mean
        self.base_mean += a * d
        self.base_var = (1 - a) * (self.base_var + a * d * d)
        total = max(1, sum(h))
        for i in range(self.buckets):
            self.base_hist[i] += a * (h[i] / total - self.base_hist[i])


def _js(p: Sequence[float], q: Sequence[float]) -> float:
    sp, sq = sum(p) or 1.0, sum(q) or 1.0
    out = 0.0
    for a, b in zip(p, q):
        a, b = a / sp, b / sq
        m = (a + b) / 2
        if a > 0:
            out += 0.5 * a * math.log2(a / m)
        if b > 0:
            out += 0.5 * b * math.log2(b / m)
    return max(0.0, out)


class DriftMonitor:
    """Output drift per route: recent window (last ``recent`` sequences) vs an EWMA baseline with a
    long memory (``1/baseline_alpha`` sequences). Routes are the router's bounded route names."""

    def __init__(
        self,
        recent: int = 50,
        baseline_alpha: float = 0.002,
        buckets: int = 64,
        min_samples: int = 20,
    ) -> None:
        self.recent, self.alpha, self.buckets = recent, baseline_alpha, buckets
        self.min_samples = min_samples
        self._routes: dict[str, _RouteStats] = {}

    def observe(self, route: str, token_ids: Sequence[int]) -> None:
        st = self._routes.get(route)
        if st is None:
            st = self._routes[route] = _RouteStats(self.buckets, self.recent, self.alpha)
        st.add(len(token_ids), token_ids)

    def reading(self, route: str) -> DriftReading | None:
        st = self._routes.get(route)
        if st is None or st.n < self.min_samples:
            return None
        lengths = list(st.recent_lengths)
        mean = sum(lengths) / len(lengths)
        sd = math.sqrt(st.base_var) if st.base_var > 0 else 1.0
        # standard error of the recent mean under the baseline's spread
        z = (mean - st.base_mean) / (sd / math.sqrt(len(lengths)) or 1.0)
        recent_hist = [sum(col) for col in zip(*st.recent_hist)]
        js = _js(recent_hist, st.base_hist)
        return DriftReading(mean, st.base_mean, z, js, abs(z) + 10.0 * js)

    def routes(self) -> list[str]:
        return list(self._routes)
