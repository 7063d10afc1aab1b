"""The service's endpoints. Thin: validate, call `RunService` / the store, shape the response.

Access: with PACED_TOKEN set, every POST needs `Authorization: Bearer <token>`; with
PACED_TOKEN_READS=1 too, so do the reads (`Reads`). /v1/health is always open, but names the
data home only to a request with the token, and lists students only where reads are open."""

from __future__ import annotations

import hashlib
import hmac
import json
import math
from dataclasses import asdict
from datetime import UTC, datetime
from typing import Annotated, Literal

from fastapi import APIRouter, Depends, Path, Query, Request, Response
from fastapi.responses import JSONResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from paced import __version__
from paced.api.runs import LEASE_ID_PATTERN, RUN_ID_PATTERN, RunService
from paced.api.schemas import (
    NAME_PATTERN,
    AckRequest,
    AckResponse,
    ErrorBody,
    Health,
    LeaseRequest,
    LeaseResponse,
    PassRates,
    RenewRequest,
    RenewResponse,
    RunCreate,
    RunCreated,
    RunView,
)
from paced.api.shardfiles import FORMATS, MEDIA_TYPES, json_with_items
from paced.errors import PacedError
from paced.store.home import validate_name
from paced.store.snapshots import list_snapshots, list_students, read_snapshot_rows

router = APIRouter()
bearer = HTTPBearer(auto_error=False, description="the service's PACED_TOKEN (required on POST when set, "
                    "and on reads with PACED_TOKEN_READS=1)")
RunId = Annotated[str, Path(pattern=RUN_ID_PATTERN, description="r- and 12 hex digits")]
Index = Annotated[int, Path(ge=0, le=2**31 - 1)]
ERRORS = {code: {"model": ErrorBody} for code in (400, 401, 403, 404, 409, 413, 422, 503)}


class Unauthorized(PacedError):
    code = "unauthorized"
    status = 401


async def get_service(request: Request) -> RunService:  # async: no threadpool hop
    return request.app.state.service


Credentials = Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)]


def has_token(request: Request, credentials: HTTPAuthorizationCredentials | None) -> bool:
    """True when the service has a token and the request carries it."""
    settings = request.app.state.settings
    if not settings.require_token() or credentials is None:
        return False
    return hmac.compare_digest(credentials.credentials.encode(), settings.token.get_secret_value().encode())


def _unauthorized() -> Unauthorized:
    return Unauthorized("this endpoint needs the service's token: send 'Authorization: Bearer <PACED_TOKEN>'",
                        detail={"field": "Authorization"})


async def require_token(request: Request, credentials: Credentials) -> None:
    if request.app.state.settings.require_token() and not has_token(request, credentials):
        raise _unauthorized()


async def require_read_token(request: Request, credentials: Credentials) -> None:
    if request.app.state.settings.token_reads and not has_token(request, credentials):
        raise _unauthorized()


Service = Annotated[RunService, Depends(get_service)]
Guarded = [Depends(require_token)]
Reads = [Depends(require_read_token)]


def iso(t: float) -> str:
    return datetime.fromtimestamp(t, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


@router.get("/v1/health", response_model=Health, tags=["service"])
def health(request: Request, svc: Service, credentials: Credentials) -> Health:
    """Status and version; the data home with the token; the newest pass-rate snapshot of every
    student where reads are open (or with the token)."""
    authorised = has_token(request, credentials)
    if request.app.state.settings.token_reads and not authorised:
        return Health(status="ok", version=__version__)
    students = {}
    for student in list_students(svc.home):
        try:
            ids = list_snapshots(svc.home, student)
        except PacedError:  # a folder whose name is not a valid student id: not ours
            continue
        if ids:
            students[student] = ids[-1]
    return Health(status="ok", version=__version__, home=str(svc.home.root) if authorised else None,
                  students=students)


@router.get("/v1/students/{student_id}/passrates", response_model=PassRates, responses=ERRORS,
            dependencies=Reads, tags=["students"])
def passrates(svc: Service, student_id: Annotated[str, Path(pattern=NAME_PATTERN)],
              dataset: Annotated[str | None, Query(pattern=NAME_PATTERN)] = None,
              snapshot_id: Annotated[str | None, Query(pattern=NAME_PATTERN)] = None) -> dict:
    """Summary of a student's pass rates (newest snapshot unless `snapshot_id`): counts, mean p̂,
    a 10-bin histogram, the share at p̂ = 0 and p̂ = 1. `dataset` narrows it to one data set."""
    from paced.curriculum.summary import passrate_summary

    validate_name(student_id, "student_id")
    table, sid = read_snapshot_rows(svc.home, student_id, snapshot_id, dataset)
    summary = passrate_summary(table["pass_rate"].to_numpy(), table["n"].to_numpy())
    return {**summary, "student_id": student_id, "snapshot_id": sid, "dataset": dataset}


@router.post("/v1/runs", response_model=RunCreated, status_code=201, responses=ERRORS, dependencies=Guarded,
             tags=["runs"])
def create_run(svc: Service, body: RunCreate) -> RunCreated:
    """Create a run: build epoch 0 from the student's snapshot and cut it into shards. The run
    keeps that snapshot, unless `follow_snapshots`: then each new epoch, and within an epoch the
    shards not leased yet, are planned again from the student's newest snapshot."""
    record, files = svc.create_run(body.to_config())
    return RunCreated(run_id=record.run_id, snapshot_id=files.snapshot_id, epoch=0, epochs=record.epochs,
                      shards=files.shards, items=files.items,
                      effective_sample_size=files.effective_sample_size, warnings=list(files.warnings))


@router.get("/v1/runs/{run_id}", response_model=RunView, responses=ERRORS, dependencies=Reads, tags=["runs"])
def get_run(svc: Service, run_id: RunId) -> RunView:
    """A run's config, progress per epoch (shards acked / handed out / leased / pending) and its
    snapshot history: the snapshot each epoch, and each re-plan within an epoch, was planned from."""
    view = svc.describe(run_id)
    run, progress = view["run"], view["progress"]
    for row in progress + view["history"]:
        row["created_at"] = iso(row["created_at"])
    history = [{k: row[k]
                for k in ("epoch", "segment", "from_shard", "snapshot_id", "student_ids", "checkpoint_id",
                          "created_at")} for row in view["history"]]
    return RunView(run_id=run.run_id, created_at=iso(run.created_at), snapshot_id=run.snapshot_id,
                   config=run.config, epochs=run.epochs, current_epoch=run.current_epoch, done=view["done"],
                   progress=progress, snapshot_history=history)


@router.post("/v1/runs/{run_id}/leases", response_model=LeaseResponse, responses=ERRORS, dependencies=Guarded,
             tags=["leases"])
def lease(request: Request, svc: Service, run_id: RunId, body: LeaseRequest) -> Response:
    """Lease the next shard of the run's current epoch that is neither acked nor under a live lease.

    Always 200 with a `status`: `leased` (the shard and its rows), `wait` (every open shard is
    leased to another consumer: retry after `retry_after_seconds`, also sent as Retry-After), or
    `done` (every epoch acked). When the current epoch is fully acked and the run has more
    epochs, the next epoch starts here (new order; new weights if the run follows snapshots).
    A run that follows snapshots and finds a snapshot newer than its plan re-plans the shards
    not leased yet from it here; `snapshot_id` names the snapshot of the shard handed out."""
    outcome = svc.lease(run_id, body.consumer, body.ttl_seconds)
    metrics = request.app.state.metrics
    metrics.leases.labels(outcome.status).inc()
    if outcome.status == "wait":
        return JSONResponse({"status": "wait", "run_id": run_id,
                             "retry_after_seconds": outcome.retry_after_seconds},
                            headers={"Retry-After": str(max(1, math.ceil(outcome.retry_after_seconds)))})
    if outcome.status == "done":
        return JSONResponse({"status": "done", "run_id": run_id})
    lease = outcome.lease
    plan = svc.epoch_plan(run_id, lease.epoch, lease.segment + 1)
    head = {"status": "leased", "run_id": run_id, "lease_id": lease.lease_id, "epoch": lease.epoch,
            "shard": lease.shard, "snapshot_id": plan.snapshot_for(lease.shard),
            "expires_at": iso(lease.expires_at), "ttl_seconds": round(lease.expires_at - svc.clock(), 3),
            "num_items": plan.shard_items(lease.shard)}
    metrics.items_served.inc(head["num_items"])
    metrics.run_items_served.labels(run_id).inc(head["num_items"])
    if not body.include_items:
        return Response(json.dumps(head).encode(), media_type="application/json")
    return Response(json_with_items(head, plan.jsonl(lease.shard)), media_type="application/json")


@router.post("/v1/runs/{run_id}/leases/{lease_id}/ack", response_model=AckResponse, responses=ERRORS,
             dependencies=Guarded, tags=["leases"])
def ack(request: Request, svc: Service, run_id: RunId,
        lease_id: Annotated[str, Path(pattern=LEASE_ID_PATTERN)],
        body: AckRequest | None = None) -> AckResponse:
    """Mark the lease's shard consumed. Acking twice is idempotent; acking a lease that expired
    after its shard was handed out again is a 409 (discard that work); acking an expired lease
    whose shard nobody took since is accepted. A body naming another `consumer` than the
    lease's is a 403 `lease_not_yours`, unless `force`."""
    body = body or AckRequest()
    result = svc.ack(run_id, lease_id, body.consumer, body.force)
    metrics = request.app.state.metrics
    metrics.acks.labels("already_acked" if result.already_acked else "acked").inc()
    if not result.already_acked:
        metrics.run_items_acked.labels(run_id).inc(svc.shard_plan(run_id, result.epoch, result.shard)
                                                   .shard_items(result.shard))
    return AckResponse(**asdict(result))


@router.post("/v1/runs/{run_id}/leases/{lease_id}/renew", response_model=RenewResponse, responses=ERRORS,
             dependencies=Guarded, tags=["leases"])
def renew(svc: Service, run_id: RunId, lease_id: Annotated[str, Path(pattern=LEASE_ID_PATTERN)],
          body: RenewRequest | None = None) -> RenewResponse:
    """Extend a lease to `ttl_seconds` from now (default: the lease_ttl_seconds setting), e.g.
    while its consumer pauses mid-shard. A live lease, or an expired one whose shard nobody took
    since, is renewed; 409 `lease_superseded` if the shard went out again (discard the work),
    409 `lease_acked` if the lease already acked its shard; 404 for an unknown lease; 403
    `lease_not_yours` when `consumer` is not the lease's (unless `force`)."""
    body = body or RenewRequest()
    renewal = svc.renew(run_id, lease_id, body.ttl_seconds, body.consumer, body.force)
    return RenewResponse(run_id=run_id, lease_id=lease_id, epoch=renewal.epoch, shard=renewal.shard,
                         expires_at=iso(renewal.expires_at),
                         ttl_seconds=round(renewal.expires_at - svc.clock(), 3))


@router.get("/v1/runs/{run_id}/epochs/{epoch}/shards/{shard}", responses={
    **ERRORS, 200: {"content": {MEDIA_TYPES[f]: {} for f in FORMATS}, "description": "the shard's rows"}},
    dependencies=Reads, tags=["runs"])
def get_shard(svc: Service, run_id: RunId, epoch: Index, shard: Index,
              fmt: Annotated[Literal[FORMATS],
                             Query(alias="format")] = "json") -> Response:  # type: ignore[valid-type]
    """A shard of a started epoch as JSON, JSONL or Parquet: the same request returns the same bytes.
    Of a run that follows snapshots, a shard is served once it has been leased (before that a
    re-plan may still change it: 404 `shard_not_built`, ask again later)."""
    data = svc.shard_plan(run_id, epoch, shard).shard_bytes(shard, fmt)
    etag = '"' + hashlib.sha256(data).hexdigest()[:32] + '"'
    return Response(data, media_type=MEDIA_TYPES[fmt],
                    headers={"ETag": etag, "Cache-Control": "public, max-age=31536000, immutable"})


@router.get("/metrics", tags=["service"], response_class=Response, dependencies=Reads,
            responses={200: {"content": {"text/plain": {}}, "description": "Prometheus text format"}})
def metrics(request: Request) -> Response:
    from prometheus_client import CONTENT_TYPE_LATEST

    return Response(request.app.state.metrics.render(), media_type=CONTENT_TYPE_LATEST)
