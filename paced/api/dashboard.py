"""The dashboard at `/`: one server-rendered HTML page, inline SVG charts, no JavaScript.

Per student: the newest snapshot's pass-rate histogram under the weight curve of a chosen scheme
(`?scheme=paced&alpha=1&beta=1&k=8`), and the frontier over its lineage (shares at p̂ = 0,
0 < p̂ < 1, p̂ = 1 per snapshot, with carried rows, the mean share of each estimate carried from
earlier refreshes, and snapshot age). Per run: progress by epoch
(shards acked / leased / expired / pending), effective sample size and the snapshot switches of
its plan. The same figures as the JSON API (`/v1/students/{id}/passrates`, `/v1/runs/{id}`).
"""

from __future__ import annotations

import time
from datetime import UTC, datetime
from functools import lru_cache
from html import escape
from pathlib import Path
from typing import Annotated

from fastapi import APIRouter, Query, Request
from fastapi.responses import HTMLResponse

from paced.api.charts import frontier_svg, histogram_svg, progress_svg
from paced.api.routes import ERRORS, Reads
from paced.curriculum import SCHEMES, WeightScheme
from paced.curriculum.frontier import compute_frontier, snapshot_time, weight_curve
from paced.curriculum.summary import passrate_summary
from paced.errors import PacedError
from paced.store.snapshots import list_snapshots, list_students, read_snapshot

router = APIRouter()
LINEAGE_SNAPSHOTS = 40  # newest snapshots drawn in a lineage's frontier chart
MAX_RUNS = 20


@lru_cache(maxsize=4096)
def _snapshot_figures(root: str, student_id: str, snapshot_id: str, mtime_ns: int) -> dict:
    """Summary and frontier of one snapshot (immutable files: cached by path and mtime)."""
    from paced.store.home import open_home

    table = read_snapshot(open_home(Path(root), create=False), student_id, snapshot_id)
    p, n, age, share = (table[c].to_numpy() for c in ("pass_rate", "n", "stale_age", "carried_share"))
    return {"summary": passrate_summary(p, n), "frontier": compute_frontier(p, n, age, share)}


def snapshot_figures(home, student_id: str, snapshot_id: str) -> dict:
    path = home.snapshots_dir(student_id) / f"{snapshot_id}.parquet"
    return _snapshot_figures(str(home.root), student_id, snapshot_id, path.stat().st_mtime_ns)


def age_text(snapshot_id: str, now: float) -> str:
    made = snapshot_time(snapshot_id)
    if made is None:
        return "?"
    seconds = max(0.0, now - made.timestamp())
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if seconds >= size:
            return f"{seconds / size:.1f} {unit}"
    return f"{seconds:.0f} s"


def student_view(home, student_id: str, scheme: WeightScheme, k: int, now: float) -> dict:
    ids = list_snapshots(home, student_id)
    newest = snapshot_figures(home, student_id, ids[-1])
    lineage = []
    for sid in ids[-LINEAGE_SNAPSHOTS:]:
        f = snapshot_figures(home, student_id, sid)["frontier"]
        lineage.append({"snapshot_id": sid, "problems": f.problems, "zero": f.zero, "mid": f.mid,
                        "one": f.one, "carried": f.carried, "carried_share": f.carried_share,
                        "max_stale_age": f.max_stale_age, "age": age_text(sid, now)})
    return {"student_id": student_id, "snapshot_id": ids[-1], "summary": newest["summary"],
            "curve": weight_curve(scheme, k), "lineage": lineage}


def run_view(service, run: dict) -> dict:
    described = service.describe(run["run_id"])
    expired = service.state.expired_shards(run["run_id"])
    epochs = []
    for e in described["progress"]:
        gone = expired.get(e["epoch"], 0)
        epochs.append({**e, "expired": gone, "pending": max(0, e["pending"] - gone)})
    switches = [h for h in described["history"] if h["segment"] > 0 or h["epoch"] > 0]
    return {**run, "scheme": described["run"].config["scheme"], "done": described["done"],
            "epoch_rows": epochs, "history": described["history"], "switches": len(switches)}


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}%"


def _student_html(v: dict) -> str:
    s = v["summary"]
    rows = "".join(
        f"<tr><td>{escape(r['snapshot_id'])}</td><td data-field='problems'>{r['problems']}</td>"
        f"<td>{r['zero']}</td><td>{r['mid']}</td><td>{r['one']}</td><td>{r['carried']}</td>"
        f"<td data-field='carried_share'>{_pct(r['carried_share'])}</td>"
        f"<td>{r['max_stale_age']}</td><td>{r['age']}</td></tr>" for r in reversed(v["lineage"]))
    mean = "n/a" if s["mean_pass_rate"] is None else f"{s['mean_pass_rate']:.3f}"
    return (f'<section class="student" data-student="{escape(v["student_id"])}">'
            f"<h2>student {escape(v['student_id'])}</h2>"
            f"<p>newest snapshot <code>{escape(v['snapshot_id'])}</code>: "
            f"<span data-field='problems'>{s['problems']}</span> problems measured, "
            f"mean p̂ <span data-field='mean_pass_rate'>{mean}</span>, "
            f"unmeasured {s['unmeasured']}</p>"
            f'<div class="charts">{histogram_svg(s["histogram"], s["bin_edges"], v["curve"])}'
            f"{frontier_svg(v['lineage'])}</div>"
            "<table><tr><th>snapshot</th><th>problems</th><th>p̂=0</th><th>0&lt;p̂&lt;1</th><th>p̂=1</th>"
            "<th>carried</th><th>carried share</th><th>max stale "
            f"age</th><th>age</th></tr>{rows}</table></section>")


def _run_html(v: dict) -> str:
    epochs = "".join(
        f"<tr><td>{e['epoch']}</td><td>{e['items']}</td><td>{e['shards']}</td><td>{e['acked']}</td>"
        f"<td>{e['leased']}</td><td>{e['expired']}</td><td>{e['pending']}</td>"
        f"<td>{e['effective_sample_size']:.1f}</td><td><code>{escape(e['snapshot_id'])}</code></td></tr>"
        for e in v["epoch_rows"])
    return (f'<section class="run" data-run="{escape(v["run_id"])}"><h2>run {escape(v["run_id"])}</h2>'
            f"<p>student {escape(v['student_id'])}, data set {escape(v['dataset'])}, scheme "
            f"{escape(v['scheme'])}, "
            f"epoch {v['current_epoch'] + 1} of {v['epochs']}{' (done)' if v['done'] else ''}, "
            f"snapshot switches <span data-field='switches'>{v['switches']}</span></p>"
            f"{progress_svg(v['epoch_rows'])}"
            "<table><tr><th>epoch</th><th>items</th><th>shards</th><th>acked</th><th>leased</th><th>expired</th>"
            f"<th>pending</th><th>ESS</th><th>snapshot</th></tr>{epochs}</table></section>")


STYLE = ("body{font-family:system-ui,sans-serif;margin:1.5em;color:#222}section{border-top:1px solid #ccc;"
         "padding:.5em 0}.charts{display:flex;gap:1em;flex-wrap:wrap}table{border-collapse:collapse;"
         "font-size:12px}td,th{border:1px solid #ddd;padding:2px 6px;text-align:right}.error{color:#c0392b}")


def render_page(students: list[dict], runs: list[dict], errors: list[str], scheme: WeightScheme, k: int,
                home_label: str) -> str:
    form = ("<form method='get'>weight curve: scheme <select name='scheme'>"
            + "".join(f"<option{' selected' if n == scheme.name else ''}>{escape(n)}</option>"
                      for n in sorted(SCHEMES))
            + f"</select> α <input name='alpha' value='{scheme.alpha:g}' size='3'> β <input name='beta' "
            f"value='{scheme.beta:g}' size='3'> K <input name='k' value='{k}' size='3'> "
            "<button>show</button></form>")
    problems = "".join(f"<p class='error'>{escape(e)}</p>" for e in errors)
    body = "".join(map(_student_html,
                       students)) or "<p>no pass-rate snapshots yet: run `paced rollout` and " \
        "`paced refresh`</p>"
    body += "".join(map(_run_html, runs)) or "<p>no runs yet</p>"
    stamp = datetime.now(UTC).isoformat(timespec="seconds")
    return (f"<!doctype html><html lang='en'><head><meta charset='utf-8'><title>paced dashboard</title>"
            f"<style>{STYLE}</style></head><body><h1>paced</h1><p>{escape(home_label)} · {stamp}</p>{form}"
            f"{problems}{body}</body></html>")


@router.get("/", response_class=HTMLResponse, responses=ERRORS, dependencies=Reads, tags=["dashboard"])
def dashboard(request: Request, scheme: Annotated[str, Query(pattern=r"^[a-z-]{1,32}$")] = "paced",
              alpha: Annotated[float, Query(ge=0, le=100)] = 1.0,
              beta: Annotated[float, Query(ge=0, le=100)] = 1.0,
              k: Annotated[int, Query(ge=1, le=1024)] = 8) -> HTMLResponse:
    """The dashboard (HTML): frontier per student, progress per run."""
    service, now = request.app.state.service, time.time()
    chosen = WeightScheme(name=scheme, alpha=alpha, beta=beta)  # an unknown name is a 400 from its check
    students, runs, errors = [], [], []
    for student_id in list_students(service.home):
        try:
            students.append(student_view(service.home, student_id, chosen, k, now))
        except (PacedError, OSError, ValueError) as err:  # a damaged snapshot: say so, show the rest
            errors.append(f"student {student_id}: {getattr(err, 'message', err)}")
    for run in service.state.list_runs(MAX_RUNS):
        try:
            runs.append(run_view(service, run))
        except (PacedError, OSError) as err:
            errors.append(f"run {run['run_id']}: {getattr(err, 'message', err)}")
    return HTMLResponse(render_page(students, runs, errors, chosen, k,
                                    f"data home: {service.home.root.name}"))
