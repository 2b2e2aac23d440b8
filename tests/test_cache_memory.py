"""The result cache's byte bound is what the process really spends (RSS), not a guess.

Each entry used to be counted as its data plus 256 bytes while a small torch
tensor costs about a kilobyte: a "256 MiB" cache held over 1 GiB.  Here a
cache bounded at 32 MiB is filled ten times over with small answers (the
worst case for overhead) in a fresh process, and its RSS growth must stay
within the bound plus a small constant.
"""

from __future__ import annotations

import subprocess
import sys

PROBE = r"""
import gc, sys, torch, xxhash
from modelconsole.scheduler.cache import ResultCache

def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096

bound = 32 << 20
outs = [{"logits": torch.randn(1, 10), "extra": torch.randn(1, 3)} for _ in range(256)]
cache = ResultCache(bound)
gc.collect()
before = rss()
for i in range(400_000):
    cache.put(xxhash.xxh3_128(i.to_bytes(8, "little")).digest(), outs[i % 256], ("m", "1"))
    if i % 1000 == 0 and i:  # hits rebuild tensors: they must not leak either
        cache.get(xxhash.xxh3_128((i - 1).to_bytes(8, "little")).digest())
gc.collect()
print(rss() - before, cache.bytes, len(cache), cache.evictions)
"""


def test_a_full_cache_costs_its_bound_plus_a_constant():
    out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, timeout=600, check=True)
    growth, counted, entries, evictions = map(int, out.stdout.split())
    bound = 32 << 20
    assert counted <= bound and evictions > 0 and entries > 10_000
    assert growth <= bound * 1.15 + (8 << 20), f"RSS grew {growth / 2**20:.1f} MiB for a {bound >> 20} MiB cache"
