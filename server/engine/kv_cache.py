"""The running batch's KV cache: preallocated buffers, one row per sequence, rows join and leave.

Layout per layer: ``keys``/``values`` of shape ``(rows_capacity, kv_heads, cols_capacity, head_dim)``.
All rows share one column cursor ``length``: a decode step writes every row's new K/V at column
``length``. A sequence that joins is right-aligned to the cursor (its prompt occupies the columns just
before it) and the columns to its left are masked out; a sequence that leaves is replaced by the last
row (one row copy), so joins and leaves never copy the whole cache. Buffers grow by doubling.

Rows reserved up front (:meth:`BatchKVCache.reserve_rows`) are kept only while they are cheap: when a
long prompt makes the columns grow, the row capacity drops to what the batch needs (rounded up to a
power of two) once the reserve would cost more than ``reserve_rows × RESERVE_COLUMNS`` cells. Without
that, one 2000-token prompt joining a 32-row reserve allocated (and zeroed) ~3 GB in fp32 in the
engine thread and stalled every running stream for seconds.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache, DynamicLayer

RESERVE_COLUMNS = 256  # the columns up to which reserved rows keep their room


def _uninitialized(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """New K/V buffers, zeroed. (Left unwritten on the CPU they saved 0.6 s per long join, but the
    CUDA-graph decoder computes whole batch buckets, dead rows included, and their NaNs reached live
    rows; a joining row still zeroes its masked columns, and the property test runs on NaN buffers.)"""
    return torch.zeros(shape, dtype=dtype, device=device)


class BatchKVCache:
    """KV buffers of the running batch.

    Args:
        num_layers: decoder layers of the model.
        kv_heads: key/value heads per layer.
        head_dim: size of one head.
        dtype: dtype of the cached keys and values.
        device: where the buffers live.
    """

    def __init__(
        self, num_layers: int, kv_heads: int, head_dim: int, dtype: torch.dtype, device: torch.device
    ):
        self.num_layers, self.kv_heads, self.head_dim = num_layers, kv_heads, head_dim
        self.dtype, self.device = dtype, device
        self.num_rows = 0
        self.length = 0  # the shared column cursor
        self.keys: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []
        self.mask = torch.zeros(0, 0, dtype=torch.bool, device=device)  # (rows_cap, cols_cap)
        self.positions = torch.zeros(0, dtype=torch.long, device=device)  # (rows_cap,) next position per row
        self._reserved_cells = 0  # rows × columns the reserve may keep
        self._allocate(rows=4, cols=64)

    # ------------------------------------------------------------------ capacity
    @property
    def rows_capacity(self) -> int:
        return self.mask.shape[0]

    @property
    def cols_capacity(self) -> int:
        return self.mask.shape[1]

    def _allocate(self, rows: int, cols: int) -> None:
        """(Re)allocates buffers of ``rows × cols``, keeping the current contents."""
        shape = (rows, self.kv_heads, cols, self.head_dim)
        n, length = self.num_rows, self.length
        new_keys, new_values = [], []
        for layer in range(self.num_layers):
            k = _uninitialized(shape, self.dtype, self.device)
            v = _uninitialized(shape, self.dtype, self.device)
            if self.keys:
                k[:n, :, :length] = self.keys[layer][:n, :, :length]
                v[:n, :, :length] = self.values[layer][:n, :, :length]
            new_keys.append(k)
            new_values.append(v)
        mask = torch.zeros(rows, cols, dtype=torch.bool, device=self.device)
        positions = torch.zeros(rows, dtype=torch.long, device=self.device)
        if self.mask.numel():
            mask[:n, :length] = self.mask[:n, :length]
            positions[:n] = self.positions[:n]
        self.keys, self.values, self.mask, self.positions = new_keys, new_values, mask, positions

    def reserve_rows(self, rows: int) -> None:
        """Allocates room for ``rows`` sequences up front, so the batch never regrows (and copies the
        whole cache) while requests wait for their first token; kept up to :data:`RESERVE_COLUMNS`."""
        self._reserved_cells = rows * max(self.cols_capacity, RESERVE_COLUMNS)
        self._ensure(rows, self.cols_capacity)

    def _ensure(self, rows: int, cols: int) -> None:
        if rows > self.rows_capacity or cols > self.cols_capacity:
            new_cols = self.cols_capacity
            while new_cols < cols:
                new_cols *= 2
            needed = 4
            while needed < max(rows, self.num_rows):
                needed *= 2
            # the current rows (the reserve among them) while they fit the reserve's cells, else the need
            keep = self.rows_capacity if self.rows_capacity * new_cols <= self._reserved_cells else 0
            new_rows = max(needed, keep)
            self._allocate(new_rows, new_cols)

    # ------------------------------------------------------------------ rows
    def add_row(self, layers: list[tuple[torch.Tensor, torch.Tensor]]) -> int:
        """Adds a prefilled sequence (per-layer ``(1, kv_heads, t, head_dim)`` K/V); returns its row."""
        t = layers[0][0].shape[-2]
        if t > self.length:
            self._shift_right(t - self.length)
        self._ensure(self.num_rows + 1, self.length + 1)
        row, start = self.num_rows, self.length - t
        for layer, (k, v) in enumerate(layers):
            self.keys[layer][row, :, :start] = 0  # masked, but read: must be finite (0 × NaN is NaN)
            self.values[layer][row, :, :start] = 0
            self.keys[layer][row, :, start : self.length] = k[0]
            self.values[layer][row, :, start : self.length] = v[0]
        self.mask[row].zero_()
        self.mask[row, start : self.length] = True
        self.positions[row] = t
        self.num_rows += 1
        return row

    def remove_row(self, row: int) -> int | None:
        """Removes ``row``; the last row moves into its place. Returns the moved row's old index, if any."""
        last = self.num_rows - 1
        moved = None
        if row != last:
            for layer in range(self.num_layers):
                self.keys[layer][row, :, : self.length] = self.keys[layer][last, :, : self.length]
                self.values[layer][row, :, : self.length] = self.values[layer][last, :, : self.length]
            self.mask[row] = self.mask[last]
            self.positions[row] = self.positions[last]
            moved = last
        self.mask[last].zero_()
        self.num_rows -= 1
        if self.num_rows == 0:
            self.length = 0
        else:
            self._compact()
        return moved

    def clear(self) -> None:
        """Empties the batch (after a failed step): every row gone, buffers kept for reuse."""
        self.num_rows = 0
        self.length = 0
        self.mask.zero_()
        self.positions.zero_()

    def _shift_right(self, by: int) -> None:
        """Moves every row's columns right by ``by`` so that a longer prompt fits before the cursor."""
        self._ensure(self.num_rows + 1, self.length + by + 1)
        n, length = self.num_rows, self.length
        for layer in range(self.num_layers):
            for buffer in (self.keys[layer], self.values[layer]):
                buffer[:n, :, by : by + length] = buffer[:n, :, :length].clone()
                buffer[:n, :, :by] = 0
        self.mask[:n, by : by + length] = self.mask[:n, :length].clone()
        self.mask[:n, :by] = False
        self.length += by

    def _compact(self) -> None:
        """Drops leading columns no row uses any more, once they are half the cache."""
        n = self.num_rows
        used = self.mask[:n, : self.length].any(dim=0)
        first = int(used.nonzero()[0]) if used.any() else self.length
        if first < 32 or first * 2 < self.length:
            return
        keep = self.length - first
        for layer in range(self.num_layers):
            for buffer in (self.keys[layer], self.values[layer]):
                buffer[:n, :, :keep] = buffer[:n, :, first : self.length].clone()
        self.mask[:n, :keep] = self.mask[:n, first : self.length].clone()
        self.mask[:n, keep:] = False
        self.length = keep

    # ------------------------------------------------------------------ one decode step
    def begin_step(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Opens column ``length`` for every row; returns the 4-D attention mask and position ids."""
        self._ensure(self.num_rows, self.length + 1)
        n = self.num_rows
        self.mask[:n, self.length] = True
        attention = self.mask[:n, None, None, : self.length + 1]  # (B, 1, 1, kv) True = attend
        position_ids = self.positions[:n, None].clone()  # (B, 1)
        return attention, position_ids

    def end_step(self) -> None:
        self.positions[: self.num_rows] += 1
        self.length += 1

    def as_hf_cache(self) -> Cache:
        """A transformers ``Cache`` whose layers write the step's K/V into column ``length``."""
        return _StepCache(self)

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        n, col = self.num_rows, self.length
        self.keys[layer][:n, :, col : col + 1] = k
        self.values[layer][:n, :, col : col + 1] = v
        return self.keys[layer][:n, :, : col + 1], self.values[layer][:n, :, : col + 1]


class _StepLayer(DynamicLayer):
    def __init__(self, kv: BatchKVCache, layer_idx: int):
        super().__init__()
        self.kv, self.layer_idx = kv, layer_idx
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        return self.kv.write(self.layer_idx, key_states, value_states)

    def get_seq_length(self) -> int:
        return self.kv.length

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.kv.length + query_length, 0


class _StepCache(Cache):
    def __init__(self, kv: BatchKVCache):
        super().__init__(layers=[_StepLayer(kv, i) for i in range(kv.num_layers)])
