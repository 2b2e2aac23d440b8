"""Host memory as a budget: CPU models, their replicas, the host tier and the result cache are placed
against ``[host]``, evicted by keep-value, refused with 507 when they can never fit and 503 when
there is no room now; a restart never replays a registration that cannot fit."""

from __future__ import annotations

import aiohttp
import pytest
import torch
from serverutil import ServerThread

from modelconsole.scheduler.config import ConfigError, GpuConfig, HostConfig, parse_config
from modelconsole.scheduler.engine import Engine
from modelconsole.scheduler.hostmem import WontFit, host_limit
from modelconsole.scheduler.memory import InsufficientMemory
from modelconsole.scheduler.store import Store
from modelconsole.server.web import ServerSettings

MiB = 2**20
HOST = HostConfig(budget_gib=0.5, reserve_mib=0)  # 512 MiB for everything below


def sized(name: str, mib: int = 120, **kw) -> dict:
    """A CPU model of ``mib`` MiB of weights (its load reserves 1.25x that first, then what it holds)."""
    return {"name": name, "source": "zoo:sized", "args": {"mib": mib}, "device": "cpu", "warmup": 0, **kw}


def engine(tmp_path, store=None, **kw) -> Engine:
    return Engine(store, base_dir=str(tmp_path), default_device="cpu", cache_bytes=16 * MiB,
                  gpu=GpuConfig(default_device="cpu", min_residency_s=0), host=kw.pop("host", HOST), **kw)


def test_the_limit_is_the_smaller_of_the_memory_and_the_cgroup():
    limit, source = host_limit()
    with open("/proc/meminfo") as f:
        total = int(next(line for line in f if line.startswith("MemTotal:")).split()[1]) * 1024
    assert 0 < limit <= total and source


async def test_replicas_that_can_never_fit_are_refused_at_registration(tmp_path):
    async with engine(tmp_path, Store(tmp_path / "s.db")) as eng:
        with pytest.raises(WontFit) as e:
            await eng.register(sized("big", replicas=4))  # 4 x 150 MiB > 496 MiB
        assert e.value.status == 507 and "4 copies (replicas)" in e.value.message
        assert "at most 3 replicas fit" in e.value.message
        with pytest.raises(WontFit):
            await eng.register(sized("huge", mib=600))
        assert eng.model_names() == []
        assert await eng.store.models() == []  # nothing written: a restart has nothing to replay
        await eng.register(sized("ok", replicas=3))


async def test_cpu_loads_evict_by_keep_value_and_refuse_when_only_pinned_remain(tmp_path):
    async with engine(tmp_path) as eng:
        for name in ("a", "b", "c", "d"):
            await eng.register(sized(name))  # 150 MiB to reserve, 120 once loaded: a fourth needs room
        await eng.load("a")
        await eng.load("b")
        await eng.load("c")
        for _ in range(5):  # b and c are used; a is not
            await eng.infer("b", {"input": torch.zeros(1, 16)})
            await eng.infer("c", {"input": torch.zeros(1, 16)})
        await eng.load("d")
        assert eng.instance("a").state == "UNLOADED" and eng.instance("d").state == "READY"
        evicted = [e for e in eng.events.recent if e.kind == "evicted"]
        assert evicted and "host memory for d:1" in evicted[-1].message
        snap = eng.snapshot()["host"]
        assert snap["usable_bytes"] == 512 * MiB and snap["available_bytes"] >= 0
        assert set(snap["reservations"]) >= {"result cache", "model:b:1", "model:c:1", "model:d:1"}
        for name in ("b", "c", "d"):
            await eng.pin(name)
        with pytest.raises(InsufficientMemory) as e:
            await eng.load("a")
        assert e.value.status == 503 and "host memory" in e.value.message and "3 pinned" in e.value.message
        assert eng.instance("a").state in ("UNLOADED", "FAILED")
        await eng.pin("d", pinned=False)
        await eng.unload("d")
        await eng.load("a")  # room again once something goes
        assert eng.snapshot()["host"]["reservations"].get("model:d:1") is None


async def test_a_restart_does_not_replay_what_no_longer_fits(tmp_path):
    store = tmp_path / "s.db"
    async with engine(tmp_path, Store(store), host=HostConfig(budget_gib=2, reserve_mib=0)) as eng:
        await eng.register(sized("wide", replicas=8))  # 8 x 150 MiB fits 2 GiB
    async with engine(tmp_path, Store(store)) as eng:  # the same store, half a GiB now
        assert "wide" not in eng.model_names()
        failed = [e for e in eng.events.recent if e.kind == "restore_failed"]
        assert failed and "cannot fit the host's memory budget" in failed[0].message


def test_the_cache_and_the_tier_are_charged_at_their_bounds(tmp_path):
    with pytest.raises(ConfigError, match="exceed the host budget"):
        Engine(None, base_dir=str(tmp_path), cache_bytes=400 * MiB,
               gpu=GpuConfig(host_tier_gib=0.25), host=HOST)
    cfg = parse_config({"host": {"budget_gib": 3, "reserve_mib": 256}}, str(tmp_path))
    assert cfg.host == HostConfig(budget_gib=3, reserve_mib=256)
    with pytest.raises(ConfigError, match="host.budget_gib: expected a positive number of GiB"):
        parse_config({"host": {"budget_gib": 0}}, str(tmp_path))
    with pytest.raises(ConfigError, match="host.swap: unknown key"):
        parse_config({"host": {"swap": 1}}, str(tmp_path))


async def test_the_api_answers_507_and_names_the_budget(tmp_path):
    with ServerThread(tmp_path, models=[], settings=ServerSettings(port=0, token="t"),
                      extra={"host": {"budget_gib": 0.5, "reserve_mib": 0}, "cache": {"max_bytes": "16MiB"}}) as srv:
        async with aiohttp.ClientSession(headers={"Authorization": "Bearer t"}) as s:
            body = {"name": "wide", "source": "zoo:sized", "options": {"args": {"mib": 100}, "device": "cpu",
                                                                       "replicas": 62}}
            async with s.post(srv.url + "/api/models", json=body) as r:
                assert r.status == 507, await r.text()
                assert "62 copies (replicas)" in (await r.json())["error"]
            async with s.get(srv.url + "/api/snapshot") as r:
                snap = await r.json()
                assert "wide" not in {m["name"] for m in snap["models"]}
                assert snap["host"]["usable_bytes"] == 512 * MiB
