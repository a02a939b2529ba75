"""The benchmark harness (issue 6): systems A–D on one seeded workload, the targets as ratios of one run.

    .venv/bin/python -m benchmarks.run_bench [--quick] [--out results/bench] [--dtype auto]

(A) our server, base model only; (B) our server with N adapters; (C) naive PEFT, one request at a time;
(D) PEFT static mixed batches. (A)/(B) go through the real HTTP server on loopback; (C)/(D) run
in-process. Writes ``results.jsonl``, ``results.md`` and PNG plots into ``--out``.
"""

from __future__ import annotations

import argparse
import logging
import os
import platform
import shutil
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from adapters.base_model import resolve_base_model
from benchmarks import report, roofline, serving_scenarios
from benchmarks.adapter_factory import ALL_LINEAR, adapter_mix, write_random_adapter
from benchmarks.metrics import summarize
from benchmarks.server_process import ServerProcess, peak_rss_mb_of
from benchmarks.workload import BenchRequest, WorkloadSpec, adapter_name, make_workload

logger = logging.getLogger("benchmarks")


@dataclass
class BenchConfig:
    """Sizes of every scenario; ``--quick`` shrinks request counts but keeps every system and target."""

    out: Path = Path("results/bench")
    quick: bool = False
    threads: int = 0  # compute threads in the server and the baselines; 0 = each one's default
    quantization: str = "nf4"  # the servers' and baselines' --quantization (the server's default)
    dtype: str = "auto"  # the servers' and baselines' compute dtype (auto: the server's choice)
    concurrency: int = 32
    adapter_counts: tuple[int, ...] = (8, 32, 64)
    closed_loop_requests: int = 128
    naive_peft_requests: int = 32
    static_peft_requests: int = 128
    poisson_rates: tuple[float, ...] = (0.25, 0.5, 1.0, 2.0)
    poisson_requests: int = 48
    powerlaw: bool = True
    churn: bool = True  # N = 64 with --max-loaded-adapters 8
    long_requests: int = 16
    long_output_tokens: int = 256
    cold_adapters: int = 5
    seed: int = 0
    extra: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.concurrency < 1:
            raise ValueError(f"--concurrency must be at least 1, got {self.concurrency}")
        if self.quantization not in ("none", "nf4", "int8"):
            raise ValueError(f"--quantization must be none, nf4 or int8, got {self.quantization!r}")
        if self.dtype not in ("auto", "float32", "bfloat16", "float16"):
            raise ValueError(f"--dtype must be auto, float32, bfloat16 or float16, got {self.dtype!r}")

    @property
    def torch_dtype(self) -> torch.dtype:
        """The compute dtype every system runs in (what the server picks for ``auto``)."""
        from adapters.base_model import pick_device, serving_dtype_for

        return serving_dtype_for(pick_device()) if self.dtype == "auto" else getattr(torch, self.dtype)

    def server_flags(self, **extra: object) -> dict:
        flags: dict = {"quantization": self.quantization, "dtype": self.dtype, **extra}
        if self.threads:
            flags["torch-threads"] = self.threads
        return flags

    @classmethod
    def quick_mode(cls, **overrides: object) -> BenchConfig:
        sizes = dict(
            quick=True,
            closed_loop_requests=32,
            naive_peft_requests=6,
            static_peft_requests=32,
            poisson_rates=(0.25, 1.0),
            poisson_requests=8,
            powerlaw=False,
            churn=False,
            long_output_tokens=160,
            cold_adapters=3,
        )
        return cls(**{**sizes, **overrides})


def machine_description() -> dict:
    return {
        "cpu": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "device": "cuda:" + torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
        "torch": torch.__version__,
        "load_avg_1m": round(os.getloadavg()[0], 2),
    }


# ---------------------------------------------------------------------- setup
def setup(cfg: BenchConfig) -> tuple[Path, Path, Path]:
    """Threads, the output folder, and a data dir holding the bench adapters and the cold-load ones."""
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
        os.environ["OMP_NUM_THREADS"] = str(cfg.threads)  # the server subprocesses inherit it
    cfg.out.mkdir(parents=True, exist_ok=True)
    (cfg.out / "results.jsonl").unlink(missing_ok=True)
    model_dir = resolve_base_model(None)
    data_dir = Path(tempfile.mkdtemp(prefix="loraplex-bench-"))
    started = time.perf_counter()
    for i in range(max(cfg.adapter_counts)):
        rank, targets = adapter_mix(i)
        write_random_adapter(model_dir, data_dir / "adapters" / adapter_name(i), rank, targets, seed=i)
    for i in range(cfg.cold_adapters):
        write_random_adapter(model_dir, data_dir / "adapters" / f"cold-r16-{i}", 16, ALL_LINEAR, 1000 + i)
    logger.info(
        "wrote %d adapters in %.1f s",
        max(cfg.adapter_counts) + cfg.cold_adapters,
        time.perf_counter() - started,
    )
    return model_dir, data_dir, cfg.out / "results.jsonl"


def workload(
    cfg: BenchConfig, num_requests: int, num_adapters: int, popularity: str = "uniform"
) -> list[BenchRequest]:
    return make_workload(WorkloadSpec(num_requests, num_adapters, popularity, seed=cfg.seed))  # type: ignore[arg-type]


# ---------------------------------------------------------------------- the main server run
def serve_phase(cfg: BenchConfig, model_dir: Path, data_dir: Path, jsonl: Path) -> dict:
    """One server with every adapter resident: A, B at each N, open loop, latency probes."""
    flags = cfg.server_flags(**{"max-loaded-adapters": max(max(cfg.adapter_counts), 64) + cfg.cold_adapters})
    found: dict = {}
    with ServerProcess(data_dir, flags) as server:
        url = server.url
        found["server_startup_s"] = round(server.startup_seconds, 1)
        found["adapter_load"] = serving_scenarios.adapter_load_ms(
            url, [f"cold-r16-{i}" for i in range(cfg.cold_adapters)]
        )
        serving_scenarios.preload(url, [adapter_name(i) for i in range(max(cfg.adapter_counts))])
        probe = BenchRequest(-1, tuple(range(1000, 1016)), 8, None)
        serving_scenarios.idle_ttft_ms(url, probe, 1)  # warm-up
        found["warm_hit"] = serving_scenarios.warm_hit_ttft_ms(url, probe, adapter_name(0), 3)
        solo = BenchRequest(-2, tuple(range(2000, 2032)), 48, None)
        found["batch1_itl_ms"] = round(serving_scenarios.batch1_itl_ms(url, solo), 2)
        found["continuous_batching"] = continuous_batching_check(cfg, url, probe)
        base_config = {
            "kind": "system",
            "quantization": cfg.quantization,
            "dtype": str(cfg.torch_dtype).removeprefix("torch."),
            "threads": cfg.threads or "default",
        }
        load = f"closed C={cfg.concurrency}"
        for n in (0, *cfg.adapter_counts):
            label = "A base" if n == 0 else f"B N={n}"
            result = serving_scenarios.run_closed_loop(
                url, workload(cfg, cfg.closed_loop_requests, n), cfg.concurrency
            )
            report.append_row(jsonl, {**base_config, "label": label, "num_adapters": n, "load": load}, result)
            found[label] = result
            logger.info("%s: %.1f tok/s", label, result["output_tokens_per_s"])
        if cfg.powerlaw:
            n = cfg.adapter_counts[0]
            label = f"B N={n} powerlaw"
            result = serving_scenarios.run_closed_loop(
                url, workload(cfg, cfg.closed_loop_requests, n, "powerlaw"), cfg.concurrency
            )
            report.append_row(jsonl, {**base_config, "label": label, "num_adapters": n, "load": load}, result)
            found[label] = result
        found["open_loop"] = []
        for rate in cfg.poisson_rates:
            n = cfg.adapter_counts[0]
            result = serving_scenarios.run_open_loop(
                url, workload(cfg, cfg.poisson_requests, n), rate, cfg.seed
            )
            config = {
                **base_config,
                "label": f"B N={n}",
                "num_adapters": n,
                "load": f"Poisson {rate}/s",
                "rate": rate,
            }
            report.append_row(jsonl, config, result)
            found["open_loop"].append((rate, result))
        found["server_peak_rss_mb"] = round(server.peak_rss_mb(), 1)
    return found


def continuous_batching_check(cfg: BenchConfig, url: str, probe: BenchRequest, repeats: int = 3) -> dict:
    """A short request's TTFT while ``long_requests`` long ones decode, over its idle TTFT (≤ 3×).

    Repeated ``repeats`` times (a fresh set of long requests each time); the target uses the median,
    the worst one is reported beside it.
    """
    idle = serving_scenarios.idle_ttft_ms(url, probe, 3)
    busy = []
    for _ in range(repeats):
        longs = [
            BenchRequest(-100 - i, r.prompt_token_ids, cfg.long_output_tokens, None)
            for i, r in enumerate(workload(cfg, cfg.long_requests, 0))
        ]
        busy.append(serving_scenarios.busy_ttft_ms(url, longs, probe))
    times = sorted(b["busy_ttft_ms"] for b in busy)
    median = times[len(times) // 2]
    return {
        "idle_ttft_ms": round(idle, 2),
        "busy_ttft_ms": median,
        "busy_ttft_ms_all": times,
        "long_request_errors": sum(b["long_request_errors"] for b in busy),
        "ratio": round(median / idle, 2),
        "ratio_worst": round(times[-1] / idle, 2),
    }


def churn_phase(cfg: BenchConfig, data_dir: Path, jsonl: Path) -> dict:
    """N = 64 adapters through 8 resident slots: eviction churn on the request path."""
    n = max(cfg.adapter_counts)
    with ServerProcess(data_dir, cfg.server_flags(**{"max-loaded-adapters": 8})) as server:
        result = serving_scenarios.run_closed_loop(
            server.url, workload(cfg, cfg.closed_loop_requests, n), cfg.concurrency
        )
    config = {
        "kind": "system",
        "label": f"B N={n} max-loaded 8",
        "num_adapters": n,
        "load": f"closed C={cfg.concurrency}",
    }
    report.append_row(jsonl, config, result)
    return result


# ---------------------------------------------------------------------- the PEFT baselines
def peft_phase(cfg: BenchConfig, model_dir: Path, data_dir: Path, jsonl: Path) -> dict:
    from benchmarks import peft_baselines

    n = cfg.adapter_counts[0]
    names = [adapter_name(i) for i in range(n)]
    model, _ = peft_baselines.load_peft_model(
        model_dir, {a: data_dir / "adapters" / a for a in names}, cfg.quantization, cfg.torch_dtype
    )
    found = {}
    requests = workload(cfg, cfg.closed_loop_requests, n)
    naive = requests[: cfg.naive_peft_requests]
    records, wall = peft_baselines.serve_one_at_a_time(model, naive)
    found["C"] = summarize(records, wall)
    config = {"kind": "system", "label": f"C naive PEFT N={n}", "num_adapters": n, "load": "1 at a time"}
    report.append_row(jsonl, {**config, "note": f"first {len(naive)} requests of B's workload"}, found["C"])
    static = requests[: cfg.static_peft_requests]
    records, wall = peft_baselines.serve_static_batches(model, static, cfg.concurrency)
    found["D"] = summarize(records, wall)
    config = {
        "kind": "system",
        "label": f"D PEFT static N={n}",
        "num_adapters": n,
        "load": f"batches of {cfg.concurrency}",
    }
    report.append_row(jsonl, config, found["D"])
    found["peak_rss_mb"] = round(peak_rss_mb_of(), 1)
    return found


# ---------------------------------------------------------------------- targets and report
def targets(cfg: BenchConfig, served: dict, peft: dict, roof: dict) -> list[dict]:
    def tps(label: str) -> float:
        return served[label]["output_tokens_per_s"]

    def target(name: str, measured: float | None, goal: str, ok: bool | None) -> dict:
        return {
            "name": name,
            "measured": None if measured is None else round(measured, 3),
            "goal": goal,
            "met": ok,
        }

    a, n_small, n_big = tps("A base"), cfg.adapter_counts[0], cfg.adapter_counts[-1]
    out = []
    for n, goal in ((8, 0.85), (32, 0.75)):
        if f"B N={n}" in served:
            r1 = tps(f"B N={n}") / a
            out.append(target(f"R1 (B N={n}) / (A), C={cfg.concurrency}", r1, f">= {goal}", r1 >= goal))
    r2 = tps(f"B N={n_small}") / peft["C"]["output_tokens_per_s"]
    out.append(target(f"R2 (B N={n_small}) / (C naive PEFT)", r2, ">= 8", r2 >= 8))
    bd = tps(f"B N={n_small}") / peft["D"]["output_tokens_per_s"]
    out.append(target(f"(B N={n_small}) / (D PEFT static batches)", bd, "report", None))
    r3 = tps(f"B N={n_big}") / tps(f"B N={n_small}")
    out.append(target(f"R3 (B N={n_big}) / (B N={n_small})", r3, ">= 0.9", r3 >= 0.9))
    cb = served["continuous_batching"]
    out.append(
        target(
            f"busy TTFT / idle TTFT ({cfg.long_requests} long decoding, median of 3)",
            cb["ratio"],
            "<= 3",
            cb["ratio"] <= 3,
        )
    )
    load = served["adapter_load"]["cold_load_ms_median"]
    out.append(target("cold load ms, rank-16 all-linear (median)", load, "<= 100", load <= 100))
    warm = served["warm_hit"]["warm_hit_added_ms"]
    out.append(target("warm hit: added TTFT ms vs base", warm, "≈ 0", None))
    out.append(target("batch-1 decode: fraction of roofline", roof["achieved_fraction"], "report", None))
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="small request counts (< 10 min on 2 cores)")
    parser.add_argument("--out", type=Path, default=Path("results/bench"))
    parser.add_argument(
        "--threads", type=int, default=None, help="compute threads (default: each system's own default)"
    )
    parser.add_argument("--quantization", default="nf4", help="nf4 (the server's default) | int8 | none")
    parser.add_argument("--dtype", default="auto", help="auto (the server's choice) | float32 | bfloat16")
    parser.add_argument("--no-peft", action="store_true", help="skip the in-process PEFT baselines")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    overrides: dict = {"out": args.out, "quantization": args.quantization, "dtype": args.dtype}
    if args.threads is not None:
        overrides["threads"] = args.threads
    cfg = BenchConfig.quick_mode(**overrides) if args.quick else BenchConfig(**overrides)
    started = time.perf_counter()
    model_dir, data_dir, jsonl = setup(cfg)
    try:
        bandwidth = roofline.measure_bandwidth_gbps()
        served = serve_phase(cfg, model_dir, data_dir, jsonl)
        if cfg.churn:
            served["churn"] = churn_phase(cfg, data_dir, jsonl)
        peft = {} if args.no_peft else peft_phase(cfg, model_dir, data_dir, jsonl)
    finally:
        shutil.rmtree(data_dir, ignore_errors=True)
    roof = roofline.roofline(
        model_dir,
        cfg.quantization,
        bandwidth["read_gbps"],
        served["batch1_itl_ms"],
        head_bytes_per_weight=cfg.torch_dtype.itemsize,
    )
    goals = targets(cfg, served, peft, roof) if peft else []
    extras = {
        "bandwidth": bandwidth,
        "roofline": roof,
        "adapter_load": served["adapter_load"],
        "warm_hit": served["warm_hit"],
        "continuous_batching": served["continuous_batching"],
        "server_peak_rss_mb": served["server_peak_rss_mb"],
        "peft_process_peak_rss_mb": peft.get("peak_rss_mb"),
        "server_startup_s": served["server_startup_s"],
        "bench_wall_s": round(time.perf_counter() - started, 1),
    }
    report.append_row(jsonl, {"kind": "extras", **asdict(cfg), "out": str(cfg.out)}, extras)
    for t in goals:
        report.append_row(jsonl, {"kind": "target", "name": t["name"]}, t)
    rows = report.read_rows(jsonl)
    report.write_markdown(cfg.out / "results.md", machine_description(), goals, rows, extras)
    points = [
        (n, served["A base" if n == 0 else f"B N={n}"]["output_tokens_per_s"])
        for n in (0, *cfg.adapter_counts)
    ]
    baselines = {k: peft[k]["output_tokens_per_s"] for k in ("C", "D")} if peft else {}
    baselines = {{"C": "C naive PEFT", "D": "D PEFT static batches"}[k]: v for k, v in baselines.items()}
    report.plot_throughput_vs_adapters(cfg.out / "throughput_vs_adapters.png", points, baselines)
    rate_points = [(rate, r["ttft_ms_p50"], r["ttft_ms_p99"]) for rate, r in served["open_loop"]]
    report.plot_ttft_vs_rate(cfg.out / "ttft_vs_rate.png", rate_points)
    logger.info("done in %.0f s; see %s", time.perf_counter() - started, cfg.out / "results.md")
    sys.stdout.write((cfg.out / "results.md").read_text())


if __name__ == "__main__":
    main()
