"""The FastAPI app: the OpenAI, TGI, vLLM and Triton routes on one Service, /health and /metrics, the chat
page at / (unless cfg.web is off), the guard middleware (API key, body limits) and OpenAI-shaped errors for
everything that can go wrong."""

from __future__ import annotations

from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST

import llavakit
from llavakit.serve import openai_api, tgi_api, triton_api, web
from llavakit.serve.errors import install_error_handlers
from llavakit.serve.middleware import PUBLIC_PATHS, GuardMiddleware, RequestLogMiddleware
from llavakit.serve.service import ClientDisconnected, Service

CLIENT_CLOSED = 499  # nginx's code for "the client went away"; nobody reads it, the log does


def build_app(service: Service) -> FastAPI:
    """An app serving `service`; the service is closed (engine thread stopped) when the app shuts down."""
    @asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        service.close()

    app = FastAPI(title="llavakit", version=llavakit.__version__, lifespan=lifespan,
                  description="OpenAI-compatible chat and completions for LLaVA models, plus the TGI, vLLM "
                              "and Triton generate formats. Errors: {\"error\": {message, type, param, code}}.")
    app.state.service = service
    install_error_handlers(app)
    app.add_exception_handler(ClientDisconnected, _on_disconnect)
    keyless = PUBLIC_PATHS + (web.PAGE_PATHS if service.cfg.web else ())
    app.add_middleware(GuardMiddleware, cfg=service.cfg, keyless=keyless)
    app.add_middleware(RequestLogMiddleware)  # outermost: refusals by the guard are logged too
    for module in (openai_api, tgi_api, triton_api):
        app.include_router(module.router)
    if service.cfg.web:
        app.include_router(web.router(service))

    @app.get("/health")
    async def health() -> JSONResponse:
        """200 while serving; 503 once shutting down, so a load balancer stops sending requests."""
        if service.draining:
            return JSONResponse({"status": "shutting_down"}, status_code=503)
        return JSONResponse({"status": "ok"})

    @app.get("/metrics")
    async def metrics() -> Response:
        """Prometheus text format: queue, batch, KV-cache usage, tokens/s, TTFT and latency histograms."""
        return Response(service.metrics.render(), media_type=CONTENT_TYPE_LATEST)

    return app


async def _on_disconnect(request: Request, exc: ClientDisconnected) -> Response:
    return Response(status_code=CLIENT_CLOSED)
