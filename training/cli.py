"""``loraplex train`` (also ``python -m training``): a JSONL dataset in, a served adapter out."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from dataclasses import fields
from pathlib import Path

from adapters.base_model import QUANTIZATIONS, BaseModelError
from adapters.errors import AdapterExists, AdapterInvalid, AdapterNameInvalid, AdapterNotFound
from adapters.peft_types import TRAIN_METHODS
from adapters.shared_settings import SharedSettings
from training.args import (
    OVERLONG_POLICIES,
    SCHEDULERS,
    UNFREEZE_MODES,
    ArgumentError,
    ContinualArgs,
    DataArgs,
    LoRAArgs,
    OptimArgs,
    OutputArgs,
    TrainConfig,
)
from training.data import DatasetError

EXIT_BAD_INPUT = 2
EXIT_REGISTER_FAILED = 3


def default_adapter_dir() -> Path:
    """The server's adapter store: ``$LORAPLEX_ADAPTER_DIR``, else ``$LORAPLEX_DATA_DIR/adapters``."""
    return SharedSettings().adapter_store


def build_parser(prog: str = "loraplex train") -> argparse.ArgumentParser:
    d_data = {f.name: f for f in fields(DataArgs)}  # DataArgs needs a real file: read defaults off the class
    d_lora, d_optim, d_cont = LoRAArgs(), OptimArgs(), ContinualArgs()
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Train an adapter (QLoRA: LoRA, rsLoRA, DoRA, IA3, prompt or prefix tuning) on the "
        "server's base model and write it into the "
        "adapter store.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    data = parser.add_argument_group("data")
    data.add_argument(
        "--data", type=Path, required=True, help="training JSONL (chat 'messages' or prompt/completion)"
    )
    data.add_argument(
        "--eval-data", type=Path, help="evaluation JSONL (default: hold out --eval-fraction of --data)"
    )
    data.add_argument("--eval-fraction", type=float, default=d_data["eval_fraction"].default)
    data.add_argument(
        "--max-seq-length", type=int, default=d_data["max_seq_length"].default, help="in tokens"
    )
    data.add_argument(
        "--overlong",
        choices=OVERLONG_POLICIES,
        default="drop",
        help="what to do with rows over --max-seq-length",
    )
    data.add_argument("--strict", action="store_true", help="fail on any invalid row instead of skipping it")

    out = parser.add_argument_group("output")
    out.add_argument("--name", required=True, help="adapter name in the store ([A-Za-z0-9._-]{1,64})")
    out.add_argument(
        "--adapter-dir",
        type=Path,
        default=None,
        help="adapter store (default: $LORAPLEX_ADAPTER_DIR, else $LORAPLEX_DATA_DIR/adapters, "
        "else data/adapters)",
    )
    out.add_argument("--overwrite", action="store_true", help="replace an existing adapter of that name")
    out.add_argument("--base-model", help="HF directory or .gguf file (default: the server's default model)")
    out.add_argument(
        "--quantization", choices=QUANTIZATIONS, default="nf4", help="base quantization (as served)"
    )
    out.add_argument("--device", help="cpu, cuda, cuda:1 … (default: cuda if available)")
    out.add_argument(
        "--checkpoint-dir", type=Path, help="Trainer checkpoints (default: <adapter-dir>/.runs/NAME)"
    )
    out.add_argument(
        "--resume-checkpoint", help="continue an interrupted run from a checkpoint folder, or 'last'"
    )
    out.add_argument(
        "--register", metavar="URL", help="hot-load the adapter into the server at URL when done"
    )
    out.add_argument("--api-key", help="admin API key for --register")

    lora = parser.add_argument_group("LoRA")
    lora.add_argument("--r", type=int, default=d_lora.r, help="rank")
    lora.add_argument(
        "--alpha", type=float, default=d_lora.alpha, help="scaling numerator (ΔW = alpha/r · BA)"
    )
    lora.add_argument("--dropout", type=float, default=d_lora.dropout)
    lora.add_argument(
        "--target-modules",
        default="all-linear",
        help="comma-separated module names (q_proj,v_proj) or all-linear",
    )
    lora.add_argument("--layers", type=int, help="train only the top N transformer layers (default: all)")
    lora.add_argument(
        "--method",
        choices=TRAIN_METHODS,
        default=d_lora.method,
        help="lora; rslora (alpha/sqrt(r)); dora (weight-decomposed LoRA); ia3 (learned activation "
        "scaling); prompt-tuning (learned virtual input tokens); prefix-tuning (learned virtual keys and "
        "values in every layer). The last three take no --r/--alpha/--dropout/--layers",
    )
    lora.add_argument(
        "--num-virtual-tokens",
        type=int,
        default=d_lora.num_virtual_tokens,
        help="prompt-tuning and prefix-tuning: how many virtual tokens the adapter puts before every "
        "prompt (they count against the context length when served)",
    )

    optim = parser.add_argument_group("optimisation")
    optim.add_argument("--epochs", type=float, default=d_optim.epochs)
    optim.add_argument("--max-steps", type=int, help="optimizer steps (overrides --epochs)")
    optim.add_argument("--batch-size", type=int, default=d_optim.batch_size)
    optim.add_argument(
        "--grad-accum", type=int, default=d_optim.grad_accum, help="gradient accumulation steps"
    )
    optim.add_argument("--lr", type=float, default=d_optim.lr, help="peak learning rate")
    optim.add_argument("--scheduler", choices=SCHEDULERS, default=d_optim.scheduler)
    optim.add_argument("--warmup-ratio", type=float, default=d_optim.warmup_ratio)
    optim.add_argument("--warmup-steps", type=int, help="overrides --warmup-ratio")
    optim.add_argument("--weight-decay", type=float, default=d_optim.weight_decay)
    optim.add_argument("--max-grad-norm", type=float, default=d_optim.max_grad_norm, help="gradient clipping")
    optim.add_argument("--seed", type=int, default=d_optim.seed)
    optim.add_argument("--eval-steps", type=int, help="evaluate every N steps (default: 4 times per run)")
    optim.add_argument(
        "--early-stopping-patience", type=int, default=0, help="evaluations without gain (0=off)"
    )
    optim.add_argument("--logging-steps", type=int, help="log train loss every N steps (default: ~50 points)")
    optim.add_argument(
        "--save-steps", type=int, default=0, help="Trainer checkpoint every N steps (0 = none)"
    )
    optim.add_argument("--gradient-checkpointing", action="store_true", help="less memory, ~30%% slower")
    optim.add_argument(
        "--unfreeze",
        choices=UNFREEZE_MODES,
        default=d_optim.unfreeze,
        help="all: every adapter layer trains from the first step. gradual (ULMFiT): the run's steps are "
        "split into --unfreeze-stages equal stages; in stage k of N the adapters of the top ceil(k*L/N) "
        "of the model's L layers train and the lower ones stay as initialised, so the top layers train "
        "first and the last stage trains all (LoRA, rsLoRA, DoRA and IA3 only)",
    )
    optim.add_argument(
        "--unfreeze-stages",
        type=int,
        default=d_optim.unfreeze_stages,
        help="with --unfreeze gradual: how many stages (at most the model's layers)",
    )

    cont = parser.add_argument_group("continual fine-tuning")
    cont.add_argument(
        "--resume-from", metavar="ADAPTER", help="continue training this adapter from the store"
    )
    cont.add_argument(
        "--replay-data", type=Path, help="old task data (default: the old card's training file)"
    )
    cont.add_argument(
        "--replay-fraction", type=float, default=d_cont.replay_fraction, help="old rows / new rows"
    )
    cont.add_argument(
        "--ewc-lambda", type=float, default=d_cont.ewc_lambda, help="EWC penalty strength (0 = off)"
    )
    cont.add_argument("--ewc-samples", type=int, default=d_cont.ewc_samples, help="old rows for the Fisher")
    cont.add_argument(
        "--old-eval-rows", type=int, default=d_cont.old_eval_rows, help="old rows to measure forgetting"
    )

    parser.add_argument("--quiet", action="store_true", help="warnings only (no progress bar)")
    return parser


def config_from_args(ns: argparse.Namespace) -> TrainConfig:
    """Builds the argument groups; raises :class:`ArgumentError` naming the bad flag."""
    return TrainConfig(
        data=DataArgs(
            data=ns.data,
            eval_data=ns.eval_data,
            eval_fraction=ns.eval_fraction,
            max_seq_length=ns.max_seq_length,
            overlong=ns.overlong,
            strict=ns.strict,
        ),
        output=OutputArgs(
            name=ns.name,
            adapter_dir=ns.adapter_dir or default_adapter_dir(),
            overwrite=ns.overwrite,
            base_model=ns.base_model,
            quantization=ns.quantization,
            device=ns.device,
            checkpoint_dir=ns.checkpoint_dir,
            resume_checkpoint=ns.resume_checkpoint,
            register=ns.register,
            api_key=ns.api_key,
        ),
        lora=LoRAArgs(
            r=ns.r,
            alpha=ns.alpha,
            dropout=ns.dropout,
            target_modules=ns.target_modules,
            layers=ns.layers,
            method=ns.method,
            num_virtual_tokens=ns.num_virtual_tokens,
        ),
        optim=OptimArgs(
            epochs=ns.epochs,
            max_steps=ns.max_steps,
            batch_size=ns.batch_size,
            grad_accum=ns.grad_accum,
            lr=ns.lr,
            scheduler=ns.scheduler,
            warmup_ratio=ns.warmup_ratio,
            warmup_steps=ns.warmup_steps,
            weight_decay=ns.weight_decay,
            max_grad_norm=ns.max_grad_norm,
            seed=ns.seed,
            eval_steps=ns.eval_steps,
            early_stopping_patience=ns.early_stopping_patience,
            logging_steps=ns.logging_steps,
            save_steps=ns.save_steps,
            gradient_checkpointing=ns.gradient_checkpointing,
            unfreeze=ns.unfreeze,
            unfreeze_stages=ns.unfreeze_stages,
        ),
        continual=ContinualArgs(
            resume_from=ns.resume_from,
            replay_data=ns.replay_data,
            replay_fraction=ns.replay_fraction,
            ewc_lambda=ns.ewc_lambda,
            ewc_samples=ns.ewc_samples,
            old_eval_rows=ns.old_eval_rows,
        ),
    )


def _print_result(card: dict, path: Path) -> None:
    summary, speed = card["summary"], card["speed"]
    print(f"adapter '{card['name']}' written to {path}")
    print(f"  base: {summary['base_model']} (weights sha256 {summary['base_weights_sha256'][:12]}…)")
    for entry in card["metrics"]["evaluations"]:
        print(
            f"  step {entry['step']:>5}: eval loss {entry['eval_loss']:.4f} "
            f"(perplexity {entry['perplexity']:.2f})"
            + (f", train loss {entry['train_loss']:.4f}" if entry["train_loss"] is not None else "")
        )
    print(
        f"  {speed['tokens_trained']} tokens in {speed['train_seconds']:.1f}s of training "
        f"({speed['tokens_per_second']:.0f} tokens/s), wall time {speed['wall_time_seconds']:.1f}s, "
        f"peak RSS {speed['peak_rss_bytes'] / 2**20:.0f} MiB"
    )
    if card["continual"]:
        print("  continual: " + json.dumps(card["continual"]))
    print(f"  card: {path / 'training_card.json'}  loss curve: {path / 'loss_curve.png'}")


def main(argv: list[str] | None = None) -> int:
    """Runs ``loraplex train``; returns the process exit status (0 ok, 2 bad input, 3 register failed)."""
    ns = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.WARNING if ns.quiet else logging.INFO, format="%(levelname)s %(name)s: %(message)s"
    )
    try:
        config = config_from_args(ns)
    except ArgumentError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    from training.finetune import train  # heavy imports only once the arguments are known good
    from training.register import RegistrationError, register_adapter

    try:
        result = train(config)
    except (
        ArgumentError,
        DatasetError,
        AdapterExists,
        AdapterNotFound,
        AdapterNameInvalid,
        AdapterInvalid,
        BaseModelError,
    ) as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print("interrupted: no adapter was written", file=sys.stderr)
        return 130
    _print_result(result.card, result.adapter_path)
    if config.output.register:
        try:
            register_adapter(config.output.register, config.output.name, config.output.api_key)
        except RegistrationError as e:
            print(
                f"error: {e} (the adapter is saved; load it with POST /v1/adapters/NAME/load)",
                file=sys.stderr,
            )
            return EXIT_REGISTER_FAILED
        print(f"  registered with {config.output.register}")
    return 0
