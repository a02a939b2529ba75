"""Per-row LoRA in one forward pass: every row of a batch carries its own adapter slot.

Each adapted linear layer keeps a *bank* of the resident adapters' weights stacked by slot
(slot 0 is all zeros: the base model; A as ``(slots, r, in)``, B transposed as ``(slots, r, out)``).
For a batch whose rows use slots ``s``, the layer computes

    y = W x + B[s] (A[s] x)

in one of these ways:

- *compiled kernel* (CPU, ``adapters/kernels/bgmv.cpp``, Punica's BGMV): one call per layer; every
  token reads its own adapter's A and B in place from the bank, at that adapter's rank, with fp32
  accumulation. Used for decode rows and packed prefill whenever it was built.
- *Triton kernels* (CUDA, ``adapters/kernels/triton_lora.py``): BGMV for decode rows, SGMV for a
  packed prefill's adapter segments; the same in-place reads and fp32 accumulation. Used on CUDA
  devices whenever Triton is installed (unverified on hardware so far: see the README's GPU section).
- Otherwise plain PyTorch, chosen once per forward pass from the batch's make-up:
  *single* (one adapter for all rows: two matmuls on the bank in place); *stacked* (few distinct
  adapters, ``2 × distinct ≤ rows``: their weights concatenated at their own ranks, ``h = x A_Uᵀ``
  for every row on every adapter, a mask keeps each row's own block, ``h B_U`` adds the deltas; the
  concatenation is cached while the batch's adapters stay the same); *gather* (many: every row's A
  and B gathered, two batched matmuls, flat in the number of distinct adapters).

Measured on the default model's shapes, bf16, 1 CPU thread, 16 rows over 8 rank-16 adapters, 210
linears: kernel 11 ms, stacked 54 ms, gather 65 ms, a matmul pair per adapter 161 ms. Wherever
neither kernel is available the PyTorch modes run; the padded ranks of a bank add exact zeros there.

A CUDA graph of the decode step (``server/engine/cuda_graphs.py``) captures a forward pass in the
*static* mode: every step any resident adapter needs runs for every row, reading the rows' slots from
buffers the graph owns, so one capture serves every mix of adapters until a bank's layout changes
(:attr:`BatchedLoRAModel.layout_version`).
"""

from __future__ import annotations

import contextlib
import itertools
import threading
from collections.abc import Callable, Iterator

import torch
from torch import nn

from adapters import kernels
from adapters.dora import dequantized_weight, magnitude_scale
from adapters.errors import AdapterInvalid
from adapters.ia3 import IA3Module
from adapters.int8_linear import Int8Linear
from adapters.lora import LoRAModule, LoRAWeights
from adapters.prefix_tuning import PrefixKV, attention_shape_of, prefix_fit_problems

_EXCLUDED_MODULES = ("lm_head",)


_MAX_STACKED = 16  # most distinct adapters the stacked mode gathers (bounds its cached copies)


class LoRABatchState(threading.local):
    """How the forward pass now running maps rows (or tokens) to adapter slots.

    Shared by every layer of the model; built once per forward pass by :meth:`BatchedLoRAModel.rows`
    or :meth:`BatchedLoRAModel.token_ranges`. Thread-local: the engine's decode step and its prefill
    worker run forward passes through the same layers at the same time, each with its own rows.
    The stacked weights gathered for a set of distinct adapters are kept per bank while consecutive
    forward passes use the same set (a decode batch keeps its adapters for many steps).
    """

    def __init__(self, triton_index: bool = False) -> None:
        # id(bank) -> ((bank version, slots), A, B): kept while consecutive passes use the same adapters
        self.stacks: dict[int, tuple[tuple, torch.Tensor, torch.Tensor]] = {}
        # whether passes build the Triton kernels' indexes (threading.local: every thread runs __init__
        # with the constructor's arguments, so this is the same in each)
        self.triton_index = triton_index
        self.clear()

    def clear(self) -> None:
        self.mode = "none"  # none | single | stacked | gather | static (a CUDA graph's capture)
        self.unique_slots: frozenset[int] = frozenset()
        self.single_slot = 0
        self.slots: torch.Tensor | None = None  # gather: (B,) slot of each row
        self.row_slots: torch.Tensor | None = None  # (B,) on the CPU, for the compiled kernel
        self.scale_index: torch.Tensor | None = None  # (B,) per row or (N,) per token: DoRA/IA³ scales
        self.lora_index: torch.Tensor | None = None  # Triton BGMV: (B,) slot per row, -1 for none
        self.segments: tuple[torch.Tensor, torch.Tensor, torch.Tensor, int] | None = None  # Triton
        # SGMV: a packed prefill's (G,) slots (-1 for none), first tokens, ends; its longest segment
        self.ranges: list[tuple[int, int, int]] = []  # stacked: (slot, first row, end row)
        self.rows = 0
        self.masks: dict[tuple, torch.Tensor] = {}  # stacked: per (slots, ranks) of a bank
        self.device: torch.device | None = None
        self.dtype = torch.float32

    def set_rows(self, slots: list[int], device: torch.device | None, dtype: torch.dtype) -> None:
        """Row ``i`` of the next forward pass (one token per row, or a whole sequence) uses ``slots[i]``."""
        self.clear()
        self.unique_slots = frozenset(slots) - {0}
        if not self.unique_slots:
            return
        slot_tensor = self.scale_index = torch.tensor(slots, dtype=torch.long, device=device)
        if device is None or device.type == "cpu":
            self.row_slots = slot_tensor
        if self.triton_index:
            self.lora_index = slot_tensor.masked_fill(slot_tensor == 0, -1)
        if len(self.unique_slots) == 1 and 0 not in slots:
            self.mode, self.single_slot = "single", slots[0]
        elif 2 * len(self.unique_slots) <= len(slots) and len(self.unique_slots) <= _MAX_STACKED:
            self._stacked([(slot, row, row + 1) for row, slot in enumerate(slots)], len(slots), device, dtype)
        else:
            self.mode, self.slots = "gather", slot_tensor

    def set_token_ranges(
        self, ranges: list[tuple[int, int, int]], device: torch.device | None, dtype: torch.dtype
    ) -> None:
        """One packed row: its tokens ``start:end`` use ``slot`` for each ``(slot, start, end)``."""
        self.clear()
        self.unique_slots = frozenset(slot for slot, _, _ in ranges) - {0}
        per_token = torch.zeros(max(end for _, _, end in ranges), dtype=torch.long)
        for slot, start, end in ranges:
            per_token[start:end] = slot
        if device is None or device.type == "cpu":
            self.row_slots = per_token
        if self.triton_index:
            slots, starts, ends = zip(*ranges)
            bounds = torch.tensor([[slot or -1 for slot in slots], starts, ends])  # (3, G), rows contiguous
            seg_slots, seg_starts, seg_ends = bounds.to(device)
            longest = max(end - start for _, start, end in ranges)
            self.segments = (seg_slots, seg_starts, seg_ends, longest)
        self.scale_index = per_token.to(device)
        if len(self.unique_slots) == 1 and all(slot for slot, _, _ in ranges):
            self.mode, self.single_slot = "single", ranges[0][0]
        elif self.unique_slots:
            self._stacked(ranges, max(end for _, _, end in ranges), device, dtype)

    def set_static_rows(self, slot_index: torch.Tensor, lora_index: torch.Tensor) -> None:
        """A CUDA graph's capture: rows read their slots from these buffers (``(B,)``; ``lora_index``
        has -1 for slot 0), which the graph's owner refills before each replay."""
        self.clear()
        self.mode = "static"
        self.slots = self.scale_index = slot_index  # the gather mode's index, where Triton is missing
        self.lora_index = lora_index

    def _stacked(self, ranges: list[tuple[int, int, int]], rows: int, device, dtype) -> None:
        self.mode, self.ranges, self.rows = "stacked", [r for r in ranges if r[0]], rows
        self.device, self.dtype = device, dtype

    def stacked(self, bank: LoRABank) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``bank``'s weights for this pass, stacked over the adapters it holds at their own ranks:
        A ``(Σr, in)``, Bᵀ ``(Σr, out)``, and the ``(rows, 1, Σr)`` mask of each row's block."""
        slots = tuple(sorted(bank.active_slots & self.unique_slots))
        ranks = tuple(bank.ranks[slot] for slot in slots)
        cached = self.stacks.get(id(bank))
        if cached is None or cached[0] != (bank.version, slots):
            lora_A = torch.cat([bank.lora_A[slot, :r] for slot, r in zip(slots, ranks)])
            lora_B = torch.cat([bank.lora_B[slot, :r] for slot, r in zip(slots, ranks)])
            cached = ((bank.version, slots), lora_A, lora_B)
            self.stacks[id(bank)] = cached
        mask = self.masks.get((slots, ranks))
        if mask is None:
            offsets = dict(zip(slots, itertools.accumulate((0, *ranks))))
            mask = torch.zeros(self.rows, 1, sum(ranks), dtype=self.dtype)
            for slot, start, end in self.ranges:
                if slot in offsets:
                    mask[start:end, 0, offsets[slot] : offsets[slot] + bank.ranks[slot]] = 1
            mask = self.masks[(slots, ranks)] = mask.to(self.device)
        return cached[1], cached[2], mask


class LoRABank:
    """The stacked weights of one linear layer for every resident adapter slot.

    Besides LoRA's A and Bᵀ, each slot has an input scale (IA³ on a feedforward module) and an output
    scale (IA³'s output vector, or DoRA's ratio ``g``), 1 where its adapter has none, so one layer
    holds LoRA, DoRA and IA³ adapters in different slots at once. ``out_shift`` keeps DoRA's bias
    unscaled on a layer with a bias: ``g ⊙ (W x + b + ΔW x) + (1 - g) ⊙ b``.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        dtype: torch.dtype,
        device: torch.device,
        bias: torch.Tensor | None = None,
    ):
        self.in_features = in_features
        self.out_features = out_features
        self.bias = None if bias is None else bias.detach()
        self.lora_A = torch.zeros(1, 0, in_features, dtype=dtype, device=device)  # (S, r, in)
        self.lora_B = torch.zeros(1, 0, out_features, dtype=dtype, device=device)  # (S, r, out): Bᵀ
        self.in_scale = torch.ones(1, in_features, dtype=dtype, device=device)  # (S, in)
        self.out_scale = torch.ones(1, out_features, dtype=dtype, device=device)  # (S, out)
        self.out_shift = torch.zeros(1, out_features, dtype=dtype, device=device)  # (S, out)
        self.input_scaled_slots: set[int] = set()
        self.output_scaled_slots: set[int] = set()
        self.shifted_slots: set[int] = set()
        self.active_slots: set[int] = set()
        self.ranks: dict[int, int] = {}  # slot -> the rank of the adapter it holds
        self.rank_of = torch.zeros(1, dtype=torch.int32)  # the same per slot, for the compiled kernel
        self.version = 0  # bumped on every change: stacked copies of older versions are stale
        self.storage_version = 0  # bumped when the tensors are reallocated (CUDA graphs hold pointers)

    @property
    def num_slots(self) -> int:
        return self.lora_A.shape[0]

    @property
    def rank(self) -> int:
        return self.lora_A.shape[1]

    def reserve(self, num_slots: int, rank: int) -> None:
        """Grows the bank (copying what it holds) to at least ``num_slots`` slots of rank ``rank``."""
        if num_slots <= self.num_slots and rank <= self.rank:
            return
        new_slots, new_rank = max(num_slots, self.num_slots), max(rank, self.rank)
        lora_A = self.lora_A.new_zeros(new_slots, new_rank, self.in_features)
        lora_B = self.lora_B.new_zeros(new_slots, new_rank, self.out_features)
        lora_A[: self.num_slots, : self.rank] = self.lora_A
        lora_B[: self.num_slots, : self.rank] = self.lora_B
        rank_of = torch.zeros(new_slots, dtype=torch.int32)
        rank_of[: self.num_slots] = self.rank_of
        self.in_scale = _grown(self.in_scale, new_slots, fill=1.0)
        self.out_scale = _grown(self.out_scale, new_slots, fill=1.0)
        self.out_shift = _grown(self.out_shift, new_slots, fill=0.0)
        self.lora_A, self.lora_B, self.rank_of = lora_A, lora_B, rank_of
        self.version += 1
        self.storage_version += 1

    @property
    def layout(self) -> tuple[int, bool, bool, bool, bool]:
        """What a CUDA graph of a forward pass through this bank depends on besides its values: its
        tensors, and which of its steps (LoRA, input scale, output scale, shift) some slot uses."""
        return (
            self.storage_version,
            bool(self.active_slots),
            bool(self.input_scaled_slots),
            bool(self.output_scaled_slots),
            bool(self.shifted_slots),
        )

    def write(
        self, slot: int, module: LoRAModule | IA3Module | None, dora_scale: torch.Tensor | None = None
    ) -> None:
        """Puts ``module`` into ``slot`` (the scaling folded into B), or clears the slot.

        Args:
            slot: the slot to write.
            module: a LoRA/DoRA module, an IA³ module, or None to clear the slot.
            dora_scale: DoRA's ``(out,)`` ratio ``g`` for this layer (see :mod:`adapters.dora`).
        """
        self._clear(slot)
        if isinstance(module, IA3Module):
            self._write_ia3(slot, module)
        elif module is not None:
            self._write_lora(slot, module, dora_scale)

    def _clear(self, slot: int) -> None:
        self.lora_A[slot].zero_()
        self.lora_B[slot].zero_()
        self.in_scale[slot].fill_(1.0)
        self.out_scale[slot].fill_(1.0)
        self.out_shift[slot].zero_()
        for slots in (
            self.active_slots,
            self.input_scaled_slots,
            self.output_scaled_slots,
            self.shifted_slots,
        ):
            slots.discard(slot)
        self.ranks.pop(slot, None)
        self.rank_of[slot] = 0
        self.version += 1

    def _write_ia3(self, slot: int, module: IA3Module) -> None:
        if module.feedforward:
            self.in_scale[slot] = module.vector.to(self.in_scale)
            self.input_scaled_slots.add(slot)
        else:
            self.out_scale[slot] = module.vector.to(self.out_scale)
            self.output_scaled_slots.add(slot)

    def _write_lora(self, slot: int, module: LoRAModule, dora_scale: torch.Tensor | None) -> None:
        if dora_scale is not None:
            self.out_scale[slot] = dora_scale.to(self.out_scale)
            self.output_scaled_slots.add(slot)
            if self.bias is not None:
                self.out_shift[slot] = ((1.0 - dora_scale.float()) * self.bias.float()).to(self.out_shift)
                self.shifted_slots.add(slot)
        r = self.ranks[slot] = module.rank
        self.rank_of[slot] = r
        self.lora_A[slot, :r] = module.lora_A.to(self.lora_A)
        self.lora_B[slot, :r] = (module.lora_B.float() * module.scaling).T.to(self.lora_B)
        self.active_slots.add(slot)


def _grown(table: torch.Tensor, num_slots: int, fill: float) -> torch.Tensor:
    """``table`` (S, F) with rows appended up to ``num_slots``, the new ones set to ``fill``."""
    grown = table.new_full((num_slots, table.shape[1]), fill)
    grown[: table.shape[0]] = table
    return grown


class BatchedLoRALinear(nn.Module):
    """Wraps a base linear layer (plain, NF4 or int8) and applies each row's own adapter.

    Per row: ``y = (base(x ⊙ l_in) + ΔW x) ⊙ g_out + shift``, where ``l_in`` is IA³'s input vector,
    ``ΔW`` LoRA's delta and ``g_out`` IA³'s output vector or DoRA's ratio; each is the identity for
    slots that do not use it, and each step runs only when a row of the pass needs it.
    """

    def __init__(self, base: nn.Module, bank: LoRABank, state: LoRABatchState, kernel=None, triton_ops=None):
        super().__init__()
        self.base = base
        self.bank = bank
        self.state = state
        self.kernel = kernel  # the compiled CPU op (adapters.kernels.bgmv), or None
        self.triton_ops = triton_ops  # CUDA: adapters.kernels.triton_lora (bgmv_, sgmv_), or None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        state, bank = self.state, self.bank
        unique = state.unique_slots
        if state.mode == "static":  # a CUDA graph: every step some resident slot needs, for all rows
            used = bool
        elif not unique:
            return self.base(x)
        else:

            def used(slots: set[int]) -> bool:
                return not slots.isdisjoint(unique)

        y = self.base(self._per_slot(x, bank.in_scale) if used(bank.input_scaled_slots) else x)
        if used(bank.active_slots):
            y = self._add_lora(x, y)
        if used(bank.output_scaled_slots):
            y = self._per_slot(y, bank.out_scale)
            if used(bank.shifted_slots):
                y = self._per_slot(y, bank.out_shift, add=True)
        return y

    def _per_slot(self, t: torch.Tensor, table: torch.Tensor, add: bool = False) -> torch.Tensor:
        """``t ⊙ table[slot]`` (or ``t + table[slot]``) for each row's or token's slot, one vectorized op."""
        index = self.state.scale_index  # (K,): K rows of T tokens, or K = N tokens of one packed row
        rows = table.index_select(0, index).to(t.dtype)  # (K, F)
        t3 = t.reshape(index.shape[0], -1, t.shape[-1])  # (K, T, F)
        out = t3 + rows[:, None, :] if add else t3 * rows[:, None, :]
        return out.view(t.shape)

    def _add_lora(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """``y + B[s] A[s] x`` per row or token, by the compiled kernel or the pass's PyTorch mode."""
        state, bank = self.state, self.bank
        x2 = x.reshape(-1, x.shape[-1]).to(bank.lora_A.dtype)  # (N, in): every token of every row
        rows = state.row_slots
        if (
            self.kernel is not None
            and rows is not None
            and x2.shape[0] == rows.shape[0]
            and y.dtype == x2.dtype
        ):
            y = y.contiguous()  # one token per row (decode): each row's delta from its bank slot in place
            self.kernel(
                y.view(-1, y.shape[-1]), x2.contiguous(), bank.lora_A, bank.lora_B, rows, bank.rank_of
            )
            return y
        if self.triton_ops is not None:
            added = self._add_lora_triton(x2, y)
            if added is not None:
                return added
        y2 = y.reshape(-1, y.shape[-1])  # (N, out)
        if state.mode == "single":
            h = x2 @ bank.lora_A[state.single_slot].T  # (N, r)
            lora_B = bank.lora_B[state.single_slot]  # (r, out)
        elif state.mode == "stacked":
            lora_A, lora_B, mask = state.stacked(bank)  # (Σr, in), (Σr, out), (rows, 1, Σr)
            h = x2 @ lora_A.T  # (N, Σr): every token on every adapter of this pass
            h.view(mask.shape[0], -1, h.shape[1]).mul_(mask)  # keep each row's own block
        else:  # gather (and a CUDA graph's static mode without Triton)
            x3 = x2.view(len(state.slots), -1, x2.shape[-1])  # (B, T, in)
            lora_A = bank.lora_A.index_select(0, state.slots)  # (B, r, in)
            lora_B = bank.lora_B.index_select(0, state.slots)  # (B, r, out)
            delta = torch.bmm(torch.bmm(x3, lora_A.transpose(1, 2)), lora_B)  # (B, T, out)
            return y + delta.reshape(y.shape).to(y.dtype)
        if y2.dtype == lora_B.dtype:
            return torch.addmm(y2, h, lora_B).view(y.shape)
        return y + (h @ lora_B).to(y.dtype).view(y.shape)

    def _add_lora_triton(self, x2: torch.Tensor, y: torch.Tensor) -> torch.Tensor | None:
        """``y`` plus the deltas by Triton: SGMV over a packed prefill's segments, BGMV over one-token
        rows; None for any other pass (rows of several tokens: the PyTorch modes take it)."""
        state, bank, ops = self.state, self.bank, self.triton_ops
        y = y.contiguous()
        y2 = y.view(-1, y.shape[-1])  # (N, out), added to in place
        if state.segments is not None:
            slots, starts, ends, longest = state.segments
            ops.sgmv_(y2, x2, bank.lora_A, bank.lora_B, slots, starts, ends, longest)
            return y
        if state.lora_index is not None and state.lora_index.shape[0] == x2.shape[0]:
            ops.bgmv_(y2, x2, bank.lora_A, bank.lora_B, state.lora_index)
            return y
        return None


class BatchedLoRAModel:
    """Installs :class:`BatchedLoRALinear` into every linear layer of a model and owns the banks.

    Args:
        model: a causal LM (its ``lm_head`` is left alone).
        dtype: dtype of the adapter banks (the model's compute dtype).
        use_kernel: decode rows through the compiled CPU kernel when it is available (on the CPU), and
            decode rows and prefills through the Triton kernels when Triton is installed (on CUDA).
        triton_ops: the Triton kernels' module to use on any device (tests pass
            :mod:`adapters.kernels.triton_lora` on the CPU, under Triton's interpreter).
    """

    def __init__(self, model: nn.Module, dtype: torch.dtype, use_kernel: bool = True, triton_ops=None):
        self.model = model
        self.dtype = dtype
        self.banks: dict[str, LoRABank] = {}
        self.linear_shapes: dict[str, tuple[int, int]] = {}
        device = self.device = next(model.parameters()).device
        self.kernel = kernels.bgmv() if use_kernel and device.type == "cpu" else None
        if triton_ops is None and use_kernel and device.type == "cuda":
            triton_ops = kernels.triton_lora_ops()
        self.triton_ops = triton_ops
        self.state = LoRABatchState(triton_index=triton_ops is not None)
        self.layout_version = 0  # changes whenever a bank's layout does (CUDA graphs are captured per one)
        targets = [
            (name, module)
            for name, module in model.named_modules()
            if isinstance(module, (nn.Linear, Int8Linear))
            and name.rsplit(".", 1)[-1] not in _EXCLUDED_MODULES
        ]
        self.base_layers: dict[str, nn.Module] = {}  # the wrapped linears, for DoRA's weight norms
        self.virtual_tokens: dict[int, torch.Tensor] = {}  # slot -> prompt tuning's (n, hidden) embeddings
        self.prefixes: dict[int, PrefixKV] = {}  # slot -> prefix tuning's per-layer keys and values
        # bumped whenever a slot's adapter changes, so caches of its keys and values (the engine's
        # prefix cache) can tell a reloaded adapter from the one they saw; listeners hear of each change
        self.slot_generations: dict[int, int] = {}
        self.slot_listeners: list[Callable[[int], None]] = []
        self.hidden_size = (
            model.get_input_embeddings().embedding_dim if hasattr(model, "get_input_embeddings") else None
        )
        self.attention_shape = attention_shape_of(model)
        # keys and values are computed in the embeddings' dtype (the runner's KV cache dtype)
        self.kv_dtype = model.get_input_embeddings().weight.dtype if self.hidden_size else dtype
        for name, module in targets:
            bank = LoRABank(module.in_features, module.out_features, dtype, device, module.bias)
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, child, BatchedLoRALinear(module, bank, self.state, self.kernel, self.triton_ops))
            self.banks[name] = bank
            self.base_layers[name] = module
            self.linear_shapes[name] = (module.in_features, module.out_features)
        self._layout = tuple(bank.layout for bank in self.banks.values())

    def install(self, slot: int, weights: LoRAWeights) -> None:
        """Writes an adapter into ``slot`` of every bank (modules it does not target get zeros).

        Raises:
            AdapterInvalid: a DoRA module whose ratio is not finite on this base (a zero-norm row);
                raised before any bank is written.
        """
        dora_scales = self.dora_scales(weights)
        self._slot_changed(slot)
        self._install_virtual_tokens(slot, weights)
        self._install_prefix(slot, weights)
        try:
            for name, bank in self.banks.items():
                module = weights.modules.get(name)
                if module is not None:
                    bank.reserve(slot + 1, module.rank)
                elif slot >= bank.num_slots:
                    continue  # nothing to clear, and index_select never reaches an absent slot here
                bank.write(slot, module, dora_scales.get(name))
        finally:
            self._refresh_layout()

    def _refresh_layout(self) -> None:
        """Bumps :attr:`layout_version` if some bank's :attr:`LoRABank.layout` changed."""
        layout = tuple(bank.layout for bank in self.banks.values())
        if layout != self._layout:
            self._layout = layout
            self.layout_version += 1

    def _install_virtual_tokens(self, slot: int, weights: LoRAWeights) -> None:
        """Prompt tuning: the embeddings the runner prepends to this slot's prompts at prefill."""
        self.virtual_tokens.pop(slot, None)
        tokens = weights.virtual_tokens
        if tokens is None:
            return
        if tokens.shape[-1] != self.hidden_size:
            raise AdapterInvalid(
                weights.name,
                [f"prompt embeddings are {tokens.shape[-1]} wide, the base's are {self.hidden_size}"],
            )
        self.virtual_tokens[slot] = tokens.to(device=self.device, dtype=self.dtype)

    def _install_prefix(self, slot: int, weights: LoRAWeights) -> None:
        """Prefix tuning: the keys and values the runner writes before this slot's prompts."""
        self.prefixes.pop(slot, None)
        if weights.prefix is None:
            return
        if self.attention_shape is None:
            raise AdapterInvalid(weights.name, ["this base model does not take a prefix-tuning adapter"])
        problems = prefix_fit_problems(weights.prefix, self.attention_shape)
        if problems:
            raise AdapterInvalid(weights.name, problems)
        self.prefixes[slot] = weights.prefix.to(self.device, self.kv_dtype)

    def virtual_token_count(self, slot: int) -> int:
        """Positions the adapter in ``slot`` adds before each prompt (prompt or prefix tuning; else 0)."""
        if slot in self.virtual_tokens:
            return self.virtual_tokens[slot].shape[0]
        prefix = self.prefixes.get(slot)
        return 0 if prefix is None else prefix.num_virtual_tokens

    def dora_scales(self, weights: LoRAWeights) -> dict[str, torch.Tensor]:
        """DoRA's ratio ``g = m / ‖W + s·B A‖`` per DoRA module, on the weights this model computes with."""
        scales: dict[str, torch.Tensor] = {}
        problems: list[str] = []
        for name, module in weights.modules.items():
            if not isinstance(module, LoRAModule) or module.magnitude is None:
                continue
            with torch.no_grad():
                scale = magnitude_scale(dequantized_weight(self.base_layers[name]), module)  # (out,)
            if not torch.isfinite(scale).all():
                problems.append(
                    f"{name}: DoRA's magnitude ratio is not finite on this base (a zero-norm row)"
                )
            scales[name] = scale
        if problems:
            raise AdapterInvalid(weights.name, problems)
        return scales

    def _slot_changed(self, slot: int) -> None:
        self.slot_generations[slot] = self.slot_generations.get(slot, 0) + 1
        for listener in self.slot_listeners:
            listener(slot)

    def clear(self, slot: int) -> None:
        self._slot_changed(slot)
        self.virtual_tokens.pop(slot, None)
        self.prefixes.pop(slot, None)
        for bank in self.banks.values():
            if slot < bank.num_slots:
                bank.write(slot, None)
        self._refresh_layout()

    def reserve_slots(self, num_slots: int) -> None:
        """Makes every bank hold ``num_slots`` slots so any slot index is valid in ``index_select``."""
        for bank in self.banks.values():
            bank.reserve(num_slots, bank.rank)
        self._refresh_layout()

    @contextlib.contextmanager
    def token_ranges(self, ranges: list[tuple[int, int, int]]) -> Iterator[None]:
        """Runs the enclosed forward pass of one packed row: tokens ``start:end`` use adapter ``slot``."""
        self.state.set_token_ranges(ranges, self.device, self.dtype)
        try:
            yield
        finally:
            self.state.clear()

    @contextlib.contextmanager
    def static_rows(self, slot_index: torch.Tensor, lora_index: torch.Tensor) -> Iterator[None]:
        """Runs the enclosed forward pass (a CUDA graph's capture) in the static mode: rows' slots are
        read from ``slot_index`` and ``lora_index`` (``(B,)``, the latter -1 for slot 0)."""
        self.state.set_static_rows(slot_index, lora_index)
        try:
            yield
        finally:
            self.state.clear()

    @contextlib.contextmanager
    def rows(self, slots: list[int]) -> Iterator[None]:
        """Runs the enclosed forward pass with row ``i`` using adapter slot ``slots[i]``."""
        self.state.set_rows(slots, self.device, self.dtype)
        try:
            yield
        finally:
            self.state.clear()
