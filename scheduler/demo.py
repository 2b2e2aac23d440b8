"""``modelconsole --demo``: a built-in traffic generator, so a new user sees a live system at once.

Requests go through the in-process engine (``Engine.infer``) exactly as a
client's would, spread over the registered models with Zipf weights (the
first model busiest), Poisson arrivals at ``rate`` requests per second in
all.  The console changes ``rate`` live (halve / double).  Inputs are made
once per model version (``random_tensor`` of its declared inputs) and
reused; a model that cannot be fed (unknown specs, failed) is skipped.

Errors are counted, never raised: a demo that hits a queue limit or an
unloaded model is showing the operator something real.

It lives with the engine (it needs it, hence torch); embedded mode starts it
and hands the console the object, whose ``rate`` the console sets.
"""

from __future__ import annotations

import asyncio
import random
from collections import Counter
from typing import Any

MAX_RATE = 5000.0
MIN_RATE = 0.5


class DemoTraffic:
    def __init__(self, engine: Any, rate: float = 20.0, seed: int = 0):
        self.engine = engine
        self._rate = float(rate)
        self.sent = 0
        self.ok = 0
        self.errors: Counter[str] = Counter()
        self._rng = random.Random(seed)
        self._inputs: dict[tuple[str, str], dict[str, Any]] = {}
        self._task: asyncio.Task | None = None
        self._pending: set[asyncio.Task] = set()

    @property
    def rate(self) -> float:
        return self._rate

    @rate.setter
    def rate(self, value: float) -> None:
        self._rate = min(MAX_RATE, max(MIN_RATE, float(value)))

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="demo-traffic")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        for t in list(self._pending):
            t.cancel()
        await asyncio.gather(*self._pending, return_exceptions=True)

    def _targets(self) -> list[dict[str, Any]]:
        return [s for s in self.engine.snapshot_models() if s["active"] and s["state"] != "FAILED" and s["inputs"]]

    def _input(self, snap: dict[str, Any]) -> dict[str, Any] | None:
        key = (snap["name"], snap["version"])
        if key not in self._inputs:
            from modelconsole.scheduler.tensors import TensorSpec, random_tensor

            try:
                specs = [TensorSpec(i["name"], i["datatype"], tuple(i["shape"])) for i in snap["inputs"]]
                self._inputs[key] = {s.name: random_tensor(s) for s in specs}
            except (KeyError, ValueError, TypeError):
                return None
        return self._inputs[key]

    async def _one(self, name: str, inputs: dict[str, Any]) -> None:
        try:
            await self.engine.infer(name, inputs)
            self.ok += 1
        except Exception as e:  # noqa: BLE001 - counted and shown, never raised
            self.errors[getattr(e, "kind", type(e).__name__)] += 1

    async def _run(self) -> None:
        targets: list[dict[str, Any]] = []
        refresh = 0
        while True:
            await asyncio.sleep(self._rng.expovariate(self._rate))
            if refresh <= 0 or not targets:  # the model list changes rarely: look again every 50 requests
                targets = self._targets()
                refresh = 50
            refresh -= 1
            if not targets:
                continue
            weights = [1.0 / (k + 1) for k in range(len(targets))]
            snap = self._rng.choices(targets, weights)[0]
            inputs = self._input(snap)
            if inputs is None:
                continue
            self.sent += 1
            task = asyncio.get_running_loop().create_task(self._one(snap["name"], inputs))
            self._pending.add(task)
            task.add_done_callback(self._pending.discard)
