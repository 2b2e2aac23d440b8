"""Abuse benchmark: a normal client's latency while the server is attacked, against a quiet server.

    python bench/abuse.py            # ~1.5 minutes on 2 cores
    python bench/abuse.py --quick    # ~40 s

One real ``modelconsole --serve`` subprocess (tiny-mlp), measured in one run:

1. quiet: two clients send normal infer requests; their latencies.
2. abuse: the same clients while four senders post 2 GiB gzip bombs (~2 MiB
   each on the wire) in a loop and 500 connections sit half-open (a few
   bytes of headers, then nothing; reopened when the server closes them).
3. quiet again (the two quiet windows are pooled).
4. 200 concurrent control calls (load, unload, pin, priority, split) on
   another model: their statuses.
5. 32 clients each reuse one kept-alive connection in a loop; SIGTERM.

Prints a table, then as its LAST line one JSON object with exactly the keys
``p99_under_abuse_ratio`` (p99 latency under abuse / quiet p99),
``peak_rss_over_baseline_mib`` (the server's peak RSS during the run minus
its RSS after warm-up), ``control_5xx`` (5xx answers to the control calls)
and ``lost_on_sigterm`` (requests written on a kept-alive connection and
never answered).  Targets: ratio <= 3, <= 200 MiB, 0, 0.
"""

from __future__ import annotations

import sys
from pathlib import Path

# `python bench/abuse.py` puts bench/ first on sys.path, where bench/http.py would shadow the standard
# library's http package (used right below): move bench/ to the end before importing anything else.
_HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _HERE] + [str(_HERE)]

import argparse
import http.client
import json
import os
import random
import signal
import socket
import tempfile
import threading
import time
import zlib

from serveproc import control_token, start_server

CONFIG = """
[[models]]
name = "tiny"
source = "zoo:tiny-mlp"
max_batch_size = 32
warmup = 1

[[models]]
name = "spare"
source = "zoo:tiny-mlp"
args = { hidden = 16 }
warmup = 0
"""
BODY = json.dumps({"inputs": [{"name": "input", "shape": [1, 64], "datatype": "FP32", "data": [0.5] * 64}]})
HEADERS = {"Content-Type": "application/json"}


def gzip_bomb(inflated: int) -> bytes:
    """A gzip stream of ``inflated`` zero bytes (~1000:1), built a MiB at a time."""
    c = zlib.compressobj(6, zlib.DEFLATED, 31)
    zeros = bytes(1 << 20)
    return b"".join([c.compress(zeros) for _ in range(inflated >> 20)] + [c.flush()])


def rss_bytes(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def percentile(xs: list[float], q: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, int(q * (len(s) - 1) + 0.5))] if s else float("nan")


class Clients:
    """Normal clients: each sends infer requests on one kept-alive connection; latencies per phase."""

    def __init__(self, port: int, n: int):
        self.port = port
        self.phase = "warmup"
        self.stop = threading.Event()
        self.lat: dict[str, list[float]] = {}
        self.errors: dict[str, int] = {}
        self.threads = [threading.Thread(target=self._run, daemon=True) for _ in range(n)]

    def start(self) -> None:
        for t in self.threads:
            t.start()

    def _run(self) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
        while not self.stop.is_set():
            phase = self.phase
            t0 = time.perf_counter()
            try:
                conn.request("POST", "/v2/models/tiny/infer", BODY, HEADERS)
                r = conn.getresponse()
                r.read()
                ok = r.status == 200
            except (OSError, http.client.HTTPException):
                conn.close()
                ok = False
            dt = time.perf_counter() - t0
            if ok:
                self.lat.setdefault(phase, []).append(dt)
            else:
                self.errors[phase] = self.errors.get(phase, 0) + 1

    def join(self) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(60)


def bomber(port: int, bomb: bytes, stop: threading.Event, counts: dict[str, int]) -> None:
    head = (f"POST /v2/models/tiny/infer HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            f"Content-Encoding: gzip\r\nContent-Length: {len(bomb)}\r\n\r\n").encode()
    while not stop.is_set():
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
                sender = threading.Thread(target=_send_quietly, args=(s, head + bomb), daemon=True)
                sender.start()
                answer = s.recv(200)
                counts["bombs"] += 1
                counts["bomb_413"] += answer.startswith(b"HTTP/1.1 413")
        except OSError:
            counts["bomb_errors"] += 1


def _send_quietly(s: socket.socket, data: bytes) -> None:
    try:
        s.sendall(data)
    except OSError:
        pass


def half_open(port: int, n: int, stop: threading.Event, counts: dict[str, int]) -> None:
    """Keep n connections open with half a request head each; reopen what the server closes."""
    socks: list[socket.socket | None] = [None] * n
    while not stop.is_set():
        for i in range(n):
            s = socks[i]
            if s is not None:
                try:
                    if s.recv(1, socket.MSG_DONTWAIT) == b"":  # closed by the server
                        counts["half_open_closed"] += 1
                        s.close()
                        s = socks[i] = None
                except BlockingIOError:
                    continue  # still open, still waiting: what an attacker wants
                except OSError:
                    s.close()
                    s = socks[i] = None
            if s is None:
                try:
                    s = socket.create_connection(("127.0.0.1", port), timeout=5)
                    s.sendall(b"POST /v2/models/tiny/infer HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Le")
                    s.setblocking(False)  # the checks above must not wait
                    socks[i] = s
                    counts["half_open_opened"] += 1
                except OSError:
                    counts["half_open_refused"] += 1
        stop.wait(0.25)
    for s in socks:
        if s is not None:
            s.close()


def attack(port: int, bomb_gib: float, bombers: int, n_half_open: int, ready, go, done, out) -> None:
    """The attackers, in a process of their own (their GIL is not the clients'): build the bomb, say
    ready, attack from ``go`` until ``done``, put the counts on ``out``."""
    bomb = gzip_bomb(int(bomb_gib * 2**30))
    counts = dict.fromkeys(["bombs", "bomb_413", "bomb_errors", "half_open_opened", "half_open_closed",
                            "half_open_refused"], 0)
    ready.set()
    go.wait()
    stop = threading.Event()
    threads = [threading.Thread(target=bomber, args=(port, bomb, stop, counts), daemon=True) for _ in range(bombers)]
    threads.append(threading.Thread(target=half_open, args=(port, n_half_open, stop, counts), daemon=True))
    for t in threads:
        t.start()
    done.wait()
    stop.set()
    for t in threads:
        t.join(60)
    out.put(counts)


def control_storm(port: int, token: str, n: int) -> list[int]:
    """n concurrent control calls (each on its own connection); their statuses."""
    rnd = random.Random(1)
    calls = []
    for _ in range(n):
        kind = rnd.choice(["load", "unload", "pin", "unpin", "priority", "split"])
        if kind == "priority":
            calls.append(("PUT", "/api/models/spare/priority", {"priority": rnd.randint(1, 3)}))
        elif kind == "split":
            calls.append(("PUT", "/api/models/spare/split", {"weights": {}}))
        else:
            calls.append(("POST", f"/api/models/spare/{kind}", {}))
    statuses = [0] * n
    auth = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}

    def one(i: int) -> None:
        method, path, body = calls[i]
        try:
            c = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
            c.request(method, path, json.dumps(body), auth)
            r = c.getresponse()
            r.read()
            statuses[i] = r.status
            c.close()
        except (OSError, http.client.HTTPException):
            statuses[i] = -1
    threads = [threading.Thread(target=one, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(180)
    return statuses


def sigterm_keepalive(proc, port: int, n: int) -> dict[str, int]:
    """n clients reuse one connection each; SIGTERM once all are flowing; requests written and lost."""
    counts = {"ok": 0, "unavailable": 0, "lost": 0, "refused": 0}
    lock = threading.Lock()
    ready = threading.Barrier(n + 1)

    def client() -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        first = True
        while True:
            try:
                if conn.sock is None:
                    conn.connect()
            except OSError:
                with lock:
                    counts["refused"] += 1
                return
            try:
                conn.request("POST", "/v2/models/tiny/infer", BODY, HEADERS)
                r = conn.getresponse()
                r.read()
            except (OSError, http.client.HTTPException):
                with lock:
                    counts["lost"] += 1
                return
            with lock:
                counts["ok" if r.status == 200 else "unavailable"] += 1
            if first:
                first = False
                ready.wait(60)
            if r.will_close:
                conn.close()

    threads = [threading.Thread(target=client, daemon=True) for _ in range(n)]
    for t in threads:
        t.start()
    ready.wait(60)
    proc.send_signal(signal.SIGTERM)
    for t in threads:
        t.join(120)
    proc.wait(120)
    return counts


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="shorter phases, 512 MiB bombs")
    ap.add_argument("--seconds", type=float, default=20.0, help="length of each phase")
    ap.add_argument("--bomb-gib", type=float, default=2.0, help="what each gzip bomb inflates to")
    ap.add_argument("--bombers", type=int, default=4)
    ap.add_argument("--half-open", type=int, default=500)
    ap.add_argument("--clients", type=int, default=2, help="normal clients, each on a kept-alive connection")
    args = ap.parse_args()
    if args.quick:
        args.seconds, args.bomb_gib = 8.0, 0.5

    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    ready, go, done, out = ctx.Event(), ctx.Event(), ctx.Event(), ctx.Queue()
    attacker = ctx.Process(target=attack, args=(port_holder := _free_port(), args.bomb_gib, args.bombers,
                                                args.half_open, ready, go, done, out), daemon=True)
    print(f"building a {args.bomb_gib:g} GiB gzip bomb ...", flush=True)
    attacker.start()
    ready.wait(600)
    port = port_holder
    with tempfile.TemporaryDirectory() as tmp:
        env_tmp = Path(tmp)
        proc = start_server(env_tmp, port, CONFIG)
        token = control_token(env_tmp, port)
        rss_peak = [0]
        sampling = threading.Event()

        def sample() -> None:
            while not sampling.is_set():
                rss_peak[0] = max(rss_peak[0], rss_bytes(proc.pid))
                sampling.wait(0.02)

        clients = Clients(port, args.clients)
        clients.start()
        time.sleep(3.0)  # warm-up: the model loads, the allocator settles
        baseline = rss_bytes(proc.pid)
        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()

        clients.phase = "quiet"
        time.sleep(args.seconds / 2)
        clients.phase = "abuse"
        go.set()
        time.sleep(args.seconds)
        done.set()
        counts = out.get(timeout=120)
        attacker.join(30)
        clients.phase = "quiet"
        time.sleep(args.seconds / 2)
        clients.phase = "control"
        statuses = control_storm(port, token, 200)
        clients.join()
        sampling.set()
        sampler.join(5)
        lost = sigterm_keepalive(proc, port, 32)

    quiet, abuse = clients.lat.get("quiet", []), clients.lat.get("abuse", [])
    p99_q, p99_a = percentile(quiet, 0.99), percentile(abuse, 0.99)
    control_5xx = sum(1 for s in statuses if s >= 500 or s < 0)
    rows = [
        ("quiet requests", len(quiet), f"p50 {percentile(quiet, 0.5) * 1e3:.2f} ms  p99 {p99_q * 1e3:.2f} ms"),
        ("under abuse", len(abuse), f"p50 {percentile(abuse, 0.5) * 1e3:.2f} ms  p99 {p99_a * 1e3:.2f} ms"),
        ("failed normal requests", sum(clients.errors.values()), json.dumps(clients.errors)),
        ("gzip bombs sent / 413", counts["bombs"], f"{counts['bomb_413']} answered 413, "
                                                    f"{counts['bomb_errors']} connection errors"),
        ("half-open connections", counts["half_open_opened"], f"{counts['half_open_closed']} closed by the server"),
        ("control calls", len(statuses), f"{control_5xx} 5xx; statuses {sorted(set(statuses))}"),
        ("server RSS", baseline >> 20, f"baseline MiB; peak {rss_peak[0] >> 20} MiB"),
        ("SIGTERM, 32 kept-alive", sum(lost.values()), json.dumps(lost)),
    ]
    print()
    for name, n, detail in rows:
        print(f"{name:<24} {n:>8}  {detail}")
    result = {
        "p99_under_abuse_ratio": round(p99_a / p99_q, 3) if quiet and abuse else None,
        "peak_rss_over_baseline_mib": round(max(0, rss_peak[0] - baseline) / 2**20, 1),
        "control_5xx": control_5xx,
        "lost_on_sigterm": lost["lost"],
    }
    print(json.dumps(result))


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
