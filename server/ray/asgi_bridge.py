"""Runs one forwarded HTTP request through an ASGI app in this process, streaming the response back.

The ingress sends a :class:`ForwardedRequest` (plain data, so Ray can ship it); the engine replica
drives the app built by ``server/app.py`` with it and yields the response start, then body chunks,
as they are produced (SSE streams pass through unbuffered). Closing the generator early (the client
went away, Ray cancelled the call) tells the app ``http.disconnect``, which cancels the generation
and frees its slot, exactly as uvicorn does under ``loraplex serve``.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

ASGIApp = Any  # (scope, receive, send) -> awaitable


@dataclass(frozen=True)
class ForwardedRequest:
    """An HTTP request as the ingress received it."""

    method: str
    path: str
    query_string: bytes = b""
    headers: tuple[tuple[bytes, bytes], ...] = ()
    body: bytes = b""
    client: tuple[str, int] | None = None


@dataclass(frozen=True)
class ResponseStart:
    """The status line and headers of a response (its body follows as ``bytes`` chunks)."""

    status: int
    headers: tuple[tuple[bytes, bytes], ...] = field(default_factory=tuple)


def _scope(request: ForwardedRequest) -> dict:
    return {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.3"},
        "http_version": "1.1",
        "method": request.method,
        "scheme": "http",
        "path": request.path,
        "raw_path": request.path.encode("utf-8"),
        "root_path": "",
        "query_string": request.query_string,
        "headers": list(request.headers),
        "client": request.client,
        "server": None,
        "state": {},
    }


async def call_app(
    app: ASGIApp, request: ForwardedRequest, extra_headers: tuple[tuple[bytes, bytes], ...] = ()
) -> AsyncIterator[ResponseStart | bytes]:
    """Yields the app's response to ``request``: one :class:`ResponseStart`, then body chunks.

    Args:
        app: the ASGI app (its lifespan already entered).
        request: the forwarded request.
        extra_headers: added to the response's headers (the replica id).
    """
    messages: asyncio.Queue[dict | None] = asyncio.Queue()
    disconnected = asyncio.Event()
    body_sent = False

    async def receive() -> dict:
        nonlocal body_sent
        if not body_sent:
            body_sent = True
            return {"type": "http.request", "body": request.body, "more_body": False}
        await disconnected.wait()
        return {"type": "http.disconnect"}

    async def send(message: dict) -> None:
        if disconnected.is_set():
            raise OSError("client disconnected")  # what a server does when the socket is gone
        await messages.put(message)

    async def run() -> None:
        try:
            await app(_scope(request), receive, send)
        finally:
            await messages.put(None)

    task = asyncio.create_task(run())
    try:
        while (message := await messages.get()) is not None:
            if message["type"] == "http.response.start":
                headers = tuple((bytes(k), bytes(v)) for k, v in message.get("headers", ()))
                yield ResponseStart(message["status"], headers + extra_headers)
            elif message["type"] == "http.response.body":
                if message.get("body"):
                    yield bytes(message["body"])
                if not message.get("more_body", False):
                    break
        await task  # re-raises an exception the app let out
    finally:
        disconnected.set()
        if not task.done():
            # Give the app a moment to see the disconnect and cancel its generation, then stop it.
            with contextlib.suppress(asyncio.TimeoutError, asyncio.CancelledError, OSError):
                await asyncio.wait_for(asyncio.shield(task), timeout=5.0)
            task.cancel()
