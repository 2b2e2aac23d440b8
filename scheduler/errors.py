"""The engine's error kinds: each maps to one HTTP status and one stats bucket.

Every request gets exactly one answer; when it is an error, it is one of
these, so the server can map it without guessing and the statistics can
count failures by kind.
"""

from __future__ import annotations


class EngineError(Exception):
    """Base of every error the engine answers a request or control call with."""

    status = 500
    kind = "internal"

    def __init__(self, message: str, *, retry_after: float | None = None):
        super().__init__(message)
        self.message = message
        self.retry_after = retry_after


class InputError(EngineError, ValueError):
    """The request's inputs do not match the model's declared tensors."""

    status = 400
    kind = "invalid_input"


class Forbidden(EngineError):
    """Refused by the operator's trust rules (a factory outside the model roots and the
    allowlist, an export program outside a trusted root); the message names the rule."""

    status = 403
    kind = "forbidden"


class ModelNotFound(EngineError, LookupError):
    status = 404
    kind = "not_found"


class ModelUnavailable(EngineError):
    """The model exists but cannot serve now (failed, unloading, engine closing)."""

    status = 503
    kind = "unavailable"


class QueueFull(EngineError):
    status = 503
    kind = "queue_full"


class RateLimited(EngineError):
    status = 429
    kind = "rate_limited"


class DeadlineExceeded(EngineError):
    status = 504
    kind = "deadline"


class ModelFailed(EngineError):
    """The model's forward raised; only the requests of that batch get this."""

    status = 500
    kind = "model_error"


class Conflict(EngineError):
    """A control call that contradicts the current state (e.g. already registered)."""

    status = 409
    kind = "conflict"


class RemoteError(EngineError):
    """A ``remote:`` model's server could not be reached, failed, or answered with other tensors
    than registered; the message names the remote."""

    status = 502
    kind = "remote_error"


_BY_KIND: dict[str, type[EngineError]] = {
    c.kind: c for c in (EngineError, InputError, Forbidden, ModelNotFound, ModelUnavailable, QueueFull,
                        RateLimited, DeadlineExceeded, ModelFailed, Conflict, RemoteError)
}


def from_wire(kind: str, status: int, message: str, retry_after: float | None = None) -> EngineError:
    """An error another process answered with (``kind``, ``status``, ``message``), rebuilt as
    the same kind here: the front-end processes answer it exactly as the engine core would
    have (status, message, Retry-After, the gRPC code chosen from the status)."""
    cls = _BY_KIND.get(kind)
    err = (cls or EngineError)(message, retry_after=retry_after)
    if cls is None or cls.status != status:  # a kind defined elsewhere (load_failed, insufficient_memory, ...)
        err.kind = kind
        err.status = status
    return err
