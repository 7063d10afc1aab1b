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


class ForbiddenError(PacedError):
    """The caller may not do this (e.g. ack or renew a lease another consumer holds)."""

    code = "forbidden"
    status = 403


class DamagedError(PacedError):
    """A file in the data home is unreadable (truncated, corrupt, not what its name says).
    The message names the file and what to do; the service answers 503."""

    code = "damaged_file"
    status = 503


class StorageError(PacedError):
    """The filesystem refused a read or write (full disk, read-only, permissions)."""

    code = "storage_error"
    status = 503


def storage_error(err: OSError, doing: str = "") -> StorageError:
    """One line for an OSError: what paced was doing, the path and the system's reason."""
    import errno

    path = err.filename if err.filename is not None else "?"
    reason = err.strerror or str(err)
    hints = {errno.ENOSPC: "free some space and rerun", errno.EDQUOT: "free some space and rerun",
             errno.EROFS: "the filesystem is read-only; use a writable --home",
             errno.EACCES: "check the permissions", errno.EPERM: "check the permissions"}
    hint = hints.get(err.errno)
    doing = f"{doing}: " if doing else ""
    return StorageError(f"{doing}{path}: {reason}" + (f" ({hint})" if hint else ""),
                        detail={"errno": err.errno, "reason": reason})
