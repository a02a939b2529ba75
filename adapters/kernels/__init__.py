"""Optional compiled CPU kernels, built once with the system's C++ compiler and cached.

``python -m adapters.kernels`` builds them (``make install`` does); the server loads them at start.
Where no compiler is available the build fails with a warning and the batched LoRA layers keep their
plain-PyTorch modes: same results, slower.
"""

from __future__ import annotations

import hashlib
import logging
import platform
from functools import cache
from pathlib import Path

import torch

from adapters.shared_settings import KernelSettings

logger = logging.getLogger(__name__)

_SOURCES = [Path(__file__).with_name(name) for name in ("bgmv.cpp", "int8_linear.cpp", "bindings.cpp")]


def _cpu_signature() -> str:
    """What ``-march=native`` code depends on: the CPU's feature flags (Linux) or its name."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return line
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _build_dir() -> Path:
    root = KernelSettings().kernel_dir
    # -march=native code runs only on CPUs with these features: one build per CPU and torch version
    cpu = hashlib.sha1(_cpu_signature().encode()).hexdigest()[:12]
    folder = root / f"torch{torch.__version__.replace('+', '_')}-{cpu}"
    folder.mkdir(parents=True, exist_ok=True)
    return folder


@cache
def _module():
    """The compiled kernels' module, or None when it cannot be built here (callers fall back)."""
    if KernelSettings().no_kernels:
        return None
    try:
        from torch.utils.cpp_extension import load

        return load(
            name="loraplex_kernels",
            sources=[str(source) for source in _SOURCES],
            # -ffp-contract=off: no multiply-adds fused per call site, so a row computes the same
            # whichever path (one row, a tile, a tail) its batch sends it through
            # -fopenmp: at::parallel_for splits the int8 kernel's outputs over the calling thread's
            # torch threads (the same libgomp torch loads, by soname)
            extra_cflags=["-O3", "-march=native", "-fopenmp", "-ffp-contract=off"],
            extra_ldflags=["-fopenmp"],
            build_directory=str(_build_dir()),
            verbose=False,
        )
    except Exception as e:  # noqa: BLE001 - no compiler, no ninja, an exotic platform: fall back
        logger.warning("compiled CPU kernels unavailable (%s); using the plain PyTorch paths", e)
        return None


def bgmv():
    """The per-row LoRA op ``bgmv_(y, x, A, Bt, slots, ranks)`` (adds in place), or None."""
    module = _module()
    return None if module is None else module.bgmv_


def int8_linear():
    """The weight-only int8 linear op ``int8_linear(x, weight, scale, bias) -> y``, or None."""
    module = _module()
    return None if module is None else module.int8_linear


@cache
def triton_lora_ops():
    """The Triton per-row LoRA kernels (:mod:`adapters.kernels.triton_lora`: ``bgmv_``, ``sgmv_``) for
    CUDA devices, or None where Triton is not installed (the batched layers then use PyTorch)."""
    if KernelSettings().no_kernels:
        return None
    try:
        import adapters.kernels.triton_lora as module
    except ImportError as e:
        logger.warning("Triton LoRA kernels unavailable (%s); using the plain PyTorch paths", e)
        return None
    return module
