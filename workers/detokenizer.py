"""Incremental detokenization with exact stop-string cuts.

Text is decoded over a short sliding window of tokens (prefix/read offsets, as HF streamers do) so a step costs
O(window), not O(output). Streaming holds back the last ``max_stop_len - 1`` characters until it is certain they
do not begin a stop string, so text that was streamed never has to be taken back.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable


def decoder_for(tokenizer: Any) -> Callable[[list[int], bool], str]:
    """``(ids, skip_special_tokens) -> text``. For a standard fast tokenizer without space
    clean-up, ``tokenizer.decode`` is the Rust ``tokenizers`` decode behind ~20 us of Python
    argument handling per call (two calls per streamed token): call the Rust one directly then.
    Anything else (a subclass with its own ``_decode``, clean-up on, a slow tokenizer) keeps
    ``tokenizer.decode``."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    try:
        from transformers import PreTrainedTokenizerFast

        standard = type(tokenizer)._decode is PreTrainedTokenizerFast._decode
    except (ImportError, AttributeError):
        standard = False
    if (
        backend is not None
        and standard
        and not getattr(tokenizer, "clean_up_tokenization_spaces", True)
    ):
        return lambda ids, skip: backend.decode(ids, skip_special_tokens=skip)
    return lambda ids, skip: tokenizer.decode(ids, skip_special_tokens=skip)


@dataclass
class IncrementalDetokenizer:
    tokenizer: Any
    stop: tuple[str, ...] = ()
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    _prefix_offset: int = 0
    _read_offset: int = 0
    _emitted: int = 0
    _decoder: Callable[[list[int], bool], str] | None = field(default=None, repr=False)

    @classmethod
    def start(
        cls, tokenizer: Any, prompt_token_ids: list[int], params: Any
    ) -> IncrementalDetokenizer:
        """Seed the window with the prompt's tail so the first token decodes with its leading space."""
        tail = list(prompt_token_ids[-5:])
        det = cls(
            tokenizer,
            stop=tuple(params.stop),
            include_stop_str_in_output=params.include_stop_str_in_output,
            skip_special_tokens=params.skip_special_tokens,
        )
        det.token_ids = tail
        det._prefix_offset = 0
        det._read_offset = len(tail)
        return det

    def _decode(self, ids: list[int]) -> str:
        if self._decoder is None:
            self._decoder = decoder_for(self.tokenizer)
        return self._decoder(ids, self.skip_special_tokens)

    def append(self, token_id: int) -> str | None:
        """Add one token; returns the stop string if the text now contains one (text is cut there)."""
        self.token_ids.append(token_id)
        prefix_text = self._decode(self.token_ids[self._prefix_offset : self._read_offset])
        new_text = self._decode(self.token_ids[self._prefix_offset :])
        if len(new_text) > len(prefix_text) and not new_text.endswith("\ufffd"):
            added = new_text[len(prefix_text) :]
            self._prefix_offset = self._read_offset
            self._read_offset = len(self.token_ids)
        else:
            return None
        search_from = max(0, len(self.text) - max((len(s) for s in self.stop), default=0) + 1)
        self.text += added
        for stop_str in self.stop:
            idx = self.text.find(stop_str, search_from)
            if idx != -1:
                end = idx + len(stop_str) if self.include_stop_str_in_output else idx
                self.text = self.text[:end]
                return stop_str
        return None

    def flush(self) -> str:
        """Decode whatever is pending (an incomplete UTF-8 tail at finish is emitted as is)."""
        if self._read_offset < len(self.token_ids):
            prefix_text = self._decode(self.token_ids[self._prefix_offset : self._read_offset])
            new_text = self._decode(self.token_ids[self._prefix_offset :])
            if len(new_text) > len(prefix_text):
                self.text += new_text[len(prefix_text) :]
            self._read_offset = len(self.token_ids)
        return self.take_delta(finished=True)

    def take_delta(self, finished: bool) -> str:
        holdback = 0 if finished else max((len(s) for s in self.stop), default=1) - 1
        end = max(self._emitted, len(self.text) - holdback)
        delta = self.text[self._emitted : end]
        self._emitted = end
        return delta
