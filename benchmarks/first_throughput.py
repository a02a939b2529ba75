"""A first rough throughput figure: 16 concurrent requests over 4 adapters vs the same requests one by one.

Starts a real `loraplex serve` on the default model (NF4, CPU unless CUDA is present), creates 4 random
LoRA adapters (ranks 8/16, attention-only and all-linear), sends the 16 requests through the HTTP API.

    .venv/bin/python -m benchmarks.first_throughput [--max-tokens 32] [--requests 16]
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from adapters.base_model import resolve_base_model  # noqa: E402
from benchmarks.server_process import ServerProcess  # noqa: E402
from tests.tiny_models import save_random_adapter  # noqa: E402

ALL_LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
ADAPTERS = {
    "a0": (8, ("q_proj", "v_proj")),
    "a1": (16, ("q_proj", "v_proj")),
    "a2": (8, ALL_LINEAR),
    "a3": (16, ALL_LINEAR),
}


async def one(client: httpx.AsyncClient, url: str, i: int, max_tokens: int) -> int:
    body = {
        "messages": [{"role": "user", "content": f"Tell me fact number {i} about the sea."}],
        "max_tokens": max_tokens,
        "temperature": 0,
        "ignore_eos": True,
        "adapter": f"a{i % len(ADAPTERS)}",
    }
    response = await client.post(url + "/v1/chat/completions", json=body, timeout=600)
    response.raise_for_status()
    return response.json()["usage"]["completion_tokens"]


async def measure(url: str, requests: int, max_tokens: int) -> dict:
    async with httpx.AsyncClient() as client:
        await one(client, url, 0, 4)  # warm-up: loads an adapter, touches every code path
        for i in range(len(ADAPTERS)):
            await client.post(f"{url}/v1/adapters/a{i}/load")
        start = time.perf_counter()
        sequential = [await one(client, url, i, max_tokens) for i in range(requests)]
        seq_seconds = time.perf_counter() - start
        start = time.perf_counter()
        concurrent = await asyncio.gather(*(one(client, url, i, max_tokens) for i in range(requests)))
        conc_seconds = time.perf_counter() - start
    return {
        "sequential_tokens_per_s": sum(sequential) / seq_seconds,
        "concurrent_tokens_per_s": sum(concurrent) / conc_seconds,
        "sequential_seconds": seq_seconds,
        "concurrent_seconds": conc_seconds,
        "speedup": seq_seconds / conc_seconds,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--requests", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=32)
    args = parser.parse_args()
    model_dir = resolve_base_model(None)
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp)
        for seed, (name, (rank, modules)) in enumerate(ADAPTERS.items()):
            save_random_adapter(model_dir, data / "adapters" / name, rank, 2.0 * rank, modules, seed)
        with ServerProcess(data, {}) as server:
            result = asyncio.run(measure(server.url, args.requests, args.max_tokens))
    print(f"{args.requests} requests x {args.max_tokens} tokens over {len(ADAPTERS)} adapters")
    for key, value in result.items():
        print(f"  {key:26s} {value:8.2f}")


if __name__ == "__main__":
    main()
