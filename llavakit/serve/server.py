"""Running the app under uvicorn with a graceful SIGTERM: stop accepting (the listening socket closes and
new requests get 503), let in-flight requests finish for up to `shutdown_timeout` seconds, then exit."""

from __future__ import annotations

import logging
import socket
import sys
from types import FrameType

import uvicorn
from uvicorn.logging import DefaultFormatter

from llavakit.serve.app import build_app
from llavakit.serve.service import Service


class DrainingServer(uvicorn.Server):
    """uvicorn's server, telling the service to refuse new work the moment a signal arrives (uvicorn
    itself only notices on its next tick)."""

    def __init__(self, config: uvicorn.Config, service: Service):
        super().__init__(config)
        self.service = service

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        self.service.start_draining()
        super().handle_exit(sig, frame)


def make_server(service: Service, log_level: str = "info") -> DrainingServer:
    cfg = service.cfg
    config = uvicorn.Config(build_app(service), host=cfg.host, port=cfg.port, log_level=log_level,
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
