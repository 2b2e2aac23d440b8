"""The request path on real models: batching, priorities, deadlines, queue limits,
rate limits, the result cache, statistics and concurrency between models.

Timing is controlled with real "gated" models rather than sleeps: a factory
module written into tmp_path builds an nn.Module whose forward first waits on
``self.gate`` (a threading.Event).  With the gate closed, one request occupies
the model's worker thread and everything after it stays queued, so what the
queue does next (batch, reorder, expire, refuse) is observable and exact.
Each forward also logs (thread, input shape, first column) so tests can see
which requests ran together and in what order.
"""

from __future__ import annotations

import asyncio

import pytest
import torch
from gatedutil import add, occupy, reference, tagged
from waiting import until

from modelconsole.scheduler.cache import ResultCache
from modelconsole.scheduler.config import ConfigError
from modelconsole.scheduler.engine import Engine
from modelconsole.scheduler.errors import (
    DeadlineExceeded,
    InputError,
    ModelFailed,
    QueueFull,
    RateLimited,
)
from modelconsole.scheduler.tensors import TensorSpec

pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.*` is deprecated:DeprecationWarning")

TINY = {"name": "tiny", "source": "zoo:tiny-mlp", "device": "cpu", "warmup": 0}


# ---------------------------------------------------------------- 1. batching


async def test_concurrent_single_samples_are_batched_and_split_exactly(engine):
    inst = await add(engine, dict(TINY, max_batch_size=16))
    xs = [torch.randn(1, 64) for _ in range(64)]
    results = await asyncio.gather(*(engine.infer("tiny", {"input": x}) for x in xs))
    sizes = {int(k): v for k, v in inst.stats.to_dict()["batch_sizes"].items()}
    assert max(sizes) > 1, sizes  # requests really were batched
    assert max(sizes) <= 16, sizes  # ...never beyond max_batch_size
    assert sum(k * v for k, v in sizes.items()) == 64
    assert inst.stats.execution_count < 64
    for x, r in zip(xs, results):
        out = r.outputs["logits"]
        assert out.shape == (1, 10)
        assert torch.allclose(out, reference(inst, x), atol=1e-5)


async def test_mixed_request_batch_sizes_each_get_their_rows(engine):
    inst = await add(engine, dict(TINY, max_batch_size=16))
    xs = [torch.randn(n, 64) for n in [3, 5, 3, 5, 5, 3, 1, 5, 3, 3, 5, 5]]
    results = await asyncio.gather(*(engine.infer("tiny", {"input": x}) for x in xs))
    for x, r in zip(xs, results):
        out = r.outputs["logits"]
        assert out.shape == (x.shape[0], 10)
        assert torch.allclose(out, reference(inst, x), atol=1e-5)
    sizes = {int(k) for k in inst.stats.to_dict()["batch_sizes"]}
    assert max(sizes) <= 16 and max(sizes) > 5  # several requests shared a batch, within the bound
    assert inst.stats.inference_count == sum(x.shape[0] for x in xs)


# ---------------------------------------------------------------- 2. max_queue_delay_ms


async def test_partial_batch_waits_for_the_queue_delay(engine, gated):
    inst = await add(engine, gated("slow", max_batch_size=8, max_queue_delay_ms=200))
    tasks = []
    for i in range(3):
        tasks.append(asyncio.ensure_future(engine.infer("slow", {"x": tagged(i)})))
        await asyncio.sleep(0.005)
    results = await asyncio.wait_for(asyncio.gather(*tasks), 5)
    assert inst.stats.to_dict()["batch_sizes"] == {"3": 1}  # the first did not go alone
    assert [entry[2] for entry in inst._module.log] == [[0.0, 1.0, 2.0]]
    assert all(r.outputs["y"].shape == (1, 2) for r in results)


async def test_full_batch_goes_without_waiting_the_delay(engine, gated):
    # A delay of a minute: the batch can only finish within the test's 5 s if "full" sends it at once.
    inst = await add(engine, gated("slow", max_batch_size=8, max_queue_delay_ms=60_000))
    xs = [tagged(i) for i in range(8)]
    results = await asyncio.wait_for(asyncio.gather(*(engine.infer("slow", {"x": x}) for x in xs)), 5)
    assert inst.stats.to_dict()["batch_sizes"] == {"8": 1}
    for x, r in zip(xs, results):
        assert torch.allclose(r.outputs["y"], reference(inst, x), atol=1e-6)
    # one request carrying a full batch goes at once too
    big = torch.randn(8, 4)
    r = await asyncio.wait_for(engine.infer("slow", {"x": big}), 5)
    assert torch.allclose(r.outputs["y"], reference(inst, big), atol=1e-6)
    assert inst.stats.to_dict()["batch_sizes"] == {"8": 2}


# ---------------------------------------------------------------- 3. max_batch_size = 0


async def test_no_batching_runs_each_request_alone(engine, gated):
    cfg = gated("solo", gate_open=False, max_batch_size=0,
                inputs=[{"name": "x", "datatype": "FP32", "shape": [4]}],
                outputs=[{"name": "y", "datatype": "FP32", "shape": [2]}])
    inst = await add(engine, cfg)
    # occupy the worker by hand (occupy() sends a [1, 4] tensor, this model takes [4])
    t0 = asyncio.ensure_future(engine.infer("solo", {"x": torch.full((4,), -1.0)}))
    await until(inst._module.entered.is_set)
    xs = [torch.randn(4) for _ in range(5)]
    tasks = [asyncio.ensure_future(engine.infer("solo", {"x": x})) for x in xs]
    await asyncio.sleep(0)
    assert inst.queue.size + inst.in_flight == 6 and inst.queue.size >= 4  # all waiting, none merged
    inst._module.gate.set()
    results = await asyncio.wait_for(asyncio.gather(t0, *tasks), 5)
    assert inst.stats.execution_count == 6
    assert inst.stats.to_dict()["batch_sizes"] == {"1": 6}
    assert [shape for _, shape, _ in inst._module.log] == [(4,)] * 6
    for x, r in zip(xs, results[1:]):
        assert r.outputs["y"].shape == (2,)
        assert torch.allclose(r.outputs["y"], reference(inst, x), atol=1e-6)
    with pytest.raises(InputError, match=r"expected shape \[4\], got \[1, 4\]"):
        await engine.infer("solo", {"x": torch.zeros(1, 4)})


async def test_no_batching_with_a_variable_first_dimension(engine, gated):
    # [-1, 4] with max_batch_size 0: dim 0 is the model's own, requests are never concatenated
    inst = await add(engine, gated("solo", gate_open=False, max_batch_size=0))
    first = await occupy(engine, inst)
    xs = [torch.randn(n, 4) for n in (3, 2, 3, 1, 40)]  # 40: no max_batch_size bound applies
    tasks = [asyncio.ensure_future(engine.infer("solo", {"x": x})) for x in xs]
    await asyncio.sleep(0)
    assert inst.queue.size + inst.in_flight == 6 and inst.queue.size >= 4
    inst._module.gate.set()
    results = await asyncio.wait_for(asyncio.gather(first, *tasks), 5)
    assert inst.stats.execution_count == 6
    assert [shape for _, shape, _ in inst._module.log] == [(1, 4)] + [tuple(x.shape) for x in xs]
    for x, r in zip(xs, results[1:]):
        assert torch.allclose(r.outputs["y"], reference(inst, x), atol=1e-6)


# ---------------------------------------------------------------- 4. variable-length grouping


class SumRows(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.sum(dim=1, keepdim=True)


async def test_variable_length_requests_are_grouped_by_shape(engine, gated):
    inst = await add(engine, gated("seq", gate_open=False, kind="sum", max_batch_size=8,
                                   inputs=[{"name": "x", "datatype": "FP32", "shape": [-1, -1]}],
                                   outputs=[{"name": "y", "datatype": "FP32", "shape": [-1, 1]}]))
    first = asyncio.ensure_future(engine.infer("seq", {"x": torch.ones(1, 3)}))
    await until(inst._module.entered.is_set)
    lengths = [3, 5, 3, 7, 5]
    xs = [torch.randn(1, n) for n in lengths]
    tasks = [asyncio.ensure_future(engine.infer("seq", {"x": x})) for x in xs]
    await asyncio.sleep(0)
    assert inst.queue.size == 5
    inst._module.gate.set()
    results = await asyncio.wait_for(asyncio.gather(first, *tasks), 5)
    assert torch.equal(results[0].outputs["y"], torch.tensor([[3.0]]))
    for x, r in zip(xs, results[1:]):
        assert r.outputs["y"].shape == (1, 1)
        assert torch.allclose(r.outputs["y"], x.sum(dim=1, keepdim=True), atol=1e-5)
    # one batch per length, in order of each length's oldest request; none mixed
    assert [shape for _, shape, _ in inst._module.log] == [(1, 3), (2, 3), (2, 5), (1, 7)]
    assert inst.stats.to_dict()["batch_sizes"] == {"1": 2, "2": 2}


async def test_variable_length_torchscript_under_concurrency(engine, tmp_path):
    torch.jit.save(torch.jit.script(SumRows()), str(tmp_path / "sumrows.pt"))
    inst = await add(engine, {
        "name": "sumrows", "source": "torchscript:sumrows.pt", "device": "cpu", "warmup": 0,
        "max_batch_size": 8,
        "inputs": [{"name": "x", "datatype": "FP32", "shape": [-1, -1]}],
        "outputs": [{"name": "y", "datatype": "FP32", "shape": [-1, 1]}],
    })
    lengths = [3, 5, 3, 7, 5] * 8
    xs = [torch.randn(1 + i % 2, n) for i, n in enumerate(lengths)]
    results = await asyncio.wait_for(asyncio.gather(*(engine.infer("sumrows", {"x": x}) for x in xs)), 10)
    for x, r in zip(xs, results):
        assert torch.allclose(r.outputs["y"], x.sum(dim=1, keepdim=True), atol=1e-5)
    assert inst.stats.failures == {}
    assert inst.stats.execution_count >= len(set(lengths))
    assert inst.stats.execution_count < len(xs)  # same-length requests did share batches


# ---------------------------------------------------------------- 5. priorities


async def test_urgent_requests_overtake_and_each_level_is_fifo(engine, gated):
    inst = await add(engine, gated("prio", gate_open=False, max_batch_size=1))
    first = await occupy(engine, inst)
    order: list[int] = []
    tasks = []

    def send(i: int, level: int) -> None:
        t = asyncio.ensure_future(engine.infer("prio", {"x": tagged(i)}, priority=level))
        t.add_done_callback(lambda _t: order.append(i))
        tasks.append(t)

    for i in range(5):  # the low-priority ones are queued first
        send(i, 3)
    await asyncio.sleep(0)
    # a full batch may already have been handed to the busy worker (pipelining); those are
    # committed and run first, everything still queued is reordered
    committed = inst.in_flight - 1
    assert 0 <= committed <= 1 and inst.queue.size == 5 - committed
    for i in range(5, 10):
        send(i, 1)
    await asyncio.sleep(0)
    assert inst.queue.size == 10 - committed
    inst._module.gate.set()
    await asyncio.wait_for(asyncio.gather(first, *tasks), 5)
    expected = list(range(committed)) + [5, 6, 7, 8, 9] + list(range(committed, 5))
    assert order == expected
    assert [int(entry[2][0]) for entry in inst._module.log[1:]] == expected


async def test_priority_levels_shape_the_next_batch(engine, gated):
    inst = await add(engine, gated("prio", gate_open=False, max_batch_size=4))
    first = await occupy(engine, inst)
    tasks = [asyncio.ensure_future(engine.infer("prio", {"x": tagged(i)}, priority=2)) for i in range(3)]
    tasks += [asyncio.ensure_future(engine.infer("prio", {"x": tagged(i)}, priority=1)) for i in range(3, 6)]
    await asyncio.sleep(0)
    assert inst.queue.size == 6  # no full batch yet: nothing handed to the worker early
    inst._module.gate.set()
    await asyncio.wait_for(asyncio.gather(first, *tasks), 5)
    # the urgent three lead the next batch, which is topped up from the lower level, oldest first
    assert [entry[2] for entry in inst._module.log[1:]] == [[3.0, 4.0, 5.0, 0.0], [1.0, 2.0]]


# ---------------------------------------------------------------- 6. deadlines


async def test_requests_expire_in_the_queue_and_never_run(engine, gated):
    inst = await add(engine, gated("dl", gate_open=False, max_batch_size=8))
    first = await occupy(engine, inst)
    tasks = [asyncio.ensure_future(engine.infer("dl", {"x": tagged(i)}, timeout_ms=50)) for i in range(3)]
    for t in tasks:  # answered while the gate is still closed: the deadline, not a batch, ended them
        with pytest.raises(DeadlineExceeded, match="timed out after waiting 50 ms") as err:
            await asyncio.wait_for(t, 5)
        assert err.value.status == 504
    assert not first.done() and inst.queue.size == 0
    inst._module.gate.set()
    await asyncio.wait_for(first, 5)
    assert inst.stats.execution_count == 1 and inst.stats.inference_count == 1
    assert len(inst._module.log) == 1  # the expired requests never reached the model
    assert inst.stats.failures == {"deadline": 3}


async def test_a_batch_waiting_on_the_worker_expires_too(engine, gated):
    """With two batches in flight (the GPU setting), a handed-over batch whose deadline passes never runs."""
    inst = await add(engine, gated("dl2", gate_open=False, max_batch_size=1))
    inst._max_batches = 2  # what a GPU model gets; forced here on the CPU
    first = await occupy(engine, inst)
    late = asyncio.ensure_future(engine.infer("dl2", {"x": tagged(7)}, timeout_ms=20))
    await until(lambda: inst.in_flight == 2)  # handed to the worker, behind the blocked one
    await asyncio.sleep(0.05)  # its deadline passes while it waits there
    inst._module.gate.set()
    await asyncio.wait_for(first, 5)
    with pytest.raises(DeadlineExceeded):
        await asyncio.wait_for(late, 5)
    await until(lambda: inst.in_flight == 0)  # late was answered at its deadline, before its batch came back
    assert len(inst._module.log) == 1  # only the first request reached the model
    assert inst.stats.failures == {"deadline": 1}


async def test_request_timeout_cannot_exceed_the_models(engine, gated):
    inst = await add(engine, gated("dl", gate_open=False, timeout_ms=100))
    first = await occupy(engine, inst)
    late = asyncio.ensure_future(engine.infer("dl", {"x": tagged(1)}, timeout_ms=10_000))
    with pytest.raises(DeadlineExceeded, match="after waiting 100 ms"):
        await asyncio.wait_for(late, 5)
    # a shorter request timeout is honoured
    short = asyncio.ensure_future(engine.infer("dl", {"x": tagged(2)}, timeout_ms=20))
    with pytest.raises(DeadlineExceeded, match="after waiting 20 ms"):
        await asyncio.wait_for(short, 5)
    # in flight on a forward that does not return: answered at its deadline, the model stalled
    with pytest.raises(DeadlineExceeded, match="the forward pass has run"):
        await asyncio.wait_for(first, 5)
    assert inst.stalled and inst.snapshot()["stalled"]
    assert any(e.kind == "model_stalled" for e in engine.events.recent)
    inst._module.gate.set()
    await until(lambda: not inst.stalled)  # the forward came back: serving again
    assert any(e.kind == "model_recovered" for e in engine.events.recent)
    r = await asyncio.wait_for(engine.infer("dl", {"x": tagged(3)}), 5)
    assert r.outputs["y"].shape == (1, 2)
    assert inst.stats.execution_count == 2


# ---------------------------------------------------------------- 7. queue full and floods


async def test_flood_is_refused_at_once_and_the_queue_stays_bounded(engine, gated):
    inst = await add(engine, gated("flood", gate_open=False, max_queue_size=10, max_batch_size=32))
    first = await occupy(engine, inst)
    x = torch.ones(1, 4)
    tasks = [asyncio.ensure_future(engine.infer("flood", {"x": x})) for _ in range(5000)]
    await asyncio.sleep(0)  # every request has been admitted or refused
    assert inst.queue.size == 10 and inst.in_flight == 1
    refused = [t for t in tasks if t.done()]
    assert len(refused) == 4990  # refused while the model is still blocked
    for t in refused:
        e = t.exception()
        assert isinstance(e, QueueFull) and e.status == 503 and e.retry_after is not None and e.retry_after > 0
    inst._module.gate.set()
    answers = await asyncio.wait_for(asyncio.gather(first, *tasks, return_exceptions=True), 10)
    assert len(answers) == 5001
    ok = [a for a in answers if not isinstance(a, BaseException)]
    full = [a for a in answers if isinstance(a, QueueFull)]
    assert len(ok) == 11 and len(full) == 4990
    assert inst.stats.success == 11 and inst.stats.failures == {"queue_full": 4990}
    assert inst.stats.to_dict()["batch_sizes"] == {"1": 1, "10": 1}
    assert inst.queue.size == 0 and inst.in_flight == 0
    # and it serves normally afterwards
    assert (await engine.infer("flood", {"x": x})).outputs["y"].shape == (1, 2)


async def test_failing_batch_fails_only_its_requests(engine, gated):
    inst = await add(engine, gated("fragile", gate_open=False, max_batch_size=2))
    first = await occupy(engine, inst)
    bad = torch.full((1, 4), float("nan"))
    xs = [bad, tagged(1), tagged(2), tagged(3)]  # batches: [nan, 1] then [2, 3]
    tasks = [asyncio.ensure_future(engine.infer("fragile", {"x": x})) for x in xs]
    await asyncio.sleep(0)
    inst._module.gate.set()
    answers = await asyncio.wait_for(asyncio.gather(first, *tasks, return_exceptions=True), 5)
    assert not isinstance(answers[0], BaseException)
    assert isinstance(answers[1], ModelFailed) and "NaN in input" in str(answers[1])
    assert isinstance(answers[2], ModelFailed)  # same batch as the NaN
    for x, a in zip(xs[2:], answers[3:]):
        assert torch.allclose(a.outputs["y"], reference(inst, x), atol=1e-6)
    assert inst.stats.failures == {"model_error": 2} and inst.stats.success == 3


# ---------------------------------------------------------------- 8. rate limits


async def test_rate_limit_admits_the_burst_then_refuses_or_waits(engine, gated):
    inst = await add(engine, gated("rl", rate_limit={"rps": 5, "burst": 2}))
    loop = asyncio.get_running_loop()
    x = torch.ones(1, 4)
    for _ in range(2):
        await asyncio.wait_for(engine.infer("rl", {"x": x}), 1)
    with pytest.raises(RateLimited, match="rate limited to 5 requests/s") as err:
        await asyncio.wait_for(engine.infer("rl", {"x": x}, timeout_ms=50), 1)
    assert err.value.status == 429 and err.value.retry_after > 0.05
    started = loop.time()
    r = await asyncio.wait_for(engine.infer("rl", {"x": x}, timeout_ms=5_000), 5)
    assert r.outputs["y"].shape == (1, 2)
    assert loop.time() - started > 0.2  # it waited for a slot (2 per 0.4 s window)
    assert inst.stats.success == 3 and inst.stats.failures == {"rate_limited": 1}
    assert len(inst._module.log) == 3


async def test_rate_limit_config_is_checked(engine, gated):
    with pytest.raises(ConfigError, match=r"model\.rate_limit\.rps"):
        await engine.register(gated("rl", rate_limit={"rps": 0}))
    with pytest.raises(ConfigError, match=r"model\.rate_limit\.burst"):
        await engine.register(gated("rl", rate_limit={"rps": 5, "burst": 0}))
    assert engine.model_names() == []


# ---------------------------------------------------------------- 9. result cache


async def test_cache_hit_skips_the_model(engine):
    inst = await add(engine, dict(TINY, cache=True))
    x = torch.randn(2, 64)
    first = await engine.infer("tiny", {"input": x})
    assert engine.cache.misses == 1 and engine.cache.hits == 0
    runs = inst.stats.execution_count
    again = await engine.infer("tiny", {"input": x.clone()})  # equal bytes, another tensor
    assert engine.cache.hits == 1
    assert inst.stats.execution_count == runs  # the device never saw it
    assert inst.stats.cache_hits == 1 and inst.stats.cache_misses == 1 and inst.stats.success == 2
    assert torch.equal(again.outputs["logits"], first.outputs["logits"])
    # different bytes: a miss
    await engine.infer("tiny", {"input": x + 1})
    assert inst.stats.execution_count == runs + 1 and engine.cache.misses == 2


async def test_cache_key_covers_shape_and_datatype(engine, gated):
    inst = await add(engine, gated("seq", kind="sum", cache=True,
                                   inputs=[{"name": "x", "datatype": "FP32", "shape": [-1, -1]}],
                                   outputs=[{"name": "y", "datatype": "FP32", "shape": [-1, 1]}]))
    data = torch.arange(8, dtype=torch.float32)
    for shape in [(2, 4), (4, 2), (1, 8)]:  # same bytes, different shapes
        x = data.reshape(shape)
        r = await engine.infer("seq", {"x": x})
        assert torch.equal(r.outputs["y"], x.sum(dim=1, keepdim=True))
    assert engine.cache.hits == 0 and inst.stats.execution_count == 3
    r = await engine.infer("seq", {"x": data.reshape(4, 2)})
    assert torch.equal(r.outputs["y"], data.reshape(4, 2).sum(dim=1, keepdim=True))
    assert engine.cache.hits == 1 and inst.stats.execution_count == 3
    # datatype is part of the key: the same bytes declared as another datatype hash differently
    fp = (TensorSpec("x", "FP32", (-1, -1)),)
    i32 = (TensorSpec("x", "INT32", (-1, -1)),)
    t = data.reshape(2, 4)
    assert ResultCache.key(b"m\0" + b"1\0", fp, [t]) != ResultCache.key(b"m\0" + b"1\0", i32, [t.view(torch.int32)])
    assert ResultCache.key(b"m\0" + b"1\0", fp, [t]) == ResultCache.key(b"m\0" + b"1\0", fp, [t.clone()])
    assert ResultCache.key(b"m\0" + b"1\0", fp, [t]) != ResultCache.key(b"n\0" + b"1\0", fp, [t])


async def test_cache_is_per_model_version(engine):
    await add(engine, dict(TINY, cache=True))
    other = await add(engine, dict(TINY, name="tiny2", cache=True))
    x = torch.randn(1, 64)
    await engine.infer("tiny", {"input": x})
    await engine.infer("tiny2", {"input": x})  # same inputs, another model: a miss
    assert engine.cache.hits == 0 and other.stats.execution_count == 1


async def test_cached_results_cannot_be_corrupted_by_callers(engine):
    inst = await add(engine, dict(TINY, cache=True))
    x = torch.randn(1, 64)
    expected = reference(inst, x).clone()
    first = await engine.infer("tiny", {"input": x})
    first.outputs["logits"].numpy()[:] = 123.0  # the caller scribbles over its answer
    hit = await engine.infer("tiny", {"input": x})
    assert torch.allclose(hit.outputs["logits"], expected, atol=1e-6)
    hit.outputs["logits"].numpy()[:] = -7.0
    hit2 = await engine.infer("tiny", {"input": x})
    assert torch.allclose(hit2.outputs["logits"], expected, atol=1e-6)
    assert engine.cache.hits == 2 and inst.stats.execution_count == 1


async def test_failures_are_not_cached(engine, guarded_model):
    inst = await add(engine, dict(guarded_model, cache=True))
    bad = torch.full((1, 4), float("nan"))
    for _ in range(2):  # both run on the model and fail: the failure was not stored
        with pytest.raises(ModelFailed, match="NaN in input"):
            await engine.infer("guarded", {"x": bad})
    assert engine.cache.hits == 0 and engine.cache.misses == 2 and len(engine.cache) == 0
    assert inst.stats.failures == {"model_error": 2}
    # a success afterwards is cached
    good = torch.ones(1, 4)
    await engine.infer("guarded", {"x": good})
    await engine.infer("guarded", {"x": good})
    assert engine.cache.hits == 1 and inst.stats.execution_count == 1


async def test_cache_switch_off_never_hits(engine):
    inst = await add(engine, dict(TINY, cache=False))
    x = torch.randn(1, 64)
    for _ in range(3):
        await engine.infer("tiny", {"input": x})
    assert inst.stats.execution_count == 3
    assert engine.cache.hits == 0 and engine.cache.misses == 0 and len(engine.cache) == 0
    assert inst.stats.cache_hits == 0 and inst.stats.cache_misses == 0


async def test_cache_is_an_lru_bounded_in_bytes():
    # what one tiny-mlp answer of 1 sample (10 FP32 values) costs, bookkeeping included
    from modelconsole.scheduler.cache import ResultCache

    probe = ResultCache(1 << 20)
    probe.put(b"k" * 16, {"logits": torch.zeros(1, 10)}, ("tiny", "1"))
    size = probe.bytes
    probe.put(b"K" * 16, {"logits": torch.zeros(32, 10)}, ("tiny", "1"))
    big = probe.bytes - size  # a batch of 32 answers in one request
    assert 40 < size < 2048 and big > 3 * size + 1
    eng = Engine(None, default_device="cpu", cache_bytes=3 * size + 1)
    await eng.start()
    try:
        inst = await add(eng, dict(TINY, cache=True))
        xs = [torch.full((1, 64), float(i)) for i in range(10)]
        for x in xs:
            await eng.infer("tiny", {"input": x})
        assert eng.cache.evictions == 7 and len(eng.cache) == 3
        assert eng.cache.bytes <= eng.cache.max_bytes and eng.cache.bytes == 3 * size
        # entries 7, 8, 9 remain; touching 7 makes 8 the least recently used
        await eng.infer("tiny", {"input": xs[7]})
        assert eng.cache.hits == 1
        await eng.infer("tiny", {"input": torch.full((1, 64), 100.0)})  # evicts 8
        runs = inst.stats.execution_count
        await eng.infer("tiny", {"input": xs[7]})
        await eng.infer("tiny", {"input": xs[9]})
        assert eng.cache.hits == 3 and inst.stats.execution_count == runs
        await eng.infer("tiny", {"input": xs[8]})
        assert inst.stats.execution_count == runs + 1  # 8 was evicted: it ran again
        assert eng.cache.bytes <= eng.cache.max_bytes
        # an answer bigger than the whole cache is not stored (and evicts nothing)
        before = (len(eng.cache), eng.cache.evictions)
        await eng.infer("tiny", {"input": torch.randn(32, 64)})
        assert (len(eng.cache), eng.cache.evictions) == before
    finally:
        await eng.close()


# ---------------------------------------------------------------- 10. statistics


async def test_snapshot_carries_the_request_statistics(engine, gated):
    inst = await add(engine, gated("obs", cache=True, max_batch_size=8))
    xs = [tagged(i) for i in range(5)]
    for x in xs:
        await engine.infer("obs", {"x": x})
    await engine.infer("obs", {"x": xs[0].clone()})  # a cache hit
    with pytest.raises(InputError):
        await engine.infer("obs", {"x": torch.zeros(1, 5)})
    inst._module.gate.clear()
    inst._module.entered.clear()
    first = await occupy(engine, inst, value=50.0)
    queued = asyncio.ensure_future(engine.infer("obs", {"x": tagged(51)}))
    with pytest.raises(DeadlineExceeded):
        await engine.infer("obs", {"x": tagged(52)}, timeout_ms=20)
    inst._module.gate.set()
    await asyncio.wait_for(asyncio.gather(first, queued), 5)

    snap = engine.snapshot()
    stats = next(m for m in snap["models"] if m["name"] == "obs")["stats"]
    assert stats["success"] == 8  # 5 + 1 hit + 2 after the gate
    assert stats["failures"] == {"invalid_input": 1, "deadline": 1} and stats["fail"] == 2
    assert stats["execution_count"] == 7 and stats["inference_count"] == 7
    assert sum(stats["batch_sizes"].values()) == 7 and stats["batch_sizes"]["1"] >= 5
    lat = stats["latency_ms"]
    assert all(lat[p] is not None and lat[p] >= 0 for p in ("p50", "p95", "p99"))
    assert lat["p50"] <= lat["p95"] <= lat["p99"]
    assert stats["queue_ms_total"] > 0 and stats["compute_ms_total"] > 0
    assert stats["cache_hits"] == 1 and stats["cache_misses"] == 8
    assert snap["cache"]["hits"] == 1 and snap["cache"]["misses"] == 8
    assert snap["cache"]["entries"] == 7 and 0 < snap["cache"]["bytes"] <= snap["cache"]["max_bytes"]
    assert snap["cache"]["evictions"] == 0


# ---------------------------------------------------------------- 11. concurrency between models


async def test_two_models_run_at_the_same_time(engine, gated):
    meet = dict(gated("a"), factory="gatedmodels:meeting", args={})
    a = await add(engine, meet)
    b = await add(engine, dict(meet, name="b"))
    x = torch.randn(1, 4)
    # each forward waits (5 s at most) for the other one at a two-party barrier
    ra, rb = await asyncio.wait_for(
        asyncio.gather(engine.infer("a", {"x": x}), engine.infer("b", {"x": x})), 10)
    assert ra.outputs["y"].shape == rb.outputs["y"].shape == (1, 2)
    assert a._module.threads != b._module.threads  # one worker thread per model
    assert a.stats.failures == {} and b.stats.failures == {}


async def test_a_blocked_model_does_not_hold_up_another(engine, gated):
    blocked = await add(engine, gated("blocked", gate_open=False))
    free = await add(engine, gated("free"))
    first = await occupy(engine, blocked)
    xs = [tagged(i) for i in range(20)]
    results = await asyncio.wait_for(asyncio.gather(*(engine.infer("free", {"x": x}) for x in xs)), 5)
    for x, r in zip(xs, results):
        assert torch.allclose(r.outputs["y"], reference(free, x), atol=1e-6)
    assert not first.done()
    blocked._module.gate.set()
    await asyncio.wait_for(first, 5)


# ---------------------------------------------------------------- 12. bad request parameters


@pytest.mark.parametrize("priority", [99, -1, 4, "high", 1.0, True, False, 0.0])
async def test_bad_priority_is_refused(engine, priority):
    inst = await add(engine, TINY)
    with pytest.raises(InputError, match=r"^priority: expected an integer from 1 \(most urgent\) to 3"):
        await engine.infer("tiny", {"input": torch.zeros(1, 64)}, priority=priority)
    assert inst.stats.execution_count == 0 and inst.stats.failures == {"invalid_input": 1}


@pytest.mark.parametrize("timeout_ms", [-5, 0, "soon", True, float("nan")])
async def test_bad_timeout_is_refused(engine, timeout_ms):
    inst = await add(engine, TINY)
    with pytest.raises(InputError, match=r"^timeout: expected a positive number of milliseconds"):
        await engine.infer("tiny", {"input": torch.zeros(1, 64)}, timeout_ms=timeout_ms)
    assert inst.stats.execution_count == 0 and inst.stats.failures == {"invalid_input": 1}


async def test_good_priorities_and_timeouts_are_accepted(engine):
    inst = await add(engine, TINY)
    for priority in (None, 0, 1, 2, 3):
        await engine.infer("tiny", {"input": torch.zeros(1, 64)}, priority=priority, timeout_ms=1000.5)
    assert inst.stats.success == 5 and inst.stats.failures == {}
