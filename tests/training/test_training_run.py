"""Few-step training runs on the tiny Llama: loss, the saved adapter, atomicity, resume and the card."""

from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from adapters.batched_lora import BatchedLoRAModel
from adapters.errors import AdapterExists
from adapters.lease import AdapterChoice
from adapters.lora import load_lora_weights
from adapters.registry import AdapterRegistry
from adapters.store import CARD_FILE, CONFIG_FILE, WEIGHTS_FILE, AdapterStore
from tests.training.toy_data import toy_rows, write_jsonl
from training.args import ContinualArgs, DataArgs, LoRAArgs, OptimArgs, OutputArgs, TrainConfig
from training.finetune import TrainResult, linear_shapes, train


def make_config(tmp_path, name="toy", rows=None, **overrides) -> TrainConfig:
    data = write_jsonl(tmp_path / f"{name}.jsonl", rows if rows is not None else toy_rows(40, seed=1))
    optim = {
        "max_steps": 12,
        "batch_size": 8,
        "lr": 1e-2,
        "eval_steps": 6,
        "logging_steps": 2,
        "warmup_ratio": 0.0,
    }
    optim.update(overrides.pop("optim", {}))
    return TrainConfig(
        data=DataArgs(data=data, eval_fraction=0.2),
        output=OutputArgs(
            name=name,
            adapter_dir=tmp_path / "store",
            quantization="none",
            device="cpu",
            **overrides.pop("output", {}),
        ),
        lora=LoRAArgs(r=4, alpha=8, dropout=0.0, **overrides.pop("lora", {})),
        optim=OptimArgs(**optim),
        continual=ContinualArgs(**overrides.pop("continual", {})),
    )


def store_files(root) -> list[str]:
    return sorted(p.name for p in root.iterdir()) if root.exists() else []


def fresh_base(tiny_base_dir):
    from adapters.base_model import load_base_model

    return load_base_model(tiny_base_dir, quantization="none", device="cpu")


@dataclass
class ToyRun:
    root: Path
    config: TrainConfig
    result: TrainResult


@pytest.fixture(scope="module")
def toy_run(tmp_path_factory, tiny_base_dir) -> ToyRun:
    """One 12-step run shared by the tests that only read its outputs."""
    root = tmp_path_factory.mktemp("toy-run")
    config = make_config(root)
    return ToyRun(root, config, train(config, base=fresh_base(tiny_base_dir)))


def copy_store(run: ToyRun, tmp_path) -> Path:
    shutil.copytree(run.root / "store", tmp_path / "store")
    return tmp_path / "store"


def test_training_lowers_the_loss_and_writes_a_servable_adapter(toy_run, tiny_base_dir):
    tmp_path, result = toy_run.root, toy_run.result

    evaluations = result.card["metrics"]["evaluations"]
    assert evaluations[0]["step"] == 0 and evaluations[-1]["step"] == 12
    assert evaluations[-1]["eval_loss"] < evaluations[0]["eval_loss"] - 0.5
    train_curve = result.card["metrics"]["train_loss_curve"]
    assert train_curve[-1]["loss"] < train_curve[0]["loss"]

    folder = result.adapter_path
    assert folder == tmp_path / "store" / "toy"
    assert {CONFIG_FILE, WEIGHTS_FILE, CARD_FILE, "loss_curve.png"} <= set(store_files(folder))
    assert (folder / "loss_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert store_files(tmp_path / "store") == ["toy"]  # no staging or run folder left behind

    # The server's own path: validate, load into the registry, and see the output change.
    fresh = fresh_base(tiny_base_dir)
    weights = load_lora_weights("toy", folder, linear_shapes(fresh.model), max_rank=64)
    assert weights.rank == 4 and len(weights.modules) == 2 * 7  # all-linear on 2 layers
    registry = AdapterRegistry(
        AdapterStore(tmp_path / "store"), BatchedLoRAModel(fresh.model, torch.float32), 2, 64
    )
    slot = registry.lease(AdapterChoice("toy")).slot
    input_ids = torch.randint(3, 200, (2, 9))
    with torch.no_grad(), registry.lora.rows([0, slot]):
        logits = fresh.model(input_ids=input_ids).logits  # (2, 9, V)
    assert not torch.allclose(logits[0], logits[1], atol=1e-3)


def test_card_contents(toy_run, tiny_base_dir):
    tmp_path, config, card = toy_run.root, toy_run.config, toy_run.result.card
    tiny_base = fresh_base(tiny_base_dir)
    on_disk = json.loads((tmp_path / "store" / "toy" / CARD_FILE).read_text())
    assert on_disk == json.loads(json.dumps(card))

    assert card["base_model"]["weights_sha256"] == tiny_base.weights_sha256
    assert card["summary"]["base_weights_sha256"] == tiny_base.weights_sha256
    train_data = card["data"]["train"]
    assert train_data["sha256"] == hashlib.sha256(config.data.data.read_bytes()).hexdigest()
    assert (train_data["valid_rows"], train_data["rows"], card["data"]["eval"]["rows"]) == (40, 32, 8)
    assert card["hyperparameters"]["optim"]["lr"] == 1e-2
    assert card["hyperparameters"]["lora"]["r"] == 4 and "api_key" not in card["hyperparameters"]["output"]
    for entry in card["metrics"]["evaluations"]:
        assert entry["perplexity"] == pytest.approx(torch.tensor(entry["eval_loss"]).exp().item(), rel=1e-4)
    speed = card["speed"]
    assert speed["tokens_trained"] > 0 and speed["tokens_per_second"] > 0 and speed["peak_rss_bytes"] > 0
    assert set(card["versions"]) >= {"python", "torch", "transformers", "peft"}


def test_existing_name_is_refused_before_any_training(toy_run, tmp_path):
    copy_store(toy_run, tmp_path)
    with pytest.raises(AdapterExists):
        train(make_config(tmp_path), base=None)  # refused before the base model is even resolved


class Interrupt:
    """A Trainer callback that raises KeyboardInterrupt at a given step (a Ctrl-C mid-run)."""

    def __init__(self, at_step: int):
        self.at_step = at_step

    def __getattr__(self, event):
        def handler(args, state, control, **kwargs):
            if event == "on_step_end" and state.global_step >= self.at_step:
                raise KeyboardInterrupt
            return control

        return handler


def test_an_interrupted_run_leaves_nothing_servable(tmp_path, tiny_base):
    with pytest.raises(KeyboardInterrupt):
        train(make_config(tmp_path), callbacks=[Interrupt(at_step=3)], base=tiny_base)
    assert [p for p in store_files(tmp_path / "store") if not p.startswith(".runs")] == []


def test_an_interruption_while_saving_keeps_the_old_adapter(toy_run, tmp_path, tiny_base_dir, monkeypatch):
    copy_store(toy_run, tmp_path)
    before = (tmp_path / "store" / "toy" / WEIGHTS_FILE).read_bytes()

    def crash(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr("training.finetune.plot_loss_curve", crash)  # dies after the weights are staged
    config = make_config(
        tmp_path, output={"overwrite": True}, optim={"seed": 7, "max_steps": 2, "eval_steps": 2}
    )
    with pytest.raises(KeyboardInterrupt):
        train(config, base=fresh_base(tiny_base_dir))
    assert (tmp_path / "store" / "toy" / WEIGHTS_FILE).read_bytes() == before
    assert [p for p in store_files(tmp_path / "store") if not p.startswith(".runs")] == ["toy"]


def test_resume_continues_the_adapter_and_measures_forgetting(toy_run, tmp_path, tiny_base_dir):
    copy_store(toy_run, tmp_path)
    first = toy_run.result
    new_rows = toy_rows(24, seed=2, task="reverse")
    config = make_config(
        tmp_path,
        name="upper-then-reverse",
        rows=new_rows,
        optim={"max_steps": 4, "eval_steps": 2},
        continual={
            "resume_from": "toy",
            "replay_fraction": 0.5,
            "ewc_lambda": 10.0,
            "ewc_samples": 8,
            "old_eval_rows": 8,
        },
    )
    result = train(config, base=fresh_base(tiny_base_dir))

    continual = result.card["continual"]
    assert continual["resumed_from"] == "toy"
    # Before any new step the model is the old adapter: its old-task loss is far below the base's.
    old_base_loss = first.card["metrics"]["evaluations"][0]["eval_loss"]
    assert continual["old_task_eval_loss_before"] < old_base_loss - 0.5
    assert continual["old_task_eval_loss_after"] is not None
    assert continual["forgetting"] == pytest.approx(
        continual["old_task_eval_loss_after"] - continual["old_task_eval_loss_before"]
    )
    # The old card's training file was found and replayed.
    assert result.card["data"]["old_task"]["replayed_rows"] == 10  # 0.5 × the 19 new training rows
    assert result.card["lora"]["r"] == 4
