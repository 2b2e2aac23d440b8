"""Prometheus metrics (server/metrics.py) of real engines running real zoo models on the CPU.

Models are placed on simulated GPUs ("2x24GiB"), so the device metrics are
exact: the simulated backend charges each model's measured footprint.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from prometheus_client import REGISTRY
from prometheus_client.openmetrics.parser import (
    text_string_to_metric_families as parse_openmetrics,
)
from prometheus_client.parser import text_string_to_metric_families

from modelconsole.gpu.devices import SimulatedBackend
from modelconsole.scheduler.config import GpuConfig
from modelconsole.scheduler.engine import Engine
from modelconsole.scheduler.errors import InputError, ModelFailed, ModelNotFound
from modelconsole.scheduler.store import Store
from modelconsole.server.metrics import make_registry, render

pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.*` is deprecated:DeprecationWarning")

GiB = 2**30
TINY = {"name": "tiny", "source": "zoo:tiny-mlp", "device": "auto", "warmup": 0, "cache": True}
IDLE = {"name": "idle", "source": "zoo:tiny-mlp", "device": "auto", "warmup": 0}


def samples(body: bytes, openmetrics: bool = False) -> dict[tuple[str, frozenset], float]:
    """Every sample of an exposition: (sample name, labels) -> value."""
    parse = parse_openmetrics if openmetrics else text_string_to_metric_families
    out = {}
    for family in parse(body.decode()):
        for s in family.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def model(name: str, version: str = "1", **extra: str) -> frozenset:
    return frozenset({"model": name, "version": version, **extra}.items())


def gpu(index: int) -> frozenset:
    return frozenset({"gpu_uuid": f"simulated-{index}", "index": str(index),
                      "name": f"Simulated GPU {index} (24GiB)"}.items())


def names(s: dict) -> set[str]:
    return {name for name, _ in s}


@pytest.fixture
async def sim_engine(tmp_path):
    eng = Engine(Store(tmp_path / "state.db"), gpu=GpuConfig(simulate="2x24GiB"), model_roots=(str(tmp_path),),
                 base_dir=str(tmp_path), tick_s=3600.0)
    await eng.start()
    yield eng
    await eng.close()


def x(v: float) -> dict[str, torch.Tensor]:
    return {"input": torch.full((1, 64), v)}


async def test_request_counts_failures_memory_devices_and_cache(sim_engine):
    eng = sim_engine
    await eng.register(TINY)
    await eng.register(IDLE)
    registry = make_registry(eng)

    for v in (1.0, 2.0, 3.0, 1.0):  # the repeat is a cache hit
        await eng.infer("tiny", x(v))
    for _ in range(2):
        with pytest.raises(InputError):
            await eng.infer("tiny", {"input": torch.ones(1, 3)})  # wrong shape
    with pytest.raises(ModelNotFound):
        await eng.infer("tiny", x(1.0), version="7")

    body, content_type = render(registry)
    assert content_type.startswith("text/plain; version=0.0.4")
    s = samples(body)
    tiny = model("tiny")
    inst = eng.instance("tiny")

    assert s[("nv_inference_request_success", tiny)] == 4
    assert s[("nv_inference_request_failure", model("tiny", reason="invalid_input"))] == 2
    for reason in ("unavailable", "queue_full", "rate_limited", "deadline", "model_error"):
        assert s[("nv_inference_request_failure", model("tiny", reason=reason))] == 0
    # an unknown version fails before any version's statistics are reached: counted nowhere
    assert not any(n == "nv_inference_request_failure" and ("reason", "not_found") in labels for n, labels in s)
    assert s[("nv_inference_count", tiny)] == 3  # the cache hit never reached the model
    assert s[("nv_inference_exec_count", tiny)] == 3
    assert s[("nv_inference_compute_infer_duration_us", tiny)] > 0
    assert s[("nv_inference_queue_duration_us", tiny)] >= 0
    if "request_ms_total" in inst.stats.to_dict():
        assert s[("nv_inference_request_duration_us", tiny)] == pytest.approx(inst.stats.request_ns / 1e3)
    assert s[("nv_inference_pending_request_count", tiny)] == 0
    assert s[("nv_cache_num_hits_per_model", tiny)] == 1
    assert s[("nv_cache_num_misses_per_model", tiny)] == 3
    assert s[("nv_cache_num_hits_per_model", model("idle"))] == 0
    for q in ("0.5", "0.95", "0.99"):
        assert s[("modelconsole_request_latency_ms", model("tiny", quantile=q))] > 0
    assert not any(n == "modelconsole_request_latency_ms" and ("model", "idle") in labels for n, labels in s)

    # per model: state enum, memory, pin, active version
    assert s[("modelconsole_model_state", model("tiny", state="READY"))] == 1
    assert s[("modelconsole_model_state", model("tiny", state="UNLOADED"))] == 0
    assert s[("modelconsole_model_state", model("idle", state="UNLOADED"))] == 1
    states = [v for (n, labels), v in s.items() if n == "modelconsole_model_state" and ("model", "tiny") in labels]
    assert sorted(states) == [0, 0, 0, 0, 0, 1]
    assert s[("modelconsole_model_memory_bytes", tiny)] == inst.footprint_bytes > 0
    assert s[("modelconsole_model_memory_bytes", model("idle"))] == 0
    assert s[("modelconsole_model_pinned", tiny)] == 0
    assert s[("modelconsole_model_active", tiny)] == 1
    assert ("modelconsole_model_request_rate", tiny) in s
    assert ("modelconsole_model_load_seconds", tiny) in s
    assert ("modelconsole_model_load_seconds", model("idle")) not in s

    # per device: the simulated capacity, the footprint charged where the model went
    on, off = inst.device_index, 1 - inst.device_index
    for i in (0, 1):
        assert s[("nv_gpu_memory_total_bytes", gpu(i))] == 24 * GiB
        assert s[("nv_gpu_utilization", gpu(i))] == 0
    assert s[("nv_gpu_memory_used_bytes", gpu(on))] == inst.footprint_bytes
    assert s[("nv_gpu_memory_used_bytes", gpu(off))] == 0
    assert s[("modelconsole_gpu_memory_reserved_bytes", gpu(on))] == inst.footprint_bytes
    assert s[("modelconsole_gpu_memory_reserved_bytes", gpu(off))] == 0
    assert s[("modelconsole_gpu_budget_bytes", gpu(off))] == 24 * GiB - 512 * 2**20  # the default reserve
    assert (s[("modelconsole_gpu_memory_available_bytes", gpu(on))]
            == s[("modelconsole_gpu_budget_bytes", gpu(on))] - inst.footprint_bytes)
    assert s[("modelconsole_gpu_models", gpu(on))] == 1 and s[("modelconsole_gpu_models", gpu(off))] == 0
    # the simulated backend knows no power or temperature: no sample, no empty family
    assert "nv_gpu_power_usage" not in names(s) and "modelconsole_gpu_temperature_celsius" not in names(s)
    assert b"nv_gpu_power_usage" not in body

    # the result cache and the host tier
    assert s[("modelconsole_cache_hits_total", frozenset())] == 1
    assert s[("modelconsole_cache_misses_total", frozenset())] == 3
    assert s[("modelconsole_cache_entries", frozenset())] == 3
    assert s[("modelconsole_cache_bytes", frozenset())] == eng.cache.bytes > 0
    assert s[("modelconsole_host_tier_bytes", frozenset())] == 0

    # read at scrape time: a later request shows in the next scrape, an unload frees the memory
    await eng.infer("tiny", x(4.0))
    await eng.unload("tiny")
    s = samples(render(registry)[0])
    assert s[("nv_inference_request_success", tiny)] == 5
    assert s[("modelconsole_model_state", model("tiny", state="UNLOADED"))] == 1
    assert s[("modelconsole_model_memory_bytes", tiny)] == 0
    assert s[("nv_gpu_memory_used_bytes", gpu(on))] == 0


async def test_triton_names_exactly_in_both_formats(sim_engine):
    await sim_engine.register(TINY)
    await sim_engine.infer("tiny", x(1.0))
    registry = make_registry(sim_engine)

    text, _ = render(registry, "text/plain")
    lines = text.decode().splitlines()
    assert 'nv_inference_request_success{model="tiny",version="1"} 1.0' in lines
    assert "# TYPE nv_inference_request_success untyped" in lines
    assert b"nv_inference_request_success_total" not in text
    assert "# TYPE modelconsole_cache_hits_total counter" in lines  # our own counters are true counters

    body, content_type = render(registry, "application/openmetrics-text; version=1.0.0,text/plain;q=0.5")
    assert content_type.startswith("application/openmetrics-text")
    assert body.endswith(b"# EOF\n")
    om = samples(body, openmetrics=True)
    assert om[("nv_inference_request_success", model("tiny"))] == 1
    assert om[("modelconsole_cache_misses_total", frozenset())] == 1
    assert names(om) == names(samples(text))  # the same sample names whichever format is scraped


async def test_model_error_is_counted_by_reason(tmp_path, guarded_model):
    eng = Engine(None, model_roots=(str(tmp_path),), base_dir=str(tmp_path), default_device="cpu", tick_s=3600.0)
    await eng.start()
    try:
        await eng.register(guarded_model)
        await eng.infer("guarded", {"x": torch.ones(1, 4)})
        with pytest.raises(ModelFailed):
            await eng.infer("guarded", {"x": torch.full((1, 4), float("nan"))})
        s = samples(render(make_registry(eng))[0])
        g = model("guarded")
        assert s[("nv_inference_request_success", g)] == 1
        assert s[("nv_inference_request_failure", model("guarded", reason="model_error"))] == 1
        assert s[("nv_inference_request_failure", model("guarded", reason="invalid_input"))] == 0
        assert s[("modelconsole_model_memory_bytes", g)] > 0  # unmanaged CPU model: its weights
        assert not any(n.startswith("nv_gpu_") for n in names(s))  # no managed device, no device metrics
    finally:
        await eng.close()


class SensorBackend(SimulatedBackend):
    """A simulated device that also reports utilisation, power and temperature."""

    def read(self, index):
        return dataclasses.replace(super().read(index), utilization_pct=42.0, power_w=250.5, temperature_c=61.0)


async def test_device_sensors_when_known_and_registries_are_private(tmp_path):
    engines = [Engine(None, gpu=GpuConfig(), backend=SensorBackend([8 * GiB], names=["Sensor GPU"]),
                      base_dir=str(tmp_path), tick_s=3600.0) for _ in range(2)]
    for eng in engines:
        await eng.start()
    try:
        await engines[0].register(TINY)
        await engines[0].infer("tiny", x(1.0))
        regs = [make_registry(eng) for eng in engines]
        first, second = (samples(render(r)[0]) for r in regs)
        dev = frozenset({"gpu_uuid": "simulated-0", "index": "0", "name": "Sensor GPU"}.items())
        assert first[("nv_gpu_utilization", dev)] == pytest.approx(0.42)
        assert first[("nv_gpu_power_usage", dev)] == 250.5
        assert first[("modelconsole_gpu_temperature_celsius", dev)] == 61.0
        assert first[("nv_gpu_memory_total_bytes", dev)] == 8 * GiB
        # each registry reads its own engine; the global registry holds none of it
        assert first[("nv_inference_request_success", model("tiny"))] == 1
        assert "nv_inference_request_success" not in names(second)
        assert REGISTRY.get_sample_value("nv_gpu_memory_total_bytes", dict(dev)) is None
    finally:
        for eng in engines:
            await eng.close()
