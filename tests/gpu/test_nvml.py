"""NvmlBackend on a real GPU: its figures agree with CUDA's, and a real allocation shows up.

Skipped without CUDA (tests/gpu/conftest.py).
"""

from __future__ import annotations

import os
import statistics
import time

import pytest
import torch

from modelconsole.gpu.devices import NvmlBackend, open_backend

MiB, GiB = 2**20, 2**30
# NVML and cudaMemGetInfo are two reads at two moments, and other processes may
# allocate between them; the driver may also round.  64 MiB is far below any
# figure the budgets care about and far above rounding.
TOL = 64 * MiB


@pytest.fixture
def nvml():
    b = NvmlBackend()
    yield b
    b.close()


def test_available_and_open_backend_picks_nvml():
    assert NvmlBackend.available()
    b = open_backend(None)
    try:
        assert b.kind == "nvml" and b.count() == torch.cuda.device_count()
    finally:
        b.close()


def test_reading_matches_cuda(nvml):
    for i in range(nvml.count()):
        # mem_get_info creates this process's CUDA context (~500 MiB): do it before reading
        torch.cuda.mem_get_info(i)
        r = nvml.read(i)
        free, total = torch.cuda.mem_get_info(i)
        print(f"\n{r.to_dict()}")
        assert r.index == i and r.name
        assert nvml.torch_device(i) == torch.device("cuda", i)
        assert abs(r.total_bytes - total) <= TOL, (r.total_bytes, total)
        assert abs(r.free_bytes - free) <= TOL, (r.free_bytes, free)
        # driver-reserved memory is left out of total and used (memory info v2), as CUDA does
        assert abs(r.used_bytes + r.free_bytes - r.total_bytes) <= TOL
        assert r.utilization_pct is None or 0 <= r.utilization_pct <= 100
        assert r.temperature_c is None or 0 < r.temperature_c < 130
        assert r.power_w is None or 0 < r.power_w < 2000


def test_allocation_shows_in_used_and_in_our_process(nvml):
    dev = torch.device("cuda", 0)
    torch.cuda.init()
    torch.empty(1, device=dev)  # create the context first, so only the tensor is measured
    torch.cuda.synchronize(dev)
    before = nvml.read(0)
    x = torch.empty(GiB, dtype=torch.uint8, device=dev)
    torch.cuda.synchronize(dev)
    after = nvml.read(0)
    grew = after.used_bytes - before.used_bytes
    print(f"\nused grew by {grew / MiB:.1f} MiB; processes: {after.processes}; own pid {os.getpid()}")
    assert abs(grew - GiB) <= TOL, grew / MiB
    assert abs((before.free_bytes - after.free_bytes) - GiB) <= TOL

    pids = {p.pid for p in after.processes}
    if os.getpid() not in pids:
        # A container without the host's pid namespace: NVML reports host pids.
        pytest.xfail(f"own pid {os.getpid()} not among NVML's pids {sorted(pids)} (pid namespace)")
    own_before = before.own_bytes(os.getpid())
    own_after = after.own_bytes(os.getpid())
    assert own_after >= GiB
    assert abs((own_after - own_before) - GiB) <= TOL
    assert after.other_processes_bytes(os.getpid()) == sum(p.used_bytes for p in after.processes if p.pid != os.getpid())

    del x
    torch.cuda.empty_cache()
    torch.cuda.synchronize(dev)
    freed = nvml.read(0)
    assert abs(freed.used_bytes - before.used_bytes) <= TOL


def test_reading_latency(nvml):
    nvml.read(0)
    times = []
    for _ in range(200):
        t0 = time.perf_counter()
        nvml.read(0)
        times.append(time.perf_counter() - t0)
    print(
        f"\nNvmlBackend.read(0): median {statistics.median(times) * 1e6:.0f} µs, "
        f"p95 {sorted(times)[int(len(times) * 0.95)] * 1e6:.0f} µs, max {max(times) * 1e6:.0f} µs"
    )


def test_cuda_visible_devices_by_uuid(nvml):
    """A child process that sees GPU 0 only (named by UUID) maps CUDA index 0 to it."""
    import subprocess
    import sys

    import pynvml

    uuid = pynvml.nvmlDeviceGetUUID(nvml._handles[0])
    uuid = uuid.decode() if isinstance(uuid, bytes) else uuid
    code = (
        "from modelconsole.gpu.devices import NvmlBackend\n"
        "b = NvmlBackend(); r = b.read(0); print(b.count(), r.total_bytes)"
    )
    for cvd in (uuid, "0"):
        out = subprocess.run(
            [sys.executable, "-c", code],
            env={**os.environ, "CUDA_VISIBLE_DEVICES": cvd},
            capture_output=True,
            text=True,
            check=True,
        ).stdout.split()
        assert out == ["1", str(nvml.read(0).total_bytes)], (cvd, out)


def test_without_nvml_budgets_come_from_torch_and_say_so(monkeypatch):
    """A CUDA host where NVML fails: open_backend falls back to torch's own figures (not to no
    budget at all), and an engine on it publishes a loud event."""
    import asyncio

    from modelconsole.gpu.devices import TorchCudaBackend
    from modelconsole.scheduler.engine import Engine

    monkeypatch.setattr(NvmlBackend, "probe", classmethod(lambda cls: "forced off by the test"))
    backend = open_backend(None)
    assert isinstance(backend, TorchCudaBackend) and backend.count() == torch.cuda.device_count()
    free, total = torch.cuda.mem_get_info(0)
    r = backend.read(0)
    assert abs(r.total_bytes - total) <= TOL and abs(r.free_bytes - free) <= TOL
    assert r.own_bytes(os.getpid()) == torch.cuda.memory_reserved(0)

    async def scenario() -> tuple[list[str], int]:
        async with Engine(None, backend=backend, default_device="auto") as eng:
            kinds = [e.kind for e in eng.events.recent]
            return kinds, eng.memory.available(0)

    kinds, available = asyncio.run(scenario())
    assert "gpu_readings_degraded" in kinds
    assert 0 < available <= total
