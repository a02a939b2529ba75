"""Merge specs, cache keys, and merged weights checked against PEFT's ``add_weighted_adapter``."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from adapters.errors import MergeSpecInvalid
from adapters.lora import LoRAWeights, load_lora_weights
from adapters.merging import METHODS, MergeSpec, canonical_key, merge_lora, merged_name, module_generator
from adapters.store import check_adapter_name
from tests.tiny_models import save_random_adapter

# fp32 on the CPU, as max |ours - PEFT's| / max |PEFT's| per module. Elementwise methods and cat run
# PEFT's float operations in PEFT's order (bitwise equal here; 1e-6 leaves room for other BLAS
# builds); svd factors the stacked low-rank factors instead of the full delta (measured 3e-6).
RELATIVE_TOLERANCE = 1e-6
SVD_RELATIVE_TOLERANCE = 1e-5


def assert_delta_close(ours: torch.Tensor, theirs: torch.Tensor, relative: float) -> None:
    error = (ours - theirs).abs().max().item()
    assert error <= relative * theirs.abs().max().item(), f"max error {error:.3g}"


ALL_LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

# name -> (rank, alpha, target modules, seed): equal and unequal ranks, full and partial overlaps.
MERGE_ADAPTERS = {
    "a": (4, 8.0, ALL_LINEAR, 101),
    "b": (4, 16.0, ALL_LINEAR, 102),
    "c": (4, 4.0, ("q_proj", "v_proj", "down_proj"), 103),
    "d": (8, 16.0, ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj"), 104),
}


@pytest.fixture(scope="module")
def merge_adapter_dirs(tiny_base_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("merge-adapters")
    return {
        name: save_random_adapter(tiny_base_dir, root / name, rank, alpha, modules, seed)
        for name, (rank, alpha, modules, seed) in MERGE_ADAPTERS.items()
    }


@pytest.fixture(scope="module")
def linear_shapes(tiny_base_dir: Path) -> dict[str, tuple[int, int]]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_base_dir)
    return {
        name: (module.in_features, module.out_features)
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear) and not name.endswith("lm_head")
    }


@pytest.fixture(scope="module")
def loaded(merge_adapter_dirs: dict[str, Path], linear_shapes) -> dict[str, LoRAWeights]:
    return {
        name: load_lora_weights(name, folder, linear_shapes, max_rank=64)
        for name, folder in merge_adapter_dirs.items()
    }


@pytest.fixture(scope="module")
def peft_model(merge_adapter_dirs: dict[str, Path], tiny_base_dir: Path):
    """One PEFT model holding every adapter; each test adds its merge under a fresh name."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny_base_dir, dtype=torch.float32)
    names = list(merge_adapter_dirs)
    model = PeftModel.from_pretrained(base, merge_adapter_dirs[names[0]], adapter_name=names[0])
    for name in names[1:]:
        model.load_adapter(merge_adapter_dirs[name], adapter_name=name)
    return model


def peft_deltas(peft_model, spec: MergeSpec, new_name: str, monkeypatch) -> dict[str, torch.Tensor]:
    """PEFT's merged delta weights per module, for ``spec``'s parts in canonical order.

    PEFT draws dare masks from the global RNG; here each module's draws come from the generator
    that :func:`merge_lora` uses for that module, so both see the same masks.
    """
    from peft.tuners.lora import LoraLayer, LoraModel

    module_names = {id(m): n for n, m in peft_model.base_model.model.named_modules()}
    key = canonical_key(spec)
    current: dict[str, torch.Generator] = {}
    merge_one_module = LoraModel._generalized_task_arithmetic_weighted_adapter

    def seeded_merge(self, combination_type, adapters, weights, target, *args, **kwargs):
        current["rng"] = module_generator(key, module_names[id(target)])
        return merge_one_module(self, combination_type, adapters, weights, target, *args, **kwargs)

    bernoulli = torch.bernoulli
    monkeypatch.setattr(LoraModel, "_generalized_task_arithmetic_weighted_adapter", seeded_merge)
    monkeypatch.setattr(torch, "bernoulli", lambda p: bernoulli(p, generator=current["rng"]))
    names, weights = zip(*spec.canonical_parts)
    peft_model.add_weighted_adapter(
        list(names),
        list(weights),
        new_name,
        combination_type=spec.method,
        density=spec.density,
        majority_sign_method=spec.majority_sign_method,
    )
    monkeypatch.undo()
    return {
        name: module.get_delta_weight(new_name)
        for name, module in peft_model.base_model.model.named_modules()
        if isinstance(module, LoraLayer) and new_name in module.lora_A
    }


PEFT_CASES = [
    # method, parts, density, majority_sign_method
    ("linear", [("a", 0.7), ("b", 0.3)], None, "total"),
    ("linear", [("c", 1.0), ("a", 0.5)], None, "total"),  # partial overlap
    ("cat", [("a", 0.7), ("d", 0.3)], None, "total"),  # different ranks
    ("cat", [("a", 1.0), ("b", 2.0), ("c", 0.5)], None, "total"),
    ("svd", [("a", 0.7), ("d", 0.3)], None, "total"),
    ("svd", [("c", 0.6), ("d", 0.4)], None, "total"),  # down_proj: rank 4 < new rank 8
    ("svd", [("a", 1.0), ("b", 1.0), ("c", 1.0)], None, "total"),  # truncated
    ("ties", [("a", 0.7), ("b", 0.3)], 0.5, "total"),
    ("ties", [("b", 0.2), ("a", 0.5), ("c", 0.3)], 0.3, "frequency"),
    ("dare_linear", [("a", 0.7), ("b", 0.3)], 0.5, "total"),
    ("dare_ties", [("a", 0.7), ("b", 0.3)], 0.5, "total"),
    ("dare_ties", [("a", 0.5), ("b", 0.5), ("c", 1.0)], 0.7, "frequency"),
    ("magnitude_prune", [("b", 0.3), ("a", 0.7)], 0.4, "total"),
]


@pytest.mark.parametrize(("method", "parts", "density", "sign"), PEFT_CASES)
def test_merged_deltas_match_peft(peft_model, loaded, monkeypatch, method, parts, density, sign):
    spec = MergeSpec(parts=tuple(parts), method=method, density=density, majority_sign_method=sign)
    ours = merge_lora(spec, list(loaded.values()), name="merged")
    theirs = peft_deltas(peft_model, spec, f"peft-{canonical_key(spec)[:8]}", monkeypatch)

    assert sorted(ours.modules) == sorted(theirs)
    relative = SVD_RELATIVE_TOLERANCE if method == "svd" else RELATIVE_TOLERANCE
    for module_name, delta in theirs.items():
        assert_delta_close(ours.modules[module_name].delta_weight(), delta, relative)


def test_linear_merge_with_weights_one_zero_is_the_first_adapter(loaded):
    merged = merge_lora(MergeSpec(parts=(("a", 1.0), ("b", 0.0))), [loaded["a"], loaded["b"]], "m")
    assert sorted(merged.modules) == sorted(loaded["a"].modules)
    for name, module in loaded["a"].modules.items():
        assert_delta_close(merged.modules[name].delta_weight(), module.delta_weight(), RELATIVE_TOLERANCE)


@pytest.mark.parametrize("method", ["cat", "svd", "ties", "dare_ties"])
def test_single_adapter_merge_is_a_weighted_copy(loaded, method):
    spec = MergeSpec(parts=(("d", 0.5),), method=method, density=0.5)
    merged = merge_lora(spec, [loaded["d"]], "m")
    for name, module in loaded["d"].modules.items():
        expected = 0.5 * module.delta_weight()
        assert_delta_close(merged.modules[name].delta_weight(), expected, RELATIVE_TOLERANCE)


@pytest.mark.parametrize("method", METHODS)
def test_order_of_parts_changes_neither_key_nor_weights(loaded, method):
    density = 0.5 if method not in ("linear", "cat", "svd") else None
    forward = MergeSpec(parts=(("a", 0.7), ("b", 0.3), ("c", 0.2)), method=method, density=density)
    backward = MergeSpec(parts=(("c", 0.2), ("b", 0.3), ("a", 0.7)), method=method, density=density)
    assert canonical_key(forward) == canonical_key(backward)
    assert merged_name(forward) == merged_name(backward)

    one = merge_lora(forward, list(loaded.values()), "m")
    two = merge_lora(backward, [loaded["c"], loaded["a"], loaded["b"]], "m")
    for name, module in one.modules.items():
        assert torch.equal(module.lora_A, two.modules[name].lora_A)
        assert torch.equal(module.lora_B, two.modules[name].lora_B)


def test_dare_is_deterministic_per_spec_and_differs_between_specs(loaded):
    spec = MergeSpec(parts=(("a", 0.5), ("b", 0.5)), method="dare_linear", density=0.5)
    first = merge_lora(spec, list(loaded.values()), "m")
    torch.manual_seed(1234)  # the global RNG plays no part
    second = merge_lora(spec, list(loaded.values()), "m")
    other = merge_lora(
        MergeSpec(parts=(("a", 0.5), ("b", 0.6)), method="dare_linear", density=0.5),
        list(loaded.values()),
        "m",
    )
    module = "model.layers.0.self_attn.q_proj"
    assert torch.equal(first.modules[module].lora_A, second.modules[module].lora_A)
    assert torch.equal(first.modules[module].lora_B, second.modules[module].lora_B)
    # another spec hashes differently, so its random masks differ too
    assert not torch.equal(first.modules[module].lora_A == 0, other.modules[module].lora_A == 0)


@pytest.mark.parametrize(
    ("one", "other", "same"),
    [
        ({"parts": (("a", 1),)}, {"parts": (("a", 1.0),)}, True),
        ({"parts": (("a", 1), ("b", 1))}, {"parts": (("a", 1), ("b", 1)), "density": 0.3}, True),  # unused
        ({"parts": (("a", 1),), "method": "ties", "density": 0.2}, {"parts": (("a", 1),)}, True),  # 1 part
        ({"parts": (("a", 0.0), ("b", 1))}, {"parts": (("a", -0.0), ("b", 1))}, True),
        ({"parts": (("a", 1), ("b", 1))}, {"parts": (("a", 1), ("b", 2))}, False),
        ({"parts": (("a", 1), ("b", 1))}, {"parts": (("a", 1), ("c", 1))}, False),
        ({"parts": (("a", 1), ("b", 1))}, {"parts": (("a", 1), ("b", 1)), "method": "cat"}, False),
        (
            {"parts": (("a", 1), ("b", 1)), "method": "ties", "density": 0.5},
            {"parts": (("a", 1), ("b", 1)), "method": "ties", "density": 0.6},
            False,
        ),
        (
            {"parts": (("a", 1), ("b", 1)), "method": "ties", "density": 0.5},
            {
                "parts": (("a", 1), ("b", 1)),
                "method": "ties",
                "density": 0.5,
                "majority_sign_method": "frequency",
            },
            False,
        ),
    ],
)
def test_canonical_key_depends_on_what_changes_the_weights(one, other, same):
    assert (canonical_key(MergeSpec(**one)) == canonical_key(MergeSpec(**other))) is same


def test_merged_name_is_a_valid_adapter_name():
    name = merged_name(MergeSpec(parts=(("a", 1.0), ("b", 1.0))))
    assert re.fullmatch(r"merge-[0-9a-f]{12}", name)
    assert check_adapter_name(name) == name


def test_request_and_lorax_forms_build_the_same_spec():
    ours = MergeSpec.from_request(
        {
            "merge": [{"name": "legal", "weight": 0.7}, {"name": "concise", "weight": 0.3}],
            "method": "ties",
            "density": 0.5,
            "majority_sign_method": "frequency",
        }
    )
    lorax = MergeSpec.from_lorax(
        {
            "ids": ["concise", "legal"],
            "weights": [0.3, 0.7],
            "merge_strategy": "TIES",
            "density": 0.5,
            "majority_sign_method": "FREQUENCY",
        }
    )
    assert canonical_key(ours) == canonical_key(lorax)
    assert ours.to_dict()["merge"] == [{"name": "legal", "weight": 0.7}, {"name": "concise", "weight": 0.3}]


def test_request_form_defaults():
    spec = MergeSpec.from_request({"merge": [{"name": "a"}, {"name": "b", "weight": 2}]})
    assert spec == MergeSpec(parts=(("a", 1.0), ("b", 2.0)), method="linear")


def test_lorax_defaults_and_ignored_density():
    spec = MergeSpec.from_lorax({"ids": ["a", "b"], "weights": [], "density": 0.0})
    assert spec == MergeSpec(parts=(("a", 1.0), ("b", 1.0)), method="linear", density=None)


_nan, _inf = float("nan"), float("inf")
_ab = [{"name": "a", "weight": 1}, {"name": "b", "weight": 1}]

INVALID_REQUESTS = [
    # data, max_parts, param
    ("legal", None, "adapter"),
    ({}, None, "adapter.merge"),
    ({"merge": []}, None, "adapter.merge"),
    ({"merge": "a"}, None, "adapter.merge"),
    ({"merge": ["a"]}, None, "adapter.merge[0]"),
    ({"merge": _ab, "weights": [1, 2]}, None, "adapter.weights"),
    ({"merge": [{"name": "a", "wieght": 1}]}, None, "adapter.merge[0].wieght"),
    ({"merge": [{"weight": 1}]}, None, "adapter.merge[0].name"),
    ({"merge": [{"name": "", "weight": 1}]}, None, "adapter.merge[0].name"),
    ({"merge": [{"name": "a", "weight": 1}, {"name": "a", "weight": 2}]}, None, "adapter.merge[1].name"),
    ({"merge": [{"name": "a", "weight": -0.5}]}, None, "adapter.merge[0].weight"),
    ({"merge": [{"name": "a", "weight": 1}, {"name": "b", "weight": _nan}]}, None, "adapter.merge[1].weight"),
    ({"merge": [{"name": "a", "weight": 1}, {"name": "b", "weight": _inf}]}, None, "adapter.merge[1].weight"),
    ({"merge": [{"name": "a", "weight": "0.5"}]}, None, "adapter.merge[0].weight"),
    ({"merge": [{"name": "a", "weight": True}]}, None, "adapter.merge[0].weight"),
    ({"merge": _ab, "method": "slerp"}, None, "adapter.method"),
    ({"merge": _ab, "method": "ties"}, None, "adapter.density"),
    ({"merge": _ab, "method": "dare_linear"}, None, "adapter.density"),
    ({"merge": _ab, "method": "magnitude_prune"}, None, "adapter.density"),
    ({"merge": _ab, "method": "ties", "density": 0}, None, "adapter.density"),
    ({"merge": _ab, "method": "ties", "density": 1.5}, None, "adapter.density"),
    ({"merge": _ab, "method": "dare_ties", "density": _nan}, None, "adapter.density"),
    ({"merge": _ab, "method": "linear", "density": -1}, None, "adapter.density"),
    ({"merge": _ab, "majority_sign_method": "mean"}, None, "adapter.majority_sign_method"),
    ({"merge": _ab + [{"name": "c", "weight": 1}]}, 2, "adapter.merge"),
]


@pytest.mark.parametrize(("data", "max_parts", "param"), INVALID_REQUESTS)
def test_invalid_request_specs_name_the_field(data, max_parts, param):
    with pytest.raises(MergeSpecInvalid) as caught:
        MergeSpec.from_request(data, max_parts=max_parts)
    assert caught.value.param == param
    assert caught.value.code == "invalid_merge_spec"


INVALID_LORAX = [
    ({"ids": []}, None, "merged_adapters.ids"),
    ({"ids": ["a", "b"], "weights": [1]}, None, "merged_adapters.weights"),
    ({"ids": ["a", "b"], "weights": [1, -1]}, None, "merged_adapters.weights[1]"),
    ({"ids": ["a", "a"], "weights": [1, 1]}, None, "merged_adapters.ids[1]"),
    ({"ids": ["a", 3], "weights": [1, 1]}, None, "merged_adapters.ids[1]"),
    ({"ids": ["a", "b"], "merge_strategy": "slerp"}, None, "merged_adapters.merge_strategy"),
    ({"ids": ["a", "b"], "merge_strategy": "ties", "density": 0.0}, None, "merged_adapters.density"),
    ({"ids": ["a", "b"], "majority_sign_method": "MEAN"}, None, "merged_adapters.majority_sign_method"),
    ({"ids": ["a", "b", "c"]}, 2, "merged_adapters.ids"),
    ({"ids": ["a"], "adapter_source": "hub"}, None, "merged_adapters.adapter_source"),
]


@pytest.mark.parametrize(("data", "max_parts", "param"), INVALID_LORAX)
def test_invalid_lorax_specs_name_the_field(data, max_parts, param):
    with pytest.raises(MergeSpecInvalid) as caught:
        MergeSpec.from_lorax(data, max_parts=max_parts)
    assert caught.value.param == param


@pytest.mark.parametrize("method", ["linear", "ties", "dare_linear", "dare_ties", "magnitude_prune"])
def test_elementwise_methods_refuse_unequal_ranks_naming_modules(loaded, method):
    spec = MergeSpec.from_request(
        {"merge": [{"name": "a", "weight": 1}, {"name": "d", "weight": 1}], "method": method, "density": 0.5}
    )
    with pytest.raises(MergeSpecInvalid) as caught:
        merge_lora(spec, [loaded["a"], loaded["d"]], "m")
    assert caught.value.param == "adapter.merge"
    assert "model.layers.0.mlp.gate_proj ('a' r=4, 'd' r=8)" in str(caught.value)
    assert "'cat' or 'svd'" in str(caught.value)


def test_lorax_incompatibility_names_the_lorax_field(loaded):
    spec = MergeSpec.from_lorax({"ids": ["a", "d"], "weights": [1, 1]})
    with pytest.raises(MergeSpecInvalid) as caught:
        merge_lora(spec, [loaded["a"], loaded["d"]], "m")
    assert caught.value.param == "merged_adapters.ids"


def test_cat_over_the_servers_max_rank_is_refused(loaded):
    spec = MergeSpec(parts=(("a", 1.0), ("b", 1.0), ("d", 1.0)), method="cat")
    with pytest.raises(MergeSpecInvalid, match="rank 16, over the server's maximum rank 8"):
        merge_lora(spec, list(loaded.values()), "m", max_rank=8)
    assert merge_lora(spec, list(loaded.values()), "m", max_rank=16).rank == 16


@pytest.mark.parametrize("method", ["cat", "svd", "ties"])
def test_saved_merge_reloads_through_the_loader(loaded, linear_shapes, tmp_path, method):
    from safetensors.torch import save_file

    from adapters.store import CONFIG_FILE, WEIGHTS_FILE

    spec = MergeSpec(parts=(("a", 0.5), ("c", 0.5)), method=method, density=0.5)
    merged = merge_lora(spec, list(loaded.values()), merged_name(spec))
    tensors = {}
    for name, module in merged.modules.items():
        tensors[f"base_model.model.{name}.lora_A.weight"] = module.lora_A
        tensors[f"base_model.model.{name}.lora_B.weight"] = module.lora_B
    save_file(tensors, tmp_path / WEIGHTS_FILE)
    (tmp_path / CONFIG_FILE).write_text(json.dumps(merged.config))

    reloaded = load_lora_weights(merged.name, tmp_path, linear_shapes, max_rank=64)
    for name, module in merged.modules.items():
        assert reloaded.modules[name].scaling == 1.0
        torch.testing.assert_close(reloaded.modules[name].delta_weight(), module.delta_weight())
