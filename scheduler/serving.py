"""Serving requests: the one path from a request, or a front end's chunk of requests, to a version's queue.

Every way in is here: ``infer`` (one request, the full path: a routed name's
arms, lazy load, rate limit), ``submit`` (one request without a coroutine: the
engine core's IPC calls), ``submit_rows`` (a front end's chunk, one queue
entry for many requests) and ``serve`` (one request on a version already
chosen: a routed arm, from ``versions.py``).  Each counts every failed answer
once, by kind, in the version's statistics, and reroutes once a version-less
request whose version went away before it ran.

It decides nothing about residency: it sees the engine through
``ServingHost`` (is it closing, which instance answers a name and version,
load one) and the router through ``Versions``.
"""

from __future__ import annotations

import asyncio
import functools
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol

from . import replicas, rows
from .errors import EngineError, InputError, ModelUnavailable
from .instance import LOADING, READY, UNLOADED, WARMING, InferResult, ModelInstance
from .memory import InsufficientMemory
from .versions import Versions

# What infer takes as a request's tensors: by name, or a function that makes them from the version
# that serves the request, called once that version is known and loaded (see Serving.infer).
Inputs = Mapping[str, Any] | Callable[[ModelInstance], Mapping[str, Any]]

# a chunk's answer: (the requests' places in the chunk, a result holding their rows, or an error)
RowsDone = Callable[[list[int], Any, BaseException | None], None]


class ServingHost(Protocol):
    """What serving needs of the engine (``engine.EngineForVersions`` implements it)."""

    @property
    def closing(self) -> bool: ...

    def instance(self, name: str, version: str | None = None) -> ModelInstance: ...

    async def ensure_loaded(self, inst: ModelInstance) -> None: ...


def _replica_for(inst: ModelInstance, req: Any) -> ModelInstance:
    """Where a version's request is queued: the version itself, or its least-loaded replica."""
    if len(inst.replica_set) == 1:
        return inst
    target = replicas.least_loaded(inst.replica_set)
    target.last_used = req.enqueued
    return target


def _one_of_rows(done: RowsDone, place: int, result: Any, error: BaseException | None) -> None:
    done([place], result, error)


class Serving:
    """The request path of one engine (``Engine.infer``, ``submit`` and ``submit_rows`` hand over here)."""

    def __init__(self, host: ServingHost, versions: Versions) -> None:
        self.host = host
        self.versions = versions
        self._reroutes: set[asyncio.Task[None]] = set()  # submit()'s reroutes in flight

    async def infer(
        self,
        name: str,
        inputs: Inputs,
        *,
        version: str | None = None,
        priority: int | None = None,
        timeout_ms: float | None = None,
        outputs: Sequence[str] | None = None,
        routing_key: str | None = None,
    ) -> InferResult:
        """Answer one request: a result, or an EngineError saying exactly what went wrong.

        A request for a registered but unloaded version loads it first (the
        request waits; requests to other models keep flowing).  Without a
        version, a name with a split (or canary) picks an arm by weight,
        sticky per ``routing_key``; an explicit version ignores the split.
        The answer's ``version`` says which version served it.

        ``inputs`` is the tensors by name, or a function that makes them from
        the ``ModelInstance`` that serves the request (called once that
        version is known and loaded, so the tensors are decoded against its
        inputs: the HTTP server's raw binary form, whose body names no
        tensor).  Either way they are validated against that version.
        """
        if self.host.closing:
            raise ModelUnavailable("the engine is shutting down")
        if version is None:
            route = self.versions.routed.get(name)
            if route is not None:
                return await self.versions.infer_routed(route, inputs, priority, timeout_ms, outputs, routing_key)
        if routing_key is not None and not isinstance(routing_key, str):
            raise InputError(f"routing_key: expected a string, got {type(routing_key).__name__}")
        inst = self.host.instance(name, version)
        try:
            return await self.serve(inst, inputs, priority, timeout_ms, outputs)
        except EngineError as e:
            if version is None and type(e) is ModelUnavailable and self.versions.moved_on(name, inst):
                return await self.versions.reroute(name, inputs, priority, timeout_ms, outputs, routing_key)
            inst.stats.fail(e.kind)  # this path's failed answer, by kind (each path counts its own, once)
            raise

    def submit(self, name: str, inputs: Mapping[str, Any], done: Callable[[Any, BaseException | None], None], *,
               version: str | None = None, priority: int | None = None, timeout_ms: float | None = None,
               outputs: Sequence[str] | None = None) -> ModelInstance | None:
        """``infer`` for the common request without a coroutine (the engine core's IPC calls).

        Returns None, having done nothing, when the request needs ``infer``'s full path: a
        name with a split or canary, a version not READY (lazy load), a rate limit, the
        engine closing.  Otherwise the serving instance: ``done(result, None)`` or
        ``done(None, error)`` is called once, on the loop, when the request is answered.
        Errors found at once (unknown model, bad input, queue full) are raised instead.
        Failures are counted in the model's stats exactly as ``infer`` counts them, and a
        version-less request whose version went away before it ran is rerouted once, as
        ``infer`` does.  One future callback per request instead of a task and three
        coroutine frames: on the engine core's loop that is most of its per-request cost.
        """
        if self.host.closing or (version is None and name in self.versions.routed):
            return None
        inst = self.host.instance(name, version)  # ModelNotFound: counted in no model's stats, as in infer
        if inst.state != READY or inst.limiter is not None:
            return None
        try:
            req, hit = self._prepare(inst, inputs, priority, timeout_ms, outputs)
            if hit is None:
                answer = _replica_for(inst, req).enqueue(req)
        except EngineError as e:
            inst.stats.fail(e.kind)
            raise
        if hit is not None:
            asyncio.get_running_loop().call_soon(done, hit, None)
            return inst

        def settle(fut: asyncio.Future[InferResult]) -> None:
            if fut.cancelled():
                return done(None, ModelUnavailable("the request was cancelled"))
            error = fut.exception()
            if error is None:
                return done(fut.result(), None)
            if isinstance(error, EngineError):
                if version is None and type(error) is ModelUnavailable and self.versions.moved_on(name, inst):
                    self._reroute_then(name, inputs, priority, timeout_ms, outputs, done)
                    return None
                inst.stats.fail(error.kind)
            return done(None, error)

        answer.add_done_callback(settle)
        return inst

    def submit_rows(self, name: str, inputs: Mapping[str, Any], parts: Sequence[int], done: RowsDone, *,
                    digests: Sequence[bytes | None] | None = None, version: str | None = None,
                    priority: int | None = None, timeout_ms: float | None = None,
                    outputs: Sequence[str] | None = None) -> bool:
        """``submit`` for a chunk: requests for one model, version, priority and timeout whose
        inputs come stacked (request ``k`` holds ``parts[k]`` rows), validated, cached and queued
        as one entry where they can be (``rows.py`` says where they are cut).

        Returns False, having done nothing, when the requests must be served one by one: as
        ``submit`` would, or a model without batching, or a request over ``max_batch_size``
        (each then gets its own answer).  Otherwise each request is answered exactly once
        through ``done(places, result, error)`` (places: indices into ``parts``; a result's
        outputs hold those requests' rows, stacked in order), on the loop.  An error that
        concerns every request (unknown model, bad input) is raised instead.  Statistics,
        cache hits, queue bounds, deadlines and failures count each request as one.
        ``digests``: each request's ``cache.input_digest`` (a front end computed them)."""
        if self.host.closing or (version is None and name in self.versions.routed):
            return False
        inst = self.host.instance(name, version)
        limit = inst.cfg.max_batch_size
        if inst.state != READY or inst.limiter is not None or not limit or not parts or \
                max(parts) > limit or min(parts) < 1:
            return False
        n = len(parts)
        total = sum(parts)
        try:
            req = inst.prepare(inputs, priority, timeout_ms, outputs, time.monotonic(), batch_limit=max(limit, total))
            if req.size != total:
                raise InputError(f"the chunk's inputs hold {req.size} rows; its requests {total}")
        except EngineError as e:
            inst.stats.fail(e.kind, n)
            raise
        req.parts, req.ids, req.count = list(parts), list(range(n)), n
        loop = asyncio.get_running_loop()
        entries = [req]
        if inst.cache is not None:
            hits = inst.cached_rows(req, digests)
            if hits:
                for k, hit in hits:
                    loop.call_soon(done, [k], hit, None)
                answered = {k for k, _ in hits}
                entries = [req.rows_of(a, b) for a, b in rows.runs([k for k in range(n) if k not in answered])]
        for whole in entries:
            for a, b in rows.pieces(whole.parts or (), limit) if whole.size > limit else ((0, whole.count),):
                entry = whole.rows_of(a, b) if (a, b) != (0, whole.count) else whole
                self._queue_rows(inst, entry, done, name, version, priority, timeout_ms, outputs)
        return True

    def _queue_rows(self, inst: ModelInstance, entry: Any, done: RowsDone, name: str, version: str | None,
                    priority: int | None, timeout_ms: float | None, outputs: Sequence[str] | None) -> None:
        """Queue one entry of a chunk; what the queue has no room for is refused (QueueFull), as
        the same requests arriving one by one would be."""
        loop = asyncio.get_running_loop()
        target = _replica_for(inst, entry)
        room = target.room()
        if room < entry.count:
            refused, full = entry.rows_of(max(room, 0), entry.count), target.full()
            inst.stats.fail(full.kind, refused.count)
            loop.call_soon(done, refused.ids, None, full)
            if room <= 0:
                return
            entry = entry.rows_of(0, room)
        try:
            fut = target.enqueue(entry)
        except EngineError as e:
            inst.stats.fail(e.kind, entry.count)
            loop.call_soon(done, entry.ids, None, e)
            return

        def settle(fut: asyncio.Future[InferResult]) -> None:
            if fut.cancelled():
                return done(entry.ids, None, ModelUnavailable("the request was cancelled"))
            error = fut.exception()
            if error is None:
                return done(entry.ids, fut.result(), None)
            if isinstance(error, EngineError):
                if version is None and type(error) is ModelUnavailable and self.versions.moved_on(name, inst):
                    stacked = {spec.name: t for spec, t in zip(inst.input_specs, entry.tensors)}
                    for k, one in zip(entry.ids, rows.part_views(stacked, entry.parts)):
                        self._reroute_then(name, one, priority, timeout_ms, outputs,
                                           functools.partial(_one_of_rows, done, k))
                    return None
                inst.stats.fail(error.kind, entry.count)
            return done(entry.ids, None, error)

        fut.add_done_callback(settle)

    def _reroute_then(self, name: str, inputs: Inputs, priority: int | None, timeout_ms: float | None,
                      outputs: Sequence[str] | None, done: Callable[[Any, BaseException | None], None]) -> None:
        async def again() -> None:
            try:
                result = await self.versions.reroute(name, inputs, priority, timeout_ms, outputs, None)
            except BaseException as e:  # noqa: BLE001 - handed to done, as infer would raise it
                done(None, e)
            else:
                done(result, None)

        task = asyncio.get_running_loop().create_task(again())
        self._reroutes.add(task)
        task.add_done_callback(self._reroutes.discard)

    async def serve(self, inst: ModelInstance, inputs: Inputs, priority: int | None, timeout_ms: float | None,
                     outputs: Sequence[str] | None, metric: str | None = None) -> InferResult:
        """One request on one version: lazy load, validation, cache, rate limit, queue.
        ``metric``: an output whose mean the answer carries (a split's arm metric)."""
        if inst.state != READY:
            if inst.state not in (UNLOADED, LOADING, WARMING):
                raise inst.unavailable()
            await self._load_for_request(inst, timeout_ms)  # lazy load, or join the one under way
        if callable(inputs):  # decoded for the version that serves it (and knows its inputs once loaded)
            inputs = inputs(inst)
        req, hit = self._prepare(inst, inputs, priority, timeout_ms, outputs, metric)
        if hit is not None:
            return hit
        if inst.limiter is not None:
            await inst.limiter.admit(req.deadline, inst.name)
        return await _replica_for(inst, req).enqueue(req)

    @staticmethod
    def _prepare(inst: ModelInstance, inputs: Mapping[str, Any], priority: int | None, timeout_ms: float | None,
                 outputs: Sequence[str] | None, metric: str | None = None) -> tuple[Any, InferResult | None]:
        """A validated request and its cached answer, if the cache has one (InputError otherwise).
        A front end may have hashed the inputs for the cache already (``inputs.digest``)."""
        req = inst.prepare(inputs, priority, timeout_ms, outputs, time.monotonic())
        req.metric = metric
        hit = inst.cached(req, getattr(inputs, "digest", None)) if inst.cache is not None else None
        return req, hit

    async def _load_for_request(self, inst: ModelInstance, timeout_ms: float | None) -> None:
        """A request's lazy load: when there is no room yet, wait for it within the request's timeout.

        No room happens when the churn guard protects young models (the
        refusal says when they mature) or busy models must drain first.  The
        request waits and tries again (at most a second apart, so room freed
        early is taken early) instead of answering 503 at once: a client that
        asked once should not have to retry, and tritonclient does not.  Past
        the timeout (the model's ``timeout_ms``, or the request's if shorter)
        the refusal is the answer, with its Retry-After.
        """
        limit_s = inst.cfg.timeout_ms / 1000.0
        if isinstance(timeout_ms, (int, float)) and not isinstance(timeout_ms, bool) and timeout_ms > 0:
            limit_s = min(limit_s, timeout_ms / 1000.0)  # a bad value is refused by prepare() after the load
        deadline = time.monotonic() + limit_s
        while True:
            try:
                await self.host.ensure_loaded(inst)
                return
            except InsufficientMemory as e:
                left = deadline - time.monotonic()
                if e.retry_after is None or left <= 0 or self.host.closing:
                    raise
                inst.waiting_for_room += 1  # in the snapshot, the console and the pending-requests gauge
                try:
                    await asyncio.sleep(min(e.retry_after, left, 1.0))
                finally:
                    inst.waiting_for_room -= 1
