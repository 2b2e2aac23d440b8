"""What the engine asks of a version's lifecycle, as plain predicates: is a load under way,
how long has it been idle, has it outlived its keep_alive, was a failure an out-of-memory.

The engine decides residency under its control lock; these only read a version's state,
so they are the same wherever they are asked (the janitor, delete, the eviction path).
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass, field

import torch

from . import replicas, sources
from .config import ModelConfig
from .instance import LOADING, READY, WARMING, ModelInstance
from .shared import model_urgency

# A replica that could not be loaded (no distinct device with room) is tried again after this
# many seconds, doubling each time up to the maximum.
REPLICA_RETRY_S = 10.0
REPLICA_RETRY_MAX_S = 300.0


@dataclass
class ModelEntry:
    """A model name: its versions and the one that serves requests without a version."""

    name: str
    versions: dict[str, ModelInstance] = field(default_factory=dict)
    active: str | None = None
    origin: dict[str, str] = field(default_factory=dict)  # version -> "config" | "store"


def is_oom(error: BaseException) -> bool:
    """A CUDA (or simulated) out-of-memory, possibly wrapped in LoadFailed."""
    e: BaseException | None = error
    while e is not None:
        if isinstance(e, torch.OutOfMemoryError) or "out of memory" in str(e).lower():
            return True
        e = e.__cause__
    return False


def loading(inst: ModelInstance) -> bool:
    """A load of ``inst`` is under way (deciding, reading its weights or committing)."""
    return inst.load_task is not None and not inst.load_task.done()


def group_loading(inst: ModelInstance) -> bool:
    """A load of any replica of ``inst``'s version is under way."""
    return any(loading(r) for r in inst.replica_set)


def idle_s(inst: ModelInstance, now: float) -> float:
    return now - max(inst.last_used, inst.loaded_mono)


async def derive_specs_off_loop(cfg: ModelConfig) -> None:
    """An hf: folder's tensors come from running its architecture on the meta device (hf.py),
    a second or so for a large model: done on a thread, where its cache keeps the answer for the
    checks that follow on the loop.  Errors are theirs to report."""
    if cfg.source_kind == "hf" and (cfg.inputs is None or cfg.outputs is None):
        with contextlib.suppress(Exception):
            await asyncio.to_thread(sources.declared_specs, cfg)
            await asyncio.to_thread(sources.text_plan, cfg)  # reads the tokenizer: off the loop too


def expired(inst: ModelInstance, now: float) -> bool:
    """A version (its primary) READY, not pinned, every replica idle and past its keep_alive."""
    ka = inst.cfg.keep_alive
    return (ka is not None and inst.state == READY and not inst.pinned
            and not any(r.busy() for r in inst.replica_set)
            and min(idle_s(r, now) for r in inst.replica_set if r.state == READY) > ka)


def retrieved(task: asyncio.Task) -> None:
    """A done-callback: a task's exception is read, so asyncio does not log it as never retrieved."""
    if not task.cancelled():
        task.exception()



def replica_load(primary: ModelInstance, seen: tuple[int, int],
                 now: float) -> tuple[replicas.Load, list[ModelInstance], ModelInstance | None]:
    """What ``replicas.replica_target`` weighs for a version: its live replicas, the mean queue
    wait since the last tick (``seen``: the queue time and sample count then), the urgency of
    its waiting requests and how long its last extra replica has been idle.  Answers the load,
    the live replicas and that last extra one (the one to unload when shrinking)."""
    stats = primary.stats
    seen_ns, seen_n = seen
    ran = stats.inference_count - seen_n
    live = [r for r in primary.replica_set if r.state in (READY, LOADING, WARMING)]
    ready = [r for r in live if r.state == READY]
    extras = [r for r in ready if r.replica > 0]
    last = max(extras, key=lambda r: r.replica) if extras else None
    load = replicas.Load(
        replicas=len(live),
        mean_wait_s=(stats.queue_ns - seen_ns) / ran / 1e9 if ran > 0 else 0.0,
        urgency=max((model_urgency(r, now) for r in ready if r.queue.size), default=0.0),
        latency_target_s=primary.cfg.latency_target_ms / 1000.0,
        idle_s=idle_s(last, now) if last is not None and not last.busy() else 0.0)
    return load, live, last
