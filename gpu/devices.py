"""What the hardware says: one device interface, two implementations.

``DeviceBackend`` is everything the engine asks of a device: how many there
are, a reading (memory, utilisation, temperature, power, per-process memory),
which ``torch.device`` to put tensors on, and two accounting calls
(``allocate`` / ``release``) made around every load and unload.

- ``NvmlBackend`` reads real NVIDIA GPUs through NVML (``nvidia-ml-py``,
  import ``pynvml``).  NVML is used rather than ``torch.cuda.mem_get_info``
  because its figures are the *device's*: ``used`` / ``free`` count every
  process on the card, and the per-process list tells our own memory apart
  from other processes' (which is what a budget must subtract; a scheduler
  that only counts its own tensors OOMs as soon as something else shares
  the GPU).  It is cheap (microseconds a call), so it can be read on every
  decision.  ``allocate`` / ``release`` are no-ops: real allocations are
  real and show up in the readings by themselves.

- ``SimulatedBackend`` has the same interface with no GPU at all: a
  configured capacity per device, tensor bytes accounted per owner as
  models load and unload, and test hooks for what real devices do to a
  scheduler -- another process taking memory, frees that show up late in
  the readings, and loads failing with out-of-memory.  Models run on the
  CPU while their bytes are counted against the simulated device, so every
  scheduling decision (budgets, placement, eviction, OOM recovery) is
  testable on a development machine or in CI; ``tests/gpu/`` proves the
  same on a real GPU.

Both raise the same exception for out-of-memory (``torch.OutOfMemoryError``,
which is what CUDA allocations raise), so the engine has one OOM path.

``open_backend`` picks: the simulated backend when asked for (``[gpu]
simulate = "2x24GiB"``), NVML when a GPU is there, and otherwise a simulated
backend with no devices (``count() == 0``: CPU only) -- never ``None``, so
callers need no special case.
"""

from __future__ import annotations

import abc
import dataclasses
import os
import re
import threading
import time
from dataclasses import dataclass
from typing import Any, Self

import torch

__all__ = [
    "DeviceBackend",
    "DeviceReading",
    "NvmlBackend",
    "OutOfMemoryError",
    "ProcessMemory",
    "SimulatedBackend",
    "open_backend",
    "parse_simulate",
]

# The exception real CUDA allocations raise (torch >= 2.5 exposes it at the
# top level; torch.cuda.OutOfMemoryError is the same class).
OutOfMemoryError: type[RuntimeError] = getattr(torch, "OutOfMemoryError", None) or torch.cuda.OutOfMemoryError

MiB = 2**20
GiB = 2**30

# pid reported for injected "other process" usage on the simulated backend:
# never a real pid of ours (pid 0 is the kernel's), so other_processes_bytes()
# always counts it.
OTHER_PID = 0


# --------------------------------------------------------------------------- readings


@dataclass(frozen=True)
class ProcessMemory:
    """Device memory one process holds, as the device reports it."""

    pid: int
    used_bytes: int
    name: str | None = None


@dataclass(frozen=True)
class DeviceReading:
    """One snapshot of one device.

    ``used_bytes`` / ``free_bytes`` are the device's figures: they include
    every process, not only ours.  Optional sensors a device lacks read as
    ``None``.  ``ts`` is wall-clock time (``time.time()``) of the reading.
    """

    index: int
    name: str
    total_bytes: int
    used_bytes: int
    free_bytes: int
    utilization_pct: float | None
    temperature_c: float | None
    power_w: float | None
    processes: tuple[ProcessMemory, ...]
    ts: float

    def other_processes_bytes(self, own_pid: int) -> int:
        """Memory held by processes other than ``own_pid`` (what a budget must leave alone)."""
        return sum(p.used_bytes for p in self.processes if p.pid != own_pid)

    def own_bytes(self, own_pid: int) -> int:
        """Memory the device says ``own_pid`` holds."""
        return sum(p.used_bytes for p in self.processes if p.pid == own_pid)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-able dict (processes as a list of dicts)."""
        d = dataclasses.asdict(self)
        d["processes"] = [dataclasses.asdict(p) for p in self.processes]
        return d


# --------------------------------------------------------------------------- interface


class DeviceBackend(abc.ABC):
    """What the engine asks of its devices.  Indices are CUDA indices (0..count-1)."""

    kind: str = ""

    @abc.abstractmethod
    def count(self) -> int:
        """Number of devices."""

    @abc.abstractmethod
    def read(self, index: int) -> DeviceReading:
        """A fresh reading of device ``index``."""

    def read_all(self) -> list[DeviceReading]:
        return [self.read(i) for i in range(self.count())]

    def uuid(self, index: int) -> str | None:
        """Device ``index``'s stable id (``GPU-…``) where the backend knows it; None here."""
        return None

    @abc.abstractmethod
    def torch_device(self, index: int) -> torch.device:
        """Where tensors for device ``index`` go (``cuda:index``, or the CPU when simulated)."""

    @abc.abstractmethod
    def allocate(self, index: int, owner: str, nbytes: int) -> None:
        """Account ``nbytes`` more for ``owner`` on ``index``; may raise ``torch.OutOfMemoryError``."""

    @abc.abstractmethod
    def release(self, index: int, owner: str) -> None:
        """Everything ``owner`` holds on ``index`` is being freed (readings may lag)."""

    def open_context(self, index: int) -> None:  # noqa: B027 - optional hook: most backends have no context
        """Create this process's context on device ``index`` (a CUDA context: ~0.5 GiB, ~1 s).

        Called once per device at engine start, between two readings, so
        ``find_own_pid`` can tell which process in the device's list is us.
        """

    def close(self) -> None:  # noqa: B027 - optional hook: most backends hold nothing
        """Release backend resources; idempotent."""

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _check_index(self, index: int) -> None:
        n = self.count()
        if not isinstance(index, int) or not 0 <= index < n:
            raise IndexError(f"{self.kind} device index {index!r} out of range (have {n} device(s))")


# --------------------------------------------------------------------------- own pid


def own_pid_from(os_pid: int, before: set[int], after: set[int]) -> int | None:
    """Which pid in a device's process list is this process, or None if it cannot be told.

    ``before`` and ``after`` are the pids listed (on all managed devices)
    before and after this process opened its contexts.  Our own pid when it
    is listed (no container, or one sharing the host's pid namespace).
    Otherwise the driver lists us under the host's pid, which we cannot see:
    it is the one pid that appeared when our contexts were opened.  None if
    none or several appeared (a context opened earlier, another process
    starting at the same moment): the caller keeps ``os_pid`` and says so.
    """
    if os_pid in after:
        return os_pid
    new = after - before
    return next(iter(new)) if len(new) == 1 else None


# The pid NVML lists this process under, once found (a CUDA context lives as long as the
# process, so a later engine in the same process cannot see it appear again).
_nvml_own_pid: int | None = None


def find_own_pid(backend: DeviceBackend, indices: list[int]) -> int | None:
    """Open this process's context on each device and return the pid the devices list us under.

    See ``own_pid_from``.  On NVML the answer is kept for the process, and a
    new context not listed at once is polled for up to a second.  Called from
    a worker thread (opening a CUDA context blocks).
    """
    global _nvml_own_pid
    nvml = backend.kind == "nvml"
    if nvml and _nvml_own_pid is not None:
        for i in indices:
            backend.open_context(i)
        return _nvml_own_pid

    def pids() -> set[int]:
        return {p.pid for i in indices for p in backend.read(i).processes}

    before = pids()
    for i in indices:
        backend.open_context(i)
    deadline = time.monotonic() + (1.0 if nvml and indices else 0.0)
    while True:
        found = own_pid_from(os.getpid(), before, pids())
        if found is not None or time.monotonic() >= deadline:
            break
        time.sleep(0.05)
    if nvml and found is not None:
        _nvml_own_pid = found
    return found


# --------------------------------------------------------------------------- NVML


class _CudaBackend(DeviceBackend):
    """Real CUDA devices, whoever reads their memory (NVML, or torch when NVML fails)."""

    def torch_device(self, index: int) -> torch.device:
        self._check_index(index)
        return torch.device("cuda", index)

    def open_context(self, index: int) -> None:
        """One tiny tensor on ``cuda:index``: creates this process's CUDA context there."""
        torch.empty(1, device=self.torch_device(index))

    def allocate(self, index: int, owner: str, nbytes: int) -> None:
        """No-op: real allocations are made by torch and show in readings by themselves."""

    def release(self, index: int, owner: str) -> None:
        """No-op: the engine frees tensors and calls ``torch.cuda.empty_cache()``."""


def _nvml():
    import pynvml  # imported lazily: a missing or broken NVML must not break import of this module

    return pynvml


def _visible_devices(spec: str | None) -> list[str] | None:
    """CUDA_VISIBLE_DEVICES as CUDA reads it: entries up to the first empty one; None when unset."""
    if spec is None:
        return None
    out: list[str] = []
    for part in spec.split(","):
        part = part.strip()
        if not part:
            break
        out.append(part)
    return out


class NvmlBackend(_CudaBackend):
    """Real NVIDIA GPUs through NVML.

    Index ``i`` is the CUDA index (what ``torch.device("cuda", i)`` means).
    When ``CUDA_VISIBLE_DEVICES`` lists integer indices or GPU UUIDs, CUDA
    index ``i`` is its ``i``-th entry and is mapped to that NVML device;
    otherwise (unset, or MIG / other forms) the mapping is the identity.
    (NVML enumerates in PCI bus order; CUDA does too when
    ``CUDA_DEVICE_ORDER=PCI_BUS_ID``, and in practice on identical GPUs.)

    Memory figures are CUDA's view (driver-reserved memory excluded, see
    ``_memory``).  Memory info is required: a failure to read it raises.
    Every other reading (utilisation, temperature, power, processes, names)
    that the device or driver does not support reads as ``None`` / empty.

    Per-process pids are the driver's: inside a container without the host's
    pid namespace they are host pids and will not match ``os.getpid()``.
    """

    kind = "nvml"

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._closed = False
        self._mem_v2 = True
        pynvml = _nvml()
        pynvml.nvmlInit()
        try:
            self._handles = self._map_handles(pynvml)
        except BaseException:
            pynvml.nvmlShutdown()
            raise

    def uuid(self, index: int) -> str | None:
        raw = _nvml().nvmlDeviceGetUUID(self._handles[index])
        return raw.decode() if isinstance(raw, bytes) else str(raw)

    @staticmethod
    def _map_handles(pynvml) -> list[Any]:
        n = pynvml.nvmlDeviceGetCount()
        visible = _visible_devices(os.environ.get("CUDA_VISIBLE_DEVICES"))
        if visible is None:
            return [pynvml.nvmlDeviceGetHandleByIndex(i) for i in range(n)]
        if all(re.fullmatch(r"\d+", v) for v in visible):
            handles = []
            for v in visible:
                i = int(v)
                if i >= n:  # CUDA stops at the first invalid entry
                    break
                handles.append(pynvml.nvmlDeviceGetHandleByIndex(i))
            return handles
        if all(v.upper().startswith("GPU-") for v in visible):
            handles = []
            for v in visible:
                try:
                    handles.append(pynvml.nvmlDeviceGetHandleByUUID(v))
                except pynvml.NVMLError:
                    break  # unknown or abbreviated UUID: CUDA's own matching is looser; stop here
            if handles:
                return handles
        return [pynvml.nvmlDeviceGetHandleByIndex(i) for i in range(n)]

    @classmethod
    def available(cls) -> bool:
        """True when NVML initialises and reports at least one device; never raises."""
        return cls.probe() is None

    @classmethod
    def probe(cls) -> str | None:
        """None when NVML initialises and reports at least one device, else why not; never raises."""
        try:
            pynvml = _nvml()
            pynvml.nvmlInit()
        except Exception as e:
            return f"{type(e).__name__}: {e}"
        try:
            return None if pynvml.nvmlDeviceGetCount() > 0 else "NVML reports no devices"
        except Exception as e:
            return f"{type(e).__name__}: {e}"
        finally:
            try:
                pynvml.nvmlShutdown()
            except Exception:
                pass

    def count(self) -> int:
        return len(self._handles)

    def read(self, index: int) -> DeviceReading:
        self._check_index(index)
        if self._closed:
            raise RuntimeError("NvmlBackend is closed")
        pynvml = _nvml()
        h = self._handles[index]
        total, used, free = self._memory(pynvml, h)

        def opt(fn, *args):
            try:
                return fn(*args)
            except pynvml.NVMLError:
                return None

        name = opt(pynvml.nvmlDeviceGetName, h)
        if isinstance(name, bytes):
            name = name.decode(errors="replace")
        util = opt(pynvml.nvmlDeviceGetUtilizationRates, h)
        temp = opt(pynvml.nvmlDeviceGetTemperature, h, pynvml.NVML_TEMPERATURE_GPU)
        power_mw = opt(pynvml.nvmlDeviceGetPowerUsage, h)
        return DeviceReading(
            index=index,
            name=name or f"GPU {index}",
            total_bytes=total,
            used_bytes=used,
            free_bytes=free,
            utilization_pct=float(util.gpu) if util is not None else None,
            temperature_c=float(temp) if temp is not None else None,
            power_w=power_mw / 1000.0 if power_mw is not None else None,
            processes=self._processes(pynvml, h, opt),
            ts=time.time(),
        )

    def _memory(self, pynvml, h) -> tuple[int, int, int]:
        """(total, used, free) in the terms ``cudaMemGetInfo`` uses.

        NVML's v1 memory info counts the driver's reserved memory (about
        615 MiB on an H200 with driver 580) in both ``total`` and ``used``,
        so a budget built on it would count that memory as allocatable and
        as already taken by someone.  The v2 call reports it apart:
        ``total - reserved`` is what CUDA can allocate (it equals
        ``torch.cuda.mem_get_info()[1]``) and ``used + free`` adds up to it.
        Drivers or bindings without v2 fall back to v1.
        """
        if self._mem_v2:
            try:
                m = pynvml.nvmlDeviceGetMemoryInfo(h, version=pynvml.nvmlMemory_v2)
                reserved = int(getattr(m, "reserved", 0) or 0)
                return int(m.total) - reserved, int(m.used), int(m.free)
            except (pynvml.NVMLError, AttributeError, TypeError):
                self._mem_v2 = False  # not supported here: v1 from now on
        m = pynvml.nvmlDeviceGetMemoryInfo(h)
        return int(m.total), int(m.used), int(m.free)

    @staticmethod
    def _processes(pynvml, h, opt) -> tuple[ProcessMemory, ...]:
        # Compute processes are what holds CUDA memory; graphics processes
        # (a desktop, a renderer) hold memory too, so they are merged in.  A
        # process can appear in both lists: keep its largest figure.
        by_pid: dict[int, int] = {}
        for fn in (pynvml.nvmlDeviceGetComputeRunningProcesses, pynvml.nvmlDeviceGetGraphicsRunningProcesses):
            for p in opt(fn, h) or ():
                used = getattr(p, "usedGpuMemory", None)
                used = int(used) if isinstance(used, int) else 0  # None: not available (MIG, WDDM)
                by_pid[int(p.pid)] = max(by_pid.get(int(p.pid), 0), used)
        out = []
        for pid, used in sorted(by_pid.items()):
            pname = opt(pynvml.nvmlSystemGetProcessName, pid)
            if isinstance(pname, bytes):
                pname = pname.decode(errors="replace")
            out.append(ProcessMemory(pid=pid, used_bytes=used, name=pname or None))
        return tuple(out)

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
        try:
            _nvml().nvmlShutdown()
        except Exception:
            pass


# --------------------------------------------------------------------------- CUDA without NVML


class TorchCudaBackend(_CudaBackend):
    """CUDA devices when NVML cannot be used (no driver library in a container, a broken install).

    Budgets still hold: total and free memory come from
    ``torch.cuda.mem_get_info`` (what CUDA itself reports, every process
    included), this process's share from ``torch.cuda.memory_reserved``, and
    the rest counts as other processes' (an estimate: our CUDA context falls
    on that side, which errs towards less room, never more).  No utilisation,
    temperature, power or process list.  ``warning`` says all this once, as
    an event, so an operator knows the figures are degraded.
    """

    kind = "torch"

    def __init__(self, reason: str, *, count: int | None = None,
                 mem_get_info: Any = None, memory_reserved: Any = None, device_name: Any = None):
        # the torch functions by default; a test passes its own to read figures without a GPU
        self._count = torch.cuda.device_count() if count is None else count
        self._mem_get_info = mem_get_info or torch.cuda.mem_get_info
        self._reserved = memory_reserved or torch.cuda.memory_reserved
        self._name = device_name or torch.cuda.get_device_name
        self.warning = (f"NVML is unavailable ({reason}): GPU budgets come from torch.cuda.mem_get_info; other "
                        "processes' memory is estimated as the device's used memory minus this process's "
                        "reserved memory, and utilisation, temperature and power are not shown")

    def count(self) -> int:
        return self._count

    def read(self, index: int) -> DeviceReading:
        self._check_index(index)
        free, total = (int(x) for x in self._mem_get_info(index))
        used = total - free
        ours = min(used, int(self._reserved(index)))
        return DeviceReading(
            index=index, name=str(self._name(index)), total_bytes=total, used_bytes=used, free_bytes=free,
            utilization_pct=None, temperature_c=None, power_w=None,
            processes=(ProcessMemory(os.getpid(), ours, "this process (torch reserved)"),
                       ProcessMemory(0, used - ours, "other processes (estimated)")),
            ts=time.time())


# --------------------------------------------------------------------------- simulated


@dataclass
class _SimDevice:
    capacity: int
    name: str
    owners: dict[str, int] = dataclasses.field(default_factory=dict)
    other: int = 0
    pending: list[tuple[float, int]] = dataclasses.field(default_factory=list)  # (due monotonic, bytes)
    fail_next: int = 0
    utilization: float = 0.0

    def prune(self, now: float) -> None:
        if self.pending:
            self.pending = [(due, n) for due, n in self.pending if due > now]

    def ours(self) -> int:
        return sum(self.owners.values())

    def pending_bytes(self) -> int:
        return sum(n for _, n in self.pending)


class SimulatedBackend(DeviceBackend):
    """Devices that exist only as byte counts, for machines without a GPU.

    ``capacities`` are bytes per device.  ``allocate`` adds to an owner's
    bytes and raises ``torch.OutOfMemoryError`` (with CUDA's wording) when
    ours + other processes' + not-yet-visible frees would exceed the
    capacity, or when a failure was injected; a failed allocation changes
    nothing.  ``release`` drops an owner's bytes; with a free delay they keep
    showing as used by this process (and keep taking capacity) until the
    delay has passed, like a driver that reports frees late.

    Readings: ``used`` = ours + pending frees + other processes'; our usage
    is a ``ProcessMemory`` with ``os.getpid()``, injected usage one with pid
    ``OTHER_PID`` (0) named "other".  Utilisation is whatever the engine set
    with ``set_utilization`` (default 0.0); temperature and power are None.

    Test hooks for a container's view: ``reported_pid`` is the pid our usage
    is listed under (default ``os.getpid()``; a container without the host's
    pid namespace sees a host pid there), and ``context_bytes`` is what
    ``open_context`` charges to this process, as a CUDA context would.

    Tensors go to the CPU (``torch_device`` is ``cpu``).  Thread-safe.
    """

    kind = "simulated"

    def __init__(self, capacities: list[int], names: list[str] | None = None, free_delay_s: float = 0.0,
                 reported_pid: int | None = None, context_bytes: int = 0) -> None:
        capacities = [int(c) for c in capacities]
        if any(c <= 0 for c in capacities):
            raise ValueError(f"simulated device capacities must be positive, got {capacities}")
        if names is not None and len(names) != len(capacities):
            raise ValueError(f"{len(names)} name(s) for {len(capacities)} simulated device(s)")
        if free_delay_s < 0:
            raise ValueError(f"free_delay_s must be >= 0, got {free_delay_s}")
        self._lock = threading.RLock()
        self._free_delay_s = float(free_delay_s)
        self._devices = [
            _SimDevice(capacity=c, name=names[i] if names else f"Simulated GPU {i} ({_fmt_size(c)})")
            for i, c in enumerate(capacities)
        ]
        self._pid = os.getpid() if reported_pid is None else int(reported_pid)
        self._context_bytes = max(0, int(context_bytes))

    # -- interface
    def open_context(self, index: int) -> None:
        """Charge ``context_bytes`` (if any) to this process, as a CUDA context would be."""
        if self._context_bytes:
            with self._lock:
                d = self._devices[index]
                if "<context>" not in d.owners:
                    self.allocate(index, "<context>", self._context_bytes)

    def count(self) -> int:
        return len(self._devices)

    def torch_device(self, index: int) -> torch.device:
        self._check_index(index)
        return torch.device("cpu")

    def allocate(self, index: int, owner: str, nbytes: int) -> None:
        self._check_index(index)
        nbytes = int(nbytes)
        if nbytes < 0:
            raise ValueError(f"cannot allocate a negative number of bytes ({nbytes})")
        with self._lock:
            d = self._devices[index]
            d.prune(time.monotonic())
            if d.fail_next > 0:
                d.fail_next -= 1
                raise OutOfMemoryError(self._oom_message(index, d, nbytes, "injected failure"))
            if d.ours() + d.pending_bytes() + d.other + nbytes > d.capacity:
                raise OutOfMemoryError(self._oom_message(index, d, nbytes, None))
            d.owners[owner] = d.owners.get(owner, 0) + nbytes

    def release(self, index: int, owner: str) -> None:
        self._check_index(index)
        with self._lock:
            d = self._devices[index]
            nbytes = d.owners.pop(owner, 0)
            if nbytes and self._free_delay_s > 0:
                d.pending.append((time.monotonic() + self._free_delay_s, nbytes))

    def read(self, index: int) -> DeviceReading:
        self._check_index(index)
        with self._lock:
            d = self._devices[index]
            d.prune(time.monotonic())
            ours = d.ours() + d.pending_bytes()
            used = ours + d.other
            procs = []
            if ours:
                procs.append(ProcessMemory(pid=self._pid, used_bytes=ours, name="modelconsole"))
            if d.other:
                procs.append(ProcessMemory(pid=OTHER_PID, used_bytes=d.other, name="other"))
            return DeviceReading(
                index=index,
                name=d.name,
                total_bytes=d.capacity,
                used_bytes=used,
                free_bytes=max(0, d.capacity - used),
                utilization_pct=d.utilization,
                temperature_c=None,
                power_w=None,
                processes=tuple(procs),
                ts=time.time(),
            )

    def close(self) -> None:
        pass

    # -- inspection
    def allocations(self, index: int) -> dict[str, int]:
        """Owner -> bytes currently accounted on ``index`` (pending frees excluded)."""
        self._check_index(index)
        with self._lock:
            return dict(self._devices[index].owners)

    # -- test hooks
    def set_other_process(self, index: int, nbytes: int) -> None:
        """Pretend another process holds ``nbytes`` on ``index`` (replaces the previous figure)."""
        self._check_index(index)
        if nbytes < 0:
            raise ValueError(f"other-process bytes must be >= 0, got {nbytes}")
        with self._lock:
            self._devices[index].other = int(nbytes)

    def set_free_delay(self, seconds: float) -> None:
        """From now on, released bytes keep showing as used for ``seconds``."""
        if seconds < 0:
            raise ValueError(f"free delay must be >= 0, got {seconds}")
        with self._lock:
            self._free_delay_s = float(seconds)

    def fail_next_allocations(self, index: int, n: int = 1) -> None:
        """The next ``n`` allocate() calls on ``index`` raise OOM (adds to any already injected)."""
        self._check_index(index)
        with self._lock:
            self._devices[index].fail_next += int(n)

    def set_utilization(self, index: int, pct: float) -> None:
        """The utilisation figure readings report (the engine sets it from its own busy time)."""
        self._check_index(index)
        with self._lock:
            self._devices[index].utilization = float(pct)

    # -- helpers
    def _oom_message(self, index: int, d: _SimDevice, nbytes: int, why: str | None) -> str:
        ours, pending, other = d.ours(), d.pending_bytes(), d.other
        free = max(0, d.capacity - ours - pending - other)
        detail = why or (
            f"this process {ours / MiB:.2f} MiB, pending frees {pending / MiB:.2f} MiB, "
            f"other processes {other / MiB:.2f} MiB"
        )
        return (
            f"CUDA out of memory. Tried to allocate {nbytes / MiB:.2f} MiB. "
            f"GPU {index} has a total capacity of {d.capacity / GiB:.2f} GiB "
            f"of which {free / MiB:.2f} MiB is free. (simulated device {index}: {detail})"
        )


# --------------------------------------------------------------------------- choosing

_UNITS = {
    "b": 1,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "tb": 10**12,
}
_GROUP = re.compile(r"(?:(\d+)\s*x\s*)?(\d+(?:\.\d+)?)\s*([a-z]+)", re.IGNORECASE)


def parse_simulate(spec: str) -> list[int]:
    """Device capacities in bytes from a spec like ``"2x24GiB"``.

    Comma-separated groups of ``[COUNTx]SIZEUNIT``: ``"24GiB"`` is one device,
    ``"1x512MiB,1x8GiB"`` two.  Units (case-insensitive): B, KiB, MiB, GiB,
    TiB (powers of 1024) and KB, MB, GB, TB (powers of 1000, as disk vendors
    mean them).  Sizes may be decimal (``"1.5GiB"``).
    """
    expected = 'expected like "2x24GiB", "24GiB" or "1x512MiB,1x8GiB" (units B, KiB, MiB, GiB, KB, MB, GB)'
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(f"empty simulated device spec {spec!r}: {expected}")
    out: list[int] = []
    for group in spec.split(","):
        m = _GROUP.fullmatch(group.strip())
        if not m:
            raise ValueError(f"bad simulated device spec {spec!r} (at {group.strip()!r}): {expected}")
        count_s, size_s, unit = m.groups()
        mult = _UNITS.get(unit.lower())
        if mult is None:
            raise ValueError(f"unknown unit {unit!r} in simulated device spec {spec!r}: {expected}")
        count = int(count_s) if count_s is not None else 1
        size = int(float(size_s) * mult)
        if count <= 0:
            raise ValueError(f"device count must be at least 1 in {spec!r}: {expected}")
        if size <= 0:
            raise ValueError(f"device size must be positive in {spec!r}: {expected}")
        out.extend([size] * count)
    return out


def open_backend(simulate: str | None) -> DeviceBackend:
    """The backend the engine uses.

    - ``simulate`` given (e.g. ``"2x24GiB"``): a ``SimulatedBackend`` with
      those capacities, even on a machine with GPUs (tests, demos).  An empty
      or blank string counts as not given (an empty config value).
    - else NVML when it finds a GPU and torch can use CUDA;
    - CUDA without a working NVML: ``TorchCudaBackend`` (budgets from torch's
      own figures; its ``warning`` becomes a loud event at engine start);
    - else ``SimulatedBackend([])``: zero devices, i.e. CPU only.  Never None.
    """
    if simulate is not None and simulate.strip():
        return SimulatedBackend(parse_simulate(simulate))
    if torch.cuda.is_available():
        reason = NvmlBackend.probe()
        if reason is None:
            try:
                return NvmlBackend()
            except Exception as e:  # noqa: BLE001 - any NVML failure: torch's figures, loudly
                reason = f"{type(e).__name__}: {e}"
        return TorchCudaBackend(reason)
    return SimulatedBackend([])


def _fmt_size(n: int) -> str:
    for unit, mult in (("GiB", GiB), ("MiB", MiB), ("KiB", 2**10)):
        if n >= mult:
            v = n / mult
            return f"{v:g}{unit}" if v == int(v) else f"{v:.2f}{unit}"
    return f"{n}B"
