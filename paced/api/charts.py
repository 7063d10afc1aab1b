"""Small inline SVG charts for the dashboard: no JavaScript, no build step, no external files.

Every mark carries its number in a `data-*` attribute (and a <title> tooltip), so a browser test
can read back what was drawn and compare it with the API.
"""

from __future__ import annotations

from html import escape

COLORS = {"zero": "#c0392b", "mid": "#2e86c1", "one": "#27ae60", "acked": "#27ae60", "leased": "#2e86c1",
          "expired": "#e67e22", "pending": "#bdc3c7", "bar": "#5d6d7e", "curve": "#8e44ad"}


def _svg(width: int, height: int, body: list[str], label: str) -> str:
    return (f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
            f'viewBox="0 0 {width} {height}" role="img" aria-label="{escape(label)}">' + "".join(body)
            + "</svg>")


def _rect(x: float, y: float, w: float, h: float, color: str, title: str, **data) -> str:
    attrs = "".join(f' data-{k.replace("_", "-")}="{escape(str(v))}"' for k, v in data.items())
    return (f'<rect x="{x:.1f}" y="{y:.1f}" width="{max(w, 0):.1f}" height="{max(h, 0):.1f}" '
            f'fill="{color}"{attrs}>'
            f"<title>{escape(title)}</title></rect>")


def histogram_svg(counts: list[int], edges: list[float], curve: list[tuple[float, float]] | None = None,
                  width: int = 420, height: int = 180) -> str:
    """Pass-rate histogram bars, with the scheme's weight curve (scaled to the plot) over them."""
    pad, top = 28, max(max(counts, default=0), 1)
    plot_w, plot_h = width - 2 * pad, height - 2 * pad
    bar_w = plot_w / max(len(counts), 1)
    body = [f'<line x1="{pad}" y1="{height - pad}" x2="{width - pad}" y2="{height - pad}" stroke="#333"/>']
    for i, count in enumerate(counts):
        h = plot_h * count / top
        body.append(_rect(pad + i * bar_w + 1, height - pad - h, bar_w - 2, h, COLORS["bar"],
                          f"p̂ in [{edges[i]:.1f}, {edges[i + 1]:.1f}]: {count} problems",
                          kind="histogram-bar", bin=i, count=count))
    for x in (0.0, 0.5, 1.0):
        body.append(f'<text x="{pad + x * plot_w:.1f}" y="{height - 8}" font-size="11" text-anchor="middle">'
                    f"{x:g}</text>")
    if curve:
        points = " ".join(f"{pad + p * plot_w:.1f},{height - pad - w * plot_h:.1f}" for p, w in curve)
        body.append(f'<polyline points="{points}" fill="none" stroke="{COLORS["curve"]}" stroke-width="2" '
                    f'data-kind="weight-curve" data-points="{len(curve)}"><title>weight (max '
                    '1)</title></polyline>')
    body.append(f'<text x="{pad}" y="14" font-size="11">max {top} problems per bin</text>')
    return _svg(width, height, body, "pass-rate histogram")


def frontier_svg(rows: list[dict], width: int = 420, height: int = 180) -> str:
    """One stacked column per snapshot (oldest left): shares at p̂ = 0, 0 < p̂ < 1, p̂ = 1."""
    pad = 24
    plot_w, plot_h = width - 2 * pad, height - 2 * pad
    col_w = plot_w / max(len(rows), 1)
    body = []
    for i, row in enumerate(rows):
        total, y = max(row["problems"], 1), height - pad
        for part in ("zero", "mid", "one"):
            h = plot_h * row[part] / total
            y -= h
            body.append(_rect(pad + i * col_w + 1, y, col_w - 2, h, COLORS[part],
                              f"{row['snapshot_id']}: {part} {row[part]} of {row['problems']}",
                              kind=f"frontier-{part}", snapshot=row["snapshot_id"], count=row[part]))
    body.append(f'<text x="{pad}" y="14" font-size="11">share at p̂=0 (red), 0&lt;p̂&lt;1 (blue), '
                "p̂=1 (green), per snapshot</text>")
    return _svg(width, height, body, "frontier over the lineage")


def progress_svg(epochs: list[dict], width: int = 420, row_h: int = 18) -> str:
    """One horizontal bar per epoch: shards acked, leased (live), expired, pending."""
    pad, label_w = 4, 60
    height = max(len(epochs), 1) * (row_h + 4) + 2 * pad
    plot_w = width - label_w - pad
    body = []
    for i, e in enumerate(epochs):
        y, x, total = pad + i * (row_h + 4), float(label_w), max(e["shards"], 1)
        body.append(f'<text x="2" y="{y + row_h - 5}" font-size="11">epoch {e["epoch"]}</text>')
        for part in ("acked", "leased", "expired", "pending"):
            w = plot_w * e[part] / total
            body.append(_rect(x, y, w, row_h, COLORS[part],
                              f"epoch {e['epoch']}: {part} {e[part]} of {e['shards']}",
                              kind=f"progress-{part}", epoch=e["epoch"], count=e[part]))
            x += w
    return _svg(width, height, body, "run progress by epoch")
