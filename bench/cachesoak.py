"""Result-cache soak: does a server's RSS stay within the cache's bound plus a constant?

    python bench/cachesoak.py               # 5 minutes, a 64 MiB cache
    python bench/cachesoak.py --quick       # 1 minute

A real ``modelconsole --serve`` with one cached model (tiny-mlp) and
``[cache] max_bytes`` set; clients send requests whose inputs never repeat,
so every answer is stored and the cache fills, then churns (evicting the
oldest) for the rest of the run.  The server's RSS is sampled throughout.

Prints a table, then as its LAST line one JSON object: ``rss_growth_mib``
(peak RSS minus RSS after warm-up), ``cache_bound_mib``, ``cache_counted_mib``
(what the cache says it holds at the end), ``entries``, ``evictions``.
"""

from __future__ import annotations

import sys
from pathlib import Path

# `python bench/cachesoak.py` puts bench/ first on sys.path, where bench/http.py would shadow the standard
# library's http package (used right below): move bench/ to the end before importing anything else.
_HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _HERE] + [str(_HERE)]

import argparse
import http.client
import json
import random
import socket
import struct
import tempfile
import threading
import time

from serveproc import control_token, start_server


def rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def client(port: int, seed: int, stop: threading.Event, counts: list[int]) -> None:
    """Binary V2 requests with fresh random inputs: every one is a cache miss and a new entry."""
    rnd = random.Random(seed)
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    head = json.dumps({"inputs": [{"name": "input", "shape": [1, 64], "datatype": "FP32",
                                   "parameters": {"binary_data_size": 256}}]}).encode()
    while not stop.is_set():
        body = head + struct.pack("64f", *(rnd.random() for _ in range(64)))
        conn.request("POST", "/v2/models/tiny/infer", body, {"Inference-Header-Content-Length": str(len(head)),
                                                             "Content-Type": "application/octet-stream"})
        r = conn.getresponse()
        r.read()
        counts[0 if r.status == 200 else 1] += 1


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="one minute")
    ap.add_argument("--seconds", type=float, default=300.0)
    ap.add_argument("--cache-mib", type=int, default=64)
    ap.add_argument("--clients", type=int, default=4)
    args = ap.parse_args()
    if args.quick:
        args.seconds = 60.0
    config = (f'[cache]\nmax_bytes = "{args.cache_mib}MiB"\n\n[[models]]\nname = "tiny"\nsource = "zoo:tiny-mlp"\n'
              'device = "cpu"\ncache = true\n')
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as tmp:
        proc = start_server(Path(tmp), port, config)
        token = control_token(Path(tmp), port)
        stop = threading.Event()
        counts = [0, 0]
        c = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
        c.request("POST", "/api/models/tiny/load", "{}", {"Authorization": f"Bearer {token}",
                                                         "Content-Type": "application/json"})
        c.getresponse().read()  # the model loaded before the baseline: only the cache grows after it
        time.sleep(1.0)
        baseline = peak = rss_bytes(proc.pid)
        threads = [threading.Thread(target=client, args=(port, i, stop, counts), daemon=True)
                   for i in range(args.clients)]
        for t in threads:
            t.start()
        samples = []
        start = time.monotonic()
        while time.monotonic() - start < args.seconds:
            time.sleep(1.0)
            rss = rss_bytes(proc.pid)
            peak = max(peak, rss)
            samples.append((time.monotonic() - start, rss))
        stop.set()
        for t in threads:
            t.join(60)
        c = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        c.request("GET", "/api/snapshot", headers={"Authorization": f"Bearer {token}"})
        cache = json.loads(c.getresponse().read())["cache"]
        proc.terminate()
        proc.wait(60)
    print(f"{'t (s)':>8} {'RSS MiB':>9}")
    for t, rss in samples[:: max(1, len(samples) // 10)]:
        print(f"{t:8.0f} {rss / 2**20:9.1f}")
    print(f"requests {counts[0]} ok, {counts[1]} failed; cache {cache}")
    print(json.dumps({
        "rss_growth_mib": round((peak - baseline) / 2**20, 1),
        "cache_bound_mib": args.cache_mib,
        "cache_counted_mib": round(cache["bytes"] / 2**20, 1),
        "entries": cache["entries"],
        "evictions": cache["evictions"],
    }))


if __name__ == "__main__":
    main()
