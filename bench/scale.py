"""Scale benchmark: a thousand models in one server — register, load, threads, memory, shutdown.

    python bench/scale.py            # 1,000 models (a few minutes on 2 cores)
    python bench/scale.py --quick    # 200 models

One real ``modelconsole --serve`` subprocess (one process, no gRPC), driven over its control
API on 127.0.0.1.  In one run:

1. register N tiny models (``zoo:tiny-mlp``, ``hidden = 16``, on the CPU) through
   ``POST /api/models``: ``register_N_s``;
2. load them all (``POST /api/models/{name}/load``, 8 at a time): ``load_N_s``, then the
   server's thread count (``/proc/PID/status``) and its RSS over the RSS before the loads,
   per loaded model;
3. one infer on each (so each has served once, as the shutdown case that was slowest);
4. SIGTERM: the seconds from the signal to the process's exit.

The same steps run for ``--steps`` smaller counts first (a row each), so the table shows how
each figure grows with the count.  The last line is one JSON object with the keys
``register_1000_s``, ``load_1000_s``, ``threads_at_1000``, ``shutdown_1000_s`` (target <= 5)
and ``rss_per_loaded_tiny_mib`` (from the largest count; with ``--quick`` the keys still say
1000 but hold the largest count measured, which the table names).
"""

from __future__ import annotations

import sys
from pathlib import Path

# `python bench/scale.py` puts bench/ first on sys.path, where bench/http.py would shadow the standard
# library's http package: move bench/ to the end before importing anything else.
_HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _HERE] + [str(_HERE)]

import argparse
import http.client
import json
import signal
import socket
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

from serveproc import control_token, start_server

CONFIG = """
[server]
port = 0
"""
INFER = json.dumps({"inputs": [{"name": "input", "shape": [1, 64], "datatype": "FP32", "data": [0.5] * 64}]})


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def proc_status(pid: int) -> dict[str, int]:
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "Threads"):
                out[key] = int(value.split()[0])
    return out


class Api:
    """One kept-alive connection per thread to the server's control API."""

    def __init__(self, port: int, token: str):
        self.port = port
        self.headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}
        self._conns: dict[int, http.client.HTTPConnection] = {}

    def call(self, method: str, path: str, body: object = None) -> tuple[int, bytes]:
        import threading

        key = threading.get_ident()
        conn = self._conns.get(key)
        if conn is None:
            conn = self._conns[key] = http.client.HTTPConnection("127.0.0.1", self.port, timeout=300)
        data = body if isinstance(body, str | bytes) else json.dumps(body if body is not None else {})
        conn.request(method, path, data, self.headers)
        r = conn.getresponse()
        return r.status, r.read()

    def close(self) -> None:
        for c in self._conns.values():
            c.close()


def run(n: int, tmp: Path) -> dict[str, float]:
    port = free_port()
    proc = start_server(tmp, port, CONFIG)
    try:
        api = Api(port, control_token(tmp, port))
        names = [f"m{i:04d}" for i in range(n)]
        t0 = time.perf_counter()
        for name in names:
            status, body = api.call("POST", "/api/models", {"name": name, "source": "zoo:tiny-mlp", "options": {
                "device": "cpu", "args": {"hidden": 16}, "warmup": 0}})
            assert status in (200, 201), body[:300]
        register_s = time.perf_counter() - t0
        before = proc_status(proc.pid)
        t0 = time.perf_counter()
        with ThreadPoolExecutor(8) as pool:
            for status, body in pool.map(lambda m: api.call("POST", f"/api/models/{m}/load"), names):
                assert status == 200, body[:300]
        load_s = time.perf_counter() - t0
        after = proc_status(proc.pid)
        with ThreadPoolExecutor(8) as pool:
            for status, body in pool.map(lambda m: api.call("POST", f"/v2/models/{m}/infer", INFER), names):
                assert status == 200, body[:300]
        api.close()
        t0 = time.perf_counter()
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(600)
        shutdown_s = time.perf_counter() - t0
        assert code == 0, f"the server exited with {code}"
        return {"n": n, "register_s": register_s, "load_s": load_s, "threads": after["Threads"],
                "threads_before": before["Threads"], "shutdown_s": shutdown_s,
                "rss_per_model_mib": (after["VmRSS"] - before["VmRSS"]) / 1024 / max(n, 1)}
    finally:
        if proc.poll() is None:
            proc.kill()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="200 models (and 50 before)")
    ap.add_argument("--models", type=int, default=None, help="the largest count (default 1000; 200 with --quick)")
    ap.add_argument("--steps", type=int, nargs="*", default=None, help="smaller counts run first (default 0 300 600)")
    args = ap.parse_args()
    top = args.models or (200 if args.quick else 1000)
    steps = args.steps if args.steps is not None else ([0, 50] if args.quick else [0, 300, 600])
    rows = []
    for n in [*steps, top]:
        with tempfile.TemporaryDirectory() as d:
            rows.append(run(n, Path(d)))
            r = rows[-1]
            per_model = r["rss_per_model_mib"] if r["n"] else 0.0
            print(f"{r['n']:>6} models: register {r['register_s']:7.2f} s  load {r['load_s']:7.2f} s  threads "
                  f"{r['threads_before']:>5} -> {r['threads']:>5}  RSS/model {per_model:6.2f} MiB  "
                  f"shutdown {r['shutdown_s']:6.2f} s", flush=True)
    last = rows[-1]
    print(f"\nlargest count: {last['n']} models (target: shutdown <= 5 s)")
    print(json.dumps({"register_1000_s": round(last["register_s"], 2), "load_1000_s": round(last["load_s"], 2),
                      "threads_at_1000": last["threads"], "shutdown_1000_s": round(last["shutdown_s"], 2),
                      "rss_per_loaded_tiny_mib": round(last["rss_per_model_mib"], 3)}))


if __name__ == "__main__":
    main()
