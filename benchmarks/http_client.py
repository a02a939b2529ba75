"""Load generators over HTTP: closed loop (C clients back to back) and open loop (Poisson arrivals).

Every request streams (``/v1/completions`` with the prompt as token ids, ``ignore_eos``) so the client
timestamps the first token (TTFT) and each later chunk (inter-token latency).
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import httpx

from benchmarks.workload import BenchRequest


@dataclass
class RequestRecord:
    """What the client saw of one request (seconds since the run started)."""

    index: int
    adapter: str | None
    prompt_tokens: int
    output_tokens: int = 0
    sent_s: float = 0.0
    first_token_s: float | None = None
    done_s: float = 0.0
    chunk_times_s: list[float] = field(default_factory=list)
    error: str | None = None

    @property
    def ttft_s(self) -> float | None:
        return None if self.first_token_s is None else self.first_token_s - self.sent_s

    @property
    def e2e_s(self) -> float:
        return self.done_s - self.sent_s

    def inter_token_s(self) -> list[float]:
        """Gaps between successive streamed chunks (one token each, except where text was held back)."""
        times = self.chunk_times_s
        return [b - a for a, b in zip(times, times[1:])]


RequestBody = Callable[[BenchRequest], dict]
"""Turns a benchmark request into a server's JSON body (loraplex's by default; peers bring their own)."""


def request_body(req: BenchRequest) -> dict:
    """loraplex's ``/v1/completions`` body: the adapter goes in the ``adapter`` field."""
    body = {
        "prompt": list(req.prompt_token_ids),
        "max_tokens": req.output_tokens,
        "temperature": 0,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    if req.adapter is not None:
        body["adapter"] = req.adapter
    return body


async def send_one(
    client: httpx.AsyncClient, url: str, req: BenchRequest, t0: float, body: RequestBody = request_body
) -> RequestRecord:
    """Streams one completion and records its timings."""
    record = RequestRecord(req.index, req.adapter, len(req.prompt_token_ids))
    record.sent_s = time.perf_counter() - t0
    try:
        async with client.stream("POST", url + "/v1/completions", json=body(req)) as response:
            if response.status_code != 200:
                await response.aread()
                record.error = f"HTTP {response.status_code}: {response.text[:200]}"
            else:
                await _read_stream(response, record, t0)
    except httpx.HTTPError as e:
        record.error = f"{type(e).__name__}: {e}"
    record.done_s = time.perf_counter() - t0
    return record


async def _read_stream(response: httpx.Response, record: RequestRecord, t0: float) -> None:
    async for line in response.aiter_lines():
        if not line.startswith("data: ") or line == "data: [DONE]":
            if line.startswith("event: error"):
                record.error = "stream error event"
            continue
        payload = json.loads(line[6:])
        now = time.perf_counter() - t0
        if payload.get("usage"):
            record.output_tokens = payload["usage"]["completion_tokens"]
        for choice in payload.get("choices", []):
            if choice.get("text") or choice.get("finish_reason"):
                if record.first_token_s is None:
                    record.first_token_s = now
                record.chunk_times_s.append(now)


def _client() -> httpx.AsyncClient:
    limits = httpx.Limits(max_connections=512, max_keepalive_connections=512)
    return httpx.AsyncClient(timeout=httpx.Timeout(3600.0), limits=limits)


async def closed_loop(
    url: str, requests: list[BenchRequest], concurrency: int, body: RequestBody = request_body
) -> tuple[list, float]:
    """``concurrency`` clients each send their next request as soon as the last one finishes.

    Returns the records and the wall time of the whole run.
    """
    queue: asyncio.Queue[BenchRequest] = asyncio.Queue()
    for req in requests:
        queue.put_nowait(req)
    records: list[RequestRecord] = []

    async def worker(client: httpx.AsyncClient) -> None:
        while True:
            try:
                req = queue.get_nowait()
            except asyncio.QueueEmpty:
                return
            records.append(await send_one(client, url, req, t0, body))

    async with _client() as client:
        t0 = time.perf_counter()
        await asyncio.gather(*(worker(client) for _ in range(concurrency)))
        wall = time.perf_counter() - t0
    return records, wall


async def open_loop(url: str, requests: list[BenchRequest], arrivals_s: list[float]) -> tuple[list, float]:
    """Sends request ``i`` at ``arrivals_s[i]`` whatever the server's state (Poisson when exponential)."""

    async def timed(client: httpx.AsyncClient, req: BenchRequest, at: float) -> RequestRecord:
        await asyncio.sleep(max(0.0, at - (time.perf_counter() - t0)))
        return await send_one(client, url, req, t0)

    async with _client() as client:
        t0 = time.perf_counter()
        records = await asyncio.gather(*(timed(client, r, a) for r, a in zip(requests, arrivals_s)))
        wall = time.perf_counter() - t0
    return list(records), wall
