"""The ingress when a replica dies between its response start and its body: a JSON answer is sent
again to another replica (or is a clean 503 for a store write), never a truncated body. A scripted
handle stands in for Ray's (the e2e kill test hits this window only now and then)."""

from __future__ import annotations

import asyncio
import json

import pytest

ray = pytest.importorskip("ray")

from ray.exceptions import RayActorError  # noqa: E402
from starlette.requests import Request  # noqa: E402

from server.ray.asgi_bridge import ResponseStart  # noqa: E402
from server.ray.ingress import Ingress  # noqa: E402
from server.ray.placement import PlacementGate  # noqa: E402

BODY = json.dumps({"choices": [{"text": "whole answer"}]}).encode()


class Stream:
    """One replica call: the response start, then the body or the replica's death."""

    def __init__(self, dies_mid_body: bool, streamed: bool = False):
        headers = [(b"content-type", b"text/event-stream" if streamed else b"application/json")]
        if not streamed:
            headers.append((b"content-length", str(len(BODY)).encode()))
        self.items = [ResponseStart(200, tuple(headers)), BODY[:10]]
        self.items.append(RayActorError() if dies_mid_body else BODY[10:])
        self.cancelled = False

    def __aiter__(self):
        return self

    async def __anext__(self):
        if not self.items:
            raise StopAsyncIteration
        item = self.items.pop(0)
        if isinstance(item, BaseException):
            raise item
        return item

    def cancel(self):
        self.cancelled = True


class Handle:
    def __init__(self, streams: list[Stream]):
        self.streams, self.calls = streams, 0
        self.forward = self

    def options(self, **_):
        return self

    def remote(self, forwarded):
        self.calls += 1
        return self.streams.pop(0)


def ingress(handle: Handle) -> Ingress:
    self = Ingress.__new__(Ingress)  # no Ray Serve replica context needed for the forwarding path
    self.engine, self.placement, self.replica_id = handle, PlacementGate(), "ingress-test"
    self.max_body_bytes = self.max_upload_bytes = 1 << 20
    self.max_merge_parts = 8
    self.store = type("Store", (), {"exists": staticmethod(lambda name: False)})()
    return self


def request(method: str, path: str, body: bytes = b"{}") -> Request:
    async def receive():
        return {"type": "http.request", "body": body, "more_body": False}

    scope = {"type": "http", "method": method, "path": path, "query_string": b"", "headers": []}
    scope["client"] = ("127.0.0.1", 1)
    return Request(scope, receive)


async def body_of(response) -> bytes:
    if hasattr(response, "body_iterator"):
        return b"".join([chunk async for chunk in response.body_iterator])
    return response.body


def test_a_json_answer_cut_by_a_replica_death_is_sent_again():
    handle = Handle([Stream(dies_mid_body=True), Stream(dies_mid_body=False)])
    response = asyncio.run(ingress(handle)(request("POST", "/v1/completions")))
    assert handle.calls == 2
    assert response.status_code == 200 and asyncio.run(body_of(response)) == BODY


def test_a_store_write_cut_by_a_replica_death_is_a_503_not_sent_twice():
    handle = Handle([Stream(dies_mid_body=True), Stream(dies_mid_body=False)])
    response = asyncio.run(ingress(handle)(request("DELETE", "/v1/adapters/some-adapter")))
    assert handle.calls == 1
    assert response.status_code == 503 and json.loads(response.body)["error"]["code"] == "unavailable"


def test_an_event_stream_is_passed_on_as_it_comes():
    handle = Handle([Stream(dies_mid_body=False, streamed=True)])
    response = asyncio.run(ingress(handle)(request("POST", "/v1/completions")))
    assert hasattr(response, "body_iterator")  # not gathered
    assert asyncio.run(body_of(response)) == BODY
