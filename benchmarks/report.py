"""Results out: JSONL rows of ``{config, result}``, a Markdown table of the targets, PNG plots."""

from __future__ import annotations

import json
from pathlib import Path


def append_row(path: Path, config: dict, result: dict) -> None:
    with path.open("a") as f:
        f.write(json.dumps({"config": config, "result": result}) + "\n")


def read_rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _fmt(value: object) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 100 else f"{value:.0f}"
    return str(value)


def systems_table(rows: list[dict]) -> str:
    """One line per measured system run: throughput and latency percentiles."""
    cols = [
        ("output_tokens_per_s", "out tok/s"),
        ("requests_per_s", "req/s"),
        ("ttft_ms_p50", "TTFT p50 ms"),
        ("ttft_ms_p99", "TTFT p99 ms"),
        ("itl_ms_p50", "ITL p50 ms"),
        ("itl_ms_p99", "ITL p99 ms"),
        ("e2e_ms_p50", "E2E p50 ms"),
        ("e2e_ms_p99", "E2E p99 ms"),
        ("requests", "reqs"),
        ("errors", "errors"),
    ]
    lines = ["| system | load | " + " | ".join(c[1] for c in cols) + " |", "|" + "---|" * (len(cols) + 2)]
    for row in rows:
        config, result = row["config"], row["result"]
        if config.get("kind") != "system":
            continue
        load = config.get("load", "")
        cells = [config["label"], load] + [_fmt(result.get(key)) for key, _ in cols]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def targets_table(targets: list[dict]) -> str:
    lines = ["| target | measured | goal | met |", "|---|---|---|---|"]
    for t in targets:
        met = "–" if t["met"] is None else ("yes" if t["met"] else "**no**")
        lines.append(f"| {t['name']} | {_fmt(t['measured'])} | {t['goal']} | {met} |")
    return "\n".join(lines)


def write_markdown(path: Path, machine: dict, targets: list[dict], rows: list[dict], extras: dict) -> None:
    parts = [
        "# loraplex benchmark",
        "",
        "Machine: " + ", ".join(f"{k} {v}" for k, v in machine.items()),
        "",
        "## Targets",
        targets_table(targets),
        "",
        "## Systems",
        systems_table(rows),
        "",
        "## Other measurements",
        "```json",
        json.dumps(extras, indent=2),
        "```",
        "",
    ]
    path.write_text("\n".join(parts))


def plot_throughput_vs_adapters(
    path: Path, points: list[tuple[int, float]], baselines: dict[str, float]
) -> None:
    """Output tokens/s of the engine against the number of distinct adapters, baselines as lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    xs, ys = zip(*sorted(points))
    ax.plot(xs, ys, "o-", label="loraplex (B; N=0 is A, base only)")
    for i, (label, value) in enumerate(baselines.items()):
        ax.axhline(value, linestyle="--", color=f"C{i + 1}", label=label)
    ax.set_xlabel("distinct adapters N")
    ax.set_ylabel("output tokens/s")
    ax.set_ylim(bottom=0)
    ax.set_title("Throughput vs number of adapters (closed loop)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_ttft_vs_rate(path: Path, points: list[tuple[float, float | None, float | None]]) -> None:
    """TTFT p50 and p99 against the Poisson request rate."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    rates = [p[0] for p in points]
    ax.plot(rates, [p[1] for p in points], "o-", label="TTFT p50")
    ax.plot(rates, [p[2] for p in points], "s--", label="TTFT p99")
    ax.set_xlabel("request rate (req/s, Poisson)")
    ax.set_ylabel("TTFT (ms)")
    ax.set_yscale("log")
    ax.set_title("TTFT vs request rate (open loop)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# (result key, row label, higher is better): the peers table's metrics, one row each per workload.
PEER_METRICS = (
    ("output_tokens_per_s", "out tok/s", True),
    ("ttft_ms_p50", "TTFT p50 ms", False),
    ("ttft_ms_p99", "TTFT p99 ms", False),
    ("tpot_ms_p50", "TPOT p50 ms", False),
)


def ratio(ours: float | None, theirs: float | None) -> float | None:
    """``ours / theirs``; None where either is missing or ``theirs`` is zero."""
    if ours is None or theirs is None or theirs == 0:
        return None
    return ours / theirs


def peers_table(results: dict[str, dict[str, dict]], workloads: list[str]) -> str:
    """``| workload | metric | llama.cpp | loraplex | ratio |`` from ``results[system][workload]``.

    A workload with failed requests says how many in its label, so a fast failure never reads as speed.
    """
    lines = ["| workload | metric | llama.cpp | loraplex | loraplex / llama.cpp |", "|---|---|---|---|---|"]
    for workload in workloads:
        theirs, ours = results["llama.cpp"][workload], results["loraplex"][workload]
        errors = theirs.get("errors", 0) + ours.get("errors", 0)
        label = workload if not errors else f"{workload} (**{errors} failed requests**)"
        for key, name, _ in PEER_METRICS:
            r = ratio(ours.get(key), theirs.get(key))
            cells = [
                label,
                name,
                _fmt(theirs.get(key)),
                _fmt(ours.get(key)),
                "–" if r is None else f"{r:.2f}",
            ]
            lines.append("| " + " | ".join(cells) + " |")
            label = ""
    return "\n".join(lines)


def plot_peers(path: Path, results: dict[str, dict[str, dict]], workloads: list[str]) -> None:
    """Grouped bars per workload, one bar per system: output tokens/s, TTFT p50 and TPOT p50."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [m for m in PEER_METRICS if m[0] != "ttft_ms_p99"]
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4.5))
    width = 0.8 / len(results)
    for ax, (key, name, higher_better) in zip(axes, panels):
        for i, (system, per_workload) in enumerate(results.items()):
            xs = [j + (i - (len(results) - 1) / 2) * width for j in range(len(workloads))]
            ax.bar(xs, [per_workload[w].get(key) or 0 for w in workloads], width, label=system)
        ax.set_xticks(range(len(workloads)))
        ax.set_xticklabels([w.replace(", ", ",\n") for w in workloads], fontsize=7)
        ax.set_title(f"{name} ({'higher' if higher_better else 'lower'} is better)")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
