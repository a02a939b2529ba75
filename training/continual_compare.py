"""``python -m training.continual_compare``: four ways to learn a second task after the first, measured.

Trains an adapter on the orders task (``training/examples/orders_*.jsonl``), then learns the returns
task (``returns_*.jsonl``) four ways and reports each one's exact match on both tasks' test rows:

- ``naive``: continue the orders adapter on returns rows only;
- ``replay``: continue it with ``--replay-fraction`` of old orders rows mixed in;
- ``ewc``: continue it with the EWC penalty (``--ewc-lambda``; :mod:`training.continual`);
- ``separate``: train a new adapter on returns and keep the orders one (each task uses its own
  adapter: nothing is forgotten, at the price of two adapters and of knowing which task a request is).

Every run uses ``loraplex train``'s own code (:func:`training.finetune.train`) on a fresh load of the
base; the scores come from greedy generation through PEFT (``training.evaluate.PeftGreedyGenerator``).
Writes ``results.json`` and ``continual_comparison.png`` into ``--out``.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from dataclasses import dataclass
from pathlib import Path

from adapters.base_model import QUANTIZATIONS, BaseModel, load_base_model, resolve_base_model
from adapters.store import AdapterStore
from training.args import ContinualArgs, DataArgs, LoRAArgs, OptimArgs, OutputArgs, TrainConfig
from training.data import read_dataset
from training.evaluate import PeftGreedyGenerator, examples_from, run_eval
from training.finetune import train

EXAMPLES = Path(__file__).parent / "examples"
STRATEGIES = ("naive", "replay", "ewc", "separate")


@dataclass(frozen=True)
class CompareArgs:
    """The comparison's sizes: small by default so that it runs in minutes on 2 CPU cores."""

    out: Path
    base_model: str | None = None
    quantization: str = "nf4"
    train_rows: int = 120  # per task
    test_rows: int = 40  # per task
    epochs: float = 2.0
    lr: float = 3e-3
    r: int = 8
    replay_fraction: float = 0.5
    ewc_lambda: float = 50.0
    max_tokens: int = 32
    seed: int = 42


def _subset(source: Path, rows: int, target: Path) -> Path:
    """The first ``rows`` lines of a JSONL file, written to ``target``."""
    lines = source.read_text().splitlines()[:rows]
    target.write_text("".join(line + "\n" for line in lines))
    return target


def _config(args: CompareArgs, data: Path, name: str, continual: ContinualArgs | None = None) -> TrainConfig:
    return TrainConfig(
        data=DataArgs(data=data, eval_fraction=0.1),
        output=OutputArgs(
            name=name, adapter_dir=args.out / "adapters", overwrite=True, quantization=args.quantization
        ),
        lora=LoRAArgs(r=args.r, alpha=2.0 * args.r, dropout=0.0),
        optim=OptimArgs(epochs=args.epochs, batch_size=8, lr=args.lr, seed=args.seed, warmup_ratio=0.0),
        continual=continual or ContinualArgs(),
    )


def _fresh_base(args: CompareArgs) -> BaseModel:
    return load_base_model(resolve_base_model(args.base_model), quantization=args.quantization)


def train_all(args: CompareArgs, files: dict[str, Path]) -> dict[str, tuple[str, str]]:
    """Trains orders, then returns four ways; strategy -> (adapter for orders, adapter for returns)."""
    train(_config(args, files["orders_train"], "orders"), base=_fresh_base(args))
    continued = {
        "naive": ContinualArgs(resume_from="orders", replay_data=files["orders_train"], replay_fraction=0.0),
        "replay": ContinualArgs(
            resume_from="orders", replay_data=files["orders_train"], replay_fraction=args.replay_fraction
        ),
        "ewc": ContinualArgs(
            resume_from="orders",
            replay_data=files["orders_train"],
            replay_fraction=0.0,
            ewc_lambda=args.ewc_lambda,
        ),
    }
    adapters = {"orders-only": ("orders", "orders")}
    for strategy, continual in continued.items():
        name = f"returns-{strategy}"
        train(_config(args, files["returns_train"], name, continual), base=_fresh_base(args))
        adapters[strategy] = (name, name)
    train(_config(args, files["returns_train"], "returns-separate"), base=_fresh_base(args))
    adapters["separate"] = ("orders", "returns-separate")
    return adapters


def evaluate_all(args: CompareArgs, files: dict[str, Path], adapters: dict[str, tuple[str, str]]) -> dict:
    """Exact match (and token F1) on both tasks' test rows for each strategy's adapters."""
    generate = PeftGreedyGenerator(_fresh_base(args), AdapterStore(args.out / "adapters").require)
    tests = {task: examples_from(read_dataset(files[f"{task}_test"])) for task in ("orders", "returns")}
    cache: dict[tuple[str, str], dict] = {}
    results = {}
    for strategy, (for_orders, for_returns) in adapters.items():
        row = {}
        for task, adapter in (("orders", for_orders), ("returns", for_returns)):
            if (task, adapter) not in cache:
                cache[task, adapter] = run_eval(
                    tests[task], generate, adapter, args.max_tokens
                ).scores.as_dict()
            row[task] = {"adapter": adapter, **cache[task, adapter]}
        results[strategy] = row
    return results


def plot(results: dict, path: Path) -> None:
    """A grouped bar chart: old-task (orders) and new-task (returns) exact match per strategy."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(results)
    positions = range(len(names))
    fig, ax = plt.subplots(figsize=(7, 3.5))
    for offset, task, label in (
        (-0.2, "orders", "old task (orders)"),
        (0.2, "returns", "new task (returns)"),
    ):
        ax.bar(
            [p + offset for p in positions],
            [results[n][task]["exact_match"] for n in names],
            0.4,
            label=label,
        )
    ax.set_xticks(list(positions), names)
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("exact match")
    ax.set_title("Learning returns after orders")
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.12), ncol=2, fontsize=8)  # below the bars
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def format_table(results: dict) -> str:
    lines = [f"{'strategy':<12} {'orders EM':>9} {'returns EM':>10}  adapters (orders / returns)"]
    for strategy, row in results.items():
        lines.append(
            f"{strategy:<12} {row['orders']['exact_match']:>9.3f} {row['returns']['exact_match']:>10.3f}  "
            f"{row['orders']['adapter']} / {row['returns']['adapter']}"
        )
    return "\n".join(lines)


def run(args: CompareArgs, examples: Path = EXAMPLES) -> dict:
    """Trains and evaluates everything; writes ``results.json`` and the plot; returns the results."""
    args.out.mkdir(parents=True, exist_ok=True)
    files = {}
    for task in ("orders", "returns"):
        files[f"{task}_train"] = _subset(
            examples / f"{task}_train.jsonl", args.train_rows, args.out / f"{task}_train.jsonl"
        )
        files[f"{task}_test"] = _subset(
            examples / f"{task}_test.jsonl", args.test_rows, args.out / f"{task}_test.jsonl"
        )
    results = evaluate_all(args, files, train_all(args, files))
    (args.out / "results.json").write_text(
        json.dumps({"args": _jsonable(args), "results": results}, indent=2)
    )
    plot(results, args.out / "continual_comparison.png")
    return results


def _jsonable(args: CompareArgs) -> dict:
    return {key: str(value) if isinstance(value, Path) else value for key, value in vars(args).items()}


def build_parser() -> argparse.ArgumentParser:
    d = CompareArgs(out=Path("data/continual_compare"))
    parser = argparse.ArgumentParser(
        prog="python -m training.continual_compare",
        description="Train orders, then learn returns four ways (naive, replay, EWC, separate adapter); "
        "report old- and new-task exact match and plot them.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--out", type=Path, default=d.out, help="results.json, the PNG and the adapters")
    parser.add_argument("--base-model", help="HF directory or .gguf (default: the server's default model)")
    parser.add_argument("--quantization", choices=QUANTIZATIONS, default=d.quantization)
    for flag, value in (
        ("--train-rows", d.train_rows),
        ("--test-rows", d.test_rows),
        ("--r", d.r),
        ("--max-tokens", d.max_tokens),
        ("--seed", d.seed),
    ):
        parser.add_argument(flag, type=int, default=value)
    for flag, value in (
        ("--epochs", d.epochs),
        ("--lr", d.lr),
        ("--replay-fraction", d.replay_fraction),
        ("--ewc-lambda", d.ewc_lambda),
    ):
        parser.add_argument(flag, type=float, default=value)
    return parser


def main(argv: list[str] | None = None) -> int:
    ns = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    args = CompareArgs(**{key.replace("-", "_"): value for key, value in vars(ns).items()})
    results = run(args)
    print(format_table(results))
    print(f"results: {args.out / 'results.json'}  plot: {args.out / 'continual_comparison.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
