"""Hot-swap benchmark: steady load at c=32 over HTTP, ``POST /api/models/m/swap`` in the middle.

    python bench/swap.py            # 3 s warm-up, 8 s steady, the swap, 5 s after
    python bench/swap.py --quick    # under a minute in all

What runs where:

* the server is a real ``modelconsole --serve`` subprocess (its own store in a
  temporary directory, a free port) with one model name ``m`` in two
  versions, both ``zoo:encoder`` (2 layers, d_model 256, 4 heads, seq 64) on
  the CPU.  Version 1 is active and loaded before the load starts; version 2
  is registered but not loaded, so the swap has real work to do: build and
  warm version 2 (~0.1-0.3 s of CPU here, while version 1 keeps serving),
  switch the routing, drain version 1 and unload it.
  Why the encoder and not zoo:tiny-mlp: tiny-mlp loads in a millisecond, so a
  swap would measure nothing but the routing switch; the encoder's load is a
  noticeable fraction of a second of CPU taken from the same cores that serve
  the traffic, which is what a swap under load costs.  Its forward (~4 ms at
  batch 1, ~100 ms at batch 32 on one core) still lets c=32 run on 2 cores.
  Version 2 differs only in ``vocab`` (32000 instead of 30522: a bigger
  embedding table, a different model, the same forward cost), so latencies
  after the switch compare with those before it;
* the load comes from separate processes (``multiprocessing``, spawn; 2 × 16
  keep-alive connections by default), each connection sending one V2 infer
  request at a time (JSON ``input_ids``, binary output) with no version in the
  URL, so the server routes it to the active version.  Every request is
  recorded: its send time (wall clock, so the parent's swap window applies),
  its latency, its status and the ``model_version`` that answered.  A
  connection error, an early close or no answer within --timeout is a lost
  request (the connection is then reopened); a non-200 answer is a failed one;
* phases by send time: warm-up (not in the figures), steady (before the swap
  request), swap (from the swap request until its answer: the new version
  loaded, routed to, the old one drained and unloaded), after.

The LAST line is one JSON object: failed (target 0), lost (target 0),
p99_steady_ms, p99_during_swap_ms, p99_ratio (during / steady, target <= 2.0)
and swap_s (the swap request's wall time).  Exit status 1 if any request
failed or was lost, or the swap itself failed.
"""

from __future__ import annotations

import sys
from pathlib import Path

# This file's folder holds bench/http.py: the folder goes to the END of the import path, so the
# standard library's http package (urllib's) is the one imported and bench/serveproc.py can still be.
_HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _HERE] + [str(_HERE)]

import argparse
import asyncio
import json
import math
import multiprocessing as mp
import os
import re
import socket
import tempfile
import time
import urllib.error
import urllib.request

from serveproc import control_token, start_server

MODEL = "m"
ARGS = {"layers": 2, "d_model": 256, "heads": 4, "seq": 64}
V2_ARGS = {**ARGS, "vocab": 32000}
_CL = re.compile(rb"\r\ncontent-length: *(\d+)", re.IGNORECASE)  # not Inference-Header-Content-Length
_IHCL = re.compile(rb"\r\ninference-header-content-length: *(\d+)", re.IGNORECASE)
_VERSION = re.compile(rb'"model_version" *: *"([^"]*)"')


def _toml_table(d: dict) -> str:
    return "{ " + ", ".join(f"{k} = {v}" for k, v in d.items()) + " }"


CONFIG = f"""
[[models]]
name = "{MODEL}"
version = "1"
source = "zoo:encoder"
device = "{{device}}"
args = {_toml_table(ARGS)}

[[models]]
name = "{MODEL}"
version = "2"
source = "zoo:encoder"
device = "{{device}}"
args = {_toml_table(V2_ARGS)}
"""


# --------------------------------------------------------------------------- requests


def infer_body() -> bytes:
    ids = [(i * 7919) % 1000 for i in range(ARGS["seq"])]
    return json.dumps({"inputs": [{"name": "input_ids", "shape": [1, ARGS["seq"]], "datatype": "INT64", "data": ids}],
                       "parameters": {"binary_data_output": True}}, separators=(",", ":")).encode()


def build_request(host: str, port: int) -> bytes:
    """The bytes of one POST /v2/models/m/infer (no version: the active one answers)."""
    body = infer_body()
    return (b"POST /v2/models/%s/infer HTTP/1.1\r\nHost: %s:%d\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\n\r\n" % (MODEL.encode(), host.encode(), port, len(body)) + body)


def _check_first(head: bytes, body: bytes) -> None:
    hl = int(_IHCL.search(head).group(1))
    out = json.loads(body[:hl])["outputs"][0]
    assert out["name"] == "embedding" and out["shape"] == [1, ARGS["d_model"]], out
    assert len(body) - hl == 4 * ARGS["d_model"], "binary output must be d_model FP32"


# --------------------------------------------------------------------------- load generator (child processes)

# one record per request sent: (send wall time, latency ns or -1 if lost, status or 0, version or "")
Record = tuple[float, int, int, str]


async def _connection(host: str, port: int, request: bytes, stop: mp.sharedctypes.Synchronized,
                      timeout: float, records: list[Record], errors: list[str]) -> None:
    clock = time.perf_counter_ns
    reader = writer = None
    first = True

    async def exchange() -> tuple[bytes, bytes]:
        writer.write(request)
        head = await reader.readuntil(b"\r\n\r\n")
        m = _CL.search(head)
        body = await reader.readexactly(int(m.group(1))) if m else b""
        return head, body

    try:
        while time.time() < stop.value:
            if writer is None:
                try:
                    reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), timeout)
                    writer.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                except (TimeoutError, OSError) as e:
                    records.append((time.time(), -1, 0, ""))
                    errors.append(f"lost (connect): {type(e).__name__}: {e}")
                    reader = writer = None
                    await asyncio.sleep(0.1)
                    continue
            sent = time.time()
            t0 = clock()
            try:
                head, body = await asyncio.wait_for(exchange(), timeout)
            except (TimeoutError, OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError) as e:
                records.append((sent, -1, 0, ""))
                errors.append(f"lost: {type(e).__name__}: {e}")
                writer.close()
                reader = writer = None
                await asyncio.sleep(0.1)
                continue
            lat = clock() - t0
            status = int(head[9:12])
            m = _VERSION.search(body)
            version = m.group(1).decode() if m else "?"
            records.append((sent, lat, status, version))
            if status != 200:
                errors.append(f"failed: {head[:12].decode(errors='replace')} {body[:200].decode(errors='replace')}")
            elif first:
                _check_first(head, body)
                first = False
            if re.search(rb"\r\nconnection: *close", head, re.IGNORECASE):  # the server closes: reconnect, nothing lost
                writer.close()
                reader = writer = None
    finally:
        if writer is not None:
            writer.close()


def _worker(host: str, port: int, conns: int, start_at: float, stop: mp.sharedctypes.Synchronized,
            timeout: float, out: mp.Queue) -> None:
    request = build_request(host, port)
    records: list[Record] = []
    errors: list[str] = []

    async def main() -> None:
        await asyncio.sleep(max(0.0, start_at - time.time()))
        await asyncio.gather(*(_connection(host, port, request, stop, timeout, records, errors)
                               for _ in range(conns)))

    try:
        asyncio.run(main())
        out.put((records, errors))
    except Exception as e:  # noqa: BLE001 - the parent reports it instead of waiting for a result
        out.put((records, errors + [f"load generator failed: {type(e).__name__}: {e}"]))


# --------------------------------------------------------------------------- the server


def _post(url: str, body: bytes, timeout: float, token: str | None = None) -> tuple[int, bytes]:
    headers = {"Content-Type": "application/json"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    req = urllib.request.Request(url, data=body, method="POST", headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --------------------------------------------------------------------------- figures


def _pct(lat_ms: list[float], q: float) -> float:
    return lat_ms[min(len(lat_ms) - 1, int(q * len(lat_ms)))] if lat_ms else math.nan


def phase_row(name: str, recs: list[Record], t_from: float, t_to: float, t0: float) -> dict:
    mine = [r for r in recs if t_from <= r[0] < t_to]
    lat = sorted(r[1] / 1e6 for r in mine if r[1] >= 0)
    versions: dict[str, int] = {}
    for r in mine:
        if r[2] == 200:
            versions[r[3]] = versions.get(r[3], 0) + 1
    return {"phase": name, "from_s": t_from - t0, "dur_s": t_to - t_from, "requests": len(mine),
            "failed": sum(1 for r in mine if r[1] >= 0 and r[2] != 200),
            "lost": sum(1 for r in mine if r[1] < 0),
            "p50_ms": _pct(lat, 0.50), "p99_ms": _pct(lat, 0.99), "versions": versions}


def _num(x: float, nd: int = 1) -> float | None:
    return None if x is None or math.isnan(x) else round(x, nd)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="2 s warm-up, 5 s steady, 3 s after (under a minute)")
    ap.add_argument("--seconds", type=float, default=8.0, help="steady seconds before the swap")
    ap.add_argument("--warmup", type=float, default=3.0, help="unmeasured seconds of load first")
    ap.add_argument("--after", type=float, default=5.0, help="seconds of load after the swap's answer")
    ap.add_argument("--concurrency", type=int, default=32, help="connections in all")
    ap.add_argument("--procs", type=int, default=2, help="load-generator processes")
    ap.add_argument("--timeout", type=float, default=60.0, help="seconds without an answer before a request is lost")
    ap.add_argument("--port", type=int, default=0, help="0: a free port")
    ap.add_argument("--device", default="cpu", help="where both versions run: cpu (default) or cuda[:N]")
    args = ap.parse_args(argv)
    if args.quick:
        args.warmup, args.seconds, args.after = 2.0, 5.0, 3.0
    host, port = "127.0.0.1", args.port or _free_port()
    base = f"http://{host}:{port}"

    with tempfile.TemporaryDirectory() as tmp:
        proc = start_server(Path(tmp), port, CONFIG.replace("{device}", args.device))
        try:
            # load version 1 (the active one) before the clock starts
            t = time.perf_counter()
            status, body = _post(f"{base}/v2/models/{MODEL}/infer", infer_body(), 120)
            first_load_s = time.perf_counter() - t
            m = _VERSION.search(body)
            if status != 200 or not m or m.group(1) != b"1":
                raise SystemExit(f"the first request did not get version 1: {status} {body[:300]!r}")

            ctx = mp.get_context("spawn")
            q = ctx.Queue()
            stop = ctx.Value("d", math.inf, lock=False)
            procs = max(1, min(args.procs, args.concurrency))
            per = [args.concurrency // procs + (1 if i < args.concurrency % procs else 0) for i in range(procs)]
            start_at = time.time() + 1.5  # time for the children to start
            ps = [ctx.Process(target=_worker, args=(host, port, n, start_at, stop, args.timeout, q)) for n in per]
            for p in ps:
                p.start()
            steady_from = start_at + args.warmup
            time.sleep(max(0.0, steady_from + args.seconds - time.time()))

            swap_from = time.time()
            t = time.perf_counter()
            swap_status, swap_body = _post(f"{base}/api/models/{MODEL}/swap", b'{"version": "2"}', 600,
                                           control_token(Path(tmp), port))
            swap_s = time.perf_counter() - t
            swap_to = time.time()

            time.sleep(args.after)
            stop.value = end = time.time()
            records: list[Record] = []
            errors: list[str] = []
            reported = 0
            for _ in ps:
                try:
                    rec, er = q.get(timeout=args.timeout + 60)
                except Exception:  # noqa: BLE001 - a child that never answers
                    break
                records.extend(rec)
                errors.extend(er)
                reported += 1
            for p in ps:
                p.join(10)
            # a load generator that never reported: its connections' last requests are lost at least
            unreported = sum(per[reported:])
            if unreported:
                errors.append(f"{procs - reported} load generator(s) never reported")
        finally:
            proc.terminate()
            proc.wait(60)

    rows = [phase_row("warm-up", records, start_at, steady_from, steady_from),
            phase_row("steady", records, steady_from, swap_from, steady_from),
            phase_row("swap", records, swap_from, swap_to, steady_from),
            phase_row("after", records, swap_to, math.inf, steady_from),
            phase_row("all", records, 0.0, math.inf, steady_from)]
    rows[-1]["from_s"], rows[-1]["dur_s"] = start_at - steady_from, end - start_at
    rows[3]["dur_s"] = end - swap_to
    total = rows[-1]
    failed, lost = total["failed"], total["lost"] + unreported
    steady, during, after = rows[1], rows[2], rows[3]
    ratio = during["p99_ms"] / steady["p99_ms"] if steady["p99_ms"] and not math.isnan(during["p99_ms"]) else math.nan

    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    print(f"zoo:encoder {ARGS} on the CPU, \"{MODEL}\" v1 -> v2 (vocab {V2_ARGS['vocab']}) under c={args.concurrency} "
          f"({procs} procs) over loopback; {cpus} CPUs shared by server and load generator")
    print(f"  version 1 first load (before the load): {first_load_s:.2f} s; swap: HTTP {swap_status} in {swap_s:.3f} s"
          + (f" {swap_body[:200].decode(errors='replace')}" if swap_status == 200 else ""))
    if swap_status != 200:
        print(f"  swap FAILED: {swap_body[:500].decode(errors='replace')}")
    print(f"  {'phase':<8} {'from s':>7} {'dur s':>6} {'requests':>9} {'req/s':>6} {'failed':>6} {'lost':>5} "
          f"{'p50 ms':>7} {'p99 ms':>7}  versions served")
    for r in rows:
        vs = " ".join(f"v{v}:{n}" for v, n in sorted(r["versions"].items())) or "-"
        rps = r["requests"] / r["dur_s"] if r["dur_s"] > 0 else math.nan
        print(f"  {r['phase']:<8} {r['from_s']:>7.2f} {r['dur_s']:>6.2f} {r['requests']:>9} {rps:>6.0f} "
              f"{r['failed']:>6} {r['lost']:>5} {r['p50_ms']:>7.1f} {r['p99_ms']:>7.1f}  {vs}")
    n_after = sum(after["versions"].values())
    if n_after:
        print(f"  after the switch (sent after the swap's answer): v1 {after['versions'].get('1', 0) / n_after:.1%}, "
              f"v2 {after['versions'].get('2', 0) / n_after:.1%} of {n_after} answers")
    v2_sent = [r[0] for r in records if r[2] == 200 and r[3] == "2"]
    v1_sent = [r[0] for r in records if r[2] == 200 and r[3] == "1"]
    if v2_sent and v1_sent:
        print(f"  within the swap: last v1 request sent at +{max(v1_sent) - swap_from:.3f} s, "
              f"first v2 at +{min(v2_sent) - swap_from:.3f} s (of {swap_s:.3f} s)")
    for e in sorted(set(errors))[:5]:
        print(f"  error: {e}  (x{errors.count(e)})")
    print(json.dumps({
        "failed": failed,
        "lost": lost,
        "p99_steady_ms": _num(steady["p99_ms"]),
        "p99_during_swap_ms": _num(during["p99_ms"]),
        "p99_ratio": _num(ratio, 2),
        "swap_s": round(swap_s, 3),
    }))
    return 1 if failed or lost or swap_status != 200 or unreported else 0


if __name__ == "__main__":
    sys.exit(main())
