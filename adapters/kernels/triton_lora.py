"""Per-row LoRA on the GPU in Triton: BGMV for decode rows, SGMV for packed prefill segments.

Both add ``scale · B[s] (A[s] x)`` into ``y`` in place, reading each row's adapter from the stacked
banks where it lies (``A (S, r, in)``, ``Bᵀ (S, r, out)``; any strides, so a ``B (S, out, r)`` bank
passes as ``B.transpose(1, 2)``), with fp32 accumulation, as Punica's kernels do
(https://arxiv.org/abs/2310.18547): a *shrink* ``h = A[s] x`` to an fp32 ``(N, r)`` buffer, then an
*expand* ``y += scale · Bᵀ[s]ᵀ h``.

- :func:`bgmv_` (decode): one token per row, each with its own slot; a negative slot adds nothing.
  One program per row (shrink) and per row and output block (expand): a row's result depends on that
  row alone, so a batch never changes a row's numbers.
- :func:`sgmv_` (prefill): contiguous token segments, one slot per segment; tiles of tokens of one
  segment go through ``tl.dot`` (tensor cores), so a long prompt reads its adapter once per tile.

A bank holds adapters of mixed ranks padded with zeros to its rank ``r``; the kernels run over ``r``
rounded up to a power of two (16 at least for ``tl.dot``), the part beyond ``r`` masked to zeros, so
the padding adds exact zeros and nothing is copied. This module imports Triton at import time; callers
reach it through :func:`adapters.kernels.triton_lora`, which imports it lazily. On a CPU it runs only
under Triton's interpreter (``TRITON_INTERPRET=1``), which is what the tests use.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

_BLOCK_K = 128  # input features per step of BGMV's shrink
_BLOCK_N = 128  # output features per program of BGMV's expand
_SEG_BLOCK_M = 32  # tokens per SGMV tile
_SEG_BLOCK_K = 64
_SEG_BLOCK_N = 64


@triton.jit
def _bgmv_shrink(
    x_ptr, a_ptr, h_ptr, slot_ptr,
    in_features, rank,
    stride_xn, stride_xk,
    stride_as, stride_ar, stride_ak,
    stride_hn,
    R: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    """h[n, :] = A[slot[n]] x[n] for one row ``n`` (grid: rows); a negative slot leaves h alone."""
    row = tl.program_id(0)
    slot = tl.load(slot_ptr + row)
    if slot < 0:
        return
    ranks = tl.arange(0, R)
    acc = tl.zeros((R,), dtype=tl.float32)
    a_slot = a_ptr + slot.to(tl.int64) * stride_as
    for k0 in range(0, in_features, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < in_features
        x = tl.load(x_ptr + row * stride_xn + ks * stride_xk, mask=k_ok, other=0.0).to(tl.float32)
        a = tl.load(
            a_slot + ranks[:, None] * stride_ar + ks[None, :] * stride_ak,
            mask=(ranks < rank)[:, None] & k_ok[None, :],
            other=0.0,
        ).to(tl.float32)  # (R, BLOCK_K)
        acc += tl.sum(a * x[None, :], axis=1)
    tl.store(h_ptr + row * stride_hn + ranks, acc)


@triton.jit
def _bgmv_expand(
    y_ptr, h_ptr, b_ptr, slot_ptr, scale_ptr,
    out_features, rank,
    stride_yn, stride_yo,
    stride_hn,
    stride_bs, stride_br, stride_bo,
    R: tl.constexpr, BLOCK_N: tl.constexpr, HAS_SCALE: tl.constexpr,
):  # fmt: skip
    """y[n, block] += scale[n] · Bᵀ[slot[n]][:, block]ᵀ h[n] (grid: rows × output blocks)."""
    row = tl.program_id(0)
    slot = tl.load(slot_ptr + row)
    if slot < 0:
        return
    ranks = tl.arange(0, R)
    outs = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    o_ok = outs < out_features
    h = tl.load(h_ptr + row * stride_hn + ranks)  # (R,) fp32
    b = tl.load(
        b_ptr + slot.to(tl.int64) * stride_bs + ranks[:, None] * stride_br + outs[None, :] * stride_bo,
        mask=(ranks < rank)[:, None] & o_ok[None, :],
        other=0.0,
    ).to(tl.float32)  # (R, BLOCK_N)
    delta = tl.sum(b * h[:, None], axis=0)  # (BLOCK_N,)
    if HAS_SCALE:
        delta = delta * tl.load(scale_ptr + row).to(tl.float32)
    y_at = y_ptr + row * stride_yn + outs * stride_yo
    y = tl.load(y_at, mask=o_ok, other=0.0).to(tl.float32)
    tl.store(y_at, (y + delta).to(y_ptr.dtype.element_ty), mask=o_ok)


@triton.jit
def _sgmv_shrink(
    x_ptr, a_ptr, h_ptr, seg_slot_ptr, seg_start_ptr, seg_end_ptr,
    in_features, rank,
    stride_xn, stride_xk,
    stride_as, stride_ar, stride_ak,
    stride_hn,
    R: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, FP32_DOT: tl.constexpr,
):  # fmt: skip
    """h[tile, :] = x[tile] A[slot]ᵀ for one tile of one segment (grid: segments × tiles)."""
    seg = tl.program_id(0)
    slot = tl.load(seg_slot_ptr + seg)
    start = tl.load(seg_start_ptr + seg)
    end = tl.load(seg_end_ptr + seg)
    first = start + tl.program_id(1) * BLOCK_M
    if (slot < 0) | (first >= end):
        return
    rows = first + tl.arange(0, BLOCK_M)
    r_ok = rows < end
    ranks = tl.arange(0, R)
    a_slot = a_ptr + slot.to(tl.int64) * stride_as
    acc = tl.zeros((BLOCK_M, R), dtype=tl.float32)
    for k0 in range(0, in_features, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < in_features
        x = tl.load(
            x_ptr + rows[:, None] * stride_xn + ks[None, :] * stride_xk,
            mask=r_ok[:, None] & k_ok[None, :],
            other=0.0,
        )  # (BLOCK_M, BLOCK_K)
        a_t = tl.load(
            a_slot + ks[:, None] * stride_ak + ranks[None, :] * stride_ar,
            mask=k_ok[:, None] & (ranks < rank)[None, :],
            other=0.0,
        )  # (BLOCK_K, R): Aᵀ
        if FP32_DOT:
            acc += tl.dot(x.to(tl.float32), a_t.to(tl.float32), input_precision="ieee")
        else:
            acc += tl.dot(x, a_t)
    tl.store(h_ptr + rows[:, None] * stride_hn + ranks[None, :], acc, mask=r_ok[:, None])


@triton.jit
def _sgmv_expand(
    y_ptr, h_ptr, b_ptr, seg_slot_ptr, seg_start_ptr, seg_end_ptr, scale_ptr,
    out_features, rank,
    stride_yn, stride_yo,
    stride_hn,
    stride_bs, stride_br, stride_bo,
    R: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HAS_SCALE: tl.constexpr,
):  # fmt: skip
    """y[tile, block] += scale[seg] · h[tile] Bᵀ[slot][:, block] (grid: segments × tiles × blocks)."""
    seg = tl.program_id(0)
    slot = tl.load(seg_slot_ptr + seg)
    start = tl.load(seg_start_ptr + seg)
    end = tl.load(seg_end_ptr + seg)
    first = start + tl.program_id(1) * BLOCK_M
    if (slot < 0) | (first >= end):
        return
    rows = first + tl.arange(0, BLOCK_M)
    r_ok = rows < end
    ranks = tl.arange(0, R)
    outs = tl.program_id(2) * BLOCK_N + tl.arange(0, BLOCK_N)
    o_ok = outs < out_features
    h = tl.load(h_ptr + rows[:, None] * stride_hn + ranks[None, :], mask=r_ok[:, None], other=0.0)
    b = tl.load(
        b_ptr + slot.to(tl.int64) * stride_bs + ranks[:, None] * stride_br + outs[None, :] * stride_bo,
        mask=(ranks < rank)[:, None] & o_ok[None, :],
        other=0.0,
    ).to(tl.float32)  # (R, BLOCK_N)
    delta = tl.dot(h, b, input_precision="ieee")  # (BLOCK_M, BLOCK_N): both fp32, exact products
    if HAS_SCALE:
        delta = delta * tl.load(scale_ptr + seg).to(tl.float32)
    y_at = y_ptr + rows[:, None] * stride_yn + outs[None, :] * stride_yo
    ok = r_ok[:, None] & o_ok[None, :]
    y = tl.load(y_at, mask=ok, other=0.0).to(tl.float32)
    tl.store(y_at, (y + delta).to(y_ptr.dtype.element_ty), mask=ok)


def _padded_rank(rank: int, minimum: int) -> int:
    """``tl.arange`` needs a power of two; ``tl.dot`` needs at least 16."""
    return max(minimum, triton.next_power_of_2(max(rank, 1)))


def _fp32_dot(x: torch.Tensor) -> bool:
    """Whether SGMV's shrink multiplies its tiles in fp32: for fp32 inputs (exact products, not TF32),
    and off the GPU, where Triton's interpreter computes ``tl.dot`` of bf16 tiles wrongly."""
    return x.dtype == torch.float32 or x.device.type != "cuda"


def _checked(y: torch.Tensor, x: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor) -> None:
    if y.dim() != 2 or x.dim() != 2 or lora_A.dim() != 3 or lora_B.dim() != 3:
        raise ValueError(
            f"expected y (N, out), x (N, in), A (S, r, in), Bᵀ (S, r, out); got {tuple(y.shape)}, "
            f"{tuple(x.shape)}, {tuple(lora_A.shape)}, {tuple(lora_B.shape)}"
        )
    n, out = y.shape
    slots, rank, in_features = lora_A.shape
    if x.shape[0] != n or x.shape[1] != in_features or lora_B.shape != (slots, rank, out):
        raise ValueError(
            f"shapes do not match: y {tuple(y.shape)}, x {tuple(x.shape)}, A {tuple(lora_A.shape)}, "
            f"Bᵀ {tuple(lora_B.shape)}"
        )


def bgmv_(
    y: torch.Tensor,
    x: torch.Tensor,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    slots: torch.Tensor,
    scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """``y[n] += scale[n] · Bᵀ[s]ᵀ (A[s] x[n])`` with ``s = slots[n]``; rows with ``s < 0`` are left alone.

    Args:
        y: ``(N, out)``, added to in place (any float dtype; accumulation is fp32).
        x: ``(N, in)``.
        lora_A: ``(S, r, in)``, ranks below ``r`` padded with zeros.
        lora_B: ``(S, r, out)``, i.e. Bᵀ.
        slots: ``(N,)`` integer slot of each row, negative for no adapter.
        scale: optional ``(N,)`` per-row factor (1 where absent).

    Returns:
        ``y``. Launches two kernels whose grids depend on ``N`` alone (the slots are read on the
        device), so a call can be captured in a CUDA graph and replayed with new slots.
    """
    _checked(y, x, lora_A, lora_B)
    n, out = y.shape
    if n == 0 or lora_A.shape[1] == 0:
        return y
    rank = lora_A.shape[1]
    padded = _padded_rank(rank, 1)
    h = torch.empty(n, padded, dtype=torch.float32, device=y.device)  # (N, R): rows it skips stay unread
    _bgmv_shrink[(n,)](
        x, lora_A, h, slots,
        x.shape[1], rank,
        x.stride(0), x.stride(1),
        lora_A.stride(0), lora_A.stride(1), lora_A.stride(2),
        h.stride(0),
        R=padded, BLOCK_K=_BLOCK_K,
    )  # fmt: skip
    _bgmv_expand[(n, triton.cdiv(out, _BLOCK_N))](
        y, h, lora_B, slots, h if scale is None else scale,
        out, rank,
        y.stride(0), y.stride(1),
        h.stride(0),
        lora_B.stride(0), lora_B.stride(1), lora_B.stride(2),
        R=padded, BLOCK_N=_BLOCK_N, HAS_SCALE=scale is not None,
    )  # fmt: skip
    return y


def sgmv_(
    y: torch.Tensor,
    x: torch.Tensor,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    segment_slots: torch.Tensor,
    segment_starts: torch.Tensor,
    segment_ends: torch.Tensor,
    max_segment_tokens: int,
    scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """``y[t] += scale[g] · Bᵀ[s_g]ᵀ (A[s_g] x[t])`` for tokens ``t`` of segment ``g``.

    Args:
        y: ``(N, out)``, added to in place.
        x: ``(N, in)``.
        lora_A: ``(S, r, in)``.
        lora_B: ``(S, r, out)``, i.e. Bᵀ.
        segment_slots: ``(G,)`` slot of each segment, negative for no adapter.
        segment_starts: ``(G,)`` first token of each segment.
        segment_ends: ``(G,)`` one past its last token; tokens outside every segment are left alone.
        max_segment_tokens: the longest segment's length (sizes the grid; known on the host).
        scale: optional ``(G,)`` per-segment factor.

    Returns:
        ``y``.
    """
    _checked(y, x, lora_A, lora_B)
    n, out = y.shape
    groups = segment_slots.shape[0]
    if n == 0 or groups == 0 or max_segment_tokens <= 0 or lora_A.shape[1] == 0:
        return y
    rank = lora_A.shape[1]
    padded = _padded_rank(rank, 16)
    h = torch.empty(n, padded, dtype=torch.float32, device=y.device)  # (N, R): rows it skips stay unread
    tiles = triton.cdiv(max_segment_tokens, _SEG_BLOCK_M)
    _sgmv_shrink[(groups, tiles)](
        x, lora_A, h, segment_slots, segment_starts, segment_ends,
        x.shape[1], rank,
        x.stride(0), x.stride(1),
        lora_A.stride(0), lora_A.stride(1), lora_A.stride(2),
        h.stride(0),
        R=padded, BLOCK_M=_SEG_BLOCK_M, BLOCK_K=_SEG_BLOCK_K, FP32_DOT=_fp32_dot(x),
    )  # fmt: skip
    _sgmv_expand[(groups, tiles, triton.cdiv(out, _SEG_BLOCK_N))](
        y, h, lora_B, segment_slots, segment_starts, segment_ends, h if scale is None else scale,
        out, rank,
        y.stride(0), y.stride(1),
        h.stride(0),
        lora_B.stride(0), lora_B.stride(1), lora_B.stride(2),
        R=padded, BLOCK_M=_SEG_BLOCK_M, BLOCK_N=_SEG_BLOCK_N, HAS_SCALE=scale is not None,
    )  # fmt: skip
    return y
