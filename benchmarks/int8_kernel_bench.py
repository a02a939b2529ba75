"""GMAC/s of the int8 CPU kernels, ``w8`` (fp32 activations) against ``w8a8`` (int8 activations per
block), in one run, on SmolLM2-135M's layer shapes (issue 14).

    .venv/bin/python -m benchmarks.int8_kernel_bench [--rows 1,32] [--threads 1,2] [--blocks 64]

Each figure is the best of ``--repeats`` timings of all the model's linear shapes in turn (weights
larger than the caches, as in a decode step), so noise from other processes only lowers it.
"""

from __future__ import annotations

import argparse
import time

import torch

from adapters import kernels
from adapters.int8_linear import Int8Linear
from benchmarks.compute_paths import cpu_name

# SmolLM2-135M: (in, out, layers) of q/o, k/v, gate/up, down; the LM head once
SHAPES = [(576, 576, 60), (576, 192, 60), (576, 1536, 60), (1536, 576, 30), (576, 49152, 1)]


def layers(activation_block: int | None) -> list[Int8Linear]:
    generator = torch.Generator().manual_seed(0)
    out = []
    for in_features, out_features, count in SHAPES:
        for _ in range(max(1, count // 10)):  # a tenth of the layers: still far beyond L2
            weight = torch.randint(
                -127, 128, (out_features, in_features), dtype=torch.int8, generator=generator
            )
            scale = torch.rand(out_features, generator=generator) / 100
            out.append(Int8Linear(weight, scale, None, activation_block))
    return out


def gmacs(paths: dict[str, list[Int8Linear]], rows: int, repeats: int) -> dict[str, float]:
    """Best GMAC/s of each path; the paths take turns within each repeat, so load hits all alike."""
    inputs = {f: torch.randn(rows, f) for f, _, _ in SHAPES}
    best = dict.fromkeys(paths, float("inf"))
    with torch.inference_mode():
        for _ in range(repeats):
            for name, model in paths.items():
                started = time.perf_counter()
                for m in model:
                    m(inputs[m.in_features])
                best[name] = min(best[name], time.perf_counter() - started)
    macs = {name: sum(rows * m.in_features * m.out_features for m in model) for name, model in paths.items()}
    return {name: macs[name] / best[name] / 1e9 for name in paths}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rows", default="1,32")
    parser.add_argument("--threads", default="1,2")
    parser.add_argument("--blocks", default="64", help="w8a8 activation blocks to compare")
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args(argv)
    if kernels.int8_linear_a8() is None:
        raise SystemExit("the compiled kernels are not available here (python -m adapters.kernels)")
    paths = {"w8": layers(None)}
    for block in (int(b) for b in args.blocks.split(",")):
        paths[f"w8a8/{block}"] = layers(block)
    print(f"{cpu_name()}; w8a8 ISA: {kernels.int8_linear_a8_isa()}")
    print("| rows | threads | " + " | ".join(f"{p} GMAC/s" for p in paths) + " | best w8a8 / w8 |")
    print("|---|---|" + "---|" * (len(paths) + 1))
    for threads in (int(t) for t in args.threads.split(",")):
        torch.set_num_threads(threads)
        for rows in (int(r) for r in args.rows.split(",")):
            figures = gmacs(paths, rows, args.repeats)
            best = max(v for p, v in figures.items() if p != "w8")
            cells = " | ".join(f"{v:.1f}" for v in figures.values())
            print(f"| {rows} | {threads} | {cells} | {best / figures['w8']:.2f}× |", flush=True)


if __name__ == "__main__":
    main()
