"""The incremental detokenizer's direct Rust decode must give exactly what ``tokenizer.decode``
gives, and tokenizers it cannot vouch for must keep ``tokenizer.decode``."""

from __future__ import annotations

import copy
import random

import pytest
from baton.workers.detokenizer import IncrementalDetokenizer, decoder_for
from baton.workers.sampling_params import SamplingParams


@pytest.fixture(scope="module")
def tokenizer():
    from baton.workers.default_model import default_model_path
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(default_model_path()))


TEXTS = [
    "Hello, world! « Ça va ? » — naïve café, 東京, emoji 🙂🚀 and tabs\tand\nnewlines.",
    "  leading spaces, trailing spaces  ",
    "def f(x):\n    return x ** 2  # comment",
]


def test_direct_decode_equals_tokenizer_decode(tokenizer) -> None:
    fast = decoder_for(tokenizer)
    rng = random.Random(0)
    specials = list(tokenizer.all_special_ids)
    for text in TEXTS:
        ids = tokenizer.encode(text, add_special_tokens=False)
        cases = [ids, ids[:1], ids[3:7], [], specials + ids + specials]
        cases += [[rng.randrange(tokenizer.vocab_size) for _ in range(12)] for _ in range(20)]
        for case in cases:
            for skip in (True, False):
                assert fast(case, skip) == tokenizer.decode(case, skip_special_tokens=skip)


def test_streamed_text_equals_full_decode(tokenizer) -> None:
    ids = tokenizer.encode(TEXTS[0], add_special_tokens=False)
    det = IncrementalDetokenizer.start(tokenizer, [], SamplingParams(max_tokens=8))
    streamed = ""
    for t in ids:
        det.append(t)
        streamed += det.take_delta(finished=False)
    streamed += det.flush()
    assert streamed == tokenizer.decode(ids, skip_special_tokens=True)


def test_only_a_standard_fast_tokenizer_without_clean_up_takes_the_direct_path(tokenizer) -> None:
    ids = tokenizer.encode("a , b .", add_special_tokens=False)
    real = tokenizer.decode(ids, skip_special_tokens=True)

    def spied(**attrs):
        tok = copy.copy(tokenizer)
        tok.__dict__.update(attrs)
        tok.decode = lambda ids, skip_special_tokens=True: "python path"
        return tok

    assert decoder_for(spied(clean_up_tokenization_spaces=False))(ids, True) == real
    assert decoder_for(spied(clean_up_tokenization_spaces=True))(ids, True) == "python path"

    class Custom(type(tokenizer)):
        def _decode(self, token_ids, **kw):  # a tokenizer with its own decoding
            return "custom"

    custom = copy.copy(tokenizer)
    custom.__class__ = Custom
    assert decoder_for(custom)(ids, True) == "custom"
    assert decoder_for(_Plain())(ids, True) == "plain"


class _Plain:
    """Not a transformers tokenizer: only ``decode``."""

    def decode(self, ids, skip_special_tokens=True):
        return "plain"
