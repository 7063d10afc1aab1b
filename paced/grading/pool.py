"""Grade many answers with a wall-clock limit per answer, in killable worker processes.

`GradingPool` keeps `workers` long-lived processes (multiprocessing *spawn* context) and sends
each a batch of items at a time; a worker answers item by item, so the parent always knows which
item a worker is on and since when. A worker past the deadline on an item is killed and
replaced: that item is `timeout`, the rest of its batch goes back to the queue. A worker that
dies (os._exit, segfault, out of memory) costs its current item an `error` the same way. A
grader that raises gives `error` and the worker goes on. Verifiers marked `in_process`
(`exact`, `numeric`, which cannot hang) are graded in the calling process, without workers.

    with GradingPool("math", workers=2, timeout_seconds=5.0) as pool:
        verdicts = pool.grade([(completion, answer), ...])   # in input order
"""

from __future__ import annotations

import multiprocessing
import multiprocessing.connection
import signal
import time
from collections import deque
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess

from paced.errors import InputError, PacedError
from paced.grading.verifiers import Outcome, Verifier, get_verifier

BATCH_SIZE = 32  # items sent to a worker at once: fewer messages, still fair between workers
STARTUP_SECONDS = 120.0  # a worker must import its grader and say it is ready within this
_READY = "ready"


@dataclass(frozen=True, slots=True)
class Verdict:
    """The outcome of grading one answer and the grader (`name@version`) that gave it."""

    outcome: Outcome
    grader: str


def _grade_one(verifier: Verifier, completion: str, answer: str) -> Outcome:
    """Run the grading function; any exception it raises is an `error` verdict."""
    try:
        return Outcome(verifier.function(completion, answer))
    except Exception:  # noqa: BLE001 - a grader bug must cost one answer, not the job
        return Outcome.ERROR


def _worker_main(conn: Connection, verifier: Verifier) -> None:
    """A worker: set up, say ready, then grade batches until told to stop (None) or EOF."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle
    if verifier.setup is not None:
        verifier.setup()
    conn.send(_READY)
    while True:
        try:
            batch = conn.recv()
        except EOFError:
            return
        if batch is None:
            return
        for index, completion, answer in batch:
            conn.send((index, _grade_one(verifier, completion, answer)))


@dataclass
class _Worker:
    process: BaseProcess
    conn: Connection
    ready: bool = False
    since: float = field(default_factory=time.monotonic)  # start, or when the current item began
    batch: deque = field(default_factory=deque)  # indices sent and not yet answered


class GradingPool:
    """Grade `(completion, answer)` pairs with one grader; see the module doc."""

    def __init__(self, grader: str | Verifier, workers: int = 2, timeout_seconds: float = 5.0):
        if workers < 1:
            raise InputError(f"workers must be >= 1, got {workers}")
        if not timeout_seconds > 0:
            raise InputError(f"timeout_seconds must be > 0, got {timeout_seconds}")
        self.verifier = get_verifier(grader)
        self.workers = workers
        self.timeout_seconds = timeout_seconds
        self._ctx = multiprocessing.get_context("spawn")
        self._pool: list[_Worker] = []
        self._verdicts = {o: Verdict(o, self.verifier.label) for o in Outcome}

    # ---- lifecycle ----

    def __enter__(self) -> GradingPool:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def start(self) -> None:
        """Start the workers now (otherwise the first `grade` does). No-op for in-process graders."""
        if not self.verifier.in_process:
            while len(self._pool) < self.workers:
                self._pool.append(self._spawn())

    def close(self) -> None:
        """Stop every worker and wait for it; kill any that does not stop within a second."""
        for worker in self._pool:
            try:
                worker.conn.send(None)
            except OSError:
                pass
        for worker in self._pool:
            worker.process.join(timeout=1.0)
            self._stop(worker)
        self._pool.clear()

    def _spawn(self) -> _Worker:
        parent_conn, child_conn = self._ctx.Pipe(duplex=True)
        process = self._ctx.Process(
            target=_worker_main, args=(child_conn, self.verifier), daemon=True, name="paced-grader"
        )
        process.start()
        child_conn.close()  # so the parent sees EOF when the worker dies
        return _Worker(process, parent_conn)

    @staticmethod
    def _stop(worker: _Worker) -> None:
        if worker.process.is_alive():
            worker.process.kill()
        worker.process.join()
        worker.conn.close()
        worker.process.close()

    # ---- grading ----

    def grade(self, items: list[tuple[str, str]]) -> list[Verdict]:
        """One verdict per `(completion, answer)`, in input order."""
        if self.verifier.in_process:
            return [self._verdicts[_grade_one(self.verifier, c, a)] for c, a in items]
        self.start()
        outcomes: list[Outcome | None] = [None] * len(items)
        queue = deque(range(len(items)))
        try:
            while queue or any(w.batch for w in self._pool):
                self._dispatch(queue, items)
                self._wait()
                for i, worker in enumerate(self._pool):
                    if not self._collect(worker, outcomes, queue):
                        self._pool[i] = self._spawn()
        except BaseException:  # incl. KeyboardInterrupt: batches in flight are lost, stop them all
            self.close()
            raise
        return [self._verdicts[o] for o in outcomes]

    def _dispatch(self, queue: deque, items: list[tuple[str, str]]) -> None:
        """Send a batch to every ready, idle worker."""
        for worker in self._pool:
            if worker.ready and not worker.batch and queue:
                indices = [queue.popleft() for _ in range(min(BATCH_SIZE, len(queue)))]
                try:
                    worker.conn.send([(i, *items[i]) for i in indices])
                except OSError:  # it died while idle: `_collect` replaces it
                    queue.extendleft(reversed(indices))
                    continue
                worker.batch.extend(indices)
                worker.since = time.monotonic()

    def _wait(self) -> None:
        """Block until a worker has news or the nearest deadline passes."""
        now = time.monotonic()
        deadlines = [self._deadline(w) for w in self._pool if w.batch or not w.ready]
        timeout = max(0.0, min(deadlines) - now) if deadlines else None
        handles = [w.conn for w in self._pool] + [w.process.sentinel for w in self._pool]
        multiprocessing.connection.wait(handles, timeout=timeout)

    def _deadline(self, worker: _Worker) -> float:
        return worker.since + (self.timeout_seconds if worker.ready else STARTUP_SECONDS)

    def _collect(self, worker: _Worker, outcomes: list, queue: deque) -> bool:
        """Read a worker's answers; False when it had to be stopped (dead or past its deadline)."""
        alive = worker.process.is_alive()  # before draining, so no answer sent before death is lost
        try:
            while worker.conn.poll():
                message = worker.conn.recv()
                worker.since = time.monotonic()
                if message == _READY:
                    worker.ready = True
                else:
                    index, outcome = message
                    outcomes[index] = outcome
                    worker.batch.popleft()
        except (EOFError, OSError):
            alive = False
        if not worker.ready and not alive:
            raise PacedError(f"grader {self.verifier.label}: a worker process failed to start")
        late = bool(worker.batch or not worker.ready) and time.monotonic() > self._deadline(worker)
        if alive and not late:
            return True
        if not worker.ready:
            raise PacedError(f"grader {self.verifier.label}: a worker did not start in {STARTUP_SECONDS}s")
        if worker.batch:
            outcomes[worker.batch.popleft()] = Outcome.ERROR if not alive else Outcome.TIMEOUT
            queue.extendleft(reversed(worker.batch))
        self._stop(worker)
        return False
