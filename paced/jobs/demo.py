"""The whole loop on the built-in task, on the CPU, in one command.

    paced demo [--quick] [--home DIR] [--rebuild-models]

import problems (train, held-out, and a held-out skill: subtraction, never in the training
pool) → install the tiny teacher and student shipped with paced (--rebuild-models: train them
here, cached) → teacher references → student rollouts
→ refresh → `paced serve` on a free loopback port → two runs, `paced` and `uniform`, same seed
and step budget → train a copy of the student on each over HTTP → evaluate both against the
base student → round 2: roll out the PACED-trained student, refresh, compare histograms → stop
the server. Prints a result table and writes DIR/report.md with PNG plots beside it. Every
stage runs the real `paced` command in a subprocess; a failed stage stops the demo (exit 1),
and the server is stopped whatever happens.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from paced.errors import PacedError
from paced.store.home import open_home


@dataclass(frozen=True)
class DemoConfig:
    quick: bool = False
    train_problems: int = 2000
    heldout_problems: int = 400
    skill_problems: int = 200
    k: int = 8
    steps: int = 200
    batch_size: int = 32
    lr: float = 1e-3
    shard_size: int = 64
    refresh_every: int = 50  # the PACED arm's pass-rate refresh cadence (0: measured once)
    seed: int = 0
    max_new_tokens: int = 8
    rollout_backend: str = "vllm"
    eval_backend: str = "transformers"
    rebuild_models: bool = False  # train the models here instead of installing the shipped builds

    @classmethod
    def for_mode(cls, quick: bool) -> DemoConfig:
        if not quick:
            from paced.backends import default_backend_name

            return cls(rollout_backend=default_backend_name())
        return cls(quick=True, train_problems=300, heldout_problems=100, skill_problems=50, k=4, steps=16,
                   batch_size=16, shard_size=32, refresh_every=8, rollout_backend="transformers")

    @property
    def models(self) -> tuple[str, str]:
        return ("quick-teacher", "quick-student") if self.quick else ("teacher", "student")


@dataclass
class StageLog:
    name: str
    seconds: float = 0.0
    ok: bool = False
    output: object = None


@dataclass
class Demo:
    home: Path
    cfg: DemoConfig
    stages: list[StageLog] = field(default_factory=list)

    def paced(self, name: str, *args: str, env: dict | None = None) -> object:
        """Run one `paced` command as a stage; returns its parsed JSON stdout (if any)."""
        log = StageLog(name)
        self.stages.append(log)
        print(f"\n== {name}: paced {' '.join(args)}", file=sys.stderr, flush=True)
        start = time.perf_counter()
        proc = subprocess.run([sys.executable, "-m", "paced.cli", *args, "--home", str(self.home)],
                              stdout=subprocess.PIPE, text=True, env={**os.environ, **(env or {})})
        log.seconds = time.perf_counter() - start
        if proc.returncode != 0:
            raise PacedError(f"demo stage {name!r} failed (exit {proc.returncode}); see the messages above")
        log.ok, log.output = True, _parse_json(proc.stdout)
        return log.output


def _parse_json(text: str):
    text = text.strip()
    if not text:
        return None
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        lines = [json.loads(line) for line in text.splitlines() if line.startswith("{")]
        return lines if len(lines) != 1 else lines[0]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def running_service(home: Path, timeout_seconds: float = 120.0):
    """`paced serve` as a real uvicorn subprocess on a free loopback port; always stopped."""
    import httpx

    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "paced.cli", "serve", "--home", str(home), "--port",
                             str(port), "--log-level", "warning"], start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout_seconds
        while True:
            if proc.poll() is not None:
                raise PacedError(f"paced serve exited with {proc.returncode} before it was ready")
            try:
                if httpx.get(f"{url}/v1/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise PacedError(f"paced serve did not answer on {url} within {timeout_seconds:.0f} s")
            time.sleep(0.3)
        yield url, proc
    finally:
        stop_process_group(proc)


def stop_process_group(proc: subprocess.Popen, grace_seconds: float = 15.0) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(grace_seconds)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def create_run(url: str, body: dict) -> dict:
    import httpx

    resp = httpx.post(f"{url}/v1/runs", json=body, timeout=60)
    if resp.status_code != 201 and resp.status_code != 200:
        raise PacedError(f"creating run {body.get('scheme')} failed: {resp.status_code} {resp.text}")
    created = resp.json()
    for warning in created.get("warnings", []):
        print(f"paced demo: run {body.get('scheme')}: warning: {warning}", file=sys.stderr)
    return created


def prepare(demo: Demo) -> None:
    """Problems, models, references, base rollouts and the first snapshot."""
    cfg, (teacher, student) = demo.cfg, demo.cfg.models
    demo.paced("import", "import", "builtin:arithmetic", "--dataset", "arith", "--n", str(cfg.train_problems),
               "--holdout", str(cfg.heldout_problems), "--seed", "11")
    demo.paced("import-skill", "import", "builtin:arithmetic", "--dataset", "arith-sub", "--operations", "-",
               "--n", str(cfg.skill_problems), "--seed", "12")
    demo.paced("build-models", "tasks", "build-models", *(["--quick"] if cfg.quick else []),
               *(["--rebuild"] if cfg.rebuild_models else []))
    models = demo.home / "models"
    demo.paced("teacher", "teacher", "--teacher", str(models / teacher), "--teacher-id", "teacher",
               "--dataset", "arith", "--max-new-tokens", str(cfg.max_new_tokens), "--backend",
               cfg.rollout_backend)
    rollout(demo, "rollout", models / student, "base")
    demo.paced("refresh", "refresh", "--student", "base")


def rollout(demo: Demo, stage: str, model_dir: Path, student_id: str) -> None:
    cfg = demo.cfg
    demo.paced(stage, "rollout", "--student", str(model_dir), "--student-id", student_id, "--dataset",
               "arith",
               "-k", str(cfg.k), "--max-new-tokens", str(cfg.max_new_tokens), "--seed", str(cfg.seed),
               "--backend", cfg.rollout_backend)


def train_arms(demo: Demo, url: str) -> dict[str, Path]:
    """One run per arm on the service, and a copy of the student trained on each over HTTP."""
    cfg, (teacher, student) = demo.cfg, demo.cfg.models
    outs = {}
    for scheme in ("paced", "uniform"):
        # The PACED arm closes the loop: pass rates re-measured on the checkpoint being trained
        # every `refresh_every` steps, and its run follows the newest snapshot (DESIGN.md §7).
        follow = scheme == "paced" and cfg.refresh_every > 0
        run = create_run(url, {"student_id": "base", "dataset": "arith", "scheme": scheme, "seed": cfg.seed,
                               "shard_size": cfg.shard_size, "epochs": 1000, "follow_snapshots": follow})
        refresh = ["--refresh-every", str(cfg.refresh_every), "--rollout-k", str(cfg.k)] if follow else []
        out = demo.home / "demo" / scheme
        demo.paced(f"train-{scheme}", "train", "--student", str(demo.home / "models" / student),
                   "--teacher", str(demo.home / "models" / teacher), "--from",
                   f"{url}/v1/runs/{run['run_id']}",
                   "--loss", "forward", "--steps", str(cfg.steps), "--batch-size", str(cfg.batch_size),
                   "--lr", str(cfg.lr), "--seed", str(cfg.seed), "--out", str(out), "--lease-ttl-seconds",
                   "600", "--max-new-tokens", str(cfg.max_new_tokens), *refresh)
        outs[scheme] = out / "final"
    return outs


def base_snapshot(home: Path) -> str:
    """The base student's first snapshot (later ones are the PACED arm's refreshes of its lineage)."""
    from paced.store.home import Home
    from paced.store.snapshots import list_snapshots

    return list_snapshots(Home(home), "base")[0]


def evaluate(demo: Demo, name: str, model_dir: Path) -> dict:
    return demo.paced(f"evaluate-{name}", "evaluate", "--model", str(model_dir), "--dataset", "arith-heldout",
                      "--dataset", "arith-sub", "--mastered-student", "base", "--mastered-dataset", "arith",
                      "--mastered-snapshot", base_snapshot(demo.home),
                      "--greedy-only", "--max-new-tokens", str(demo.cfg.max_new_tokens),
                      "--backend", demo.cfg.eval_backend)["model"]


def run_demo(home: Path, cfg: DemoConfig) -> int:
    demo = Demo(home, cfg)
    results: dict = {}
    failure = None
    try:
        prepare(demo)
        with running_service(home) as (url, _):
            arms = train_arms(demo, url)
            results["base"] = evaluate(demo, "base", home / "models" / cfg.models[1])
            for arm, path in arms.items():
                results[arm] = evaluate(demo, arm, path)
            rollout(demo, "round2-rollout", arms["paced"], "paced-round2")
            demo.paced("round2-refresh", "refresh", "--student", "paced-round2")
    except PacedError as err:
        failure = err.message
        print(f"paced demo: {failure}", file=sys.stderr)
    from paced.jobs.demo_report import write_report

    report = write_report(demo, results, failure)
    print(report)
    return 1 if failure else 0


def add_arguments(parser) -> None:
    from paced.store.home import add_home_argument

    parser.add_argument("--quick", action="store_true", help="smaller everything (a few minutes; CI runs it)")
    parser.add_argument(
        "--rebuild-models", action="store_true",
        help="train the tiny teacher and student on this CPU (minutes) instead of installing the shipped "
             "ones",
    )
    add_home_argument(parser)


def _terminate(signum, frame):
    raise SystemExit(128 + signum)  # unwinds: the server and a running stage are stopped


def run(args) -> int:
    signal.signal(signal.SIGTERM, _terminate)
    home = open_home(args.home)
    cfg = replace(DemoConfig.for_mode(args.quick), rebuild_models=args.rebuild_models)
    print(f"paced demo ({'quick' if cfg.quick else 'full'}) in {home.root}: {json.dumps(asdict(cfg))}",
          file=sys.stderr)
    return run_demo(home.root, cfg)
