"""Per-model rate limits on top of asyncio-throttle.

``Throttler(rate_limit=burst, period=burst/rps)`` admits at most ``burst``
requests in any window of ``burst/rps`` seconds: ``rps`` on average, bursts
up to ``burst``.  What asyncio-throttle lacks is an answer to "how long
would this request wait?", which we need to refuse at once (429) a request
that would wait past its deadline instead of letting it sit.  ``wait_for``
estimates that from the throttler's window and the callers already waiting.

The common case (a free slot, nobody waiting) admits synchronously: no
coroutine, no sleep.
"""

from __future__ import annotations

import time

from asyncio_throttle import Throttler

from .errors import RateLimited


class RateLimit:
    def __init__(self, rps: float, burst: int):
        self.rps = rps
        self.burst = burst
        self._throttler = Throttler(rate_limit=burst, period=burst / rps, retry_interval=min(0.01, 1 / rps))
        self.waiting = 0
        self.refused = 0

    def wait_for(self, now: float) -> float:
        """Seconds until a new request would be admitted (0: now)."""
        t = self._throttler
        t.flush()
        log = t._task_logs  # the admission times inside the current window
        position = len(log) + self.waiting - t.rate_limit  # how many must leave the window first
        if position < 0:
            return 0.0
        if position < len(log):
            return max(0.0, log[position] + t.period - now)
        # more waiters than the window holds: they are admitted at rps
        return t.period + (position - len(log) + 1) / self.rps

    def try_admit(self, now: float) -> bool:
        """Admit at once if a slot is free and nobody is ahead; False otherwise."""
        t = self._throttler
        if self.waiting == 0:
            t.flush()
            if len(t._task_logs) < t.rate_limit:
                t._task_logs.append(now)
                return True
        return False

    async def admit(self, deadline: float, model: str) -> None:
        """Wait for a slot, or raise RateLimited at once if it would come after deadline."""
        now = time.monotonic()
        if self.try_admit(now):
            return
        wait = self.wait_for(now)
        if now + wait >= deadline:
            self.refused += 1
            raise RateLimited(
                f"model {model} is rate limited to {self.rps:g} requests/s (burst {self.burst}); "
                f"a slot frees in {wait * 1000:.0f} ms, after this request's deadline",
                retry_after=wait,
            )
        self.waiting += 1
        try:
            await self._throttler.acquire()
        finally:
            self.waiting -= 1

    def to_dict(self) -> dict:
        return {"rps": self.rps, "burst": self.burst, "waiting": self.waiting, "refused": self.refused}
