"""The host-memory tier: evicted models' weights kept in pinned host memory.

A reload from here is a host -> device copy (~50 GB/s from pinned memory on
an H200) instead of a file read and a rebuild (~2 GB/s from safetensors):
docs/design.md (facts the design leans on) gives the gap, about 25x.  The tier is
bounded in bytes (``[gpu] host_tier_gib``) and LRU within the bound; beyond
it the oldest entries are dropped and their next load reads the source.

Entries are whole loaded models (module and declared tensors), moved to the
CPU with their tensors packed into one pinned buffer per dtype when CUDA is
there (``Packed``), so a reload is one copy per dtype whatever the number of
tensors.  ``torch.export``
programs are not kept: moving one between devices needs a graph pass, not
``.to()``, so they reload from their file.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import torch

from .sources import LoadedModel

ALIGN = 256  # bytes: each tensor's slice of a packed buffer starts on this boundary


@dataclass
class Packed:
    """A host-tier model's tensors in one pinned buffer per dtype: a reload is one copy per dtype
    (a BERT has ~200 tensors: as many copies cost a launch each, a fifth of a 12 ms reload), and
    the pinning is one allocation, not one per tensor.  ``slots``: (tensor, dtype, offset, shape)
    for every parameter and buffer (each once: a tied weight is one tensor)."""

    buffers: dict[torch.dtype, torch.Tensor]
    slots: list[tuple[torch.Tensor, torch.dtype, int, torch.Size]]


@dataclass
class Kept:
    """A model in the tier: what it was loaded as, and its packed tensors (None: not packed,
    e.g. without CUDA; it moves with ``module.to``)."""

    loaded: LoadedModel
    packed: Packed | None = None


def _tensors(module: torch.nn.Module) -> list[torch.Tensor]:
    seen: set[int] = set()
    out = []
    for t in list(module.parameters()) + list(module.buffers()):
        if id(t) not in seen:
            seen.add(id(t))
            out.append(t)
    return out


def _pack(module: torch.nn.Module) -> Packed:
    tensors = _tensors(module)
    sizes: dict[torch.dtype, int] = {}
    slots = []
    for t in tensors:
        step = max(1, ALIGN // t.element_size())
        offset = -(-sizes.get(t.dtype, 0) // step) * step
        slots.append((t, t.dtype, offset, t.shape))
        sizes[t.dtype] = offset + t.numel()
    buffers = {dtype: torch.empty(n, dtype=dtype, pin_memory=True) for dtype, n in sizes.items()}
    for t, dtype, offset, shape in slots:
        view = buffers[dtype][offset:offset + t.numel()].view(shape)
        view.copy_(t.data)
        t.data = view
    return Packed(buffers, slots)


def to_host(loaded: LoadedModel) -> Kept:
    """Move a model's weights to host memory, packed and pinned when CUDA is there.  Worker thread."""
    module = loaded.module.to("cpu")
    kept = LoadedModel(module, loaded.inputs, loaded.outputs, loaded.weight_bytes, loaded.platform)
    return Kept(kept, _pack(module) if torch.cuda.is_available() else None)


def to_device(entry: Kept, device: torch.device) -> LoadedModel:
    """Copy a host-tier model onto its device: one non-blocking copy per dtype from its pinned
    buffers, the tensors then views of the device's copy.  Worker thread."""
    loaded = entry.loaded
    if entry.packed is None or device.type != "cuda":
        module = loaded.module.to(device, non_blocking=True)
    else:
        on_device = {dtype: buf.to(device, non_blocking=True) for dtype, buf in entry.packed.buffers.items()}
        for t, dtype, offset, shape in entry.packed.slots:
            t.data = on_device[dtype][offset:offset + t.numel()].view(shape)
        module = loaded.module
        entry.packed = None  # the host copy goes once the copy is done (the entry is the caller's now)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return LoadedModel(module, loaded.inputs, loaded.outputs, loaded.weight_bytes, loaded.platform)


class HostTier:
    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self._entries: OrderedDict[str, tuple[Kept, int]] = OrderedDict()
        self.bytes = 0
        self.hits = 0
        self.drops = 0

    @property
    def enabled(self) -> bool:
        return self.max_bytes > 0

    def accepts(self, loaded: LoadedModel) -> bool:
        return self.enabled and loaded.platform != "pytorch_export" and loaded.weight_bytes <= self.max_bytes

    def put(self, key: str, entry: Kept) -> list[str]:
        """Keep entry; drop the least recently kept beyond the bound.  Returns the dropped keys."""
        self.take(key)
        self._entries[key] = (entry, entry.loaded.weight_bytes)
        self.bytes += entry.loaded.weight_bytes
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

    def take(self, key: str) -> Kept | None:
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
