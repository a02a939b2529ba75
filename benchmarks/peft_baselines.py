"""The in-process PEFT baselines a user would hand-roll: (C) one request at a time, (D) static batches.

(C) ``set_adapter`` then ``generate`` per request, in arrival order. (D) groups the waiting requests
into batches of up to ``batch_size`` and runs one ``generate(adapter_names=…)`` per batch (PEFT's
mixed-adapter batch), left-padded, every row generating until the batch's longest output is done —
only the requested tokens count as output. All requests are waiting at time 0 (a closed-loop burst),
so latencies include the time spent queued behind earlier requests, as the HTTP clients' do.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers.generation.streamers import BaseStreamer

from benchmarks.workload import BenchRequest

logger = logging.getLogger(__name__)

BASE_ADAPTER = "__base__"  # PEFT's name for "no adapter" in ``adapter_names``


@dataclass
class InProcessRecord:
    """The same timings the HTTP client records, for a request served in-process."""

    index: int
    output_tokens: int
    first_token_s: float | None = None
    done_s: float = 0.0
    token_times_s: list[float] = field(default_factory=list)
    error: str | None = None

    @property
    def ttft_s(self) -> float | None:
        return self.first_token_s  # every request arrived at 0

    @property
    def e2e_s(self) -> float:
        return self.done_s

    def inter_token_s(self) -> list[float]:
        times = self.token_times_s[: self.output_tokens]
        return [b - a for a, b in zip(times, times[1:])]


class _StepClock(BaseStreamer):
    """Timestamps each generation step (``put`` is called once for the prompt, then once per step)."""

    def __init__(self, t0: float):
        self.t0 = t0
        self.times: list[float] = []
        self._prompt_seen = False

    def put(self, value: torch.Tensor) -> None:
        if not self._prompt_seen:
            self._prompt_seen = True
            return
        self.times.append(time.perf_counter() - self.t0)

    def end(self) -> None:
        pass


def load_peft_model(
    model_dir: Path, adapter_dirs: dict[str, Path], quantization: str, dtype: torch.dtype | None = None
):
    """The base model (same loader, quantization and dtype as the server) with every adapter attached."""
    from peft import PeftModel

    from adapters.base_model import load_base_model

    base = load_base_model(model_dir, quantization, dtype=dtype)
    names = list(adapter_dirs)
    model = PeftModel.from_pretrained(base.model, adapter_dirs[names[0]], adapter_name=names[0])
    for name in names[1:]:
        model.load_adapter(adapter_dirs[name], adapter_name=name)
    model.eval()
    return model, base.tokenizer


def _generate(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, new_tokens: int, **kwargs):
    return model.generate(
        input_ids=input_ids,
        attention_mask=attention_mask,
        max_new_tokens=new_tokens,
        min_new_tokens=new_tokens,  # ignore EOS: fixed output lengths, like the server's ignore_eos
        do_sample=False,
        pad_token_id=0,
        **kwargs,
    )


@torch.inference_mode()
def serve_one_at_a_time(model, requests: list[BenchRequest]) -> tuple[list[InProcessRecord], float]:
    """System (C): ``set_adapter`` + ``generate`` per request. Returns records and wall seconds."""
    device = next(model.parameters()).device
    records = []
    t0 = time.perf_counter()
    for req in requests:
        ids = torch.tensor([req.prompt_token_ids], device=device)  # (1, T)
        clock = _StepClock(t0)
        if req.adapter is None:
            with model.disable_adapter():
                _generate(model, ids, torch.ones_like(ids), req.output_tokens, streamer=clock)
        else:
            model.set_adapter(req.adapter)
            _generate(model, ids, torch.ones_like(ids), req.output_tokens, streamer=clock)
        records.append(_record(req, clock))
    return records, time.perf_counter() - t0


@torch.inference_mode()
def serve_static_batches(
    model, requests: list[BenchRequest], batch_size: int
) -> tuple[list[InProcessRecord], float]:
    """System (D): one mixed-adapter ``generate`` per batch of ``batch_size`` waiting requests."""
    device = next(model.parameters()).device
    records = []
    t0 = time.perf_counter()
    for start in range(0, len(requests), batch_size):
        batch = requests[start : start + batch_size]
        width = max(len(r.prompt_token_ids) for r in batch)
        ids = torch.zeros(len(batch), width, dtype=torch.long, device=device)  # (B, T) left-padded
        mask = torch.zeros_like(ids)
        for row, req in enumerate(batch):
            n = len(req.prompt_token_ids)
            ids[row, width - n :] = torch.tensor(req.prompt_token_ids)
            mask[row, width - n :] = 1
        names = [r.adapter or BASE_ADAPTER for r in batch]
        clock = _StepClock(t0)
        _generate(model, ids, mask, max(r.output_tokens for r in batch), streamer=clock, adapter_names=names)
        records.extend(_record(req, clock) for req in batch)
    return records, time.perf_counter() - t0


def _record(req: BenchRequest, clock: _StepClock) -> InProcessRecord:
    """A request's view of a (possibly shared) generate: it is done at its own last token."""
    times = clock.times[: req.output_tokens]
    return InProcessRecord(
        req.index,
        output_tokens=len(times),
        first_token_s=times[0] if times else None,
        done_s=times[-1] if times else 0.0,
        token_times_s=times,
    )
