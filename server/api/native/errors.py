"""Errors in TGI's shape, ``{"error": str, "error_type": str}``, which LoRAX's and TGI's clients parse.

The status comes from the one table in :mod:`server.api.errors`; ``error_type`` is what the clients
turn into their exception classes (``validation``, ``generation``, ``overloaded``); other statuses are
told apart by the clients from the status code. ``code`` and ``param`` ride along for humans.
"""

from __future__ import annotations

from collections.abc import Callable, Coroutine
from http import HTTPStatus
from typing import Any

from fastapi import Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute
from starlette.exceptions import HTTPException as StarletteHTTPException

from server.api.errors import public_message, status_for, validation_message
from server.engine.types import GenerationFailed

# The OpenAI routes' names for the fields the native routes call otherwise.
_NATIVE_PARAMS = {
    "adapter": "parameters.adapter_id",
    "model": "parameters.adapter_id",
    "prompt": "inputs",
    "messages": "inputs",
}


def error_type(exc: BaseException, status: int) -> str:
    if status == 429:
        return "overloaded"
    if isinstance(exc, GenerationFailed):
        return "generation"
    if status == 400:
        return "validation"
    return {401: "authentication", 403: "permission", 404: "not_found", 504: "timeout"}.get(
        status, "server" if status >= 500 else "request"
    )


def native_param(param: str | None) -> str | None:
    """The native request's name for a field named by the shared conversion path."""
    if param is None:
        return None
    if param.startswith("merged_adapters"):
        return "parameters." + param
    if param.startswith("adapter.merge"):  # a merge part, named in the OpenAI form
        return "parameters.merged_adapters.ids" + param.removeprefix("adapter.merge").split("]")[0] + "]"
    return _NATIVE_PARAMS.get(param, param)


def error_body(exc: BaseException) -> dict:
    status = status_for(exc)
    return {
        "error": public_message(exc),
        "error_type": error_type(exc, status),
        "code": getattr(exc, "code", None),
        "param": native_param(getattr(exc, "param", None)),
    }


def error_response(exc: BaseException) -> JSONResponse:
    return JSONResponse(error_body(exc), status_code=status_for(exc), headers=getattr(exc, "headers", None))


def validation_error_response(exc: RequestValidationError) -> JSONResponse:
    message, param = validation_message(exc)
    body = {"error": message, "error_type": "validation", "code": "invalid_request", "param": param}
    return JSONResponse(body, status_code=400)


def http_error_response(exc: StarletteHTTPException) -> JSONResponse:
    """Starlette's own refusals (a body that cannot be parsed), in TGI's shape with their status."""
    message = str(exc.detail) if exc.detail else HTTPStatus(exc.status_code).phrase
    body = {"error": message, "error_type": error_type(exc, exc.status_code), "code": None, "param": None}
    return JSONResponse(body, status_code=exc.status_code, headers=exc.headers)


class NativeErrorRoute(APIRoute):
    """A route whose errors, its auth and body validation included, are answered in TGI's shape."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def handle(request: Request) -> Response:
            try:
                return await handler(request)
            except RequestValidationError as e:
                return validation_error_response(e)
            except StarletteHTTPException as e:
                return http_error_response(e)
            except Exception as e:  # noqa: BLE001 - every error becomes a TGI-shaped response
                return error_response(e)

        return handle
