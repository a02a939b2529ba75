"""``loraplex train --method {lora,rslora,dora,ia3,prompt-tuning,prefix-tuning}`` on the QLoRA (NF4) base:
loss falls, and the adapter is servable at once."""

from __future__ import annotations

import pytest
import torch

from adapters.base_model import load_base_model
from adapters.batched_lora import BatchedLoRAModel
from adapters.lease import AdapterChoice
from adapters.registry import AdapterRegistry
from adapters.store import CARD_FILE, AdapterStore
from server.engine.runner import ModelRunner
from tests.training.toy_data import toy_rows, write_jsonl
from training.args import ArgumentError, DataArgs, LoRAArgs, OptimArgs, OutputArgs, TrainConfig
from training.cli import build_parser, config_from_args
from training.finetune import train

ADAPTER_ARGS = {
    "lora": {"r": 4, "alpha": 8, "dropout": 0.0},
    "rslora": {"r": 4, "alpha": 8, "dropout": 0.0},
    "dora": {"r": 4, "alpha": 8, "dropout": 0.0},
    "ia3": {},  # no rank, alpha or dropout
    "prompt-tuning": {"num_virtual_tokens": 4},
    "prefix-tuning": {"num_virtual_tokens": 4},
}
LEARNING_RATES = {"prompt-tuning": 1e-1, "prefix-tuning": 5e-2}  # else 2e-2


@pytest.mark.parametrize("method", list(ADAPTER_ARGS))
def test_each_method_trains_on_the_nf4_base_and_the_registry_serves_it(tmp_path, tiny_base_dir, method):
    data = write_jsonl(tmp_path / "toy.jsonl", toy_rows(40, seed=1))
    config = TrainConfig(
        data=DataArgs(data=data, eval_fraction=0.2),
        output=OutputArgs(
            name=f"toy-{method}", adapter_dir=tmp_path / "store", quantization="nf4", device="cpu"
        ),
        lora=LoRAArgs(method=method, **ADAPTER_ARGS[method]),
        optim=OptimArgs(
            max_steps=12,
            batch_size=8,
            lr=LEARNING_RATES.get(method, 2e-2),
            eval_steps=6,
            logging_steps=2,
            warmup_ratio=0.0,
        ),
    )
    result = train(config, base=load_base_model(tiny_base_dir, quantization="nf4", device="cpu"))

    evaluations = result.card["metrics"]["evaluations"]
    assert evaluations[-1]["eval_loss"] < evaluations[0]["eval_loss"]
    kind = method.replace("-", "_")  # the served type's name
    assert result.card["lora"]["method"] == kind
    assert (result.adapter_path / CARD_FILE).is_file()

    served = load_base_model(tiny_base_dir, quantization="nf4", device="cpu", dtype=torch.float32)
    lora = BatchedLoRAModel(served.model, torch.float32)
    registry = AdapterRegistry(AdapterStore(tmp_path / "store"), lora, 2, 64)
    slot = registry.lease(AdapterChoice(f"toy-{method}")).slot
    assert registry.get(f"toy-{method}").weights.peft_type == kind
    prompt = torch.randint(3, 200, (9,)).tolist()
    runner = ModelRunner(served.model, lora, served.device)  # the engine's prefill, virtual tokens and all
    (base_logits, _), (adapter_logits, _) = runner.prefill([(prompt, 0), (prompt, slot)])  # (V,) each
    assert not torch.allclose(base_logits, adapter_logits, atol=1e-3)  # the trained adapter changes it


def test_the_cli_takes_a_method_and_ia3_refuses_lora_only_flags(tmp_path):
    data = write_jsonl(tmp_path / "toy.jsonl", toy_rows(4, seed=1))
    parser = build_parser()
    config = config_from_args(parser.parse_args(["--data", str(data), "--name", "x", "--method", "dora"]))
    assert config.lora.method == "dora"
    with pytest.raises(ArgumentError) as info:
        config_from_args(
            parser.parse_args(["--data", str(data), "--name", "x", "--method", "ia3", "--r", "8"])
        )
    assert info.value.flag == "--r"
    with pytest.raises(SystemExit):
        parser.parse_args(["--data", str(data), "--name", "x", "--method", "prefix"])
    config = config_from_args(
        parser.parse_args(
            ["--data", str(data), "--name", "x", "--method", "prefix-tuning", "--num-virtual-tokens", "6"]
        )
    )
    assert (config.lora.method, config.lora.num_virtual_tokens) == ("prefix-tuning", 6)
    for extra, flag in (
        (["--method", "prompt-tuning", "--layers", "1"], "--layers"),
        (["--method", "prompt-tuning", "--target-modules", "q_proj"], "--target-modules"),
        (["--method", "lora", "--num-virtual-tokens", "4"], "--num-virtual-tokens"),
        (["--method", "prefix-tuning", "--gradient-checkpointing"], "--gradient-checkpointing"),
    ):
        with pytest.raises(ArgumentError) as info:
            config_from_args(parser.parse_args(["--data", str(data), "--name", "x", *extra]))
        assert info.value.flag == flag
