"""The chat page at `/`: plain HTML, CSS and JavaScript shipped in this package (no build step, nothing fetched
from elsewhere), built on the server's own OpenAI API. The files are read once and served from memory, with a
Content-Security-Policy that lets the page load and reach nothing but this server.

The page's files need no API key (a browser cannot send one for them); everything the page asks the server
goes through the API, under the key, including /web/settings: the model, its context and the server's limits.
"""

from __future__ import annotations

from importlib import resources
from typing import TYPE_CHECKING

from fastapi import APIRouter
from fastapi.responses import JSONResponse, Response

if TYPE_CHECKING:
    from llavakit.serve.service import Service

# URL path -> (file in this package, media type). The only paths served without the API key, besides /health
# and /metrics (see middleware.GuardMiddleware).
ASSETS = {"/": ("index.html", "text/html; charset=utf-8"),
          "/web/app.js": ("app.js", "text/javascript; charset=utf-8"),
          "/web/style.css": ("style.css", "text/css; charset=utf-8")}
PAGE_PATHS = tuple(ASSETS)
# Same origin only: the page cannot load a script, font or style from a CDN, nor send a picture elsewhere.
# Pictures are shown from the data: and blob: URLs the page makes of the files a user attaches.
CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data: blob:; connect-src 'self'; "
       "base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
HEADERS = {"Content-Security-Policy": CSP, "X-Content-Type-Options": "nosniff", "Cache-Control": "no-cache",
           "Referrer-Policy": "no-referrer"}


def router(service: Service) -> APIRouter:
    """GET routes for the page's files and for /web/settings (hidden from the OpenAPI schema)."""
    r = APIRouter(include_in_schema=False)
    files = resources.files(__package__)
    for path, (name, media_type) in ASSETS.items():
        r.add_api_route(path, _asset(files.joinpath(name).read_bytes(), media_type), methods=["GET"])

    @r.get("/web/settings")
    async def settings() -> JSONResponse:
        """What the page shows and checks before sending: the model, its context and the server's limits."""
        return JSONResponse(page_settings(service))

    return r


def page_settings(service: Service) -> dict:
    cfg = service.cfg
    return {"model": cfg.model_name, "max_model_len": service.max_seq_len,
            "max_images_per_request": cfg.max_images_per_request, "max_body_bytes": cfg.max_body_bytes,
            "max_image_bytes": cfg.fetch.max_bytes, "max_image_pixels": cfg.max_image_pixels,
            # LLaVA-1.5 answers boxes in 0-1 coordinates of the padded square it saw (eval/grounding.py)
            "boxes_on_padded_square": service.processor.cfg.image.mode == "pad"}


def _asset(body: bytes, media_type: str):
    async def asset() -> Response:
        return Response(body, media_type=media_type, headers=HEADERS)
    return asset
