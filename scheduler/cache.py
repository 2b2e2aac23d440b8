"""The result cache: LRU over every model, bounded in bytes, successful results only.

Key: a 128-bit xxh3 hash of the model name, version and every input's name,
datatype, shape and bytes — the same key Triton's response cache uses.  A
hit is answered before the request reaches the queue or the device.

Stored outputs are private copies (a batch's outputs are views into one big
tensor; keeping a view would pin the whole batch), and a hit hands out fresh
copies, so a caller that modifies its result cannot corrupt the cache.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

import numpy as np
import torch
import xxhash

from .tensors import TensorSpec

ENTRY_OVERHEAD = 256  # bytes of bookkeeping counted per entry


def _nbytes(value: Any) -> int:
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, np.ndarray):
        if value.dtype == object:
            return sum(len(v) if isinstance(v, (bytes, str)) else 8 for v in value.flat)
        return value.nbytes
    return 64


def _copy(value: Any) -> Any:
    return value.clone() if isinstance(value, torch.Tensor) else np.array(value, copy=True)


class ResultCache:
    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self._entries: OrderedDict[bytes, tuple[dict[str, Any], int, tuple[str, str]]] = OrderedDict()
        self.bytes = 0
        self.hits = 0
        self.misses = 0
        self.evictions = 0

    @staticmethod
    def key(prefix: bytes, specs: tuple[TensorSpec, ...], tensors: list[Any]) -> bytes:
        """prefix identifies the model version; then each input's name, datatype, shape and bytes."""
        h = xxhash.xxh3_128(prefix)
        for spec, t in zip(specs, tensors):
            h.update(spec.name.encode())
            h.update(spec.datatype.encode())
            h.update(repr(tuple(t.shape)).encode())
            if isinstance(t, torch.Tensor):
                if t.dtype == torch.bfloat16:
                    t = t.view(torch.int16)
                h.update(t.contiguous().numpy().data)
            else:  # BYTES: length-prefixed elements
                for item in t.flat:
                    b = item if isinstance(item, bytes) else str(item).encode()
                    h.update(len(b).to_bytes(4, "little"))
                    h.update(b)
        return h.digest()

    def get(self, key: bytes) -> dict[str, Any] | None:
        entry = self._entries.get(key)
        if entry is None:
            self.misses += 1
            return None
        self._entries.move_to_end(key)
        self.hits += 1
        return {name: _copy(v) for name, v in entry[0].items()}

    def put(self, key: bytes, outputs: dict[str, Any], owner: tuple[str, str]) -> None:
        size = ENTRY_OVERHEAD + sum(_nbytes(v) for v in outputs.values())
        if size > self.max_bytes or key in self._entries:
            return
        self._entries[key] = ({name: _copy(v) for name, v in outputs.items()}, size, owner)
        self.bytes += size
        while self.bytes > self.max_bytes:
            _, (_, old_size, _) = self._entries.popitem(last=False)
            self.bytes -= old_size
            self.evictions += 1

    def invalidate(self, owner: tuple[str, str]) -> int:
        """Drop one model version's entries (its definition changed)."""
        stale = [k for k, (_, _, o) in self._entries.items() if o == owner]
        for k in stale:
            self.bytes -= self._entries.pop(k)[1]
        return len(stale)

    def __len__(self) -> int:
        return len(self._entries)

    def to_dict(self) -> dict[str, int]:
        return {
            "entries": len(self._entries),
            "bytes": self.bytes,
            "max_bytes": self.max_bytes,
            "hits": self.hits,
            "misses": self.misses,
            "evictions": self.evictions,
        }
