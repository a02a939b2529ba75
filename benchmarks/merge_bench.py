"""Merge latency: the first request of a merge spec (compute the merge) and a cached one (key lookup).

Random rank-``r`` adapters on every linear layer of the default model's shapes (SmolLM2-135M), already
loaded as :class:`~adapters.lora.LoRAWeights`, so the numbers are the merge itself, not disk reads
nor the copy into the adapter banks.

    .venv/bin/python -m benchmarks.merge_bench [--parts 2 4] [--rank 8] [--out results/merge]

Prints a Markdown table and writes ``merge_bench-<device>-<threads>t.json`` under ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path

import torch
from torch import nn

from adapters.base_model import default_cache_dir
from adapters.lora import LoRAModule, LoRAWeights
from adapters.merging import DENSITY_METHODS, METHODS, MergeSpec, canonical_key, merge_lora, merged_name

# SmolLM2-135M, for machines where the default model was never converted.
SMOLLM2_135M = {
    "model_type": "llama",
    "hidden_size": 576,
    "intermediate_size": 1536,
    "num_hidden_layers": 30,
    "num_attention_heads": 9,
    "num_key_value_heads": 3,
    "vocab_size": 49152,
    "tie_word_embeddings": True,
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--parts", type=int, nargs="+", default=[2, 4], help="adapters per merge")
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--density", type=float, default=0.5, help="for ties, dare_*, magnitude_prune")
    parser.add_argument("--first-repeats", type=int, default=5, help="merges timed per cell (median)")
    parser.add_argument("--cached-repeats", type=int, default=2000, help="cached lookups timed per cell")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--device", default="cpu", help="where the adapters live (cpu, cuda)")
    parser.add_argument("--config", type=Path, default=None, help="a model's config.json (default: SmolLM2)")
    parser.add_argument("--out", type=Path, default=Path("results/merge"))
    return parser.parse_args(argv)


def find_model_config(explicit: Path | None) -> tuple[dict, str]:
    """The config to take shapes from: ``--config``, the converted default model, or SmolLM2's numbers."""
    if explicit is not None:
        return json.loads(explicit.read_text()), str(explicit)
    converted = sorted((default_cache_dir() / "models").glob("SmolLM2-135M*/config.json"))
    if converted:
        return json.loads(converted[0].read_text()), str(converted[0])
    return dict(SMOLLM2_135M), "built-in SmolLM2-135M shapes"


def linear_shapes(config: dict) -> dict[str, tuple[int, int]]:
    """Module name -> (in, out) of every adaptable linear, from a model built on the meta device."""
    from transformers import AutoConfig, AutoModelForCausalLM

    model_config = AutoConfig.for_model(**config)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(model_config)
    return {
        name: (module.in_features, module.out_features)
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and not name.endswith("lm_head")
    }


def random_adapter(
    name: str, shapes: dict[str, tuple[int, int]], rank: int, seed: int, device: str = "cpu"
) -> LoRAWeights:
    """A rank-``rank`` adapter on every linear, with trained-adapter-like magnitudes."""
    generator = torch.Generator().manual_seed(seed)
    modules = {
        module: LoRAModule(
            lora_A=(torch.randn(rank, in_features, generator=generator) / in_features**0.5).to(
                device
            ),  # (r, in)
            lora_B=(torch.randn(out_features, rank, generator=generator) * 0.01).to(device),  # (out, r)
            scaling=2.0,
        )
        for module, (in_features, out_features) in shapes.items()
    }
    config = {"peft_type": "LORA", "r": rank, "lora_alpha": 2 * rank, "target_modules": sorted(shapes)}
    return LoRAWeights(name=name, modules=modules, config=config)


def request_for(names: list[str], method: str, density: float) -> dict:
    weights = [round(1 / len(names), 4)] * len(names)
    return {
        "merge": [{"name": n, "weight": w} for n, w in zip(names, weights)],
        "method": method,
        "density": density if method in DENSITY_METHODS else None,
    }


def time_calls(fn: Callable[[], object], repeats: int) -> list[float]:
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        seconds.append(time.perf_counter() - start)
    return seconds


def bench_cell(adapters: list[LoRAWeights], method: str, args: argparse.Namespace) -> dict:
    """Times one (number of parts, method) cell: first request and cached request."""
    request = request_for([a.name for a in adapters], method, args.density)
    cache: dict[str, LoRAWeights] = {}

    def first_request() -> LoRAWeights:
        spec = MergeSpec.from_request(request, max_parts=8)
        merged = merge_lora(spec, adapters, merged_name(spec))
        cache[canonical_key(spec)] = merged
        if merged.modules and next(iter(merged.modules.values())).lora_A.is_cuda:
            torch.cuda.synchronize()
        return merged

    def cached_request() -> LoRAWeights:
        spec = MergeSpec.from_request(request, max_parts=8)
        return cache[canonical_key(spec)]

    merged = first_request()  # warm-up (allocator, kernels)
    first = time_calls(first_request, args.first_repeats)
    cached = time_calls(cached_request, args.cached_repeats)
    return {
        "parts": len(adapters),
        "method": method,
        "merged_rank": merged.rank,
        "first_ms_median": 1e3 * statistics.median(first),
        "first_ms_min": 1e3 * min(first),
        "cached_us_median": 1e6 * statistics.median(cached),
        "cached_us_p99": 1e6 * sorted(cached)[int(0.99 * (len(cached) - 1))],
    }


def markdown_table(rows: list[dict]) -> str:
    lines = [
        "| adapters | method | merged rank | first request (ms, median) | first (ms, min) "
        "| cached (µs, median) | cached (µs, p99) |",
        "|---:|---|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        lines.append(
            f"| {row['parts']} | {row['method']} | {row['merged_rank']} | {row['first_ms_median']:.1f} "
            f"| {row['first_ms_min']:.1f} | {row['cached_us_median']:.1f} | {row['cached_us_p99']:.1f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    config, config_source = find_model_config(args.config)
    shapes = linear_shapes(config)
    pool = [
        random_adapter(f"bench-{i}", shapes, args.rank, seed=i, device=args.device)
        for i in range(max(args.parts))
    ]
    rows = [bench_cell(pool[:parts], method, args) for parts in args.parts for method in args.methods]

    print(
        f"model shapes: {config_source} ({len(shapes)} linear layers); rank {args.rank}; "
        f"torch {torch.__version__}, {args.device}, {torch.get_num_threads()} threads, "
        f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores"
    )
    print(markdown_table(rows))
    args.out.mkdir(parents=True, exist_ok=True)
    result = {
        "benchmark": "merge_latency",
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "model_shapes": config_source,
        "linear_layers": len(shapes),
        "rank": args.rank,
        "density": args.density,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "device": args.device if args.device == "cpu" else torch.cuda.get_device_name(),
        "cpu_count": os.cpu_count(),
        "load_average_1min": os.getloadavg()[0],
        "platform": platform.platform(),
        "rows": rows,
    }
    out_file = args.out / f"merge_bench-{args.device}-{torch.get_num_threads()}t.json"
    out_file.write_text(json.dumps(result, indent=2))
    print(f"wrote {out_file}")


if __name__ == "__main__":
    main()
