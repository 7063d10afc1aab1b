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
    """The service's metrics. `outstanding` is asked for the live lease count at each scrape."""

    def __init__(self, outstanding: Callable[[], int]):
        self.registry = CollectorRegistry()
        reg = self.registry
        self.requests = Counter("paced_http_requests", "HTTP requests", ["method", "route", "status"], registry=reg)
        self.latency = Histogram("paced_http_request_duration_seconds", "HTTP request latency",
                                 ["method", "route"], buckets=LATENCY_BUCKETS, registry=reg)
        self.leases = Counter("paced_leases", "lease requests by outcome (leased, wait, done)", ["outcome"],
                              registry=reg)
        self.acks = Counter("paced_acks", "acks by outcome (acked, already_acked)", ["outcome"], registry=reg)
        self.items_served = Counter("paced_items_served", "items handed out in leased shards", registry=reg)
        self.outstanding = Gauge("paced_leases_outstanding", "leases live now", registry=reg)
        self.outstanding.set_function(outstanding)

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
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
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
