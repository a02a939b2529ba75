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

# -ffp-contract=off: no multiply-adds fused per call site, so a row computes the same whichever path
# (one row, a tile, a tail) its batch sends it through. -fopenmp: at::parallel_for splits the int8
# kernels' outputs over the calling thread's torch threads (the same libgomp torch loads, by soname)
_CFLAGS = ["-O3", "-march=native", "-fopenmp", "-ffp-contract=off"]
_SOURCES = [
    Path(__file__).with_name(name)
    for name in ("bgmv.cpp", "int8_linear.cpp", "int8_linear_a8.cpp", "bindings.cpp")
]


def _cpu_signature() -> str:
    """What ``-march=native`` code depends on: the CPU's feature flags (Linux) or its name."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return line
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _sources_digest() -> str:
    """A hash of the kernels' sources and flags: checkouts with different sources never share a build."""
    digest = hashlib.sha1(" ".join(_CFLAGS).encode())
    for source in _SOURCES:
        digest.update(source.name.encode())
        digest.update(source.read_bytes())
    return digest.hexdigest()[:12]


def _build_dir() -> Path:
    root = KernelSettings().kernel_dir
    # -march=native code runs only on CPUs with these features: one build per CPU, torch version and
    # version of the sources (so two checkouts, or a rebuild after an edit, never clobber each other)
    cpu = hashlib.sha1(_cpu_signature().encode()).hexdigest()[:12]
    folder = root / f"torch{torch.__version__.replace('+', '_')}-{cpu}-src{_sources_digest()}"
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
            extra_cflags=_CFLAGS,
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


def int8_linear_a8():
    """The w8a8 linear op ``int8_linear_a8(x, weight, scale, bias, block, isa) -> y`` (activations
    quantized per row in blocks of ``block``; ``isa`` "" = the best this CPU has), or None."""
    module = _module()
    return None if module is None else module.int8_linear_a8


@cache
def int8_linear_a8_isa() -> str | None:
    """The instruction set the w8a8 kernel uses here: "avx512vnni", "avx2" or "portable" (None: no kernel).

    The best the CPU has, once it has computed the same bits as the portable loop on a random problem
    (the ISAs are specified to agree bitwise; one that does not is a bug, logged, and not used).
    """
    module = _module()
    if module is None:
        return None
    for isa in _ISA_PREFERENCE[_ISA_PREFERENCE.index(module.int8_linear_a8_isa()) :]:
        if isa == "portable" or _agrees_with_portable(module.int8_linear_a8, isa):
            return isa
        logger.error("the w8a8 kernel's %s path disagrees with its portable loop; not using it", isa)
    return "portable"


_ISA_PREFERENCE = ("avx512vnni", "avx2", "portable")


def _agrees_with_portable(op, isa: str) -> bool:
    generator = torch.Generator().manual_seed(14)
    x = torch.randn(5, 333, generator=generator)  # (M, K): a tail block, a zero block
    x[1, 64:128] = 0
    weight = torch.randint(-127, 128, (11, 333), dtype=torch.int8, generator=generator)  # (N, K)
    scale, bias = torch.rand(11, generator=generator), torch.randn(11, generator=generator)
    return all(
        torch.equal(op(x, weight, scale, bias, block, isa), op(x, weight, scale, bias, block, "portable"))
        for block in (32, 64, 128)
    )


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
