"""Throughput of `loraplex ray serve` with 1 and with 2 engine replicas on the same closed-loop workload.

Each run starts a real `loraplex ray serve` (its own local Ray instance) on the default model (or
``--base-model``), with ``--cpus-per-replica`` Ray CPUs per replica (its threads follow them), over
random LoRA adapters; the seeded workload of ``benchmarks/workload.py`` (streamed completions, exact
output lengths) is sent by ``--concurrency`` clients back to back (``benchmarks/http_client.py``),
after a warm-up that places and loads every adapter. Prints one table row per replica count and the
speed-up of the last over the first. A machine with fewer cores than the replicas' CPUs measures
contention, not scale-out: give each replica cores of its own.

    .venv/bin/python -m benchmarks.ray_replicas_bench [--requests 64] [--concurrency 16] [--adapters 8]
    .venv/bin/python -m benchmarks.ray_replicas_bench --requests 4 --concurrency 2 --adapters 2  # smoke
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from adapters.base_model import resolve_base_model  # noqa: E402
from benchmarks.adapter_factory import adapter_mix, write_random_adapter  # noqa: E402
from benchmarks.compute_paths import cpu_name  # noqa: E402
from benchmarks.http_client import closed_loop  # noqa: E402
from benchmarks.metrics import summarize  # noqa: E402
from benchmarks.server_process import ServerProcess  # noqa: E402
from benchmarks.workload import BenchRequest, WorkloadSpec, adapter_name, make_workload  # noqa: E402

logger = logging.getLogger(__name__)

COLUMNS = ("replicas", "output_tokens_per_s", "requests_per_s", "ttft_ms_p50", "e2e_ms_p50", "errors")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--replicas", type=int, nargs="+", default=[1, 2], help="replica counts to run")
    parser.add_argument("--requests", type=int, default=64, help="measured requests per run")
    parser.add_argument("--concurrency", type=int, default=16, help="closed-loop clients")
    parser.add_argument("--adapters", type=int, default=8, help="random LoRA adapters (0: base model only)")
    parser.add_argument("--max-output-tokens", type=int, default=64, help="output lengths are U[8, this]")
    parser.add_argument(
        "--cpus-per-replica", type=int, default=None, help="default: the cores shared by the largest run"
    )
    parser.add_argument("--base-model", default=None, help="default: the server's default model")
    parser.add_argument("--quantization", default="auto")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if min(args.replicas) < 1 or args.requests < 1 or args.concurrency < 1:
        parser.error("--replicas, --requests and --concurrency must be at least 1")
    if args.max_output_tokens < 8:
        parser.error("--max-output-tokens must be at least 8")
    if args.cpus_per_replica is None:
        args.cpus_per_replica = max(1, (os.cpu_count() or 1) // max(args.replicas))
    return args


def write_adapters(model_dir: Path, adapter_dir: Path, count: int) -> None:
    for i in range(count):
        rank, targets = adapter_mix(i)
        write_random_adapter(model_dir, adapter_dir / adapter_name(i), rank, targets, seed=i)


def workload(args: argparse.Namespace, vocab_size: int) -> tuple[list[BenchRequest], list[BenchRequest]]:
    """The warm-up (one request per adapter) and the measured requests."""
    spec = WorkloadSpec(
        args.requests, args.adapters, output_tokens=(8, args.max_output_tokens), seed=args.seed
    )
    high = min(40000, vocab_size)  # prompt ids from an ordinary part of the vocabulary
    measured = make_workload(spec, vocab_low=min(1000, high // 4), vocab_high=high)
    names = [adapter_name(i) for i in range(args.adapters)] or [None]
    warm_up = [BenchRequest(-1 - i, measured[0].prompt_token_ids, 8, name) for i, name in enumerate(names)]
    return warm_up, measured


def run_replicas(args: argparse.Namespace, data_dir: Path, replicas: int, vocab_size: int) -> dict:
    flags: dict[str, object] = {
        "replicas": replicas,
        "cpus-per-replica": args.cpus_per_replica,
        "quantization": args.quantization,
        "max-loaded-adapters": max(1, args.adapters),
    }
    if args.base_model:
        flags["base-model"] = args.base_model
    warm_up, measured = workload(args, vocab_size)
    with ServerProcess(data_dir, flags, command=("ray", "serve")) as server:
        asyncio.run(closed_loop(server.url, warm_up, 1))
        records, wall_s = asyncio.run(closed_loop(server.url, measured, args.concurrency))
        startup_s = server.startup_seconds
    result = {"replicas": replicas, **summarize(records, wall_s), "startup_s": round(startup_s, 1)}
    logger.info("%d replica(s): %s", replicas, result)
    return result


def table(rows: list[dict]) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(str(row[c]) for c in COLUMNS) + " |" for row in rows]
    return "\n".join(lines)


def vocab_size_of(model_dir: Path) -> int:
    return int(json.loads((model_dir / "config.json").read_text())["vocab_size"])


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    args = parse_args(argv)
    model_dir = resolve_base_model(args.base_model)
    with tempfile.TemporaryDirectory(prefix="loraplex-ray-bench-") as tmp:
        data_dir = Path(tmp)
        write_adapters(model_dir, data_dir / "adapters", args.adapters)
        rows = [run_replicas(args, data_dir, n, vocab_size_of(model_dir)) for n in args.replicas]
    print(
        f"\n{cpu_name()}, {os.cpu_count()} cores; {args.cpus_per_replica} CPUs per replica; model "
        f"{args.base_model or model_dir.name}; {args.requests} requests, {args.concurrency} clients, "
        f"{args.adapters} adapters, outputs U[8, {args.max_output_tokens}] tokens\n"
    )
    print(table(rows))
    first, last = rows[0]["output_tokens_per_s"], rows[-1]["output_tokens_per_s"]
    if len(rows) > 1 and first:
        print(
            f"\n{rows[-1]['replicas']} vs {rows[0]['replicas']} replica(s): "
            f"{last / first:.2f}x the output tokens per second"
        )


if __name__ == "__main__":
    main()
