"""A managed device shared by several models: which ready batch runs next.

Each device has a few slots (``[gpu] device_slots``: batches running on it
at once).  A model with a ready batch takes a free slot at once; when none is
free it waits, and when a slot frees the waiting model with the highest
urgency gets it (``policy.urgency``: how close its oldest request is to the
model's latency target, raised when its measured p95 already misses it,
weighted by base priority, plus aging so nobody starves).

Pure bookkeeping on the event loop; the formula is in policy.py.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from . import policy

if TYPE_CHECKING:
    from .instance import ModelInstance


def model_urgency(inst: ModelInstance, now: float) -> float:
    return policy.urgency(
        oldest_wait_s=now - inst.queue.oldest_enqueued() if inst.queue.size else 0.0,
        latency_target_s=inst.cfg.latency_target_ms / 1000.0,
        p95_s=inst.p95_s,
        base_priority=inst.cfg.priority,
        since_last_run_s=now - inst.last_run,
    )


class SharedDevice:
    def __init__(self, index: int, slots: int):
        self.index = index
        self.slots = slots
        self.running = 0
        self.waiting: dict[str, ModelInstance] = {}
        self.grants = 0  # slots handed to a waiting model by urgency
        self.last_choice: dict[str, Any] | None = None

    def acquire(self, inst: ModelInstance) -> bool:
        """Take a slot now (True), or wait for one (False: inst.granted() is called later)."""
        if self.running < self.slots and not self.waiting:
            self.running += 1
            return True
        self.waiting[inst.key] = inst
        return False

    def release(self, still_waiting: ModelInstance | None = None) -> None:
        """A batch finished (or a grant was not used): give the slot to the most urgent waiter.

        still_waiting: the model whose batch finished, when it has more queued
        (it competes for the slot it just freed instead of keeping it).
        """
        self.running -= 1
        if still_waiting is not None:
            self.waiting[still_waiting.key] = still_waiting
        while self.waiting and self.running < self.slots:
            now = time.monotonic()
            scores = [(key, model_urgency(inst, now)) for key, inst in self.waiting.items()]
            key = policy.pick_next(scores)
            if key is None:  # not while anything waits
                break
            inst = self.waiting.pop(key)
            self.grants += 1
            self.last_choice = {"chosen": key, "urgency": dict(scores)}
            self.running += 1
            inst.granted()

    def forget(self, inst: ModelInstance) -> None:
        self.waiting.pop(inst.key, None)

    def to_dict(self) -> dict[str, Any]:
        return {"slots": self.slots, "running": self.running, "waiting": list(self.waiting),
                "grants": self.grants, "last_choice": self.last_choice}
