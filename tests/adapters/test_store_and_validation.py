"""The adapter store's name containment and atomic writes, and adapter validation before loading."""

from __future__ import annotations

import json
import os
import pickle
import shutil

import pytest
import torch
from safetensors.torch import save_file

from adapters.errors import AdapterExists, AdapterInvalid, AdapterNameInvalid, AdapterNotFound
from adapters.lora import load_lora_weights
from adapters.store import CONFIG_FILE, WEIGHTS_FILE, AdapterStore, check_adapter_name
from tests.tiny_models import make_tiny_llama


@pytest.fixture
def linear_shapes():
    model = make_tiny_llama(vocab_size=300)
    return {
        name: (m.in_features, m.out_features)
        for name, m in model.named_modules()
        if isinstance(m, torch.nn.Linear) and not name.endswith("lm_head")
    }


@pytest.mark.parametrize(
    "name", ["../x", "/abs", "%2e%2e", "a/b", "", "x" * 65, ".hidden", "..", "a b", "ü", "a\x00b"]
)
def test_hostile_names_are_refused(tmp_path, name):
    store = AdapterStore(tmp_path / "store")
    with pytest.raises(AdapterNameInvalid):
        store.path_for(name)
    assert not store.exists(name)


@pytest.mark.parametrize("name", ["a", "my-adapter_v1.2", "A" * 64])
def test_valid_names(name):
    assert check_adapter_name(name) == name


def test_symlink_out_of_store_is_refused(tmp_path, adapter_store_dir):
    outside = tmp_path / "outside"
    shutil.copytree(adapter_store_dir / "attn-r4", outside)
    os.symlink(outside, adapter_store_dir / "sneaky")
    store = AdapterStore(adapter_store_dir)
    assert "sneaky" not in store.names()
    with pytest.raises(AdapterNameInvalid):
        store.require("sneaky")


def test_write_is_atomic_and_refuses_overwrite(tmp_path, adapter_store_dir):
    store = AdapterStore(adapter_store_dir)
    files = {
        name: (adapter_store_dir / "attn-r4" / name).read_bytes() for name in (CONFIG_FILE, WEIGHTS_FILE)
    }
    store.write("copy", files)
    assert "copy" in store.names()
    with pytest.raises(AdapterExists):
        store.write("copy", files)
    store.write("copy", files, overwrite=True)
    assert not [p for p in adapter_store_dir.iterdir() if p.name.startswith(".")]  # no leftovers
    store.delete("copy")
    with pytest.raises(AdapterNotFound):
        store.require("copy")


def test_valid_adapter_loads(adapter_store_dir, linear_shapes):
    weights = load_lora_weights("all-r8", adapter_store_dir / "all-r8", linear_shapes, max_rank=64)
    assert weights.rank == 8
    assert len(weights.modules) == 2 * 7
    module = weights.modules["model.layers.0.self_attn.q_proj"]
    assert module.scaling == pytest.approx(16.0 / 8)


def _expect_invalid(folder, linear_shapes, fragment, max_rank=64):
    with pytest.raises(AdapterInvalid) as info:
        load_lora_weights("bad", folder, linear_shapes, max_rank=max_rank)
    assert fragment in str(info.value)


def test_truncated_safetensors_is_refused(tmp_path, adapter_store_dir, linear_shapes):
    bad = tmp_path / "bad"
    shutil.copytree(adapter_store_dir / "attn-r4", bad)
    data = (bad / WEIGHTS_FILE).read_bytes()
    (bad / WEIGHTS_FILE).write_bytes(data[: len(data) // 2])
    _expect_invalid(bad, linear_shapes, "not a readable safetensors file")


def test_pickle_bin_is_refused_and_never_unpickled(tmp_path, linear_shapes):
    bad = tmp_path / "bad"
    bad.mkdir()
    marker = tmp_path / "pwned"

    class Exploit:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    (bad / "adapter_model.bin").write_bytes(pickle.dumps(Exploit()))
    (bad / CONFIG_FILE).write_text(json.dumps({"peft_type": "LORA", "r": 4, "lora_alpha": 8}))
    _expect_invalid(bad, linear_shapes, "pickle")
    assert not marker.exists()


def test_wrong_shapes_rank_and_modules_are_all_reported(tmp_path, adapter_store_dir, linear_shapes):
    bad = tmp_path / "bad"
    shutil.copytree(adapter_store_dir / "attn-r4", bad)
    prefix = "base_model.model.model.layers.0"
    save_file(
        {
            f"{prefix}.self_attn.q_proj.lora_A.weight": torch.zeros(4, 63),  # wrong in_features
            f"{prefix}.self_attn.q_proj.lora_B.weight": torch.zeros(64, 4),
            f"{prefix}.self_attn.nope.lora_A.weight": torch.zeros(4, 64),  # not in the base
            f"{prefix}.self_attn.nope.lora_B.weight": torch.zeros(64, 4),
        },
        str(bad / WEIGHTS_FILE),
    )
    with pytest.raises(AdapterInvalid) as info:
        load_lora_weights("bad", bad, linear_shapes, max_rank=64)
    problems = " ".join(info.value.problems)
    assert "do not match" in problems and "not a linear layer" in problems
    _expect_invalid(
        adapter_store_dir / "all-r8", linear_shapes, "exceeds the server's maximum rank", max_rank=4
    )


def test_non_lora_config_is_refused(tmp_path, adapter_store_dir, linear_shapes):
    bad = tmp_path / "bad"
    shutil.copytree(adapter_store_dir / "attn-r4", bad)
    config = json.loads((bad / CONFIG_FILE).read_text())
    config["peft_type"] = "P_TUNING"
    (bad / CONFIG_FILE).write_text(json.dumps(config))
    _expect_invalid(bad, linear_shapes, "peft_type must be LORA")
    config["peft_type"] = "PREFIX_TUNING"  # a prefix-tuning config over LoRA tensors
    (bad / CONFIG_FILE).write_text(json.dumps(config))
    _expect_invalid(bad, linear_shapes, "a prefix-tuning adapter holds only prompt_embeddings")
    config["peft_type"] = "IA3"  # an IA3 config over LoRA tensors
    (bad / CONFIG_FILE).write_text(json.dumps(config))
    _expect_invalid(bad, linear_shapes, "an IA3 adapter holds only ia3_l vectors")
    (bad / CONFIG_FILE).write_text("{not json")
    _expect_invalid(bad, linear_shapes, "not a valid JSON object")
