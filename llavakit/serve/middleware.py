"""Checks that run before any route: the API key, and the request body's size and arrival time.

Plain ASGI rather than FastAPI dependencies, so that a refused request is answered before its body is
read: an oversized upload is cut off at the limit instead of being parsed, a client that sends its body
slowly gets a 408 instead of holding a connection forever, and the bodies held at once, all requests
together, stay under a budget (more get 503), so that many large uploads at once cannot exhaust memory.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import secrets
import time
import uuid
from dataclasses import dataclass

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from llavakit.serve.config import ServeConfig
from llavakit.serve.errors import APIError, overloaded

PUBLIC_PATHS = ("/health", "/metrics")  # monitoring works without the API key
request_log = logging.getLogger("llavakit.serve.requests")


@dataclass(slots=True)
class RequestRecord:
    """What the request log line reports of one HTTP request; the service adds the tokens it counts."""

    id: str
    prompt_tokens: int = 0
    completion_tokens: int = 0


# The record of the request being handled: set by RequestLogMiddleware, read by Service.generate (tasks the
# request spawns, such as a streaming body, copy the context and so share the record).
current_request: contextvars.ContextVar[RequestRecord | None] = contextvars.ContextVar("llavakit_request",
                                                                                      default=None)


class RequestLogMiddleware:
    """One log line per HTTP request (request id, method and route, status, tokens, latency) on the
    "llavakit.serve.requests" logger, and the id in an X-Request-Id response header. /health and /metrics
    are logged at DEBUG, so that probes and scrapes do not drown the log."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        record = RequestRecord(f"req-{uuid.uuid4().hex[:12]}")
        token = current_request.set(record)
        start, status = time.perf_counter(), ["-"]  # "-": no response was sent (the client left first)

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
                message = {**message, "headers": [*message.get("headers", []),
                                                  (b"x-request-id", record.id.encode())]}
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            current_request.reset(token)
            level = logging.DEBUG if scope["path"] in PUBLIC_PATHS else logging.INFO
            request_log.log(level, "%s %s %s %s prompt_tokens=%d completion_tokens=%d %.1f ms", record.id,
                            scope["method"], scope["path"][:200], status[0], record.prompt_tokens,
                            record.completion_tokens, (time.perf_counter() - start) * 1e3)


class GuardMiddleware:
    """API key check, then the body read whole under the size cap, the body timeout and the budget of
    bodies held at once; a body counts against the budget until its request's response has been sent."""

    def __init__(self, app: ASGIApp, cfg: ServeConfig, keyless: tuple[str, ...] = PUBLIC_PATHS):
        """`keyless`: exact paths served without the API key (monitoring; the chat page's files, which ask for
        the key themselves)."""
        self.app, self.cfg, self.keyless = app, cfg, keyless
        self.buffered = 0  # bytes of request bodies held now (one event loop: no lock)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        held = [0]  # this request's share of self.buffered
        try:
            try:
                self._check_key(scope)
                self._check_length(scope)
                body = await self._read_body(receive, held)
            except APIError as e:
                return await e.response()(scope, receive, send)
            if body is None:  # the client left while sending
                return
            await self.app(scope, _replay(body, receive), send)
        finally:
            self.buffered -= held[0]

    def _check_key(self, scope: Scope) -> None:
        if self.cfg.api_key is None or scope["path"] in self.keyless:
            return
        auth = dict(scope["headers"]).get(b"authorization", b"").decode("latin-1")
        scheme, _, token = auth.partition(" ")
        if scheme.lower() != "bearer" or not secrets.compare_digest(token.strip().encode(), self.cfg.api_key.encode()):
            message = ("the API key is missing: send the header 'Authorization: Bearer <key>'" if not auth
                       else "the API key is not valid; check the key the server was started with")
            raise APIError(401, message, code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})

    def _check_length(self, scope: Scope) -> None:
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.cfg.max_body_bytes):
            raise self._too_large()

    async def _read_body(self, receive: Receive, held: list[int]) -> bytes | None:
        chunks, size = [], 0
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.cfg.body_timeout
        while True:
            try:
                message = await asyncio.wait_for(receive(), max(deadline - loop.time(), 0))
            except asyncio.TimeoutError:
                raise APIError(408, f"the request body took longer than {self.cfg.body_timeout:g} s to arrive; "
                                    "send it at once", code="request_timeout") from None
            if message["type"] == "http.disconnect":
                return None
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.cfg.max_body_bytes:
                raise self._too_large()
            if self.buffered + len(chunk) > self.cfg.max_buffered_body_bytes:
                raise overloaded(f"the server is receiving too many large requests at once (over "
                                 f"{self.cfg.max_buffered_body_bytes // 2**20} MiB of bodies); retry after "
                                 f"{self.cfg.retry_after} s", self.cfg.retry_after)
            self.buffered += len(chunk)
            held[0] += len(chunk)
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks)

    def _too_large(self) -> APIError:
        return APIError(413, f"the request body is over the {self.cfg.max_body_bytes}-byte limit; send smaller "
                             "or fewer images", code="request_too_large")


def _replay(body: bytes, receive: Receive) -> Receive:
    """A receive that yields the buffered body once, then the connection's own messages (disconnect)."""
    pending = [{"type": "http.request", "body": body, "more_body": False}]

    async def replayed() -> Message:
        return pending.pop() if pending else await receive()

    return replayed
