"""The host-memory tier: evicted models' weights kept in pinned host memory.

A reload from here is a host -> device copy (~50 GB/s from pinned memory on
an H200) instead of a file read and a rebuild (~2 GB/s from safetensors):
shared/reference/gpu-limits.md measured the gap at ~25x.  The tier is
bounded in bytes (``[gpu] host_tier_gib``) and LRU within the bound; beyond
it the oldest entries are dropped and their next load reads the source.

Entries are whole loaded models (module and declared tensors), moved to the
CPU with their storages pinned when CUDA is there.  ``torch.export``
programs are not kept: moving one between devices needs a graph pass, not
``.to()``, so they reload from their file.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

import torch

from .sources import LoadedModel


def to_host(loaded: LoadedModel) -> LoadedModel:
    """Move a model's weights to (pinned, when CUDA is there) host memory.  Worker thread."""
    module = loaded.module.to("cpu")
    if torch.cuda.is_available():
        for t in list(module.parameters()) + list(module.buffers()):
            t.data = t.data.pin_memory()
    return LoadedModel(module, loaded.inputs, loaded.outputs, loaded.weight_bytes, loaded.platform)


def to_device(entry: LoadedModel, device: torch.device) -> LoadedModel:
    """Copy a host-tier model onto its device (non-blocking from pinned memory).  Worker thread."""
    module = entry.module.to(device, non_blocking=True)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return LoadedModel(module, entry.inputs, entry.outputs, entry.weight_bytes, entry.platform)


class HostTier:
    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self._entries: OrderedDict[str, tuple[LoadedModel, int]] = OrderedDict()
        self.bytes = 0
        self.hits = 0
        self.drops = 0

    @property
    def enabled(self) -> bool:
        return self.max_bytes > 0

    def accepts(self, loaded: LoadedModel) -> bool:
        return self.enabled and loaded.platform != "pytorch_export" and loaded.weight_bytes <= self.max_bytes

    def put(self, key: str, entry: LoadedModel) -> list[str]:
        """Keep entry; drop the least recently kept beyond the bound.  Returns the dropped keys."""
        self.take(key)
        self._entries[key] = (entry, entry.weight_bytes)
        self.bytes += entry.weight_bytes
        dropped = []
        while self.bytes > self.max_bytes and self._entries:
            old, (_, size) = self._entries.popitem(last=False)
            self.bytes -= size
            self.drops += 1
            dropped.append(old)
        return dropped

    def discard(self, key: str) -> None:
        """Drop key's entry, if any (its model was deleted)."""
        item = self._entries.pop(key, None)
        if item is not None:
            self.bytes -= item[1]

    def take(self, key: str) -> LoadedModel | None:
        """Remove and return key's entry (it goes back to a device)."""
        item = self._entries.pop(key, None)
        if item is None:
            return None
        self.bytes -= item[1]
        self.hits += 1
        return item[0]

    def __contains__(self, key: str) -> bool:
        return key in self._entries

    def to_dict(self) -> dict[str, Any]:
        return {"entries": list(self._entries), "bytes": self.bytes, "max_bytes": self.max_bytes,
                "hits": self.hits, "drops": self.drops}
