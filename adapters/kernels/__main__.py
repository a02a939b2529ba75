"""``python -m adapters.kernels``: builds the compiled CPU kernels now (``make install`` runs it)."""

import logging

from adapters.kernels import _build_dir, bgmv, logger

logging.basicConfig(level=logging.INFO, format="%(message)s")
logger.info("building the CPU LoRA kernel (once; cached in %s)...", _build_dir())
op = bgmv()
logger.info("CPU LoRA kernel: %s", "ready" if op is not None else "unavailable (plain PyTorch path)")
