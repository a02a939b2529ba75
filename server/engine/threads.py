"""How many CPU threads the calling thread's compute uses, for torch and for bitsandbytes alike.

torch's wheels bundle their own OpenMP runtime; bitsandbytes' CPU kernels use the system's
``libgomp``, whose thread count is a per-thread setting that ``torch.set_num_threads`` does not
reach. Without this, every 4-bit matmul from an engine thread starts a team of one thread per core,
and the decode and prefill threads oversubscribe the cores.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os

import torch

logger = logging.getLogger(__name__)


def _system_openmp():
    name = ctypes.util.find_library("gomp") or "libgomp.so.1"
    try:
        return ctypes.CDLL(name)
    except OSError:
        return None


_GOMP = _system_openmp() if os.name == "posix" else None


def limit_threads(threads: int) -> None:
    """Caps torch's intra-op threads and the system OpenMP team size for calls made by this thread."""
    torch.set_num_threads(threads)
    if _GOMP is not None:
        _GOMP.omp_set_num_threads(ctypes.c_int(threads))
