"""OpenAI-compatible HTTP front end (FastAPI): completions, chat completions (SSE), models, health,
metrics, admin.

``create_app(core)`` builds the app around a ``RouterCore``; the Serve ingress (``router/app.py``)
serves it, and so can any ASGI server (the overhead benchmark drives it in-process). Bodies are read
here with a size cap (413) and parsed by ``schemas.parse_body`` (400 naming the field); every
``APIError`` becomes a JSON error body.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from baton.router.auth import bearer_key
from baton.router.core import OpenStream, RouterCore, Submission, trace_context
from baton.router.errors import APIError, too_large
from baton.router.metrics import CONTENT_TYPE
from baton.router.schemas import ChatCompletionRequest, CompletionRequest, parse_body
from baton.workers.messages import GenerateDelta
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

log = logging.getLogger(__name__)
DEFAULT_MAX_TOKENS = 16


def _json(data: Any) -> str:
    return json.dumps(data, separators=(",", ":"), ensure_ascii=False)


async def read_body(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise too_large(int(declared), limit)
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise too_large(size, limit)
        chunks.append(chunk)
    return b"".join(chunks)


class FanOut:
    """The ``n`` sequences of one request, each read as soon as it is opened.

    Copies are admitted one by one; a copy's deltas are pumped into one queue from the moment it is
    open, so a copy that finishes releases its admission ticket while later copies still queue. If
    copies were read only once all were admitted, two ``n > 1`` requests each holding part of the
    budget would wait on each other until both got 429. ``deltas()`` interleaves them as they come;
    closing it (or ``aclose``) aborts every unfinished copy. One copy is read directly, no task.
    """

    def __init__(self, n: int) -> None:
        self.n = n
        self.streams: list[OpenStream] = []
        self._q: asyncio.Queue[tuple[int, GenerateDelta | BaseException | None]] = asyncio.Queue()
        self._tasks: list[asyncio.Task[None]] = []

    def add(self, s: OpenStream) -> None:
        self.streams.append(s)
        if self.n > 1:
            self._tasks.append(asyncio.create_task(self._pump(len(self.streams) - 1, s)))

    async def _pump(self, i: int, s: OpenStream) -> None:
        try:
            async for d in s:
                await self._q.put((i, d))
        except BaseException as exc:  # noqa: BLE001 - re-raised by the consumer
            await self._q.put((i, exc))
        finally:
            await self._q.put((i, None))

    async def deltas(self) -> AsyncIterator[tuple[int, GenerateDelta]]:
        try:
            if self.n == 1:
                async for d in self.streams[0]:
                    yield 0, d
                return
            live = len(self.streams)
            while live:
                i, item = await self._q.get()
                if item is None:
                    live -= 1
                elif isinstance(item, BaseException):
                    raise item
                else:
                    yield i, item
        finally:
            await self.aclose()

    async def aclose(self) -> None:
        for t in self._tasks:
            t.cancel()
        for s in self.streams:
            await s.aclose()


class _Usage:
    def __init__(self) -> None:
        self.prompt = self.cached = self.completion = 0

    def add(self, d: GenerateDelta, first_of_seq: bool) -> None:
        self.completion += len(d.token_ids)
        if d.num_prompt_tokens:
            self.prompt = d.num_prompt_tokens
        if first_of_seq:
            self.cached = max(self.cached, d.num_cached_tokens)

    def body(self) -> dict[str, Any]:
        return {
            "prompt_tokens": self.prompt,
            "completion_tokens": self.completion,
            "total_tokens": self.prompt + self.completion,
            "prompt_tokens_details": {"cached_tokens": self.cached},
        }


def create_app(core: RouterCore) -> FastAPI:
    app = FastAPI(title="Baton", docs_url=None, redoc_url=None, openapi_url=None)
    cfg = core.config
    tok = core.model.tokenizer

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> JSONResponse:
        core.metrics.http_errors.labels(core.model.name, str(exc.status)).inc()
        return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers())

    @app.exception_handler(Exception)
    async def _internal(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error on %s", request.url.path)
        core.metrics.http_errors.labels(core.model.name, "500").inc()
        return JSONResponse(APIError(500, f"internal error: {type(exc).__name__}").body(), 500)

    def tenant_of(request: Request):
        h = request.headers
        return core.authenticate(bearer_key(h.get("authorization"), h.get("x-api-key")))

    def tr(request: Request) -> dict[str, str]:
        return trace_context(request.headers.get("traceparent"), request.headers.get("tracestate"))

    async def run(request: Request, kind: str) -> Response:
        arrival = time.monotonic()
        tenant = tenant_of(request)
        raw = await read_body(request, cfg.server.max_body_bytes)
        body: Any = parse_body(raw, ChatCompletionRequest if kind == "chat" else CompletionRequest)
        core.check_model(body.model)
        if body.best_of not in (None, body.n):
            raise APIError(400, "best_of must equal n when given", param="best_of")
        if kind == "chat":
            msgs = [m.as_template_dict() for m in body.messages]
            core.inspect_prompt(_texts(msgs))
            ids = core.chat_ids(msgs)
            kw = body.sampling_kwargs(body.max_completion_tokens or DEFAULT_MAX_TOKENS)
            if body.max_completion_tokens and not body.max_tokens:
                kw["max_tokens"] = body.max_completion_tokens
            lp = (body.top_logprobs or 0) if body.logprobs else None
        else:
            if body.echo:
                raise APIError(400, "echo is not supported", param="echo")
            if body.suffix:
                raise APIError(400, "suffix is not supported", param="suffix")
            prompt = body.single_prompt()
            if isinstance(prompt, str):
                core.inspect_prompt((prompt,))
            ids = core.encode(prompt)
            kw = body.sampling_kwargs(DEFAULT_MAX_TOKENS)
            lp = body.logprobs
        params = core.sampling_params(**kw, logprobs=lp)
        ids, truncated = core.fit_context(ids, params, body.truncate_prompt_tokens)
        core.admission.check_fan_out(body.n, len(ids), params.max_tokens)
        sub = Submission(tuple(ids), params, truncated, kind)
        trace = tr(request)
        fan = FanOut(body.n)
        try:
            for j in range(body.n):
                child = sub
                if body.n > 1:
                    from dataclasses import replace

                    child = replace(
                        sub,
                        params=replace(
                            params, seed=None if params.seed is None else params.seed + j
                        ),
                    )
                fan.add(
                    await core.open_stream(
                        tenant,
                        child,
                        arrival=arrival,
                        trace=trace,
                        client_request_id=body.request_id if body.n == 1 else None,
                    )
                )
        except BaseException:
            await fan.aclose()
            raise
        rid = ("chatcmpl-" if kind == "chat" else "cmpl-") + uuid.uuid4().hex
        created = int(time.time())
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        fmt = _Formatter(kind, rid, created, body.model, tok, truncated, body.return_token_ids)
        if body.stream:
            return StreamingResponse(
                fmt.sse(fan.deltas(), body.n, include_usage),
                media_type="text/event-stream",
                headers={"Cache-Control": "no-cache", "X-Request-Id": rid},
            )
        return JSONResponse(await fmt.whole(fan.deltas(), body.n))

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        return await run(request, "completions")

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        return await run(request, "chat")

    @app.get("/v1/models")
    async def models(request: Request) -> JSONResponse:
        tenant_of(request)
        data = [
            {
                "id": n,
                "object": "model",
                "created": core.model.created,
                "owned_by": "baton",
                "max_model_len": core.model.max_model_len,
            }
            for n in core.model.names
        ]
        return JSONResponse({"object": "list", "data": data})

    @app.get("/health")
    async def health() -> JSONResponse:
        ok, loads = await core.health()
        body = {
            "status": "ok" if ok else "unavailable",
            "workers": [{"id": w.worker_id, "role": w.role, "ready": w.ready} for w in loads],
        }
        return JSONResponse(body, status_code=200 if ok else 503)

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(core.metrics.render(), media_type=CONTENT_TYPE)

    @app.post("/admin/cache/purge")
    async def purge(request: Request) -> JSONResponse:
        h = request.headers
        core.authenticate_admin(bearer_key(h.get("authorization"), h.get("x-api-key")))
        raw = await read_body(request, cfg.server.max_body_bytes)
        ns = None
        if raw.strip():
            try:
                data = json.loads(raw)
            except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as exc:
                raise APIError(400, f"the body is not valid JSON: {exc!r}") from None
            ns = data.get("namespace") if isinstance(data, dict) else None
            if ns is not None and not isinstance(ns, str):
                raise APIError(400, "namespace must be a string", param="namespace")
        return JSONResponse(await core.purge_prefix_cache(ns))

    @app.get("/admin/stats")
    async def admin_stats(request: Request) -> JSONResponse:
        h = request.headers
        core.authenticate_admin(bearer_key(h.get("authorization"), h.get("x-api-key")))
        check = getattr(core.client, "check_integrity", None)
        integrity = await check() if check is not None else None
        loads = await core.refresh_loads()
        return JSONResponse(
            {
                "workers": [w.__dict__ for w in loads],
                "integrity_error": integrity,
                "admitted": core.admission.num_admitted,
                "queued": core.admission.num_queued,
                "committed_blocks": core.admission.committed_blocks(),
                "budget_blocks": core.admission.policy.budget_blocks,
                "rejections": dict(core.admission.rejections),
            }
        )

    return app


class _Formatter:
    """OpenAI response and chunk shapes for both routes."""

    def __init__(
        self,
        kind: str,
        rid: str,
        created: int,
        model: str,
        tok: Any,
        truncated: bool,
        token_ids: bool = False,
    ) -> None:
        self.kind, self.rid, self.created, self.model, self.tok = kind, rid, created, model, tok
        self.truncated, self.token_ids = truncated, token_ids
        self.obj = "chat.completion" if kind == "chat" else "text_completion"

    def _logprobs(self, d: GenerateDelta) -> Any:
        if not d.logprobs:
            return None
        dec = self.tok.decode
        if self.kind == "chat":
            return {
                "content": [
                    {
                        "token": dec([lp.token_id]),
                        "logprob": lp.logprob,
                        "bytes": list(dec([lp.token_id]).encode()),
                        "top_logprobs": [
                            {"token": dec([t]), "logprob": v, "bytes": list(dec([t]).encode())}
                            for t, v in lp.top.items()
                        ],
                    }
                    for lp in d.logprobs
                ]
            }
        return {
            "tokens": [dec([lp.token_id]) for lp in d.logprobs],
            "token_logprobs": [lp.logprob for lp in d.logprobs],
            "top_logprobs": [{dec([t]): v for t, v in lp.top.items()} for lp in d.logprobs],
            "text_offset": [0] * len(d.logprobs),
        }

    def _choice(self, i: int, d: GenerateDelta, first: bool) -> dict[str, Any]:
        c: dict[str, Any] = {
            "index": i,
            "logprobs": self._logprobs(d),
            "finish_reason": d.finish_reason,
        }
        if self.kind == "chat":
            delta: dict[str, Any] = {"role": "assistant"} if first else {}
            if d.text or first:
                delta["content"] = d.text
            c["delta"] = delta
        else:
            c["text"] = d.text
        if d.finish_reason is not None:
            c["stop_reason"] = d.stop_reason
        if d.finish_reason == "error" and d.error:  # a terminal error says why, once, in its chunk
            c["error"] = {"message": d.error, "type": "server_error"}
        if self.token_ids:
            c["token_ids"] = list(d.token_ids)
        return c

    def _chunk(self, choices: list[dict[str, Any]], usage: Any = None) -> str:
        body: dict[str, Any] = {
            "id": self.rid,
            "object": self.obj + (".chunk" if self.kind == "chat" else ""),
            "created": self.created,
            "model": self.model,
            "choices": choices,
        }
        if usage is not None:
            body["usage"] = usage
        if self.truncated:
            body["truncated"] = True
        return f"data: {_json(body)}\n\n"

    async def sse(
        self, deltas: AsyncIterator[tuple[int, GenerateDelta]], n: int, include_usage: bool
    ) -> AsyncIterator[str]:
        usage = _Usage()
        seen: set[int] = set()
        try:
            async for i, d in deltas:
                first = i not in seen
                seen.add(i)
                usage.add(d, first)
                if d.token_ids or d.text or d.finish_reason or first:
                    yield self._chunk([self._choice(i, d, first)])
            if include_usage:
                yield self._chunk([], usage.body())
            yield "data: [DONE]\n\n"
        finally:
            await deltas.aclose()  # type: ignore[attr-defined]

    async def whole(
        self, deltas: AsyncIterator[tuple[int, GenerateDelta]], n: int
    ) -> dict[str, Any]:
        usage = _Usage()
        texts = [""] * n
        finish: list[Any] = [None] * n
        stop: list[Any] = [None] * n
        lps: list[list[Any]] = [[] for _ in range(n)]
        ids: list[list[int]] = [[] for _ in range(n)]
        seen: set[int] = set()
        try:
            async for i, d in deltas:
                usage.add(d, i not in seen)
                seen.add(i)
                texts[i] += d.text
                ids[i].extend(d.token_ids)
                if d.logprobs:
                    lps[i].append(self._logprobs(d))
                if d.finish_reason is not None:
                    finish[i], stop[i] = d.finish_reason, d.stop_reason
        finally:
            await deltas.aclose()  # type: ignore[attr-defined]
        choices = []
        for i in range(n):
            c: dict[str, Any] = {
                "index": i,
                "finish_reason": finish[i],
                "stop_reason": stop[i],
                "logprobs": _join_logprobs(lps[i], self.kind),
            }
            if self.kind == "chat":
                c["message"] = {"role": "assistant", "content": texts[i]}
            else:
                c["text"] = texts[i]
            if self.token_ids:
                c["token_ids"] = ids[i]
            choices.append(c)
        body = {
            "id": self.rid,
            "object": self.obj,
            "created": self.created,
            "model": self.model,
            "choices": choices,
            "usage": usage.body(),
        }
        if self.truncated:
            body["truncated"] = True
        return body


def _texts(messages: list[dict[str, Any]]) -> list[str]:
    """The text parts of chat messages (what the injection indicators scan)."""
    out: list[str] = []
    for m in messages:
        c = m.get("content")
        if isinstance(c, str):
            out.append(c)
        elif isinstance(c, list):
            out.extend(
                p["text"] for p in c if isinstance(p, dict) and isinstance(p.get("text"), str)
            )
    return out


def _join_logprobs(parts: list[Any], kind: str) -> Any:
    if not parts:
        return None
    if kind == "chat":
        return {"content": [c for p in parts for c in p["content"]]}
    return {k: [x for p in parts for x in p[k]] for k in parts[0]}
