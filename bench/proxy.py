"""A ``remote:`` model against calling its server directly, with the unmodified tritonclient.

    python bench/proxy.py            # ~1 minute
    python bench/proxy.py --quick    # ~20 s

Two real ``modelconsole --serve`` processes on loopback: the *remote* serves
``tiny`` (zoo:tiny-mlp on the CPU); the *proxy* registers ``tiny`` as
``remote:http://127.0.0.1:PORT`` (batching on, ``max_batch_size = 32``).
The same client load goes to each, interleaved round by round:

- c=1: one tritonclient (HTTP, binary tensors) sending requests one after
  another; the p50 latency;
- c=64: 64 concurrent tritonclient.http.aio requests in flight for a while;
  answers per second.

Prints a table, then as its LAST line one JSON object with exactly
``proxy_overhead_p50_us`` (proxy p50 - direct p50, target <= 300) and
``proxy_rps_ratio`` (proxy req/s / direct req/s at c=64, target >= 0.8).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

# `python bench/proxy.py` puts bench/ first on sys.path, where bench/http.py shadows the stdlib's http
_HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _HERE]
sys.path.append(str(_HERE))  # serveproc, after the stdlib

import numpy as np  # noqa: E402
from serveproc import start_server  # noqa: E402

REMOTE = """
[[models]]
name = "tiny"
source = "zoo:tiny-mlp"
warmup = 1
device = "cpu"
max_batch_size = 32
"""


def proxy_config(port: int) -> str:
    return f"""
[[models]]
name = "tiny"
source = "remote:http://127.0.0.1:{port}"
warmup = 1
max_batch_size = 32
timeout_s = 10
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def c1_latencies(port: int, n: int) -> list[float]:
    import tritonclient.http as http

    client = http.InferenceServerClient(f"127.0.0.1:{port}")
    x = np.random.default_rng(0).standard_normal((1, 64), dtype=np.float32)
    inp = http.InferInput("input", [1, 64], "FP32")
    inp.set_data_from_numpy(x, binary_data=True)
    out = [http.InferRequestedOutput("logits", binary_data=True)]
    for _ in range(20):
        client.infer("tiny", [inp], outputs=out)
    times = []
    for _ in range(n):
        t = time.perf_counter()
        client.infer("tiny", [inp], outputs=out)
        times.append(time.perf_counter() - t)
    client.close()
    return times


async def c64_rps(port: int, seconds: float, concurrency: int = 64) -> tuple[float, int]:
    import tritonclient.http.aio as aio

    client = aio.InferenceServerClient(f"127.0.0.1:{port}", conn_limit=concurrency)
    x = np.random.default_rng(1).standard_normal((1, 64), dtype=np.float32)
    inp = aio.InferInput("input", [1, 64], "FP32")
    inp.set_data_from_numpy(x, binary_data=True)
    out = [aio.InferRequestedOutput("logits", binary_data=True)]
    done = errors = 0
    stop = time.perf_counter() + seconds

    async def one() -> None:
        nonlocal done, errors
        while time.perf_counter() < stop:
            try:
                await client.infer("tiny", [inp], outputs=out)
                done += 1
            except Exception:  # noqa: BLE001 - counted, the load goes on
                errors += 1

    t = time.perf_counter()
    await asyncio.gather(*(one() for _ in range(concurrency)))
    elapsed = time.perf_counter() - t
    await client.close()
    return done / elapsed, errors


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer requests and shorter rounds")
    ap.add_argument("--rounds", type=int, default=None, help="interleaved rounds per side (3; --quick 2)")
    args = ap.parse_args()
    rounds = args.rounds or (2 if args.quick else 3)
    n1, secs = (200, 2.0) if args.quick else (600, 5.0)
    with tempfile.TemporaryDirectory(prefix="mc-bench-proxy-") as tmp:
        root = Path(tmp)
        (root / "remote").mkdir()
        (root / "proxy").mkdir()
        rport, pport = free_port(), free_port()
        remote = start_server(root / "remote", rport, REMOTE)
        proxy = start_server(root / "proxy", pport, proxy_config(rport))
        try:
            lat = {"direct": [], "proxy": []}
            rps = {"direct": [], "proxy": []}
            errors = 0
            for _ in range(rounds):
                for side, port in (("direct", rport), ("proxy", pport)):
                    lat[side] += c1_latencies(port, n1)
                for side, port in (("direct", rport), ("proxy", pport)):
                    r, e = asyncio.run(c64_rps(port, secs))
                    rps[side].append(r)
                    errors += e
        finally:
            for p in (proxy, remote):
                p.terminate()
                p.wait(30)
    p50 = {k: statistics.median(v) * 1e6 for k, v in lat.items()}
    p99 = {k: float(np.percentile(v, 99)) * 1e6 for k, v in lat.items()}
    mean_rps = {k: statistics.median(v) for k, v in rps.items()}
    print(f"tiny-mlp on the CPU, {rounds} interleaved rounds per side; c=1: {n1} requests a round; "
          f"c=64: {secs:g} s a round; {errors} errors")
    print(f"{'':<10}{'c=1 p50 µs':>12}{'c=1 p99 µs':>12}{'c=64 req/s':>12}")
    for side in ("direct", "proxy"):
        print(f"{side:<10}{p50[side]:>12.0f}{p99[side]:>12.0f}{mean_rps[side]:>12.0f}")
    overhead = p50["proxy"] - p50["direct"]
    ratio = mean_rps["proxy"] / mean_rps["direct"]
    print(f"proxy overhead at c=1: {overhead:.0f} µs (target <= 300); c=64 ratio {ratio:.2f} (target >= 0.8)")
    print(json.dumps({"proxy_overhead_p50_us": round(overhead, 1), "proxy_rps_ratio": round(ratio, 3)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
