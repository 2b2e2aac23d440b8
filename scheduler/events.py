"""Discrete engine events (loaded, unloaded, failed, ...) and their fan-out.

Subscribers (the console in-process, the server's event stream) each get a
bounded queue.  A slow subscriber loses its oldest events, never blocks the
engine: the engine must not wait on a terminal that stopped reading.  The
number lost is reported on the next event it receives.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Event:
    kind: str  # e.g. "registered", "loading", "loaded", "unloaded", "load_failed", "model_error"
    message: str
    model: str | None = None
    version: str | None = None
    level: str = "info"  # info | warning | error
    data: dict[str, Any] = field(default_factory=dict)
    ts: float = field(default_factory=time.time)
    seq: int = 0

    def to_dict(self) -> dict[str, Any]:
        """A JSON-able dict; ``data`` is copied one level (nested values, e.g. a canary's dict, are
        shared: an event is a record, read and serialized, never changed).

        Built by hand, not ``dataclasses.asdict``: every snapshot converts
        the last 100 events, and asdict's recursive deep copy was a third of
        the console's refresh (bench/console.py)."""
        return {"kind": self.kind, "message": self.message, "model": self.model, "version": self.version,
                "level": self.level, "data": dict(self.data), "ts": self.ts, "seq": self.seq}


class Subscription:
    """An async iterator of events; use as a context manager to unsubscribe."""

    def __init__(self, bus: EventBus, maxsize: int):
        self._bus = bus
        self._queue: asyncio.Queue[Event] = asyncio.Queue(maxsize)
        self.dropped = 0

    def _put(self, event: Event) -> None:
        if self._queue.full():
            self._queue.get_nowait()
            self.dropped += 1
        self._queue.put_nowait(event)

    async def get(self) -> Event:
        return await self._queue.get()

    def __aiter__(self) -> Subscription:
        return self

    async def __anext__(self) -> Event:
        return await self._queue.get()

    def close(self) -> None:
        self._bus._subs.discard(self)

    def __enter__(self) -> Subscription:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


class EventBus:
    """Publishes events to every subscriber and keeps the last few for late joiners."""

    def __init__(self, history: int = 500):
        self._subs: set[Subscription] = set()
        self._seq = itertools.count(1)
        self.recent: deque[Event] = deque(maxlen=history)

    def publish(self, kind: str, message: str, **kw: Any) -> Event:
        event = Event(kind, message, seq=next(self._seq), **kw)
        self.recent.append(event)
        for sub in list(self._subs):
            sub._put(event)
        return event

    def subscribe(self, maxsize: int = 1000) -> Subscription:
        sub = Subscription(self, maxsize)
        self._subs.add(sub)
        return sub
