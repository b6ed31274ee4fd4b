"""gRPC front end: ``baton.v1.Generation`` on a grpcio aio server inside the ingress replica, with
reflection.

Why not Serve's gRPC proxy: the proxy routes by an "application" metadata key, has no server
reflection, and wraps user status codes in its own handling; a grpcio aio server on the replica's
event loop streams natively, maps our errors to exact status codes, and sees cancellation at once
(client gone → abort everywhere). Several ingress replicas on one node share the port through
SO_REUSEPORT (grpcio's default on Linux).

Auth (``authorization: Bearer <key>`` or ``x-api-key``) and W3C ``traceparent``/``tracestate``
travel in metadata.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator
from typing import Any

import grpc
from baton.protos.build import ensure_generated
from grpc_reflection.v1alpha import reflection

ensure_generated()

from baton.protos.baton.v1 import generation_pb2 as pb  # noqa: E402
from baton.protos.baton.v1 import generation_pb2_grpc as pb_grpc  # noqa: E402
from baton.router.auth import Tenant, bearer_key  # noqa: E402
from baton.router.core import RouterCore, Submission, trace_context  # noqa: E402
from baton.router.errors import APIError  # noqa: E402

log = logging.getLogger(__name__)
_SAMPLING_FIELDS = (
    "max_tokens",
    "temperature",
    "top_p",
    "top_k",
    "min_p",
    "seed",
    "logprobs",
    "presence_penalty",
    "frequency_penalty",
    "repetition_penalty",
    "min_tokens",
)


async def _fail(context: grpc.aio.ServicerContext, exc: APIError) -> None:
    trailers: list[tuple[str, str]] = [("error-type", exc.type)]
    if exc.param:
        trailers.append(("error-param", exc.param))
    for k, v in exc.details.items():
        trailers.append((k.replace("_", "-"), str(v)))
    if exc.retry_after_s is not None:
        trailers.append(("retry-after", exc.headers()["Retry-After"]))
    context.set_trailing_metadata(tuple(trailers))
    await context.abort(getattr(grpc.StatusCode, exc.grpc_code_name), exc.message)


class GenerationServicer(pb_grpc.GenerationServicer):
    def __init__(self, core: RouterCore) -> None:
        self.core = core

    def _meta(self, context: grpc.aio.ServicerContext) -> dict[str, str]:
        return {
            k.lower(): v for k, v in (context.invocation_metadata() or ()) if isinstance(v, str)
        }

    def _tenant(self, md: dict[str, str]) -> Tenant:
        return self.core.authenticate(bearer_key(md.get("authorization"), md.get("x-api-key")))

    def _prompt(self, request: Any) -> list[int]:
        which = request.WhichOneof("input")
        if which == "text":
            self.core.inspect_prompt((request.text,))
            return self.core.encode(request.text, "text")
        if which == "token_ids":
            return self.core.encode(list(request.token_ids.ids), "token_ids")
        if which == "chat":
            msgs = [{"role": m.role, "content": m.content} for m in request.chat.messages]
            if not msgs:
                raise APIError(400, "chat.messages must not be empty", param="chat.messages")
            self.core.inspect_prompt([m["content"] for m in msgs])
            return self.core.chat_ids(msgs)
        raise APIError(400, "one of text, token_ids or chat is required", param="input")

    async def Generate(self, request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        arrival = time.monotonic()
        stream = None
        try:
            md = self._meta(context)
            tenant = self._tenant(md)
            self.core.check_model(request.model)
            p = request.params
            kw: dict[str, Any] = {f: getattr(p, f) for f in _SAMPLING_FIELDS if p.HasField(f)}
            kw.setdefault("max_tokens", 16)
            kw.setdefault("temperature", 1.0)
            kw["stop"] = tuple(p.stop)
            kw["stop_token_ids"] = tuple(p.stop_token_ids)
            kw["ignore_eos"] = p.ignore_eos
            params = self.core.sampling_params(**kw)
            ids = self._prompt(request)
            trunc = (
                request.truncate_prompt_tokens
                if request.HasField("truncate_prompt_tokens")
                else None
            )
            if trunc == 0 or (trunc is not None and trunc < -1):
                raise APIError(
                    400, "truncate_prompt_tokens must be >= 1 or -1", param="truncate_prompt_tokens"
                )
            ids, truncated = self.core.fit_context(ids, params, trunc)
            stream = await self.core.open_stream(
                tenant,
                Submission(tuple(ids), params, truncated, "grpc"),
                arrival=arrival,
                trace=trace_context(md.get("traceparent"), md.get("tracestate")),
                client_request_id=request.request_id or None,
            )
        except APIError as exc:
            await _fail(context, exc)
            return
        rid = request.request_id or stream.request_id
        completion = cached = prompt = 0
        try:
            async for d in stream:
                completion += len(d.token_ids)
                prompt = d.num_prompt_tokens or prompt
                if d.num_cached_tokens:
                    cached = max(cached, d.num_cached_tokens)
                msg = pb.GenerateResponse(
                    request_id=rid, token_ids=list(d.token_ids), text=d.text, truncated=truncated
                )
                for lp in d.logprobs or ():
                    msg.logprobs.add(token_id=lp.token_id, logprob=lp.logprob, top=lp.top)
                if d.finish_reason is not None:
                    msg.finish_reason = d.finish_reason
                    msg.stop_reason = "" if d.stop_reason is None else str(d.stop_reason)
                    msg.error = d.error or ""
                    msg.usage.CopyFrom(
                        pb.Usage(
                            prompt_tokens=prompt, completion_tokens=completion, cached_tokens=cached
                        )
                    )
                yield msg
        finally:
            await stream.aclose()

    async def Abort(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        try:
            tenant = self._tenant(self._meta(context))
        except APIError as exc:
            await _fail(context, exc)
            return None
        return pb.AbortResponse(aborted=await self.core.abort(tenant, request.request_id))

    async def Tokenize(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        try:
            self._tenant(self._meta(context))
            self.core.check_model(request.model)
            ids = self._prompt(request)
        except APIError as exc:
            await _fail(context, exc)
            return None
        return pb.TokenizeResponse(token_ids=ids, max_model_len=self.core.model.max_model_len)

    async def ListModels(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        try:
            self._tenant(self._meta(context))
        except APIError as exc:
            await _fail(context, exc)
            return None
        m = self.core.model
        return pb.ListModelsResponse(
            models=[pb.ModelCard(id=n, max_model_len=m.max_model_len) for n in m.names]
        )

    async def Health(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        ok, loads = await self.core.health()
        return pb.HealthResponse(ok=ok, ready_workers=[w.worker_id for w in loads if w.ready])


class _Malformed:
    """Request bytes that did not parse (bad wire type, invalid UTF-8 in a string, junk): the
    method answers INVALID_ARGUMENT instead of grpcio's UNKNOWN for a deserializer exception."""

    def __init__(self, error: str) -> None:
        self.error = APIError(400, error, code="invalid_message")


def _lenient(cls: Any) -> Any:
    def parse(raw: bytes) -> Any:
        try:
            return cls.FromString(raw)
        except Exception as exc:  # noqa: BLE001 - DecodeError, UnicodeDecodeError, ...
            return _Malformed(f"the {cls.__name__} message did not parse: {exc}")

    return parse


def _guard_stream(fn: Any) -> Any:
    async def run(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        if isinstance(request, _Malformed):
            await _fail(context, request.error)
            return
        async for msg in fn(request, context):
            yield msg

    return run


def _guard_unary(fn: Any) -> Any:
    async def run(request: Any, context: grpc.aio.ServicerContext) -> Any:
        if isinstance(request, _Malformed):
            await _fail(context, request.error)
            return None
        return await fn(request, context)

    return run


def _add_servicer(servicer: GenerationServicer, server: grpc.aio.Server) -> None:
    """``add_GenerationServicer_to_server`` with lenient request parsing (see ``_Malformed``)."""
    handlers = {
        "Generate": grpc.unary_stream_rpc_method_handler(
            _guard_stream(servicer.Generate),
            request_deserializer=_lenient(pb.GenerateRequest),
            response_serializer=pb.GenerateResponse.SerializeToString,
        )
    }
    for name in ("Abort", "Tokenize", "ListModels", "Health"):
        handlers[name] = grpc.unary_unary_rpc_method_handler(
            _guard_unary(getattr(servicer, name)),
            request_deserializer=_lenient(getattr(pb, f"{name}Request")),
            response_serializer=getattr(pb, f"{name}Response").SerializeToString,
        )
    service = pb.DESCRIPTOR.services_by_name["Generation"].full_name
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service, handlers),))


async def start_grpc_server(core: RouterCore, host: str, port: int) -> tuple[grpc.aio.Server, int]:
    """Start the server on the running loop; returns it and the bound port (``port=0`` picks one)."""
    server = grpc.aio.server(
        options=[
            ("grpc.max_receive_message_length", core.config.server.max_body_bytes),
            ("grpc.so_reuseport", 1),
        ]
    )
    _add_servicer(GenerationServicer(core), server)
    names = (pb.DESCRIPTOR.services_by_name["Generation"].full_name, reflection.SERVICE_NAME)
    reflection.enable_server_reflection(names, server)
    bound = server.add_insecure_port(f"{host}:{port}")
    if bound == 0:
        raise OSError(f"gRPC: could not bind {host}:{port}")
    await server.start()
    log.info("gRPC Generation service on %s:%d (reflection on)", host, bound)
    return server, bound
