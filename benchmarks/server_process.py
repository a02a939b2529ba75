"""The real ``loraplex serve`` as a subprocess on loopback, with its peak memory read from /proc."""

from __future__ import annotations

import logging
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

logger = logging.getLogger(__name__)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until_ready(
    proc: subprocess.Popen, health_url: str, timeout_s: float, started: float, what: str
) -> float:
    """Polls ``health_url`` until it answers 200; returns seconds since ``started``. A process that
    exits, or is not ready in ``timeout_s``, is stopped and raises ``RuntimeError`` naming ``what``."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode}")
        try:
            if httpx.get(health_url, timeout=2).status_code == 200:
                return time.perf_counter() - started
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    stop_process(proc)
    raise RuntimeError(f"{what} not ready after {timeout_s:.0f} s")


def stop_process(proc: subprocess.Popen | None) -> None:
    """Terminates ``proc`` (killing it after 30 s), if it still runs."""
    if proc is not None and proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


class ServerProcess:
    """Starts ``loraplex serve`` (or ``command``) with the given flags and waits until ``GET /ready``
    answers 200.

    Args:
        data_dir: the server's data directory (adapters under ``data_dir/adapters``).
        flags: extra ``serve`` flags, e.g. ``{"max-loaded-adapters": 64, "quantization": "none"}``.
        ready_timeout_s: how long to wait for the model to load.
        command: the CLI command (``("ray", "serve")`` for ``loraplex ray serve``).
    """

    def __init__(
        self,
        data_dir: Path,
        flags: dict[str, object],
        ready_timeout_s: float = 900.0,
        command: tuple[str, ...] = ("serve",),
    ):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        args = [sys.executable, "-m", "server.cli", *command, "--port", str(self.port)]
        args += ["--data-dir", str(data_dir), "--log-level", "warning"]
        for key, value in flags.items():
            args += [f"--{key}", str(value)]
        self.args = args
        self.ready_timeout_s = ready_timeout_s
        self.proc: subprocess.Popen | None = None
        self.startup_seconds = 0.0

    def __enter__(self) -> ServerProcess:
        root = Path(__file__).resolve().parents[1]
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "HF_HUB_DISABLE_PROGRESS_BARS": "1"}
        started = time.perf_counter()
        self.proc = subprocess.Popen(self.args, cwd=root, env=env, stdout=subprocess.DEVNULL)
        self.startup_seconds = wait_until_ready(
            self.proc, self.url + "/ready", self.ready_timeout_s, started, " ".join(self.args)
        )
        logger.info("server ready on %s in %.1f s", self.url, self.startup_seconds)
        return self

    def __exit__(self, *exc: object) -> None:
        stop_process(self.proc)

    def peak_rss_mb(self) -> float:
        """The server's high-water resident set (VmHWM), in MiB; 0 where /proc is unavailable."""
        if self.proc is None:
            return 0.0
        return peak_rss_mb_of(self.proc.pid)


def peak_rss_mb_of(pid: int | str = "self") -> float:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return 0.0
    return 0.0
