"""llama.cpp's ``llama-server`` as a peer: adapters converted to GGUF, the command line, request bodies.

Two traps, both avoided here:

- ``--lora-init-without-apply`` leaves every adapter's global scale at 1.0, so a request without a
  ``lora`` field runs with *all* adapters applied. We load them with ``--lora-scaled FILE:0.0,...``
  instead: base requests get none, and a request picks its one adapter with
  ``"lora": [{"id": i, "scale": 1.0}]`` (the server sets every adapter it does not name to 0).
- ggml's AMX kernels die with SIGILL on some VMs: the build turns AMX off (``llama_cpp_build``), and
  ``--no-repack`` is available for CPUs where the repacked kernels misbehave.

llama-server batches only slots whose adapter set is equal (``are_lora_equal`` in its server
context), so a mixed-adapter load runs one adapter's rows per step.
"""

from __future__ import annotations

import logging
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from adapters.base_model import file_sha256
from benchmarks.http_client import request_body
from benchmarks.server_process import free_port, stop_process, wait_until_ready
from benchmarks.workload import BenchRequest

logger = logging.getLogger(__name__)

LORA_OUTTYPE = "f32"
"""The converted adapters' dtype: the PEFT files are float32, so nothing is rounded."""


def convert_command(source_dir: Path, base_dir: Path, adapter_dir: Path, out_file: Path) -> list[str]:
    """llama.cpp's ``convert_lora_to_gguf.py`` for one PEFT adapter (``base_dir``: an HF config dir)."""
    return [
        sys.executable,
        str(source_dir / "convert_lora_to_gguf.py"),
        "--base",
        str(base_dir),
        "--outtype",
        LORA_OUTTYPE,
        "--outfile",
        str(out_file),
        str(adapter_dir),
    ]


def converted_path(cache: Path, adapter_dir: Path) -> Path:
    """Where an adapter's GGUF is cached: keyed by its weights' hash, so a changed adapter converts again."""
    digest = file_sha256(adapter_dir / "adapter_model.safetensors")[:16]
    return cache / "lora-gguf" / f"{adapter_dir.name}-{digest}-{LORA_OUTTYPE}.gguf"


def convert_adapters(source_dir: Path, base_dir: Path, adapter_dirs: list[Path], cache: Path) -> list[Path]:
    """Converts each adapter once (two at a time; each conversion is mostly Python start-up)."""
    outs = [converted_path(cache, a) for a in adapter_dirs]
    todo = [(a, o) for a, o in zip(adapter_dirs, outs) if not o.exists()]
    for start in range(0, len(todo), 2):
        running = []
        for adapter_dir, out in todo[start : start + 2]:
            out.parent.mkdir(parents=True, exist_ok=True)
            tmp = out.with_suffix(".tmp.gguf")
            cmd = convert_command(source_dir, base_dir, adapter_dir, tmp)
            logger.info("converting %s: %s", adapter_dir.name, " ".join(cmd))
            running.append(
                (subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE), tmp, out)
            )
        for proc, tmp, out in running:
            _, stderr = proc.communicate()
            if proc.returncode != 0:
                raise RuntimeError(f"convert_lora_to_gguf failed for {out.name}: {stderr.decode()[-2000:]}")
            tmp.replace(out)
    return outs


@dataclass(frozen=True)
class LlamaServerFlags:
    """The peer's settings: 32 slots, two threads, a context that fits 32 benchmark requests."""

    parallel: int = 32
    threads: int = 2
    ctx_size: int = 8192  # SmolLM2's trained context: 256 tokens a slot at -np 32 (requests need ≤ 160)
    no_repack: bool = False

    def __post_init__(self) -> None:
        if self.parallel < 1:
            raise ValueError(f"--llama-parallel must be at least 1, got {self.parallel}")
        if self.threads < 1:
            raise ValueError(f"--llama-threads must be at least 1, got {self.threads}")


def server_command(
    binary: Path, model_gguf: Path, adapter_ggufs: list[Path], port: int, flags: LlamaServerFlags
) -> list[str]:
    """``llama-server`` with every adapter loaded at global scale 0 (see the module docstring)."""
    cmd = [str(binary), "-m", str(model_gguf), "--host", "127.0.0.1", "--port", str(port)]
    cmd += ["-np", str(flags.parallel), "-t", str(flags.threads), "-c", str(flags.ctx_size)]
    if adapter_ggufs:
        cmd += ["--lora-scaled", ",".join(f"{path}:0.0" for path in adapter_ggufs)]
    if flags.no_repack:
        cmd.append("--no-repack")
    return cmd


def llama_cpp_request_body(req: BenchRequest, adapter_ids: dict[str, int]) -> dict:
    """loraplex's body with the adapter moved to llama-server's ``lora`` field (by load order id)."""
    body = request_body(req)
    adapter = body.pop("adapter", None)
    if adapter is not None:
        body["lora"] = [{"id": adapter_ids[adapter], "scale": 1.0}]
    return body


class LlamaServerProcess:
    """Starts ``llama-server`` and waits until ``GET /health`` answers 200; its log goes to ``log_path``."""

    def __init__(
        self, command_for_port: Callable[[int], list[str]], log_path: Path, ready_timeout_s: float = 600.0
    ):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.args = command_for_port(self.port)
        self.log_path = log_path
        self.ready_timeout_s = ready_timeout_s
        self.proc: subprocess.Popen | None = None
        self.startup_seconds = 0.0

    def __enter__(self) -> LlamaServerProcess:
        started = time.perf_counter()
        with self.log_path.open("w") as log:
            self.proc = subprocess.Popen(self.args, stdout=log, stderr=subprocess.STDOUT)
        self.startup_seconds = wait_until_ready(
            self.proc,
            self.url + "/health",
            self.ready_timeout_s,
            started,
            f"llama-server (log: {self.log_path})",
        )
        logger.info("llama-server ready on %s in %.1f s", self.url, self.startup_seconds)
        return self

    def __exit__(self, *exc: object) -> None:
        stop_process(self.proc)
