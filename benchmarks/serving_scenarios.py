"""Scenarios run against a live server: closed/open-loop load, the continuous-batching TTFT check,
adapter cold load and warm hit, and the batch-1 inter-token latency for the roofline."""

from __future__ import annotations

import asyncio
import logging
import statistics
import time

import httpx

from benchmarks.http_client import RequestBody, RequestRecord, closed_loop, open_loop, request_body, send_one
from benchmarks.metrics import summarize
from benchmarks.workload import BenchRequest, poisson_arrivals

logger = logging.getLogger(__name__)


def run_closed_loop(
    url: str, requests: list[BenchRequest], concurrency: int, body: RequestBody = request_body
) -> dict:
    records, wall = asyncio.run(closed_loop(url, requests, concurrency, body))
    return summarize(records, wall)


def run_open_loop(url: str, requests: list[BenchRequest], rate_per_s: float, seed: int) -> dict:
    arrivals = poisson_arrivals(len(requests), rate_per_s, seed)
    records, wall = asyncio.run(open_loop(url, requests, arrivals))
    return summarize(records, wall)


def _single(url: str, req: BenchRequest) -> RequestRecord:
    async def go() -> RequestRecord:
        async with httpx.AsyncClient(timeout=3600) as client:
            return await send_one(client, url, req, time.perf_counter())

    record = asyncio.run(go())
    if record.error:
        raise RuntimeError(f"request {req.index} failed: {record.error}")
    return record


def idle_ttft_ms(url: str, probe: BenchRequest, repeats: int) -> float:
    """Median TTFT of ``probe`` on an otherwise idle server."""
    return statistics.median(_single(url, probe).ttft_s * 1e3 for _ in range(repeats))


def batch1_itl_ms(url: str, req: BenchRequest) -> float:
    """Median inter-token latency of one request running alone (batch 1)."""
    return statistics.median(_single(url, req).inter_token_s()) * 1e3


def busy_ttft_ms(url: str, long_requests: list[BenchRequest], probe: BenchRequest) -> dict:
    """TTFT of ``probe`` sent once every long request has its first token (all are decoding)."""

    async def go() -> dict:
        async with httpx.AsyncClient(timeout=3600, limits=httpx.Limits(max_connections=64)) as client:
            t0 = time.perf_counter()
            longs = [asyncio.create_task(send_one(client, url, r, t0)) for r in long_requests]
            await _wait_all_decoding(client, url, len(long_requests), longs)
            probe_record = await send_one(client, url, probe, t0)
            long_records = await asyncio.gather(*longs)
        still_running = sum(r.done_s > probe_record.first_token_s for r in long_records)
        return {
            "busy_ttft_ms": round(probe_record.ttft_s * 1e3, 2),
            "long_requests_still_decoding_at_probe_first_token": still_running,
            "long_request_errors": sum(r.error is not None for r in long_records),
        }

    return asyncio.run(go())


async def _wait_all_decoding(client: httpx.AsyncClient, url: str, count: int, tasks: list) -> None:
    """Polls ``/ready`` until ``count`` sequences run and none waits (every long request prefilled)."""
    deadline = time.monotonic() + 1800
    while time.monotonic() < deadline:
        body = (await client.get(url + "/ready")).json()
        if body.get("running", 0) >= count and body.get("waiting", 0) == 0:
            return
        if any(t.done() for t in tasks):
            raise RuntimeError("a long request finished before all had started: raise its output length")
        await asyncio.sleep(0.05)
    raise RuntimeError("the long requests never all started decoding")


def adapter_load_ms(url: str, names: list[str]) -> dict:
    """Cold loads (disk → servable, the server's ``load_ms`` and the HTTP round trip), then warm hits."""
    cold, cold_http, warm_http = [], [], []
    with httpx.Client(timeout=600) as client:
        for name in names:
            t = time.perf_counter()
            response = client.post(f"{url}/v1/adapters/{name}/load")
            cold_http.append((time.perf_counter() - t) * 1e3)
            response.raise_for_status()
            cold.append(response.json()["load_ms"])
            t = time.perf_counter()
            client.post(f"{url}/v1/adapters/{name}/load").raise_for_status()
            warm_http.append((time.perf_counter() - t) * 1e3)
    return {
        "cold_load_ms_median": round(statistics.median(cold), 2),
        "cold_load_ms_max": round(max(cold), 2),
        "cold_load_http_ms_median": round(statistics.median(cold_http), 2),
        "warm_load_http_ms_median": round(statistics.median(warm_http), 2),
        "adapters": len(names),
    }


def warm_hit_ttft_ms(url: str, probe: BenchRequest, adapter: str, repeats: int) -> dict:
    """TTFT with a resident adapter vs the base model, interleaved: a warm hit should add nothing."""
    base, warm = [], []
    with_adapter = BenchRequest(probe.index, probe.prompt_token_ids, probe.output_tokens, adapter)
    for _ in range(repeats):
        base.append(_single(url, probe).ttft_s * 1e3)
        warm.append(_single(url, with_adapter).ttft_s * 1e3)
    return {
        "base_ttft_ms_median": round(statistics.median(base), 2),
        "warm_adapter_ttft_ms_median": round(statistics.median(warm), 2),
        "warm_hit_added_ms": round(statistics.median(warm) - statistics.median(base), 2),
    }


def preload(url: str, names: list[str]) -> None:
    with httpx.Client(timeout=600) as client:
        for name in names:
            client.post(f"{url}/v1/adapters/{name}/load").raise_for_status()
