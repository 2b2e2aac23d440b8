"""HTTP benchmark: V2 requests for zoo:tiny-mlp over loopback, JSON and binary, c=1 and c=64.

    python bench/http.py            # ~10 s per scenario
    python bench/http.py --quick    # under a minute in all

What runs where (so the figures mean something):

* the server is a real ``modelconsole --serve`` subprocess (its own process,
  its own store in a temporary directory), serving ``zoo:tiny-mlp`` with the
  default batching settings;
* the load comes from separate processes (``multiprocessing``, spawn), each
  holding persistent HTTP/1.1 keep-alive connections (c=1: one blocking
  socket, so no client event loop sits in the latency) and sending pre-built
  V2 requests: JSON (``data`` in the body) or binary (the tensor after the
  JSON header, ``Inference-Header-Content-Length``, binary outputs), exactly
  the bytes ``tritonclient.http`` sends.  A lean raw-socket client (like
  wrk), so that on a small machine the client's own CPU steals as little as
  possible from the server: every response's status is checked and its
  Content-Length honoured; the first answer of each connection is parsed
  and checked for the right output shape;
* ``inprocess_p50_us``: the same model and input through ``Engine.infer`` in
  this process (c=1), measured in the same run, before the HTTP scenarios;
  ``http_overhead_p50_us`` = HTTP c=1 JSON p50 − in-process p50.

The LAST line is one JSON object with json_c64_rps, binary_c64_rps,
c1_p50_us, c1_p99_us (JSON, c=1) and http_overhead_p50_us.
"""

from __future__ import annotations

import sys
from pathlib import Path

# This file is named http.py (the issue names it): its folder goes to the END of the import
# path, so the standard library's http package (urllib, asyncio's helpers) is the one imported
# and bench/serveproc.py can still be.
_HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _HERE] + [str(_HERE)]

import argparse  # noqa: E402
import asyncio
import json
import multiprocessing as mp
import os
import re
import socket
import statistics
import struct
import tempfile
import time

from serveproc import start_server

MODEL = "tiny"
_CL = re.compile(rb"\r\ncontent-length: *(\d+)", re.I)  # not Inference-Header-Content-Length


# --------------------------------------------------------------------------- requests


def build_request(kind: str, host: str, port: int, batch: int = 1) -> bytes:
    """The bytes of one POST /v2/models/tiny/infer, as tritonclient.http builds it."""
    values = [((i * 7919) % 1000) / 1000.0 - 0.5 for i in range(64 * batch)]
    if kind == "json":
        body = json.dumps({"inputs": [{"name": "input", "shape": [batch, 64], "datatype": "FP32", "data": values}],
                           "outputs": [{"name": "logits", "parameters": {"binary_data": False}}]},
                          separators=(",", ":")).encode()
        extra = b"Content-Type: application/json\r\n"
    else:
        raw = struct.pack(f"<{len(values)}f", *values)
        head = json.dumps({"inputs": [{"name": "input", "shape": [batch, 64], "datatype": "FP32",
                                       "parameters": {"binary_data_size": len(raw)}}],
                           "parameters": {"binary_data_output": True}}, separators=(",", ":")).encode()
        body = head + raw
        extra = b"Inference-Header-Content-Length: %d\r\nContent-Type: application/octet-stream\r\n" % len(head)
    return (b"POST /v2/models/%s/infer HTTP/1.1\r\nHost: %s:%d\r\n" % (MODEL.encode(), host.encode(), port)
            + extra + b"Content-Length: %d\r\n\r\n" % len(body) + body)


def _check_first(kind: str, head: bytes, body: bytes) -> None:
    if kind == "json":
        out = json.loads(body)["outputs"][0]
    else:
        hl = int(re.search(rb"\r\ninference-header-content-length: *(\d+)", head, re.I).group(1))
        out = json.loads(body[:hl])["outputs"][0]
        assert len(body) - hl == 40, "binary output must be 10 FP32"
    assert out["name"] == "logits" and out["shape"] == [1, 10], out


# --------------------------------------------------------------------------- load generator (child processes)


def _record(kind: str, head: bytes, body: bytes, t0: int, t1: int, start_at: int, first: bool,
            lat: list[int], errors: list[str]) -> bool:
    """One answer: an error, or its latency (inside the measured window); the first 200 of a
    connection is checked for the right output.  Returns whether the first 200 is still to come."""
    if head[9:12] != b"200":
        errors.append(head[:12].decode(errors="replace") + " " + body[:200].decode(errors="replace"))
        return first
    if first:
        _check_first(kind, head, body)
    if t0 >= start_at:
        lat.append(t1 - t0)
    return False


async def _connection(host: str, port: int, kind: str, request: bytes, start_at: float, stop_at: float,
                      lat: list[int], errors: list[str]) -> None:
    reader, writer = await asyncio.open_connection(host, port)
    sock = writer.get_extra_info("socket")
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    first = True
    clock = time.perf_counter_ns
    try:
        while True:
            t0 = clock()
            if t0 >= stop_at:
                break
            writer.write(request)
            head = await reader.readuntil(b"\r\n\r\n")
            m = _CL.search(head)
            body = await reader.readexactly(int(m.group(1))) if m else b""
            t1 = clock()
            first = _record(kind, head, body, t0, t1, start_at, first, lat, errors)
    finally:
        writer.close()


def _blocking_connection(host: str, port: int, kind: str, request: bytes, start_at: int, stop_at: int,
                         lat: list[int], errors: list[str]) -> None:
    """c=1: one blocking socket, no event loop in the client's way (what wrk's one connection
    costs is a send and a recv); the latency is the server's and the kernel's, not asyncio's."""
    sock = socket.create_connection((host, port))
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    clock = time.perf_counter_ns
    first = True
    buf = b""
    try:
        while True:
            t0 = clock()
            if t0 >= stop_at:
                break
            sock.sendall(request)
            while b"\r\n\r\n" not in buf:
                buf += sock.recv(65536)
            head, _, buf = buf.partition(b"\r\n\r\n")
            head += b"\r\n\r\n"
            m = _CL.search(head)
            need = int(m.group(1)) if m else 0
            while len(buf) < need:
                buf += sock.recv(65536)
            body, buf = buf[:need], buf[need:]
            t1 = clock()
            first = _record(kind, head, body, t0, t1, start_at, first, lat, errors)
    finally:
        sock.close()


def _worker(host: str, port: int, kind: str, conns: int, warmup_s: float, seconds: float, t_start: float,
            out: mp.Queue) -> None:
    request = build_request(kind, host, port)
    # every process agrees on the wall-clock window (perf_counter is per process)
    now_wall, now_ns = time.time(), time.perf_counter_ns()
    start_at = now_ns + int((t_start + warmup_s - now_wall) * 1e9)
    stop_at = start_at + int(seconds * 1e9)
    lat: list[int] = []
    errors: list[str] = []

    async def main() -> tuple[list[int], list[str]]:
        await asyncio.gather(*(_connection(host, port, kind, request, start_at, stop_at, lat, errors)
                               for _ in range(conns)))
        return lat, errors

    try:
        if conns == 1:
            _blocking_connection(host, port, kind, request, start_at, stop_at, lat, errors)
            out.put((lat, errors))
        else:
            out.put(asyncio.run(main()))
    except Exception as e:  # noqa: BLE001 - the parent reports it instead of waiting for a result
        out.put(([], [f"load generator failed: {type(e).__name__}: {e}"]))


def _cpu_seconds(pid: int | None) -> float:
    """User + system CPU time of a process so far (Linux /proc; 0 elsewhere)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, TypeError):
        return 0.0


def run_load(host: str, port: int, kind: str, concurrency: int, procs: int, warmup_s: float,
             seconds: float, server_pid: int | None = None) -> dict:
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    procs = max(1, min(procs, concurrency))
    per = [concurrency // procs + (1 if i < concurrency % procs else 0) for i in range(procs)]
    t_start = time.time() + 1.0  # time for the children to start
    ps = [ctx.Process(target=_worker, args=(host, port, kind, n, warmup_s, seconds, t_start, q)) for n in per]
    for p in ps:
        p.start()
    time.sleep(max(0.0, t_start + warmup_s - time.time()))
    cpu0 = _cpu_seconds(server_pid)
    time.sleep(seconds)
    cpu1 = _cpu_seconds(server_pid)
    lat: list[int] = []
    errors: list[str] = []
    for _ in ps:
        lt, er = q.get(timeout=warmup_s + seconds + 120)
        lat.extend(lt)
        errors.extend(er)
    for p in ps:
        p.join()
    lat.sort()
    n = len(lat)
    pct = (lambda q: lat[min(n - 1, int(q * n))] / 1000.0) if n else (lambda q: float("nan"))
    return {"kind": kind, "c": concurrency, "procs": procs, "requests": n, "errors": len(errors),
            "first_error": errors[0] if errors else None, "rps": n / seconds,
            "server_cpu_us": (cpu1 - cpu0) / n * 1e6 if n and server_pid else float("nan"),
            "p50_us": pct(0.50), "p99_us": pct(0.99)}


# --------------------------------------------------------------------------- the server and the in-process reference


CONFIG = f"""
[[models]]
name = "{MODEL}"
source = "zoo:tiny-mlp"
device = "cpu"
"""


def inprocess_p50_us(seconds: float) -> float:
    """Engine.infer at c=1 on the same model and input, in a worker thread's own loop (see
    bench/inprocess.py: torch on the main thread would change the OpenMP team)."""
    import threading

    import torch

    from modelconsole.scheduler.config import parse_config
    from modelconsole.scheduler.engine import Engine

    torch.set_num_threads(1)
    result: list[float] = []

    async def main() -> None:
        config = parse_config({"models": [{"name": MODEL, "source": "zoo:tiny-mlp", "device": "cpu"}]}, ".")
        engine = Engine.from_config(config)
        await engine.start(config.models)
        x = torch.tensor([((i * 7919) % 1000) / 1000.0 - 0.5 for i in range(64)]).reshape(1, 64)
        await engine.infer(MODEL, {"input": x})
        lat = []
        stop = time.perf_counter() + seconds
        while time.perf_counter() < stop:
            t0 = time.perf_counter_ns()
            await engine.infer(MODEL, {"input": x})
            lat.append(time.perf_counter_ns() - t0)
        await engine.close()
        result.append(statistics.median(lat) / 1000.0)

    t = threading.Thread(target=lambda: asyncio.run(main()))
    t.start()
    t.join()
    return result[0]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="3 s per scenario (under a minute in all)")
    ap.add_argument("--seconds", type=float, default=10.0, help="measured seconds per scenario")
    ap.add_argument("--warmup", type=float, default=2.0, help="unmeasured seconds before each scenario")
    ap.add_argument("--procs", type=int, default=2, help="load-generator processes for c=64")
    ap.add_argument("--port", type=int, default=0, help="0: a free port")
    ap.add_argument("--server-pid", type=int, help="with --attach: the server's pid, for its CPU per request")
    ap.add_argument("--attach", type=int, metavar="PORT",
                    help="load a server already listening on 127.0.0.1:PORT (serving zoo:tiny-mlp as \"tiny\") "
                    "instead of starting one; e.g. to profile it")
    args = ap.parse_args(argv)
    if args.quick:
        args.seconds, args.warmup = 3.0, 1.0
    port = args.port or _free_port()
    host = "127.0.0.1"

    ref = inprocess_p50_us(min(args.seconds, 5.0))
    scenarios = [("json", 1, 1), ("binary", 1, 1), ("json", 64, args.procs), ("binary", 64, args.procs)]
    if args.attach:
        rows = [run_load(host, args.attach, k, c, p, args.warmup, args.seconds, args.server_pid)
                for k, c, p in scenarios]
    else:
        with tempfile.TemporaryDirectory() as tmp:
            proc = start_server(Path(tmp), port, CONFIG)
            try:
                rows = [run_load(host, port, k, c, p, args.warmup, args.seconds, proc.pid) for k, c, p in scenarios]
            finally:
                proc.terminate()
                proc.wait(60)

    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    print(f"zoo:tiny-mlp over loopback; {cpus} CPUs shared by server and load generator; "
          f"{args.seconds:g} s measured per row")
    print(f"  {'body':<7} {'conc':>4} {'procs':>5} {'requests':>9} {'req/s':>8} {'p50 us':>8} {'p99 us':>8} "
          f"{'errors':>6} {'server CPU us/req':>17}")
    for r in rows:
        print(f"  {r['kind']:<7} {r['c']:>4} {r['procs']:>5} {r['requests']:>9} {r['rps']:>8.0f} "
              f"{r['p50_us']:>8.0f} {r['p99_us']:>8.0f} {r['errors']:>6} {r['server_cpu_us']:>17.0f}")
        if r["first_error"]:
            print(f"    first error: {r['first_error']}")
    j1 = rows[0]
    print(f"  in-process Engine.infer c=1 p50: {ref:.0f} us; HTTP adds {j1['p50_us'] - ref:.0f} us (JSON) and "
          f"{rows[1]['p50_us'] - ref:.0f} us (binary)")
    print(json.dumps({
        "json_c64_rps": round(rows[2]["rps"]),
        "binary_c64_rps": round(rows[3]["rps"]),
        "c1_p50_us": round(j1["p50_us"], 1),
        "c1_p99_us": round(j1["p99_us"], 1),
        "http_overhead_p50_us": round(j1["p50_us"] - ref, 1),
    }))
    return 1 if any(r["errors"] for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
