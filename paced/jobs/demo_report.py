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
    ax.hist([before, after], bins=bins, label=["base student", "after PACED training"],
            color=["#888", "#d62"])
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
        return f"{v:.3f}" if isinstance(v, float) else ("n/a" if v is None else str(v))

    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def _pass_rates(home: Path, student: str, first: bool = False) -> list[float]:
    from paced.store.home import Home
    from paced.store.snapshots import list_snapshots, read_snapshot

    try:
        snapshot = list_snapshots(Home(home), student)[0] if first else None
        return read_snapshot(Home(home), student, snapshot, dataset="arith")["pass_rate"].to_pylist()
    except Exception:  # noqa: BLE001 - a missing snapshot only leaves a plot out
        return []


def _greedy(result: dict, dataset: str) -> dict:
    return result["sets"][dataset]["greedy"]


def result_rows(results: dict, stages: list) -> tuple[list[str], list[list]]:
    """One row per model: held-out accuracy by difficulty, skill accuracy, forgetting, steps."""
    levels = sorted(_greedy(results["base"], "arith-heldout")["by_difficulty"], key=str)
    header = ["model", *[f"{lvl}-digit" for lvl in levels], "held-out", "subtraction (unseen skill)",
              "mastered", "forgetting", "steps"]
    steps = {s.name.removeprefix("train-"): (s.output or {}).get("steps") for s in stages
             if s.name.startswith("train-")}
    base_mastered = _greedy(results["base"], "mastered")["accuracy"]
    rows = []
    for name, res in results.items():
        held = _greedy(res, "arith-heldout")
        mastered = _greedy(res, "mastered")["accuracy"]
        drop = None if mastered is None or base_mastered is None else base_mastered - mastered
        rows.append([name, *[held["by_difficulty"].get(lvl, 0.0) for lvl in levels], held["accuracy"],
                     _greedy(res, "arith-sub")["accuracy"], mastered, drop, steps.get(name, 0)])
    return header, rows


def write_report(demo, results: dict, failure: str | None) -> str:
    """report.md + PNGs in the data home; returns the text table printed on stdout."""
    home = Path(demo.home)
    parts = ["# paced demo", "", f"Mode: {'quick' if demo.cfg.quick else 'full'}.", ""]
    if failure:
        parts += [f"**FAILED**: {failure}", ""]
    text = ""
    if {"base", "paced", "uniform"} <= set(results):
        header, rows = result_rows(results, demo.stages)
        table = markdown_table(header, rows)
        text = table
        parts += ["## Greedy accuracy (held-out addition by digits; subtraction never trained)", "", table,
                  "",
                  "Forgetting: the base student's greedy accuracy on the problems it had mastered (p̂ = 1) "
                  "minus the model's.", ""]
        acc = {r[0]: {h: v for h, v in zip(header[1:], r[1:]) if h.endswith("-digit")} for r in rows}
        plot_accuracy(acc, home / "accuracy_by_difficulty.png", "held-out accuracy by difficulty")
        parts += ["![accuracy by difficulty](accuracy_by_difficulty.png)", ""]
    before, after = _pass_rates(home, "base", first=True), _pass_rates(home, "paced-round2")
    if before:
        plot_histograms(before, after, home / "passrate_histogram.png")
        parts += ["## Pass rates before and after PACED training, with the weight curve", "",
                  f"Mean pass rate: base {np.mean(before):.3f}"
                  + (f", after {np.mean(after):.3f}" if after else ""),
                  "", "![pass-rate histogram](passrate_histogram.png)", ""]
    stage_rows = [[s.name, round(s.seconds, 1), "ok" if s.ok else "FAILED"] for s in demo.stages]
    parts += ["## Stages", "", markdown_table(["stage", "seconds", "status"], stage_rows), ""]
    (home / "report.md").write_text("\n".join(parts))
    return (text + "\n\n" if text else "") + markdown_table(["stage", "seconds", "status"], stage_rows) + \
        f"\n\nreport: {home / 'report.md'}"
