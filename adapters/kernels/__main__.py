"""``python -m adapters.kernels``: builds the compiled CPU kernels now (``make install`` runs it)."""

import logging

from adapters.kernels import _build_dir, _module, logger

logging.basicConfig(level=logging.INFO, format="%(message)s")
logger.info("building the CPU kernels: per-row LoRA, int8 linear (once; cached in %s)...", _build_dir())
module = _module()
logger.info("CPU kernels: %s", "ready" if module is not None else "unavailable (plain PyTorch paths)")
