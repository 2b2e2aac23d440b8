"""What a version shows of itself: the snapshot the console, ``/api/models`` and the V2
metadata read, and each replica's line in it.  Read-only views of a ``ModelInstance``.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from . import policy
from . import shared as shared_mod
from .states import READY, UNLOADING, WARMING

if TYPE_CHECKING:
    from .instance import ModelInstance


def version_snapshot(inst: ModelInstance) -> dict[str, Any]:
    """The version's whole picture (its primary's, with every replica's line)."""
    now = time.monotonic()
    return {
        "name": inst.name,
        "version": inst.version,
        "state": inst.state,
        "reason": inst.reason,
        "source": inst.cfg.source,
        "trusted": inst.trusted,
        "platform": inst.platform,
        "device": str(inst.device) if inst.device is not None else inst.cfg.device,
        "device_label": inst.device_label,
        "weight_bytes": inst.weight_bytes,
        "footprint_bytes": inst.footprint_bytes if inst.state in (READY, WARMING, UNLOADING) else 0,
        "load_seconds": inst.load_seconds,
        "loaded_at": inst.loaded_at,
        "registered_at": inst.registered_at,
        "device_index": inst.device_index,
        "load_source": inst.load_source,
        "urgency": shared_mod.model_urgency(inst, now) if inst.queue.size else 0.0,
        "latency_target_ms": inst.cfg.latency_target_ms,
        "cuda_graphs": inst.cuda_graph_sizes,
        "eviction": policy.explain(inst.residency(now), now)
        if inst.device_index is not None and inst.state == READY else None,
        "in_host_tier": inst.host_tier is not None and inst.key in inst.host_tier,
        "pinned": inst.pinned,
        "stalled": inst.stalled,
        "request_rate": inst.rate.rate(now),
        "queue": inst.queue.size,
        "waiting_for_room": inst.waiting_for_room,
        "in_flight": inst.in_flight,
        "inputs": [s.to_dict() for s in inst.inputs] if inst.inputs else None,
        "outputs": [s.to_dict() for s in inst.outputs] if inst.outputs else None,
        "config": inst.cfg.to_dict(),
        "stats": inst.stats.to_dict(),
        "replicas": [replica_view(r) for r in inst.replica_set],
        "remote": remote_view(inst),
        "text": text_view(inst),
    }



def replica_view(inst: ModelInstance) -> dict[str, Any]:
    """This replica in its version's snapshot (``replicas``)."""
    return {"replica": inst.replica, "state": inst.state, "reason": inst.reason,
            "device": str(inst.device) if inst.device is not None else inst.cfg.device,
            "device_label": inst.device_label,
            "device_index": inst.device_index, "queue": inst.queue.size, "in_flight": inst.in_flight,
            "served": inst.served,
            "footprint_bytes": inst.footprint_bytes if inst.state in (READY, WARMING, UNLOADING) else 0}


def text_view(inst: ModelInstance) -> dict[str, Any] | None:
    """A text model's tokenizer, buckets and padding waste so far; None for every other model."""
    plan = inst.text_plan
    if plan is None:
        return None
    waste = getattr(inst.module, "padding_waste", None)
    return {"tokenizer": plan.tokenizer, "max_length": plan.max_length, "truncation": plan.truncation,
            "buckets": list(plan.buckets), "pairs": plan.pair, "head": getattr(inst.module, "kind", None),
            "padding_waste": waste() if callable(waste) else None}


def remote_view(inst: ModelInstance) -> dict[str, Any] | None:
    """A remote: model's target and health (never its token); None for every other source."""
    cfg = inst.cfg
    if cfg.source_kind != "remote":
        return None
    module = inst.module
    circuit = getattr(module, "circuit", None)
    return {"url": cfg.source_ref, "model": cfg.model or inst.name, "remote_version": cfg.remote_version,
            "circuit": circuit.state if circuit is not None else None,
            "failures_in_a_row": circuit.failures if circuit is not None else 0,
            "last_call_ms": getattr(module, "last_call_ms", None),
            "last_remote_ms": getattr(module, "last_remote_ms", None)}
