"""Every error the server sends, in OpenAI's shape: {"error": {"message", "type", "param", "code"}}.

Handlers for FastAPI's validation errors, HTTP errors (404, 405) and anything unexpected turn each into
that shape. An unexpected exception becomes a 500 whose message says nothing about it: exception text
and tracebacks go to the server log only.
"""

from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

_MAX_MESSAGE = 500  # validation messages may quote a client's value; keep them short


class APIError(Exception):
    """An error for the client: HTTP status, a message saying what is wrong and what to do, and the
    OpenAI `type`, `param` and `code` fields."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers or {}

    def body(self) -> dict:
        return error_body(self.message, self.type, self.param, self.code)

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def error_body(message: str, type: str, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def bad_request(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, param=param, code=code)


def internal_error() -> APIError:
    return APIError(500, "the server failed to process the request; it has been logged, retry later",
                    type="server_error", code="internal_error")


def overloaded(message: str, retry_after: int) -> APIError:
    return APIError(503, message, type="server_error", code="overloaded", headers={"Retry-After": str(retry_after)})


_STATUS_CODES = {404: ("not_found", "invalid_request_error"), 405: ("method_not_allowed", "invalid_request_error"),
                 401: ("invalid_api_key", "authentication_error")}


def _validation_message(err: RequestValidationError) -> tuple[str, str | None]:
    """One readable problem (the most specific: the deepest location) and the field it concerns."""
    errors = err.errors()
    if any(e.get("type") == "json_invalid" for e in errors):
        return "the request body is not valid JSON; send a JSON object", None
    if not errors:
        return "the request body is not valid", None
    first = max(errors, key=lambda e: len(e.get("loc", ())))
    param = ".".join(_field_path(first.get("loc", ()))) or None
    if param is None and first.get("type") in ("dict_type", "model_attributes_type", "model_type"):
        return "the request body must be a JSON object (Content-Type: application/json)", None
    where = f"{param}: " if param else "the request body: "
    more = f" (and {len(errors) - 1} more problem(s))" if len(errors) > 1 else ""
    return (where + str(first.get("msg", "invalid value")))[:_MAX_MESSAGE] + more, param


def _field_path(loc) -> list[str]:
    """Field names and list indices of a pydantic location, without "body" and the names pydantic gives
    union branches ("str", "list[constrained-str]", "TGIRequest")."""
    branch = {"body", "str", "int", "float", "bool", "list", "dict", "none"}
    return [str(p) for p in loc
            if isinstance(p, int) or (p.isidentifier() and p not in branch and not p[:1].isupper())]


async def _on_api_error(request: Request, exc: APIError) -> JSONResponse:
    return exc.response()


async def _on_validation(request: Request, exc: RequestValidationError) -> JSONResponse:
    message, param = _validation_message(exc)
    return bad_request(message, param, "invalid_request").response()


async def _on_http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    code, type_ = _STATUS_CODES.get(exc.status_code, ("http_error", "invalid_request_error"))
    message = {404: f"no route {request.url.path!r}; see /docs for the API",
               405: f"{request.method} is not allowed on {request.url.path!r}; see /docs for the API"}.get(
        exc.status_code, "the request could not be handled")
    return APIError(exc.status_code, message, type=type_, code=code, headers=exc.headers).response()


async def _on_unexpected(request: Request, exc: Exception) -> JSONResponse:
    # Starlette re-raises the exception after this response, so the server log gets its traceback.
    return internal_error().response()


def install_error_handlers(app: FastAPI) -> None:
    """Route every error the app can raise to an OpenAI-shaped response."""
    app.add_exception_handler(APIError, _on_api_error)
    app.add_exception_handler(RequestValidationError, _on_validation)
    app.add_exception_handler(StarletteHTTPException, _on_http)
    app.add_exception_handler(Exception, _on_unexpected)
