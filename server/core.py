"""The engine core's end of the front ends' link (``--workers N``).

One ZeroMQ ROUTER socket, bound to an ``ipc://`` path in a private (0700)
directory, takes the calls of every front-end process (``link.ZmqLink``).
Each call becomes one ``engine.infer`` (``ipc.run_call``) on this process's
event loop, exactly as an HTTP request of the single-process server does, so
routing, the cache, queues, batching, stats and events are the engine's, one
owner for all.  Answers to one front end leave together, one message per
front end per loop iteration.

A message that does not parse is dropped with a warning (at most one line a
second) and never reaches the engine; a call with bad tensors gets its 400.
Answers addressed to a front end that died are dropped by the ROUTER socket
(the engine still finishes the work: nothing waits on them).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import defaultdict
from typing import Any

from modelconsole.scheduler.errors import EngineError

from . import ipc
from .ipc import InferAnswer, InferCall

log = logging.getLogger("modelconsole.server.core")


class CoreServer:
    def __init__(self, engine: Any, address: str):
        import zmq
        import zmq.asyncio

        self.engine = engine
        self.address = address
        self._ctx = zmq.asyncio.Context()
        self._sock = self._ctx.socket(zmq.ROUTER)
        self._sock.setsockopt(zmq.LINGER, 0)
        self._sock.setsockopt(zmq.SNDHWM, 0)
        self._sock.setsockopt(zmq.RCVHWM, 0)
        self._sock.bind(address)
        self._outbox: dict[bytes, list[tuple[int, InferAnswer | EngineError]]] = defaultdict(list)
        self._tasks: set[asyncio.Task[None]] = set()
        self._reader: asyncio.Task[None] | None = None
        self._last_warning = 0.0
        self.dropped_messages = 0  # malformed messages (a test reads it)
        self.calls = 0
        self.messages = 0

    def start(self) -> None:
        self._reader = asyncio.get_running_loop().create_task(self._read())

    async def _read(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            frames = await self._sock.recv_multipart(copy=False)
            self.messages += 1
            try:
                if len(frames) < 2:
                    raise ipc.ProtocolError("no header frame")
                ident = frames[0].bytes
                calls = ipc.unpack_calls(frames[1:])
            except Exception as e:  # noqa: BLE001 - nothing in a message may stop this loop
                self._drop(e)
                continue
            for i, call in calls:
                if isinstance(call, EngineError):
                    self._answer(ident, i, call)
                    continue
                self.calls += 1
                task = loop.create_task(self._run(ident, i, call))
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)

    def _drop(self, e: Exception) -> None:
        self.dropped_messages += 1
        now = time.monotonic()
        if now - self._last_warning >= 1.0:
            self._last_warning = now
            log.warning("dropped a malformed message from a front end (%s); %d so far", e, self.dropped_messages)

    async def _run(self, ident: bytes, i: int, call: InferCall) -> None:
        try:
            answer: InferAnswer | EngineError = await ipc.run_call(self.engine, call)
        except EngineError as e:
            answer = e
        except Exception:  # noqa: BLE001 - one call's failure, answered; the core keeps serving
            log.exception("unhandled error in a front end's infer call for '%s'", call.model)
            answer = EngineError("internal error (logged by the engine core)")
        self._answer(ident, i, answer)

    def _answer(self, ident: bytes, i: int, answer: InferAnswer | EngineError) -> None:
        if not self._outbox:
            asyncio.get_running_loop().call_soon(self._flush)
        self._outbox[ident].append((i, answer))

    def _flush(self) -> None:
        outbox, self._outbox = self._outbox, defaultdict(list)
        for ident, answers in outbox.items():
            try:
                frames = ipc.pack_answers(answers)
                self._sock.send_multipart([ident, *frames], copy=False)
            except Exception:  # noqa: BLE001 - a bug: its calls get a 500 rather than no answer
                log.exception("cannot send %d answers to a front end", len(answers))
                failed = [(i, EngineError("internal error: the answer could not be sent (logged by the engine "
                                          "core)")) for i, _ in answers]
                self._sock.send_multipart([ident, *ipc.pack_answers(failed)])

    async def close(self) -> None:
        if self._reader is not None:
            self._reader.cancel()
            try:
                await self._reader
            except (asyncio.CancelledError, Exception):  # noqa: BLE001
                pass
        self._sock.close(0)
        self._ctx.term()
