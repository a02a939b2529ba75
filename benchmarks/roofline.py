"""The machine's memory bandwidth and the batch-1 decode roofline of the default model.

At batch 1 a decode step streams every weight once, so its floor is ``weight bytes ÷ bandwidth``
(Williams et al., "Roofline", CACM 2009). The achieved fraction is that floor over the measured
inter-token latency.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

BYTES_PER_WEIGHT = {"none": 4.0, "bf16": 2.0, "int8": 1.0, "nf4": 0.5 + 4 / 64}  # nf4: + absmax per 64


def measure_bandwidth_gbps(buffer_mib: int = 256, repeats: int = 5) -> dict:
    """Best-of read (sum) and copy bandwidth in GB/s over a buffer much larger than the caches."""
    x = torch.ones(buffer_mib * 2**20 // 4)
    y = torch.empty_like(x)
    y.copy_(x)
    read, copy = [], []
    for _ in range(repeats):
        t = time.perf_counter()
        x.sum()
        read.append(x.nbytes / (time.perf_counter() - t) / 1e9)
        t = time.perf_counter()
        y.copy_(x)
        copy.append(2 * x.nbytes / (time.perf_counter() - t) / 1e9)
    return {"read_gbps": round(max(read), 2), "copy_gbps": round(max(copy), 2), "buffer_mib": buffer_mib}


def decode_weight_bytes(model_dir: Path, quantization: str, head_bytes_per_weight: int = 4) -> int:
    """Bytes a batch-1 decode step must read: every decoder linear (quantized) plus the LM head in the
    compute dtype (``head_bytes_per_weight``: 4 for fp32, 2 for bf16)."""
    c = json.loads((model_dir / "config.json").read_text())
    hidden, inter, layers, vocab = (
        c["hidden_size"],
        c["intermediate_size"],
        c["num_hidden_layers"],
        c["vocab_size"],
    )
    head_dim = c.get("head_dim") or hidden // c["num_attention_heads"]
    q_out = c["num_attention_heads"] * head_dim
    kv_out = (c.get("num_key_value_heads") or c["num_attention_heads"]) * head_dim
    per_layer = hidden * q_out + 2 * hidden * kv_out + q_out * hidden + 3 * hidden * inter
    per_weight = head_bytes_per_weight if quantization == "none" else BYTES_PER_WEIGHT[quantization]
    linear_bytes = layers * per_layer * per_weight
    head_bytes = vocab * hidden * head_bytes_per_weight  # lm_head (tied) stays in the compute dtype
    return int(linear_bytes + head_bytes)


def roofline(
    model_dir: Path,
    quantization: str,
    bandwidth_gbps: float,
    itl_ms_batch1: float | None,
    head_bytes_per_weight: int = 4,
) -> dict:
    weight_bytes = decode_weight_bytes(model_dir, quantization, head_bytes_per_weight)
    floor_ms = weight_bytes / (bandwidth_gbps * 1e9) * 1e3
    return {
        "quantization": quantization,
        "weight_bytes_per_step": weight_bytes,
        "bandwidth_gbps": bandwidth_gbps,
        "roofline_step_ms": round(floor_ms, 2),
        "measured_itl_ms_batch1": itl_ms_batch1,
        "achieved_fraction": round(floor_ms / itl_ms_batch1, 3) if itl_ms_batch1 else None,
    }
