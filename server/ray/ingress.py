"""The ingress deployment: answers ``/health`` and ``/ready``, forwards everything else to an engine
replica with the request's adapter as the multiplexed model id, and passes the response (SSE
included) straight back. It holds no model and no app; after a store change it has every replica
drop its stale copy (Ray Serve's ``broadcast``) before answering."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from adapters.store import AdapterStore
from server.api.errors import APIError, error_response
from server.api.limits import body_limit, body_too_large
from server.config import Settings
from server.ray.asgi_bridge import ForwardedRequest, ResponseStart
from server.ray.placement import PlacementGate
from server.ray.rag_replica import RAG_DEPLOYMENT
from server.ray.replica import REPLICA_HEADER
from server.ray.routing import admin_action, multiplexed_model_id

logger = logging.getLogger(__name__)

READY_PROBE_SECONDS = 5.0
BROADCAST_SECONDS = 60.0  # a store change waits this long for every replica to drop its copy


def _unavailable(message: str, replica: str) -> JSONResponse:
    body = {"error": {"message": message, "type": "server_error", "param": None, "code": "unavailable"}}
    return JSONResponse(body, status_code=503, headers={REPLICA_HEADER.decode(): replica})


class Ingress:
    """The body of the ingress deployment (``server.ray.app`` wraps it in ``serve.deployment``)."""

    def __init__(self, engine: Any, settings: Settings, app_name: str, replicas: int):
        from ray import serve

        self.engine = engine
        self.placement = PlacementGate()
        self.store = AdapterStore(settings.adapter_dir)
        self.max_merge_parts = settings.max_merge_parts
        self.max_body_bytes = settings.max_body_bytes
        self.max_upload_bytes = settings.max_upload_bytes
        self.app_name = app_name
        self.replicas = replicas
        self.replica_id = "ingress-" + serve.get_replica_context().replica_id.unique_id

    async def __call__(self, request: Request) -> Response:
        path = request.url.path
        if request.method == "GET" and path == "/health":
            return JSONResponse({"status": "ok"}, headers={REPLICA_HEADER.decode(): self.replica_id})
        if request.method == "GET" and path == "/ready":
            try:
                return await self._ready()
            except Exception as e:  # the controller or a replica unreachable: not ready
                logger.warning("readiness probe failed: %r", e)
                return _unavailable("not ready", self.replica_id)
        try:
            body = await self._body(request)
        except APIError as e:  # over the limit: refused here, before it is shipped to a replica
            response = error_response(e)
            response.headers[REPLICA_HEADER.decode()] = self.replica_id
            return response
        forwarded = ForwardedRequest(
            method=request.method,
            path=path,
            query_string=request.url.query.encode("latin-1"),
            headers=tuple(request.headers.raw),
            body=body,
            client=(request.client.host, request.client.port) if request.client else None,
        )
        action = admin_action(request.method, path, body)
        model_id = multiplexed_model_id(request.method, path, body, self.store, self.max_merge_parts)
        retry = action is None  # store writes are never sent twice
        for attempt in (1, 2):
            started = False
            try:
                start, chunks = await self._start(forwarded, model_id, retry=retry)
                started = True
                if _streamed(start) and (action is None or action.change is None):
                    break
                # A whole (JSON) response is gathered before it is answered: a replica that dies
                # mid-body then costs one more try or a clean 503, never a truncated body.
                content = b"".join([chunk async for chunk in chunks])
            except Exception as e:  # the replica died or was unreachable before answering whole
                logger.warning("request %s %s failed before a whole response: %r", request.method, path, e)
                if retry and started and attempt == 1:
                    continue  # _start already retried a death before the response start
                return _unavailable("No engine replica could serve the request; retry.", self.replica_id)
            return await self._answer(action, start, content)
        return _response(StreamingResponse(_guarded(chunks), start.status), start)

    async def _answer(self, action: Any, start: ResponseStart, content: bytes) -> Response:
        """A gathered response; after a successful store change, once every replica dropped its copy."""
        if action is not None and action.change is not None and 200 <= start.status < 300:
            # A replica that died meanwhile holds no copy; its replacement starts with an empty registry.
            replicas = await self.engine.broadcast(
                "apply_store_change", action.change, action.name
            ).results_async(timeout_s=BROADCAST_SECONDS, return_exceptions=True)
            logger.info("%s %s applied on replicas %s", action.change, action.name, replicas)
        return _response(Response(content, start.status), start)

    async def _body(self, request: Request) -> bytes:
        """The request's body, read only up to the replica's own limit (``--max-body-bytes``, or
        ``--max-upload-bytes`` for multipart), so an oversized upload is never buffered whole."""
        limit, length = body_limit(request.headers.raw, self.max_body_bytes, self.max_upload_bytes)
        if length is not None and length > limit:
            raise body_too_large(limit)
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > limit:
                raise body_too_large(limit)
        return bytes(body)

    async def _start(
        self, forwarded: ForwardedRequest, model_id: str, retry: bool
    ) -> tuple[ResponseStart, Any]:
        """Sends the request to a replica and waits for its response start. A request whose replica
        died before answering is sent once more (a new replica is picked); store writes are not."""
        from ray.exceptions import RayActorError

        handle = self.engine.options(stream=True, multiplexed_model_id=model_id)
        for attempt in (1, 2):
            async with self.placement.first_of(handle, model_id):
                chunks = handle.forward.remote(forwarded)
                try:
                    return await chunks.__anext__(), chunks
                except RayActorError:
                    chunks.cancel()
                    if not retry or attempt == 2:
                        raise
            logger.warning("replica died before answering; sending the request to another")
        raise AssertionError("unreachable")

    async def _ready(self) -> JSONResponse:
        """200 only when every engine replica is running and answers (the controller's view lags a
        replica that just died, so each replica is asked too). The RAG deployment's status is
        reported but not required: generation works without it (the RAG routes answer 503)."""
        from ray import serve

        headers = {REPLICA_HEADER.decode(): self.replica_id}
        status = await asyncio.to_thread(serve.status)
        app = status.applications.get(self.app_name)
        deployment = app.deployments.get("EngineReplica") if app else None
        running = deployment.replica_states.get("RUNNING", 0) if deployment else 0
        answers = await self.engine.broadcast("check_health").results_async(
            timeout_s=READY_PROBE_SECONDS, return_exceptions=True
        )
        healthy = sum(not isinstance(answer, BaseException) for answer in answers)
        rag = app.deployments.get(RAG_DEPLOYMENT) if app else None
        body = {
            "status": "ready",
            "replicas": self.replicas,
            "running": running,
            "healthy": healthy,
            "rag": rag.status.value if rag else "missing",
        }
        if deployment is None or deployment.status != "HEALTHY" or min(running, healthy) < self.replicas:
            return JSONResponse({**body, "status": "not_ready"}, status_code=503, headers=headers)
        return JSONResponse(body, headers=headers)


def _streamed(start: ResponseStart) -> bool:
    """Whether a response is passed on as it comes (SSE, or a body of no announced length, like a
    file download) rather than gathered first (a JSON answer: it has a content-length)."""
    headers = {k.lower(): v for k, v in start.headers}
    return b"text/event-stream" in headers.get(b"content-type", b"") or b"content-length" not in headers


def _response(response: Response, start: ResponseStart) -> Response:
    """The replica's status and headers exactly (content-length included) on the ingress's response."""
    response.status_code = start.status
    response.raw_headers = [(k, v) for k, v in start.headers if k.lower() != b"transfer-encoding"]
    return response


async def _guarded(chunks: Any) -> AsyncIterator[bytes]:
    """The body chunks; a client that goes away cancels the replica's call (its slot is freed)."""
    try:
        async for chunk in chunks:
            yield chunk
    except Exception as e:  # the replica died mid-stream: end the stream with an SSE error event
        logger.warning("stream broken by replica failure: %r", e)
        error = {"error": {"message": "the engine replica failed mid-stream", "type": "server_error"}}
        yield f"data: {json.dumps(error)}\n\n".encode()
    finally:
        chunks.cancel()
