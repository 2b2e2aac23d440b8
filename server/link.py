"""How a front end reaches the engine: one small interface, two implementations.

Every protocol front end (``v2.py`` over HTTP, ``grpc_v2.py`` over gRPC) sends
its infer calls through a link and never touches the engine itself:

* :class:`LocalLink` — the engine lives in this process (``--workers 0`` and
  the embedded console): the call goes straight to ``ipc.run_call``;
* :class:`CoreLink` — a front-end process (``--workers N``): calls go to the
  engine core over ``transport.py``, batched per event-loop iteration
  (``ipc.py`` gives the message format, ``core.py`` the other end).

``check`` refuses an unknown model before its body is read, with the
engine's own message (a front-end process asks the core once per name).
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any, Protocol

from modelconsole.scheduler.errors import EngineError, ModelUnavailable
from modelconsole.scheduler.textenc import TextPlan

from . import ipc, transport
from .ipc import InferAnswer, InferCall

log = logging.getLogger("modelconsole.server.link")

# Stay awake for the answer only at low load: with more calls in flight the loop is busy anyway.
AWAKE_MAX_CALLS = 2


class Link(Protocol):
    async def check(self, name: str, version: str | None) -> TextPlan | None:
        """ModelNotFound for an unknown model or version; else how it takes text, or None when
        it takes tensors only."""

    @property
    def ready(self) -> bool: ...

    async def infer(self, call: InferCall) -> InferAnswer: ...


class LocalLink:
    """The engine of this process."""

    def __init__(self, engine: Any):
        self.engine = engine

    async def check(self, name: str, version: str | None) -> TextPlan | None:
        # ModelNotFound (404) before a byte of the body is read
        plan: TextPlan | None = self.engine.instance(name, version).text_plan
        return plan

    @property
    def ready(self) -> bool:
        return bool(self.engine.accepting)

    async def infer(self, call: InferCall) -> InferAnswer:
        return await ipc.run_call(self.engine, call)


class CoreLink:
    """A front-end process's connection to the engine core.

    Calls made in one event-loop iteration leave in one message (``_flush``
    runs once, after them); answers are resolved as their message arrives.
    When the core goes away, ``fail_all`` answers every call in flight with
    503 and every later one at once: a client never waits on a core that is
    gone.
    """

    def __init__(self, address: str, spin_us: float = 0.0):
        self._end = transport.client_end(address, self._on_message, self._on_lost)
        self._awake = transport.KeepAwake(spin_us / 1e6)  # stay awake for the answer when few calls wait
        self._pending: dict[int, asyncio.Future[InferAnswer]] = {}
        self._outbox: list[tuple[int, InferCall]] = []
        self._next = 0
        self.gone: str | None = None  # why calls fail at once (the core stopped)
        # (model, version) pairs the core has, with how each takes text (None: tensors only)
        self._known: dict[tuple[str, str | None], TextPlan | None] = {}

    async def check(self, name: str, version: str | None) -> TextPlan | None:
        """ModelNotFound (the engine's own message) for a model or version the core does not have;
        else how it takes text (``Link.check``).

        A name and version the core once knew stay known here: only the first request for each
        costs a round trip (a model deleted since is answered 404 by the core's infer instead);
        an unknown one asks every time (it may have been registered since)."""
        key = (name, version)
        if key in self._known:
            return self._known[key]
        answer = await self.infer(InferCall(name, version, None, check_only=True))
        plan = TextPlan.from_dict(answer.text) if answer.text is not None else None
        self._known[key] = plan
        return plan

    @property
    def ready(self) -> bool:
        return self.gone is None

    async def start(self) -> None:
        await self._end.start()

    async def infer(self, call: InferCall) -> InferAnswer:
        if self.gone is not None:
            raise ModelUnavailable(self.gone)
        loop = asyncio.get_running_loop()
        i = self._next
        self._next += 1
        fut: asyncio.Future[InferAnswer] = loop.create_future()
        self._pending[i] = fut
        if not self._outbox:
            loop.call_soon(self._flush)
        self._outbox.append((i, call))
        try:
            return await fut
        finally:
            self._pending.pop(i, None)

    def _flush(self) -> None:
        calls, self._outbox = self._outbox, []
        if not calls:
            return
        try:
            self._end.send(ipc.pack_calls(calls))
            if len(self._pending) <= AWAKE_MAX_CALLS:
                self._awake.extend()
        except Exception as e:  # noqa: BLE001 - these calls fail, the link keeps working
            log.exception("cannot send %d calls to the engine core", len(calls))
            for i, _ in calls:
                fut = self._pending.get(i)
                if fut is not None and not fut.done():
                    fut.set_exception(EngineError(f"cannot reach the engine core: {e}"))

    def _on_message(self, frames: list[Any]) -> None:
        pending = self._pending
        for i, a in ipc.unpack_answers(frames):
            fut = pending.get(i)
            if fut is None or fut.done():
                continue  # its client went away
            if isinstance(a, EngineError):
                fut.set_exception(a)
            else:
                fut.set_result(a)

    def _on_lost(self) -> None:
        if self.gone is None:
            self.fail_all("the engine core closed the connection")

    def fail_all(self, message: str) -> None:
        """The core is gone: every call in flight, and every later one, gets a 503 now."""
        self.gone = message
        for fut in list(self._pending.values()):
            if not fut.done():
                fut.set_exception(ModelUnavailable(message))

    async def close(self) -> None:
        if self.gone is None:
            self.gone = "the front end is shutting down"
        await self._end.close()
        self.fail_all(self.gone)
