"""Per-step cost of each adapter type in the batched layers: one decode step's linears, no attention.

    .venv/bin/python -m benchmarks.adapter_types_bench [--rows 16] [--dtype float32] [--iters 20]

Builds the default model's linear layers (SmolLM2-135M: 30 layers × 7 linears, hidden 576,
intermediate 1536; plain weights, random) behind :class:`BatchedLoRAModel`, installs rank-16 LoRA,
rsLoRA, DoRA and IA³ adapters on every linear, and times one pass of ``--rows`` one-token rows through
all 210 linears for each batch make-up: base only, all rows one type (8 adapters of it), and a mix of
every type and the base. Prints milliseconds per step (median) with the compiled kernel and without.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch import nn

from adapters.batched_lora import BatchedLoRALinear, BatchedLoRAModel
from adapters.ia3 import IA3Module
from adapters.lora import LoRAModule, LoRAWeights

HIDDEN, INTERMEDIATE, KV, LAYERS = 576, 1536, 192, 30
SHAPES = {  # name -> (in, out)
    "q_proj": (HIDDEN, HIDDEN),
    "k_proj": (HIDDEN, KV),
    "v_proj": (HIDDEN, KV),
    "o_proj": (HIDDEN, HIDDEN),
    "gate_proj": (HIDDEN, INTERMEDIATE),
    "up_proj": (HIDDEN, INTERMEDIATE),
    "down_proj": (INTERMEDIATE, HIDDEN),
}
TYPES = ("lora", "rslora", "dora", "ia3")


def _model() -> nn.Module:
    layers = nn.ModuleList(
        nn.ModuleDict({name: nn.Linear(i, o, bias=False) for name, (i, o) in SHAPES.items()})
        for _ in range(LAYERS)
    )
    return nn.ModuleDict({"layers": layers})


def _weights(kind: str, name: str, shapes: dict[str, tuple[int, int]], rank: int = 16) -> LoRAWeights:
    modules: dict = {}
    for module, (i, o) in shapes.items():
        if kind == "ia3":
            feedforward = module.endswith("down_proj")
            modules[module] = IA3Module(1 + 0.1 * torch.randn(i if feedforward else o), feedforward)
            continue
        magnitude = torch.rand(o) + 0.5 if kind == "dora" else None
        scaling = 2.0 / rank**0.5 if kind == "rslora" else 2.0
        modules[module] = LoRAModule(
            0.01 * torch.randn(rank, i), 0.01 * torch.randn(o, rank), scaling, magnitude
        )
    config = {
        "peft_type": "IA3" if kind == "ia3" else "LORA",
        "use_dora": kind == "dora",
        "use_rslora": kind == "rslora",
    }
    return LoRAWeights(name, modules, config)


def _step(model: nn.Module, xs: dict[tuple[int, int], torch.Tensor]) -> None:
    for layer in model["layers"]:
        for name, linear in layer.items():
            linear(xs[SHAPES[name]])


def _time(model, lora, slots, xs, iters: int) -> float:
    times = []
    with torch.no_grad():
        for i in range(iters + 3):
            start = time.perf_counter()
            with lora.rows(slots):
                _step(model, xs)
            if i >= 3:
                times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=16)
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    dtype = getattr(torch, args.dtype)
    model = _model().to(dtype)
    lora = BatchedLoRAModel(model, dtype)
    per_type = 8
    lora.reserve_slots(1 + per_type * len(TYPES))
    slots_of: dict[str, list[int]] = {}
    for t, kind in enumerate(TYPES):
        slots_of[kind] = [1 + t * per_type + k for k in range(per_type)]
        for slot in slots_of[kind]:
            lora.install(slot, _weights(kind, f"{kind}{slot}", lora.linear_shapes))
    xs = {shape: torch.randn(args.rows, 1, shape[0], dtype=dtype) for shape in SHAPES.values()}
    layouts = {"base": [0] * args.rows}
    layouts.update({kind: [slots_of[kind][r % per_type] for r in range(args.rows)] for kind in TYPES})
    mix = [0] + [slots_of[k][0] for k in TYPES]
    layouts["mixed"] = [mix[r % len(mix)] for r in range(args.rows)]
    kernel = lora.kernel
    print(
        f"{args.rows} rows, {args.dtype}, {args.threads} thread(s), {LAYERS * len(SHAPES)} linears, rank 16"
    )
    print(f"{'batch':>8} {'kernel ms':>10} {'pytorch ms':>11}")
    for label, slots in layouts.items():
        with_kernel = _time(model, lora, slots, xs, args.iters) if kernel is not None else float("nan")
        for m in model.modules():
            if isinstance(m, BatchedLoRALinear):
                m.kernel = None
        without = _time(model, lora, slots, xs, args.iters)
        for m in model.modules():
            if isinstance(m, BatchedLoRALinear):
                m.kernel = kernel
        print(f"{label:>8} {with_kernel:>10.2f} {without:>11.2f}")


if __name__ == "__main__":
    main()
