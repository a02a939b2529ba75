"""The Triton LoRA kernels add exactly each row's own adapter's delta (BGMV) or each segment's (SGMV).

On a machine without CUDA they run in Triton's interpreter on CPU tensors (``TRITON_INTERPRET=1``,
set in ``tests/conftest.py`` before Triton is imported); on a GPU the same tests run the compiled
kernels. Shapes are small: the interpreter runs every program in Python.
"""

from __future__ import annotations

import os

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

pytest.importorskip("triton", reason="triton is not installed (the dev extra pins it)")

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
if DEVICE.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("no CUDA device and TRITON_INTERPRET is not 1", allow_module_level=True)

from adapters.kernels import triton_lora  # noqa: E402 - after the interpreter is chosen

# dtype -> (atol, rtol) against an fp32 reference: the kernels accumulate in fp32 and round once
TOLERANCES = {
    torch.float32: (1e-4, 1e-4),
    torch.float16: (2e-2, 1e-2),
    torch.bfloat16: (6e-2, 2e-2),
}


def make_bank(
    ranks: list[int], in_features: int, out_features: int, dtype: torch.dtype, seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """A bank like :class:`adapters.batched_lora.LoRABank`'s: slot 0 all zeros, slot ``i`` of rank
    ``ranks[i - 1]``, padded with zeros to the largest rank: A ``(S, r, in)``, Bᵀ ``(S, r, out)``."""
    generator = torch.Generator().manual_seed(seed)
    rank = max(ranks, default=1)
    lora_A = torch.zeros(len(ranks) + 1, rank, in_features)
    lora_B = torch.zeros(len(ranks) + 1, rank, out_features)
    for slot, r in enumerate(ranks, start=1):
        lora_A[slot, :r] = torch.randn(r, in_features, generator=generator) / in_features**0.5
        lora_B[slot, :r] = torch.randn(r, out_features, generator=generator) / r**0.5
    return lora_A.to(DEVICE, dtype), lora_B.to(DEVICE, dtype)


def reference(y, x, lora_A, lora_B, token_slots: list[int], token_scales: list[float] | None = None):
    """``y + scale · Bᵀ[s]ᵀ A[s] x`` per token in fp32, one token at a time; a negative slot adds nothing."""
    out = y.float().clone()
    for t, slot in enumerate(token_slots):
        if slot >= 0:
            delta = (x[t].float() @ lora_A[slot].float().T) @ lora_B[slot].float()  # (out,)
            out[t] += delta * (1.0 if token_scales is None else token_scales[t])
    return out


def random_inputs(tokens: int, in_features: int, out_features: int, dtype: torch.dtype, seed: int):
    generator = torch.Generator().manual_seed(seed + 1000)
    x = torch.randn(tokens, in_features, generator=generator).to(DEVICE, dtype)
    y = torch.randn(tokens, out_features, generator=generator).to(DEVICE, dtype)
    return x, y


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype) -> None:
    atol, rtol = TOLERANCES[dtype]
    torch.testing.assert_close(actual.float().cpu(), expected.cpu(), atol=atol, rtol=rtol)


def run_sgmv(y, x, lora_A, lora_B, segments: list[tuple[int, int, int]], scales=None) -> torch.Tensor:
    """:func:`triton_lora.sgmv_` over ``(slot, start, end)`` segments."""
    columns = list(zip(*segments))
    slots, starts, ends = (torch.tensor(c, dtype=torch.long, device=DEVICE) for c in columns)
    scale = None if scales is None else torch.tensor(scales, dtype=torch.float32, device=DEVICE)
    longest = max(end - start for _, start, end in segments)
    return triton_lora.sgmv_(y, x, lora_A, lora_B, slots, starts, ends, longest, scale)


# (ranks of the bank's adapters, each row's slot, in, out): mixed ranks padded, rows of no adapter
# (slot 0 holds zeros; -1 is skipped), a rank that is not a power of two, odd feature counts.
BGMV_CASES = {
    "one-adapter-every-row": ([8], [1, 1, 1], 32, 48),
    "mixed-ranks-and-base-rows": ([2, 16, 5], [0, 3, -1, 2, 1, 2], 40, 72),
    "no-adapter-at-all": ([4], [-1, 0, -1], 24, 24),
    "one-row": ([3], [1], 17, 130),
    "odd-features": ([7, 1], [2, 1, 2], 129, 257),
}


@pytest.mark.parametrize("dtype", list(TOLERANCES), ids=str)
@pytest.mark.parametrize("case", list(BGMV_CASES))
def test_bgmv_adds_each_rows_own_adapter(case, dtype):
    ranks, slots, in_features, out_features = BGMV_CASES[case]
    lora_A, lora_B = make_bank(ranks, in_features, out_features, dtype, seed=len(case))
    x, y = random_inputs(len(slots), in_features, out_features, dtype, seed=len(case))
    expected = reference(y, x, lora_A, lora_B, slots)
    index = torch.tensor(slots, dtype=torch.long, device=DEVICE)
    out = triton_lora.bgmv_(y, x, lora_A, lora_B, index)
    assert out is y  # in place
    assert_close(y, expected, dtype)


def test_bgmv_per_row_scale_and_strided_banks():
    """A per-row factor scales each delta; a ``B (S, out, r)`` bank passes as its transpose."""
    lora_A, lora_B = make_bank([4, 8], 32, 40, torch.float32, seed=3)
    b_out_r = lora_B.transpose(1, 2).contiguous()  # (S, out, r), the other common layout
    x, y = random_inputs(4, 32, 40, torch.float32, seed=3)
    scales = [0.5, 2.0, -1.0, 0.0]
    expected = reference(y, x, lora_A, lora_B, [1, 2, 2, 1], scales)
    index = torch.tensor([1, 2, 2, 1], device=DEVICE)
    scale = torch.tensor(scales, device=DEVICE)
    triton_lora.bgmv_(y, x, lora_A, b_out_r.transpose(1, 2), index, scale)
    assert_close(y, expected, torch.float32)


def test_bgmv_row_does_not_depend_on_its_batch():
    """The same row gives the same bits alone and in a batch of other adapters' rows."""
    lora_A, lora_B = make_bank([4, 8, 2], 48, 64, torch.bfloat16, seed=5)
    x, y = random_inputs(5, 48, 64, torch.bfloat16, seed=5)
    batch = y.clone()
    triton_lora.bgmv_(batch, x, lora_A, lora_B, torch.tensor([3, 1, 2, 0, 1], device=DEVICE))
    alone = y[1:2].clone()
    triton_lora.bgmv_(alone, x[1:2], lora_A, lora_B, torch.tensor([1], device=DEVICE))
    assert torch.equal(batch[1:2], alone)


# (ranks, segments (slot, start, end), tokens): segments of length 1, a gap of tokens in no segment,
# a segment longer than one tile (32 tokens), a no-adapter segment.
SGMV_CASES = {
    "one-segment": ([8], [(1, 0, 5)], 5),
    "length-one-segments": ([4, 2], [(1, 0, 1), (2, 1, 2), (1, 2, 3)], 3),
    "mixed-with-base-and-gap": ([2, 16, 5], [(3, 0, 4), (-1, 4, 6), (1, 6, 7), (2, 9, 12)], 12),
    "longer-than-a-tile": ([6, 3], [(2, 0, 3), (1, 3, 40)], 40),
}


@pytest.mark.parametrize("dtype", list(TOLERANCES), ids=str)
@pytest.mark.parametrize("case", list(SGMV_CASES))
def test_sgmv_adds_each_segments_adapter(case, dtype):
    ranks, segments, tokens = SGMV_CASES[case]
    lora_A, lora_B = make_bank(ranks, 40, 72, dtype, seed=len(case))
    x, y = random_inputs(tokens, 40, 72, dtype, seed=len(case))
    token_slots = [-1] * tokens
    for slot, start, end in segments:
        token_slots[start:end] = [slot] * (end - start)
    expected = reference(y, x, lora_A, lora_B, token_slots)
    run_sgmv(y, x, lora_A, lora_B, segments)
    assert_close(y, expected, dtype)


def test_sgmv_per_segment_scale():
    lora_A, lora_B = make_bank([4], 24, 24, torch.float32, seed=7)
    x, y = random_inputs(5, 24, 24, torch.float32, seed=7)
    expected = reference(y, x, lora_A, lora_B, [1] * 5, [0.5, 0.5, 3.0, 3.0, 3.0])
    run_sgmv(y, x, lora_A, lora_B, [(1, 0, 2), (1, 2, 5)], scales=[0.5, 3.0])
    assert_close(y, expected, torch.float32)


def test_bad_shapes_name_the_tensors():
    lora_A, lora_B = make_bank([4], 16, 24, torch.float32, seed=0)
    x, y = random_inputs(2, 16, 20, torch.float32, seed=0)  # y is 20 wide, the bank's output 24
    with pytest.raises(ValueError, match="shapes do not match"):
        triton_lora.bgmv_(y, x, lora_A, lora_B, torch.tensor([1, 1], device=DEVICE))


@st.composite
def segmented_batches(draw):
    """A bank of 1-4 adapters of ranks 1-16 and 1-6 segments of 1-9 tokens, some of no adapter."""
    ranks = draw(st.lists(st.integers(1, 16), min_size=1, max_size=4))
    lengths = draw(st.lists(st.integers(1, 9), min_size=1, max_size=6))
    slots = draw(st.lists(st.integers(-1, len(ranks)), min_size=len(lengths), max_size=len(lengths)))
    in_features = draw(st.integers(1, 48))
    out_features = draw(st.integers(1, 48))
    dtype = draw(st.sampled_from(list(TOLERANCES)))
    return ranks, lengths, slots, in_features, out_features, dtype, draw(st.integers(0, 2**16))


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(segmented_batches())
def test_bgmv_and_sgmv_agree_with_the_reference_for_any_batch(batch):
    """Per token, a segmented batch through SGMV, and the same tokens as rows through BGMV, equal the
    reference: whatever the ranks, segment lengths, feature counts and dtype."""
    ranks, lengths, slots, in_features, out_features, dtype, seed = batch
    lora_A, lora_B = make_bank(ranks, in_features, out_features, dtype, seed)
    tokens = sum(lengths)
    x, y = random_inputs(tokens, in_features, out_features, dtype, seed)
    segments, token_slots, start = [], [], 0
    for slot, length in zip(slots, lengths):
        segments.append((slot, start, start + length))
        token_slots += [slot] * length
        start += length
    expected = reference(y, x, lora_A, lora_B, token_slots)
    by_segments = run_sgmv(y.clone(), x, lora_A, lora_B, segments)
    assert_close(by_segments, expected, dtype)
    by_rows = triton_lora.bgmv_(y.clone(), x, lora_A, lora_B, torch.tensor(token_slots, device=DEVICE))
    assert_close(by_rows, expected, dtype)


# adapters of every kind the banks hold, by the conftest's names: LoRA of mixed ranks, rsLoRA with
# rank patterns, DoRA (an output scale), IA³ (input and output scales)
MIXED_ADAPTERS = ["attn-r4", "all-r8", "mlp-r2", "rslora-patterns", "dora", "ia3"]


def mixed_runner(base_dir, sources, triton_ops):
    """A runner over a fresh tiny base with :data:`MIXED_ADAPTERS` in slots 1…; its ``lora`` uses
    ``triton_ops`` (or the PyTorch modes when None)."""
    from adapters.base_model import load_base_model
    from adapters.batched_lora import BatchedLoRAModel
    from adapters.lora import load_lora_weights
    from server.engine.runner import ModelRunner

    base = load_base_model(base_dir, "none", "cpu", dtype=torch.float32)
    lora = BatchedLoRAModel(base.model, torch.float32, use_kernel=False, triton_ops=triton_ops)
    lora.reserve_slots(len(MIXED_ADAPTERS) + 1)
    for slot, name in enumerate(MIXED_ADAPTERS, start=1):
        lora.install(slot, load_lora_weights(name, sources[name], lora.linear_shapes, max_rank=64))
    return ModelRunner(base.model, lora, torch.device("cpu"))


@pytest.mark.skipif(DEVICE.type == "cuda", reason="the CPU wiring check; on a GPU the gpu tests run")
@torch.inference_mode()
def test_batched_layers_through_triton_equal_the_pytorch_modes(
    tiny_base_dir, tiny_adapter_sources, peft_type_sources
):
    """A packed prefill (SGMV) and decode steps (BGMV) of rows with every kind of adapter, and base
    rows, give the logits of the plain-PyTorch modes: the layers hand the kernels the right slots."""
    sources = {**tiny_adapter_sources, **peft_type_sources}
    triton = mixed_runner(tiny_base_dir, sources, triton_lora)
    plain = mixed_runner(tiny_base_dir, sources, None)
    slots = [0, 2, 4, 5, 6, 2]  # base, LoRA twice, rsLoRA, DoRA, IA³ (the interpreter is slow: few rows)
    prompts = [([5 + i, 9, 3 + i, 40][: 1 + i % 4], slot) for i, slot in enumerate(slots)]
    for runner in (triton, plain):
        assert runner.fast_decode is not None
    got = triton.prefill(prompts)
    want = plain.prefill(prompts)
    for (a, _), (b, _) in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    tokens = [7] * len(slots)
    for _ in range(2):
        a, b = triton.decode(tokens, slots), plain.decode(tokens, slots)
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
        tokens = b.argmax(-1).tolist()


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_kernels_at_a_7b_models_shapes_on_the_gpu(dtype):
    """Compiled kernels at serving shapes: 4096 features, ranks 8-64 in one bank, 64 decode rows, a
    prefill of 4 prompts (one of 1 token, one over many tiles)."""
    lora_A, lora_B = make_bank([8, 16, 64, 32], 4096, 4096, dtype, seed=1)
    slots = [(i % 6) - 1 for i in range(64)]  # -1, 0 … 4
    x, y = random_inputs(64, 4096, 4096, dtype, seed=1)
    expected = reference(y, x, lora_A, lora_B, slots)
    triton_lora.bgmv_(y, x, lora_A, lora_B, torch.tensor(slots, device=DEVICE))
    assert_close(y, expected, dtype)
    segments = [(3, 0, 1), (1, 1, 300), (-1, 300, 310), (4, 310, 333)]
    x, y = random_inputs(333, 4096, 4096, dtype, seed=2)
    token_slots = [slot for slot, start, end in segments for _ in range(end - start)]
    expected = reference(y, x, lora_A, lora_B, token_slots)
    run_sgmv(y, x, lora_A, lora_B, segments)
    assert_close(y, expected, dtype)
