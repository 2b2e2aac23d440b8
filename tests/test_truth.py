"""Numbers that are true and answers that always come.

* Durations use one clock: under uvloop (whose ``loop.time()`` is cached per
  loop iteration, in milliseconds) no latency or queue time comes out negative.
* A batch whose answering fails part-way still answers every request, and the
  model keeps dispatching.
"""

from __future__ import annotations

import asyncio

import pytest
import torch

from modelconsole.scheduler.engine import Engine
from modelconsole.scheduler.errors import ModelFailed


def test_latencies_are_never_negative_under_uvloop(tmp_path):
    uvloop = pytest.importorskip("uvloop")

    async def scenario() -> list[dict]:
        async with Engine(None, base_dir=str(tmp_path), default_device="cpu") as engine:
            await engine.register({"name": "t", "source": "zoo:tiny-mlp", "args": {"hidden": 8}, "warmup": 0})
            await engine.load("t")
            x = torch.zeros(1, 64)
            for _ in range(300):  # c=1: sub-millisecond requests, where a cached ms clock goes wrong
                await engine.infer("t", {"input": x})
            seen = [engine.instance("t").stats.to_dict()]
            await asyncio.gather(*(engine.infer("t", {"input": x}) for _ in range(300)))  # and batched
            return seen + [engine.instance("t").stats.to_dict()]

    for stats in uvloop.run(scenario()):
        assert all(v is not None and v >= 0 for v in stats["latency_ms"].values()), stats["latency_ms"]
        assert stats["queue_ms_total"] >= 0 and stats["request_ms_total"] >= 0, stats


async def test_a_batch_whose_answering_fails_still_answers_everyone(tmp_path):
    """Fault injected where answers are built (the result cache's put): every request of the
    batch gets an error, none is left waiting, and the next requests are served."""
    async with Engine(None, base_dir=str(tmp_path), default_device="cpu") as engine:
        await engine.register({"name": "c", "source": "zoo:tiny-mlp", "args": {"hidden": 8}, "warmup": 0,
                               "cache": True, "max_batch_size": 8, "max_queue_delay_ms": 50})
        await engine.load("c")
        inst = engine.instance("c")
        real_put = inst.cache.put
        calls = 0

        def failing_put(*args, **kw):
            nonlocal calls
            calls += 1
            if calls == 2:
                raise RuntimeError("injected: the cache is broken")
            return real_put(*args, **kw)

        inst.cache.put = failing_put
        xs = [torch.full((1, 64), float(i)) for i in range(4)]
        answers = await asyncio.wait_for(
            asyncio.gather(*(engine.infer("c", {"input": x}) for x in xs), return_exceptions=True), 10)
        failed = [a for a in answers if isinstance(a, Exception)]
        assert len(failed) == 1 and isinstance(failed[0], ModelFailed), answers
        assert "injected" in str(failed[0])
        assert inst.in_flight == 0
        # the model keeps dispatching
        out = await asyncio.wait_for(engine.infer("c", {"input": torch.full((1, 64), 9.0)}), 10)
        assert out.outputs["logits"].shape == (1, 10)
