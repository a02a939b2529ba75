"""Request limits before any parsing (body size, header count) and per-key rate limits."""

from __future__ import annotations

import json
import threading
import time
from collections import deque
from collections.abc import Iterable

from server.api.auth import Principal
from server.api.errors import APIError, error_body


class RequestLimitsMiddleware:
    """Pure ASGI middleware: 431 for too many headers, 413 for a body over the limit, before parsing.

    The body limit is enforced on ``Content-Length`` and, for chunked bodies, on the bytes actually
    received. Multipart uploads get their own (larger) limit.
    """

    def __init__(self, app, max_body_bytes: int, max_upload_bytes: int, max_headers: int):
        self.app = app
        self.max_body_bytes = max_body_bytes
        self.max_upload_bytes = max_upload_bytes
        self.max_headers = max_headers

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = scope.get("headers", [])
        if len(headers) > self.max_headers:
            return await _reject(send, 431, f"at most {self.max_headers} request headers are allowed")
        limit, length = body_limit(headers, self.max_body_bytes, self.max_upload_bytes)
        if length is not None and length > limit:
            return await _reject(send, 413, str(body_too_large(limit)))
        received = 0

        async def limited_receive():
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise body_too_large(limit)
            return message

        return await self.app(scope, limited_receive, send)


def body_limit(
    headers: Iterable[tuple[bytes, bytes]], max_body_bytes: int, max_upload_bytes: int
) -> tuple[int, int | None]:
    """The body limit of a request with these (raw) headers, and its declared ``Content-Length``.

    Multipart uploads get ``max_upload_bytes``, every other body ``max_body_bytes``.
    """
    content_type, length = b"", None
    for name, value in headers:
        name = name.lower()
        if name == b"content-type":
            content_type = value
        elif name == b"content-length":
            length = int(value) if value.isdigit() else None
    return (max_upload_bytes if content_type.startswith(b"multipart/") else max_body_bytes), length


def body_too_large(limit: int) -> APIError:
    return APIError(413, f"the request body exceeds the limit of {limit} bytes", code="body_too_large")


async def _reject(send, status: int, message: str) -> None:
    code = "body_too_large" if status == 413 else "too_many_headers"
    body = json.dumps(error_body(status, message, code)).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())],
        }
    )
    await send({"type": "http.response.body", "body": body})


class RateLimiter:
    """Per-key sliding one-minute windows of requests and tokens (prompt + max_tokens, at admission)."""

    WINDOW_SECONDS = 60.0

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._requests: dict[str, deque[float]] = {}
        self._tokens: dict[str, deque[tuple[float, int]]] = {}

    def admit(self, principal: Principal, tokens: int) -> None:
        """Counts one request of ``tokens`` tokens, or raises a 429 with ``Retry-After``."""
        rpm, tpm = principal.requests_per_minute, principal.tokens_per_minute
        if rpm is None and tpm is None:
            return
        now = time.monotonic()
        with self._lock:
            requests = self._requests.setdefault(principal.name, deque())
            spent = self._tokens.setdefault(principal.name, deque())
            while requests and now - requests[0] >= self.WINDOW_SECONDS:
                requests.popleft()
            while spent and now - spent[0][0] >= self.WINDOW_SECONDS:
                spent.popleft()
            if rpm is not None and len(requests) >= rpm:
                raise _too_many(requests[0] + self.WINDOW_SECONDS - now, f"{rpm} requests per minute")
            used = sum(n for _, n in spent)
            if tpm is not None and used + tokens > tpm:
                if tokens > tpm:  # can never fit: a deterministic client error, not a retryable 429
                    raise APIError(
                        400,
                        f"the request needs {tokens} tokens, over this key's {tpm} per minute",
                        code="request_too_large_for_rate_limit",
                        param="max_tokens",
                    )
                retry = spent[0][0] + self.WINDOW_SECONDS - now if spent else 1.0
                raise _too_many(retry, f"{tpm} tokens per minute")
            requests.append(now)
            spent.append((now, tokens))


def _too_many(retry_seconds: float, what: str) -> APIError:
    retry = max(1, int(retry_seconds + 0.999))
    return APIError(
        429,
        f"Rate limit of {what} reached; retry in {retry} s.",
        code="rate_limit_exceeded",
        headers={"Retry-After": str(retry)},
    )
