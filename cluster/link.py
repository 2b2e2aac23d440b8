"""A fleet front end's link to the engine cores (``server/link.py``'s interface).

Each infer call goes to an engine core holding the version it asks for (or,
for a name without a version, its active version): the holder with the least
outstanding work (``placement.pick``: what this front end has in flight
there plus what the core last reported queued).  On a miss, the controller
places the version (``placement.place``) and the call goes to the first node it
names, whose engine core loads it lazily.  Splits, canaries and sticky routing
keys are decided by the engine core that takes the call, with the same
weights on every core (the controller gives them all the same record), and
``routing.sticky_u`` gives a key the same arm everywhere.

Calls to one core made in one event-loop iteration leave in one Ray call
(``EngineCore.call``), as ``server/ipc.py`` frames.  When a core is gone (its
node died), every call it held is sent once more to another holder or a new
placement; a call that fails that way twice is answered 503 with Retry-After.
No call is left without an answer.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import defaultdict
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

from modelconsole.scheduler.errors import EngineError, ModelNotFound, ModelUnavailable
from modelconsole.scheduler.textenc import TextPlan
from modelconsole.server import ipc
from modelconsole.server.ipc import InferAnswer, InferCall

from . import placement, rayenv

log = logging.getLogger("modelconsole.cluster.link")

REFRESH_S = 0.5  # how often the routing table is read from the controller
RETRY_AFTER_S = 1.0


class CoreGone(Exception):
    """The engine core (or its node) went away with the call."""


class ClusterLink:
    def __init__(self, table: Callable[[], Awaitable[dict[str, Any]]],
                 place: Callable[[str, str | None, list[str]], Coroutine[Any, Any, list[str]]]):
        self._read_table = table
        self._place = place
        self.table: dict[str, Any] = {"cores": {}, "models": {}, "outstanding": {}}
        self._in_flight: dict[str, int] = defaultdict(int)  # node -> calls from here not yet answered
        self._outbox: dict[str, list[tuple[InferCall, asyncio.Future[Any]]]] = defaultdict(list)
        self._gone: dict[str, float] = {}  # node -> when its core failed a call (skipped until a refresh drops it)
        self._refresher: asyncio.Task[None] | None = None
        self._placing: dict[tuple[Any, ...], asyncio.Task[list[str]]] = {}
        self._refreshed = 0.0
        self.retried = 0  # calls sent a second time after their core went away (a test reads it)

    async def start(self) -> None:
        await self.refresh()
        self._refresher = asyncio.get_running_loop().create_task(self._refresh_loop())

    async def refresh(self) -> None:
        try:
            self.table = await self._read_table()
            self._refreshed = time.monotonic()
            for node in list(self._gone):
                if node not in self.table["cores"]:
                    del self._gone[node]
        except Exception as e:  # noqa: BLE001 - the controller restarting: keep the last table
            log.warning("routing table not refreshed: %s", e)

    async def _refresh_loop(self) -> None:
        while True:
            await asyncio.sleep(REFRESH_S)
            await self.refresh()

    # ------------------------------------------------------------ server/link.py's interface

    @property
    def ready(self) -> bool:
        return bool(self.table["cores"])

    def _registered(self, name: str, version: str | None) -> bool:
        model = self.table["models"].get(name)
        return model is not None and (version is None or version in model["versions"])

    async def check(self, name: str, version: str | None) -> TextPlan | None:
        """ModelNotFound, with the engine's own message, for a name or version not registered.
        Text is tokenized where a node's own front ends meet its core (``server/link.py``): the
        fleet's forwarding path carries tensors only (None)."""
        if self._registered(name, version):
            return None
        await self.refresh()  # registered since the last refresh?
        model = self.table["models"].get(name)
        if model is None:
            raise ModelNotFound(f"unknown model '{name}'")
        if version is not None and version not in model["versions"]:
            known = ", ".join(sorted(model["versions"], key=int))
            raise ModelNotFound(f"model '{name}' has no version '{version}' (versions: {known})")
        return None

    async def infer(self, call: InferCall) -> InferAnswer:
        if not self._registered(call.model, call.version):  # HTTP checked before the body; gRPC did not
            await self.check(call.model, call.version)
        tried: list[str] = []
        for _ in range(2):
            node = await self._choose(call, tried)
            if node is None:
                break
            try:
                return await self._send(node, call)
            except CoreGone:
                tried.append(node)
                self._gone[node] = time.monotonic()
                self.retried += 1
                log.warning("engine core on node %s is gone; sending the call for %s elsewhere", node, call.model)
        where = f" (tried {', '.join(tried)})" if tried else ""
        raise ModelUnavailable(f"model '{call.model}': no engine core could take the request{where}; retry",
                               retry_after=RETRY_AFTER_S)

    # ------------------------------------------------------------ routing

    def holders(self, name: str, version: str | None) -> list[tuple[str, int]]:
        model = self.table["models"].get(name)
        if model is None:
            return []
        v = version if version is not None else model["active"]
        nodes = model["holders"].get(v, [])
        if version is None and model.get("routed"):  # a split: any node holding one of its versions
            nodes = sorted({n for held in model["holders"].values() for n in held})
        reported = self.table["outstanding"]
        return [(n, self._in_flight[n] + reported.get(n, 0)) for n in nodes
                if n in self.table["cores"] and n not in self._gone]

    async def _choose(self, call: InferCall, tried: list[str]) -> str | None:
        node = placement.pick(self.holders(call.model, call.version), tried)
        if node is not None:
            return node
        # concurrent misses for one version share one placement (as lazy loads share one load)
        key = (call.model, call.version, tuple(sorted(tried + list(self._gone))))
        task = self._placing.get(key)
        if task is None:
            task = asyncio.get_running_loop().create_task(self._place(call.model, call.version, list(key[2])))
            self._placing[key] = task
            task.add_done_callback(lambda _: self._placing.pop(key, None))
        try:
            nodes = await asyncio.shield(task)
        except Exception as e:  # noqa: BLE001 - the controller is restarting
            log.warning("placement of %s failed: %s", call.model, e)
            return None
        nodes = [n for n in nodes if n in self.table["cores"] or await self._known(n)]
        return nodes[0] if nodes else None

    async def _known(self, node: str) -> bool:
        await self.refresh()
        return node in self.table["cores"]

    # ------------------------------------------------------------ sending

    async def _send(self, node: str, call: InferCall) -> InferAnswer:
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        box = self._outbox[node]
        if not box:
            asyncio.get_running_loop().call_soon(self._flush, node)
        box.append((call, fut))
        self._in_flight[node] += 1
        try:
            answer = await fut
        finally:
            self._in_flight[node] -= 1
        if isinstance(answer, EngineError):
            raise answer
        return answer

    def _flush(self, node: str) -> None:
        batch = self._outbox.pop(node, [])
        if batch:
            asyncio.get_running_loop().create_task(self._deliver(node, batch))

    async def _deliver(self, node: str, batch: list[tuple[InferCall, asyncio.Future[Any]]]) -> None:
        core = self.table["cores"].get(node)
        try:
            if core is None:
                raise CoreGone(node)
            frames = ipc.pack_calls([(i, c) for i, (c, _) in enumerate(batch)])
            answers = dict(ipc.unpack_answers(await core.call.remote([bytes(f) for f in frames])))
        except Exception as e:  # noqa: BLE001 - every call of the batch gets an answer or a retry
            gone = isinstance(e, CoreGone) or rayenv.is_actor_gone(e)
            if not gone:
                log.error("infer calls to node %s failed: %s: %s", node, type(e).__name__, e)
            for _, fut in batch:
                if not fut.done():
                    if gone:
                        fut.set_exception(CoreGone(node))
                    else:
                        fut.set_result(EngineError(f"internal error: the engine core on node {node} did not "
                                                   "answer (logged by the front end)"))
            return
        for i, (_, fut) in enumerate(batch):
            if not fut.done():
                fut.set_result(answers.get(i, EngineError("internal error: no answer for the call")))

    async def close(self) -> None:
        if self._refresher is not None:
            self._refresher.cancel()


def controller_link() -> ClusterLink:
    """A link whose routing table and placements come from the fleet's controller (a node's
    front end, and its engine core for the calls it sends on)."""
    import ray

    controller = ray.get_actor(rayenv.CONTROLLER, namespace=rayenv.NAMESPACE)

    async def table() -> dict[str, Any]:
        return await controller.table.remote()

    async def place(name: str, version: str | None, exclude: list[str]) -> list[str]:
        return await controller.place.remote(name, version, exclude)

    return ClusterLink(table, place)
