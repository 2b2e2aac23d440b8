"""A version's states, as the snapshot, the events and the console spell them.

UNLOADED -> LOADING -> WARMING -> READY -> UNLOADING -> UNLOADED; FAILED (with a reason)
when a load or its warmup fails.
"""

UNLOADED, LOADING, WARMING, READY, UNLOADING, FAILED = (
    "UNLOADED",
    "LOADING",
    "WARMING",
    "READY",
    "UNLOADING",
    "FAILED",
)
