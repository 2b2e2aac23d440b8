"""One audit row per control call: the decorator that writes a refused or failed call's row.

Every public control method of the engine writes its own row when it succeeds (in the
transaction that makes the change); ``audits_failures`` adds the row for a refusal or a
failure, so the audit log holds exactly one row per call either way.
"""

from __future__ import annotations

import functools
import inspect
import logging
from collections.abc import Callable
from typing import Any

from .config import ConfigError, ModelConfig
from .errors import EngineError
from .store import Store

log = logging.getLogger("modelconsole.engine")


async def audit_failure(store: Store | None, actor: str, action: str, name: Any, version: Any,
                        message: str) -> None:
    """The row of a refused or failed control call; a store that cannot write it is logged,
    never allowed to hide the call's own error."""
    if store is None:
        return
    try:
        await store.audit(str(actor), action, None if name is None else str(name)[:200],
                          None if version is None else str(version)[:32], {}, "error", message)
    except Exception:  # noqa: BLE001 - the caller must see the call's error, not the store's
        log.exception("could not write the audit row of a failed %s", action)


def audits_failures(action: str | Callable[[dict[str, Any]], str]) -> Callable[[Any], Any]:
    """A control call of the engine that fails writes one audit row with its error (to the
    engine's ``store``), then raises.  ``action`` is the row's action, or a function of the
    call's arguments."""

    def wrap(fn: Any) -> Any:
        sig = inspect.signature(fn)

        @functools.wraps(fn)
        async def run(self: Any, *args: Any, **kw: Any) -> Any:
            try:
                return await fn(self, *args, **kw)
            except Exception as e:
                bound = sig.bind(self, *args, **kw)
                bound.apply_defaults()
                a = bound.arguments
                raw = a.get("raw")
                if raw is not None:  # register: the name and version as given
                    raw = raw.to_dict() if isinstance(raw, ModelConfig) else raw
                    name, version = raw.get("name"), raw.get("version")
                else:
                    name, version = a.get("name"), a.get("version")
                message = e.message if isinstance(e, EngineError) else \
                    str(e) if isinstance(e, ConfigError) else f"{type(e).__name__}: {e}"
                await audit_failure(self.store, a.get("actor", "api"), action(a) if callable(action) else action,
                                    name, version, message)
                raise

        return run

    return wrap

