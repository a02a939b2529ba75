"""Quality and speed of the base model's compute paths, side by side in one run.

    .venv/bin/python -m benchmarks.compute_paths [--paths none,w8,w8a8,nf4] [--threads 1]

For each path (``--quantization`` value: ``none`` is the fp32 reference) it reports, on a fixed text
(the bundled RAG corpus's ``peft.md``):

- perplexity of the text (teacher-forced full forward);
- top-1 agreement with the fp32 model at every position of the text (teacher-forced);
- greedy agreement: tokens of a 32-token greedy continuation of 4 prompts equal to fp32's, up to the
  first difference (free-running, so one early flip costs the rest);
- the engine's decode step in ms at 1 and 32 rows (the runner the server uses, min of 5 repeats),
  and its ratio to fp32's in this run.

Writes ``benchmarks/results/compute_paths.md`` and prints it. Numbers depend on the CPU: the table
names it.
"""

from __future__ import annotations

import argparse
import logging
import platform
import tempfile
import time
from pathlib import Path

import torch

from adapters.base_model import resolve_base_model
from server.app import build_state
from server.config import Settings

TEXT = Path(__file__).resolve().parents[1] / "rag" / "examples" / "corpus" / "peft.md"
PROMPTS = [
    "The capital of France is",
    "To fine-tune a language model with LoRA, you",
    "def fibonacci(n):",
    "Here is a short poem about the sea:",
]
OUT = Path(__file__).resolve().parent / "results" / "compute_paths.md"


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


@torch.inference_mode()
def text_scores(model, ids: torch.Tensor) -> tuple[float, torch.Tensor]:
    """Perplexity of ``ids`` (1, T) and the argmax prediction at each position."""
    logits = model(ids).logits[0, :-1].float()  # (T-1, V)
    nll = torch.nn.functional.cross_entropy(logits, ids[0, 1:])
    return float(torch.exp(nll)), logits.argmax(-1)


@torch.inference_mode()
def greedy(model, tokenizer, prompt: str, tokens: int = 32) -> list[int]:
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    out = model.generate(ids, max_new_tokens=tokens, do_sample=False, pad_token_id=tokenizer.eos_token_id)
    return out[0, ids.shape[1] :].tolist()


def agreed_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


@torch.inference_mode()
def step_ms(runner, rows: int, repeats: int = 5, steps: int = 10) -> float:
    best = float("inf")
    for _ in range(repeats):
        runner.reset_batch()
        for _ in range(rows):
            runner.prefill([(list(range(10, 74)), 0)])
        started = time.perf_counter()
        for _ in range(steps):
            runner.decode([5] * rows, [0] * rows)
        best = min(best, (time.perf_counter() - started) / steps)
    runner.reset_batch()
    return 1000 * best


def measure(path: str, threads: int, ids: torch.Tensor) -> dict:
    settings = Settings(
        data_dir=Path(tempfile.mkdtemp(prefix="loraplex-paths-")),
        quantization=path,
        prefill_worker="off",
        torch_threads=threads,
        dtype="float32" if path == "none" else "auto",
    )
    state = build_state(settings)
    model, tokenizer = state.engine.runner.model, state.engine.tokenizer
    ppl, predictions = text_scores(model, ids)
    continuations = [greedy(model, tokenizer, p) for p in PROMPTS]
    dtype = next(p for p in model.parameters() if p.is_floating_point()).dtype
    return {
        "path": path,
        "dtype": str(dtype).removeprefix("torch."),
        "ppl": ppl,
        "predictions": predictions,
        "continuations": continuations,
        "step1": step_ms(state.engine.runner, 1),
        "step32": step_ms(state.engine.runner, 32),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--paths", default="none,w8,w8a8,nf4", help="quantizations to compare; none = fp32 first"
    )
    parser.add_argument(
        "--threads", type=int, default=1, help="torch threads (the server's decode thread on 2 cores: 1)"
    )
    parser.add_argument("--text-tokens", type=int, default=512)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(resolve_base_model(None))
    ids = tokenizer(TEXT.read_text(), return_tensors="pt").input_ids[:, : args.text_tokens]
    paths = [p for p in args.paths.split(",") if p]
    if paths[0] != "none":
        paths.insert(0, "none")
    results = []
    for path in paths:
        print(f"measuring {path} ...", flush=True)
        results.append(measure(path, args.threads, ids))
    ref = results[0]
    lines = [
        f"Compute paths on {cpu_name()}, {args.threads} thread(s); text: {TEXT.name}, {ids.shape[1]} tokens.",
        "",
        "| path | dtype | perplexity | top-1 = fp32 (teacher-forced) | greedy prefix = fp32 (4×32 tokens)"
        " | decode step, 1 row | 32 rows | 1 row vs fp32 | 32 rows vs fp32 |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        agree = float((r["predictions"] == ref["predictions"]).float().mean())
        prefix = sum(agreed_prefix(a, b) for a, b in zip(r["continuations"], ref["continuations"]))
        total = sum(len(c) for c in ref["continuations"])
        lines.append(
            f"| {r['path']} | {r['dtype']} | {r['ppl']:.3f} | {agree:.1%} | {prefix}/{total} | "
            f"{r['step1']:.1f} ms | {r['step32']:.1f} ms | {ref['step1'] / r['step1']:.2f}× | "
            f"{ref['step32'] / r['step32']:.2f}× |"
        )
    table = "\n".join(lines) + "\n"
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(table)
    print(table)


if __name__ == "__main__":
    main()
