"""``--unfreeze gradual``: the top layers' adapters train first, the lower ones join stage by stage."""

from __future__ import annotations

import pytest
import torch
from transformers import TrainerCallback

from tests.training.test_training_run import fresh_base, make_config
from training.args import ArgumentError, LoRAArgs
from training.cli import build_parser, config_from_args
from training.finetune import train
from training.gradual_unfreezing import describe_schedule, layer_of, lowest_trainable_layer


class _ChangedLayers(TrainerCallback):
    """After each optimizer step: the decoder layers whose adapter parameters left their initial values."""

    def __init__(self):
        self.initial: dict[str, torch.Tensor] = {}
        self.changed_after_step: dict[int, set[int]] = {}

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.initial = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}

    def on_step_end(self, args, state, control, model=None, **kwargs):
        params = dict(model.named_parameters())
        self.changed_after_step[state.global_step] = {
            layer_of(name)
            for name, before in self.initial.items()
            if not torch.equal(params[name].detach(), before)
        }


@pytest.mark.parametrize(
    "step,lowest",
    [(0, 3), (2, 3), (3, 2), (5, 2), (6, 1), (8, 1), (9, 0), (11, 0)],
)
def test_four_stages_over_twelve_steps_add_one_layer_of_four_each(step, lowest):
    assert lowest_trainable_layer(step, total_steps=12, stages=4, num_layers=4) == lowest


def test_the_schedule_covers_every_layer_in_the_last_stage():
    schedule = describe_schedule(total_steps=10, stages=3, num_layers=8)
    assert [s["first_step"] for s in schedule] == [0, 3, 6]
    assert [s["layers"] for s in schedule] == [[5, 7], [2, 7], [0, 7]]  # top 3, top 6, all 8


@pytest.mark.parametrize("method", ["lora", "ia3"])
def test_early_steps_train_only_the_top_layer_and_later_steps_every_layer(tmp_path, tiny_base_dir, method):
    """The tiny model has 2 layers; 2 stages of 3 steps each: steps 1-3 layer 1 only, steps 4-6 both."""
    config = make_config(
        tmp_path,
        name=f"gradual-{method}",
        optim={"max_steps": 6, "eval_steps": 6, "unfreeze": "gradual", "unfreeze_stages": 2},
    )
    if method == "ia3":
        config.lora = LoRAArgs(method="ia3")
    watch = _ChangedLayers()
    result = train(config, callbacks=[watch], base=fresh_base(tiny_base_dir))
    changed = watch.changed_after_step
    assert [changed[s] for s in (1, 2, 3)] == [{1}, {1}, {1}]  # layer 0's adapter untouched so far
    assert changed[4] == {0, 1} and changed[6] == {0, 1}
    assert result.card["hyperparameters"]["optim"]["unfreeze"] == "gradual"


def test_without_gradual_unfreezing_every_layer_trains_from_the_first_step(tmp_path, tiny_base_dir):
    config = make_config(tmp_path, name="all-layers", optim={"max_steps": 2, "eval_steps": 2})
    watch = _ChangedLayers()
    train(config, callbacks=[watch], base=fresh_base(tiny_base_dir))
    assert watch.changed_after_step[1] == {0, 1}


def test_the_cli_documents_and_checks_the_unfreeze_flags(tmp_path, capsys):
    from tests.training.toy_data import toy_rows, write_jsonl

    data = write_jsonl(tmp_path / "toy.jsonl", toy_rows(4, seed=1))
    parser = build_parser()
    args = ["--data", str(data), "--name", "x"]
    config = config_from_args(parser.parse_args([*args, "--unfreeze", "gradual", "--unfreeze-stages", "3"]))
    assert (config.optim.unfreeze, config.optim.unfreeze_stages) == ("gradual", 3)
    for extra, flag in (
        (["--unfreeze-stages", "3"], "--unfreeze-stages"),  # without --unfreeze gradual
        (["--unfreeze", "gradual", "--unfreeze-stages", "0"], "--unfreeze-stages"),
        (["--unfreeze", "gradual", "--method", "prefix-tuning"], "--unfreeze"),
    ):
        with pytest.raises(ArgumentError) as info:
            config_from_args(parser.parse_args([*args, *extra]))
        assert info.value.flag == flag
    with pytest.raises(SystemExit):
        parser.parse_args(["--help"])
    assert "ceil(k*L/N)" in capsys.readouterr().out.replace("\n", " ").replace("  ", " ")
