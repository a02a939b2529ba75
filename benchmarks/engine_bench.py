"""The engine alone, without HTTP: closed-loop throughput and a profile of where a step's time goes.

    .venv/bin/python -m benchmarks.engine_bench --adapters 8 --requests 64 [--profile] [--dtype bfloat16]

Runs the harness's seeded workload through :class:`LLMEngine` in-process, ``--concurrency`` requests
in flight (a new one is submitted as each finishes), and prints output tokens/s. It is the quick loop
for engine work (a change's effect in a minute, no server start, no client CPU on the same cores);
``run_bench`` stays the measurement of record. ``--profile`` adds the torch profiler's top operators.
"""

from __future__ import annotations

import argparse
import logging
import queue
import shutil
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

from adapters.base_model import resolve_base_model
from adapters.lease import AdapterChoice
from benchmarks.adapter_factory import adapter_mix, write_random_adapter
from benchmarks.workload import WorkloadSpec, adapter_name, make_workload
from server.app import build_state
from server.config import Settings
from server.engine.types import GenerationOutput, GenerationRequest, SamplingParams


def run_closed_loop(state, requests, concurrency: int, logprobs: int | None = None) -> dict:
    """Keeps ``concurrency`` requests in the engine until all are done; returns throughput figures.
    ``logprobs``: every request asks for its tokens' logprobs and that many alternatives."""
    engine, registry = state.engine, state.registry
    outputs: queue.SimpleQueue[GenerationOutput] = queue.SimpleQueue()
    pending = list(reversed(requests))
    in_flight: dict[str, float] = {}
    ttfts, generated = [], 0

    def submit_next() -> None:
        req = pending.pop()
        params = SamplingParams(
            max_tokens=req.output_tokens, temperature=0.0, ignore_eos=True, logprobs=logprobs
        )
        lease = registry.lease(AdapterChoice(req.adapter or None))  # released by the engine
        request = GenerationRequest(uuid.uuid4().hex, list(req.prompt_token_ids), params, lease)
        in_flight[request.request_id] = time.perf_counter()
        engine.submit(request, outputs.put)

    started = time.perf_counter()
    while pending and len(in_flight) < concurrency:
        submit_next()
    seen_first: set[str] = set()
    while in_flight:
        out = outputs.get(timeout=600)
        if out.request_id not in seen_first:
            seen_first.add(out.request_id)
            ttfts.append(time.perf_counter() - in_flight[out.request_id])
        if out.finished:
            if out.error is not None:
                raise out.error
            generated += out.completion_tokens
            del in_flight[out.request_id]
            if pending:
                submit_next()
    wall = time.perf_counter() - started
    ttfts.sort()
    stats = engine.stats
    return {
        "requests": len(requests),
        "output_tokens": generated,
        "wall_s": round(wall, 2),
        "output_tokens_per_s": round(generated / wall, 1),
        "ttft_p50_ms": round(1000 * ttfts[len(ttfts) // 2], 1),
        "decode_steps": stats.steps,
        "mean_batch": round(stats.decode_rows / max(stats.steps, 1), 1),
        "decode_s": round(stats.decode_seconds, 2),
        "decode_ms_per_step": round(1000 * stats.decode_seconds / max(stats.steps, 1), 1),
        "wall_ms_per_step": round(1000 * wall / max(stats.steps, 1), 1),
        "prefill_s": round(stats.prefill_seconds, 2),
        "prefill_forwards": stats.prefill_forwards,
        "prefill_tokens_per_s": round(stats.prompt_tokens / max(stats.prefill_seconds, 1e-9), 1),
    }


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    if args.threads:
        torch.set_num_threads(args.threads)
    result, dtype = run(args)
    print(
        f"engine_bench adapters={args.adapters} quantization={args.quantization} dtype={dtype} "
        f"threads={args.threads}: {result}"
    )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--adapters", type=int, default=8, help="distinct adapters (0 = base only)")
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument(
        "--quantization", default="auto", choices=["auto", "w8a8", "w8", "nf4", "int8", "none"]
    )
    parser.add_argument("--logprobs", type=int, default=None, help="every request asks for logprobs, top K")
    parser.add_argument("--dtype", default="auto", help="the server's --dtype")
    parser.add_argument(
        "--threads", type=int, default=None, help="threads per engine thread (default: the server's)"
    )
    parser.add_argument("--prefill-worker", default="auto", choices=["auto", "on", "off"])
    parser.add_argument("--max-prefills-per-step", type=int, default=None)
    parser.add_argument("--profile", action="store_true", help="print the torch profiler's top operators")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default=None, help="the server's --device (default: cuda if available)")
    return parser.parse_args(argv)


@contextmanager
def engine_state(args: argparse.Namespace) -> Iterator:
    """The server's state on the default model with ``args.adapters`` random adapters resident, its
    engine started and warmed up (stats reset); stopped and cleaned up after."""
    model_dir = resolve_base_model(None)
    data_dir = Path(tempfile.mkdtemp(prefix="loraplex-engine-bench-"))
    try:
        for i in range(args.adapters):
            rank, targets = adapter_mix(i)
            write_random_adapter(model_dir, data_dir / "adapters" / adapter_name(i), rank, targets, seed=i)
        settings_kwargs = dict(
            data_dir=data_dir,
            quantization=args.quantization,
            dtype=args.dtype,
            torch_threads=args.threads,
            prefill_worker=args.prefill_worker,
            max_loaded_adapters=max(args.adapters, 1),
            device=args.device,
        )
        if args.max_prefills_per_step:
            settings_kwargs["max_prefills_per_step"] = args.max_prefills_per_step
        state = build_state(Settings(**settings_kwargs))
        for i in range(args.adapters):  # resident before timing: this measures serving, not loading
            state.registry.load(adapter_name(i))
        state.engine.start()
        try:
            warm = make_workload(WorkloadSpec(4, args.adapters, seed=args.seed + 1))
            run_closed_loop(state, warm, 4)
            state.engine.stats = type(state.engine.stats)()  # count the measured run only
            yield state
        finally:
            state.engine.stop()
    finally:
        shutil.rmtree(data_dir, ignore_errors=True)


def run(args: argparse.Namespace) -> tuple[dict, torch.dtype]:
    """Writes the adapters, serves the workload through an in-process engine; returns its figures
    and the compute dtype."""
    with engine_state(args) as state:
        requests = make_workload(WorkloadSpec(args.requests, args.adapters, seed=args.seed))
        if args.profile:
            from torch.profiler import ProfilerActivity, profile

            with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
                result = run_closed_loop(state, requests, args.concurrency, args.logprobs)
            print(
                prof.key_averages(group_by_input_shape=True).table(
                    sort_by="self_cpu_time_total", row_limit=30, max_name_column_width=50
                )
            )
        else:
            result = run_closed_loop(state, requests, args.concurrency, args.logprobs)
        return result, state.engine.runner.lora.dtype


if __name__ == "__main__":
    main()
