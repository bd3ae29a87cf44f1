"""Pictures of a training run: the loss curves saved beside each version (``curves.png``)."""

from __future__ import annotations

from pathlib import Path


def plot_curves(curves: dict[str, list[float]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")  # no display in workers
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    for name, curve in curves.items():
        ax.plot(range(1, len(curve) + 1), curve, label=f"{name} loss")
    ax.set_xlabel("step")
    ax.set_ylabel("training loss")
    ax.grid(alpha=0.3)
    if curves:
        ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
