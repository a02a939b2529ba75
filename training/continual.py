"""Continual fine-tuning without (unmeasured) forgetting: replay of old rows and an EWC penalty.

- Replay mixes a seeded sample of the old task's rows into the new training set.
- EWC (Kirkpatrick et al. 2017, https://arxiv.org/abs/1612.00796) adds
  ``λ/2 · Σ F_i (θ_i − θ*_i)²`` over the LoRA parameters, where ``θ*`` are the resumed adapter's values
  and ``F`` the diagonal empirical Fisher information estimated on old rows. ``F`` is normalised to
  mean 1 so that ``λ`` has the same meaning across models and adapters.
- A held-out slice of the old rows is evaluated before and after training, so forgetting is measured.
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass

import torch

from training.tokenization import PaddingCollator, TokenizedExample

logger = logging.getLogger(__name__)


@dataclass
class OldTaskRows:
    """Old rows split (seeded, disjoint) into rows to replay, rows for the Fisher, rows to measure on."""

    replay: list[TokenizedExample]
    fisher: list[TokenizedExample]
    eval: list[TokenizedExample]


def split_old_rows(
    rows: list[TokenizedExample],
    n_new: int,
    replay_fraction: float,
    fisher_rows: int,
    eval_rows: int,
    seed: int,
) -> OldTaskRows:
    """Splits old rows: ``eval_rows`` held out first; replay and Fisher rows are drawn from the rest."""
    order = list(rows)
    random.Random(seed).shuffle(order)
    n_eval = min(eval_rows, max(1, len(order) // 4))
    held, rest = order[:n_eval], order[n_eval:]
    n_replay = min(len(rest), round(replay_fraction * n_new))
    return OldTaskRows(replay=rest[:n_replay], fisher=rest[:fisher_rows], eval=held)


class EWCPenalty:
    """The elastic weight consolidation penalty on the trainable (LoRA) parameters."""

    def __init__(self, anchors: dict[str, torch.Tensor], fisher: dict[str, torch.Tensor], strength: float):
        self.anchors = anchors
        self.fisher = fisher
        self.strength = strength

    def __call__(self, model: torch.nn.Module) -> torch.Tensor:
        total = None
        for name, param in model.named_parameters():
            if name in self.fisher:
                term = (self.fisher[name] * (param - self.anchors[name]) ** 2).sum()
                total = term if total is None else total + term
        if total is None:
            raise RuntimeError("EWC: none of the anchored parameters is in the model")
        return 0.5 * self.strength * total


def estimate_fisher(
    model: torch.nn.Module, rows: list[TokenizedExample], pad_token_id: int, batch_size: int, strength: float
) -> EWCPenalty:
    """Estimates the diagonal empirical Fisher of the trainable parameters on ``rows``."""
    params = {name: p for name, p in model.named_parameters() if p.requires_grad}
    anchors = {name: p.detach().clone() for name, p in params.items()}
    fisher = {name: torch.zeros_like(p, dtype=torch.float32) for name, p in params.items()}
    collate = PaddingCollator(pad_token_id)
    device = next(iter(params.values())).device
    was_training = model.training
    model.eval()
    batches = 0
    for start in range(0, len(rows), batch_size):
        batch = collate(
            [{"input_ids": r.input_ids, "labels": r.labels} for r in rows[start : start + batch_size]]
        )
        model.zero_grad(set_to_none=True)
        loss = model(**{k: v.to(device) for k, v in batch.items()}).loss
        loss.backward()
        for name, p in params.items():
            if p.grad is not None:
                fisher[name] += p.grad.detach().float() ** 2
        batches += 1
    model.zero_grad(set_to_none=True)
    model.train(was_training)
    mean = torch.cat([f.flatten() for f in fisher.values()]).mean().clamp_min(1e-12)
    fisher = {name: f / mean for name, f in fisher.items()}  # mean Fisher = 1: λ is scale-free
    logger.info("EWC: Fisher estimated on %d old rows (%d batches), λ=%g", len(rows), batches, strength)
    return EWCPenalty(anchors, fisher, strength)
