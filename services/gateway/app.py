"""The gateway's HTTP endpoints: OpenAI's API in front of the mesh.

Stack: Starlette on uvicorn (with the httptools parser and the uvloop event loop the other services
already run). Starlette is the well-kept ASGI toolkit FastAPI is built on (vLLM and SGLang serve
through FastAPI + uvicorn); we take it without FastAPI's pydantic layer because the bodies are
checked by hand anyway (unsupported parameters must be clear 400s, see ``openai_api``) and decoded
with msgspec like the wire, which keeps the per-request cost small: the gateway's budget is 1 ms of
added time to first token. uvicorn gives HTTP/1.1 keep-alive, disconnect detection and graceful
shutdown.

Every call goes to the mesh through the Python client's :class:`CallStream` (submission with ack,
resubmission when a scheduler or an engine dies, abort when the stream is closed early), so the
gateway speaks exactly the wire contract the client does. The gateway keeps no state beyond the
live engines' heartbeats, so it scales horizontally like the schedulers.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Coroutine
from typing import Any

import msgspec
import nats.errors
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route

from autellix.proto import CallRequest, ProgramEndReply
from autellix.services.client import CallFailed, CallStream, Client
from autellix.services.logs import get_logger

from .config import GatewayConfig
from .identity import Identity, IdentityError, qualify, resolve
from .live_models import LiveModels
from .metrics import GatewayMetrics
from .openai_api import (
    ApiError,
    ChunkWriter,
    chat_completion,
    decode_body,
    mesh_error,
    parse_chat,
    parse_completion,
    text_completion,
    usage,
)
from .stop_text import StopText
from .tenants import TenantMap, Unauthorized, parse_key_table

CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"
_json = msgspec.json.Encoder().encode


def json_response(body: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(_json(body), status_code=status, media_type="application/json", headers=headers)


async def _pieces(stream: CallStream, stop: StopText) -> AsyncIterator[str]:
    """The call's text with stop strings applied; ends early when one is found."""
    async for text in stream:
        out = stop.feed(text)
        if out:
            yield out
        if stop.done:
            return
    tail = stop.flush()
    if tail:
        yield tail


class Gateway:
    def __init__(self, config: GatewayConfig, client: Client, live: LiveModels, metrics: GatewayMetrics) -> None:
        self.config = config
        self.client = client
        self.live = live
        self.metrics = metrics
        self.tenants = TenantMap(parse_key_table(config.api_keys))
        self.log = get_logger("gateway")
        self._background: set[asyncio.Task[Any]] = set()

    def app(self) -> Starlette:
        return Starlette(
            routes=[
                Route(CHAT, self.chat, methods=["POST"]),
                Route(COMPLETIONS, self.completions, methods=["POST"]),
                Route("/v1/models", self.models, methods=["GET"]),
                Route("/v1/programs/{program_id:path}/end", self.end_program, methods=["POST"]),
                Route("/health", self.health, methods=["GET"]),
                Route("/ready", self.ready, methods=["GET"]),
                Route("/metrics", self.metrics_endpoint, methods=["GET"]),
            ]
        )

    # -- plumbing ---------------------------------------------------------------------------------
    def _spawn(self, coro: Coroutine[Any, Any, Any]) -> None:
        """Work that must outlive a cancelled request (an abort after a disconnect)."""
        task = asyncio.create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def drain(self, timeout_s: float = 5.0) -> None:
        if self._background:
            await asyncio.wait(list(self._background), timeout=timeout_s)

    def _count(self, endpoint: str, status: int) -> None:
        self.metrics.requests.labels(endpoint, str(status)).inc()

    def _error(self, endpoint: str, error: ApiError, headers: dict[str, str] | None = None) -> Response:
        self._count(endpoint, error.status)
        return json_response(error.body(), error.status, headers)

    async def _end(self, program_id: str) -> ProgramEndReply:
        return await self.client.end_program(program_id)

    async def _end_quietly(self, program_id: str) -> None:
        try:
            await self._end(program_id)
        except nats.errors.Error as exc:
            self.log.warning("program end failed", program_id=program_id, error=str(exc) or type(exc).__name__)

    def _tenant(self, request: Request) -> str:
        try:
            return self.tenants.tenant(request.headers.get("authorization"))
        except Unauthorized as exc:
            raise ApiError(401, str(exc), "invalid_api_key") from None

    def _model(self, requested: str) -> str:
        """The served model a request gets. A deployment serving one model answers any name with it
        (agents often hard-code a model name); with several, the name must be one of them."""
        served = self.live.models(time.time())
        if requested in served or not served:
            return requested
        if len(served) == 1:
            return next(iter(served))
        listed = ", ".join(sorted(served))
        raise ApiError(404, f"model {requested!r} is not served; served: {listed}", "model_not_found", param="model")

    # -- completions ------------------------------------------------------------------------------
    async def chat(self, request: Request) -> Response:
        return await self._complete(request, chat=True)

    async def completions(self, request: Request) -> Response:
        return await self._complete(request, chat=False)

    async def _complete(self, request: Request, chat: bool) -> Response:
        endpoint = CHAT if chat else COMPLETIONS
        started = time.perf_counter()
        try:
            tenant = self._tenant(request)
            body = decode_body(await request.body())
            parsed = parse_chat(body, self.config.default_max_tokens) if chat else parse_completion(body)
            model = self._model(parsed.model)
            call_id = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
            ident = resolve(request.headers, body, call_id, tenant)
        except IdentityError as exc:
            return self._error(endpoint, ApiError(400, str(exc), "bad_program_id"))
        except ApiError as exc:
            return self._error(endpoint, exc)
        if ident.one_call:
            self.metrics.one_call_programs.inc()
        call = CallRequest(
            program_id=ident.program_id,
            call_id=call_id,
            messages=parsed.messages,
            prompt=parsed.prompt,
            max_tokens=parsed.max_tokens,
            temperature=parsed.temperature,
            seed=parsed.seed,
            ignore_eos=parsed.ignore_eos,
            parents=ident.parents,
            tenant=tenant,
        )
        stream = CallStream(self.client, call, self.config.call_timeout_s)
        stop = StopText(parsed.stop)
        pieces = _pieces(stream, stop)
        headers = ident.response_headers()
        self.metrics.running.inc()
        # The first text (or the end, or an error) before any header: errors get their own status.
        try:
            first = await anext(pieces, None)
        except CallFailed as exc:
            self.metrics.running.dec()
            await self._after(ident)
            return self._error(endpoint, mesh_error(exc.code, exc.message), headers)
        except BaseException:
            self.metrics.running.dec()
            self._spawn(stream.aclose())
            raise
        if first is not None:
            self.metrics.ttft.observe(time.perf_counter() - started)
        if parsed.stream:
            writer = ChunkWriter(call_id, model, chat, parsed.include_usage)
            events = self._events(endpoint, writer, first, pieces, stream, stop, ident, started)
            return StreamingResponse(events, media_type="text/event-stream", headers=headers)
        try:
            parts = [first] if first else []
            async for piece in pieces:
                parts.append(piece)
            finish_reason, use = await self._outcome(stream, stop)
        except CallFailed as exc:
            return self._error(endpoint, mesh_error(exc.code, exc.message), headers)
        finally:
            self.metrics.running.dec()
            if stream.result is None:
                self._spawn(stream.aclose())
            await self._after(ident)
        shape = chat_completion if chat else text_completion
        self._finished(endpoint, 200, started, use)
        return json_response(shape(call_id, model, "".join(parts), finish_reason, use), headers=headers)

    async def _events(
        self,
        endpoint: str,
        writer: ChunkWriter,
        first: str | None,
        pieces: AsyncIterator[str],
        stream: CallStream,
        stop: StopText,
        ident: Identity,
        started: float,
    ) -> AsyncIterator[bytes]:
        status, use, ended = 200, usage(0, 0), False
        try:
            if first is not None:
                yield writer.text(first)
            async for piece in pieces:
                yield writer.text(piece)
            finish_reason, use = await self._outcome(stream, stop)
            await self._after(ident)
            ended = True
            yield writer.finish(finish_reason, use)
        except CallFailed as exc:
            error = mesh_error(exc.code, exc.message)
            status, ended = error.status, True
            self._spawn(self._after(ident))
            yield writer.error(error)
        finally:
            self.metrics.running.dec()
            if not ended:  # the client went away mid-stream: abort the call on its engine
                status = 499
                self.metrics.aborts.labels("disconnect").inc()
                self._spawn(stream.aclose())
                self._spawn(self._after(ident))
            self._finished(endpoint, status, started, use)

    async def _outcome(self, stream: CallStream, stop: StopText) -> tuple[str, dict[str, int]]:
        """finish_reason and usage of a call whose text has ended."""
        result = stream.result
        if result is None:  # a stop string ended it early: the engine need not go on
            self.metrics.aborts.labels("stop").inc()
            await stream.aclose()
            # the engine's token counts come with its final, which an aborted call never sends
            return "stop", usage(0, len(stream.token_ids))
        reason = "stop" if stop.done else result.finish_reason
        return reason, usage(result.prompt_tokens, result.output_tokens)

    async def _after(self, ident: Identity) -> None:
        """End the program when the request asked (``X-Session-Final``) or it was a one-call program."""
        if ident.final:
            await self._end_quietly(ident.program_id)
        elif ident.one_call:
            self._spawn(self._end_quietly(ident.program_id))

    def _finished(self, endpoint: str, status: int, started: float, use: dict[str, int]) -> None:
        self._count(endpoint, status)
        self.metrics.e2e.labels(endpoint).observe(time.perf_counter() - started)
        self.metrics.prompt_tokens.inc(use["prompt_tokens"])
        self.metrics.generation_tokens.inc(use["completion_tokens"])

    # -- everything else --------------------------------------------------------------------------
    async def models(self, request: Request) -> Response:
        data = [
            {"id": model, "object": "model", "created": int(created), "owned_by": "autellix"}
            for model, created in sorted(self.live.models(time.time()).items())
        ]
        self._count("/v1/models", 200)
        return json_response({"object": "list", "data": data})

    async def end_program(self, request: Request) -> Response:
        endpoint = "/v1/programs/end"
        try:
            program_id = qualify(request.path_params["program_id"], self._tenant(request))
        except ApiError as exc:
            return self._error(endpoint, exc)
        try:
            reply = await self._end(program_id)
        except (nats.errors.TimeoutError, nats.errors.NoRespondersError):
            return self._error(endpoint, ApiError(503, "no program tracker answered", "no_tracker"))
        if not reply.ok:
            return self._error(endpoint, ApiError(404, reply.error or "unknown program", "program_not_found"))
        self._count(endpoint, 200)
        return json_response(reply)

    async def health(self, request: Request) -> Response:
        self._count("/health", 200)
        return json_response({"status": "ok"})

    async def ready(self, request: Request) -> Response:
        engines = self.live.engines(time.time())
        status = 200 if engines and not self.client.nc.is_closed else 503
        self._count("/ready", status)
        return json_response({"ready": status == 200, "engines": engines}, status)

    async def metrics_endpoint(self, request: Request) -> Response:
        return Response(generate_latest(self.metrics.endpoint.registry), media_type=CONTENT_TYPE_LATEST)
