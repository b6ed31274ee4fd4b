"""pydantic models of the OpenAI request bodies (plus Baton's extras), and the 400 that names the
field.

Unknown fields are ignored (the openai client and SDKs send fields such as ``user`` or
``metadata``); known fields are validated strictly, and the first error's location becomes the
error's ``param``.
"""

from __future__ import annotations

import json
from typing import Any, Literal

from baton.router.errors import APIError, bad_request
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator


class _Req(BaseModel):
    model_config = ConfigDict(extra="ignore")


class StreamOptions(_Req):
    include_usage: bool = False


class _Sampling(_Req):
    model: str
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    top_k: int | None = None
    min_p: float | None = Field(default=None, ge=0, le=1)
    n: int = Field(default=1, ge=1, le=16)
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    seed: int | None = None
    presence_penalty: float | None = Field(default=None, ge=-2, le=2)
    frequency_penalty: float | None = Field(default=None, ge=-2, le=2)
    repetition_penalty: float | None = Field(default=None, gt=0)
    ignore_eos: bool = False
    min_tokens: int = Field(default=0, ge=0)
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    truncate_prompt_tokens: int | None = Field(default=None, ge=-1)
    best_of: int | None = None
    request_id: str | None = Field(default=None, max_length=128)
    return_token_ids: bool = False  # Baton/vLLM extension: each choice also carries its token ids

    @field_validator("stop")
    @classmethod
    def _stop(cls, v: str | list[str] | None) -> str | list[str] | None:
        if isinstance(v, list) and len(v) > 16:
            raise ValueError("at most 16 stop sequences")
        return v

    @field_validator("truncate_prompt_tokens")
    @classmethod
    def _trunc(cls, v: int | None) -> int | None:
        if v == 0:
            raise ValueError("must be >= 1, or -1 for 'as many as fit'")
        return v

    def sampling_kwargs(self, default_max_tokens: int) -> dict[str, Any]:
        stop = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())
        return dict(
            max_tokens=self.max_tokens or default_max_tokens,
            temperature=1.0 if self.temperature is None else self.temperature,
            top_p=self.top_p,
            top_k=self.top_k,
            min_p=self.min_p,
            seed=self.seed,
            stop=stop,
            stop_token_ids=tuple(self.stop_token_ids or ()),
            presence_penalty=self.presence_penalty,
            frequency_penalty=self.frequency_penalty,
            repetition_penalty=self.repetition_penalty,
            ignore_eos=self.ignore_eos,
            min_tokens=self.min_tokens,
            skip_special_tokens=self.skip_special_tokens,
            include_stop_str_in_output=self.include_stop_str_in_output,
        )


class CompletionRequest(_Sampling):
    prompt: str | list[int] | list[str] | list[list[int]]
    logprobs: int | None = Field(default=None, ge=0, le=20)
    echo: bool = False
    suffix: str | None = None

    def single_prompt(self) -> str | list[int]:
        p = self.prompt
        if isinstance(p, list) and p and isinstance(p[0], (str, list)):
            if len(p) != 1:
                raise bad_request(
                    "batched prompts are not supported; send one prompt per request "
                    "(use n for several completions)",
                    "prompt",
                )
            return p[0]  # type: ignore[return-value]
        return p  # type: ignore[return-value]


class ContentPart(_Req):
    type: Literal["text"]
    text: str


class ChatMessage(_Req):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None
    name: str | None = None

    def as_template_dict(self) -> dict[str, Any]:
        c = self.content
        text = "".join(p.text for p in c) if isinstance(c, list) else (c or "")
        role = "system" if self.role == "developer" else self.role
        return {"role": role, "content": text}


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=20)


def parse_body(raw: bytes, model: type[_Req]) -> Any:
    """JSON → model, or a 400 whose ``param`` names the first offending field."""
    try:
        data = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise bad_request(f"the body is not valid JSON: {exc}", None) from None
    except RecursionError:  # thousands of nested brackets: the client's problem, not a 500
        raise bad_request("the body is nested too deeply", None) from None
    if not isinstance(data, dict):
        raise bad_request("the body must be a JSON object", None)
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        loc = ".".join(str(p) for p in first["loc"]) or None
        raise APIError(
            400, f"invalid field {loc}: {first['msg']}", param=loc, code="invalid_value"
        ) from None
