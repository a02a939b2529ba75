"""What constrained rows cost a decode step: sampling + grammar masks for a batch of 32, 0-32 constrained.

Run: ``python -m benchmarks.grammar_bench --step [--before-ref main] [--steps 60] [--threads 1]``.

On the default model's tokenizer (49,152 ids), 32 rows sample from random ``(32, V)`` logits (temperature
0.8 by default, seeded; penalties off), and 0 / 8 / 16 / 32 of them are constrained by ``TYPICAL_SCHEMA``.
Each constrained row is walked along the tokenizer's encoding of ``TYPICAL_DOCUMENT`` from its own offset, so
the rows are at different points of the document (as in a real batch). Timed per step (median):

- ``per-row``: each row through ``sample_row`` with its own grammar (its own mask and apply), the path
  the engine had before issue 12; with ``--before-ref`` it is measured on that git ref's ``server/``
  (extracted to a temporary folder, run in a subprocess), i.e. the code as it was.
- ``batched``: ``StepSampler.sample`` over the whole step (one fill, one apply), the engine's path now.
- ``forward``: the model's batch-32 decode forward (HF, float32, 48-token context), so the sampling time
  can be read against a whole step.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

BATCH = 32
CONSTRAINED = (0, 8, 16, 32)
RESULTS = Path(__file__).parent / "results"


def make_rows(compiled, doc_ids: list[int], constrained: int, temperature: float):
    """32 rows (seeded generators), the first ``constrained`` with a grammar at staggered offsets."""
    from server.engine.types import SamplingParams

    rows = []
    for i in range(BATCH):
        params = SamplingParams(max_tokens=512, temperature=temperature, seed=i)
        generator = torch.Generator().manual_seed(i)
        grammar, offset = None, 0
        if i < constrained:
            grammar, offset = compiled.new_row(), (i * 7) % (len(doc_ids) - 1)
            for token in doc_ids[:offset]:
                assert grammar.accept(token)
        rows.append({"params": params, "generator": generator, "grammar": grammar, "offset": offset})
    return rows


def advance(rows, compiled, doc_ids: list[int]) -> None:
    """Each constrained row takes the document's next token (restarting at its end)."""
    for row in rows:
        if row["grammar"] is None:
            continue
        if row["offset"] >= len(doc_ids):
            row["grammar"], row["offset"] = compiled.new_row(), 0
        assert row["grammar"].accept(doc_ids[row["offset"]])
        row["offset"] += 1


def time_steps(path: str, tokenizer, steps: int, temperature: float) -> dict[int, float]:
    """Median ms per step of ``path`` ("per-row" or "batched") for each constrained count."""
    from benchmarks.grammar_bench import TYPICAL_DOCUMENT, TYPICAL_SCHEMA
    from server.engine.sampling import sample_row
    from server.engine.structured import GrammarCompiler, GrammarSpec

    vocab_size = len(tokenizer)
    compiler = GrammarCompiler(tokenizer, vocab_size)
    compiled = compiler.compile(GrammarSpec.json_schema(TYPICAL_SCHEMA))
    doc_ids = tokenizer.encode(json.dumps(TYPICAL_DOCUMENT), add_special_tokens=False)
    logits_bank = torch.randn(8, BATCH, vocab_size, generator=torch.Generator().manual_seed(0))
    output_ids = [1, 2, 3]
    if path == "batched":
        from server.engine.step_sampler import RowToSample, StepSampler

        sampler = StepSampler(BATCH)
    medians = {}
    for constrained in CONSTRAINED:
        rows = make_rows(compiled, doc_ids, constrained, temperature)
        times = []
        logits = torch.empty(BATCH, vocab_size)
        for step in range(steps + 3):  # three warm-up steps
            logits.copy_(logits_bank[step % len(logits_bank)])  # the per-row path at main masks in place
            start = time.perf_counter()
            if path == "batched":
                batch = [
                    RowToSample(logits[i], output_ids, r["params"], r["generator"], None, r["grammar"])
                    for i, r in enumerate(rows)
                ]
                outcomes = sampler.sample(batch)
                assert not any(isinstance(o, Exception) for o in outcomes), outcomes
            else:
                for i, r in enumerate(rows):
                    sample_row(logits[i], output_ids, r["params"], r["generator"], None, r["grammar"])
            if step >= 3:
                times.append((time.perf_counter() - start) * 1e3)
            advance(rows, compiled, doc_ids)
        medians[constrained] = statistics.median(times)
    return medians


def forward_ms(model_dir: Path, steps: int) -> float:
    """Median ms of a batch-32 decode forward of the model, float32, after a 48-token prefill."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    ids = torch.randint(0, 1000, (BATCH, 48), generator=torch.Generator().manual_seed(0))
    times = []
    with torch.inference_mode():
        out = model(ids, use_cache=True)
        cache, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
        for step in range(min(steps, 20) + 2):
            start = time.perf_counter()
            out = model(token, past_key_values=cache, use_cache=True)
            if step >= 2:
                times.append((time.perf_counter() - start) * 1e3)
            cache, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
    return statistics.median(times)


def per_row_at_ref(ref: str, tokenizer_dir: Path, args: argparse.Namespace) -> dict[int, float]:
    """The per-row path measured on ``ref``'s own ``server/`` (and ``adapters/``) in a subprocess."""
    repo = Path(__file__).resolve().parent.parent
    with tempfile.TemporaryDirectory(prefix="grammar-step-ref-") as folder:
        archive = subprocess.run(
            ["git", "-C", str(repo), "archive", ref, "server", "adapters"], check=True, capture_output=True
        ).stdout
        subprocess.run(["tar", "-x", "-C", folder], input=archive, check=True)
        env = {
            **os.environ,
            "PYTHONPATH": f"{folder}{os.pathsep}{repo}",
        }  # server/ from ref, benchmarks/ here
        command = [sys.executable, "-m", "benchmarks.grammar_step_bench", "--only-per-row"]
        command += [
            "--tokenizer",
            str(tokenizer_dir),
            "--steps",
            str(args.steps),
            "--threads",
            str(args.threads),
        ]
        command += ["--temperature", str(args.temperature)]
        result = subprocess.run(command, cwd=folder, env=env, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"the per-row run at {ref} failed:\n{result.stderr[-2000:]}")
    return {int(k): v for k, v in json.loads(result.stdout.strip().splitlines()[-1]).items()}


def cpu_model() -> str:
    try:
        lines = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout.splitlines()
        name = next(line.split(":", 1)[1].strip() for line in lines if line.startswith("Model name"))
    except (OSError, subprocess.CalledProcessError, StopIteration):
        name = platform.processor() or "unknown CPU"
    return f"{name}, {os.cpu_count()} CPUs visible, load {os.getloadavg()[0]:.1f}"


def table(rows: dict[str, dict[int, float]], forward: float | None) -> str:
    """Sampling ms per path, and (with ``forward``) the whole step ms per path."""
    names = list(rows)
    step_names = [f"step ms = forward + {name.split(' ms')[0]}{name.split(' ms')[1]}" for name in names]
    columns = names + (step_names if forward is not None else [])
    lines = ["| constrained rows of 32 | " + " | ".join(columns) + " |", "|---:|" + "---:|" * len(columns)]
    for constrained in CONSTRAINED:
        cells = [f"{rows[name][constrained]:.2f}" for name in names]
        if forward is not None:
            cells += [f"{forward + rows[name][constrained]:.1f}" for name in names]
        lines.append(f"| {constrained} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def run(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: least noise when shared)")
    parser.add_argument("--temperature", type=float, default=0.8, help="every row's; 0 is greedy")
    parser.add_argument("--tokenizer", default=None, help="model folder (default: the converted base)")
    parser.add_argument("--before-ref", default=None, help="git ref whose per-row path to measure too")
    parser.add_argument("--no-forward", action="store_true", help="skip the model forward timing")
    parser.add_argument("--only-per-row", action="store_true", help=argparse.SUPPRESS)  # the ref subprocess
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    from benchmarks.grammar_bench import load_tokenizer

    tokenizer = load_tokenizer(args.tokenizer)
    if args.only_per_row:
        print(json.dumps(time_steps("per-row", tokenizer, args.steps, args.temperature)))
        return
    model_dir = Path(tokenizer.name_or_path)
    measured: dict[str, dict[int, float]] = {}
    if args.before_ref:
        measured[f"per-row ms ({args.before_ref})"] = per_row_at_ref(args.before_ref, model_dir, args)
    measured["per-row ms (this tree)"] = time_steps("per-row", tokenizer, args.steps, args.temperature)
    measured["batched ms (this tree)"] = time_steps("batched", tokenizer, args.steps, args.temperature)
    forward = None if args.no_forward else forward_ms(model_dir, args.steps)
    report = (
        f"Sampling + grammar masks per decode step, batch {BATCH}, vocab {len(tokenizer)}, "
        f"temperature {args.temperature}, medians of {args.steps} steps, torch threads {args.threads}; "
        f"{cpu_model()}.\n"
        + (f"Model forward (batch {BATCH}, float32, HF): {forward:.1f} ms.\n" if forward is not None else "")
        + "\n"
        + table(measured, forward)
        + "\n"
    )
    print(report)
    path = RESULTS / f"grammar_step_t{args.temperature:g}.md"
    path.write_text(
        "# Grammar masks: step overhead (`python -m benchmarks.grammar_bench --step`)\n\n" + report
    )


if __name__ == "__main__":
    run()
