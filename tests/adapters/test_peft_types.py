"""rsLoRA, DoRA, IA³, prompt and prefix tuning from PEFT's format: validation, the batched layer's modes,
NF4, merges, export."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from adapters.base_model import load_base_model
from adapters.batched_lora import BatchedLoRALinear, BatchedLoRAModel
from adapters.errors import AdapterInvalid, MergeSpecInvalid
from adapters.export import export_merged_model
from adapters.lease import AdapterChoice
from adapters.lora import load_lora_weights
from adapters.merging import MergeSpec, merge_lora
from adapters.registry import AdapterRegistry
from adapters.store import CONFIG_FILE, WEIGHTS_FILE, AdapterStore

TYPES = {
    "attn-r4": "lora",
    "rslora-patterns": "rslora",
    "dora": "dora",
    "dora-rslora": "dora",
    "ia3": "ia3",
    "prompt-tuning": "prompt_tuning",
    "prefix-tuning": "prefix_tuning",
    "prefix-projection": "prefix_tuning",
}


@pytest.fixture
def registry(tiny_base_dir, peft_type_store_dir):
    base = load_base_model(tiny_base_dir, "none", "cpu")
    lora = BatchedLoRAModel(base.model, torch.float32)
    return AdapterRegistry(AdapterStore(peft_type_store_dir), lora, max_loaded=6, max_rank=64), base


def _peft_reference(base_dir, source, quantization: str = "none"):
    """PEFT's own model for ``source`` (None: the bare base), on a base loaded as the server loads it."""
    from peft import PeftModel

    from training.lora_model import disable_cpu_4bit_repacking

    model = load_base_model(base_dir, quantization, "cpu", dtype=torch.float32).model
    disable_cpu_4bit_repacking(model)  # PEFT reads the plain NF4 layout (see training/lora_model.py)
    return PeftModel.from_pretrained(model, source).eval() if source else model


def _kernel_off(model) -> None:
    for module in model.modules():
        if isinstance(module, BatchedLoRALinear):
            module.kernel = None


def test_the_registry_knows_each_adapters_type(registry):
    reg, _ = registry
    for name, kind in TYPES.items():
        assert reg.load(name).weights.peft_type == kind


@pytest.mark.parametrize("kernel", [True, False], ids=["kernel", "pytorch"])
@pytest.mark.parametrize(
    "layout",
    [
        pytest.param([None, "attn-r4", "rslora-patterns", "dora", "dora-rslora", "ia3"], id="gather"),
        pytest.param(["dora", "ia3", None, "dora", "ia3", "attn-r4", "attn-r4", None, None], id="stacked"),
        pytest.param(["dora", "dora"], id="single-dora"),
        pytest.param(["ia3", "ia3", "ia3"], id="single-ia3"),
    ],
)
def test_mixed_types_in_one_batch_match_peft_per_adapter(
    registry, tiny_base_dir, tiny_adapter_sources, peft_type_sources, layout, kernel
):
    """One forward over rows of LoRA, rsLoRA (rank/alpha patterns), DoRA and IA³ adapters and the base
    equals PEFT's model for each adapter alone, at every position, through every mode of the layer."""
    reg, base = registry
    if not kernel:
        _kernel_off(base.model)
    sources = {**tiny_adapter_sources, **peft_type_sources}
    slots = [reg.lease(AdapterChoice(name)).slot for name in layout]
    input_ids = torch.randint(3, 200, (len(layout), 6))
    with torch.no_grad(), reg.lora.rows(slots):
        batched = base.model(input_ids=input_ids).logits  # (B, 6, V)
        one_token = base.model(input_ids=input_ids[:, :1]).logits  # (B, 1, V): decode-shaped rows
    references = {
        name: _peft_reference(tiny_base_dir, sources[name] if name else None) for name in set(layout)
    }
    for row, name in enumerate(layout):
        with torch.no_grad():
            expected = references[name](input_ids=input_ids[row : row + 1]).logits[0]
        torch.testing.assert_close(batched[row], expected, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(one_token[row], expected[:1], rtol=1e-4, atol=1e-4)


def test_packed_prompts_of_every_type_equal_the_pytorch_path_and_peft(
    registry, tiny_base_dir, peft_type_sources
):
    """Token ranges (packed prefill) with DoRA, IA³ and the base in one row, kernel and PyTorch alike."""
    reg, base = registry
    names = ["dora", None, "ia3", "rslora-patterns"]
    slots = [reg.lease(AdapterChoice(n)).slot for n in names]
    prompts = [torch.randint(3, 200, (n,)) for n in (5, 3, 4, 6)]
    packed = torch.cat(prompts).view(1, -1)  # (1, 18)
    ranges, start = [], 0
    for slot, prompt in zip(slots, prompts):
        ranges.append((slot, start, start + len(prompt)))
        start += len(prompt)
    with torch.no_grad():
        with reg.lora.token_ranges(ranges):
            with_kernel = base.model(input_ids=packed).logits[0]
        _kernel_off(base.model)
        with reg.lora.token_ranges(ranges):
            pytorch = base.model(input_ids=packed).logits[0]
    torch.testing.assert_close(with_kernel, pytorch, rtol=1e-4, atol=1e-4)
    # a plain forward lets later prompts attend to earlier ones: only the first prompt is its own
    # sequence here (the engine tests check packed prefill of every type through the runner's masks)
    reference = _peft_reference(tiny_base_dir, peft_type_sources[names[0]])
    with torch.no_grad():
        expected = reference(input_ids=packed[:, : len(prompts[0])]).logits[0]
    torch.testing.assert_close(pytorch[: len(prompts[0])], expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("warm", [False, True], ids=["fresh", "after-a-base-run"])
def test_dora_on_an_nf4_base_matches_peft_on_that_base(tiny_base_dir, peft_type_sources, warm):
    """DoRA's norm is taken on the dequantized NF4 weight. ``after-a-base-run``: bitsandbytes has repacked
    the weights for its CPU kernel (where the CPU supports it) before the adapter is installed."""
    base = load_base_model(tiny_base_dir, "nf4", "cpu", dtype=torch.float32)
    lora = BatchedLoRAModel(base.model, torch.float32)
    lora.reserve_slots(2)
    input_ids = torch.randint(3, 200, (1, 8))
    if warm:
        with torch.no_grad():
            base.model(input_ids=input_ids)
    weights = load_lora_weights("dora", peft_type_sources["dora"], lora.linear_shapes, 64)
    lora.install(1, weights)
    fresh = BatchedLoRAModel(
        load_base_model(tiny_base_dir, "nf4", "cpu", dtype=torch.float32).model, torch.float32
    )
    for name, scale in fresh.dora_scales(weights).items():  # the ratio does not depend on bnb's layout
        # (the repacked layout keeps its block scales in bf16: the weight differs by their rounding)
        torch.testing.assert_close(lora.banks[name].out_scale[1], scale, rtol=5e-3, atol=0)
    with torch.no_grad(), lora.rows([0, 1]):
        served = base.model(input_ids=input_ids.repeat(2, 1)).logits  # (2, 8, V)
        peft_base = _peft_reference(tiny_base_dir, None, "nf4")(input_ids=input_ids).logits[0]
        peft_dora = _peft_reference(tiny_base_dir, peft_type_sources["dora"], "nf4")(
            input_ids=input_ids
        ).logits[0]
    base_noise = (served[0] - peft_base).abs().max().item()  # bitsandbytes' repacked kernel vs its plain one
    dora_error = (served[1] - peft_dora).abs().max().item()
    dora_effect = (peft_dora - peft_base).abs().max().item()
    assert dora_error <= max(3 * base_noise, 1e-4), (dora_error, base_noise)
    assert dora_error < 0.05 * dora_effect  # a wrong norm would be off by a fraction of the effect itself


def _broken_copy(source, tmp_path, edit_config=None, edit_tensors=None):
    folder = tmp_path / "broken"
    shutil.copytree(source, folder)
    if edit_config:
        config = json.loads((folder / CONFIG_FILE).read_text())
        edit_config(config)
        (folder / CONFIG_FILE).write_text(json.dumps(config))
    if edit_tensors:
        tensors = load_file(folder / WEIGHTS_FILE)
        edit_tensors(tensors)
        save_file(tensors, folder / WEIGHTS_FILE)
    return folder


def _problems(folder, shapes) -> list[str]:
    with pytest.raises(AdapterInvalid) as info:
        load_lora_weights("broken", folder, shapes, max_rank=64)
    return info.value.problems


def _first_key(tensors, suffix: str) -> str:
    return sorted(k for k in tensors if k.endswith(suffix))[0]


def test_a_broken_ia3_adapter_lists_every_problem(registry, peft_type_sources, tmp_path):
    reg, _ = registry

    def tensors(t):
        t[_first_key(t, "down_proj.ia3_l")] = torch.ones(128, 1)  # an output shape on a feedforward module
        t[_first_key(t, "k_proj.ia3_l")] = torch.full((32, 1), float("nan"))
        t["base_model.model.model.layers.0.mlp.up_proj.lora_A.weight"] = torch.ones(2, 64)

    folder = _broken_copy(peft_type_sources["ia3"], tmp_path, edit_tensors=tensors)
    problems = _problems(folder, reg.lora.linear_shapes)
    assert len(problems) == 3
    assert any("down_proj: IA3 vector has shape (128, 1)" in p and "(1, 128)" in p for p in problems)
    assert any("k_proj: IA3 vector contains NaN" in p for p in problems)
    assert any("only ia3_l vectors" in p for p in problems)

    def config(c):
        c["feedforward_modules"] = ["down_proj", "gate_proj"]
        c["fan_in_fan_out"] = True

    folder = _broken_copy(peft_type_sources["ia3"], tmp_path / "cfg", edit_config=config)
    problems = _problems(folder, reg.lora.linear_shapes)
    assert any("feedforward_modules ['gate_proj'] are not among the target_modules" in p for p in problems)
    assert any("fan_in_fan_out" in p for p in problems)


def test_a_broken_dora_adapter_lists_every_problem(registry, peft_type_sources, tmp_path):
    reg, _ = registry

    def tensors(t):
        t[_first_key(t, "q_proj.lora_magnitude_vector")] = torch.ones(63)
        t[_first_key(t, "v_proj.lora_magnitude_vector")] = torch.full((32,), float("inf"))
        del t[_first_key(t, "up_proj.lora_magnitude_vector")]

    folder = _broken_copy(peft_type_sources["dora"], tmp_path, edit_tensors=tensors)
    problems = _problems(folder, reg.lora.linear_shapes)
    assert len(problems) == 3
    assert any("q_proj: DoRA magnitude has shape (63,), expected (64,)" in p for p in problems)
    assert any("v_proj: DoRA magnitude contains NaN or infinity" in p for p in problems)
    assert any("up_proj: use_dora is set but the module has no lora_magnitude_vector" in p for p in problems)

    folder = _broken_copy(
        peft_type_sources["dora"], tmp_path / "off", edit_config=lambda c: c.update(use_dora=False)
    )
    problems = _problems(folder, reg.lora.linear_shapes)
    assert problems and all("use_dora is not set" in p for p in problems)


def test_a_zero_norm_row_is_refused_at_install_and_frees_its_slot(registry, peft_type_sources, tmp_path):
    """A DoRA adapter whose ``W + ΔW`` has an all-zero row (here: B cancels W) has no finite ratio."""
    reg, base = registry
    name = "model.layers.0.self_attn.q_proj"
    weight = base.model.get_submodule(name).base.weight.detach()

    def tensors(t):  # A = I[:4], B = -W[:, :4] / s, on a W whose row 0 is zero beyond column 4
        weight[0, 4:] = 0.0
        t[f"base_model.model.{name}.lora_A.weight"] = torch.eye(4, 64)
        t[f"base_model.model.{name}.lora_B.weight"] = -weight[:, :4] / 2.0  # scaling 8 / 4 = 2

    shutil.rmtree(reg.store.root / "dora")
    _broken_copy(peft_type_sources["dora"], tmp_path, edit_tensors=tensors).rename(reg.store.root / "dora")
    free_before = len(reg._free_slots)
    with pytest.raises(AdapterInvalid, match="not finite on this base"):
        reg.load("dora")
    assert len(reg._free_slots) == free_before and not reg.is_loaded("dora")


@pytest.mark.parametrize("other", ["dora", "ia3", "prompt-tuning", "prefix-tuning"])
def test_merges_refuse_dora_and_ia3_parts_by_name(registry, other):
    reg, _ = registry
    parts = [reg.read_weights("attn-r4"), reg.read_weights(other)]
    with pytest.raises(MergeSpecInvalid) as info:
        merge_lora(MergeSpec(parts=(("attn-r4", 0.5), (other, 0.5))), parts, "m")
    assert info.value.param == "adapter.merge[1].name"
    assert f"'{other}' is a {TYPES[other]} adapter" in str(info.value)
    merged = merge_lora(
        MergeSpec(parts=(("attn-r4", 0.5), ("rslora-patterns", 0.5)), method="cat"),
        [parts[0], reg.read_weights("rslora-patterns")],
        "m2",
    )
    assert merged.peft_type == "lora"


@pytest.mark.parametrize("name", ["rslora-patterns", "dora", "dora-rslora", "ia3"])
def test_export_folds_each_type_like_peft_merge_and_unload(tiny_base_dir, peft_type_sources, tmp_path, name):
    from transformers import AutoModelForCausalLM

    report = export_merged_model(
        tiny_base_dir,
        peft_type_sources[name],
        tmp_path / "out",
        dtype=torch.float32,
        quantization="none",
        sample_prompts=["fold me", "and me too, please"],
    )
    assert report.max_abs_logit_diff < 1e-3 and report.top1_agreement == 1.0  # exported vs served
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    merged = _peft_reference(tiny_base_dir, peft_type_sources[name]).merge_and_unload()
    input_ids = torch.randint(3, 200, (1, 9))
    with torch.no_grad():
        torch.testing.assert_close(
            exported(input_ids=input_ids).logits, merged(input_ids=input_ids).logits, rtol=1e-4, atol=1e-4
        )


@pytest.mark.parametrize(
    "name,kind", [("prompt-tuning", "PROMPT_TUNING"), ("prefix-tuning", "PREFIX_TUNING")]
)
def test_export_refuses_prompt_and_prefix_tuning_with_a_reason(
    tiny_base_dir, peft_type_sources, tmp_path, name, kind
):
    folder = peft_type_sources[name]
    with pytest.raises(AdapterInvalid, match=f"{kind} adds virtual tokens"):
        export_merged_model(tiny_base_dir, folder, tmp_path / "out", quantization="none")
    assert not (tmp_path / "out").exists()


def test_a_broken_prompt_tuning_adapter_lists_every_problem(registry, peft_type_sources, tmp_path):
    reg, _ = registry

    def tensors(t):
        t["prompt_embeddings"] = torch.full((4, 64), float("nan"))
        t["extra"] = torch.ones(1)

    folder = _broken_copy(peft_type_sources["prompt-tuning"], tmp_path, edit_tensors=tensors)
    problems = _problems(folder, reg.lora.linear_shapes)
    assert len(problems) == 2 and "unexpected tensors ['extra']" in problems[0] and "NaN" in problems[1]
    folder = _broken_copy(
        peft_type_sources["prompt-tuning"],
        tmp_path / "cfg",
        edit_config=lambda c: c.update(num_virtual_tokens=3),
    )
    assert _problems(folder, reg.lora.linear_shapes) == [
        "prompt_embeddings has shape (4, 64), expected (3, 64)"
    ]

    def wide(t):
        t["prompt_embeddings"] = torch.ones(4, 32)

    folder = _broken_copy(
        peft_type_sources["prompt-tuning"],
        tmp_path / "wide",
        edit_config=lambda c: c.update(token_dim=32),
        edit_tensors=wide,
    )
    shutil.rmtree(reg.store.root / "prompt-tuning")
    folder.rename(reg.store.root / "prompt-tuning")
    with pytest.raises(AdapterInvalid, match="prompt embeddings are 32 wide, the base's are 64"):
        reg.load("prompt-tuning")


def test_a_broken_prefix_tuning_adapter_lists_every_problem(registry, peft_type_sources, tmp_path):
    """The tiny base has 2 layers of 2 key/value heads of 16; every mismatch is one reason."""
    reg, _ = registry

    def _load(folder):
        with pytest.raises(AdapterInvalid) as info:
            load_lora_weights(
                "broken", folder, reg.lora.linear_shapes, 64, attention=reg.lora.attention_shape
            )
        return info.value.problems

    def tensors(t):
        t["prompt_embeddings"] = torch.full((3, 6 * 64), float("nan"))  # 3 layers of 4 heads of 16
        t["transform.0.weight"] = torch.ones(16, 32)  # an MLP that was not projected at save

    def config(c):
        c.update(num_layers=3, num_attention_heads=4, token_dim=64)

    folder = _broken_copy(peft_type_sources["prefix-tuning"], tmp_path, config, tensors)
    problems = _load(folder)
    assert len(problems) == 4, problems
    assert "the prefix is for 3 layers (num_layers), the base has 2" in problems
    assert "the prefix has 4 key/value heads per layer (num_attention_heads), the base has 2" in problems
    assert any("unexpected tensors ['transform.0.weight']" in p for p in problems)
    assert any("NaN or infinity" in p for p in problems)

    folder = _broken_copy(
        peft_type_sources["prefix-tuning"],
        tmp_path / "cfg",
        edit_config=lambda c: c.update(num_virtual_tokens=2, token_dim=31, num_transformer_submodules=2),
    )
    assert _load(folder) == [
        "prefix tuning for encoder-decoder models (num_transformer_submodules != 1) is not supported",
        "token_dim 31 is not a multiple of num_attention_heads 2",
    ]
    folder = _broken_copy(
        peft_type_sources["prefix-tuning"],
        tmp_path / "n",
        edit_config=lambda c: c.update(num_virtual_tokens=2),
    )
    assert _load(folder) == [
        "prompt_embeddings has shape (3, 128), expected (2, 128) (num_virtual_tokens, num_layers·2·token_dim)"
    ]

    def one_layer(t):
        t["prompt_embeddings"] = torch.ones(3, 64)  # a 1-layer prefix the config describes as such

    folder = _broken_copy(
        peft_type_sources["prefix-tuning"], tmp_path / "layers", lambda c: c.update(num_layers=1), one_layer
    )
    shutil.rmtree(reg.store.root / "prefix-tuning")
    folder.rename(reg.store.root / "prefix-tuning")
    free_before = len(reg._free_slots)
    with pytest.raises(AdapterInvalid, match=r"the prefix is for 1 layers \(num_layers\), the base has 2"):
        reg.load("prefix-tuning")  # the registry checks against the base it serves
    assert len(reg._free_slots) == free_before and not reg.is_loaded("prefix-tuning")


def test_the_store_describes_each_adapters_type(peft_type_store_dir):
    """What ``GET /v1/adapters`` prints as ``peft_type``, read from the config without loading weights."""
    store = AdapterStore(peft_type_store_dir)
    assert {name: store.describe(name).peft_type for name in TYPES} == TYPES


@pytest.mark.parametrize("quantization", ["nf4", "int8"])
def test_dora_norms_use_the_weight_peft_dequantizes(tiny_base_dir, quantization):
    from peft.utils.integrations import dequantize_module_weight

    from adapters.dora import dequantized_weight

    model = load_base_model(tiny_base_dir, quantization, "cpu", dtype=torch.float32).model
    for name in ("model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj"):
        layer = model.get_submodule(name)
        torch.testing.assert_close(dequantized_weight(layer), dequantize_module_weight(layer).float())


def test_dora_on_an_int8_base_matches_peft_on_that_base(tiny_base_dir, peft_type_sources):
    base = load_base_model(tiny_base_dir, "int8", "cpu", dtype=torch.float32)
    lora = BatchedLoRAModel(base.model, torch.float32)
    lora.reserve_slots(2)
    lora.install(1, load_lora_weights("dora", peft_type_sources["dora"], lora.linear_shapes, 64))
    input_ids = torch.randint(3, 200, (1, 8))
    with torch.no_grad(), lora.rows([1]):
        served = base.model(input_ids=input_ids).logits[0]
        expected = _peft_reference(tiny_base_dir, peft_type_sources["dora"], "int8")(
            input_ids=input_ids
        ).logits[0]
    torch.testing.assert_close(served, expected, rtol=1e-3, atol=1e-3)


class _Biased(torch.nn.Module):
    """Two biased linears (Llama has none): DoRA leaves the bias unscaled, IA³ on an output scales it."""

    def __init__(self):
        super().__init__()
        self.up = torch.nn.Linear(8, 6)
        self.down = torch.nn.Linear(6, 8)

    def forward(self, x):
        return self.down(self.up(x))


@pytest.mark.parametrize("kind", ["dora", "ia3-output", "ia3-feedforward"])
def test_biased_layers_follow_peft(tmp_path, kind):
    from peft import IA3Config, LoraConfig, PeftModel, get_peft_model

    torch.manual_seed(0)
    base = _Biased()
    if kind == "dora":
        config = LoraConfig(
            r=2, lora_alpha=4, target_modules=["up", "down"], use_dora=True, init_lora_weights=False
        )
    else:
        feedforward = ["down"] if kind == "ia3-feedforward" else []
        config = IA3Config(
            target_modules=["up", "down"], feedforward_modules=feedforward, init_ia3_weights=False
        )
    peft_model = get_peft_model(_Biased().requires_grad_(False), config)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_magnitude_vector" in name:
                param.mul_(0.5 + torch.rand_like(param))
    peft_model.save_pretrained(tmp_path / "adapter")

    served = _Biased()
    served.load_state_dict(base.state_dict())
    lora = BatchedLoRAModel(served, torch.float32, use_kernel=False)
    lora.reserve_slots(2)
    lora.install(1, load_lora_weights(kind, tmp_path / "adapter", lora.linear_shapes, 64))
    x = torch.randn(3, 1, 8)
    reference = PeftModel.from_pretrained(_load_like(base), tmp_path / "adapter").eval()
    with torch.no_grad(), lora.rows([1, 0, 1]):
        got = served(x)
        expected = reference(x)
        plain = base(x)
    torch.testing.assert_close(got[0], expected[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got[2], expected[2], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got[1], plain[1], rtol=1e-6, atol=1e-6)  # the base row is untouched
    assert not torch.allclose(got[0], plain[0], atol=1e-3)  # the adapter does change its rows


def _load_like(base: torch.nn.Module) -> torch.nn.Module:
    copy = _Biased()
    copy.load_state_dict(base.state_dict())
    return copy
