"""The running batch's KV cache: what each row attends to survives joins, leaves, steps and regrowth."""

from __future__ import annotations

from unittest import mock

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from server.engine import kv_cache
from server.engine.kv_cache import RESERVE_COLUMNS, BatchKVCache


def _nan_buffers(shape, dtype, device):
    """Fresh buffers full of NaN: whatever the cache leaves unwritten shows up in what a row reads."""
    return torch.full(shape, float("nan"), dtype=dtype, device=device)


LAYERS, HEADS, DIM = 2, 2, 3


def _kv(t: int, seed: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(seed)
    return [
        (
            torch.randn(1, HEADS, t, DIM, generator=generator),
            torch.randn(1, HEADS, t, DIM, generator=generator),
        )
        for _ in range(LAYERS)
    ]


def _row_contents(kv: BatchKVCache, row: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    columns = kv.mask[row, : kv.length]
    return [
        (kv.keys[i][row, :, : kv.length][:, columns], kv.values[i][row, :, : kv.length][:, columns])
        for i in range(LAYERS)
    ]


operations = st.lists(
    st.one_of(
        st.tuples(st.just("add"), st.integers(1, 300)),
        st.tuples(st.just("remove"), st.integers(0, 10**6)),
        st.tuples(st.just("step"), st.just(0)),
    ),
    max_size=40,
)


@settings(max_examples=60, deadline=None)
@given(ops=operations, reserve=st.sampled_from([0, 8, 32]))
def test_rows_keep_their_keys_and_values_through_any_sequence_of_operations(ops, reserve):
    """Joins (short and long), swap-removes and decode steps in any order: every live row's unmasked
    columns are exactly its prompt's K/V then one column per step, its position counts them, and
    the buffers never hold more rows than the batch needs once the reserve stops being cheap. Fresh
    buffers are NaN here: every column a decode step reads (masked ones too) must have been written."""
    with mock.patch.object(kv_cache, "_uninitialized", _nan_buffers):
        _run_operations(ops, reserve)


def _run_operations(ops, reserve) -> None:
    kv = BatchKVCache(LAYERS, HEADS, DIM, torch.float32, torch.device("cpu"))
    if reserve:
        kv.reserve_rows(reserve)
    rows: list[list[list[tuple[torch.Tensor, torch.Tensor]]]] = []  # row → per step, per layer (K, V)
    most_rows = 0
    for seed, (op, arg) in enumerate(ops, start=1):
        if op == "add":
            layers = _kv(arg, seed)
            row = kv.add_row(layers)
            assert row == len(rows)
            rows.append([layers])
        elif op == "remove" and rows:
            row = arg % len(rows)
            moved = kv.remove_row(row)
            if row != len(rows) - 1:
                assert moved == len(rows) - 1
                rows[row] = rows.pop()
            else:
                assert moved is None
                rows.pop()
        elif op == "step" and rows:
            kv.begin_step()
            step = _kv(1, seed)
            for i in range(LAYERS):
                keys = torch.cat([step[i][0]] * len(rows))  # (B, H, 1, D): every row gets this column
                values = torch.cat([step[i][1]] * len(rows))
                kv.write(i, keys, values)
            kv.end_step()
            for history in rows:
                history.append(step)
        most_rows = max(most_rows, len(rows))
        for row, history in enumerate(rows):
            want = [
                (
                    torch.cat([h[i][0] for h in history], dim=2)[0],
                    torch.cat([h[i][1] for h in history], dim=2)[0],
                )
                for i in range(LAYERS)
            ]
            for (k, v), (wk, wv) in zip(_row_contents(kv, row), want):
                assert torch.equal(k, wk) and torch.equal(v, wv)
            assert int(kv.positions[row]) == sum(h[0][0].shape[2] for h in history)
        for i in range(LAYERS):  # what decode attention reads: every live row, every column below the cursor
            assert torch.isfinite(kv.keys[i][: len(rows), :, : kv.length]).all()
            assert torch.isfinite(kv.values[i][: len(rows), :, : kv.length]).all()
        if kv.cols_capacity > RESERVE_COLUMNS:
            bound = 4
            while bound < most_rows:
                bound *= 2
            assert kv.rows_capacity <= bound


def test_a_long_prompt_joining_a_reserved_batch_allocates_for_the_rows_there_are():
    """A 2000-token prompt joining 3 short rows of a 32-row reserve: 4 rows × 2048 columns, not 32 × 2048
    (in fp32 for the default model that was ~3 GB, allocated in the engine thread)."""
    kv = BatchKVCache(LAYERS, HEADS, DIM, torch.float32, torch.device("cpu"))
    kv.reserve_rows(32)
    assert kv.rows_capacity == 32
    for seed in range(3):
        kv.add_row(_kv(20, seed))
    kv.add_row(_kv(2000, 9))
    assert (kv.rows_capacity, kv.cols_capacity) == (4, 2048)
    kv.add_row(_kv(5, 10))  # a fifth row still fits: the rows double
    assert kv.rows_capacity == 8
