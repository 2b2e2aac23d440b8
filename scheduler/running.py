"""The engines running in this process, newest last, with their event loops.

``modelconsole.client``'s ``Model`` without a URL calls the newest.  This module imports
nothing heavy, so a client can ask whether an engine runs here without loading torch.
"""

from __future__ import annotations

import asyncio
from typing import Any

_RUNNING: list[tuple[Any, asyncio.AbstractEventLoop]] = []


def add(engine: Any, loop: asyncio.AbstractEventLoop) -> None:
    _RUNNING.append((engine, loop))


def remove(engine: Any) -> None:
    _RUNNING[:] = [(e, lp) for e, lp in _RUNNING if e is not engine]


def running() -> tuple[Any, asyncio.AbstractEventLoop] | None:
    """The newest engine of this process still running, and its loop; None when there is none."""
    return _RUNNING[-1] if _RUNNING else None
