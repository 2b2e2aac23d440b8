"""What the engine does once per process: warm the lazy imports and CUDA contexts before the
first load, and freeze the long-lived heap out of the garbage collector's walks.
"""

from __future__ import annotations

import gc

import torch

from modelconsole.gpu.devices import DeviceBackend, find_own_pid


def warm_process(backend: DeviceBackend, indices: list[int]) -> int | None:
    """Pay once, at start, what the first load would otherwise pay and charge to its model's
    measured reload time (which the eviction policy weighs): the lazy imports behind
    ``Module.to_empty`` (sympy, ~1.5 s) and each managed GPU's CUDA context.  Opening the
    contexts also tells which pid the devices list this process under (``find_own_pid``)."""
    torch.nn.Linear(1, 1, device="meta").to_empty(device="cpu")
    return find_own_pid(backend, indices)


_heap_frozen = False


def freeze_heap() -> None:
    """Take what the process holds at its first engine start out of the garbage collector's walks.

    That is the imported libraries (torch, numpy, aiohttp, ...: ~300k
    objects), which live as long as the process.  Every unload runs a full
    ``gc.collect()`` to free its module's reference cycles, and walking those
    objects too held the GIL for ~0.13 s on a 2-core CPU: the event loop and
    every forward in flight stood still, which in a hot swap is the new
    version's first batches.  Garbage is collected first, so nothing
    unreachable is frozen.  Once per process (``gc.freeze`` is process-wide):
    a later engine in the same process (tests, a restart in place) must not
    freeze the models another engine has loaded.
    """
    global _heap_frozen
    if not _heap_frozen:
        _heap_frozen = True
        gc.collect()
        gc.freeze()

