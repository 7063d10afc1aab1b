"""The errors paced raises on purpose.

Every error a user can cause is a `PacedError` with a stable `code`: the CLI prints it as one
line and exits 1, the service maps it to `{error, code, detail}` with a 4xx status.
Third-party exceptions are wrapped at the boundary (`raise PacedError(...) from err`).
"""

from __future__ import annotations


class PacedError(Exception):
    """An error with a stable machine-readable `code` and an HTTP status for the service."""

    code = "paced_error"
    status = 400

    def __init__(self, message: str, *, code: str | None = None, detail: object = None):
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code
        self.detail = detail


class InputError(PacedError):
    """Bad user input: a file, a field, an argument. Says what to fix."""

    code = "bad_input"
    status = 422


class NotFoundError(PacedError):
    """A named thing (data set, student, run, shard) does not exist."""

    code = "not_found"
    status = 404


class ConflictError(PacedError):
    """The request contradicts state that already exists (e.g. acking a re-leased shard)."""

    code = "conflict"
    status = 409


class SchemaError(PacedError):
    """The data home was written by a newer (or unknown) schema."""

    code = "schema_version"
    status = 500
