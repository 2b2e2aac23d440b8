"""Replicas of a version on one host (scheduler/replicas.py): placement on distinct devices,
least-loaded routing, the version's replicas treated as one, and scaling with max_replicas."""

from __future__ import annotations

import asyncio

import pytest
import torch
from test_memory import MiB, one, sized

from modelconsole.scheduler import replicas
from modelconsole.scheduler.config import ConfigError, model_from_dict
from modelconsole.scheduler.engine import Engine
from modelconsole.server.v2 import triton_config


async def next_event(sub, kind):
    while True:
        ev = await asyncio.wait_for(sub._queue.get(), 60)
        if ev.kind == kind:
            return ev


# ------------------------------------------------------------------ pure decisions


class R:
    def __init__(self, replica, state="READY", queued=0, in_flight=0):
        self.replica, self.state, self.queued, self.in_flight = replica, state, queued, in_flight


def test_least_loaded_takes_the_emptiest_ready_replica_and_ties_go_low():
    assert replicas.least_loaded([R(0, queued=3), R(1, queued=1), R(2, in_flight=2)]).replica == 1
    assert replicas.least_loaded([R(0), R(1), R(2)]).replica == 0
    assert replicas.least_loaded([R(0, queued=5), R(1, state="LOADING")]).replica == 0
    assert replicas.least_loaded([R(0, state="UNLOADED"), R(1, state="UNLOADED")]).replica == 0


def load(n=1, wait=0.0, urgency=0.0, idle=0.0, target=0.1):
    return replicas.Load(replicas=n, mean_wait_s=wait, urgency=urgency, latency_target_s=target, idle_s=idle)


def test_replica_target_steps_up_on_measured_wait_or_urgency_and_down_when_idle():
    assert replicas.replica_target(load(1, wait=0.05), 1, 3, None) == 2  # waited half the target
    assert replicas.replica_target(load(1, wait=0.01), 1, 3, None) == 1  # a tenth: keeping up
    assert replicas.replica_target(load(2, urgency=1.5), 1, 3, None) == 3
    assert replicas.replica_target(load(3, wait=1.0), 1, 3, None) == 3  # never above max_replicas
    assert replicas.replica_target(load(3, idle=30), 1, 3, 10.0) == 2  # idle past keep_alive
    assert replicas.replica_target(load(3, idle=30), 1, 3, None) == 3  # the default idle limit is longer
    assert replicas.replica_target(load(2, idle=1e6), 2, 3, 0.0) == 2  # never below replicas
    assert replicas.replica_target(load(0), 2, 3, None) == 2


@pytest.mark.parametrize("raw, message", [
    ({"replicas": 0}, "replicas: expected an integer from 1 to 64"),
    ({"replicas": 65}, "replicas: expected an integer from 1 to 64"),
    ({"replicas": "2"}, "replicas: expected an integer"),
    ({"replicas": 3, "max_replicas": 2}, "max_replicas: expected at least replicas (3), got 2"),
    ({"max_replicas": True}, "max_replicas: expected an integer"),
])
def test_bad_replica_settings_name_the_field(raw, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        model_from_dict({"name": "m", "source": "zoo:tiny-mlp", **raw})


# ------------------------------------------------------------------ the engine


async def test_replicas_land_on_distinct_devices_and_share_the_traffic(make_engine):
    eng, backend = await make_engine((256, 256, 256))
    await eng.register(sized("r", 32, replicas=2, max_batch_size=4))
    snap = await eng.load("r")
    reps = snap["replicas"]
    assert [r["state"] for r in reps] == ["READY", "READY"]
    assert len({r["device_index"] for r in reps}) == 2
    for r, key in zip(reps, ("r:1", "r:1#1")):  # each replica's footprint is charged to its own device
        assert eng.memory.budgets[r["device_index"]].reservations[key] >= 32 * MiB
    answers = await asyncio.gather(*(eng.infer("r", one(float(i))) for i in range(64)))
    assert len(answers) == 64 and all(a.version == "1" for a in answers)
    served = [r.served for r in eng.instance("r").replica_set]
    assert all(s > 0 for s in served) and sum(served) == 64
    assert eng.instance("r").stats.success == 64  # one version, one set of counters
    cfg = triton_config(eng.instance("r"), ["1"])
    assert cfg["instance_group"][0]["count"] == 2


async def test_a_replica_without_a_distinct_device_is_not_loaded_and_says_why(make_engine):
    eng, _ = await make_engine((256, 256))
    await eng.register(sized("r", 32, replicas=3))
    with eng.subscribe() as sub:
        snap = await eng.load("r")
        ev = await next_event(sub, "replica_not_loaded")
    assert [r["state"] for r in snap["replicas"]] == ["READY", "READY", "UNLOADED"]
    assert "already holds a replica of r v1" in ev.message
    assert (await eng.infer("r", one())).version == "1"  # the version serves on two
    assert triton_config(eng.instance("r"), ["1"])["instance_group"][0]["count"] == 2


async def test_evicting_one_replica_evicts_the_version(make_engine):
    eng, _ = await make_engine((256, 256))
    await eng.register(sized("r", 96, replicas=2))
    await eng.load("r")
    await eng.register(sized("big", 200, device="cuda:1"))
    with eng.subscribe() as sub:
        await eng.load("big")  # device 1 holds replica 1 of r: the plan evicts it, and r goes whole
        ev = await next_event(sub, "evicted")
    assert ev.message.startswith("evicted r:1 ")
    assert [r["state"] for r in eng.snapshot_models("r")[0]["replicas"]] == ["UNLOADED", "UNLOADED"]
    assert not eng.memory.budgets[0].reservations
    # the next request reloads it; its replica finds device 1 full and stays out
    assert (await eng.infer("r", one())).version == "1"


async def test_unload_and_pin_act_on_every_replica(make_engine):
    eng, _ = await make_engine((256, 256, 256))
    await eng.register(sized("r", 32, replicas=3))
    await eng.load("r")
    await eng.pin("r")
    assert all(r.pinned for r in eng.instance("r").replica_set)
    await eng.pin("r", pinned=False)
    await eng.unload("r")
    assert [r["state"] for r in eng.snapshot_models("r")[0]["replicas"]] == ["UNLOADED"] * 3
    assert all(not b.reservations for b in eng.memory.budgets.values())


async def test_cpu_replicas_are_worker_threads_that_all_serve(tmp_path):
    eng = Engine(None, base_dir=str(tmp_path), default_device="cpu")
    await eng.start()
    try:
        await eng.register({"name": "c", "source": "zoo:tiny-mlp", "replicas": 2, "device": "cpu",
                            "max_batch_size": 2})
        await eng.load("c")
        x = {"input": torch.ones(1, 64)}
        await asyncio.gather(*(eng.infer("c", x) for _ in range(40)))
        assert all(r.served > 0 for r in eng.instance("c").replica_set)
    finally:
        await eng.close()


async def test_max_replicas_scales_up_on_queue_wait_and_down_when_idle(make_engine):
    eng, _ = await make_engine((256, 256, 256), tick_s=0.05)
    # every request waits max_queue_delay_ms (40 ms) in the queue: 40% of its 100 ms target
    await eng.register(sized("s", 16, max_replicas=2, keep_alive=0.2, max_batch_size=64,
                             max_queue_delay_ms=40, latency_target_ms=100))
    await eng.load("s")
    with eng.subscribe() as sub:
        traffic = asyncio.gather(*(eng.infer("s", one()) for _ in range(8)))
        up = await next_event(sub, "replicas_scaled")
        await traffic
        assert up.data == {"from": 1, "to": 2}
        assert "mean queue wait" in up.message
        down = await next_event(sub, "replicas_scaled")
        assert down.data == {"from": 2, "to": 1}
        gone = await next_event(sub, "unloaded")
    assert gone.message == "s v1 replica 1 unloaded"
    assert eng.snapshot_models("s")[0]["replicas"][1]["state"] == "UNLOADED"
