"""Versions on real engines, real SQLite stores and real torch models (CPU): hot swap under
load, A/B splits, sticky routing, shadows, canaries that promote or roll back, restarts,
and bad input that changes nothing.

The versions are built by a factory module written into tmp_path (``vmodels.py``): one
Linear(4, 2) whose forward can sleep (``delay_ms``: requests stay queued and in flight
while a swap switches; a slow canary for the p95 bound) and can raise for a share of
its inputs (``fail_pct``: an injected error rate).
"""

from __future__ import annotations

import asyncio
import sqlite3
import textwrap
import time
from collections import Counter

import pytest
import torch
from safetensors.torch import save_file
from waiting import until

from modelconsole.gpu.devices import SimulatedBackend
from modelconsole.scheduler import routing
from modelconsole.scheduler.config import GpuConfig, model_from_dict
from modelconsole.scheduler.engine import Engine
from modelconsole.scheduler.errors import Conflict, InputError, ModelNotFound
from modelconsole.scheduler.instance import LoadFailed
from modelconsole.scheduler.memory import InsufficientMemory
from modelconsole.scheduler.store import MIGRATIONS, SCHEMA_VERSION, Store

pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.*` is deprecated:DeprecationWarning")

VMODELS = textwrap.dedent(
    '''
    import time

    import torch


    class Version(torch.nn.Module):
        def __init__(self, delay_ms=0, fail_pct=0):
            super().__init__()
            self.lin = torch.nn.Linear(4, 2)
            self.delay = delay_ms / 1000.0
            self.fail_pct = fail_pct

        def forward(self, x):
            if self.delay:
                time.sleep(self.delay)
            if self.fail_pct and bool((x[:, 0] * 100 < self.fail_pct).any()):
                raise RuntimeError("injected failure")
            return self.lin(x)


    def build(delay_ms=0, fail_pct=0):
        return Version(delay_ms, fail_pct)
    '''
)

X4 = [{"name": "x", "datatype": "FP32", "shape": [-1, 4]}]
Y2 = [{"name": "y", "datatype": "FP32", "shape": [-1, 2]}]


@pytest.fixture
def version(tmp_path):
    """A maker of model tables: version(v, delay_ms=..., fail_pct=..., **options)."""
    (tmp_path / "vmodels.py").write_text(VMODELS)
    torch.manual_seed(0)
    lin = torch.nn.Linear(4, 2)
    save_file({"lin.weight": lin.weight.detach().contiguous(), "lin.bias": lin.bias.detach().contiguous()},
              str(tmp_path / "v.safetensors"))

    def make(v, name="m", delay_ms=0, fail_pct=0, **kw):
        args = {k: a for k, a in (("delay_ms", delay_ms), ("fail_pct", fail_pct)) if a}
        cfg = {"name": name, "version": v, "source": "safetensors:v.safetensors", "factory": "vmodels:build",
               "args": args, "inputs": X4, "outputs": Y2, "device": "cpu", "warmup": 1, "max_batch_size": 8}
        cfg.update(kw)
        return cfg

    return make


def new_engine(tmp_path, **kw):
    return Engine(Store(tmp_path / "state.db"), model_roots=(str(tmp_path),), base_dir=str(tmp_path),
                  default_device="cpu", **kw)


def x1():
    return {"x": torch.rand(1, 4)}


def drain(sub):
    out = []
    while not sub._queue.empty():
        out.append(sub._queue.get_nowait())
    return out


class Traffic:
    """Client tasks looping engine.infer without a version; every request's answer is kept.

    A request not answered within 10 s counts as lost (a TimeoutError in errors)."""

    def __init__(self, engine, name="m", clients=8, inputs=x1, pause=0.0):
        self.engine, self.name, self.inputs, self.pause = engine, name, inputs, pause
        self.sent = 0
        self.answers: list[list[str]] = [[] for _ in range(clients)]
        self.errors: list[BaseException] = []
        self.times: list[tuple[float, str]] = []  # (wall time answered, version)
        self._stop = False
        self._tasks = [asyncio.ensure_future(self._client(i)) for i in range(clients)]

    async def _client(self, i):
        while not self._stop:
            self.sent += 1
            try:
                res = await asyncio.wait_for(self.engine.infer(self.name, self.inputs()), 10.0)
                self.answers[i].append(res.version)
                self.times.append((time.time(), res.version))
            except Exception as e:  # noqa: BLE001 - counted
                self.errors.append(e)
            if self.pause:
                await asyncio.sleep(self.pause)
            else:
                await asyncio.sleep(0)

    @property
    def answered(self):
        return sum(len(a) for a in self.answers)

    async def stop(self):
        self._stop = True
        await asyncio.gather(*self._tasks)
        return self


async def snapshot_state(engine, name="m"):
    """Everything a refused call must leave as it was."""
    r = engine.routing(name)
    r.pop("arms")
    audit = await engine.store.audit_log(10_000)
    return (r, await engine.store.splits(), await engine.store.canaries(), await engine.store.routing(),
            len([e for e in audit if e["result"] == "ok"]))


async def error_rows(engine) -> int:
    return len([e for e in await engine.store.audit_log(10_000) if e["result"] == "error"])


# ---------------------------------------------------------------- pure policy

def test_choose_arm_and_sticky_u():
    w = {"1": 90, "2": 10, "3": 0}
    assert routing.choose_arm(w, 0.0) == "1" and routing.choose_arm(w, 0.8999) == "1"
    assert routing.choose_arm(w, 0.9) == "2" and routing.choose_arm(w, 0.999999) == "2"
    assert routing.choose_arm({"2": 0, "1": 1}, 0.5) == "1"  # weight 0 gets nothing
    u = routing.sticky_u("m", "client-42")
    assert u == routing.sticky_u("m", "client-42") and 0 <= u < 1
    assert u != routing.sticky_u("other", "client-42")
    # the canary is the last bucket: a key on the canary stays there as its share rises
    keys = [f"k{i}" for i in range(2000)]
    on5 = {k for k in keys if routing.choose_arm({"1": 95, "2": 5}, routing.sticky_u("m", k)) == "2"}
    on25 = {k for k in keys if routing.choose_arm({"1": 75, "2": 25}, routing.sticky_u("m", k)) == "2"}
    assert on5 <= on25 and 0.03 < len(on5) / 2000 < 0.07 and 0.21 < len(on25) / 2000 < 0.29


def test_canary_policy():
    bounds = {"max_error_rate": 0.1, "max_p95_ratio": 2.0, "min_requests": 20}
    arm = {"requests": 10, "errors": 1, "p95_ms": 5.0}
    base = {"requests": 100, "errors": 0, "p95_ms": 4.0}
    assert routing.canary_verdict(arm, base, bounds)[0] == "ok"  # 1/max(10, 20) = 5%: wait and see
    verdict, why = routing.canary_verdict(dict(arm, errors=3), base, bounds)  # 3/20 > 10% whatever comes next
    assert verdict == "rollback" and "error rate 3/10" in why
    verdict, why = routing.canary_verdict({"requests": 20, "errors": 0, "p95_ms": 9.0}, base, bounds)
    assert verdict == "rollback" and "p95" in why and "2.25x" in why
    # sub-millisecond noise is not a regression: the baseline p95 is floored at 1 ms
    assert routing.canary_verdict({"requests": 20, "errors": 0, "p95_ms": 0.9},
                                  dict(base, p95_ms=0.2), bounds)[0] == "ok"
    assert not routing.enough_evidence(arm, base, bounds)
    assert routing.next_step([5, 50, 100], 0, 1.0, 0.5, True) == 1
    assert routing.next_step([5, 50, 100], 0, 1.0, 0.5, False) == 0  # no evidence: the step lasts
    assert routing.next_step([5, 50, 100], 0, 0.2, 0.5, True) == 0
    plan = routing.validate_canary((5, 25.0, 100), 1, 0.05, 2, 20)
    assert plan["steps"] == [5, 25, 100] and plan["bounds"]["min_requests"] == 20


# ---------------------------------------------------------------- hot swap

async def test_swap_under_concurrent_load_drops_nothing(engine, version):
    await engine.register(version("1", delay_ms=1))
    await engine.register(version("2", delay_ms=1, warmup=30))  # a load that takes a while
    await engine.load("m")
    sub = engine.subscribe()
    traffic = Traffic(engine, clients=8)
    await until(lambda: traffic.answered >= 40, what="traffic flowing")
    before = traffic.answered
    result = await engine.swap("m", "2")
    at_swap = traffic.answered
    await until(lambda: traffic.answered >= at_swap + 40, what="traffic on the new version")
    await traffic.stop()

    assert traffic.errors == []  # zero failed, zero lost
    assert traffic.answered == traffic.sent
    assert before > 0 and traffic.answered > at_swap
    for seq in traffic.answers:  # each client: version 1, then version 2, never back
        assert seq == sorted(seq) and seq[-1] == "2"
    assert Counter(v for seq in traffic.answers for v in seq)["1"] > 0
    assert result["name"] == "m" and result["from"] == "1" and result["to"] == "2" and result["seconds"] > 0
    assert engine.instance("m", "1").state == "UNLOADED" and engine.instance("m", "2").state == "READY"
    r = engine.routing("m")
    assert r["active"] == "2" and r["swap"] is None
    assert await engine.store.routing() == {"m": "2"}
    log = await engine.audit_log(model="m")
    assert (log[0]["action"], log[0]["version"], log[0]["params"]) == ("swap", "2", {"from": "1", "to": "2"})
    events = [e for e in drain(sub) if e.kind.startswith("swap_")]
    assert [e.kind for e in events] == ["swap_started", "swap_loaded", "swap_switched", "swap_done"]
    # requests queued or in flight on version 1 at the switch were finished by version 1
    switched = events[2].ts
    assert any(t > switched and v == "1" for t, v in traffic.times)
    # nothing failed on either version
    assert all(engine.instance("m", v).stats.failures == {} for v in ("1", "2"))


async def test_requests_caught_between_route_and_queue_go_to_the_new_version(engine, version):
    """A request routed to the old version that had not reached its queue when the old version
    drained (here: waiting on its rate limit) never ran: it goes to the new version instead."""
    await engine.register(version("1", rate_limit={"rps": 40, "burst": 1}))
    await engine.register(version("2"))
    await engine.load("m")
    traffic = Traffic(engine, clients=8)
    await until(lambda: engine.instance("m", "1").limiter.waiting > 0, what="requests on the limiter")
    waiting = engine.instance("m", "1").limiter.waiting
    await engine.swap("m", "2")
    at_swap = traffic.answered
    await until(lambda: traffic.answered >= at_swap + 8, what="traffic after the swap")
    await traffic.stop()
    assert waiting > 0  # requests were waiting on version 1's limiter when the swap began
    assert traffic.errors == [] and traffic.answered == traffic.sent
    assert engine.instance("m", "1").stats.failures == {}


async def test_failing_new_version_leaves_the_old_serving(engine, version, tmp_path):
    (tmp_path / "broken.pt").write_bytes(b"not a torchscript archive")
    await engine.register(version("1", delay_ms=1))
    await engine.register({"name": "m", "version": "2", "source": "torchscript:broken.pt", "inputs": X4,
                           "outputs": Y2, "device": "cpu"})
    await engine.load("m")
    sub = engine.subscribe()
    traffic = Traffic(engine, clients=4)
    await until(lambda: traffic.answered >= 20, what="traffic flowing")
    with pytest.raises(LoadFailed, match="version 2 failed to load"):
        await engine.swap("m", "2")
    failed_at = traffic.answered
    await until(lambda: traffic.answered >= failed_at + 20, what="traffic after the failed swap")
    await traffic.stop()
    assert traffic.errors == [] and traffic.answered == traffic.sent
    assert {v for seq in traffic.answers for v in seq} == {"1"}
    assert engine.routing("m")["active"] == "1" and engine.routing("m")["swap"] is None
    assert engine.instance("m", "1").state == "READY"
    failed = [e for e in drain(sub) if e.kind == "swap_failed"]
    assert failed and failed[0].level == "error" and "v1 keeps serving" in failed[0].message
    assert await engine.store.routing() == {"m": "1"}
    log = await engine.audit_log(model="m")
    assert (log[0]["action"], log[0]["result"]) == ("swap", "error")
    # not stuck: the name takes another swap attempt (which fails the same way)
    with pytest.raises(LoadFailed):
        await engine.swap("m", "2")


async def test_swap_evicts_others_but_never_the_version_it_replaces(tmp_path):
    MiB = 2**20
    backend = SimulatedBackend([256 * MiB])
    eng = Engine(None, gpu=GpuConfig(reserve_mib=0, min_residency_s=0), backend=backend, base_dir=str(tmp_path),
                 tick_s=3600.0)
    await eng.start()
    try:
        def sized(name, v="1"):
            return {"name": name, "version": v, "source": "zoo:sized", "args": {"mib": 90}, "warmup": 0,
                    "device": "auto"}
        await eng.register(sized("m"))
        await eng.register(sized("m", "2"))
        await eng.register(sized("other"))
        await eng.load("m")
        await eng.load("other")
        for _ in range(50):  # "other" is the busier model: by keep-value, m v1 would be the victim
            await eng.infer("other", {"input": torch.ones(1, 16)})
        await eng.swap("m", "2")
        assert eng.instance("other").state == "UNLOADED"  # evicted to make room
        assert eng.instance("m", "1").state == "UNLOADED"  # swapped out after the switch
        assert eng.instance("m", "2").state == "READY"
        # a version that cannot fit beside the serving one: refused, the serving one untouched
        await eng.register(dict(sized("m", "3"), args={"mib": 200}))
        with pytest.raises(InsufficientMemory):
            await eng.swap("m", "3")
        assert eng.routing("m")["active"] == "2" and eng.instance("m", "2").state == "READY"
        assert (await eng.infer("m", {"input": torch.ones(1, 16)})).version == "2"
    finally:
        await eng.close()


# ---------------------------------------------------------------- A/B split

async def test_split_ratios_and_explicit_version(engine, version):
    await engine.register(version("1"))
    await engine.register(version("2"))
    r = await engine.set_split("m", {"1": 90, "2": 10})
    assert r["weights"] == {"1": 90, "2": 10} and r["active"] == "1"
    assert await engine.store.splits() == {"m": {"weights": {"1": 90, "2": 10}, "shadow": [],
                                                 "metric_output": None}}
    counts = Counter()
    for _ in range(40):
        answers = await asyncio.gather(*(engine.infer("m", x1()) for _ in range(50)))
        counts.update(a.version for a in answers)
    assert sum(counts.values()) == 2000
    assert abs(counts["2"] / 2000 - 0.10) <= 0.04, counts
    # an explicit version ignores the split (and is not an arm's request)
    explicit = await asyncio.gather(*(engine.infer("m", x1(), version="2") for _ in range(50)))
    assert {a.version for a in explicit} == {"2"}
    arms = engine.routing("m")["arms"]
    assert arms["1"]["requests"] + arms["2"]["requests"] == 2000
    assert arms["2"]["requests"] == counts["2"] and arms["2"]["errors"] == 0 and arms["2"]["p95_ms"] > 0
    assert "m" in engine.snapshot()["routing"]
    # weight 0: listed, gets nothing
    await engine.set_split("m", {"1": 0, "2": 5})
    assert {(await engine.infer("m", x1())).version for _ in range(50)} == {"2"}
    # {} clears: back to the active version
    r = await engine.set_split("m", {})
    assert r["weights"] == {} and await engine.store.splits() == {}
    assert {(await engine.infer("m", x1())).version for _ in range(50)} == {"1"}
    assert "m" not in engine.snapshot()["routing"]


async def test_sticky_routing_keys(engine, version):
    await engine.register(version("1"))
    await engine.register(version("2"))
    await engine.set_split("m", {"1": 50, "2": 50})
    first = {}
    for i in range(200):
        first[f"user-{i}"] = (await engine.infer("m", x1(), routing_key=f"user-{i}")).version
    for _ in range(3):  # the same key lands on the same arm every time
        for key, v in first.items():
            assert (await engine.infer("m", x1(), routing_key=key)).version == v
    share = sum(v == "2" for v in first.values()) / len(first)
    assert 0.35 < share < 0.65  # many keys spread per the weights
    with pytest.raises(InputError, match="routing_key: expected a string"):
        await engine.infer("m", x1(), routing_key=7)


async def test_shadow_answers_are_recorded_never_returned(engine, version):
    await engine.register(version("1"))
    await engine.register(version("2", delay_ms=30))  # a slow shadow must not delay anyone
    await engine.register(version("3", fail_pct=100, warmup=0))  # a failing shadow must not fail anyone
    await engine.load("m")
    await engine.load("m", "2")
    r = await engine.set_split("m", {}, shadow=["2", "3"], metric_output="y")
    assert r["shadow"] == ["2", "3"] and r["weights"] == {}
    t0 = time.perf_counter()
    answers = [await engine.infer("m", x1()) for _ in range(40)]
    elapsed = time.perf_counter() - t0
    assert {a.version for a in answers} == {"1"}  # the client only ever sees the primary's answer
    assert elapsed < 40 * 0.030 / 2, elapsed  # not serialised behind the 30 ms shadow
    await until(lambda: engine.routing("m")["arms"].get("2", {}).get("requests") == 40
                     and engine.routing("m")["arms"].get("3", {}).get("requests") == 40, what="shadow answers")
    arms = engine.routing("m")["arms"]
    assert arms["1"]["requests"] == 40 and arms["1"]["errors"] == 0
    assert arms["2"]["errors"] == 0 and arms["2"]["p50_ms"] >= 30
    assert arms["3"]["errors"] == 40 and arms["3"]["error_rate"] == 1.0
    expected = sum(float(a.outputs["y"].mean()) for a in answers) / 40
    assert arms["1"]["mean_output"] == pytest.approx(expected, rel=1e-5)
    # each answer's mean came from the model's worker thread, not the event loop (issue 13, item 5)
    assert all(a.metric == pytest.approx(float(a.outputs["y"].mean()), rel=1e-6) for a in answers)
    assert engine.instance("m", "2").stats.success == 40
    # with a split as well: shadows get copies of every routed request, arms only their own
    await engine.set_split("m", {"1": 50, "2": 50}, shadow=["3"])
    answers = await asyncio.gather(*(engine.infer("m", x1()) for _ in range(60)))
    assert {a.version for a in answers} <= {"1", "2"}


# ---------------------------------------------------------------- canary

async def test_canary_promotes_to_a_swap(engine, version):
    await engine.register(version("1"))
    await engine.register(version("2"))
    await engine.load("m")
    sub = engine.subscribe()
    traffic = Traffic(engine, clients=4, pause=0.002)
    r = await engine.start_canary("m", "2", steps=(20, 50, 100), interval_s=0.2, min_requests=10,
                                  max_p95_ratio=50.0)
    assert r["canary"]["state"] == "running" and r["canary"]["share"] == 20 and r["weights"] == {"1": 80, "2": 20}
    assert r["canary"]["baseline"] == "1" and r["canary"]["bounds"]["min_requests"] == 10
    await until(lambda: engine.routing("m")["canary"]["state"] == "promoted", what="promotion")
    await until(lambda: engine.routing("m")["swap"] is None, what="swap done")
    done_at = traffic.answered
    await until(lambda: traffic.answered >= done_at + 10, what="traffic after the promotion")
    await traffic.stop()
    assert traffic.errors == [] and traffic.answered == traffic.sent
    r = engine.routing("m")
    assert r["active"] == "2" and r["weights"] == {} and r["canary"]["share"] == 100
    assert engine.instance("m", "1").state == "UNLOADED"
    assert all(seq[-1] == "2" for seq in traffic.answers)
    kinds = [e.kind for e in drain(sub)]
    assert kinds.index("canary_started") < kinds.index("canary_step") < kinds.index("swap_switched") \
        < kinds.index("canary_promoted")
    assert (await engine.store.canaries())["m"]["state"] == "promoted"
    assert await engine.store.routing() == {"m": "2"} and await engine.store.splits() == {}
    actions = [row["action"] for row in reversed(await engine.audit_log(model="m"))]
    assert actions[-3:] == ["canary_start", "canary_step", "swap"]


async def test_canary_rolls_back_on_an_injected_error_rate(engine, version):
    await engine.register(version("1"))
    await engine.register(version("2", fail_pct=50, max_batch_size=1, warmup=0))
    await engine.load("m")
    sub = engine.subscribe()
    traffic = Traffic(engine, clients=4, pause=0.002)
    await engine.start_canary("m", "2", steps=(25, 50, 100), interval_s=600.0, max_error_rate=0.05,
                              min_requests=20)
    await until(lambda: engine.routing("m")["canary"]["state"] != "running", what="rollback")
    rolled_at = traffic.answered
    await until(lambda: traffic.answered >= rolled_at + 20, what="traffic after the rollback")
    await traffic.stop()
    r = engine.routing("m")
    assert r["canary"]["state"] == "rolled_back" and r["canary"]["share"] == 0
    assert "error rate" in r["canary"]["reason"] and r["weights"] == {} and r["active"] == "1"
    assert r["arms"]["2"]["errors"] > 0  # the evidence stays visible
    events = [e for e in drain(sub) if e.kind == "canary_rolled_back"]
    assert events and events[0].level == "error" and "error rate" in events[0].message
    # rolled back long before the step ended (600 s): "the moment a bound is broken"
    assert events[0].ts - r["canary"]["started"] < 300
    # after the rollback every request goes to version 1 and succeeds
    answers = [await engine.infer("m", x1()) for _ in range(50)]
    assert {a.version for a in answers} == {"1"}
    assert traffic.answered > rolled_at
    stored = (await engine.store.canaries())["m"]
    assert stored["state"] == "rolled_back" and stored["share"] == 0
    assert await engine.store.splits() == {} and await engine.store.routing() == {"m": "1"}


async def test_canary_rolls_back_on_p95(engine, version):
    await engine.register(version("1"))
    await engine.register(version("2", delay_ms=25))
    await engine.load("m")
    traffic = Traffic(engine, clients=4, pause=0.002)
    await engine.start_canary("m", "2", steps=(50, 100), interval_s=5.0, max_p95_ratio=3.0, min_requests=8)
    await until(lambda: engine.routing("m")["canary"]["state"] != "running", what="rollback")
    await traffic.stop()
    c = engine.routing("m")["canary"]
    assert c["state"] == "rolled_back" and "p95" in c["reason"] and "baseline" in c["reason"]
    assert traffic.errors == []


async def test_stop_canary(engine, version):
    await engine.register(version("1"))
    await engine.register(version("2"))
    await engine.start_canary("m", "2", steps=(10, 100), interval_s=60)
    r = await engine.stop_canary("m", actor="alice")
    assert r["canary"]["state"] == "aborted" and r["canary"]["share"] == 0 and r["weights"] == {}
    assert (await engine.store.canaries())["m"]["state"] == "aborted"
    assert (await engine.audit_log(model="m"))[0]["actor"] == "alice"
    with pytest.raises(Conflict, match="has no canary running .*aborted"):
        await engine.stop_canary("m")
    assert {(await engine.infer("m", x1())).version for _ in range(20)} == {"1"}


# ---------------------------------------------------------------- restart

async def test_restart_in_the_middle_of_a_split(tmp_path, version):
    first = new_engine(tmp_path)
    await first.start()
    for v in ("1", "2", "3"):
        await first.register(version(v))
    await first.set_split("m", {"2": 30, "1": 70}, shadow=["3"], metric_output="y")
    await first.close()

    second = new_engine(tmp_path)
    await second.start()
    try:
        r = second.routing("m")
        assert r["weights"] == {"2": 30, "1": 70} and list(r["weights"]) == ["2", "1"]  # order kept: sticky
        assert r["shadow"] == ["3"] and r["metric_output"] == "y" and r["active"] == "1"
        counts = Counter()
        for _ in range(8):
            counts.update(a.version for a in await asyncio.gather(*(second.infer("m", x1()) for _ in range(50))))
        assert set(counts) == {"1", "2"} and abs(counts["2"] / 400 - 0.3) < 0.1
        await until(lambda: second.routing("m")["arms"].get("3", {}).get("requests") == 400)
        assert second.routing("m")["shadow_dropped"] == 0
    finally:
        await second.close()


async def test_restart_in_the_middle_of_a_canary(tmp_path, version):
    first = new_engine(tmp_path)
    await first.start()
    await first.register(version("1"))
    await first.register(version("2"))
    traffic = Traffic(first, clients=4, pause=0.002)
    await first.start_canary("m", "2", steps=(10, 50, 100), interval_s=0.3, min_requests=5, max_p95_ratio=50.0)
    await until(lambda: first.routing("m")["canary"]["step"] == 1, what="step 2")
    await traffic.stop()
    await first.close()  # "crash" in the middle of step 2
    assert traffic.errors == []

    second = new_engine(tmp_path)
    sub = second.subscribe()
    await second.start()
    try:
        c = second.routing("m")["canary"]
        assert c["state"] == "running" and c["step"] == 1 and c["share"] == 50 and c["version"] == "2"
        # its version loads again, then its share applies, with a fresh step timer and fresh metrics
        await until(lambda: second.routing("m")["weights"] == {"1": 50, "2": 50}, what="share applied")
        assert any(e.kind == "canary_resumed" for e in drain(sub))
        assert second.routing("m")["canary"]["step_started"] > c["step_started"]
        traffic = Traffic(second, clients=4, pause=0.002)
        await until(lambda: second.routing("m")["canary"]["state"] == "promoted", what="promotion")
        await until(lambda: second.routing("m")["swap"] is None)
        await traffic.stop()
        assert traffic.errors == [] and second.routing("m")["active"] == "2"
    finally:
        await second.close()


async def test_restart_with_the_canary_version_gone_rolls_it_back(tmp_path, version):
    cfg2 = model_from_dict(version("2"), "model", str(tmp_path), (str(tmp_path),))
    first = new_engine(tmp_path)
    await first.start([cfg2])  # version 2 comes from the config file
    await first.register(version("1"))
    assert first.routing("m")["active"] == "2"
    await first.swap("m", "1")  # make 1 the active version, so 2 can be a canary
    await first.start_canary("m", "2", steps=(10, 100), interval_s=60)
    await first.close()

    second = new_engine(tmp_path)
    sub = second.subscribe()
    await second.start()  # without the config file: version 2 is gone
    try:
        c = second.routing("m")["canary"]
        assert c["state"] == "rolled_back" and c["share"] == 0 and "no longer registered" in c["reason"]
        assert second.routing("m")["weights"] == {}
        assert any(e.kind == "canary_rolled_back" for e in drain(sub))
        assert (await second.store.canaries())["m"]["state"] == "rolled_back"
        assert {(await second.infer("m", x1())).version for _ in range(10)} == {"1"}
    finally:
        await second.close()


async def test_a_version_3_store_upgrades_in_place(tmp_path):
    path = tmp_path / "v3.db"
    con = sqlite3.connect(path)
    for script in MIGRATIONS[:3]:
        con.executescript(script)
    con.execute("PRAGMA user_version = 3")
    con.execute("INSERT INTO routing VALUES ('m', '2', 0)")
    con.commit()
    con.close()
    async with Store(path) as store:
        assert await store.schema_version() == SCHEMA_VERSION == 5
        assert await store.routing() == {"m": "2"}
        assert await store.splits() == {} and await store.canaries() == {}
        assert await store.fleet_canaries() == {}  # 4 -> 5: a fleet's canaries (cluster/canary.py)


# ---------------------------------------------------------------- bad input changes nothing

async def test_bad_input_is_refused_and_changes_nothing(engine, version):
    await engine.register(version("1"))
    await engine.register(version("2"))
    await engine.register(version("3", delay_ms=150, warmup=2))  # a load that takes ~0.3 s
    await engine.set_split("m", {"1": 80, "2": 20})

    async def refused(call, error, match):
        before, errors = await snapshot_state(engine), await error_rows(engine)
        with pytest.raises(error, match=match):
            await call
        assert await snapshot_state(engine) == before
        assert await error_rows(engine) == errors + 1  # the refusal is audited, once

    await refused(engine.set_split("m", {"1": 0, "2": 0}), InputError, "summing to a positive number")
    await refused(engine.set_split("m", {"1": -1, "2": 2}), InputError, r"weights\.1: .*cannot be negative")
    await refused(engine.set_split("m", {"1": 50, "7": 50}), ModelNotFound, r"weights\.7: .*has no version '7'")
    await refused(engine.set_split("m", {"1": "lots"}), InputError, r"weights\.1: expected a number")
    await refused(engine.set_split("m", [90, 10]), InputError, "weights: expected an object")
    await refused(engine.set_split("m", {"1": 100}, shadow=["1"]), InputError, r"shadow\[0\]: .*either an arm")
    await refused(engine.set_split("m", {"1": 100}, shadow=["9"]), ModelNotFound, r"shadow\[0\]")
    await refused(engine.set_split("m", {"1": 100}, metric_output="score"), InputError,
                  "metric_output: version 1 has no output 'score'")
    await refused(engine.set_split("nope", {"1": 100}), ModelNotFound, "unknown model 'nope'")
    await refused(engine.swap("m", "1"), Conflict, "version 1 is already active")
    await refused(engine.swap("m", "9"), ModelNotFound, "version: model 'm' has no version '9'")
    await refused(engine.swap("m", "x"), InputError, "version: expected a positive integer")
    for kw, match in [({"steps": (50, 25, 100)}, "does not increase"), ({"steps": (5, 50)}, "must be 100"),
                      ({"steps": (0, 100)}, r"steps\[0\]"), ({"steps": ()}, "steps"),
                      ({"interval_s": 0}, "interval_s"), ({"max_error_rate": 2}, "max_error_rate"),
                      ({"max_p95_ratio": 0.5}, "max_p95_ratio"), ({"min_requests": 0}, "min_requests")]:
        await refused(engine.start_canary("m", "2", **kw), InputError, match)
    await refused(engine.start_canary("m", "1"), Conflict, "already active")
    await refused(engine.stop_canary("m"), Conflict, "no canary running")

    # a canary holds the name: a second canary, a split and a swap are refused
    await engine.start_canary("m", "2", steps=(10, 100), interval_s=60)
    await refused(engine.start_canary("m", "3"), Conflict, "already under a canary")
    await refused(engine.set_split("m", {"1": 50, "2": 50}), Conflict, "canary of version 2 is running")
    await refused(engine.swap("m", "3"), Conflict, "canary of version 2 is running")
    await engine.stop_canary("m")

    # a swap in progress holds the name too
    swap = asyncio.ensure_future(engine.swap("m", "3"))
    await until(lambda: engine.routing("m")["swap"] is not None, what="swap started")
    await refused(engine.set_split("m", {"1": 50, "2": 50}), Conflict, "a swap from version 1 to 3 is in progress")
    await refused(engine.swap("m", "2"), Conflict, "in progress")
    await refused(engine.start_canary("m", "2"), Conflict, "in progress")
    assert (await swap)["to"] == "3"
    assert engine.routing("m")["active"] == "3"
