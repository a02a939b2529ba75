"""The one place where exceptions become HTTP responses, in OpenAI's error shape.

Rules, in order:
1. an exception with an ``http_status`` class attribute gets that status;
2. ``LookupError`` subclasses (e.g. ``AdapterNotFound``) → 404;
3. ``ValueError`` subclasses (invalid input, invalid adapters) → 400;
4. anything else → 500 with a generic message (logged with its traceback, never returned).

Domain exceptions may carry ``code`` and ``param`` class attributes; they fill the error body.
"""

from __future__ import annotations

import logging
from http import HTTPStatus

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

logger = logging.getLogger(__name__)


class APIError(Exception):
    """An error raised by the API layer itself with an explicit status."""

    def __init__(
        self, status: int, message: str, code: str | None = None, param: str | None = None, headers=None
    ):
        super().__init__(message)
        self.http_status = status
        self.code = code
        self.param = param
        self.headers = headers


def error_type(status: int) -> str:
    if status == 401:
        return "authentication_error"
    if status == 403:
        return "permission_error"
    if status == 404:
        return "not_found_error"
    if status == 429:
        return "rate_limit_error"
    if status >= 500:
        return "server_error"
    return "invalid_request_error"


def error_body(status: int, message: str, code: str | None = None, param: str | None = None) -> dict:
    return {"error": {"message": message, "type": error_type(status), "param": param, "code": code}}


def status_for(exc: BaseException) -> int:
    status = getattr(exc, "http_status", None)
    if isinstance(status, int):
        return status
    if isinstance(exc, LookupError):
        return 404
    if isinstance(exc, ValueError):
        return 400
    return 500


def error_response(exc: BaseException) -> JSONResponse:
    """The JSON response for any exception (also used for errors inside a stream)."""
    status = status_for(exc)
    if status >= 500 and not hasattr(exc, "http_status"):
        logger.error("internal error: %r", exc, exc_info=exc)
        message = "The server had an error while processing your request."
    else:
        message = str(exc)
    body = error_body(status, message, getattr(exc, "code", None), getattr(exc, "param", None))
    return JSONResponse(body, status_code=status, headers=getattr(exc, "headers", None))


def _validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    errors = exc.errors()
    if not errors:
        return "Invalid request.", None
    first = errors[0]
    loc = [str(p) for p in first.get("loc", ()) if p != "body"]
    param = ".".join(loc) or None
    msg = first.get("msg", "invalid value")
    if first.get("type") == "json_invalid":
        return "The request body is not valid JSON.", None
    if first.get("type") == "extra_forbidden":
        return f"Unrecognized request argument supplied: {param}", param
    msg = msg.removeprefix("Value error, ")
    return (f"{param}: {msg}" if param else msg), param


def install_error_handlers(app: FastAPI) -> None:
    """Registers the exception → HTTP mapping on ``app``."""

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        message, param = _validation_message(exc)
        return JSONResponse(error_body(400, message, "invalid_request", param), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        message = str(exc.detail) if exc.detail else HTTPStatus(exc.status_code).phrase
        return JSONResponse(
            error_body(exc.status_code, message), status_code=exc.status_code, headers=exc.headers
        )

    async def _domain(_: Request, exc: Exception) -> JSONResponse:
        return error_response(exc)

    # Starlette sends handlers registered for ``Exception`` itself through its server-error
    # middleware, which re-raises; the common bases below are handled here and never re-raised.
    for base in (APIError, LookupError, ValueError, RuntimeError, OSError, TypeError, Exception):
        app.add_exception_handler(base, _domain)
