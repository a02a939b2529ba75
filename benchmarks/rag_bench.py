"""RAG benchmark: ingest throughput with the default embedder, search latency and memory at scale.

Ingest runs the real pipeline (chunking, all-MiniLM-L6-v2 embedding, SQLite, atomic index write) on the
bundled corpus. Search latency uses collections of synthetic chunks (random words, random unit vectors) at
each size, for the flat and HNSW indexes: the dense index alone, BM25 alone, and a full hybrid search
through ``Collection.search`` (SQLite filter-free lookup, both rankings, fusion, text fetch); the query's
MiniLM encoding is measured separately and added to give the end-to-end hybrid figure.

    .venv/bin/python -m benchmarks.rag_bench [--out results/rag] [--sizes 10000 100000]

Prints a Markdown table and writes ``rag_bench.json`` under ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import re
import tempfile
import time
import zlib
from pathlib import Path

import numpy as np
import psutil
import torch

from rag.collection import DocumentInput
from rag.collections import CollectionManager
from rag.embedder import DEFAULT_EMBEDDING_MODEL, load_embedder
from rag.extract import extract_text

EXAMPLES = Path(__file__).parents[1] / "rag" / "examples" / "corpus"
DIMENSION = 384
WORDS_PER_CHUNK = 120
INGEST_BATCH = 20_000


class SyntheticEmbedder:
    """Random unit vectors (seeded by the text) and word tokens: index-side costs without a model."""

    name = "synthetic"
    dimension = DIMENSION
    max_tokens = 254

    def token_spans(self, text: str) -> list[tuple[int, int]]:
        return [m.span() for m in re.finditer(r"\S+", text)]

    def encode(self, texts: list[str]) -> np.ndarray:
        vectors = np.stack(
            [np.random.default_rng(zlib.crc32(t.encode())).standard_normal(DIMENSION) for t in texts]
        ).astype(np.float32)  # (N, d)
        return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


def percentiles_ms(samples: list[float]) -> dict:
    ms = np.array(samples) * 1000
    return {
        "p50_ms": round(float(np.percentile(ms, 50)), 3),
        "p99_ms": round(float(np.percentile(ms, 99)), 3),
    }


def time_calls(fn, args_list: list) -> list[float]:
    fn(*args_list[0])  # warm-up
    samples = []
    for args in args_list:
        start = time.perf_counter()
        fn(*args)
        samples.append(time.perf_counter() - start)
    return samples


def bench_ingest(work: Path, limit_bytes: int) -> dict:
    embedder = load_embedder(DEFAULT_EMBEDDING_MODEL)
    documents, size = [], 0
    for path in sorted(EXAMPLES.iterdir()):
        if size >= limit_bytes:
            break
        text = extract_text(path.read_bytes(), path.name)[: limit_bytes - size]
        size += len(text)
        documents.append(DocumentInput(text, source=path.name))
    manager = CollectionManager(work / "ingest", load_embedder=lambda model: embedder)
    manager.create("corpus")
    embedder.encode(["warm-up"])
    start = time.perf_counter()
    results = manager.ingest("corpus", documents)
    seconds = time.perf_counter() - start
    chunks = sum(r.chunk_count for r in results)
    queries = [[q] for q in ("how do I limit threads", "install with crypto support", "ping interval")] * 20
    encode = percentiles_ms(time_calls(embedder.encode, [[q] for q in queries]))
    manager.close()
    return {
        "documents": len(documents),
        "characters": size,
        "chunks": chunks,
        "seconds": round(seconds, 2),
        "chunks_per_s": round(chunks / seconds, 1),
        "query_encode": encode,
    }


def synthetic_documents(n: int, seed: int = 0) -> tuple[list[DocumentInput], list[str]]:
    vocabulary = sorted(
        set(re.findall(r"[a-z]{3,}", " ".join(p.read_text().lower() for p in EXAMPLES.iterdir())))
    )
    rng = random.Random(seed)
    weights = [1.0 / (rank + 1) for rank in range(len(vocabulary))]  # Zipf-like word frequencies
    rng.shuffle(vocabulary)
    documents = [
        DocumentInput(" ".join(rng.choices(vocabulary, weights, k=WORDS_PER_CHUNK)), id=f"d{i}")
        for i in range(n)
    ]
    queries = [" ".join(rng.choices(vocabulary, weights, k=5)) for _ in range(300)]
    return documents, queries


def bench_search(work: Path, size: int, kind: str) -> dict:
    embedder = SyntheticEmbedder()
    documents, queries = synthetic_documents(size)
    rss_before = psutil.Process().memory_info().rss
    manager = CollectionManager(work / f"{kind}-{size}", load_embedder=lambda model: embedder)
    manager.create("synthetic", chunk_size=254, chunk_overlap=0, index=kind)
    start = time.perf_counter()
    for i in range(0, size, INGEST_BATCH):
        manager.ingest("synthetic", documents[i : i + INGEST_BATCH])
    build_seconds = time.perf_counter() - start
    del documents
    collection = manager.get("synthetic")
    collection.search(queries[0], 5, "keyword")  # builds BM25
    rss_after = psutil.Process().memory_info().rss
    query_vectors = embedder.encode(queries)
    info = collection.info()
    result = {
        "chunks": info.chunk_count,
        "index": kind,
        "build_seconds": round(build_seconds, 1),
        "dense_index": percentiles_ms(
            time_calls(collection._vectors.search, [(v, 5) for v in query_vectors])
        ),
        "bm25": percentiles_ms(time_calls(collection._keywords.search, [(q, 20) for q in queries])),
        "hybrid_search": percentiles_ms(time_calls(collection.search, [(q, 5, "hybrid") for q in queries])),
        "rss_mib": round((rss_after - rss_before) / 2**20, 1),
        "index_file_mib": round(info.index_bytes / 2**20, 1),
        "sqlite_mib": round(info.sqlite_bytes / 2**20, 1),
    }
    manager.close()
    return result


def markdown(report: dict) -> str:
    ingest = report["ingest"]
    lines = [
        f"Ingest ({ingest['documents']} files, {ingest['characters']} characters, default embedder, "
        f"{report['machine']['torch_threads']} torch threads): **{ingest['chunks']} chunks in "
        f"{ingest['seconds']} s = {ingest['chunks_per_s']} chunks/s**; query encoding p50 "
        f"{ingest['query_encode']['p50_ms']} ms, p99 {ingest['query_encode']['p99_ms']} ms.",
        "",
        "| chunks | index | dense p50 / p99 ms | BM25 p50 / p99 ms | hybrid (no encode) p50 / p99 ms "
        "| hybrid + encode p50 ms | RSS MiB | index file MiB | SQLite MiB | build s |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    encode_p50 = ingest["query_encode"]["p50_ms"]
    for r in report["search"]:
        d, b, h = r["dense_index"], r["bm25"], r["hybrid_search"]
        lines.append(
            f"| {r['chunks']} | {r['index']} | {d['p50_ms']} / {d['p99_ms']} | {b['p50_ms']} / {b['p99_ms']} "
            f"| {h['p50_ms']} / {h['p99_ms']} | {round(h['p50_ms'] + encode_p50, 2)} | {r['rss_mib']} "
            f"| {r['index_file_mib']} | {r['sqlite_mib']} | {r['build_seconds']} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("results/rag"))
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000])
    parser.add_argument("--indexes", nargs="+", default=["flat", "hnsw"], choices=["flat", "hnsw"])
    parser.add_argument("--ingest-bytes", type=int, default=60_000, help="corpus characters to ingest")
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    report = {
        "machine": {
            "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "platform": platform.platform(),
            "load_average_at_start": os.getloadavg(),
        }
    }
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        report["ingest"] = bench_ingest(work, args.ingest_bytes)
        print(f"ingest: {report['ingest']}", flush=True)
        report["search"] = []
        for size in args.sizes:
            for kind in args.indexes:
                report["search"].append(bench_search(work, size, kind))
                print(f"search: {report['search'][-1]}", flush=True)
    report["machine"]["load_average_at_end"] = os.getloadavg()
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "rag_bench.json").write_text(json.dumps(report, indent=2))
    print()
    print(markdown(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
