"""The engine core's end of the front ends' link (``--workers N``).

One socket in a private (0700) directory (``transport.py``: a Unix stream
socket, or ZeroMQ's ROUTER) takes the calls of every front-end process
(``link.CoreLink``).
A front end's chunk (many calls for one model, their inputs stacked) goes to
``Engine.submit_rows`` whole: one validation, one queue entry, one answer
entry, whatever the number of calls in it; the engine hands it back when its
calls must be served one by one (a routed name, a rate limit, a lazy load),
and each then goes alone.  A single call goes to ``Engine.submit`` (a future
callback), or to ``engine.infer`` (``ipc.run_call``) on this process's event
loop, exactly as an HTTP request of the single-process server does, so
routing, the cache, queues, batching, stats and events are the engine's, one
owner for all.  Answers to one front end leave together, one message per
front end per loop iteration.

On a fleet's node (``cluster/core.py``) the core is given ``away``: a call for a
version this node does not hold goes there (to another node's engine core,
over Ray) instead of to this engine, and its answer comes back the same way.

A message that does not parse is dropped with a warning (at most one line a
second) and never reaches the engine; a call with bad tensors gets its 400.
Answers addressed to a front end that died are dropped (the engine still
finishes the work: nothing waits on them).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections import defaultdict
from typing import Any, Protocol

from modelconsole.scheduler.errors import EngineError

from . import ipc, transport
from .ipc import InferAnswer, InferCall, InferChunk

log = logging.getLogger("modelconsole.server.core")


class Away(Protocol):
    """Where a fleet node's core sends the calls for versions other nodes hold."""

    def elsewhere(self, model: str, version: str | None) -> bool: ...

    async def infer(self, call: InferCall) -> InferAnswer: ...


class CoreServer:
    def __init__(self, engine: Any, address: str, spin_us: float = 0.0, away: Away | None = None):
        self.engine = engine
        self.away = away
        self.address = address
        self._awake = transport.KeepAwake(spin_us / 1e6)  # after answering few calls, stay awake for the next
        self._end = transport.server_end(address, self._on_message)
        self._outbox: dict[Any, list[tuple[Any, InferAnswer | EngineError]]] = defaultdict(list)
        self._tasks: set[asyncio.Task[None]] = set()
        self._last_warning = 0.0
        self.dropped_messages = 0  # malformed messages (a test reads it)
        self.calls = 0  # infer calls (the tests read these)
        self.checks = 0
        self.chunks = 0  # chunks of calls taken whole or cut into calls
        self.messages = 0

    async def start(self) -> None:
        await self._end.start()

    def _on_message(self, peer: Any, frames: list[Any]) -> None:
        self.messages += 1
        if len(frames) <= 3:  # a call or two: its answer comes back from a worker thread soon
            self._awake.extend()
        try:
            calls = ipc.unpack_calls(frames)
        except Exception as e:  # noqa: BLE001 - nothing in a message may stop the core
            self._drop(e)
            return
        away = self.away
        for i, call in calls:
            if isinstance(call, EngineError):
                self._answer(peer, i, call)
            elif away is not None and not getattr(call, "check_only", False) and away.elsewhere(call.model,
                                                                                                call.version):
                for j, one in (zip(call.ids, call.calls()) if isinstance(call, InferChunk) else ((i, call),)):
                    self._spawn(self._forward(peer, j, one))
            elif isinstance(call, InferChunk):
                self._start_chunk(peer, i, call)
            else:
                self._start(peer, i, call)

    def _start_chunk(self, peer: Any, key: ipc.Rows, chunk: InferChunk) -> None:
        """A chunk goes to the engine whole (``Engine.submit_rows``: one validation, one queue
        entry, one answer); where the engine serves its calls one by one, each goes alone."""
        self.chunks += 1
        taken = self._offer(peer, key, chunk.model, lambda: self.engine.submit_rows(
            chunk.model, chunk.inputs, chunk.parts, functools.partial(self._rows_done, peer, key),
            digests=chunk.digests, version=chunk.version, priority=chunk.priority, timeout_ms=chunk.timeout_ms,
            outputs=chunk.outputs))
        if taken:
            self.calls += len(chunk.ids)
            return
        for i, call in zip(chunk.ids, chunk.calls()):
            self._start(peer, i, call)

    def _start(self, peer: Any, i: int, call: InferCall) -> None:
        if call.check_only:
            self.checks += 1  # a front end's first sight of a model (link.check), not a request
        else:
            self.calls += 1
        if call.raw is None and not call.check_only and self._offer(peer, i, call.model, lambda: self.engine.submit(
                call.model, ipc.call_inputs(call), functools.partial(self._done, peer, i), version=call.version,
                priority=call.priority, timeout_ms=call.timeout_ms, outputs=call.outputs) is not None):
            return  # the common request: a future callback, no task (Engine.submit)
        self._spawn(self._run(peer, i, call))  # the full path (engine.infer)

    def _spawn(self, work: Any) -> None:
        task = asyncio.get_running_loop().create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _offer(self, peer: Any, key: Any, model: str, submit: Any) -> bool:
        """Hand a call or chunk to the engine's fast path: True when it is taken or answered
        (an error found at once), False when it needs the full path."""
        try:
            return bool(submit())
        except EngineError as e:
            self._answer(peer, key, e)
        except Exception:  # noqa: BLE001 - one call's failure, answered
            log.exception("unhandled error in a front end's infer call for '%s'", model)
            self._answer(peer, key, EngineError("internal error (logged by the engine core)"))
        return True

    def _drop(self, e: Exception) -> None:
        self.dropped_messages += 1
        now = time.monotonic()
        if now - self._last_warning >= 1.0:
            self._last_warning = now
            log.warning("dropped a malformed message from a front end (%s); %d so far", e, self.dropped_messages)

    async def _run(self, peer: Any, i: int, call: InferCall) -> None:
        try:
            answer: InferAnswer | EngineError = await ipc.run_call(self.engine, call)
        except EngineError as e:
            answer = e
        except Exception:  # noqa: BLE001 - one call's failure, answered; the core keeps serving
            log.exception("unhandled error in a front end's infer call for '%s'", call.model)
            answer = EngineError("internal error (logged by the engine core)")
        self._answer(peer, i, answer)

    async def _forward(self, peer: Any, i: int, call: InferCall) -> None:
        """A call for a version another node holds: sent there (``away``), answered from there."""
        assert self.away is not None
        self.calls += 1
        try:
            answer: InferAnswer | EngineError = await self.away.infer(call)
        except EngineError as e:
            answer = e
        except Exception:  # noqa: BLE001 - one call's failure, answered
            log.exception("unhandled error forwarding a call for '%s'", call.model)
            answer = EngineError("internal error (logged by the engine core)")
        self._answer(peer, i, answer)

    def _done(self, peer: Any, i: Any, result: Any, error: BaseException | None) -> None:
        if error is None:
            try:
                answer: InferAnswer | EngineError = ipc.to_answer(self.engine, result)
            except Exception as e:  # noqa: BLE001
                error = e
        if error is not None:
            if isinstance(error, EngineError):
                answer = error
            else:
                log.error("a front end's infer call failed: %s: %s", type(error).__name__, error)
                answer = EngineError("internal error (logged by the engine core)")
        self._answer(peer, i, answer)

    def _rows_done(self, peer: Any, key: ipc.Rows, places: list[int], result: Any, error: BaseException | None) -> None:
        """Some of a chunk's calls answered at once (``places`` in the chunk): one answer entry."""
        if len(places) == 1:
            return self._done(peer, key.ids[places[0]], result, error)
        if len(places) == len(key.ids):
            sub = key
        else:
            sub = ipc.Rows([key.ids[k] for k in places], [key.parts[k] for k in places])
        self._done(peer, sub, result, error)

    def _answer(self, peer: Any, i: Any, answer: InferAnswer | EngineError) -> None:
        if not self._outbox:
            asyncio.get_running_loop().call_soon(self._flush)
        self._outbox[peer].append((i, answer))

    def _flush(self) -> None:
        outbox, self._outbox = self._outbox, defaultdict(list)
        if len(outbox) == 1 and len(next(iter(outbox.values()))) <= 2:
            self._awake.extend()  # requests one at a time: the next is likely near, stay awake for it
        for peer, answers in outbox.items():
            try:
                self._end.send(peer, ipc.pack_answers(answers))
            except Exception:  # noqa: BLE001 - a bug: its calls get a 500 rather than no answer
                log.exception("cannot send %d answers to a front end", len(answers))
                failed = [(i, EngineError("internal error: the answer could not be sent (logged by the engine "
                                          "core)")) for i, _ in answers]
                self._end.send(peer, ipc.pack_answers(failed))

    async def close(self) -> None:
        await self._end.close()
