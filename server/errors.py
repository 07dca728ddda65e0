"""Error envelopes and the exception handlers that produce them.

Every error body is OpenAI's ``{"error": {"message", "type", "param", "code"}}``,
except on the Anthropic routes (``/v1/messages...``), which answer Anthropic's
``{"type": "error", "error": {"type", "message"}}`` (a validation error is a
400 there and "not ready" a 529 ``overloaded_error``, as Anthropic clients expect).
"""

from __future__ import annotations

import json
import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

logger = logging.getLogger("tiercache.server")

_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    422: "invalid_request_error",
    429: "rate_limit_error",
    499: "client_closed_request",
    500: "server_error",
    503: "service_unavailable",
}


class APIError(Exception):
    """An error answered with the OpenAI envelope.

    Args:
        status: HTTP status code.
        message: Human-readable explanation.
        param: The request field at fault, if any.
        code: Short machine-readable code.
    """

    def __init__(self, status: int, message: str, param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code


class ClientGone(Exception):
    """The client disconnected before its response was ready (logged as 499)."""


def envelope(status: int, message: str, param: str | None = None,
             code: str | None = None) -> dict:
    """Build the error body for ``status``."""
    return {
        "error": {
            "message": message,
            "type": _TYPES.get(status, "invalid_request_error" if status < 500 else "server_error"),
            "param": param,
            "code": code,
        }
    }


def error_response(status: int, message: str, param: str | None = None,
                   code: str | None = None, headers: dict | None = None) -> JSONResponse:
    """Return a :class:`JSONResponse` carrying the envelope."""
    return JSONResponse(envelope(status, message, param, code), status_code=status,
                        headers=headers)


def is_anthropic_path(path: str) -> bool:
    """Whether ``path`` is an Anthropic Messages API route."""
    return path == "/v1/messages" or path.startswith("/v1/messages/")


def error_for_path(path: str, status: int, message: str, param: str | None = None,
                   code: str | None = None, headers: dict | None = None) -> JSONResponse:
    """Return the error response in the shape of the API ``path`` belongs to."""
    if not is_anthropic_path(path):
        return error_response(status, message, param, code, headers)
    from .anthropic.responses import error_body

    status = {422: 400, 503: 529}.get(status, status)
    return JSONResponse(error_body(status, message), status_code=status, headers=headers)


def sse_error(message: str, status: int = 500) -> str:
    """Return an SSE ``data:`` line with an error envelope."""
    return f"data: {json.dumps(envelope(status, message))}\n\n"


def _loc_param(loc) -> str | None:
    parts = [str(p) for p in loc if p != "body"]
    return ".".join(parts) if parts else None


def install_handlers(app: FastAPI) -> None:
    """Register the envelope handlers on ``app``."""

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError):
        headers = {"WWW-Authenticate": "Bearer"} if exc.status == 401 else None
        return error_for_path(request.url.path, exc.status, exc.message, exc.param,
                              exc.code, headers)

    @app.exception_handler(ClientGone)
    async def _client_gone(request: Request, exc: ClientGone):
        # Nobody reads this; it only gives the request a status for the metrics.
        return error_response(499, "the client closed the request", None, "client_closed")

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError):
        path = request.url.path
        errors = exc.errors()
        for err in errors:
            if err.get("type") == "json_invalid":
                return error_for_path(path, 400, "the request body is not valid JSON",
                                      None, "invalid_json")
        if not errors:
            return error_for_path(path, 422, "invalid request")
        err = errors[0]
        param = _loc_param(err.get("loc", ()))
        if err.get("type") == "missing" and param is None:
            return error_for_path(path, 400, "the request body is missing", None,
                                  "missing_body")
        msg = err.get("msg", "invalid value")
        text = f"{param}: {msg}" if param else msg
        if len(errors) > 1:
            text += f" (and {len(errors) - 1} more problem{'s' if len(errors) > 2 else ''})"
        return error_for_path(path, 422, text, param, err.get("type"))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException):
        status = exc.status_code
        if status == 404:
            message = f"no such endpoint: {request.method} {request.url.path}"
        elif status == 405:
            message = f"method {request.method} not allowed on {request.url.path}"
        else:
            message = str(exc.detail)
        return error_for_path(request.url.path, status, message, None, None,
                              getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception):
        logger.exception("unhandled error on %s", request.url.path)
        return error_for_path(request.url.path, 500,
                              f"internal error: {type(exc).__name__}: {exc}")
