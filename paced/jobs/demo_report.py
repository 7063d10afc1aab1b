"""The demo's report: a result table on stdout, `report.md` and PNG plots in the data home."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_histograms(before: list[float], after: list[float], out: Path, alpha=1.0, beta=1.0) -> Path:
    """Pass-rate histogram before/after training, with the weight curve w(p) over it."""
    from paced.curriculum import beta_weight

    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4))
    bins = np.linspace(0, 1, 11)
    ax.hist([before, after], bins=bins, label=["base student", "after PACED training"], color=["#888", "#d62"])
    ax.set_xlabel("pass rate p̂ (K rollouts)")
    ax.set_ylabel("problems")
    twin = ax.twinx()
    grid = np.linspace(0, 1, 201)
    twin.plot(grid, beta_weight(grid, alpha, beta), color="#17a", label=f"w(p)=p^{alpha}(1-p)^{beta}")
    twin.set_ylabel("weight w(p)")
    ax.legend(loc="upper left")
    twin.legend(loc="upper right")
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def plot_accuracy(arms: dict[str, dict[str, float]], out: Path, title: str) -> Path:
    """Grouped bars: accuracy by difficulty for each arm."""
    plt = _plt()
    levels = sorted({lvl for acc in arms.values() for lvl in acc}, key=str)
    fig, ax = plt.subplots(figsize=(7, 4))
    width = 0.8 / max(len(arms), 1)
    for i, (name, acc) in enumerate(arms.items()):
        ax.bar(np.arange(len(levels)) + i * width, [acc.get(lvl, 0) for lvl in levels], width, label=name)
    ax.set_xticks(np.arange(len(levels)) + width * (len(arms) - 1) / 2, [f"{lvl} digits" for lvl in levels])
    ax.set_ylim(0, 1)
    ax.set_ylabel("greedy accuracy")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def markdown_table(header: list[str], rows: list[list]) -> str:
    def cell(v):
        return f"{v:.3f}" if isinstance(v, float) else str(v)

    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)
