"""Running the app under uvicorn with a graceful SIGTERM: stop accepting (the listening socket closes and
new requests get 503), let in-flight requests finish for up to `shutdown_timeout` seconds, then exit."""

from __future__ import annotations

import socket
from types import FrameType

import uvicorn

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
                            access_log=log_level == "debug")
    return DrainingServer(config, service)


def serve(service: Service, log_level: str = "info", sock: socket.socket | None = None) -> None:
    """Serve until SIGINT/SIGTERM (blocking). `sock`: an already bound socket (tests pick a free port)."""
    make_server(service, log_level).run(sockets=[sock] if sock is not None else None)
