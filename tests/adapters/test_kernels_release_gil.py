"""The compiled CPU kernels run without the GIL.

The prefill worker's matmuls run in one thread while the engine thread's decode step runs in another;
a kernel that kept the GIL for a 2000-token prefill's matmul would stop every running stream's decode
for that long (issue 14's long-prompt stall). Each kernel here runs in a thread while this thread
counts its own loop iterations: with the GIL held there would be none inside the call.
"""

from __future__ import annotations

import threading
import time

import pytest
import torch

from adapters import kernels
from adapters.int8_linear import Int8Linear

needs_kernels = pytest.mark.skipif(kernels.bgmv() is None, reason="no C++ compiler here")


def _progress_during(call) -> tuple[int, float]:
    """Runs ``call`` in a thread (one torch thread); returns how often this thread ran during it, and
    how long it took."""
    span: list[float] = []

    def work() -> None:
        torch.set_num_threads(1)
        call()  # once, to load and warm anything lazy
        span.append(time.perf_counter())
        call()
        span.append(time.perf_counter())

    thread = threading.Thread(target=work)
    stamps = []
    thread.start()
    while thread.is_alive():
        stamps.append(time.perf_counter())
    thread.join()
    start, end = span
    return sum(start < t < end for t in stamps), end - start


def _a8_layer(rows: int) -> tuple[Int8Linear, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    linear = torch.nn.Linear(2048, 2048)
    with torch.no_grad():
        linear.weight.normal_(generator=generator)
    layer = Int8Linear.from_linear(linear)
    return layer, torch.randn(rows, 2048, generator=generator)


@needs_kernels
@pytest.mark.parametrize("activation_block", [None, 64])
def test_int8_linears_let_other_threads_run(activation_block):
    """w8 and w8a8: the engine thread keeps running while a long prefill matmul runs in the worker."""
    layer, x = _a8_layer(256)
    if activation_block is not None:
        layer = Int8Linear(layer.weight, layer.scale, layer.bias, activation_block=activation_block)
    ran, seconds = _progress_during(lambda: layer(x))
    assert ran > 10, f"this thread ran {ran} times during a {seconds * 1e3:.0f} ms kernel call"


@needs_kernels
def test_bgmv_lets_other_threads_run():
    """The per-row LoRA kernel: many rows with rank-64 adapters, the GIL released throughout."""
    rows, width, rank, slots = 2048, 1024, 64, 4
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(rows, width, generator=generator)
    y = torch.zeros(rows, width)
    a = torch.randn(slots, rank, width, generator=generator)
    bt = torch.randn(slots, rank, width, generator=generator)
    row_slots = torch.arange(rows, dtype=torch.long) % (slots - 1) + 1
    ranks = torch.tensor([0] + [rank] * (slots - 1), dtype=torch.int32)
    op = kernels.bgmv()
    ran, seconds = _progress_during(lambda: op(y, x, a, bt, row_slots, ranks))
    assert ran > 10, f"this thread ran {ran} times during a {seconds * 1e3:.0f} ms kernel call"
