"""The engine on a real GPU: load, measured footprint, correct answers, memory really freed."""

from __future__ import annotations

import asyncio

import torch

from modelconsole.scheduler import zoo
from modelconsole.scheduler.engine import Engine


async def test_load_infer_unload_on_cuda():
    engine = Engine(None, default_device="cuda")
    await engine.start()
    try:
        base = torch.cuda.memory_allocated(0)
        await engine.register({"name": "sized", "source": "zoo:sized", "args": {"mib": 256}, "device": "cuda:0"})
        await engine.register({"name": "tiny", "source": "zoo:tiny-mlp", "device": "cuda"})
        await engine.load("sized")
        inst = engine.instance("sized")
        assert str(inst.device) == "cuda:0"
        # measured by allocator deltas: at least the weights, not wildly more
        assert 256 * 2**20 <= inst.footprint_bytes <= 300 * 2**20
        x = torch.randn(4, 64)
        res = await engine.infer("tiny", {"input": x})
        ref, _, _ = zoo.build("tiny-mlp", {})
        with torch.inference_mode():
            expected = ref(x)
        assert res.outputs["logits"].device.type == "cpu"
        assert torch.allclose(res.outputs["logits"], expected, atol=1e-4)
        # concurrent single-sample requests batch on the GPU too
        outs = await asyncio.gather(*(engine.infer("tiny", {"input": x[i:i + 1]}) for i in range(4) for _ in range(50)))
        assert len(outs) == 200
        assert max(int(k) for k in engine.instance("tiny").stats.batch_sizes) > 1
        await engine.unload("sized")
        await engine.unload("tiny")
        # empty_cache ran on the worker thread; the allocator is back where it started
        assert torch.cuda.memory_allocated(0) <= base + 2**20
        assert torch.cuda.memory_reserved(0) < 256 * 2**20
    finally:
        await engine.close()


async def test_bf16_encoder_on_cuda():
    engine = Engine(None, default_device="cuda")
    await engine.start()
    try:
        await engine.register({"name": "enc", "source": "zoo:encoder", "dtype": "BF16",
                               "args": {"layers": 2, "d_model": 128, "heads": 4, "seq": 32}})
        ids = torch.randint(0, 1000, (3, 32))
        res = await engine.infer("enc", {"input_ids": ids})
        emb = res.outputs["embedding"]
        assert emb.shape == (3, 128) and emb.dtype == torch.float32 and torch.isfinite(emb).all()
    finally:
        await engine.close()


async def test_a_reload_takes_the_freed_models_worker_and_a_packed_host_copy():
    """An unloaded CUDA model's worker thread waits as its device's spare, and the next load there
    takes it (no thread and stream to start); the host tier brings the weights back packed, the
    answers the same."""
    from modelconsole.scheduler import worker
    from modelconsole.scheduler.config import GpuConfig

    engine = Engine(None, default_device="cuda", gpu=GpuConfig(host_tier_gib=1))
    await engine.start()
    try:
        await engine.register({"name": "tiny", "source": "zoo:tiny-mlp", "device": "cuda:0", "warmup": 0})
        x = torch.randn(3, 64)
        before = (await engine.infer("tiny", {"input": x})).outputs["logits"].clone()
        inst = engine.instance("tiny")
        first = inst._worker._thread
        await engine.unload("tiny")
        assert not first.is_alive() or first in [w._thread for w in worker._SPARES.values()]
        await engine.load("tiny")
        assert inst.load_source == "host tier" and inst._worker._thread is first and first.name == "model:tiny:1"
        after = (await engine.infer("tiny", {"input": x})).outputs["logits"]
        assert torch.equal(before, after)
    finally:
        await engine.close()
    assert not any(k[2] == id(asyncio.get_running_loop()) for k in worker._SPARES)  # close stopped them
