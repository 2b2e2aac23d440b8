"""Residency: which model versions hold device memory, and making room for a load.

One owner: every method that reads a budget to decide and then changes
residency runs under the engine's control lock (the engine calls them only
from its control path), so "is there room?" and "take it" cannot be split by
another decision — the race llama-swap learned about the hard way.

A load on a managed device goes: estimate -> place (or evict by keep-value
until it fits) -> reserve the estimate -> load -> the measured footprint
replaces the estimate.  An unload goes: free -> empty_cache -> wait (bounded)
until the device shows the memory back -> release the reservation.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from modelconsole.gpu.budget import DeviceBudget, GiB, MiB, place
from modelconsole.gpu.devices import DeviceBackend

from . import policy
from .config import GpuConfig, ModelConfig
from .errors import EngineError
from .events import EventBus

if TYPE_CHECKING:
    from .instance import ModelInstance

# Before a model's first load: its weights' size times this (activations,
# allocator rounding, workspaces).  After a load the measured footprint is
# remembered per model and used instead.
ESTIMATE_MULTIPLIER = 1.25
DEFAULT_ESTIMATE = 64 * MiB


class InsufficientMemory(EngineError):
    """No device can take the model, even after evicting what may be evicted."""

    status = 503
    kind = "insufficient_memory"


def weights_estimate(inst: ModelInstance) -> int:
    """Bytes a load is expected to take, before it has ever been measured."""
    return config_estimate(inst.cfg, inst.learned_footprint)


def config_estimate(cfg: ModelConfig, learned: int = 0) -> int:
    """``weights_estimate`` from a version's config (and its footprint measured earlier, if any):
    a registration's, before an instance exists."""
    if cfg.estimate_mib is not None:
        return int(cfg.estimate_mib * MiB)
    if learned:
        return learned
    if cfg.source_kind == "zoo":
        name = cfg.source_ref
        if name == "sized":
            return int(int(cfg.args.get("mib", 64)) * MiB * ESTIMATE_MULTIPLIER)
        if name == "encoder":
            d = int(cfg.args.get("d_model", 768))
            layers = int(cfg.args.get("layers", 12))
            vocab = int(cfg.args.get("vocab", 30522))
            ffn = int(cfg.args.get("ffn", 4 * d))
            params = vocab * d + layers * (4 * d * d + 2 * d * ffn)
            bytes_per = 2 if cfg.dtype in ("FP16", "BF16") else 4
            return int(params * bytes_per * ESTIMATE_MULTIPLIER)
        return DEFAULT_ESTIMATE
    try:
        path = Path(cfg.base_dir, cfg.source_ref)
        return int(os.path.getsize(path) * ESTIMATE_MULTIPLIER)
    except OSError:
        return DEFAULT_ESTIMATE


class MemoryManager:
    def __init__(self, backend: DeviceBackend, gpu: GpuConfig, events: EventBus):
        self.backend = backend
        self.cfg = gpu
        self.events = events
        limit = int(gpu.budget_gib * GiB) if gpu.budget_gib is not None else None
        self.budgets = {
            i: DeviceBudget(i, limit, gpu.memory_fraction, int(gpu.reserve_mib * MiB))
            for i in range(backend.count())
        }

    def set_own_pid(self, pid: int) -> None:
        """The pid the devices list this process under (a host pid inside a container)."""
        for budget in self.budgets.values():
            budget.own_pid = int(pid)

    # ------------------------------------------------------------ where a model goes

    def target_devices(self, device_spec: str) -> list[int] | None:
        """Managed devices a model may go to; None when it runs unmanaged (the CPU)."""
        if not self.budgets or device_spec == "cpu":
            return None
        if device_spec == "auto":
            return sorted(self.budgets)
        index = int(device_spec.split(":", 1)[1]) if ":" in device_spec else 0
        if index not in self.budgets:
            raise InsufficientMemory(f"device {device_spec}: this machine has {len(self.budgets)} device(s)")
        return [index]

    def torch_device(self, index: int) -> torch.device:
        return self.backend.torch_device(index)

    def available(self, index: int) -> int:
        return self.budgets[index].available(self.backend.read(index))

    async def make_room(
        self,
        inst: ModelInstance,
        need: int,
        targets: list[int],
        residents: Callable[[int], list[ModelInstance]],
        evict: Callable[[ModelInstance, str], Awaitable[None]],
    ) -> int:
        """Choose a device with `need` bytes available, evicting by keep-value if none has.

        Every load that the policy allows goes ahead (no admission test
        against the newcomer's value): a model asked for rarely must still be
        served when asked.  Thrashing is held off by the churn guard
        (min_residency_s), which the policy applies when the incoming model
        was itself used recently (half of a swap loop), not to a newcomer,
        and which protects only young models that came in that way too
        (``loaded_as_newcomer`` is set here).  A refused request counts as a
        use: the model's next attempt is a returner's, not a newcomer's.

        Returns the device index, with `need` reserved for inst there.
        """
        now = time.monotonic()
        incoming = inst.residency(now, need)  # its use before this request (prepare comes after the load)
        loads = {i: sum(r.in_flight + r.queue.size for r in residents(i)) for i in targets}
        cands = [(i, self.available(i), float(loads[i])) for i in targets]
        index = place(need, cands)
        if index is None:
            plans = []
            for i, avail, _ in cands:
                plan = policy.plan_eviction(
                    [r.residency(now) for r in residents(i)], need, avail, now,
                    min_residency_s=self.cfg.min_residency_s, incoming=incoming,
                )
                if plan is not None:
                    plans.append((plan.freed_bytes, i, plan))
            if not plans and all(need > self.budgets[i].usable(self.backend.read(i)) for i in targets):
                # bigger than any device's whole budget: retrying cannot help, so no Retry-After
                raise InsufficientMemory(
                    f"model {inst.key} needs about {need / GiB:.2f} GiB, more than the whole budget of any "
                    "device it may use (" + ", ".join(
                        f"device {i}: {self.budgets[i].usable(self.backend.read(i)) / GiB:.2f} GiB usable"
                        for i in targets) + "); raise [gpu] budget_gib/memory_fraction or set estimate_mib")
            if not plans:
                # when the churn guard will let a plan through (None: pinned/busy models hold it)
                times = [policy.earliest_room([r.residency(now) for r in residents(i)], need, avail, now,
                                              self.cfg.min_residency_s) for i, avail, _ in cands]
                known = [t for t in times if t is not None]
                retry: float | None = None  # pinned models hold it: only an operator can change that
                if known:
                    retry = max(1.0, min(known) - now)
                elif not self._pinned_block(need, targets, residents, now):
                    retry = 5.0  # busy ones drain, loads end, a swap's old version goes: then they may
                inst.last_used = now  # wanted now: when it retries it is a returner, not a newcomer
                hint = f"; retry in {retry:.0f}s" if retry is not None else "; unpin or unload a model to make room"
                raise InsufficientMemory(self._why_no_room(inst, need, targets, residents) + hint,
                                         retry_after=retry)
            _, index, plan = min(plans, key=lambda p: (p[0], p[1]))  # the plan that frees least
            by_key = {r.key: r for r in residents(index)}
            for key in plan.victims:
                await evict(by_key[key], f"to make room for {inst.key} ({need / GiB:.2f} GiB): {plan.reason}")
            if self.available(index) < need:
                raise InsufficientMemory(self._why_no_room(inst, need, targets, residents))
        inst.loaded_as_newcomer = not policy.churn_risk(incoming, now, self.cfg.min_residency_s)
        self.budgets[index].reserve(inst.key, need)
        return index

    def _pinned_block(self, need: int, targets: list[int], residents, now: float) -> bool:
        """On every target, what pinned models hold leaves less than ``need`` of the budget."""
        def pinned(i: int) -> int:
            return sum(r.residency(now).bytes for r in residents(i) if r.pinned)
        return all(self.budgets[i].usable(self.backend.read(i)) - pinned(i) < need for i in targets)

    def _why_no_room(self, inst: ModelInstance, need: int, targets: list[int], residents) -> str:
        parts = []
        for i in targets:
            rs = residents(i)
            pinned = sum(1 for r in rs if r.pinned)
            busy = sum(1 for r in rs if r.busy())
            parts.append(
                f"device {i}: {self.available(i) / GiB:.2f} GiB available of "
                f"{self.budgets[i].usable(self.backend.read(i)) / GiB:.2f} usable, "
                f"{len(rs)} resident ({pinned} pinned, {busy} busy)"
            )
        return (f"model {inst.key} needs about {need / GiB:.2f} GiB and no device can make room without "
                f"evicting pinned, busy or just-loaded models or ones worth more; " + "; ".join(parts))

    # ------------------------------------------------------------ after load / unload

    def commit(self, index: int, inst: ModelInstance, footprint: int) -> None:
        """The measured footprint replaces the estimate (and is charged to a simulated device)."""
        self.backend.allocate(index, inst.key, footprint)  # simulated: may raise OutOfMemoryError
        self.budgets[index].reserve(inst.key, footprint)
        inst.learned_footprint = footprint

    def forget(self, index: int, inst: ModelInstance) -> None:
        """Drop the reservation (and any device charge) of a load that failed."""
        self.budgets[index].release(inst.key)
        self.backend.release(index, inst.key)

    def own_used(self, index: int) -> int:
        """What the device shows this process holding on ``index`` now."""
        return self.budgets[index].own_used(self.backend.read(index))

    async def release(self, index: int, inst: ModelInstance, freed: int, before: int) -> bool:
        """After a model's memory was freed: wait until the device shows it back, then release.

        ``before`` is this process's usage (``own_used``) read BEFORE the
        model's tensors were freed.  It must be: on a real GPU the free and
        ``empty_cache()`` have already returned the memory by the time this
        runs, so a reading taken here would wait for a second drop that never
        comes (it did: every unload on the H100 waited the full unload_wait_s,
        a hot swap took 5.2 s).
        Waits at most unload_wait_s for 75% of the freed bytes to show as
        returned (the driver reports frees late); the reservation is kept
        until then so no load is placed on memory still being returned.
        """
        budget = self.budgets[index]
        self.backend.release(index, inst.key)
        deadline = time.monotonic() + self.cfg.unload_wait_s
        target = before - int(freed * 0.75)
        returned = True
        while freed > 0 and budget.own_used(self.backend.read(index)) > target:
            if time.monotonic() >= deadline:
                returned = False
                self.events.publish(
                    "memory_slow", f"device {index}: {inst.key}'s memory did not show as free within "
                    f"{self.cfg.unload_wait_s:g}s; releasing its reservation anyway",
                    model=inst.name, version=inst.version, level="warning")
                break
            await asyncio.sleep(0.05)
        budget.release(inst.key)
        return returned

    # ------------------------------------------------------------ observation

    def snapshot(self, residents: Callable[[int], list[ModelInstance]]) -> list[dict[str, Any]]:
        out = []
        for i, budget in sorted(self.budgets.items()):
            reading = self.backend.read(i)
            d = reading.to_dict()
            d["backend"] = self.backend.kind
            d["budget"] = budget.to_dict(reading)
            d["models"] = [r.key for r in residents(i)]
            out.append(d)
        return out
