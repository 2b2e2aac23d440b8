"""Host memory as a budget, like a GPU's: CPU models, their replicas, the host tier and the cache.

A model on the CPU holds host memory, and so does each of its replicas (a full
copy each), the pinned host tier and the result cache.  Unbudgeted, one
registration (``replicas = 62`` of a 414 MiB encoder) ate a 24 GB host until
the kernel killed the server.  So the host gets a budget:

    usable = min([host] budget_gib, limit - [host] reserve_mib)
    limit  = min(MemTotal, the cgroup's memory limit)

The result cache and the host tier are charged at start, at their configured
bounds (a start whose bounds alone exceed the budget is refused).  A CPU model's
load reserves its estimate (then its measured footprint) the way a GPU load
does, evicting idle CPU models by the same keep-value (``policy.plan_eviction``)
when it must; it is refused with ``InsufficientMemory`` (503, Retry-After)
when nothing may be evicted now (the kind a GPU's refusal has), and a registration whose copies could never
fit (``replicas`` x the estimate beyond the whole budget) is refused at once
(``WontFit``, 507), also when a restart restores it.  The budget counts what
the engine places, not the process's RSS: the interpreter, torch and the
front end's buffers sit inside the reserve.  ``remote:`` models hold no
weights and are not charged; models on managed (or simulated) GPUs are charged
to their device's budget instead.

One owner: the engine calls ``make_room``, ``commit`` and ``release`` under its
control lock.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from modelconsole.gpu.budget import DeviceBudget, GiB, MiB
from modelconsole.gpu.devices import DeviceReading

from . import policy
from .config import ConfigError, HostConfig
from .errors import EngineError
from .memory import InsufficientMemory

if TYPE_CHECKING:
    from .instance import ModelInstance

HOST = "host"


class WontFit(EngineError):
    """The model (with all its replicas) can never fit the host budget: refused at registration."""

    status = 507
    kind = "insufficient_memory"


def _read_int(path: str) -> int | None:
    try:
        text = Path(path).read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def host_limit() -> tuple[int, str]:
    """The host memory this process may use, and where the figure came from."""
    total = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                total = int(line.split()[1]) * 1024
                break
    except OSError:
        pass
    if total is None:
        import os

        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    limit, source = total, "MemTotal"
    for path in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        cg = _read_int(path)
        if cg is not None and cg < limit:
            limit, source = cg, f"the cgroup limit ({path})"
    return limit, source


class HostMemory:
    """The host budget: fixed charges (cache, host tier) and CPU models' reservations."""

    def __init__(self, cfg: HostConfig, fixed: dict[str, int], limit: int | None = None) -> None:
        total, self.source = host_limit() if limit is None else (limit, "given")
        budget = int(cfg.budget_gib * GiB) if cfg.budget_gib is not None else None
        self.budget = DeviceBudget(-1, budget, 1.0, int(cfg.reserve_mib * MiB))
        self.reading = DeviceReading(index=-1, name="host", total_bytes=total, used_bytes=0, free_bytes=total,
                                     utilization_pct=None, temperature_c=None, power_w=None, processes=(),
                                     ts=time.time())
        for owner, nbytes in fixed.items():
            if nbytes > 0:
                self.budget.reserve(owner, nbytes)
        if self.available() < 0:
            shown = ", ".join(f"{k} {v / GiB:.2f} GiB" for k, v in fixed.items() if v)
            raise ConfigError(f"host memory: {shown} exceed the host budget of {self.usable() / GiB:.2f} GiB "
                              f"({self.source} {total / GiB:.2f} GiB less [host] reserve_mib "
                              f"{cfg.reserve_mib:g}); lower them or raise [host] budget_gib")

    def usable(self) -> int:
        return self.budget.usable(self.reading)

    def available(self) -> int:
        return self.budget.available(self.reading)

    def check_fits(self, label: str, copies: int, each: int) -> None:
        """WontFit (507) when ``copies`` x ``each`` bytes exceed the whole budget left to models."""
        fixed = sum(v for k, v in self.budget.reservations.items() if not k.startswith("model:"))
        room = self.usable() - fixed
        if copies * each > room:
            what = f"{copies} copies (replicas) of about {each / GiB:.2f} GiB" if copies > 1 else \
                f"about {each / GiB:.2f} GiB"
            raise WontFit(f"{label}: {what} cannot fit the host's memory budget ({room / GiB:.2f} GiB for models "
                          f"of {self.usable() / GiB:.2f} GiB usable; [host] budget_gib, reserve_mib)" +
                          (f"; at most {max(0, room // max(each, 1))} replicas fit" if copies > 1 else ""))

    async def make_room(self, inst: ModelInstance, need: int, residents: list[ModelInstance],
                        evict: Callable[[ModelInstance, str], Awaitable[None]], min_residency_s: float) -> None:
        """Reserve ``need`` bytes for ``inst``, evicting CPU models by keep-value if it must."""
        avail = self.available()
        if need > avail:
            now = time.monotonic()
            held = [r.residency(now) for r in residents]
            plan = policy.plan_eviction(held, need, avail, now, min_residency_s=min_residency_s,
                                        incoming=inst.residency(now, need))
            if plan is None:
                when = policy.earliest_room(held, need, avail, now, min_residency_s)
                inst.last_used = now
                pinned = sum(1 for r in residents if r.pinned)
                busy = sum(1 for r in residents if r.busy())
                raise InsufficientMemory(
                    f"model {inst.key} needs about {need / GiB:.2f} GiB of host memory and "
                    f"{avail / GiB:.2f} GiB of the host budget ({self.usable() / GiB:.2f} GiB usable) is free; "
                    f"the {len(residents)} models on the CPU cannot make room now ({pinned} pinned, {busy} busy)",
                    retry_after=max(1.0, when - now) if when is not None else 5.0)
            by_key = {r.key: r for r in residents}
            for key in plan.victims:
                await evict(by_key[key], f"to make host memory for {inst.key} ({need / GiB:.2f} GiB): {plan.reason}")
        self.budget.reserve(_owner(inst), need)

    def commit(self, inst: ModelInstance, footprint: int) -> None:
        self.budget.reserve(_owner(inst), max(0, footprint))

    def release(self, inst: ModelInstance) -> None:
        self.budget.release(_owner(inst))

    def holds(self, inst: ModelInstance) -> bool:
        return _owner(inst) in self.budget.reservations

    def snapshot(self) -> dict[str, Any]:
        d = self.budget.to_dict(self.reading)
        d["index"] = HOST
        d["total_bytes"] = self.reading.total_bytes
        d["limit_source"] = self.source
        return d


def _owner(inst: ModelInstance) -> str:
    return f"model:{inst.key}"
