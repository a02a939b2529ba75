"""The loss-curve PNG written beside the training card (train and eval loss against steps)."""

from __future__ import annotations

from pathlib import Path

LOSS_CURVE_FILE = "loss_curve.png"


def plot_loss_curve(
    train: list[tuple[int, float]], evals: list[tuple[int, float]], path: Path, title: str
) -> Path:
    """Writes a PNG of ``(step, loss)`` series with matplotlib's headless Agg backend.

    Args:
        train: training loss per logging step.
        evals: evaluation loss per evaluation (step 0 = before training).
        path: the PNG to write.
        title: the figure title (the adapter's name).
    """
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    figure = Figure(figsize=(7, 4), dpi=100)
    axes = figure.add_subplot()
    if train:
        axes.plot(*zip(*train), label="train loss", color="tab:blue", linewidth=1.2)
    if evals:
        axes.plot(*zip(*evals), label="eval loss", color="tab:orange", marker="o", linewidth=1.5)
    losses = [loss for _, loss in train + evals if loss > 0]
    if losses and max(losses) / min(losses) > 20:
        axes.set_yscale("log")  # a well-fitting run spans decades; a linear axis hides the tail
    axes.set_xlabel("optimizer step")
    axes.set_ylabel("loss (assistant tokens)")
    axes.set_title(title)
    axes.grid(alpha=0.3)
    axes.legend()
    figure.tight_layout()
    figure.savefig(path)
    return path
