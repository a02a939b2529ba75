"""Embeddings throughput: batches of short texts through ``POST /v1/embeddings`` vs ``encode`` in-process.

Usage (a server already running, e.g. ``loraplex serve --port 8123``)::

    .venv/bin/python -m benchmarks.embeddings_bench --url http://127.0.0.1:8123 --batches 20

The server runs torch with one intra-op thread per engine thread (half the cores with the prefill
worker), so the in-process figure is given both with one thread and with torch's default.
"""

from __future__ import annotations

import argparse
import time

import httpx
import torch

from rag.embedder import DEFAULT_EMBEDDING_MODEL, load_embedder

WORDS = [
    "the",
    "quick",
    "brown",
    "fox",
    "jumps",
    "over",
    "a",
    "lazy",
    "dog",
    "while",
    "seven",
    "tired",
    "clerks",
    "file",
    "reports",
]


def short_texts(batches: int, batch_size: int) -> list[list[str]]:
    """Distinct sentences of 8-12 words, ``batch_size`` per batch."""
    out, n = [], 0
    for _ in range(batches):
        batch = []
        for _ in range(batch_size):
            length = 8 + n % 5
            batch.append(" ".join(WORDS[(n + i * 3) % len(WORDS)] for i in range(length)) + f" #{n}")
            n += 1
        out.append(batch)
    return out


def http_texts_per_second(url: str, model: str, batches: list[list[str]]) -> float:
    with httpx.Client(base_url=url, timeout=120) as client:
        client.post("/v1/embeddings", json={"model": model, "input": batches[0]}).raise_for_status()  # warm
        started = time.perf_counter()
        for batch in batches:
            client.post("/v1/embeddings", json={"model": model, "input": batch}).raise_for_status()
        elapsed = time.perf_counter() - started
    return sum(len(b) for b in batches) / elapsed


def encode_texts_per_second(batches: list[list[str]], threads: int | None) -> float:
    if threads is not None:
        torch.set_num_threads(threads)
    embedder = load_embedder(DEFAULT_EMBEDDING_MODEL)
    embedder.encode(batches[0])  # warm
    started = time.perf_counter()
    for batch in batches:
        embedder.encode(batch)
    return sum(len(b) for b in batches) / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default="http://127.0.0.1:8000")
    parser.add_argument("--model", default=DEFAULT_EMBEDDING_MODEL)
    parser.add_argument("--batches", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=32)
    args = parser.parse_args()
    batches = short_texts(args.batches, args.batch_size)
    default_threads = torch.get_num_threads()
    print(f"HTTP /v1/embeddings: {http_texts_per_second(args.url, args.model, batches):.0f} texts/s")
    print(f"encode, 1 thread: {encode_texts_per_second(batches, 1):.0f} texts/s")
    default = encode_texts_per_second(batches, default_threads)
    print(f"encode, {default_threads} threads: {default:.0f} texts/s")


if __name__ == "__main__":
    main()
