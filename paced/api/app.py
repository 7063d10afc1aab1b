"""The FastAPI app factory. Everything (settings, state database, metrics) is built in
`create_app()`, never at import, so tests can make many apps side by side.

Errors: every `PacedError` becomes its `.status` with `{error, code, detail}`; request
validation errors become 422 in the same shape (`detail.field` names the input at fault);
a filesystem error (full disk, read-only) is a 503 `storage_error`; a damaged file in the data
home a 503 `damaged_file` naming it; anything unexpected is logged and answered 500 in the same
shape, without a traceback. Paths are matched as sent: no redirect to a slash-less path (a run id
that decodes to `r-../` is a 404, never a 307 elsewhere).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from contextlib import asynccontextmanager

import duckdb
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from paced import __version__
from paced.api.dashboard import router as dashboard_router
from paced.api.dashboard import snapshot_figures
from paced.api.metrics import FrontierCollector, Metrics, ServiceMiddleware
from paced.api.routes import router
from paced.api.runs import RunService
from paced.api.settings import Settings
from paced.errors import PacedError
from paced.store.home import open_home

log = logging.getLogger("paced.api")
HTTP_CODES = {400: "bad_request", 401: "unauthorized", 403: "forbidden", 404: "not_found",
              405: "method_not_allowed", 413: "body_too_large", 415: "unsupported_media_type"}


def error_response(status: int, message: str, code: str, detail: object = None,
                   headers: dict | None = None) -> JSONResponse:
    return JSONResponse({"error": message, "code": code, "detail": detail}, status_code=status,
                        headers=headers)


def _field(loc) -> str:
    """("body", "shard_size") -> "shard_size"; ("path", "run_id") -> "run_id"; ("body",) -> "body"."""
    parts = [str(part) for part in loc]
    if len(parts) > 1 and parts[0] in ("body", "path", "query", "header"):
        parts = parts[1:]
    return ".".join(parts)


def _paced_error(request: Request, err: PacedError) -> JSONResponse:
    headers = {"WWW-Authenticate": "Bearer"} if err.status == 401 else None
    if err.status >= 500:
        log.error("%s %s: %s", request.method, request.url.path, err.message)
    return error_response(err.status, err.message, err.code, err.detail, headers)


def _validation_error(request: Request, err: RequestValidationError) -> JSONResponse:
    errors = [{"field": _field(e.get("loc", ())), "message": str(e.get("msg", "")),
               "type": str(e.get("type", ""))}
              for e in err.errors()]
    first = errors[0] if errors else {"field": "", "message": "invalid request"}
    message = f"invalid {first['field'] or 'request'}: {first['message']}"
    return error_response(422, message, "validation_error", {"field": first["field"], "errors": errors})


def _http_error(request: Request, err: HTTPException) -> JSONResponse:
    code = HTTP_CODES.get(err.status_code, f"http_{err.status_code}")
    return error_response(err.status_code, str(err.detail), code, None, getattr(err, "headers", None))


def _storage_error(request: Request, err: Exception) -> JSONResponse:
    """A full or read-only disk under the data home (OSError, or DuckDB's IOException)."""
    log.error("%s %s: %s", request.method, request.url.path, err)
    reason = err.strerror if isinstance(err, OSError) and err.strerror else str(err).splitlines()[0]
    return error_response(503, f"the service cannot read or write its data: {reason}", "storage_error",
                          {"errno": getattr(err, "errno", None)})


def _unexpected(request: Request, err: Exception) -> JSONResponse:
    log.exception("unexpected error on %s %s", request.method, request.url.path)
    return error_response(500, "internal error; the service log has the details", "internal")


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(PacedError, _paced_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(HTTPException, _http_error)
    app.add_exception_handler(OSError, _storage_error)
    app.add_exception_handler(duckdb.IOException, _storage_error)
    app.add_exception_handler(Exception, _unexpected)


def create_app(settings: Settings | None = None, *, clock: Callable[[], float] = time.time) -> FastAPI:
    """The service over `settings.home`. `clock` (Unix seconds) times leases; tests inject one."""
    settings = settings or Settings()
    home = open_home(settings.home)
    service = RunService(home, settings, clock)
    metrics = Metrics(service.state.outstanding_leases, FrontierCollector(service, snapshot_figures, clock))

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        service.open()  # already open unless an earlier lifespan closed it
        yield
        service.close()

    app = FastAPI(title="paced", version=__version__, lifespan=lifespan, redirect_slashes=False,
                  description="Curriculum service for LLM distillation: pass rates, weighted runs, "
                  "leased shards (exactly once per epoch).")
    app.state.settings, app.state.service, app.state.metrics = settings, service, metrics
    app.include_router(router)
    app.include_router(dashboard_router)
    install_error_handlers(app)
    app.add_middleware(ServiceMiddleware, metrics=metrics, max_request_bytes=settings.max_request_bytes)
    return app
