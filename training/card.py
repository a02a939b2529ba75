"""The ``training_card.json`` written beside every trained adapter.

It ties the adapter to its base (model id and weights hash), its data (hashes and row counts), every
hyperparameter, the metrics of every evaluation, speed, and library versions. ``summary`` is the short
form the server shows in ``GET /v1/adapters``.
"""

from __future__ import annotations

import datetime as dt
import json
import math
import platform
from dataclasses import asdict
from importlib import metadata
from pathlib import Path

from training.args import TrainConfig

CARD_FORMAT = "loraplex.training_card/1"
_LIBRARIES = ("torch", "transformers", "peft", "bitsandbytes", "accelerate", "safetensors", "loraplex")


def library_versions() -> dict[str, str | None]:
    versions: dict[str, str | None] = {"python": platform.python_version()}
    for name in _LIBRARIES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def hyperparameters(config: TrainConfig) -> dict:
    """Every argument group, JSON-ready (paths as strings, the API key left out)."""
    groups = {
        name: asdict(getattr(config, name)) for name in ("data", "lora", "optim", "output", "continual")
    }
    groups["output"].pop("api_key", None)
    return json.loads(json.dumps(groups, default=str))


def perplexity(loss: float | None) -> float | None:
    if loss is None or not math.isfinite(loss):
        return None
    return math.exp(min(loss, 50.0))


def build_card(
    *,
    config: TrainConfig,
    base: dict,
    data: dict,
    metrics: dict,
    speed: dict,
    continual: dict | None,
    lora: dict,
) -> dict:
    """Assembles the card; ``summary`` repeats the few fields a listing shows."""
    evaluations = metrics.get("evaluations", [])
    final_eval = evaluations[-1]["eval_loss"] if evaluations else None
    created = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
    return {
        "format": CARD_FORMAT,
        "name": config.output.name,
        "created_at": created,
        "summary": {
            "base_model": base["model_id"],
            "base_weights_sha256": base["weights_sha256"],
            "train_rows": data["train"]["rows"],
            "epochs": metrics.get("epochs"),
            "steps": metrics.get("steps"),
            "final_train_loss": metrics.get("final_train_loss"),
            "final_eval_loss": final_eval,
            "final_eval_perplexity": perplexity(final_eval),
            "created_at": created,
        },
        "base_model": base,
        "lora": lora,
        "data": data,
        "hyperparameters": hyperparameters(config),
        "metrics": metrics,
        "continual": continual,
        "speed": speed,
        "versions": library_versions(),
    }


def write_card(card: dict, path: Path) -> Path:
    path.write_text(json.dumps(card, indent=2, sort_keys=False) + "\n")
    return path
