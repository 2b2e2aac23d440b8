"""The result cache: LRU over every model, bounded in bytes, successful results only.

Key: a 128-bit xxh3 hash of the model name, version and every input's name,
datatype, shape and bytes — the same key Triton's response cache uses.  A
hit is answered before the request reaches the queue or the device.

Entries hold each output as one ``bytes`` blob with its dtype and shape,
not as tensors: a small torch tensor costs about a kilobyte of object and
allocator overhead beyond its data, which made a 256 MiB cache hold over
1 GiB.  ``entry_size`` counts what an entry really costs — the key, every
blob, the containers around them, and the dictionary's slot — so RSS stays
within the configured bound plus a small constant (tests/test_cache_memory.py).
Storing copies the outputs (a batch's outputs are views into one big tensor;
keeping a view would pin the whole batch), and a hit builds fresh tensors, so
a caller that modifies its result cannot corrupt the cache.
"""

from __future__ import annotations

import sys
from collections import OrderedDict
from typing import Any

import numpy as np
import xxhash

from .tensors import TensorSpec, is_torch_tensor, torch_module

# The OrderedDict's own cost per entry (hash table slot and linked-list node), measured on
# CPython 3.11 as RSS growth over 2x10^5 entries minus what sys.getsizeof accounts for.
SLOT_OVERHEAD = 184

# (name, kind, dtype, shape, data): kind "t" a torch tensor (data: bytes), "o" a numpy object array
Stored = tuple[str, str, Any, tuple[int, ...], Any]


def _store(name: str, value: Any) -> Stored:
    if is_torch_tensor(value):
        torch = torch_module()
        t = value.detach().cpu().contiguous()
        raw = t.view(torch.int16) if t.dtype == torch.bfloat16 else t
        return (name, "t", t.dtype, tuple(t.shape), raw.numpy().tobytes())
    if isinstance(value, np.ndarray) and value.dtype != object:
        return (name, "n", value.dtype, value.shape, np.ascontiguousarray(value).tobytes())
    return (name, "o", None, np.shape(value), np.array(value, dtype=object, copy=True))


def _load(item: Stored) -> Any:
    _, kind, dtype, shape, data = item
    if kind == "t":
        torch = torch_module()
        if dtype == torch.bfloat16:
            return torch.from_numpy(np.frombuffer(data, dtype=np.int16).reshape(shape).copy()).view(torch.bfloat16)
        return torch.from_numpy(np.frombuffer(data, dtype=torch.empty((), dtype=dtype).numpy().dtype)
                                .reshape(shape).copy())
    if kind == "n":
        return np.frombuffer(data, dtype=dtype).reshape(shape).copy()
    return np.array(data, dtype=object, copy=True)


def _data_size(item: Stored) -> int:
    data = item[4]
    if isinstance(data, bytes):
        return sys.getsizeof(data)
    return sys.getsizeof(data) + sum(sys.getsizeof(v) for v in data.flat)


def entry_size(key: bytes, stored: tuple[Stored, ...]) -> int:
    """What one entry costs in memory: key, blobs, the tuples holding them, the dict's slot."""
    size = SLOT_OVERHEAD + sys.getsizeof(key) + sys.getsizeof(stored) + 64  # 64: the entry's own tuple
    for item in stored:
        size += sys.getsizeof(item) + sys.getsizeof(item[3]) + _data_size(item)
    return size


def input_digest(entries: Any) -> bytes:
    """xxh3-128 of a request's inputs: (name, datatype, shape, V2 wire bytes) each, sorted by
    name (the wire bytes: little-endian row-major, BF16 as its 16 bits, BYTES length-prefixed)."""
    h = xxhash.xxh3_128()
    for name, datatype, shape, data in entries:
        h.update(name.encode() + b"\0" + datatype.encode() + b"\0" + repr(tuple(shape)).encode())
        h.update(data)
    return h.digest()


def _wire(t: Any) -> Any:
    """A validated tensor's V2 wire bytes (what ``input_digest`` hashes)."""
    if is_torch_tensor(t):
        torch = torch_module()
        if t.dtype == torch.bfloat16:
            t = t.view(torch.int16)
        return t.contiguous().numpy().data
    parts = []  # BYTES: length-prefixed elements
    for item in t.flat:
        b = item if isinstance(item, bytes) else str(item).encode()
        parts.append(len(b).to_bytes(4, "little"))
        parts.append(b)
    return b"".join(parts)


class ResultCache:
    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self._entries: OrderedDict[bytes, tuple[tuple[Stored, ...], int, tuple[str, str]]] = OrderedDict()
        self.bytes = 0
        self.hits = 0
        self.misses = 0
        self.evictions = 0

    @staticmethod
    def key(prefix: bytes, specs: tuple[TensorSpec, ...], tensors: list[Any], digest: bytes | None = None) -> bytes:
        """prefix identifies the model version; ``digest`` (``input_digest``) the inputs.

        A front-end process computes the digest while it packs the tensors for the engine
        core, so the core's event loop never hashes tensor bytes; without one it is computed
        here, from the same bytes."""
        if digest is None:
            digest = input_digest(sorted(((s.name, s.datatype, tuple(t.shape), _wire(t))
                                          for s, t in zip(specs, tensors)), key=lambda e: e[0]))
        return xxhash.xxh3_128(prefix + digest).digest()

    def get(self, key: bytes) -> dict[str, Any] | None:
        entry = self._entries.get(key)
        if entry is None:
            self.misses += 1
            return None
        self._entries.move_to_end(key)
        self.hits += 1
        return {item[0]: _load(item) for item in entry[0]}

    def put(self, key: bytes, outputs: dict[str, Any], owner: tuple[str, str]) -> None:
        if key in self._entries:
            return
        stored = tuple(_store(name, v) for name, v in outputs.items())
        size = entry_size(key, stored)
        if size > self.max_bytes:
            return
        self._entries[key] = (stored, size, owner)
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
