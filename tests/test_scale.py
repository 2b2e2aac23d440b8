"""Many models in one engine: a bounded number of threads for CPU models, no full garbage collection
per unload (what made 1,000 models take a minute to stop), a module in a reference cycle still
freed, and a close whose log says what it waits for.  Timings are bench/scale.py's."""

from __future__ import annotations

import gc
import logging
import textwrap
import threading
import weakref

import torch
from safetensors.torch import save_file

from modelconsole.scheduler import worker
from modelconsole.scheduler.engine import Engine

N = 40


def tiny(name: str) -> dict:
    return {"name": name, "source": "zoo:tiny-mlp", "args": {"hidden": 8}, "device": "cpu", "warmup": 0}


async def test_cpu_models_share_a_bounded_pool_of_threads():
    before = threading.active_count()
    async with Engine(None, default_device="cpu") as engine:
        for i in range(N):
            await engine.register(tiny(f"m{i}"))
            await engine.load(f"m{i}")
        for i in range(N):
            out = await engine.infer(f"m{i}", {"input": torch.ones(1, 64)})
            assert out.outputs["logits"].shape == (1, 10)
        grown = threading.active_count() - before
        assert grown <= worker.cpu_pool_size(), f"{N} CPU models hold {grown} more threads"
        lanes = [engine.instance(f"m{i}")._worker for i in range(N)]
        assert all(isinstance(lane, worker.Lane) for lane in lanes)
        pool = lanes[0]._pool
        assert all(lane._pool is pool for lane in lanes) and pool.lanes == N
    for lane in lanes:  # freed at close: each lane ends once its jobs are done...
        lane.join(30)
    assert pool.lanes == 0 and pool not in worker._POOLS.values()  # ...and the last one ends the pool


CYCLIC = textwrap.dedent(
    """
    import torch


    class Cyclic(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(4, 2)
            self.me = [self]  # a reference cycle: only the collector frees it

        def forward(self, x):
            return self.lin(x)


    def build():
        return Cyclic()
    """
)


async def test_close_frees_without_a_full_collection_per_model_and_says_what_it_waits_for(
        tmp_path, monkeypatch, caplog):
    (tmp_path / "cyclicmodel.py").write_text(CYCLIC)
    lin = torch.nn.Linear(4, 2)
    save_file({"lin.weight": lin.weight.detach().contiguous(), "lin.bias": lin.bias.detach().contiguous()},
              str(tmp_path / "c.safetensors"))
    collections = []
    real = gc.collect
    monkeypatch.setattr(gc, "collect", lambda *a: collections.append(1) or real(*a))
    caplog.set_level(logging.INFO, logger="modelconsole.engine")
    engine = Engine(None, base_dir=str(tmp_path), default_device="cpu")
    await engine.start()
    for i in range(N):
        await engine.register(tiny(f"m{i}"))
        await engine.load(f"m{i}")
    await engine.register({"name": "cyclic", "source": "safetensors:c.safetensors", "factory": "cyclicmodel:build",
                           "device": "cpu", "warmup": 0,
                           "inputs": [{"name": "x", "datatype": "FP32", "shape": [-1, 4]}],
                           "outputs": [{"name": "y", "datatype": "FP32", "shape": [-1, 2]}]})
    await engine.load("cyclic")
    cyclic = weakref.ref(engine.instance("cyclic")._module)
    collections.clear()
    await engine.close()
    assert len(collections) == 1  # the cyclic model's alone; the 40 others were freed by their last reference
    assert cyclic() is None
    said = [r.getMessage() for r in caplog.records if r.getMessage().startswith("closing:")]
    assert said and f"{N + 1} model(s) to unload" in said[0], said
