"""The prefix cache and long prompts, measured on a real server (the default model) in one run.

    .venv/bin/python -m benchmarks.prefill_bench [--context-tokens 1024] [--long-prompt-tokens 2048]

Three measurements, each a ratio within this run:

- **RAG reuse.** A chat whose prompt is a ``--context-tokens`` retrieved context plus a question, then a
  second question over the same context: TTFT of the first (cold) and the second (its context cached),
  median over 3 contexts, with ``--prefix-cache-bytes 0`` as the baseline server.
- **Multi-turn.** Turn 2 repeats turn 1 and its answer: TTFT and ``usage.prompt_tokens_details``'s
  ``cached_tokens`` of turn 2.
- **A long prompt arriving.** 4 streams decode; a ``--long-prompt-tokens`` prompt arrives; the
  running streams' inter-token gaps while it is prefilled (p50/p99) against their gaps before it came.

Writes ``benchmarks/results/prefill_bench.md`` and prints it. The CPU is named in the table.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import tempfile
import time
from pathlib import Path

import httpx

from benchmarks.compute_paths import cpu_name
from benchmarks.server_process import ServerProcess

OUT = Path(__file__).resolve().parent / "results" / "prefill_bench.md"
WORDS = tuple(
    [
        "adapter",
        "base",
        "model",
        "rank",
        "alpha",
        "tokens",
        "memory",
        "batch",
        "layer",
        "weights",
        "gradient",
        "merge",
        "kernel",
        "cache",
        "prompt",
        "retrieval",
        "index",
        "vector",
        "document",
        "chunk",
        "answer",
        "question",
        "server",
        "request",
        "latency",
    ]
)


def _text(rng: random.Random, words: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(words))


async def _chat(client: httpx.AsyncClient, url: str, messages: list[dict], max_tokens: int) -> dict:
    """Streams one chat completion; returns its TTFT, text and usage."""
    base = (await client.get(url + "/v1/models")).json()["data"][0]["id"]  # the base model comes first
    body = {
        "model": base,
        "messages": messages,
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    sent, first, text, usage = time.perf_counter(), None, "", {}
    async with client.stream("POST", url + "/v1/chat/completions", json=body) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            payload = json.loads(line[6:])
            usage = payload.get("usage") or usage
            for choice in payload.get("choices", []):
                delta = choice.get("delta", {}).get("content")
                if delta:
                    first = first or time.perf_counter()
                    text += delta
    return {"ttft_s": (first or time.perf_counter()) - sent, "text": text, "usage": usage}


def _context_tokens_to_words(tokens: int) -> int:
    return int(tokens / 1.3)  # these words are ~1.3 tokens each in SmolLM2's tokenizer


async def rag_reuse(url: str, context_tokens: int, seed: int) -> dict:
    rng = random.Random(seed)
    firsts, seconds, cached = [], [], []
    async with httpx.AsyncClient(timeout=600) as client:
        await _chat(client, url, [{"role": "user", "content": "warm up"}], 2)
        for _ in range(3):
            context = _text(rng, _context_tokens_to_words(context_tokens))
            system = {"role": "system", "content": f"Answer from the context.\n\nContext:\n{context}"}
            one = await _chat(client, url, [system, {"role": "user", "content": _text(rng, 12)}], 1)
            two = await _chat(client, url, [system, {"role": "user", "content": _text(rng, 12)}], 1)
            firsts.append(one["ttft_s"])
            seconds.append(two["ttft_s"])
            cached.append(two["usage"].get("prompt_tokens_details", {}).get("cached_tokens", 0))
            prompt_tokens = two["usage"]["prompt_tokens"]
    return {
        "prompt_tokens": prompt_tokens,
        "first_ttft_ms": statistics.median(firsts) * 1e3,
        "second_ttft_ms": statistics.median(seconds) * 1e3,
        "second_cached_tokens": statistics.median(cached),
    }


async def multi_turn(url: str, seed: int) -> dict:
    rng = random.Random(seed)
    async with httpx.AsyncClient(timeout=600) as client:
        messages = [{"role": "user", "content": _text(rng, 300)}]
        one = await _chat(client, url, messages, 64)
        messages += [{"role": "assistant", "content": one["text"]}, {"role": "user", "content": "more"}]
        two = await _chat(client, url, messages, 1)
    return {
        "turn1_prompt_tokens": one["usage"]["prompt_tokens"],
        "turn2_prompt_tokens": two["usage"]["prompt_tokens"],
        "turn2_cached_tokens": two["usage"].get("prompt_tokens_details", {}).get("cached_tokens", 0),
        "turn1_ttft_ms": one["ttft_s"] * 1e3,
        "turn2_ttft_ms": two["ttft_s"] * 1e3,
    }


async def long_prompt_arrives(url: str, long_tokens: int, seed: int) -> dict:
    """Inter-token gaps of 4 running streams before and while a long prompt is prefilled."""
    rng = random.Random(seed)
    long_ids = [rng.randrange(1000, 40000) for _ in range(long_tokens)]
    stamps: list[list[float]] = [[] for _ in range(4)]

    async def stream(i: int, client: httpx.AsyncClient) -> None:
        body = {
            "prompt": [rng.randrange(1000, 40000) for _ in range(16)],
            "max_tokens": 1500,
            "temperature": 0,
            "ignore_eos": True,
            "stream": True,
        }
        async with client.stream("POST", url + "/v1/completions", json=body) as response:
            async for line in response.aiter_lines():
                if line.startswith("data: {"):
                    stamps[i].append(time.perf_counter())
                    if done.is_set():
                        return

    done = asyncio.Event()
    async with httpx.AsyncClient(timeout=600) as client:
        tasks = [asyncio.create_task(stream(i, client)) for i in range(4)]
        while min(len(s) for s in stamps) < 40:  # all decoding, steady
            await asyncio.sleep(0.05)
        idle_from = time.perf_counter()
        await asyncio.sleep(3.0)
        sent = time.perf_counter()
        body = {"prompt": long_ids, "max_tokens": 1, "temperature": 0}
        response = await client.post(url + "/v1/completions", json=body)
        response.raise_for_status()
        answered = time.perf_counter()
        await asyncio.sleep(0.5)
        done.set()
        await asyncio.gather(*tasks, return_exceptions=True)
    idle, busy, where = [], [], []
    for times in stamps:
        for a, b in zip(times, times[1:]):
            if idle_from <= a and b <= sent:
                idle.append(b - a)
            elif a < answered and b > sent:
                busy.append(b - a)
                where.append((b - a, a - sent))
    q = statistics.quantiles
    return {
        "long_prompt_tokens": long_tokens,
        "prefill_s": answered - sent,
        "idle_tpot_p50_ms": statistics.median(idle) * 1e3,
        "idle_tpot_p99_ms": q(idle, n=100)[98] * 1e3,
        "busy_tpot_p50_ms": statistics.median(busy) * 1e3,
        "busy_tpot_p99_ms": q(busy, n=100)[98] * 1e3 if len(busy) > 1 else busy[0] * 1e3,
        "busy_gaps": len(busy),
        # the longest gaps during the prefill: (gap ms, its start in s after the prompt was sent)
        "worst_gaps": [(round(g * 1e3), round(t, 2)) for g, t in sorted(where, reverse=True)[:8]],
    }


def run(args: argparse.Namespace) -> str:
    lines = [
        f"# Prefix cache and long prompts ({cpu_name()}, default model, `serve` defaults)",
        "",
        "| measurement | cache off | cache on |",
        "|---|---|---|",
    ]
    results = {}
    for label, flags in (("off", {"prefix-cache-bytes": 0}), ("on", {})):
        with tempfile.TemporaryDirectory() as data, ServerProcess(Path(data), flags) as server:
            results[label] = {
                "rag": asyncio.run(rag_reuse(server.url, args.context_tokens, args.seed)),
                "turns": asyncio.run(multi_turn(server.url, args.seed)),
                "long": asyncio.run(long_prompt_arrives(server.url, args.long_prompt_tokens, args.seed))
                if label == "on"
                else None,
            }
            print(label, results[label], flush=True)  # noqa: T201 - a CLI: partial results survive
    off, on = results["off"], results["on"]
    rows = [
        ("RAG chat prompt tokens", off["rag"]["prompt_tokens"], on["rag"]["prompt_tokens"]),
        ("1st question TTFT ms", off["rag"]["first_ttft_ms"], on["rag"]["first_ttft_ms"]),
        ("2nd question, same context, TTFT ms", off["rag"]["second_ttft_ms"], on["rag"]["second_ttft_ms"]),
        ("2nd question cached tokens", off["rag"]["second_cached_tokens"], on["rag"]["second_cached_tokens"]),
        (
            "1st ÷ 2nd TTFT",
            off["rag"]["first_ttft_ms"] / off["rag"]["second_ttft_ms"],
            on["rag"]["first_ttft_ms"] / on["rag"]["second_ttft_ms"],
        ),
        ("turn 2 prompt tokens", off["turns"]["turn2_prompt_tokens"], on["turns"]["turn2_prompt_tokens"]),
        ("turn 2 cached tokens", off["turns"]["turn2_cached_tokens"], on["turns"]["turn2_cached_tokens"]),
        ("turn 2 TTFT ms", off["turns"]["turn2_ttft_ms"], on["turns"]["turn2_ttft_ms"]),
    ]
    for name, a, b in rows:
        lines.append(f"| {name} | {_fmt(a)} | {_fmt(b)} |")
    long = on["long"]
    lines += ["", _long_line(long)]
    return "\n".join(lines)


def run_long(args: argparse.Namespace) -> str:
    flags = dict(flag.split("=", 1) for flag in args.server_flag)
    with tempfile.TemporaryDirectory() as data, ServerProcess(Path(data), flags) as server:
        long = asyncio.run(long_prompt_arrives(server.url, args.long_prompt_tokens, args.seed))
    print(long, flush=True)  # noqa: T201
    return f"# A long prompt arriving ({cpu_name()}, default model, flags {flags})\n\n" + _long_line(long)


def _long_line(long: dict) -> str:
    return (
        f"A {long['long_prompt_tokens']}-token prompt arriving while 4 streams decode "
        f"(prefilled in {long['prefill_s']:.2f} s): running streams' TPOT p50/p99 "
        f"{long['busy_tpot_p50_ms']:.1f}/{long['busy_tpot_p99_ms']:.1f} ms during its prefill "
        f"({long['busy_gaps']} gaps) against "
        f"{long['idle_tpot_p50_ms']:.1f}/{long['idle_tpot_p99_ms']:.1f} ms "
        f"before it: p99 ratio {long['busy_tpot_p99_ms'] / long['idle_tpot_p99_ms']:.2f}, "
        f"p99 ÷ idle p50 {long['busy_tpot_p99_ms'] / long['idle_tpot_p50_ms']:.2f}.\n"
    )


def _fmt(value) -> str:
    return f"{value:.1f}" if isinstance(value, float) else str(value)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--context-tokens", type=int, default=1024)
    parser.add_argument("--long-prompt-tokens", type=int, default=2000)  # + 1 fits 2048
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--long-only", action="store_true", help="only the long prompt arriving (one server, cache on)"
    )
    parser.add_argument("--server-flag", action="append", default=[], metavar="NAME=VALUE")
    args = parser.parse_args()
    report = run_long(args) if args.long_only else run(args)
    out = OUT.with_name("prefill_long.md") if args.long_only else OUT
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(report)
    print(report)


if __name__ == "__main__":
    main()
