"""What logprobs cost per decode step, in one engine, interleaved with runs that ask for none.

    .venv/bin/python -m benchmarks.logprobs_bench [--requests 32] [--concurrency 16] [--rounds 2]

The same seeded workload (default model, ``--adapters`` random adapters, greedy, ``ignore_eos``) runs
``--rounds`` times in each mode — no logprobs, each token's logprob only (``logprobs=0``), and the top
20 — alternating, so load on the machine hits every mode alike. Reports the engine's wall time per
step and output tokens/s per mode, and each mode's ratio to no logprobs. Logprobs are computed only
for rows that ask (issue 13), on that row's logits: the cost is a log-softmax and a top-k per row.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import time

import torch

from benchmarks import engine_bench
from benchmarks.compute_paths import cpu_name
from benchmarks.workload import WorkloadSpec, make_workload

MODES = (("none", None), ("chosen token (logprobs=0)", 0), ("top 20", 20))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2)
    args, rest = parser.parse_known_args(argv)
    bench_args = engine_bench.parse_args(rest)
    logging.basicConfig(level=logging.WARNING)
    requests = make_workload(WorkloadSpec(bench_args.requests, bench_args.adapters, seed=bench_args.seed))
    per_mode: dict[str, list[dict]] = {name: [] for name, _ in MODES}
    with engine_bench.engine_state(bench_args) as state:
        vocab = state.engine.runner.model.config.vocab_size
        for _ in range(args.rounds):
            for name, logprobs in MODES:
                state.engine.stats = type(state.engine.stats)()
                per_mode[name].append(
                    engine_bench.run_closed_loop(state, requests, bench_args.concurrency, logprobs)
                )

    def median(key: str) -> dict[str, float]:
        return {name: statistics.median(r[key] for r in runs) for name, runs in per_mode.items()}

    step, rate = median("wall_ms_per_step"), median("output_tokens_per_s")
    batch = statistics.median(r["mean_batch"] for runs in per_mode.values() for r in runs)
    print(  # noqa: T201 - a CLI
        f"Logprobs per decode step ({cpu_name()}, default model, {bench_args.adapters} adapters, "
        f"{bench_args.requests} requests, {bench_args.concurrency} in flight, mean batch {batch:.1f}, "
        f"median of {args.rounds} interleaved rounds)\n\n"
        "| logprobs | ms per step | vs none | output tokens/s |\n|---|---|---|---|"
    )
    for name, _ in MODES:
        print(f"| {name} | {step[name]:.1f} | {step[name] / step['none']:.2f}× | {rate[name]:.1f} |")  # noqa: T201
    print_direct_cost(round(batch), vocab)


def print_direct_cost(rows: int, vocab: int, repeats: int = 50) -> None:
    """The logprob work itself, which the end-to-end figures above bury in step-to-step noise: the
    engine's per-row :func:`token_logprob` for ``rows`` rows of ``vocab`` float32 scores, 1 thread."""
    from server.engine.sampling import token_logprob

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    logits = torch.randn(rows, vocab, generator=torch.Generator().manual_seed(0))
    print(f"\nThe logprob work alone, {rows} rows × {vocab} scores, 1 thread (median of {repeats}):\n")  # noqa: T201
    print("| logprobs | ms per step |\n|---|---|")  # noqa: T201
    for name, top in MODES[1:]:
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            for row in logits:
                token_logprob(row, 5, top)
            times.append((time.perf_counter() - start) * 1000)
        print(f"| {name} | {statistics.median(times):.2f} |")  # noqa: T201
    torch.set_num_threads(threads)


if __name__ == "__main__":
    main()
