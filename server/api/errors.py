"""The one place where exceptions become HTTP responses, in OpenAI's error shape.

Domain errors know nothing of HTTP: they carry the offending value, an OpenAI-style ``code`` and the
request field at fault (``param``, which only the domain knows: ``adapter.merge[1].weight``). Their
HTTP status is assigned here, by :data:`STATUS_BY_ERROR` (the first matching class wins), then
``LookupError`` → 404 and ``ValueError`` → 400. :class:`APIError` (raised by the API layer itself)
carries its status. Anything else is a 500 with a generic message, logged with its traceback and
never returned.
"""

from __future__ import annotations

import logging
from http import HTTPStatus

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from adapters.errors import AdapterBusy
from adapters.registry import AdapterChanged, AdapterInUse
from rag.errors import CollectionExists, DocumentTooLarge, UnsupportedFileType
from server.api.collections.rag_service import RagUnavailable
from server.api.embeddings.worker import EmbeddingQueueFull, EmbeddingWorkerClosed
from server.engine.structured.row_grammar import GrammarRowFailed
from server.engine.types import EngineUnavailable, GenerationFailed, NonFiniteLogits

logger = logging.getLogger(__name__)

# (domain error, HTTP status): subclasses before their bases.
STATUS_BY_ERROR: tuple[tuple[type[BaseException], int], ...] = (
    (NonFiniteLogits, 500),  # a GenerationFailed, but retrying the same request fails the same way
    (GenerationFailed, 503),
    (EngineUnavailable, 503),
    (AdapterBusy, 503),
    (AdapterChanged, 503),
    (AdapterInUse, 409),
    (EmbeddingQueueFull, 429),
    (EmbeddingWorkerClosed, 503),
    (RagUnavailable, 503),
    (CollectionExists, 409),
    (DocumentTooLarge, 413),
    (UnsupportedFileType, 415),
    (GrammarRowFailed, 500),
    (LookupError, 404),
    (ValueError, 400),
)


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
    """The HTTP status of ``exc`` (500 for anything not known to the table)."""
    if isinstance(exc, APIError):
        return exc.http_status
    return next((status for kind, status in STATUS_BY_ERROR if isinstance(exc, kind)), 500)


def _known(exc: BaseException) -> bool:
    return isinstance(exc, APIError) or any(isinstance(exc, kind) for kind, _ in STATUS_BY_ERROR)


def public_message(exc: BaseException) -> str:
    """What a client may read about ``exc``: its message if it is known, else a generic one (logged)."""
    if not _known(exc):
        logger.error("internal error: %r", exc, exc_info=exc)
        return "The server had an error while processing your request."
    return str(exc)


def error_response(exc: BaseException) -> JSONResponse:
    """The JSON response for any exception (also used for errors inside a stream)."""
    status = status_for(exc)
    body = error_body(status, public_message(exc), getattr(exc, "code", None), getattr(exc, "param", None))
    return JSONResponse(body, status_code=status, headers=getattr(exc, "headers", None))


def validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
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
        message, param = validation_message(exc)
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
