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
