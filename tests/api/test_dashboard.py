"""The dashboard at `/` and the frontier gauges on /metrics, against the JSON API on the same home;
and the page in a real headless Chromium (no console errors, charts drawn, numbers as the API's)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess

import pytest
from api_fixtures import Clock, ServerThread, add_snapshot, make_service_home
from fastapi.testclient import TestClient

from paced.api.app import create_app
from paced.api.settings import Settings
from paced.curriculum import WeightScheme
from paced.curriculum.frontier import compute_frontier, weight_curve

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROME_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def data(html: str, kind: str, attr: str = "count") -> list[int]:
    """The `data-<attr>` numbers of every mark of `data-kind="<kind>"`, in page order."""
    found = re.findall(rf'<rect[^>]*data-kind="{kind}"[^>]*>', html)
    return [int(re.search(rf'data-{attr}="(\d+)"', tag).group(1)) for tag in found]


@pytest.fixture
def served(tmp_path):
    """A home with two snapshots of s1 and a run with one shard acked, one leased, one expired."""
    home, _ = make_service_home(tmp_path, n=90)
    add_snapshot(home, "s1", [min(8, (i * 7) % 10) for i in range(90)], key="second")
    clock = Clock()
    app = create_app(Settings(home=home.root), clock=clock)
    with TestClient(app) as client:
        run = client.post("/v1/runs", json={"student_id": "s1", "dataset": "arith", "scheme": "paced",
                                            "shard_size": 8, "seed": 3}).json()
        rid = run["run_id"]
        leases = [client.post(f"/v1/runs/{rid}/leases", json={"consumer": c, "ttl_seconds": ttl}).json()
                  for c, ttl in (("a", 60), ("b", 600), ("c", 30))]
        assert client.post(f"/v1/runs/{rid}/leases/{leases[0]['lease_id']}/ack").status_code == 200
        clock.advance(61)  # a's was acked; c's expired unacked; b's is live
        yield client, rid, app


def test_dashboard_numbers_match_the_api(served):
    client, rid, _ = served
    page = client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    html = page.text
    summary = client.get("/v1/students/s1/passrates").json()
    assert data(html, "histogram-bar") == summary["histogram"]
    assert data(html, "histogram-bar", "bin") == list(range(10))
    assert f"<span data-field='problems'>{summary['problems']}</span>" in html
    # the frontier over the lineage: two snapshots, oldest first, each split 0 / mid / 1
    zero, mid, one = (data(html, f"frontier-{part}") for part in ("zero", "mid", "one"))
    assert len(zero) == 2 and [z + m + o for z, m, o in zip(zero, mid, one, strict=True)] == [90, 90]
    newest = summary["histogram"]
    assert zero[-1] == round(summary["share_zero"] * 90) and one[-1] == round(summary["share_one"] * 90)
    assert sum(newest) == 90
    assert re.findall(r"data-field='carried_share'>([^<]+)<", html) == ["0.0%", "0.0%"]  # nothing carried
    view = client.get(f"/v1/runs/{rid}").json()
    epoch0 = view["progress"][0]
    assert data(html, "progress-acked") == [epoch0["acked"]] == [1]
    assert data(html, "progress-leased") == [epoch0["leased"]] == [1]
    assert data(html, "progress-expired") == [1]
    assert data(html, "progress-pending") == [epoch0["shards"] - 3]
    assert 'data-kind="weight-curve" data-points="9"' in html


def test_dashboard_weight_curve_follows_the_query(served):
    client, _, _ = served
    html = client.get("/", params={"scheme": "hard-filter", "k": 4}).text
    assert 'data-points="5"' in html and "<option selected>hard-filter</option>" in html
    bad = client.get("/", params={"scheme": "nope"})
    assert bad.status_code in (400, 422) and "scheme" in bad.json()["error"]


def test_dashboard_names_a_damaged_snapshot_and_shows_the_rest(served, tmp_path):
    client, _, app = served
    home = app.state.service.home
    bad = home.snapshots_dir("s2")
    bad.mkdir(parents=True)
    (bad / "20260101T000000000000Z-deadbeef.parquet").write_bytes(b"not parquet")
    page = client.get("/")
    assert page.status_code == 200
    assert "student s2" in page.text and 'data-student="s1"' in page.text


def test_metrics_carry_the_frontier_and_run_gauges(served):
    client, rid, _ = served
    summary = client.get("/v1/students/s1/passrates").json()
    text = client.get("/metrics").text
    for i, count in enumerate(summary["histogram"]):
        edges = summary["bin_edges"]
        assert (f'paced_student_problems{{bin="{edges[i]:.1f}-{edges[i + 1]:.1f}",student_id="s1"}} '
                f'{float(count)}' in text)
    mean = float(re.search(r'paced_student_mean_pass_rate\{student_id="s1"\} (\S+)', text).group(1))
    assert mean == pytest.approx(summary["mean_pass_rate"])
    assert f'paced_run_leases_live{{run_id="{rid}"}} 1.0' in text
    assert f'paced_run_leases_expired{{run_id="{rid}"}} 1.0' in text
    assert f'paced_run_shards_acked{{run_id="{rid}"}} 1.0' in text
    assert f'paced_run_items_acked_total{{run_id="{rid}"}} 8.0' in text
    assert re.search(r'paced_student_snapshot_age_seconds\{student_id="s1"\} \d', text)


def test_frontier_and_curve_core():
    f = compute_frontier([0, 0.5, 1, 1, 0.25], [8, 8, 8, 8, 0], [0, 1, 0, 2, 0])
    assert (f.problems, f.zero, f.mid, f.one, f.carried, f.max_stale_age) == (4, 1, 1, 2, 2, 2)
    assert f.carried_share == 0.5  # without evidence columns: a stale row is all carried
    shared = compute_frontier([0, 0.5, 1, 1, 0.25], [8, 8, 8, 8, 0], [0, 1, 0, 2, 0], [0, 0.4, 0, 1, 0.9])
    assert shared.carried_share == pytest.approx(0.35)  # measured rows only
    curve = weight_curve(WeightScheme(name="paced"), k=4)
    assert [w for _, w in curve] == pytest.approx([0, 0.75, 1, 0.75, 0])
    assert weight_curve(WeightScheme(name="uniform"), k=2) == [(0, 1), (0.5, 1), (1, 1)]


@pytest.mark.skipif(CHROMIUM is None, reason="no Chromium: `make test` installs Debian's chromium package "
                    "(apt-get install chromium); this machine could not")
def test_dashboard_renders_in_a_real_browser(served, tmp_path):
    from PIL import Image

    client, _, app = served
    summary = client.get("/v1/students/s1/passrates").json()
    with ServerThread(app) as server:
        common = [CHROMIUM, *CHROME_FLAGS, f"--user-data-dir={tmp_path / 'profile'}"]
        dom = subprocess.run([*common, "--enable-logging=stderr", "--v=0", "--dump-dom", server.url + "/"],
                             capture_output=True, text=True, timeout=120)
        shot = tmp_path / "dashboard.png"
        subprocess.run([*common, f"--screenshot={shot}", "--window-size=1200,1400", server.url + "/"],
                       capture_output=True, text=True, timeout=120)
    assert dom.returncode == 0, dom.stderr[-2000:]
    console = [line for line in dom.stderr.splitlines() if "CONSOLE" in line or "Uncaught" in line]
    assert console == []
    assert data(dom.stdout, "histogram-bar") == summary["histogram"]  # what the browser built from the page
    assert len(re.findall(r"<svg", dom.stdout)) == 3  # histogram, lineage frontier, run progress
    image = Image.open(shot).convert("RGB")
    colors = image.getcolors(maxcolors=1 << 20)
    assert image.size == (1200, 1400) and len(colors) > 20  # not blank: bars, text, colours
    bar_grey = (0x5D, 0x6D, 0x7E)
    assert any(rgb == bar_grey for _, rgb in colors)  # the histogram's bars are on screen
    if os.environ.get("PACED_KEEP_SCREENSHOT"):
        shutil.copy(shot, os.environ["PACED_KEEP_SCREENSHOT"])
