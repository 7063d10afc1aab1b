"""JSON requests to the paced service: retries with backoff, the service's errors as PacedErrors.

`ServiceClient` is the one HTTP client of paced's consumers (the trainer's shard source, its
re-measurement between stages, external trainers): connection errors, 429 and 5xx answers are
retried with exponential backoff (tenacity); a 4xx answer raises the `PacedError` subclass of
its status, carrying the service's one-line message. Light: httpx and tenacity, no torch.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import httpx
from tenacity import Retrying, retry_if_exception_type, stop_after_attempt, wait_exponential

from paced.errors import ConflictError, InputError, NotFoundError, PacedError


class _Retryable(Exception):
    """A failure worth another try: no connection, 429, or a 5xx answer."""


def run_base(run_url: str) -> tuple[str, str]:
    """(service base URL, run id) of `http://HOST:PORT/v1/runs/RUN_ID`."""
    url = run_url.rstrip("/")
    if not url.startswith(("http://", "https://")) or "/v1/runs/" not in url:
        raise InputError(f"{run_url!r} is not a run URL: expected http://HOST:PORT/v1/runs/RUN_ID",
                         detail={"field": "run_url", "value": run_url})
    base, run_id = url.split("/v1/runs/", 1)
    if not run_id or "/" in run_id:
        raise InputError(f"{run_url!r} is not a run URL: expected http://HOST:PORT/v1/runs/RUN_ID",
                         detail={"field": "run_url", "value": run_url})
    return base, run_id


@dataclass(frozen=True)
class LeaseAnswer:
    """The service's answer to a lease request: `leased` (a shard), `wait` or `done`."""

    status: str
    lease_id: str | None = None
    epoch: int = 0
    shard: int = 0
    snapshot_id: str | None = None
    ttl_seconds: float | None = None
    items: tuple[dict, ...] = ()
    retry_after_seconds: float = 1.0


class ServiceClient:
    """Requests to one paced service. `token` defaults to $PACED_TOKEN."""

    def __init__(self, base_url: str, *, token: str | None = None, retries: int = 5,
                 timeout_seconds: float = 30.0, backoff_seconds: float = 0.5):
        if retries < 0 or timeout_seconds <= 0 or backoff_seconds < 0:
            raise InputError(f"retries must be >= 0, timeout_seconds > 0 and backoff_seconds >= 0, got "
                             f"{retries}, {timeout_seconds}, {backoff_seconds}")
        self.base_url = base_url.rstrip("/")
        token = token or os.environ.get("PACED_TOKEN") or None
        self.http = httpx.Client(headers={"Authorization": f"Bearer {token}"} if token else {},
                                 timeout=timeout_seconds)
        self.retries, self.backoff_seconds = retries, backoff_seconds

    def close(self) -> None:
        self.http.close()

    def send(self, method: str, url: str, body: dict | None = None) -> httpx.Response:
        """The answer to one request (below 500 and not 429), after retries."""
        retrying = Retrying(retry=retry_if_exception_type(_Retryable),
                            stop=stop_after_attempt(self.retries + 1),
                            wait=wait_exponential(multiplier=self.backoff_seconds, max=30.0), reraise=True)
        try:
            for attempt in retrying:
                with attempt:
                    return self._send_once(method, url, body)
        except _Retryable as err:
            raise PacedError(f"{err} (after {self.retries + 1} tries)", code="service_unreachable") from None
        raise AssertionError("unreachable")

    def _send_once(self, method: str, url: str, body: dict | None) -> httpx.Response:
        try:
            response = self.http.request(method, url, json=body)
        except httpx.TransportError as err:
            raise _Retryable(f"cannot reach the service at {url}: {err}") from err
        if response.status_code >= 500 or response.status_code == 429:
            raise _Retryable(f"the service answered {response.status_code} to {method} {url}: "
                             f"{response.text[:300]}")
        return response

    def json(self, method: str, url: str, body: dict | None = None, *, what: str | None = None) -> dict:
        """The JSON answer to one request; the `PacedError` of its status on a 4xx answer."""
        response = self.send(method, url, body)
        raise_for(response, what or f"{method} {url}")
        return response.json() if response.content else {}

    # ------------------------------------------------------------ runs

    def get_run(self, run_url: str) -> dict:
        return self.json("GET", run_url.rstrip("/"), what=f"reading run {run_url}")

    def create_run(self, config: dict) -> str:
        """A new run with `config` (the body of POST /v1/runs); its URL."""
        created = self.json("POST", f"{self.base_url}/v1/runs", config, what="creating a run")
        return f"{self.base_url}/v1/runs/{created['run_id']}"

    def create_run_like(self, run_url: str, student_id: str) -> str:
        """A new run with the config of `run_url` for `student_id` (its newest snapshot); its URL."""
        old = self.get_run(run_url)["config"]
        return self.create_run({**old, "student_id": student_id, "snapshot_id": None})

    # ------------------------------------------------------------ leases

    def lease(self, run_url: str, consumer: str, ttl_seconds: float | None = None) -> LeaseAnswer:
        body = {"consumer": consumer, **({} if ttl_seconds is None else {"ttl_seconds": ttl_seconds})}
        response = self.send("POST", f"{run_url}/leases", body)
        raise_for(response, f"leasing a shard of {run_url}")
        data = response.json() if response.status_code != 204 and response.content else {}
        status = data.get("status") or ("leased" if data.get("lease_id") else "done")
        if status == "wait":
            retry = data.get("retry_after_seconds") or response.headers.get("Retry-After") or 1.0
            return LeaseAnswer("wait", retry_after_seconds=min(60.0, max(0.05, float(retry))))
        if status != "leased":
            return LeaseAnswer("done")
        return LeaseAnswer("leased", data["lease_id"], int(data.get("epoch", 0)), int(data.get("shard", 0)),
                           data.get("snapshot_id"), data.get("ttl_seconds"), tuple(data.get("items") or ()))

    def renew(self, run_url: str, lease_id: str, ttl_seconds: float | None = None) -> float | None:
        """The lease's new TTL in seconds; None when the service no longer lets us hold it (409:
        its shard went out again or was acked; 404)."""
        body = {} if ttl_seconds is None else {"ttl_seconds": ttl_seconds}
        response = self.send("POST", f"{run_url}/leases/{lease_id}/renew", body)
        if response.status_code in (404, 409):
            return None
        raise_for(response, f"renewing lease {lease_id}")
        return float(response.json().get("ttl_seconds") or 0.0)

    def ack(self, run_url: str, lease_id: str) -> bool:
        """True when the shard is (now or already) acked by this lease; False on 409 (the lease
        expired and its shard went out again: the work on it is to be discarded)."""
        response = self.send("POST", f"{run_url}/leases/{lease_id}/ack")
        if response.status_code == 409:
            return False
        raise_for(response, f"acking lease {lease_id}")
        return True


def raise_for(response: httpx.Response, what: str) -> None:
    """The `PacedError` of a 4xx answer, with the service's message."""
    if response.status_code < 400:
        return
    try:
        body = response.json()
    except ValueError:
        body = {"error": response.text[:300]}
    if not isinstance(body, dict):
        body = {"error": str(body)[:300]}
    message = f"{what}: the service answered {response.status_code}: {body.get('error', body)}"
    if response.status_code in (401, 403):
        message += " (pass --token, or token=... to the client, or set PACED_TOKEN)"
    error = {404: NotFoundError, 409: ConflictError}.get(response.status_code, InputError)
    raise error(message, detail=body.get("detail"))
