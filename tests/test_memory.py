"""GPU memory management on the simulated backend: budgets, placement, eviction, keep-alive, pins, OOM."""

from __future__ import annotations

import asyncio
import os
import time

import pytest
import torch
from waiting import until

from modelconsole.gpu.devices import own_pid_from
from modelconsole.scheduler.instance import LoadFailed
from modelconsole.scheduler.memory import InsufficientMemory

MiB = 2**20


def sized(name, mib=32, **kw):
    cfg = {"name": name, "source": "zoo:sized", "args": {"mib": mib}, "warmup": 0, "device": "auto"}
    cfg.update(kw)
    return cfg


def one(x=1.0):
    return {"input": torch.full((1, 16), x)}


def events_of(sub):
    out = []
    while not sub._queue.empty():
        out.append(sub._queue.get_nowait())
    return out


async def test_load_is_placed_reserved_and_charged(make_engine):
    eng, backend = await make_engine((256,))
    await eng.register(sized("a", 64))
    await eng.load("a")
    inst = eng.instance("a")
    assert inst.device_index == 0
    assert backend.allocations(0)["a:1"] == inst.footprint_bytes >= 64 * MiB
    budget = eng.memory.budgets[0]
    assert budget.reservations == {"a:1": inst.footprint_bytes}  # measured replaced the estimate
    dev = eng.snapshot()["devices"][0]
    assert dev["budget"]["reserved_bytes"] == inst.footprint_bytes and dev["models"] == ["a:1"]
    await eng.unload("a")
    assert budget.reservations == {} and backend.allocations(0) == {}
    assert inst.learned_footprint >= 64 * MiB  # the next load reserves what was measured


async def test_other_processes_memory_is_subtracted(make_engine):
    eng, backend = await make_engine((256,))
    backend.set_other_process(0, 160 * MiB)
    await eng.register(sized("big", 128))
    with pytest.raises(InsufficientMemory, match="needs about .* GiB") as err:
        await eng.load("big")
    assert err.value.status == 503
    assert "device 0" in err.value.message
    backend.set_other_process(0, 0)  # the other process went away: now it fits
    await eng.load("big")
    assert eng.instance("big").state == "READY"


async def test_eviction_takes_the_lowest_keep_value_first(make_engine):
    eng, _ = await make_engine((256,))
    for name in ("hot", "warm", "cold"):
        await eng.register(sized(name, 64))
        await eng.load(name)
    # measured traffic: hot gets many requests, warm a few, cold none
    for _ in range(40):
        await eng.infer("hot", one())
    for _ in range(5):
        await eng.infer("warm", one())
    loop_now = asyncio.get_running_loop().time()
    for inst in (eng.instance(n) for n in ("hot", "warm", "cold")):
        inst.tick(loop_now)
    sub = eng.subscribe()
    await eng.register(sized("new", 64))
    await eng.load("new")
    states = {n: eng.instance(n).state for n in ("hot", "warm", "cold", "new")}
    assert states["cold"] == "UNLOADED" and states["hot"] == "READY" and states["new"] == "READY"
    snap = {m["name"]: m for m in eng.snapshot()["models"]}
    assert snap["hot"]["eviction"]["keep_value"] > snap["warm"]["eviction"]["keep_value"]
    assert snap["hot"]["eviction"]["request_rate"] > 0 and snap["cold"]["eviction"] is None
    evicted = [e for e in events_of(sub) if e.kind == "evicted"]
    assert evicted and evicted[0].model == "cold" and "to make room for new:1" in evicted[0].message
    assert sum(eng.memory.budgets[0].reservations.values()) <= 256 * MiB


async def test_pinned_and_busy_models_are_never_evicted(make_engine):
    eng, _ = await make_engine((200,))
    await eng.register(sized("pinned", 64))
    await eng.register(sized("other", 64))
    await eng.load("pinned")
    await eng.load("other")
    await eng.pin("pinned")
    await eng.register(sized("third", 64))
    await eng.load("third")  # evicts "other", never "pinned"
    assert eng.instance("pinned").state == "READY" and eng.instance("other").state == "UNLOADED"
    await eng.register(sized("fourth", 64))
    third = eng.instance("third")
    third._batches = 1  # work in flight: not a candidate either
    try:
        with pytest.raises(InsufficientMemory, match=r"2 resident \(1 pinned, 1 busy\)"):
            await eng.load("fourth")
    finally:
        third._batches = 0
    assert eng.instance("pinned").state == "READY" and third.state == "READY"


async def test_placement_spreads_over_two_devices_and_honours_a_pinned_device(make_engine):
    eng, backend = await make_engine((256, 256))
    await eng.register(sized("a", 64))
    await eng.register(sized("b", 64))
    await eng.register(sized("c", 32, device="cuda:1"))
    await eng.load("a")
    await eng.load("b")
    await eng.load("c")
    assert {eng.instance("a").device_index, eng.instance("b").device_index} == {0, 1}
    assert eng.instance("c").device_index == 1
    assert set(backend.allocations(1)) >= {"c:1"}
    res = await eng.infer("c", one())
    assert res.outputs["output"].shape == (1, 16)


async def test_unload_waits_until_the_device_shows_memory_back(make_engine):
    eng, backend = await make_engine((256,), free_delay_s=0.3, unload_wait_s=5)
    await eng.register(sized("a", 64))
    await eng.load("a")
    footprint = eng.instance("a").footprint_bytes
    await eng.unload("a")
    # the reservation was released only once the reading no longer showed the bytes
    reading = backend.read(0)
    assert reading.own_bytes(eng.memory.budgets[0].own_pid) < footprint * 0.25
    assert eng.memory.budgets[0].reservations == {}


def test_own_pid_is_ours_when_listed_else_the_one_that_appeared():
    assert own_pid_from(100, set(), {100, 7}) == 100  # no container: our own pid is listed
    assert own_pid_from(100, {7}, {7, 90001}) == 90001  # container: the host pid our context brought
    assert own_pid_from(100, {7, 90001}, {7, 90001}) is None  # context opened before: cannot tell
    assert own_pid_from(100, {7}, {7, 90001, 90002}) is None  # two appeared at once: cannot tell


async def test_in_a_container_our_memory_is_ours_not_another_process(make_engine):
    """The device lists us under a host pid: found when the contexts open, so our memory is
    neither counted twice (as another process's) nor waited for at every unload."""
    host_pid = 4_000_000  # above Linux's pid_max: never a pid of this machine
    eng, backend = await make_engine((256,), free_delay_s=0.2, unload_wait_s=5,
                                     backend_kw={"reported_pid": host_pid, "context_bytes": 16 * MiB})
    budget = eng.memory.budgets[0]
    assert budget.own_pid == host_pid != os.getpid()
    await eng.register(sized("a", 64))
    await eng.load("a")
    reading = backend.read(0)
    assert reading.other_processes_bytes(budget.own_pid) == 0  # our context and model are ours
    assert budget.usable(reading) == 256 * MiB  # not shrunk by what we hold
    sub = eng.subscribe()
    t = time.monotonic()
    await eng.unload("a")
    assert time.monotonic() - t < 3  # waited for the late free (0.2 s), not the 5 s bound
    assert not [e for e in events_of(sub) if e.kind == "memory_slow"]
    assert budget.reservations == {}


async def test_a_free_already_shown_before_release_is_not_waited_for(make_engine):
    """On a real GPU the free (empty_cache) returns the memory before the release runs: the wait
    counts from the usage read before the free, so it ends at once instead of at its bound."""
    eng, backend = await make_engine((256,), unload_wait_s=5)
    await eng.register(sized("a", 64))
    await eng.load("a")
    inst = eng.instance("a")
    index, freed = inst.device_index, inst.footprint_bytes
    before = eng.memory.own_used(index)
    backend.release(index, inst.key)  # the device shows the memory back already, as NVML does
    assert eng.memory.own_used(index) <= before - freed
    sub = eng.subscribe()
    t = time.monotonic()
    assert await eng.memory.release(index, inst, freed, before) is True
    assert time.monotonic() - t < 3  # not the 5 s bound
    assert not [e for e in events_of(sub) if e.kind == "memory_slow"]
    assert inst.key not in eng.memory.budgets[index].reservations


async def test_a_free_that_never_shows_is_reported_and_bounded(make_engine):
    eng, backend = await make_engine((256,), free_delay_s=30, unload_wait_s=0.2)
    await eng.register(sized("a", 64))
    await eng.load("a")
    sub = eng.subscribe()
    await eng.unload("a")
    slow = [e for e in events_of(sub) if e.kind == "memory_slow"]
    assert slow and "did not show as free" in slow[0].message
    assert eng.instance("a").state == "UNLOADED"


async def test_injected_oom_evicts_and_retries_once(make_engine):
    eng, backend = await make_engine((256,))
    await eng.register(sized("a", 32))
    sub = eng.subscribe()
    backend.fail_next_allocations(0, 1)
    await eng.load("a")
    assert eng.instance("a").state == "READY"
    oom = [e for e in events_of(sub) if e.kind == "oom"]
    assert oom and "retrying once" in oom[0].message
    # twice in a row: the load fails with a clear reason; nothing stays reserved
    await eng.register(sized("b", 32))
    backend.fail_next_allocations(0, 2)
    with pytest.raises(LoadFailed, match="out of memory"):
        await eng.load("b")
    assert eng.instance("b").state == "FAILED"
    assert "b:1" not in eng.memory.budgets[0].reservations and "b:1" not in backend.allocations(0)
    assert eng.instance("a").state == "READY"  # the engine survived and keeps serving
    assert (await eng.infer("a", one())).outputs["output"].shape == (1, 16)


async def test_keep_alive_unloads_idle_models_but_not_pinned_ones(make_engine):
    eng, _ = await make_engine((256,), tick_s=0.05)
    await eng.register(sized("idle", 16, keep_alive=0.2))
    await eng.register(sized("kept", 16, keep_alive=0.2, pin=True))
    await eng.load("idle")
    await eng.load("kept")
    for _ in range(100):
        if eng.instance("idle").state == "UNLOADED":
            break
        await asyncio.sleep(0.05)
    assert eng.instance("idle").state == "UNLOADED"
    assert eng.instance("kept").state == "READY"
    # a request brings it back (lazy load)
    assert (await eng.infer("idle", one())).outputs["output"].shape == (1, 16)


async def test_concurrent_requests_to_models_that_do_not_fit_together(make_engine):
    eng, _ = await make_engine((160,))
    await eng.register(sized("x", 64))
    await eng.register(sized("y", 64))
    answers = await asyncio.gather(*(eng.infer(n, one()) for n in ("x", "y") * 5), return_exceptions=True)
    assert all(not isinstance(a, BaseException) for a in answers), answers
    assert sum(eng.memory.budgets[0].reservations.values()) <= 160 * MiB


async def test_pins_survive_a_restart(make_engine):
    eng, _ = await make_engine((256,), store=True)
    await eng.register(sized("p", 16))
    await eng.pin("p")
    await eng.close()
    eng2, _ = await make_engine((256,), store=True)
    inst = eng2.instance("p")
    assert inst.pinned
    for _ in range(100):  # a pinned model is brought up at start
        if inst.state == "READY":
            break
        await asyncio.sleep(0.02)
    assert inst.state == "READY"
    await eng2.pin("p", pinned=False)
    assert not eng2.instance("p").pinned
    log = await eng2.audit_log(model="p")
    assert [r["action"] for r in log][:2] == ["unpin", "pin"]


async def test_model_larger_than_any_device_is_refused_clearly(make_engine):
    eng, _ = await make_engine((128,))
    await eng.register(sized("huge", 256))
    with pytest.raises(InsufficientMemory, match="needs about 0.3"):
        await eng.infer("huge", one())
    assert eng.instance("huge").state == "UNLOADED"
    assert eng.memory.budgets[0].reservations == {}


async def test_reload_from_the_host_tier_does_not_read_the_source(make_engine, tmp_path):
    eng, _ = await make_engine((256,), host_tier_gib=0.5)
    torch.manual_seed(0)
    torch.jit.save(torch.jit.script(torch.nn.Linear(16, 4)), str(tmp_path / "lin.pt"))
    await eng.register({"name": "lin", "source": "torchscript:lin.pt", "warmup": 0,
                        "inputs": [{"name": "x", "datatype": "FP32", "shape": [-1, 16]}],
                        "outputs": [{"name": "y", "datatype": "FP32", "shape": [-1, 4]}]})
    x = {"x": torch.ones(2, 16)}
    before = (await eng.infer("lin", x)).outputs["y"].clone()
    await eng.unload("lin")
    assert eng.snapshot()["host_tier"]["entries"] == ["lin:1"]
    (tmp_path / "lin.pt").unlink()  # the file is gone: only the tier can bring it back
    after = (await eng.infer("lin", x)).outputs["y"]
    inst = eng.instance("lin")
    assert inst.load_source == "host tier" and inst.device_index == 0
    assert torch.equal(before, after)
    assert eng.host_tier.hits == 1 and "lin:1" not in eng.host_tier


async def test_without_the_tier_a_reload_reads_the_source(make_engine, tmp_path):
    eng, _ = await make_engine((256,))
    torch.jit.save(torch.jit.script(torch.nn.Linear(16, 4)), str(tmp_path / "lin.pt"))
    await eng.register({"name": "lin", "source": "torchscript:lin.pt", "warmup": 0,
                        "inputs": [{"name": "x", "datatype": "FP32", "shape": [-1, 16]}],
                        "outputs": [{"name": "y", "datatype": "FP32", "shape": [-1, 4]}]})
    await eng.load("lin")
    await eng.unload("lin")
    (tmp_path / "lin.pt").unlink()
    with pytest.raises(LoadFailed, match="no such file"):
        await eng.load("lin")


async def test_host_tier_is_bounded_and_lru(make_engine):
    eng, _ = await make_engine((512,), host_tier_gib=100 / 1024)  # 100 MiB
    sub = eng.subscribe()
    for name in ("a", "b", "c"):
        await eng.register(sized(name, 40))
        await eng.load(name)
    for name in ("a", "b", "c"):
        await eng.unload(name)
    tier = eng.snapshot()["host_tier"]
    assert tier["entries"] == ["b:1", "c:1"] and tier["bytes"] <= 100 * MiB and tier["drops"] == 1
    dropped = [e for e in events_of(sub) if e.kind == "host_tier_dropped"]
    assert dropped and "a:1" in dropped[0].message
    await eng.load("b")
    assert eng.instance("b").load_source == "host tier"
    await eng.load("a")
    assert eng.instance("a").load_source == "zoo:sized"


async def test_a_shared_device_runs_the_most_urgent_batch_next(make_engine, tmp_path):
    from gatedutil import GATED_MODULE, X4, Y2
    from safetensors.torch import save_file

    (tmp_path / "gatedmodels.py").write_text(GATED_MODULE)
    lin = torch.nn.Linear(4, 2)
    save_file({"lin.weight": lin.weight.detach().contiguous(), "lin.bias": lin.bias.detach().contiguous()},
              str(tmp_path / "gated.safetensors"))
    eng, _ = await make_engine((256,), device_slots=1)

    def gated(name, gate_open, priority):
        return {"name": name, "source": "safetensors:gated.safetensors", "factory": "gatedmodels:build",
                "args": {"gate_open": gate_open}, "inputs": X4, "outputs": Y2, "warmup": 0,
                "max_batch_size": 1, "priority": priority, "latency_target_ms": 50}

    for name, gate_open, prio in (("blocker", False, 2), ("low", True, 3), ("high", True, 1)):
        await eng.register(gated(name, gate_open, prio))
        await eng.load(name)
    blocker = eng.instance("blocker")
    try:
        first = asyncio.ensure_future(eng.infer("blocker", {"x": torch.zeros(1, 4)}))
        while not blocker._module.entered.is_set():
            await asyncio.sleep(0.001)
        done: list[str] = []
        tasks = []
        for name in ("low", "low", "low", "high", "high", "high"):  # low queued first
            t = asyncio.ensure_future(eng.infer(name, {"x": torch.ones(1, 4)}))
            t.add_done_callback(lambda _t, n=name: done.append(n))
            tasks.append(t)
        await until(lambda: set(eng.snapshot()["devices"][0]["slots"]["waiting"]) == {"low:1", "high:1"},
                    "both models waiting for the device slot")
        snap = {m["name"]: m for m in eng.snapshot()["models"]}
        assert snap["high"]["urgency"] > snap["low"]["urgency"] > 0
    finally:
        blocker._module.gate.set()
    await asyncio.gather(first, *tasks)
    assert done == ["high"] * 3 + ["low"] * 3
    slots = eng.snapshot()["devices"][0]["slots"]
    assert slots["grants"] >= 6 and slots["running"] == 0 and slots["waiting"] == []


OOM_ONCE = '''
import torch


class OomOnce(torch.nn.Module):
    """Raises CUDA's out-of-memory error on its first forward after warmup, then works."""

    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(16, 16)
        self.armed = False

    def forward(self, x):
        if self.armed:
            self.armed = False
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return self.lin(x)


def build():
    return OomOnce()
'''


async def test_a_forward_oom_evicts_an_idle_model_and_retries_once(make_engine, tmp_path):
    from safetensors.torch import save_file

    (tmp_path / "oommodels.py").write_text(OOM_ONCE)
    lin = torch.nn.Linear(16, 16)
    save_file({"lin.weight": lin.weight.detach().contiguous(), "lin.bias": lin.bias.detach().contiguous()},
              str(tmp_path / "oom.safetensors"))
    eng, _ = await make_engine((256,))
    await eng.register(sized("idle", 32))
    await eng.load("idle")
    await eng.register({"name": "oom", "source": "safetensors:oom.safetensors", "factory": "oommodels:build",
                        "warmup": 0, "inputs": [{"name": "input", "datatype": "FP32", "shape": [-1, 16]}],
                        "outputs": [{"name": "output", "datatype": "FP32", "shape": [-1, 16]}]})
    await eng.load("oom")
    sub = eng.subscribe()
    eng.instance("oom")._module.armed = True
    res = await eng.infer("oom", one())  # the caller never sees the OOM: the batch ran again
    assert res.outputs["output"].shape == (1, 16)
    kinds = [(e.kind, e.model) for e in events_of(sub)]
    assert ("oom", "oom") in kinds and ("evicted", "idle") in kinds
    assert eng.instance("idle").state == "UNLOADED"
    # a second OOM in a row is the answer for that batch only; the model keeps serving
    mod = eng.instance("oom")._module
    mod.armed = True
    orig = mod.forward

    def always_oom(x):
        raise torch.OutOfMemoryError("CUDA out of memory")

    mod.forward = always_oom
    from modelconsole.scheduler.errors import ModelFailed
    with pytest.raises(ModelFailed, match="out of memory"):
        await eng.infer("oom", one(2.0))
    mod.forward = orig
    mod.armed = False
    assert (await eng.infer("oom", one(3.0))).outputs["output"].shape == (1, 16)


async def test_churn_guard_refuses_with_a_retry_time_instead_of_thrashing(make_engine):
    eng, _ = await make_engine((150,), min_residency_s=30)
    # x is worth more than y (priority), so y never clears the churn margin by the noise in their
    # measured load times: the guard, not a value comparison, decides below
    await eng.register(sized("x", 80, priority=1))
    await eng.register(sized("y", 80, priority=3))
    await eng.infer("x", one())  # x loads and is used
    await eng.infer("y", one())  # y is a newcomer: x is evicted even though it is young
    assert eng.instance("x").state == "UNLOADED" and eng.instance("y").state == "READY"
    assert eng.instance("y").residency(time.monotonic()).loaded_as_newcomer
    # x comes straight back (used moments ago): y came in as a newcomer, a one-off load, so x may
    # take its place; x comes in as a returner
    await eng.infer("x", one())
    assert eng.instance("y").state == "UNLOADED" and eng.instance("x").state == "READY"
    assert not eng.instance("x").residency(time.monotonic()).loaded_as_newcomer
    # y comes straight back: a swap loop now; x is protected, and stays so however often y asks
    # (each request waits for room within its timeout, then gets the refusal)
    for _ in range(3):
        with pytest.raises(InsufficientMemory) as err:
            await eng.infer("y", one(), timeout_ms=100)
        assert err.value.retry_after is not None and 1 <= err.value.retry_after <= 30
        assert "retry in" in err.value.message
        assert eng.instance("x").state == "READY"
    # a refused request is a use: y stays a returner while it is refused, not a newcomer
    assert time.monotonic() - eng.instance("y").last_used < 5


async def test_a_request_refused_by_the_churn_guard_waits_for_room_within_its_timeout(make_engine):
    """The refusal says when the young model matures; the request waits for that instead of a 503."""
    eng, _ = await make_engine((150,), min_residency_s=3.0)  # x stays young long enough to be seen waiting
    await eng.register(sized("x", 80, priority=1))  # worth more: y's wait is the guard's (see above)
    await eng.register(sized("y", 80, priority=3))
    await eng.infer("x", one())
    await eng.infer("y", one())  # newcomer: x goes
    await eng.infer("x", one())  # x comes back as a returner; y (a newcomer's load) goes
    sub = eng.subscribe()
    # y comes back at once: x is young and protected; y's request waits until x matures, then y loads
    task = asyncio.create_task(eng.infer("y", one(2.0), timeout_ms=10_000))
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not task.done():  # the wait shows in the snapshot while it lasts
        snap = next(m for m in eng.snapshot()["models"] if m["name"] == "y")
        if snap["waiting_for_room"]:
            break
        await asyncio.sleep(0.01)
    assert snap["waiting_for_room"] == 1 and snap["state"] == "UNLOADED" and not task.done()
    res = await task
    assert res.outputs["output"].shape == (1, 16)
    assert eng.instance("y").waiting_for_room == 0
    assert eng.instance("y").state == "READY" and eng.instance("x").state == "UNLOADED"
    evicted = [e for e in events_of(sub) if e.kind == "evicted"]
    assert [e.model for e in evicted] == ["x"]  # one swap, not a loop


async def test_cuda_graphs_is_ignored_on_the_cpu(make_engine):
    eng, _ = await make_engine((256,))
    await eng.register(sized("g", 8, cuda_graphs=True))
    assert (await eng.infer("g", one())).outputs["output"].shape == (1, 16)
    assert next(m for m in eng.snapshot()["models"] if m["name"] == "g")["cuda_graphs"] is None


SLOW_LOAD_MODULE = '''
import os
import time

import torch


def build(gate_file=""):
    """Building the module waits (on the load's thread) until gate_file exists: a slow file read."""
    deadline = time.monotonic() + 20
    while gate_file and not os.path.exists(gate_file):
        if time.monotonic() > deadline:
            raise RuntimeError("gate never opened")
        time.sleep(0.01)
    return torch.nn.Linear(4, 2)
'''


async def test_a_slow_load_does_not_hold_up_other_models(make_engine, tmp_path):
    """The weights are read outside the control lock: while one model's load is stuck, another
    model loads on another device, others are pinned and unloaded, and nothing evicts the model
    being loaded; unloading it waits for its load to end, then frees its reservation."""
    from gatedutil import X4, Y2
    from safetensors.torch import save_file

    (tmp_path / "slowmodels.py").write_text(SLOW_LOAD_MODULE)
    lin = torch.nn.Linear(4, 2)
    save_file({"weight": lin.weight.detach().contiguous(), "bias": lin.bias.detach().contiguous()},
              str(tmp_path / "slow.safetensors"))
    gate = tmp_path / "gate"
    eng, _ = await make_engine((100, 100))
    await eng.register({"name": "slow", "source": "safetensors:slow.safetensors", "factory": "slowmodels:build",
                        "args": {"gate_file": str(gate)}, "inputs": X4, "outputs": Y2, "warmup": 0,
                        "device": "cuda:0", "estimate_mib": 60})
    await eng.register(sized("other", 40, device="cuda:1"))
    await eng.register(sized("resident", 30, device="cuda:0"))
    await eng.register(sized("newcomer", 30, device="cuda:0"))
    await eng.register(sized("big", 40, device="cuda:0"))
    await eng.load("resident")
    slow = eng.instance("slow")
    try:
        load = asyncio.create_task(eng.load("slow"))
        for _ in range(500):
            await asyncio.sleep(0.01)
            if slow.state == "LOADING":
                break
        assert slow.state == "LOADING"
        assert eng.memory.budgets[0].reservations.get("slow:1") == 60 * MiB  # reserved before the read
        # other control calls go through while the read is stuck
        await eng.load("other")
        await eng.pin("resident")
        await eng.pin("resident", pinned=False)
        await eng.set_priority("resident", None, 1)
        await eng.unload("resident")
        # a load on the same device goes beside it (60 reserved + 30 × 1.25 fit in 100 MiB) ...
        await eng.load("newcomer")
        assert eng.instance("newcomer").state == "READY" and slow.state == "LOADING"
        # ... but never takes its memory: only evicting the loading model would make room for 50 MiB
        with pytest.raises(InsufficientMemory) as err:
            await eng.load("big")
        assert slow.state == "LOADING" and eng.instance("newcomer").state == "READY"
        # not pinned: room may come when the load ends, so a Retry-After (a request would wait)
        assert err.value.retry_after is not None and "unpin" not in err.value.message
        assert not load.done()
        # an unload of the loading model waits for its load, then frees it
        unload = asyncio.create_task(eng.unload("slow"))
        # one turn of the loop: the unload runs until it waits on the load (it awaits nothing before)
        await asyncio.sleep(0)
        assert not unload.done() and slow.state == "LOADING"
    finally:
        gate.touch()
    await load
    await unload
    assert slow.state == "UNLOADED" and "slow:1" not in eng.memory.budgets[0].reservations
    assert eng.instance("other").state == "READY" and eng.instance("newcomer").state == "READY"


async def test_no_room_because_of_pinned_models_is_answered_at_once(make_engine):
    """Waiting cannot help when pinned models hold the memory: the request is refused at once,
    without a Retry-After, and the message says what would help."""
    eng, _ = await make_engine((150,), min_residency_s=0)
    await eng.register(sized("held", 80))
    await eng.register(sized("wanted", 80))
    await eng.load("held")
    await eng.pin("held")
    with pytest.raises(InsufficientMemory) as err:
        await eng.infer("wanted", one(), timeout_ms=20_000)
    assert err.value.retry_after is None and "unpin or unload" in err.value.message
    assert eng.instance("held").state == "READY" and eng.instance("wanted").state == "UNLOADED"
