"""The one way the tests wait: on the thing itself, polled and bounded.

A test never sleeps for a window and hopes; it polls what it waits for (the engine's own
counters, a server's answer, the console's screen) and fails, naming what never came, once
``timeout`` has passed.  The timeout is a bound for a broken build, not part of a passing run.
"""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import Callable
from typing import Any


async def until(check: Callable[[], Any], what: str = "condition", timeout: float = 30.0, *,
                pilot: Any = None) -> Any:
    """Poll ``check()`` until it is truthy; its value.  ``check`` may return an awaitable (a
    server's answer): it is awaited, and polled every 0.1 s instead of every 0.01 s.  With a
    Textual ``pilot`` the app keeps running between polls.  After ``timeout`` s: AssertionError
    naming ``what``."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        step = 0.01
        if inspect.isawaitable(value):
            value, step = await value, 0.1
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        if pilot is not None:
            await pilot.pause(max(step, 0.02))
        else:
            await asyncio.sleep(step)
