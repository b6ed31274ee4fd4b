"""Baton: a disaggregated prefill/decode LLM serving cluster.

The offline engine API lives here in the shape vLLM users know::

    from baton import LLM, SamplingParams
"""

from __future__ import annotations

from typing import TYPE_CHECKING

__all__ = ["LLM", "SamplingParams", "RequestOutput", "CompletionOutput"]

if TYPE_CHECKING:
    from baton.workers.llm import LLM
    from baton.workers.outputs import CompletionOutput, RequestOutput
    from baton.workers.sampling_params import SamplingParams


def __getattr__(name: str):
    # Lazy so that `import baton.cluster...` does not pay for torch before it needs it.
    if name == "LLM":
        from baton.workers.llm import LLM

        return LLM
    if name == "SamplingParams":
        from baton.workers.sampling_params import SamplingParams

        return SamplingParams
    if name in ("RequestOutput", "CompletionOutput"):
        from baton.workers import outputs

        return getattr(outputs, name)
    raise AttributeError(name)
