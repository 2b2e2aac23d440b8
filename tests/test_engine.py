"""The engine core on real zoo and TorchScript models: lifecycle, validation, events, failures."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
import torch

from modelconsole.scheduler import zoo
from modelconsole.scheduler.engine import Engine
from modelconsole.scheduler.errors import (
    Conflict,
    InputError,
    ModelFailed,
    ModelNotFound,
    ModelUnavailable,
)
from modelconsole.scheduler.instance import LoadFailed
from modelconsole.scheduler.trust import Trust

TINY = {"name": "tiny", "source": "zoo:tiny-mlp", "device": "cpu", "warmup": 3}


async def next_events(sub, kinds, timeout=10.0):
    """Collect events until every kind in kinds has been seen (in any order)."""
    seen = []
    want = set(kinds)
    async def run():
        while want - {e.kind for e in seen}:
            seen.append(await sub.get())
    await asyncio.wait_for(run(), timeout)
    return seen


async def test_lifecycle_register_load_infer_unload(engine):
    sub = engine.subscribe()
    snap = await engine.register(TINY)
    assert snap["state"] == "UNLOADED" and snap["inputs"][0] == {"name": "input", "datatype": "FP32", "shape": [-1, 64]}
    await engine.load("tiny")
    inst = engine.instance("tiny")
    assert inst.state == "READY"
    assert inst.warmup_runs == 3  # the warmup ran real forward passes
    assert inst.stats.execution_count == 0  # ...which are not counted as traffic
    x = torch.randn(2, 64)
    res = await engine.infer("tiny", {"input": x})
    reference, _, _ = zoo.build("tiny-mlp", {})
    with torch.inference_mode():
        expected = reference(x)
    assert res.model == "tiny" and res.version == "1"
    assert torch.allclose(res.outputs["logits"], expected, atol=1e-6)
    # numpy in, same answer
    res_np = await engine.infer("tiny", {"input": x.numpy()})
    assert torch.allclose(res_np.outputs["logits"], expected, atol=1e-6)
    await engine.unload("tiny")
    assert inst.state == "UNLOADED" and inst._module is None
    kinds = [e.kind for e in await next_events(sub, ["registered", "loading", "loaded", "unloading", "unloaded"])]
    assert kinds.index("loading") < kinds.index("loaded") < kinds.index("unloaded")
    snap = engine.snapshot()["models"][0]
    assert snap["state"] == "UNLOADED" and snap["footprint_bytes"] == 0 and snap["active"] is True


async def test_states_seen_during_load(engine):
    await engine.register({"name": "enc", "source": "zoo:encoder", "device": "cpu", "warmup": 2,
                           "args": {"layers": 2, "d_model": 64, "heads": 4, "seq": 16}})
    inst = engine.instance("enc")
    seen = []
    task = asyncio.create_task(engine.load("enc"))
    while not task.done():
        if inst.state != "UNLOADED" and (not seen or seen[-1] != inst.state):
            seen.append(inst.state)
        await asyncio.sleep(0)
    await task
    assert seen[0] == "LOADING" and "WARMING" in seen
    assert inst.state == "READY"
    assert inst.footprint_bytes == sum(p.numel() * p.element_size() for p in inst._module.parameters()) + sum(
        b.numel() * b.element_size() for b in inst._module.buffers())


async def test_failing_load_is_failed_with_reason_and_others_keep_serving(engine, tmp_path):
    from safetensors.torch import save_file

    (tmp_path / "mymodels.py").write_text(
        "import torch\n\ndef build(hidden=8):\n    return torch.nn.Linear(4, hidden)\n"
    )
    save_file({"weight": torch.zeros(3, 3), "bias": torch.zeros(3)}, str(tmp_path / "bad.safetensors"))
    await engine.register(TINY)
    await engine.load("tiny")
    await engine.register({
        "name": "bad", "source": "safetensors:bad.safetensors", "factory": "mymodels:build", "device": "cpu",
        "inputs": [{"name": "x", "datatype": "FP32", "shape": [-1, 4]}],
        "outputs": [{"name": "y", "datatype": "FP32", "shape": [-1, 8]}],
    })
    sub = engine.subscribe()
    with pytest.raises(LoadFailed, match="weights do not fit"):
        await engine.load("bad")
    bad = engine.instance("bad")
    assert bad.state == "FAILED" and "weights do not fit" in bad.reason
    events = await next_events(sub, ["load_failed"])
    assert events[-1].level == "error" and "bad" in events[-1].message
    # a request to the failed model is refused with the reason; tiny keeps serving
    with pytest.raises(ModelUnavailable, match="FAILED: .*weights do not fit"):
        await engine.infer("bad", {"x": torch.zeros(1, 4)})
    res = await engine.infer("tiny", {"input": torch.zeros(1, 64)})
    assert res.outputs["logits"].shape == (1, 10)
    # the failure is in the audit log
    log = await engine.audit_log(model="bad")
    assert log[0]["action"] == "load" and log[0]["result"] == "error" and "weights do not fit" in log[0]["detail"]


@pytest.mark.parametrize(
    "inputs, message",
    [
        ({"input": torch.zeros(1, 64, dtype=torch.float64)}, "input 'input': expected datatype FP32, got FP64"),
        ({"input": torch.zeros(1, 63)}, r"input 'input': expected shape \[-1, 64\], got \[1, 63\]"),
        ({"input": torch.zeros(64)}, r"expected shape \[-1, 64\], got \[64\]"),
        ({}, "missing input 'input'"),
        ({"input": torch.zeros(1, 64), "extra": torch.zeros(1)}, "unknown input 'extra'"),
        ({"inp": torch.zeros(1, 64)}, "missing input 'input'"),
        ({"input": [[0.0] * 64]}, "input 'input': expected a tensor or numpy array, got list"),
        ({"input": np.zeros((1, 64), dtype=np.int32)}, "expected datatype FP32, got INT32"),
        ({"input": torch.zeros(33, 64)}, "batch of 33 exceeds the model's max_batch_size 32"),
        ({"input": torch.zeros(0, 64)}, "batch dimension must be at least 1"),
    ],
)
async def test_bad_inputs_are_refused_before_queueing(engine, inputs, message):
    await engine.register(TINY)
    await engine.load("tiny")
    inst = engine.instance("tiny")
    before = inst.stats.execution_count
    with pytest.raises(InputError, match=message):
        await engine.infer("tiny", inputs)
    assert inst.stats.execution_count == before  # the device never saw it
    assert (await engine.infer("tiny", {"input": torch.ones(1, 64)})).outputs["logits"].shape == (1, 10)


async def test_unknown_model_version_and_output(engine):
    await engine.register(TINY)
    with pytest.raises(ModelNotFound, match="unknown model 'nope'"):
        await engine.infer("nope", {"input": torch.zeros(1, 64)})
    with pytest.raises(ModelNotFound, match="model 'tiny' has no version '7'"):
        await engine.infer("tiny", {"input": torch.zeros(1, 64)}, version="7")
    with pytest.raises(InputError, match="unknown output 'probs'"):
        await engine.infer("tiny", {"input": torch.zeros(1, 64)}, outputs=["probs"])
    with pytest.raises(ModelNotFound):
        await engine.load("nope")


async def test_registration_errors_change_nothing(engine):
    await engine.register(TINY)
    with pytest.raises(Conflict, match="already registered"):
        await engine.register(dict(TINY, version="1"))
    with pytest.raises(InputError, match="outside the model roots"):
        await engine.register({"name": "esc", "source": "torchscript:../../etc/passwd",
                               "inputs": [{"name": "x", "datatype": "FP32", "shape": [-1, 4]}],
                               "outputs": [{"name": "y", "datatype": "FP32", "shape": [-1, 4]}]})
    with pytest.raises(InputError, match="needs inputs and outputs declared"):
        import pathlib
        pathlib.Path(engine.base_dir, "m.pt").write_bytes(b"x")
        await engine.register({"name": "ts", "source": "torchscript:m.pt"})
    with pytest.raises(InputError, match="unknown zoo model"):
        await engine.register({"name": "z", "source": "zoo:resnet9000"})
    stored = await engine.store.models()
    assert [(m["name"], m["version"]) for m in stored] == [("tiny", "1")]
    assert [m["name"] for m in engine.snapshot()["models"]] == ["tiny"]
    # a registration that names no version takes the next number (the console's form relies on it)
    assert (await engine.register(TINY))["version"] == "2"


async def test_model_error_fails_only_that_batch(engine, guarded_model):
    await engine.register(guarded_model)
    await engine.load("guarded")
    sub = engine.subscribe()
    bad = torch.full((1, 4), float("nan"))
    with pytest.raises(ModelFailed, match="NaN in input"):
        await engine.infer("guarded", {"x": bad})
    events = await next_events(sub, ["model_error"])
    assert "NaN in input" in events[-1].message
    # the model keeps serving the next batch
    ok = await engine.infer("guarded", {"x": torch.ones(3, 4)})
    assert ok.outputs["y"].shape == (3, 2)
    stats = engine.instance("guarded").stats
    assert stats.failures["model_error"] == 1 and stats.success >= 1


async def test_lazy_load_on_first_request_shares_one_load(engine):
    await engine.register(TINY)
    sub = engine.subscribe()
    results = await asyncio.gather(*(engine.infer("tiny", {"input": torch.randn(1, 64)}) for _ in range(20)))
    assert all(r.outputs["logits"].shape == (1, 10) for r in results)
    await asyncio.sleep(0)
    loads = []
    while not sub._queue.empty():
        loads.append(sub._queue.get_nowait())
    assert [e.kind for e in loads].count("loading") == 1


async def test_unload_finishes_queued_requests(engine, guarded_model):
    guarded_model["max_batch_size"] = 2
    await engine.register(guarded_model)
    await engine.load("guarded")
    reqs = [asyncio.ensure_future(engine.infer("guarded", {"x": torch.ones(1, 4)})) for _ in range(50)]
    await asyncio.sleep(0)  # all queued
    await engine.unload("guarded")
    answers = await asyncio.gather(*reqs, return_exceptions=True)
    assert all(not isinstance(a, BaseException) for a in answers), answers[:3]
    assert engine.instance("guarded").state == "UNLOADED"


async def test_requested_outputs_and_bytes_free_model(engine):
    await engine.register(TINY)
    res = await engine.infer("tiny", {"input": torch.zeros(4, 64)}, outputs=["logits"])
    assert list(res.outputs) == ["logits"] and res.outputs["logits"].shape == (4, 10)


async def test_close_answers_everything_and_refuses_new(engine):
    await engine.register(TINY)
    await engine.load("tiny")
    reqs = [asyncio.ensure_future(engine.infer("tiny", {"input": torch.ones(1, 64)})) for _ in range(100)]
    await asyncio.sleep(0)
    await engine.close()
    answers = await asyncio.gather(*reqs, return_exceptions=True)
    assert all(not isinstance(a, BaseException) for a in answers)
    with pytest.raises(ModelUnavailable, match="shutting down"):
        await engine.infer("tiny", {"input": torch.ones(1, 64)})


async def test_requests_during_a_load_wait_for_it(engine):
    await engine.register({"name": "enc", "source": "zoo:encoder", "device": "cpu", "warmup": 2,
                           "args": {"layers": 2, "d_model": 64, "heads": 4, "seq": 16}})
    inst = engine.instance("enc")
    load = asyncio.ensure_future(engine.load("enc"))
    while inst.state not in ("LOADING", "WARMING"):
        await asyncio.sleep(0)
    answers = await asyncio.gather(*(engine.infer("enc", {"input_ids": torch.ones(1, 16, dtype=torch.int64)})
                                     for _ in range(5)))
    await load
    assert all(a.outputs["embedding"].shape == (1, 64) for a in answers)


async def test_failed_export_model_without_declared_inputs_answers_unavailable(tmp_path):
    program = tmp_path / "broken.pt2"
    program.write_bytes(b"not a program")
    roots = (str(tmp_path),)  # export programs load from trusted roots only (test_trust.py)
    async with Engine(None, base_dir=str(tmp_path), trust=Trust(roots, roots), default_device="cpu") as engine:
        # registration reads the archive's graph (no unpickling): not an archive is refused at once
        with pytest.raises(InputError, match="broken.pt2: not a torch.export archive"):
            await engine.register({"name": "ex", "source": "export:broken.pt2", "device": "cpu"})
        # a good program registers with its tensors known; replaced by junk before its first load...
        net = torch.nn.Linear(4, 2)
        torch.export.save(torch.export.export(net, (torch.randn(2, 4),),
                                              dynamic_shapes=({0: torch.export.Dim("batch")},)), program)
        snap = await engine.register({"name": "ex", "source": "export:broken.pt2", "device": "cpu"})
        assert snap["inputs"] == [{"name": "input", "datatype": "FP32", "shape": [-1, 4]}]
        program.write_bytes(b"not a program")
        with pytest.raises(LoadFailed):
            await engine.infer("ex", {"x": torch.zeros(1, 4)})  # the lazy load fails: that is the answer
        with pytest.raises(ModelUnavailable, match="FAILED"):
            await engine.infer("ex", {"x": torch.zeros(1, 4)})  # then the reason, without reloading


def test_latency_percentiles_follow_new_requests_and_are_copies():
    from modelconsole.scheduler.stats import ModelStats

    stats = ModelStats()
    assert stats.latency_ms() == {"p50": None, "p95": None, "p99": None}
    for s in (0.001, 0.002, 0.003):
        stats.record_latency(s)
    first = stats.latency_ms()
    assert first["p50"] == pytest.approx(2.0)
    first["p50"] = -1.0  # a caller's copy: the next read is not affected
    assert stats.latency_ms()["p50"] == pytest.approx(2.0)
    for _ in range(10):
        stats.record_latency(0.5)
    assert stats.latency_ms()["p50"] == pytest.approx(500.0)  # recomputed once a request was recorded


def test_event_dicts_are_json_and_carry_every_field():
    import dataclasses
    import json

    from modelconsole.scheduler.events import Event

    e = Event("evicted", "evicted a", model="a", version="1", level="warning", data={"reason": "r", "n": {"x": 1}},
              seq=7)
    d = e.to_dict()
    assert d == dataclasses.asdict(e) and json.loads(json.dumps(d)) == d
    d["data"]["reason"] = "changed"
    assert e.data["reason"] == "r"
