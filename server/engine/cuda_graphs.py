"""The decode step replayed from CUDA graphs, one per batch-size bucket (1, 2, 4, … 512 rows).

A decode step launches a few kernels per layer; at small batches on a GPU the launches, not the
arithmetic, set the step's time. A CUDA graph records the launches once and replays them with one
call (as vLLM does per batch size). A graph replays fixed shapes and fixed addresses, so the step it
records (:class:`StaticDecodeStep`) reads every input from buffers it owns:

- a batch of ``n`` rows runs in the smallest bucket ``R ≥ n``; the padding rows decode token 0 with
  no adapter, attend only to the column they write (finite values, never a NaN that a later row
  could read back) and are dropped from the logits;
- keys and values are written at the column held in a device tensor (``index_copy_``), and attention
  covers the cache's full column capacity under its mask, which hides the columns not yet written;
- the adapter layers run in their *static* mode (``adapters/batched_lora.py``): rows' slots come from
  device buffers, every step some resident adapter needs runs for every row.

A graph is recaptured when what it recorded moves: the KV buffers (they grow by doubling) or a
bank's layout (:attr:`BatchedLoRAModel.layout_version`). Used only on CUDA devices, for models
:class:`LlamaDecodeStep` computes, when ``--cuda-graphs`` is on; nothing here runs on a CPU server.
A capture that fails (an operation that cannot be recorded) is logged and the step stays eager.
Not yet run on a GPU: ``make gpu-check`` holds the tests that would show it right.
"""

from __future__ import annotations

import logging

import torch

from adapters.batched_lora import BatchedLoRAModel
from server.engine.kv_cache import BatchKVCache
from server.engine.llama_decode import LlamaDecodeStep

logger = logging.getLogger(__name__)

BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)


def bucket_for(rows: int) -> int | None:
    """The smallest bucket that holds ``rows`` rows, or None beyond the largest (decoded eagerly)."""
    return next((bucket for bucket in BUCKETS if bucket >= rows), None)


class StaticDecodeStep:
    """The decode step over exactly ``rows`` rows, reading its inputs from buffers it owns.

    Args:
        step: the model's decode step.
        lora: the model's adapter banks.
        kv: the running batch's KV cache (at least ``rows`` rows of capacity).
        rows: the bucket's number of rows.
    """

    def __init__(self, step: LlamaDecodeStep, lora: BatchedLoRAModel, kv: BatchKVCache, rows: int):
        self.step, self.lora, self.kv, self.rows = step, lora, kv, rows
        device = kv.device
        self.inputs = torch.zeros(3, rows, dtype=torch.long, device=device)  # token, slot, slot or -1
        self.input_ids = self.inputs[0][:, None]  # (R, 1)
        self.position_ids = torch.zeros(rows, 1, dtype=torch.long, device=device)  # (R, 1)
        self.column = torch.zeros(1, dtype=torch.long, device=device)  # where this step's K/V go

    def load(self, last_token_ids: list[int], slots: list[int]) -> None:
        """Fills the buffers for the step the cache has open (after ``kv.begin_step()``)."""
        pad = self.rows - len(slots)
        host = torch.tensor(
            [
                last_token_ids + [0] * pad,
                slots + [0] * pad,
                [slot if slot else -1 for slot in slots] + [-1] * pad,
            ],
            dtype=torch.long,
        )  # (3, R)
        self.inputs.copy_(host)
        self.position_ids.copy_(self.kv.positions[: self.rows, None])
        self.column.fill_(self.kv.length)

    def forward(self) -> torch.Tensor:
        """Logits ``(R, V)`` of the step; every shape and address is fixed for a given cache layout."""
        mask = self.kv.mask[: self.rows, None, None, :]  # (R, 1, 1, C): the full column capacity
        with self.lora.static_rows(self.inputs[1], self.inputs[2]):
            return self.step(self.input_ids, mask, self.position_ids, write=self._write)

    def _write(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        keys = self.kv.keys[layer][: self.rows]  # (R, nkv, C, D), a view of the cache
        values = self.kv.values[layer][: self.rows]
        keys.index_copy_(2, self.column, k)  # k, v: (R, nkv, 1, D)
        values.index_copy_(2, self.column, v)
        return keys, values


class CudaGraphDecoder:
    """Runs decode steps through per-bucket CUDA graphs, capturing each on its first use.

    Args:
        step: the model's decode step.
        lora: the model's adapter banks.
        kv: the running batch's KV cache.
        capture: record and replay graphs (CUDA); False runs the same fixed-shape steps eagerly,
            which is how the CPU tests check the bookkeeping around them.
    """

    def __init__(self, step: LlamaDecodeStep, lora: BatchedLoRAModel, kv: BatchKVCache, capture: bool = True):
        self.step, self.lora, self.kv, self.capture = step, lora, kv, capture
        self.steps: dict[int, StaticDecodeStep] = {}
        self.graphs: dict[int, tuple[tuple[int, int, int], torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self.disabled = False  # a capture failed: every step eager from then on

    def decode(self, last_token_ids: list[int], slots: list[int]) -> torch.Tensor | None:
        """One decode step of the running batch, logits ``(B, V)``; None (cache untouched) where the
        batch is larger than every bucket or graphs are off, so the caller decodes it eagerly."""
        n = len(slots)
        rows = bucket_for(n)
        if rows is None or self.disabled:
            return None
        kv = self.kv
        kv.reserve_rows(rows)  # before the step opens its column: growing copies only closed columns
        kv.begin_step()
        step = self.steps.get(rows)
        if step is None:
            step = self.steps[rows] = StaticDecodeStep(self.step, self.lora, kv, rows)
        step.load(last_token_ids, slots)
        kv.mask[n:rows, kv.length] = True  # padding rows attend to their own new column
        try:
            logits = self._run(step)
        finally:
            kv.mask[n:rows] = False  # rows past the batch hold no columns (kv_cache's invariant)
        kv.end_step()
        return logits[:n].clone()  # the graph's output buffer is overwritten by its next replay

    def _run(self, step: StaticDecodeStep) -> torch.Tensor:
        if not self.capture:
            return step.forward()
        key = (self.kv.rows_capacity, self.kv.cols_capacity, self.lora.layout_version)
        captured = self.graphs.get(step.rows)
        if captured is None or captured[0] != key:
            self.graphs.pop(step.rows, None)  # frees the stale graph's memory before the new capture
            try:
                captured = (key, *_capture(step))
            except Exception:
                logger.exception("CUDA graph capture failed; decoding eagerly from now on")
                self.disabled = True
                return step.forward()  # the step's buffers are loaded: run it once without the graph
            self.graphs[step.rows] = captured
            logger.info("captured the decode step for %d rows in a CUDA graph", step.rows)
        _, graph, logits = captured
        graph.replay()
        return logits


def _capture(step: StaticDecodeStep) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
    """Records ``step.forward()``; returns the graph and its logits buffer. The warm-up runs compile
    Triton's kernels and let cuBLAS pick its own before recording (both must happen outside a capture);
    they compute this very step, so what they write is what the replay writes again."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            step.forward()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    # thread_local: the prefill worker may launch its own work from another thread meanwhile
    with torch.cuda.graph(graph, capture_error_mode="thread_local"):
        logits = step.forward()
    return graph, logits
