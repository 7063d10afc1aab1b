"""Prometheus metrics (a registry per app, so many apps in one process never collide), and the
ASGI middleware that times every request and bounds request bodies."""

from __future__ import annotations

import json
import time
from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from starlette.exceptions import HTTPException

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class Metrics:
    """The service's metrics. `outstanding` is asked for the live lease count at each scrape;
    `frontier`, if given, is a collector of the per-student and per-run gauges (read at scrape)."""

    def __init__(self, outstanding: Callable[[], int], frontier=None):
        self.registry = CollectorRegistry()
        reg = self.registry
        self.requests = Counter("paced_http_requests", "HTTP requests", ["method", "route", "status"],
                                registry=reg)
        self.latency = Histogram("paced_http_request_duration_seconds", "HTTP request latency",
                                 ["method", "route"], buckets=LATENCY_BUCKETS, registry=reg)
        self.leases = Counter("paced_leases", "lease requests by outcome (leased, wait, done)", ["outcome"],
                              registry=reg)
        self.acks = Counter("paced_acks", "acks by outcome (acked, already_acked)", ["outcome"], registry=reg)
        self.items_served = Counter("paced_items_served", "items handed out in leased shards", registry=reg)
        self.outstanding = Gauge("paced_leases_outstanding", "leases live now", registry=reg)
        self.outstanding.set_function(outstanding)
        self.run_items_served = Counter("paced_run_items_served",
                                        "items handed out in leased shards, per run",
                                        ["run_id"], registry=reg)
        self.run_items_acked = Counter("paced_run_items_acked", "items of acked shards, per run", ["run_id"],
                                       registry=reg)
        if frontier is not None:
            reg.register(frontier)

    def render(self) -> bytes:
        return generate_latest(self.registry)


def _error_json(status: int, message: str, code: str, detail: object = None) -> bytes:
    return json.dumps({"error": message, "code": code, "detail": detail}).encode()


class ServiceMiddleware:
    """Pure ASGI: request count and latency by route template; 413 for bodies over the limit."""

    def __init__(self, app, metrics: Metrics, max_request_bytes: int):
        self.app, self.metrics, self.max_bytes = app, metrics, max_request_bytes

    async def _too_large(self, send) -> None:
        body = _error_json(413, f"request body exceeds {self.max_bytes} bytes", "body_too_large",
                           {"max_request_bytes": self.max_bytes})
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"),
                                (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})

    def _limited(self, receive):
        seen = 0

        async def receive_limited():
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.max_bytes:
                raise HTTPException(413, f"request body exceeds {self.max_bytes} bytes")
            return message

        return receive_limited

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start = time.perf_counter()
        status = 500
        length = dict(scope["headers"]).get(b"content-length")
        try:
            if length is not None and length.isdigit() and int(length) > self.max_bytes:
                status = 413
                return await self._too_large(send)

            async def send_status(message):
                nonlocal status
                if message["type"] == "http.response.start":
                    status = message["status"]
                await send(message)

            await self.app(scope, self._limited(receive), send_status)
        finally:
            route = getattr(scope.get("route"), "path", "unmatched")
            self.metrics.requests.labels(scope["method"], route, str(status)).inc()
            self.metrics.latency.labels(scope["method"], route).observe(time.perf_counter() - start)


class FrontierCollector:
    """Gauges read at scrape time from the data home and the service's state:
    per student (newest snapshot): problems by pass-rate bin, mean p̂, shares at 0 and 1, snapshot
    age; per run: shards acked, leases live, shards whose lease expired unacked."""

    def __init__(self, service, figures: Callable, clock: Callable[[], float]):
        self.service, self.figures, self.clock = service, figures, clock

    def describe(self):
        return []  # no fixed families: the registry must not call collect() at registration

    def collect(self):
        from prometheus_client.core import GaugeMetricFamily

        from paced.curriculum.frontier import snapshot_time
        from paced.errors import PacedError
        from paced.store.snapshots import list_snapshots, list_students

        bins = GaugeMetricFamily("paced_student_problems", "problems of the newest snapshot by pass-rate bin",
                                 labels=["student_id", "bin"])
        mean = GaugeMetricFamily("paced_student_mean_pass_rate", "mean p̂ of the newest snapshot",
                                 labels=["student_id"])
        share = GaugeMetricFamily("paced_student_share", "share of measured problems at p̂ = 0 / p̂ = 1",
                                  labels=["student_id", "at"])
        age = GaugeMetricFamily("paced_student_snapshot_age_seconds", "age of the newest snapshot",
                                labels=["student_id"])
        home = self.service.home
        for student in list_students(home):
            try:
                sid = list_snapshots(home, student)[-1]
                summary = self.figures(home, student, sid)["summary"]
            except (PacedError, OSError, ValueError, IndexError):
                continue  # a damaged or vanished snapshot: the dashboard names it
            edges = summary["bin_edges"]
            for i, count in enumerate(summary["histogram"]):
                bins.add_metric([student, f"{edges[i]:.1f}-{edges[i + 1]:.1f}"], count)
            if summary["mean_pass_rate"] is not None:
                mean.add_metric([student], summary["mean_pass_rate"])
                share.add_metric([student, "0"], summary["share_zero"])
                share.add_metric([student, "1"], summary["share_one"])
            made = snapshot_time(sid)
            if made is not None:
                age.add_metric([student], max(0.0, self.clock() - made.timestamp()))
        yield from (bins, mean, share, age)
        yield from self._runs()

    def _runs(self):
        from prometheus_client.core import GaugeMetricFamily

        acked = GaugeMetricFamily("paced_run_shards_acked", "shards acked in the current epoch",
                                  labels=["run_id"])
        live = GaugeMetricFamily("paced_run_leases_live", "leases live now", labels=["run_id"])
        expired = GaugeMetricFamily("paced_run_leases_expired", "shards whose latest lease expired unacked",
                                    labels=["run_id"])
        state = self.service.state
        totals = state.lease_totals()
        for run in state.list_runs(1000):
            rid = run["run_id"]
            current = [e for e in state.progress(rid) if e["epoch"] == run["current_epoch"]]
            acked.add_metric([rid], current[0]["acked"] if current else 0)
            n_live, n_expired = totals.get(rid, (0, 0))
            live.add_metric([rid], n_live)
            expired.add_metric([rid], n_expired)
        yield from (acked, live, expired)
