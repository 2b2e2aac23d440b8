"""Budgets on a real GPU: load, evict and reload under a budget smaller than the card,
with NVML's readings checked against the engine's accounting."""

from __future__ import annotations

import os

import torch

from modelconsole.scheduler.config import GpuConfig
from modelconsole.scheduler.engine import Engine

MiB = 2**20


def own_used(engine) -> int:
    reading = engine.backend.read(0)
    return reading.own_bytes(os.getpid())


async def test_evict_and_reload_under_a_budget_with_nvml_agreeing():
    engine = Engine(None, gpu=GpuConfig(reserve_mib=512, min_residency_s=0, host_tier_gib=2,
                                        default_device="cuda:0"))
    await engine.start()
    sub = engine.subscribe()
    try:
        assert engine.backend.kind == "nvml"
        for name in ("a", "b", "c"):
            await engine.register({"name": name, "source": "zoo:sized", "args": {"mib": 400}, "warmup": 1})
        await engine.load("a")
        # a budget that holds a and b (estimate 500 MiB) but not a third besides: measured from
        # what this process already holds (CUDA context, allocator cache, a)
        budget = engine.memory.budgets[0]
        budget.limit_bytes = own_used(engine) + 700 * MiB
        await engine.load("b")
        base = own_used(engine)
        resident = sum(engine.memory.budgets[0].reservations.values())
        # NVML sees at least what we account for (plus the context and the allocator's cache)
        assert base >= resident >= 800 * MiB
        await engine.infer("b", {"input": torch.ones(1, 16)})  # b is used, a is not
        await engine.load("c")
        states = {n: engine.instance(n).state for n in "abc"}
        assert states == {"a": "UNLOADED", "b": "READY", "c": "READY"}
        assert budget.committed(engine.backend.read(0)) <= budget.limit_bytes
        # a's memory really went back to the device (NVML), not just out of our books
        assert own_used(engine) <= base + 50 * MiB
        # a reload from the host tier lands on the GPU and answers
        await engine.unload("b")
        res = await engine.infer("a", {"input": torch.ones(2, 16)})
        assert res.outputs["output"].shape == (2, 16)
        a = engine.instance("a")
        assert a.load_source == "host tier" and str(a.device) == "cuda:0"
        assert a.footprint_bytes >= 400 * MiB
        snap = engine.snapshot()["devices"][0]
        assert snap["backend"] == "nvml" and snap["budget"]["usable_bytes"] <= budget.limit_bytes
        # every unload (the eviction of a, the unload of b) saw its memory come back: none ran
        # into the unload_wait_s bound
        kinds = []
        while not sub._queue.empty():
            kinds.append(sub._queue.get_nowait().kind)
        assert kinds.count("unloaded") >= 2 and "memory_slow" not in kinds, kinds
    finally:
        await engine.close()


async def test_the_engine_finds_itself_in_nvml_process_list():
    """Container or not, the pid the budgets count as ours is one NVML lists, holding our context."""
    engine = Engine(None, gpu=GpuConfig(default_device="cuda:0"))
    await engine.start()
    try:
        budget = engine.memory.budgets[0]
        reading = engine.backend.read(0)
        listed = {p.pid: p.used_bytes for p in reading.processes}
        assert budget.own_pid in listed, (budget.own_pid, os.getpid(), listed)
        assert reading.own_bytes(budget.own_pid) >= 100 * MiB  # at least the CUDA context
        assert not [e for e in engine.events.recent if e.kind == "memory_pid_unknown"]
    finally:
        await engine.close()
