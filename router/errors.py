"""Every refusal the router gives, as one exception type that both front ends translate.

HTTP answers ``{"error": {"message", "type", "param", "code", ...details}}`` (OpenAI's shape, so the
openai client raises its typed errors); gRPC maps the same error to a status code with the message
and details in trailers.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

_GRPC_CODES = {
    400: "INVALID_ARGUMENT",
    401: "UNAUTHENTICATED",
    403: "PERMISSION_DENIED",
    404: "NOT_FOUND",
    413: "INVALID_ARGUMENT",
    429: "RESOURCE_EXHAUSTED",
    503: "UNAVAILABLE",
    500: "INTERNAL",
}

_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
    503: "service_unavailable",
    500: "internal_error",
}


@dataclass
class APIError(Exception):
    status: int
    message: str
    param: str | None = None
    code: str | None = None
    details: dict[str, Any] = field(default_factory=dict)
    retry_after_s: float | None = None

    def __post_init__(self) -> None:
        super().__init__(self.message)

    @property
    def type(self) -> str:
        return _TYPES.get(self.status, "error")

    @property
    def grpc_code_name(self) -> str:
        return _GRPC_CODES.get(self.status, "UNKNOWN")

    def body(self) -> dict[str, Any]:
        err: dict[str, Any] = {
            "message": self.message,
            "type": self.type,
            "param": self.param,
            "code": self.code,
        }
        err.update(self.details)
        return {"error": err}

    def headers(self) -> dict[str, str]:
        if self.retry_after_s is None:
            return {}
        return {"Retry-After": str(max(1, int(self.retry_after_s + 0.999)))}


def bad_request(message: str, param: str | None = None, **details: Any) -> APIError:
    return APIError(400, message, param=param, code="invalid_value", details=details)


def context_overflow(prompt_tokens: int, max_tokens: int, max_model_len: int) -> APIError:
    return APIError(
        400,
        f"This model's maximum context length is {max_model_len} tokens; the prompt has {prompt_tokens} "
        f"tokens and max_tokens is {max_tokens} ({prompt_tokens + max_tokens} in all). Shorten the prompt, "
        "lower max_tokens, or set truncate_prompt_tokens.",
        param="prompt",
        code="context_length_exceeded",
        details={
            "prompt_tokens": prompt_tokens,
            "max_tokens": max_tokens,
            "max_model_len": max_model_len,
        },
    )


def unauthorized() -> APIError:
    return APIError(
        401, "missing or unknown API key (send Authorization: Bearer <key>)", code="invalid_api_key"
    )


def model_not_found(name: str, available: list[str]) -> APIError:
    return APIError(
        404,
        f"model {name!r} does not exist; available: {', '.join(available)}",
        param="model",
        code="model_not_found",
    )


def too_large(size: int, limit: int) -> APIError:
    return APIError(
        413,
        f"request body of {size} bytes exceeds the limit of {limit} bytes",
        code="request_too_large",
        details={"limit_bytes": limit},
    )


def rejected(reason: str, message: str, retry_after_s: float) -> APIError:
    return APIError(
        429, message, code=reason, details={"reason": reason}, retry_after_s=retry_after_s
    )
