"""gpu/devices.py on the CPU: the real SimulatedBackend, parse_simulate, open_backend."""

from __future__ import annotations

import asyncio
import json
import os
import threading

import pytest
import torch
from waiting import until

from modelconsole.gpu.devices import (
    OTHER_PID,
    DeviceBackend,
    DeviceReading,
    NvmlBackend,
    ProcessMemory,
    SimulatedBackend,
    open_backend,
    parse_simulate,
)

KiB, MiB, GiB = 2**10, 2**20, 2**30


# --------------------------------------------------------------------------- parse_simulate


@pytest.mark.parametrize(
    "spec, expected",
    [
        ("2x24GiB", [24 * GiB, 24 * GiB]),
        ("24GiB", [24 * GiB]),
        ("1x512MiB,1x8GiB", [512 * MiB, 8 * GiB]),
        ("2x1gib, 512mib", [GiB, GiB, 512 * MiB]),
        ("3 x 4 KiB", [4 * KiB] * 3),
        ("1.5GiB", [int(1.5 * GiB)]),
        ("100B", [100]),
        ("2KB", [2000]),
        ("1MB", [10**6]),
        ("1GB", [10**9]),
        ("1X2GIB", [2 * GiB]),
    ],
)
def test_parse_simulate_good(spec, expected):
    assert parse_simulate(spec) == expected


@pytest.mark.parametrize("spec", ["", "   ", "abc", "2x", "24", "2x24", "24XB", "2x24GiB,", "0x1GiB", "0GiB", "-1GiB", "2y24GiB", "x24GiB"])
def test_parse_simulate_bad(spec):
    with pytest.raises(ValueError, match="expected like"):
        parse_simulate(spec)


# --------------------------------------------------------------------------- readings


def test_reading_accounts_allocations():
    b = SimulatedBackend([1 * GiB, 2 * GiB], names=["a", "b"])
    assert isinstance(b, DeviceBackend) and b.kind == "simulated" and b.count() == 2
    r = b.read(0)
    assert (r.index, r.name, r.total_bytes, r.used_bytes, r.free_bytes) == (0, "a", GiB, 0, GiB)
    assert r.processes == () and r.utilization_pct == 0.0 and r.temperature_c is None and r.power_w is None

    b.allocate(0, "m1", 100 * MiB)
    b.allocate(0, "m2", 200 * MiB)
    b.allocate(0, "m1", 50 * MiB)  # adds to the same owner
    b.allocate(1, "m3", 1 * GiB)
    r0, r1 = b.read(0), b.read(1)
    assert r0.used_bytes == 350 * MiB and r0.free_bytes == GiB - 350 * MiB
    assert r0.processes == (ProcessMemory(os.getpid(), 350 * MiB, "modelconsole"),)
    assert r0.other_processes_bytes(os.getpid()) == 0
    assert r1.used_bytes == GiB and r1.total_bytes == 2 * GiB
    assert b.allocations(0) == {"m1": 150 * MiB, "m2": 200 * MiB}

    b.release(0, "m1")
    b.release(0, "unknown")  # harmless
    assert b.read(0).used_bytes == 200 * MiB
    assert b.torch_device(0) == torch.device("cpu")

    b.set_utilization(1, 42.5)
    assert b.read(1).utilization_pct == 42.5
    with pytest.raises(IndexError):
        b.read(2)
    with pytest.raises(IndexError):
        b.allocate(-1, "x", 1)


def test_reading_to_dict_is_json():
    b = SimulatedBackend([GiB])
    b.allocate(0, "m", MiB)
    b.set_other_process(0, 2 * MiB)
    d = b.read(0).to_dict()
    back = json.loads(json.dumps(d))
    assert back["used_bytes"] == 3 * MiB
    assert {p["name"] for p in back["processes"]} == {"modelconsole", "other"}
    assert set(back) == {f.name for f in DeviceReading.__dataclass_fields__.values()}


def test_other_process_usage():
    b = SimulatedBackend([GiB])
    b.allocate(0, "m", 100 * MiB)
    b.set_other_process(0, 300 * MiB)
    r = b.read(0)
    assert r.used_bytes == 400 * MiB and r.free_bytes == GiB - 400 * MiB
    assert r.other_processes_bytes(os.getpid()) == 300 * MiB
    assert r.own_bytes(os.getpid()) == 100 * MiB
    assert any(p.pid == OTHER_PID and p.name == "other" for p in r.processes)
    # the other process's memory takes capacity
    with pytest.raises(torch.OutOfMemoryError):
        b.allocate(0, "big", GiB - 350 * MiB)
    b.set_other_process(0, 0)
    assert b.read(0).other_processes_bytes(os.getpid()) == 0
    b.allocate(0, "big", GiB - 350 * MiB)


def test_late_frees():
    b = SimulatedBackend([GiB], free_delay_s=0.2)
    b.allocate(0, "m", 600 * MiB)
    b.release(0, "m")
    r = b.read(0)
    # right after release the device still shows it as ours, and it still takes room
    assert r.used_bytes == 600 * MiB and r.own_bytes(os.getpid()) == 600 * MiB
    assert b.allocations(0) == {}
    with pytest.raises(torch.OutOfMemoryError):
        b.allocate(0, "n", 600 * MiB)
    asyncio.run(until(lambda: b.read(0).used_bytes == 0, "the released memory read back", 5.0))
    assert b.read(0).processes == ()
    b.allocate(0, "n", 600 * MiB)

    b.set_free_delay(0)
    b.release(0, "n")
    assert b.read(0).used_bytes == 0


def test_injected_oom_leaves_accounting_unchanged():
    b = SimulatedBackend([GiB, GiB])
    b.allocate(0, "m", 100 * MiB)
    before = b.read(0)
    b.fail_next_allocations(0, n=2)
    for _ in range(2):
        with pytest.raises(torch.OutOfMemoryError, match=r"CUDA out of memory\. Tried to allocate 1\.00 MiB.*simulated device 0"):
            b.allocate(0, "x", MiB)
    after = b.read(0)
    assert (after.used_bytes, after.processes) == (before.used_bytes, before.processes)
    assert b.allocations(0) == {"m": 100 * MiB}
    b.allocate(1, "y", MiB)  # other devices unaffected
    b.allocate(0, "x", MiB)  # injection used up
    assert b.read(0).used_bytes == 101 * MiB


def test_over_capacity_oom_leaves_accounting_unchanged():
    b = SimulatedBackend([GiB])
    b.allocate(0, "m", 700 * MiB)
    with pytest.raises(torch.OutOfMemoryError) as ei:
        b.allocate(0, "n", 400 * MiB)
    assert isinstance(ei.value, torch.cuda.OutOfMemoryError) and isinstance(ei.value, RuntimeError)
    assert "Tried to allocate 400.00 MiB" in str(ei.value) and "simulated device 0" in str(ei.value)
    assert b.allocations(0) == {"m": 700 * MiB} and b.read(0).used_bytes == 700 * MiB
    with pytest.raises(torch.OutOfMemoryError):
        b.allocate(0, "m", 400 * MiB)  # growing an existing owner too
    assert b.allocations(0) == {"m": 700 * MiB}
    b.allocate(0, "n", GiB - 700 * MiB)  # exactly full is fine
    assert b.read(0).free_bytes == 0


def test_bad_construction():
    with pytest.raises(ValueError):
        SimulatedBackend([0])
    with pytest.raises(ValueError):
        SimulatedBackend([GiB], names=["a", "b"])
    with pytest.raises(ValueError):
        SimulatedBackend([GiB]).allocate(0, "m", -1)


def test_thread_safety_smoke():
    b = SimulatedBackend([64 * MiB, 64 * MiB], free_delay_s=0.0)
    errors: list[BaseException] = []
    ooms = 0
    ooms_lock = threading.Lock()
    start = threading.Barrier(16)

    def worker(t: int) -> None:
        nonlocal ooms
        try:
            start.wait()
            for i in range(300):
                dev, owner = (t + i) % 2, f"t{t}-{i}"
                try:
                    b.allocate(dev, owner, MiB)
                except torch.OutOfMemoryError:
                    with ooms_lock:
                        ooms += 1
                    continue
                r = b.read(dev)
                assert r.used_bytes <= r.total_bytes
                b.release(dev, owner)
        except BaseException as e:  # noqa: BLE001 - surfaced below
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not errors
    assert ooms == 0  # 16 threads x 1 MiB never exceeds 64 MiB
    for dev in range(2):
        assert b.allocations(dev) == {} and b.read(dev).used_bytes == 0


def test_thread_safety_capacity_never_exceeded():
    cap = 10 * MiB
    b = SimulatedBackend([cap])
    held: list[str] = []
    lock = threading.Lock()

    def worker(t: int) -> None:
        for i in range(200):
            try:
                b.allocate(0, f"{t}-{i}", MiB)
            except torch.OutOfMemoryError:
                continue
            with lock:
                held.append(f"{t}-{i}")

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert len(held) == 10 and b.read(0).used_bytes == cap


# --------------------------------------------------------------------------- choosing


def test_open_backend_simulated():
    b = open_backend("2x1GiB")
    assert isinstance(b, SimulatedBackend) and b.count() == 2
    assert [r.total_bytes for r in b.read_all()] == [GiB, GiB]
    b.close()
    with pytest.raises(ValueError, match="expected like"):
        open_backend("lots")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU fallback")
def test_open_backend_without_gpu_is_cpu_only():
    for spec in (None, "", "  "):
        b = open_backend(spec)
        assert isinstance(b, SimulatedBackend) and b.count() == 0 and b.read_all() == []
        b.close()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU answer")
def test_nvml_not_available_here():
    assert NvmlBackend.available() is False


# --------------------------------------------------------------------------- NvmlBackend logic, on a fake NVML


class FakeNvml:
    """Just enough of pynvml for NvmlBackend: 3 GPUs, GPU 1 lacks every optional sensor."""

    NVML_TEMPERATURE_GPU = 0
    nvmlMemory_v2 = object()

    class NVMLError(Exception):
        pass

    class Mem:
        def __init__(self, total, used, free, reserved=None):
            self.total, self.used, self.free = total, used, free
            if reserved is not None:
                self.reserved = reserved

    class Proc:
        def __init__(self, pid, used):
            self.pid, self.usedGpuMemory = pid, used

    def __init__(self, n=3, v2=True):
        self.n, self.v2, self.inits, self.shutdowns = n, v2, 0, 0

    def nvmlInit(self):
        self.inits += 1

    def nvmlShutdown(self):
        self.shutdowns += 1

    def nvmlDeviceGetCount(self):
        return self.n

    def nvmlDeviceGetHandleByIndex(self, i):
        if not 0 <= i < self.n:
            raise self.NVMLError("bad index")
        return i

    def nvmlDeviceGetHandleByUUID(self, uuid):
        if uuid.startswith("GPU-fake-"):
            return int(uuid.removeprefix("GPU-fake-"))
        raise self.NVMLError("not found")

    def nvmlDeviceGetMemoryInfo(self, h, version=None):
        if version is not None:
            if not self.v2:
                raise self.NVMLError("function not found")
            return self.Mem(10 * GiB + h * GiB, 2 * GiB, 8 * GiB + h * GiB - 512 * MiB, reserved=512 * MiB)
        return self.Mem(10 * GiB + h * GiB, 2 * GiB + 512 * MiB, 8 * GiB + h * GiB - 512 * MiB)

    def _sensor(self, h, value):
        if h == 1:
            raise self.NVMLError("not supported")
        return value

    def nvmlDeviceGetName(self, h):
        return self._sensor(h, f"Fake {h}".encode())  # old bindings return bytes

    def nvmlDeviceGetUtilizationRates(self, h):
        class U:
            gpu = 37

        return self._sensor(h, U())

    def nvmlDeviceGetTemperature(self, h, sensor):
        return self._sensor(h, 55)

    def nvmlDeviceGetPowerUsage(self, h):
        return self._sensor(h, 123456)

    def nvmlDeviceGetComputeRunningProcesses(self, h):
        return self._sensor(h, [self.Proc(os.getpid(), GiB), self.Proc(4242, None)])

    def nvmlDeviceGetGraphicsRunningProcesses(self, h):
        return self._sensor(h, [self.Proc(4242, 300 * MiB), self.Proc(7, 100 * MiB)])

    def nvmlSystemGetProcessName(self, pid):
        if pid == 7:
            raise self.NVMLError("no such process")
        return "python"


@pytest.fixture
def fake_nvml(monkeypatch):
    from modelconsole.gpu import devices

    fake = FakeNvml()
    monkeypatch.setattr(devices, "_nvml", lambda: fake)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    return fake


def test_nvml_reading_on_fake(fake_nvml):
    b = NvmlBackend()
    assert b.kind == "nvml" and b.count() == 3 and NvmlBackend.available()
    r = b.read(0)
    # driver-reserved memory is left out of total (v2), so used + free == total, as CUDA sees it
    assert (r.total_bytes, r.used_bytes, r.free_bytes) == (10 * GiB - 512 * MiB, 2 * GiB, 8 * GiB - 512 * MiB)
    assert (r.name, r.utilization_pct, r.temperature_c, r.power_w) == ("Fake 0", 37.0, 55.0, 123.456)
    # compute + graphics merged per pid (largest figure), None memory -> 0, unknown name -> None
    expected = [
        ProcessMemory(7, 100 * MiB, None),
        ProcessMemory(4242, 300 * MiB, "python"),
        ProcessMemory(os.getpid(), GiB, "python"),
    ]
    assert r.processes == tuple(sorted(expected, key=lambda p: p.pid))
    assert r.other_processes_bytes(os.getpid()) == 400 * MiB
    json.dumps(r.to_dict())
    # a device with no optional sensors still reads
    r1 = b.read(1)
    assert (r1.name, r1.utilization_pct, r1.temperature_c, r1.power_w, r1.processes) == ("GPU 1", None, None, None, ())
    assert b.torch_device(2) == torch.device("cuda", 2)
    b.allocate(0, "m", GiB)  # no-ops
    b.release(0, "m")
    with pytest.raises(IndexError):
        b.read(3)
    b.close()
    b.close()
    assert fake_nvml.shutdowns == fake_nvml.inits  # available() and the backend both shut down once


def test_nvml_v1_fallback(fake_nvml):
    fake_nvml.v2 = False
    r = NvmlBackend().read(0)
    assert (r.total_bytes, r.used_bytes, r.free_bytes) == (10 * GiB, 2 * GiB + 512 * MiB, 8 * GiB - 512 * MiB)


@pytest.mark.parametrize(
    "cvd, handles",
    [
        ("2,0", [2, 0]),
        ("1", [1]),
        ("0,7,1", [0]),  # CUDA stops at the first invalid index
        ("1,,2", [1]),  # ... and at an empty entry
        ("", []),  # set but empty: no devices
        ("GPU-fake-2,GPU-fake-1", [2, 1]),
        ("MIG-xyz", [0, 1, 2]),  # other forms: identity
    ],
)
def test_nvml_respects_cuda_visible_devices(fake_nvml, monkeypatch, cvd, handles):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", cvd)
    b = NvmlBackend()
    assert b._handles == handles and b.count() == len(handles)
    if handles:
        assert b.read(0).total_bytes == 10 * GiB + handles[0] * GiB - 512 * MiB


# --------------------------------------------------------------------------- CUDA without NVML


def test_cuda_without_nvml_still_has_budgets_from_torchs_figures():
    """TorchCudaBackend reads what torch.cuda reports (passed in here: this machine has no GPU) and
    the memory manager builds real budgets on it: other processes' use shrinks them, ours does not."""
    import os

    from modelconsole.gpu.devices import TorchCudaBackend
    from modelconsole.scheduler.config import GpuConfig
    from modelconsole.scheduler.events import EventBus
    from modelconsole.scheduler.memory import MemoryManager

    total, free, ours = 80 * GiB, 60 * GiB, 5 * GiB  # 20 GiB used: 5 ours, 15 another process's
    backend = TorchCudaBackend("NVMLError_LibraryNotFound", count=2, mem_get_info=lambda i: (free, total),
                               memory_reserved=lambda i: ours, device_name=lambda i: "Fake H200")
    assert backend.kind == "torch" and "NVML is unavailable (NVMLError_LibraryNotFound)" in backend.warning
    r = backend.read(1)
    assert (r.total_bytes, r.used_bytes, r.free_bytes) == (total, 20 * GiB, free)
    assert r.own_bytes(os.getpid()) == ours and r.other_processes_bytes(os.getpid()) == 15 * GiB
    mm = MemoryManager(backend, GpuConfig(reserve_mib=512), EventBus())
    mm.set_own_pid(os.getpid())
    assert sorted(mm.budgets) == [0, 1]
    assert mm.budgets[0].usable(r) == total - 512 * MiB - 15 * GiB  # the other process's memory is left alone
    assert mm.available(0) == total - 512 * MiB - 15 * GiB - ours  # and ours is already committed
