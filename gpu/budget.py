"""Per-device memory budgets: what we may still place on each device.

usable    = min(configured budget, total - reserve - what other processes use)
committed = max(sum of our reservations, what the device says this process uses)
available = usable - committed

Why each term:
- other processes' memory comes from the device's own per-process readings
  (NVML), read at every decision: Ollama's users hit OOM because it was not
  counted;
- a reservation is taken *before* a load starts (the estimate), replaced by
  the measured footprint after it, and kept through an unload until the
  device shows the memory back: the driver's free figure lags, and a load
  must never be placed on memory that is still being returned;
- taking the larger of our reservations and our measured usage covers both
  directions: a load not yet allocated, and memory we hold that no model
  accounts for (the CUDA context, the allocator's cache).

The engine's control path is the only writer (one owner); everything here is
plain arithmetic on a reading, so it is tested without hardware.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from .devices import DeviceReading

MiB = 2**20
GiB = 2**30


@dataclass
class DeviceBudget:
    index: int
    limit_bytes: int | None = None  # configured budget (absolute); None: the whole device
    fraction: float = 1.0  # of the device's total
    reserve_bytes: int = 512 * MiB  # kept back for the CUDA context, fragmentation, others
    reservations: dict[str, int] = field(default_factory=dict)  # owner -> bytes
    own_pid: int = field(default_factory=os.getpid)

    def usable(self, reading: DeviceReading) -> int:
        cap = int(reading.total_bytes * self.fraction)
        if self.limit_bytes is not None:
            cap = min(cap, self.limit_bytes)
        room = reading.total_bytes - self.reserve_bytes - reading.other_processes_bytes(self.own_pid)
        return max(0, min(cap, room))

    def reserved(self) -> int:
        return sum(self.reservations.values())

    def own_used(self, reading: DeviceReading) -> int:
        return sum(p.used_bytes for p in reading.processes if p.pid == self.own_pid)

    def committed(self, reading: DeviceReading) -> int:
        return max(self.reserved(), self.own_used(reading))

    def available(self, reading: DeviceReading) -> int:
        return self.usable(reading) - self.committed(reading)

    def reserve(self, owner: str, nbytes: int) -> None:
        self.reservations[owner] = nbytes

    def release(self, owner: str) -> int:
        return self.reservations.pop(owner, 0)

    def to_dict(self, reading: DeviceReading) -> dict[str, Any]:
        return {
            "index": self.index,
            "usable_bytes": self.usable(reading),
            "reserved_bytes": self.reserved(),
            "committed_bytes": self.committed(reading),
            "available_bytes": self.available(reading),
            "reserve_bytes": self.reserve_bytes,
            "other_processes_bytes": reading.other_processes_bytes(self.own_pid),
            "own_pid": self.own_pid,
            "reservations": dict(self.reservations),
        }


def place(need_bytes: int, candidates: Sequence[tuple[int, int, float]]) -> int | None:
    """Pick a device for a load: (index, available_bytes, load) per candidate.

    Among the devices where the model fits, the least loaded one (fewest
    requests in flight per its models), then the one with most room left,
    then the lowest index: a new model spreads traffic before it packs
    memory.  None when it fits nowhere (the caller makes room or refuses).
    """
    fitting = [c for c in candidates if c[1] >= need_bytes]
    if not fitting:
        return None
    return min(fitting, key=lambda c: (c[2], -c[1], c[0]))[0]
