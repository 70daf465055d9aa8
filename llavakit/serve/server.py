"""Running the app under uvicorn: a graceful SIGTERM (stop accepting; new requests get 503, in-flight ones
finish for up to `shutdown_timeout` seconds, then exit), and connections guarded against hostile clients:
a deadline for request headers, an idle timeout between requests, a cap on open connections derived from
the descriptor limit, and OpenAI-shaped JSON for the errors uvicorn would otherwise answer in plain text."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import resource
import socket
import sys
from collections import OrderedDict
from functools import partial
from http import HTTPStatus
from types import FrameType

import h11
import uvicorn
from uvicorn.logging import DefaultFormatter
from uvicorn.protocols.http.h11_impl import H11Protocol

from llavakit.serve.app import build_app
from llavakit.serve.config import ServeConfig
from llavakit.serve.errors import error_body
from llavakit.serve.service import Service

MAX_CONNECTIONS = 8192  # the derived cap's ceiling: each half-open connection may buffer max_header_bytes
LINGER_S = 1.0  # after an error reply, what the client still sends is read and dropped this long (see _reply)
TLS_HANDSHAKE = b"\x16\x03"  # how every TLS connection starts: a handshake record, version 3.x
logger = logging.getLogger("uvicorn.error")  # where uvicorn logs its own connection troubles


class DrainingServer(uvicorn.Server):
    """uvicorn's server, telling the service to refuse new work the moment a signal arrives (uvicorn
    itself only notices on its next tick)."""

    def __init__(self, config: uvicorn.Config, service: Service):
        super().__init__(config)
        self.service = service

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        self.service.start_draining()
        super().handle_exit(sig, frame)


class ConnectionGuard:
    """What one server's connections share: the limits, and the connections waiting for a request (idle
    or still sending headers), oldest first: the ones closed to make room for a new connection."""

    def __init__(self, cfg: ServeConfig, max_connections: int):
        self.cfg, self.max_connections = cfg, max_connections
        self.waiting: OrderedDict[GuardedH11Protocol, None] = OrderedDict()

    def make_room(self) -> bool:
        """Close the connection that has waited longest for a request; False if every one is busy."""
        if not self.waiting:
            return False
        oldest, _ = self.waiting.popitem(last=False)
        oldest.transport.close()
        return True


class GuardedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol under a ConnectionGuard. The header deadline runs from the connection's
    start, and from the first byte of each later request (uvicorn's keep-alive timer, the idle timeout,
    stops at that byte, so a client sending headers slowly would otherwise be waited for forever)."""

    def __init__(self, *args, guard: ConnectionGuard, **kwargs):
        super().__init__(*args, **kwargs)
        self.guard = guard
        self.header_timer: asyncio.TimerHandle | None = None
        self.first_bytes = True
        self.lingering = False

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        if len(self.connections) > self.guard.max_connections and not self.guard.make_room():
            logger.warning("%d connections are open and all busy; closing a new one", len(self.connections) - 1)
            transport.close()
            return
        self.guard.waiting[self] = None
        self._start_header_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        self.guard.waiting.pop(self, None)
        self._stop_header_timer()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self.lingering:
            return
        waiting = self in self.guard.waiting
        if waiting and self.header_timer is None:  # the first byte of a request on a kept-alive connection
            self._start_header_timer()
        if self.first_bytes and data.startswith(TLS_HANDSHAKE):
            return self._reply(400, "this port speaks plain HTTP, not TLS; use an http:// URL", "invalid_request")
        self.first_bytes = False
        super().data_received(data)
        if waiting and self.conn.their_state is not h11.IDLE:  # the request's headers are in (or it failed)
            self.guard.waiting.pop(self, None)
            self._stop_header_timer()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing() and self.conn.their_state is h11.IDLE:
            self.guard.waiting[self] = None  # idle now; uvicorn's keep-alive timer closes it after idle_timeout

    def send_400_response(self, msg: str) -> None:
        """uvicorn's answer to bytes h11 cannot parse (plain text there); called in its `except` clause."""
        status = getattr(sys.exc_info()[1], "error_status_hint", 400)
        limit = self.guard.cfg.max_header_bytes
        if status == 431 and b"\n" not in self.conn.trailing_data[0][:limit]:
            self._reply(414, f"the URL is over the {limit}-byte limit of a request line; send a shorter URL",
                        "uri_too_long")
        elif status == 431:
            self._reply(431, f"the request line and headers are over the {limit}-byte limit; send fewer or "
                             "smaller headers", "request_header_too_large")
        elif status == 501:
            self._reply(501, "the request's Transfer-Encoding is not supported; send a Content-Length or a "
                             "chunked body", "invalid_request")
        else:
            self._reply(400, "the request is not valid HTTP/1.1 (its request line, a header, or Content-Length); "
                             "send a well-formed request", "invalid_request")

    def _start_header_timer(self) -> None:
        self.header_timer = self.loop.call_later(self.guard.cfg.header_timeout, self._on_header_timeout)

    def _stop_header_timer(self) -> None:
        if self.header_timer is not None:
            self.header_timer.cancel()
            self.header_timer = None

    def _on_header_timeout(self) -> None:
        self.header_timer = None
        self._reply(408, f"the request headers did not arrive within {self.guard.cfg.header_timeout:g} s; "
                         "send each request at once", "request_timeout")

    def _reply(self, status: int, message: str, code: str) -> None:
        """Send an OpenAI-shaped error and close. Until the close, LINGER_S later, what the client still
        sends is dropped: closing with unread bytes would reset the connection and lose the reply."""
        if self.transport.is_closing() or self.lingering:
            return
        cycle = self.cycle
        if cycle is not None and not cycle.response_complete:  # the body of a request in progress failed
            if cycle.response_started:
                self.transport.close()
                return
            cycle.disconnected = True  # the app sees the client gone, and sends nothing
            cycle.message_event.set()
        body = json.dumps(error_body(message, "invalid_request_error", None, code), separators=(",", ":")).encode()
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                   (b"connection", b"close")]
        try:
            reply = self.conn.send(h11.Response(status_code=status, headers=headers,
                                                reason=HTTPStatus(status).phrase.encode()))
            reply += self.conn.send(h11.Data(data=body)) + self.conn.send(h11.EndOfMessage())
        except h11.LocalProtocolError:  # another reply is under way
            self.transport.close()
            return
        self.transport.write(reply)
        self.lingering = True
        self.flow.resume_reading()
        if self.transport.can_write_eof():
            self.transport.write_eof()
        self.loop.call_later(LINGER_S, self.transport.close)


def raise_descriptor_limit() -> int:
    """Raise this process's soft limit on open files to its hard limit; returns the soft limit now."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError):
            pass  # (a container may forbid it) the soft limit stays, and the cap follows it
    return soft


def connection_limits(cfg: ServeConfig) -> tuple[int, int]:
    """(max_connections, listen backlog). Of the descriptors free at start, at most 3/4 go to connections
    and 1/8 to the accept backlog (asyncio accepts a backlog's worth before any of them can be closed to
    make room); the last 1/8 stays for image fetches, files and the engine."""
    free = raise_descriptor_limit() - _open_descriptors()
    cap = max(1, min(MAX_CONNECTIONS, free * 3 // 4))
    if cfg.max_connections is not None and cfg.max_connections > cap:
        logger.warning("max_connections %d is more than the %d this process's descriptor limit allows (ulimit -n); "
                    "using %d", cfg.max_connections, cap, cap)
    return min(cfg.max_connections or cap, cap), max(16, min(2048, free // 8))


def _open_descriptors() -> int:
    try:
        return len(os.listdir("/proc/self/fd"))
    except OSError:  # not Linux: a generous guess at what the model, its threads and the logs hold
        return 128


def make_server(service: Service, log_level: str = "info") -> DrainingServer:
    cfg = service.cfg
    max_connections, backlog = connection_limits(cfg)
    protocol = partial(GuardedH11Protocol, guard=ConnectionGuard(cfg, max_connections))
    config = uvicorn.Config(build_app(service), host=cfg.host, port=cfg.port, log_level=log_level,
                            http=protocol, ws="none", h11_max_incomplete_event_size=cfg.max_header_bytes,
                            timeout_keep_alive=cfg.idle_timeout, backlog=backlog,
                            timeout_graceful_shutdown=cfg.shutdown_timeout, server_header=False,
                            access_log=False)  # the request log below has one line per request, with more in it
    _log_requests(log_level)
    return DrainingServer(config, service)


def _log_requests(log_level: str) -> None:
    """The request log (one line per request, see RequestLogMiddleware) on stderr, formatted as uvicorn's own
    lines, at `log_level`: info shows API requests, debug also /health and /metrics, warning none."""
    log = logging.getLogger("llavakit.serve.requests")
    log.setLevel(log_level.upper())
    if not any(isinstance(h, _StderrHandler) for h in log.handlers):
        handler = _StderrHandler()
        handler.setFormatter(DefaultFormatter("%(levelprefix)s %(message)s"))
        log.addHandler(handler)
        log.propagate = False  # a root logger configured elsewhere would print each line twice


class _StderrHandler(logging.StreamHandler):
    """A StreamHandler writing to whatever sys.stderr is at each record (tests and embedding tools swap it)."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:
        pass


def listen_socket(host: str, port: int) -> socket.socket:
    """A TCP socket bound to (host, port) as uvicorn binds one (SO_REUSEADDR; IPv6 when the host has a ':'),
    for `serve(sock=...)`: binding before the model loads makes a taken port fail in a second, not minutes."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
    except BaseException:
        sock.close()
        raise
    return sock


def serve(service: Service, log_level: str = "info", sock: socket.socket | None = None) -> None:
    """Serve until SIGINT/SIGTERM (blocking). `sock`: an already bound socket (listen_socket; tests pick a
    free port)."""
    make_server(service, log_level).run(sockets=[sock] if sock is not None else None)
