"""One QLoRA training run: ``setup → main → fit → validate``, then an atomic write into the store.

- ``setup`` checks everything cheap first — the adapter name, the data (validated and tokenized with the
  base's own tokenizer) — and only then loads the base model, so no compute is spent on bad input.
- ``main`` wraps the base with LoRA (new, or resumed from the store), builds transformers' ``Trainer``
  and measures the old task when continuing an adapter.
- ``fit`` runs the loop (checkpoints, resume, schedulers, progress bar and early stopping are
  ``Trainer``'s); ``validate`` runs the final evaluation.
- The adapter is saved into a hidden staging folder of the store with its card and loss curve, checked
  with the server's own validator, and renamed into place: an interrupted run leaves nothing servable.
"""

from __future__ import annotations

import logging
import math
import resource
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from adapters.base_model import BaseModel, load_base_model, resolve_base_model
from adapters.errors import AdapterExists
from adapters.lora import load_lora_weights
from adapters.peft_types import adapter_type
from adapters.prefix_tuning import attention_shape_of
from adapters.store import CARD_FILE, AdapterStore
from training.args import ArgumentError, TrainConfig
from training.card import build_card, perplexity, write_card
from training.continual import EWCPenalty, OldTaskRows, estimate_fisher, split_old_rows
from training.data import DatasetError, read_dataset, split_holdout
from training.label_loss import label_position_loss
from training.lora_model import (
    attach_new_adapter,
    attach_stored_adapter,
    lora_parameters,
    num_hidden_layers,
    prepare_for_training,
)
from training.loss_curve import LOSS_CURVE_FILE, plot_loss_curve
from training.tokenization import PaddingCollator, TokenizedDataset, TokenizedSet, tokenize_dataset

logger = logging.getLogger(__name__)


@dataclass
class PreparedData:
    """Tokenized rows ready for the loop, and their description for the card."""

    train: TokenizedSet
    eval: TokenizedSet | None
    old: OldTaskRows | None
    card: dict


@dataclass
class TrainResult:
    adapter_path: Path
    card: dict
    registration: dict | None = None


@dataclass
class _RunClock:
    started: float = field(default_factory=time.perf_counter)
    eval_seconds: float = 0.0


def train(config: TrainConfig, callbacks: list | None = None, base: BaseModel | None = None) -> TrainResult:
    """Trains one adapter as configured and writes it into the store; see :func:`setup`.

    Args:
        config: every argument group.
        callbacks: extra ``TrainerCallback`` objects (tests use one to interrupt a run).
        base: an already loaded base model to train on (it is modified: LoRA layers are injected).

    Raises:
        ArgumentError, DatasetError, AdapterExists, AdapterNotFound, BaseModelError: bad input,
            detected before training starts.
    """
    return setup(config, callbacks or [], base)


def setup(config: TrainConfig, callbacks: list, base: BaseModel | None) -> TrainResult:
    clock = _RunClock()
    store = AdapterStore(config.output.adapter_dir)
    if store.exists(config.output.name) and not config.output.overwrite:
        raise AdapterExists(config.output.name)
    old_folder = store.require(config.continual.resume_from) if config.continual.resume_from else None
    train_set = read_dataset(config.data.data, strict=config.data.strict)
    eval_set = (
        read_dataset(config.data.eval_data, strict=config.data.strict) if config.data.eval_data else None
    )
    base_dir = base.path if base is not None else resolve_base_model(config.output.base_model)
    tokenizer = base.tokenizer if base is not None else _load_tokenizer(base_dir)
    data = prepare_data(config, tokenizer, train_set, eval_set, store)
    if base is None:
        base = load_base_model(base_dir, quantization=config.output.quantization, device=config.output.device)
    return main(config, store, base, data, old_folder, callbacks, clock)


def _load_tokenizer(base_dir: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(base_dir)


def prepare_data(config: TrainConfig, tokenizer, train_set, eval_set, store: AdapterStore) -> PreparedData:
    """Tokenizes train/eval (holding out a seeded fraction if no eval file) and the old task's rows."""
    args = config.data
    train_rows, held_out = train_set.examples, []
    if eval_set is None:
        train_rows, held_out = split_holdout(train_set.examples, args.eval_fraction, config.optim.seed)
    train_tok = tokenize_dataset(tokenizer, train_rows, args.max_seq_length, args.overlong)
    if not train_tok.examples:
        raise DatasetError(args.data, "no row is left after tokenization", train_tok.issues)
    eval_source = eval_set.examples if eval_set is not None else held_out
    eval_tok = (
        tokenize_dataset(tokenizer, eval_source, args.max_seq_length, args.overlong) if eval_source else None
    )
    card: dict = {"train": {**train_set.summary(), **train_tok.summary()}}
    if eval_tok is not None:
        eval_origin = (
            eval_set.summary()
            if eval_set is not None
            else {"held_out_from": str(args.data), "fraction": args.eval_fraction, "seed": config.optim.seed}
        )
        card["eval"] = {**eval_origin, **eval_tok.summary()}
    old = _old_task_rows(config, tokenizer, store, len(train_tok.examples))
    if old is not None:
        card["old_task"] = {
            "replayed_rows": len(old.replay),
            "fisher_rows": len(old.fisher),
            "eval_rows": len(old.eval),
        }
        train_tok.examples = train_tok.examples + old.replay
    logger.info(
        "data: %d training rows (%d tokens), %d eval rows",
        len(train_tok.examples),
        train_tok.tokens,
        len(eval_tok.examples) if eval_tok else 0,
    )
    return PreparedData(train=train_tok, eval=eval_tok, old=old, card=card)


def _old_task_rows(config: TrainConfig, tokenizer, store: AdapterStore, n_new: int) -> OldTaskRows | None:
    """The old task's rows when continuing an adapter: ``--replay-data``, else the old card's train file."""
    cont = config.continual
    if cont.resume_from is None:
        return None
    path = cont.replay_data
    if path is None:
        card = store.read_card(cont.resume_from) or {}
        recorded = ((card.get("data") or {}).get("train") or {}).get("path")
        if recorded and Path(recorded).is_file():
            path = Path(recorded)
    if path is None:
        logger.warning(
            "continuing %s without its old data (no --replay-data, no readable path in its card): "
            "forgetting is neither limited by replay nor measured",
            cont.resume_from,
        )
        if cont.ewc_lambda > 0:
            raise ArgumentError("--ewc-lambda", "needs the old task's data: pass --replay-data")
        return None
    old_set = read_dataset(path)
    old_tok = tokenize_dataset(tokenizer, old_set.examples, config.data.max_seq_length, config.data.overlong)
    logger.info("old task data: %s (%d rows)", path, len(old_tok.examples))
    return split_old_rows(
        old_tok.examples, n_new, cont.replay_fraction, cont.ewc_samples, cont.old_eval_rows, config.optim.seed
    )


def linear_shapes(model: torch.nn.Module) -> dict[str, tuple[int, int]]:
    """Module name → (in_features, out_features) of every linear layer (quantized ones included)."""
    return {
        name: (int(module.in_features), int(module.out_features))
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear)
    }


def main(
    config: TrainConfig,
    store: AdapterStore,
    base: BaseModel,
    data: PreparedData,
    old_folder: Path | None,
    callbacks: list,
    clock: _RunClock,
) -> TrainResult:
    from transformers import set_seed

    shapes = linear_shapes(base.model)
    set_seed(config.optim.seed)
    model = prepare_for_training(base, config.optim.gradient_checkpointing)
    model = attach_stored_adapter(model, old_folder) if old_folder else attach_new_adapter(model, config.lora)
    penalty = None
    if data.old is not None and config.continual.ewc_lambda > 0:
        penalty = estimate_fisher(
            model,
            data.old.fisher,
            base.tokenizer.pad_token_id,
            config.optim.batch_size,
            config.continual.ewc_lambda,
        )
    callbacks = callbacks + _unfreezing(config, model, len(data.train.examples))
    trainer = build_trainer(config, model, base, data, penalty, callbacks, clock)
    old_before = _evaluate_old(trainer, data.old)
    eval_before = trainer.evaluate()["eval_loss"] if data.eval is not None else None
    train_seconds = fit(trainer, config)
    final_eval = validate(trainer, data)
    old_after = _evaluate_old(trainer, data.old)
    metrics = _metrics(trainer, eval_before, final_eval)
    speed = _speed(trainer, clock, train_seconds, base)
    continual = None
    if old_folder is not None:
        continual = {
            "resumed_from": config.continual.resume_from,
            "old_task_eval_loss_before": old_before,
            "old_task_eval_loss_after": old_after,
            "forgetting": None if old_before is None else old_after - old_before,
            "replay_fraction": config.continual.replay_fraction,
            "ewc_lambda": config.continual.ewc_lambda,
        }
        logger.info("old task eval loss: %s before, %s after", old_before, old_after)
    card = build_card(
        config=config,
        base={
            "model_id": base.model_id,
            "weights_sha256": base.weights_sha256,
            "path": str(base.path),
            "quantization": base.quantization,
        },
        data=data.card,
        metrics=metrics,
        speed=speed,
        continual=continual,
        lora=_lora_summary(model),
    )
    path = save_adapter(config, store, model, card, metrics, shapes)
    _remove_run_dir(config)
    return TrainResult(adapter_path=path, card=card)


def _unfreezing(config: TrainConfig, model, n_rows: int) -> list:
    """The gradual-unfreezing callback for ``--unfreeze gradual`` (else nothing)."""
    if config.optim.unfreeze != "gradual":
        return []
    from training.gradual_unfreezing import GradualUnfreezing

    layers = num_hidden_layers(model)
    if config.optim.unfreeze_stages > layers:
        raise ArgumentError("--unfreeze-stages", f"must be at most the model's {layers} layers")
    steps = total_steps(config, n_rows)
    return [GradualUnfreezing(lora_parameters(model).items(), layers, config.optim.unfreeze_stages, steps)]


def _trainer_class():
    from transformers import Trainer

    class _AdapterTrainer(Trainer):
        """``Trainer`` that counts trained tokens, times its evaluations and adds an optional penalty."""

        def __init__(self, *args, penalty: EWCPenalty | None = None, clock: _RunClock, **kwargs):
            super().__init__(*args, **kwargs)
            self.penalty = penalty
            self.clock = clock
            self.tokens_trained = 0

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            if model.training:
                self.tokens_trained += int(inputs["attention_mask"].sum())
            scaled = self.model_accepts_loss_kwargs and num_items_in_batch is not None
            loss, outputs = label_position_loss(model, inputs, num_items_in_batch if scaled else None)
            result = (loss, outputs) if return_outputs else loss
            if self.penalty is None or not model.training:
                return result
            # Spread over the accumulated micro-batches so one optimizer step sees the penalty once.
            extra = self.penalty(model) / self.args.gradient_accumulation_steps
            return (result[0] + extra, *result[1:]) if return_outputs else result + extra

        def evaluate(self, *args, **kwargs):
            started = time.perf_counter()
            try:
                return super().evaluate(*args, **kwargs)
            finally:
                self.clock.eval_seconds += time.perf_counter() - started

    return _AdapterTrainer


def total_steps(config: TrainConfig, n_rows: int) -> int:
    optim = config.optim
    steps_per_epoch = math.ceil(n_rows / (optim.batch_size * optim.grad_accum))
    return optim.max_steps or max(1, math.ceil(optim.epochs * steps_per_epoch))


def build_trainer(
    config: TrainConfig,
    model,
    base: BaseModel,
    data: PreparedData,
    penalty: EWCPenalty | None,
    callbacks: list,
    clock: _RunClock,
):
    from transformers import EarlyStoppingCallback, TrainingArguments

    optim = config.optim
    steps = total_steps(config, len(data.train.examples))
    has_eval = data.eval is not None
    eval_steps = optim.eval_steps or max(1, math.ceil(steps / 4))
    early_stop = has_eval and optim.early_stopping_patience > 0
    save_steps = eval_steps if early_stop else optim.save_steps
    scheduler = optim.scheduler
    if scheduler == "constant":
        scheduler = "constant_with_warmup"
    warmup = optim.warmup_steps if optim.warmup_steps is not None else optim.warmup_ratio
    on_gpu = base.device.type == "cuda"
    args = TrainingArguments(
        output_dir=str(config.output.run_dir),
        num_train_epochs=optim.epochs,
        max_steps=optim.max_steps or -1,
        per_device_train_batch_size=optim.batch_size,
        per_device_eval_batch_size=optim.batch_size * 2,
        gradient_accumulation_steps=optim.grad_accum,
        learning_rate=optim.lr,
        lr_scheduler_type=scheduler,
        warmup_steps=warmup,
        weight_decay=optim.weight_decay,
        max_grad_norm=optim.max_grad_norm,
        seed=optim.seed,
        data_seed=optim.seed,
        logging_steps=optim.logging_steps or max(1, steps // 50),
        eval_strategy="steps" if has_eval else "no",
        eval_steps=eval_steps,
        save_strategy="steps" if save_steps else "no",
        save_steps=save_steps or 500,
        save_total_limit=2 if save_steps else None,
        load_best_model_at_end=early_stop,
        metric_for_best_model="eval_loss" if early_stop else None,
        greater_is_better=False if early_stop else None,
        use_cpu=not on_gpu,
        bf16=on_gpu and torch.cuda.is_bf16_supported(),
        report_to="none",
        disable_tqdm=False,
        remove_unused_columns=False,
        label_names=["labels"],
        prediction_loss_only=True,  # never gather (B, T, V) logits: evaluation needs the loss only
        dataloader_pin_memory=on_gpu,
    )
    all_callbacks = list(callbacks)
    if early_stop:
        all_callbacks.append(EarlyStoppingCallback(early_stopping_patience=optim.early_stopping_patience))
    return _trainer_class()(
        model=model,
        args=args,
        train_dataset=TokenizedDataset(data.train.examples),
        eval_dataset=TokenizedDataset(data.eval.examples) if has_eval else None,
        data_collator=PaddingCollator(base.tokenizer.pad_token_id),
        callbacks=all_callbacks,
        penalty=penalty,
        clock=clock,
    )


def fit(trainer, config: TrainConfig) -> float:
    """Runs the training loop; returns the seconds spent training (in-run evaluations excluded)."""
    resume = config.output.resume_checkpoint
    eval_before = trainer.clock.eval_seconds
    started = time.perf_counter()
    trainer.train(resume_from_checkpoint=True if resume == "last" else resume)
    return time.perf_counter() - started - (trainer.clock.eval_seconds - eval_before)


def validate(trainer, data: PreparedData) -> float | None:
    """The final evaluation loss (the best model's, when early stopping restored it)."""
    if data.eval is None:
        return None
    last = next((h for h in reversed(trainer.state.log_history) if "eval_loss" in h), None)
    if (
        last is not None
        and last["step"] == trainer.state.global_step
        and not trainer.args.load_best_model_at_end
    ):
        return float(last["eval_loss"])  # the loop has just evaluated this very model
    return float(trainer.evaluate()["eval_loss"])


def _evaluate_old(trainer, old: OldTaskRows | None) -> float | None:
    if old is None or not old.eval:
        return None
    result = trainer.evaluate(eval_dataset=TokenizedDataset(old.eval), metric_key_prefix="old_task")
    return float(result["old_task_loss"])


def _metrics(trainer, eval_before: float | None, final_eval: float | None) -> dict:
    history = trainer.state.log_history
    train_curve = [
        {"step": h["step"], "epoch": h.get("epoch"), "loss": h["loss"]} for h in history if "loss" in h
    ]
    evaluations = [] if eval_before is None else [{"step": 0, "epoch": 0.0, "eval_loss": eval_before}]
    for h in history:
        if "eval_loss" in h and h["step"] > 0:
            evaluations.append({"step": h["step"], "epoch": h.get("epoch"), "eval_loss": h["eval_loss"]})
    for entry in evaluations:
        previous = [t["loss"] for t in train_curve if t["step"] <= entry["step"]]
        entry["train_loss"] = previous[-1] if previous else None
        entry["perplexity"] = perplexity(entry["eval_loss"])
    if final_eval is not None and (not evaluations or evaluations[-1]["eval_loss"] != final_eval):
        evaluations.append(
            {
                "step": trainer.state.global_step,
                "epoch": trainer.state.epoch,
                "eval_loss": final_eval,
                "train_loss": train_curve[-1]["loss"] if train_curve else None,
                "perplexity": perplexity(final_eval),
                "final": True,
            }
        )
    return {
        "steps": trainer.state.global_step,
        "epochs": trainer.state.epoch,
        "final_train_loss": train_curve[-1]["loss"] if train_curve else None,
        "train_loss_mean": next((h["train_loss"] for h in reversed(history) if "train_loss" in h), None),
        "best_eval_loss": trainer.state.best_metric,
        "evaluations": evaluations,
        "train_loss_curve": train_curve,
    }


def _speed(trainer, clock: _RunClock, train_seconds: float, base: BaseModel) -> dict:
    return {
        "wall_time_seconds": round(time.perf_counter() - clock.started, 2),
        "train_seconds": round(train_seconds, 2),
        "eval_seconds": round(clock.eval_seconds, 2),
        "tokens_trained": trainer.tokens_trained,
        "tokens_per_second": round(trainer.tokens_trained / max(train_seconds, 1e-9), 1),
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "device": str(base.device),
        "torch_threads": torch.get_num_threads(),
    }


def _lora_summary(model) -> dict:
    config = model.peft_config[model.active_adapter]
    targets = getattr(config, "target_modules", None)  # prompt and prefix tuning target no module
    return {
        "method": adapter_type(config.to_dict()),
        "r": getattr(config, "r", None),  # IA3 has no rank, alpha or dropout
        "alpha": getattr(config, "lora_alpha", None),
        "dropout": getattr(config, "lora_dropout", None),
        "target_modules": sorted(targets) if isinstance(targets, (set, list)) else targets,
        "num_virtual_tokens": getattr(config, "num_virtual_tokens", None),  # prompt and prefix tuning
        "layers_to_transform": getattr(config, "layers_to_transform", None),
        "trainable_parameters": sum(p.numel() for p in model.parameters() if p.requires_grad),
    }


def save_adapter(config: TrainConfig, store: AdapterStore, model, card: dict, metrics: dict, shapes) -> Path:
    """Writes adapter, card and loss curve into a staging folder, validates, and renames into place."""
    name = config.output.name
    staged = store.staging_dir(name)
    try:
        model.save_pretrained(staged, safe_serialization=True)
        load_lora_weights(
            name, staged, shapes, max_rank=max(card["lora"]["r"] or 1, 1), attention=attention_shape_of(model)
        )  # the server's own check
        write_card(card, staged / CARD_FILE)
        plot_loss_curve(
            [(t["step"], t["loss"]) for t in metrics["train_loss_curve"]],
            [(e["step"], e["eval_loss"]) for e in metrics["evaluations"]],
            staged / LOSS_CURVE_FILE,
            title=f"{name} on {card['base_model']['model_id']}",
        )
        path = store.commit_staged(staged, name, overwrite=config.output.overwrite)
    except BaseException:
        shutil.rmtree(staged, ignore_errors=True)
        raise
    logger.info("adapter %s written to %s", name, path)
    return path


def _remove_run_dir(config: TrainConfig) -> None:
    """Trainer's scratch folder goes once the adapter is safe, unless the user chose where it lives."""
    if config.output.checkpoint_dir is None:
        shutil.rmtree(config.output.run_dir, ignore_errors=True)
        runs = config.output.run_dir.parent
        if runs.is_dir() and not any(runs.iterdir()):
            runs.rmdir()
