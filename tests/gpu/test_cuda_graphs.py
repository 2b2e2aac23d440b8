"""cuda_graphs = true on a real GPU: replayed batches answer exactly what the eager model does."""

from __future__ import annotations

import asyncio

import torch

from modelconsole.scheduler.engine import Engine


async def test_graph_replay_matches_eager_for_every_batch_size():
    engine = Engine(None, default_device="cuda")
    await engine.start()
    try:
        args = {"layers": 2, "d_model": 128, "heads": 4, "seq": 32}
        await engine.register({"name": "g", "source": "zoo:encoder", "args": args, "max_batch_size": 16,
                               "cuda_graphs": True})
        await engine.register({"name": "e", "source": "zoo:encoder", "args": args, "max_batch_size": 16})
        await engine.load("g")
        await engine.load("e")
        assert engine.snapshot()["models"][1]["cuda_graphs"] == [1, 2, 4, 8, 16]  # "g" sorts after "e"
        for n in (1, 3, 8, 13, 16):
            ids = torch.randint(0, 30000, (n, 32))
            g = (await engine.infer("g", {"input_ids": ids})).outputs["embedding"]
            e = (await engine.infer("e", {"input_ids": ids})).outputs["embedding"]
            assert g.shape == (n, 128)
            torch.testing.assert_close(g, e, atol=1e-4, rtol=1e-4)
        # concurrent single-sample requests through graphs
        ids = torch.randint(0, 30000, (40, 32))
        outs = await asyncio.gather(*(engine.infer("g", {"input_ids": ids[i:i + 1]}) for i in range(40)))
        ref = (await engine.infer("e", {"input_ids": ids[:16]})).outputs["embedding"]
        torch.testing.assert_close(torch.cat([o.outputs["embedding"] for o in outs[:16]]), ref, atol=1e-4, rtol=1e-4)
    finally:
        await engine.close()


async def test_models_capture_their_graphs_while_others_serve():
    """Three models with cuda_graphs captured at once, while an eager model serves traffic on
    its own worker thread: each capture is its thread's own (a process-wide capture made the
    other threads' CUDA calls fail with 'operation not permitted when stream is capturing')."""
    engine = Engine(None, default_device="cuda")
    await engine.start()
    try:
        args = {"layers": 2, "d_model": 128, "heads": 4, "seq": 32}
        for name in ("g1", "g2", "g3"):
            await engine.register({"name": name, "source": "zoo:encoder", "args": args, "max_batch_size": 32,
                                   "cuda_graphs": True})
        await engine.register({"name": "e", "source": "zoo:encoder", "args": args, "max_batch_size": 32})
        await engine.load("e")
        ids = torch.randint(0, 30000, (1, 32))
        want = (await engine.infer("e", {"input_ids": ids})).outputs["embedding"]
        stop = asyncio.Event()

        async def traffic() -> int:
            n = 0
            while not stop.is_set():
                out = (await engine.infer("e", {"input_ids": ids})).outputs["embedding"]
                torch.testing.assert_close(out, want, atol=1e-4, rtol=1e-4)
                n += 1
            return n

        clients = [asyncio.ensure_future(traffic()) for _ in range(8)]
        await asyncio.gather(*(engine.load(name) for name in ("g1", "g2", "g3")))
        stop.set()
        assert sum(await asyncio.gather(*clients)) > 0
        for name in ("g1", "g2", "g3"):
            got = (await engine.infer(name, {"input_ids": ids})).outputs["embedding"]
            assert got.shape == want.shape  # each its own random weights: served, not compared
        assert not any(m["stats"]["fail"] for m in engine.snapshot()["models"])
    finally:
        await engine.close()
