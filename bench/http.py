"""HTTP and gRPC benchmark: one process against ``--workers N`` front-end processes, and three models.

    python bench/http.py --device cuda                 # the GPU host: 8 workers, ~10 s per row
    python bench/http.py --quick                       # the 2-core machine: --workers 1, 3 s per row
    python bench/http.py --workers 4 --protocol http --models 2

What runs where (so the figures mean something):

* the servers are real ``modelconsole --serve`` subprocesses (own store in a
  temporary directory), started as a user would start them; first with
  ``--workers 0`` (one process), then with ``--workers N`` (N front-end
  processes beside one engine core) — side by side in one run;
* the load comes from separate processes (``multiprocessing``, spawn) on
  cores of their own where the machine has enough (the server's processes
  are pinned to the first cores, the load generators to the last; the CPU
  split is printed): persistent HTTP/1.1 keep-alive connections sending the
  bytes ``tritonclient.http`` sends for a binary V2 request (a lean raw-socket
  client, like wrk: every status checked, the first answer of each
  connection parsed), or gRPC channels sending pre-serialized
  ``ModelInferRequest`` messages with ``raw_input_contents``;
* rows: tiny-mlp single-sample at c=256 (req/s), and at c=1 (p50), for both
  servers; the same c=256 over gRPC to the workers server; then
  ``--models K`` (tiny-mlp, small-cnn, encoder) at 64 connections each,
  single-sample, against **raw torch** running the same K models back to back
  in one process at the mean batch size each model ran at in the server
  (read from its statistics), on the same device.

The LAST line is one JSON object with exactly ``single_process_rps``,
``workers_rps``, ``workers``, ``scaling`` (workers_rps / single_process_rps),
``multi_model_rps``, ``multi_model_vs_raw``, ``grpc_rps`` and ``grpc_vs_http``
(grpc_rps / workers_rps; both null with ``--protocol http``), ``c1_p50_us`` (the workers server's), ``c1_p50_single_us``
(the single process's) and ``core_cpu_us_per_request`` (the engine-core
process's CPU time over the requests it answered at c=256 through the
workers; its front ends' CPU is not in it).
"""

from __future__ import annotations

import sys
from pathlib import Path

# This file is named http.py (the docs name it): its folder goes to the END of the import
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
import struct
import subprocess
import tempfile
import time
import urllib.request

from serveproc import start_server

_CL = re.compile(rb"\r\ncontent-length: *(\d+)", re.I)  # not Inference-Header-Content-Length

# the three light models of the multi-model rows, as `modelconsole --serve` serves them by default:
# (served name, zoo name, input, datatype, sample shape, zoo args)
ZOO = [("tiny", "tiny-mlp", "input", "FP32", (64,), {}),
       ("cnn", "small-cnn", "input", "FP32", (3, 32, 32), {}),
       ("encoder", "encoder", "input_ids", "INT64", (64,), {"layers": 2, "d_model": 256, "heads": 4, "seq": 64})]


def _sample(datatype: str, shape: tuple[int, ...]) -> bytes:
    n = 1
    for d in shape:
        n *= d
    if datatype == "INT64":
        return struct.pack(f"<{n}q", *[(i * 7919) % 1000 for i in range(n)])
    return struct.pack(f"<{n}f", *[((i * 7919) % 1000) / 1000.0 - 0.5 for i in range(n)])


# --------------------------------------------------------------------------- requests


def http_request(model: int, host: str, port: int) -> bytes:
    """One binary V2 POST for ZOO[model], single sample, as tritonclient.http builds it."""
    name, _, inp, datatype, shape, _ = ZOO[model]
    raw = _sample(datatype, shape)
    head = json.dumps({"inputs": [{"name": inp, "shape": [1, *shape], "datatype": datatype,
                                   "parameters": {"binary_data_size": len(raw)}}],
                       "parameters": {"binary_data_output": True}}, separators=(",", ":")).encode()
    body = head + raw
    return (b"POST /v2/models/%s/infer HTTP/1.1\r\nHost: %s:%d\r\n" % (name.encode(), host.encode(), port)
            + b"Inference-Header-Content-Length: %d\r\nContent-Type: application/octet-stream\r\n" % len(head)
            + b"Content-Length: %d\r\n\r\n" % len(body) + body)


def grpc_request(model: int) -> bytes:
    """One ModelInferRequest for ZOO[model] with raw_input_contents, serialized (as tritonclient.grpc sends)."""
    from modelconsole.server.grpc_v2 import M

    name, _, inp, datatype, shape, _ = ZOO[model]
    req = M["ModelInferRequest"](model_name=name)
    req.inputs.add(name=inp, datatype=datatype, shape=[1, *shape])
    req.raw_input_contents.append(_sample(datatype, shape))
    return req.SerializeToString()


def _check_first(head: bytes, body: bytes) -> None:
    hl = int(re.search(rb"\r\ninference-header-content-length: *(\d+)", head, re.I).group(1))
    out = json.loads(body[:hl])["outputs"][0]
    assert out["shape"][0] == 1, out


# --------------------------------------------------------------------------- load generator (child processes)


class Tally:
    def __init__(self) -> None:
        self.lat: list[int] = []
        self.errors: list[str] = []
        self.by_model: dict[int, int] = {}

    def record(self, model: int, ok: bool, t0: int, t1: int, start_at: int, stop_at: int, what: bytes) -> None:
        if not ok:
            self.errors.append(what[:300].decode(errors="replace"))
        elif start_at <= t0 and t1 <= stop_at:
            self.lat.append(t1 - t0)
            self.by_model[model] = self.by_model.get(model, 0) + 1


async def _http_connection(host: str, port: int, model: int, start_at: int, stop_at: int, tally: Tally) -> None:
    request = http_request(model, host, port)
    reader, writer = await asyncio.open_connection(host, port)
    writer.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    first = True
    clock = time.perf_counter_ns
    try:
        while clock() < stop_at:
            t0 = clock()
            writer.write(request)
            head = await reader.readuntil(b"\r\n\r\n")
            m = _CL.search(head)
            body = await reader.readexactly(int(m.group(1))) if m else b""
            ok = head[9:12] == b"200"
            if ok and first:
                _check_first(head, body)
                first = False
            tally.record(model, ok, t0, clock(), start_at, stop_at, head[:12] + b" " + body)
    finally:
        writer.close()


def _http_blocking(host: str, port: int, model: int, start_at: int, stop_at: int, tally: Tally) -> None:
    """c=1: one blocking socket, no event loop in the client's way."""
    request = http_request(model, host, port)
    sock = socket.create_connection((host, port))
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    clock = time.perf_counter_ns
    buf = b""
    try:
        while clock() < stop_at:
            t0 = clock()
            sock.sendall(request)
            while b"\r\n\r\n" not in buf:
                buf += sock.recv(65536)
            head, _, buf = buf.partition(b"\r\n\r\n")
            m = _CL.search(head + b"\r\n")
            need = int(m.group(1)) if m else 0
            while len(buf) < need:
                buf += sock.recv(65536)
            body, buf = buf[:need], buf[need:]
            tally.record(model, head[9:12] == b"200", t0, clock(), start_at, stop_at, head[:12] + b" " + body)
    finally:
        sock.close()


async def _grpc_streams(host: str, port: int, models: list[int], start_at: int, stop_at: int, tally: Tally) -> None:
    import grpc

    from modelconsole.server.grpc_v2 import M

    per_channel = 16  # HTTP/2 streams per channel, as a pool of clients would spread them
    channels = [grpc.aio.insecure_channel(f"{host}:{port}") for _ in range((len(models) + per_channel - 1)
                                                                            // per_channel)]
    clock = time.perf_counter_ns

    async def stream(k: int, model: int) -> None:
        call = channels[k // per_channel].unary_unary("/inference.GRPCInferenceService/ModelInfer")
        request = grpc_request(model)
        first = True
        while clock() < stop_at:
            t0 = clock()
            try:
                reply = await call(request)
                ok, what = True, b""
            except grpc.aio.AioRpcError as e:
                ok, what = False, f"{e.code().name} {e.details()}".encode()
            if ok and first:
                assert M["ModelInferResponse"].FromString(reply).outputs[0].shape[0] == 1
                first = False
            tally.record(model, ok, t0, clock(), start_at, stop_at, what)

    try:
        await asyncio.gather(*(stream(k, m) for k, m in enumerate(models)))
    finally:
        for ch in channels:
            await ch.close()


def _worker(protocol: str, host: str, port: int, models: list[int], warmup_s: float, seconds: float,
            t_start: float, cpus: list[int] | None, out: mp.Queue) -> None:
    if cpus and hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, cpus)
    now_wall, now_ns = time.time(), time.perf_counter_ns()
    start_at = now_ns + int((t_start + warmup_s - now_wall) * 1e9)
    stop_at = start_at + int(seconds * 1e9)
    tally = Tally()
    cpu0 = time.process_time()
    try:
        if protocol == "grpc":
            asyncio.run(_grpc_streams(host, port, models, start_at, stop_at, tally))
        elif len(models) == 1:
            _http_blocking(host, port, models[0], start_at, stop_at, tally)
        else:
            async def main() -> None:
                await asyncio.gather(*(_http_connection(host, port, m, start_at, stop_at, tally) for m in models))
            asyncio.run(main())
    except Exception as e:  # noqa: BLE001 - the parent reports it instead of waiting for a result
        tally.errors.append(f"load generator failed: {type(e).__name__}: {e}")
    out.put((tally.lat, tally.errors, tally.by_model, time.process_time() - cpu0))


def _cpu_seconds(pid: int | None) -> float:
    """User + system CPU time of a process so far (Linux /proc; 0 elsewhere)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, TypeError):
        return 0.0


def _children(pid: int) -> list[int]:
    try:
        return [int(c) for t in Path(f"/proc/{pid}/task").iterdir()
                for c in (t / "children").read_text().split()]
    except OSError:
        return []


def run_load(protocol: str, host: str, port: int, models: list[int], procs: int, warmup_s: float, seconds: float,
             server_pid: int | None, cpus: list[int] | None) -> dict:
    """``models``: one entry per connection (stream), the model it sends to."""
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    procs = max(1, min(procs, len(models)))
    shares = [models[i::procs] for i in range(procs)]
    t_start = time.time() + 1.5  # time for the children to start
    ps = [ctx.Process(target=_worker, args=(protocol, host, port, share, warmup_s, seconds, t_start, cpus, q))
          for share in shares]
    for p in ps:
        p.start()
    time.sleep(max(0.0, t_start + warmup_s - time.time()))
    fronts = _children(server_pid) if server_pid else []
    core0, fe0 = _cpu_seconds(server_pid), sum(_cpu_seconds(p) for p in fronts)
    time.sleep(seconds)
    core1, fe1 = _cpu_seconds(server_pid), sum(_cpu_seconds(p) for p in fronts)
    lat: list[int] = []
    errors: list[str] = []
    by_model: dict[int, int] = {}
    load_cpu = 0.0
    for _ in ps:
        lt, er, bm, cpu = q.get(timeout=warmup_s + seconds + 120)
        lat.extend(lt)
        errors.extend(er)
        load_cpu += cpu
        for m, n in bm.items():
            by_model[m] = by_model.get(m, 0) + n
    for p in ps:
        p.join()
    lat.sort()
    n = len(lat)
    pct = (lambda q: lat[min(n - 1, int(q * n))] / 1000.0) if n else (lambda q: float("nan"))
    return {"protocol": protocol, "c": len(models), "procs": procs, "requests": n, "errors": len(errors),
            "first_error": errors[0] if errors else None, "rps": n / seconds,
            "by_model": {ZOO[m][0]: c / seconds for m, c in sorted(by_model.items())},
            "cpu": {"core": (core1 - core0) / seconds, "front ends": (fe1 - fe0) / seconds,
                    "load": load_cpu / (seconds + warmup_s)},
            "p50_us": pct(0.50), "p99_us": pct(0.99)}


# --------------------------------------------------------------------------- servers and raw torch


def config(models: int, device: str, ipc: str = "unix", spin_us: float | None = None,
           switch_us: float | None = None, graphs: bool = False) -> str:
    def args(a: dict[str, int]) -> str:
        return f"args = {{ {', '.join(f'{k} = {v}' for k, v in a.items())} }}\n" if a else ""

    spin = f"ipc_spin_us = {spin_us}\n" if spin_us is not None else ""
    spin += f"gil_switch_us = {switch_us}\n" if switch_us is not None else ""
    return f'[server]\nipc = "{ipc}"\n{spin}\n' + "\n".join(
        f'[[models]]\nname = "{name}"\nsource = "zoo:{zoo}"\ndevice = "{device}"\n{args(a)}'
        + ("cuda_graphs = true\n" if graphs else "")
        for name, zoo, _, _, _, a in ZOO[:models])


def model_stats(port: int) -> dict[str, tuple[int, int]]:
    """(inference_count, execution_count) per model, from the server's statistics."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/v2/models/stats", timeout=30) as r:
        stats = json.loads(r.read())["model_stats"]
    return {s["name"]: (s["inference_count"], s["execution_count"]) for s in stats}


def raw_torch_samples_per_s(models: int, batches: dict[str, int], device: str, seconds: float) -> float:
    """The same zoo models run back to back at the given batch sizes, in this process, samples/s."""
    import torch

    from modelconsole.scheduler import zoo

    built = []
    for name, zname, _, datatype, shape, zargs in ZOO[:models]:
        module = zoo.build(zname, zargs)[0].to(device)
        b = max(1, batches.get(name, 1))
        if datatype == "INT64":
            x = torch.randint(0, 1000, (b, *shape), device=device)
        else:
            x = torch.rand((b, *shape), device=device)
        built.append((module, x, b))
    one = []
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    with torch.inference_mode():
        for module, x, b in built:  # warm up, and each model alone (printed beside the total)
            module(x)
            sync()
            t0, n = time.perf_counter(), 0
            while time.perf_counter() - t0 < 0.5:
                module(x)
                sync()
                n += b
            one.append(round(n / (time.perf_counter() - t0)))
        print(f"  raw torch alone, samples/s: {dict(zip([m[0] for m in ZOO], one))}")
        samples = 0
        t0 = time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            for module, x, b in built:
                module(x)
                samples += b
            sync()
        return samples / (time.perf_counter() - t0)


class Serve:
    """``modelconsole --serve`` (pinned to ``cpus`` where given) for the length of a with-block."""

    def __init__(self, tmp: Path, models: int, device: str, workers: int, cpus: list[int] | None, ipc: str,
                 spin_us: float | None = None, switch_us: float | None = None, graphs: bool = False):
        self.tmp = tmp / f"w{workers}"
        self.tmp.mkdir()
        self.port = _free_port()
        self.grpc_port = _free_port()
        self.args = (config(models, device, ipc, spin_us, switch_us, graphs), workers, cpus)

    def __enter__(self) -> Serve:
        text, workers, cpus = self.args
        self.proc = start_server(self.tmp, self.port, text,
                                 ["--workers", str(workers), "--grpc-port", str(self.grpc_port)], cpus)
        return self

    def __exit__(self, *exc: object) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main(argv: list[str] | None = None) -> int:
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="3 s per row, --workers 1 (the 2-core machine)")
    ap.add_argument("--workers", type=int, help="front-end processes of the second server (default 8, --quick 1)")
    ap.add_argument("--protocol", choices=["http", "grpc", "both"], default="both",
                    help="both (default): the c=256 rows over HTTP and the gRPC row; http: no gRPC row")
    ap.add_argument("--models", type=int, choices=[1, 2, 3],
                    help="models of the multi-model rows (default 3; --quick 2: the encoder takes ~2 s a batch on a "
                    "CPU core)")
    ap.add_argument("--device", default="cpu", help="cpu or cuda (the models and raw torch)")
    ap.add_argument("--ipc", choices=["unix", "zmq"], default="unix", help="[server] ipc of the workers server")
    ap.add_argument("--gil-switch-us", type=float, help="[server] gil_switch_us of both servers")
    ap.add_argument("--cuda-graphs", action="store_true",
                    help="cuda_graphs = true for every model of both servers (captured graphs per batch bucket)")
    ap.add_argument("--ipc-spin-us", type=float, help="[server] ipc_spin_us of the workers server (default: the "
                    "server's own default)")
    ap.add_argument("--seconds", type=float, default=10.0, help="measured seconds per row")
    ap.add_argument("--warmup", type=float, default=3.0, help="unmeasured seconds before each row")
    ap.add_argument("--procs", type=int, help="load-generator processes (default: the cores the servers leave)")
    ap.add_argument("--attach", type=int, metavar="PORT",
                    help="only load a server already listening on 127.0.0.1:PORT (serving zoo:tiny-mlp as \"tiny\"), "
                    "e.g. to profile it: its c=256 and c=1 rows (workers_rps and c1_p50_us; the rest null)")
    ap.add_argument("--server-pid", type=int, help="with --attach: the server's pid, for its CPU split")
    args = ap.parse_args(argv)
    if args.quick:
        args.seconds, args.warmup = 3.0, 1.0
    workers = args.workers if args.workers is not None else (1 if args.quick else 8)
    if args.models is None:
        args.models = 2 if args.quick else 3
    host = "127.0.0.1"
    # the servers get the first cores (the core process, its model threads, the front ends), the load the rest
    server_cores = min(cores, workers + 3)
    spare = cores - server_cores
    if spare >= 2:
        server_cpus, load_cpus = list(range(server_cores)), list(range(server_cores, cores))
    else:
        server_cpus = load_cpus = None  # a small machine: everyone shares every core (said in the table)
    procs = args.procs or max(1, min(8, spare if load_cpus else cores))

    rows: dict[str, dict] = {}
    tiny256, tiny1 = [0] * 256, [0]
    if args.attach:
        return attached(args, host, procs, load_cpus)
    multi = [m for m in range(args.models) for _ in range(64)]
    with tempfile.TemporaryDirectory() as tmp:
        with Serve(Path(tmp), args.models, args.device, 0, server_cpus, args.ipc,
                   switch_us=args.gil_switch_us, graphs=args.cuda_graphs) as one:
            rows["one process, c=256"] = run_load("http", host, one.port, tiny256, procs, args.warmup,
                                                  args.seconds, one.proc.pid, load_cpus)
            rows["one process, c=1"] = run_load("http", host, one.port, tiny1, 1, args.warmup, args.seconds,
                                                one.proc.pid, load_cpus)
        with Serve(Path(tmp), args.models, args.device, workers, server_cpus, args.ipc, args.ipc_spin_us,
                   args.gil_switch_us, graphs=args.cuda_graphs) as many:
            name = f"{workers} workers"
            rows[f"{name}, c=256"] = run_load("http", host, many.port, tiny256, procs, args.warmup, args.seconds,
                                              many.proc.pid, load_cpus)
            rows[f"{name}, c=1"] = run_load("http", host, many.port, tiny1, 1, args.warmup, args.seconds,
                                            many.proc.pid, load_cpus)
            if args.protocol != "http":
                rows[f"{name}, gRPC c=256"] = run_load("grpc", host, many.grpc_port, tiny256, procs, args.warmup,
                                                       args.seconds, many.proc.pid, load_cpus)
            before = model_stats(many.port)
            rows[f"{name}, {args.models} models x 64"] = run_load("http", host, many.port, multi, procs,
                                                                  args.warmup, args.seconds, many.proc.pid,
                                                                  load_cpus)
            after = model_stats(many.port)
    batches = {}
    for m, (inf, ex) in after.items():
        d_inf, d_ex = inf - before.get(m, (0, 0))[0], ex - before.get(m, (0, 0))[1]
        batches[m] = round(d_inf / d_ex) if d_ex else 1
    raw = raw_torch_samples_per_s(args.models, batches, args.device, min(args.seconds, 5.0))

    where = (f"server on CPUs {server_cpus[0]}-{server_cpus[-1]}, load on {load_cpus[0]}-{load_cpus[-1]}"
             if server_cpus else f"server and load share all {cores} CPUs")
    print(f"tiny-mlp binary V2, single-sample; {args.device}; IPC {args.ipc}; {where}; {procs} load processes; "
          f"{args.seconds:g} s measured per row")
    print(f"  {'row':<28} {'requests':>9} {'req/s':>8} {'p50 us':>8} {'p99 us':>8} {'errors':>6}  "
          f"CPU cores busy (core / front ends / load)")
    for label, r in rows.items():
        cpu = r["cpu"]
        print(f"  {label:<28} {r['requests']:>9} {r['rps']:>8.0f} {r['p50_us']:>8.0f} {r['p99_us']:>8.0f} "
              f"{r['errors']:>6}  {cpu['core']:.2f} / {cpu['front ends']:.2f} / {cpu['load']:.2f}")
        if r["first_error"]:
            print(f"    first error: {r['first_error']}")
    multi_row = rows[f"{workers} workers, {args.models} models x 64"]
    per = ", ".join(f"{m} {rps:.0f} req/s at batch {batches.get(m, '?')}" for m, rps in multi_row["by_model"].items())
    print(f"  multi-model: {per}; raw torch back to back at those batches: {raw:.0f} samples/s")
    single = rows["one process, c=256"]["rps"]
    many_rps = rows[f"{workers} workers, c=256"]["rps"]
    grpc_row = rows.get(f"{workers} workers, gRPC c=256")
    print(f"  c=1 p50: one process {rows['one process, c=1']['p50_us']:.0f} us, "
          f"{workers} workers {rows[f'{workers} workers, c=1']['p50_us']:.0f} us")
    c256 = rows[f"{workers} workers, c=256"]
    # the engine-core process's CPU seconds over the requests it answered (its front ends not counted)
    core_us = round(c256["cpu"]["core"] / c256["rps"] * 1e6, 1) if c256["rps"] else None
    print(f"  engine core: {core_us} us of CPU per request at c=256 ({c256['cpu']['core']:.2f} cores busy)")
    print(json.dumps({
        "single_process_rps": round(single),
        "workers_rps": round(many_rps),
        "workers": workers,
        "scaling": round(many_rps / single, 2) if single else None,
        "multi_model_rps": round(multi_row["rps"]),
        "multi_model_vs_raw": round(multi_row["rps"] / raw, 3) if raw else None,
        "grpc_rps": round(grpc_row["rps"]) if grpc_row else None,
        "grpc_vs_http": round(grpc_row["rps"] / many_rps, 3) if grpc_row and many_rps else None,
        "c1_p50_us": round(rows[f"{workers} workers, c=1"]["p50_us"], 1),
        "c1_p50_single_us": round(rows["one process, c=1"]["p50_us"], 1),
        "core_cpu_us_per_request": core_us,
    }))
    return 1 if any(r["errors"] for r in rows.values()) else 0


def attached(args: argparse.Namespace, host: str, procs: int, load_cpus: list[int] | None) -> int:
    rows = {"attached, c=256": run_load("http", host, args.attach, [0] * 256, procs, args.warmup, args.seconds,
                                        args.server_pid, load_cpus),
            "attached, c=1": run_load("http", host, args.attach, [0], 1, args.warmup, args.seconds,
                                      args.server_pid, load_cpus)}
    print(f"tiny-mlp binary V2, single-sample, the server on 127.0.0.1:{args.attach}; {args.seconds:g} s per row")
    for label, r in rows.items():
        print(f"  {label:<16} {r['requests']:>9} req {r['rps']:>8.0f} req/s  p50 {r['p50_us']:>6.0f} us  "
              f"p99 {r['p99_us']:>6.0f} us  errors {r['errors']}  CPU {r['cpu']}")
    print(json.dumps({"single_process_rps": None, "workers_rps": round(rows["attached, c=256"]["rps"]),
                      "workers": None, "scaling": None, "multi_model_rps": None, "multi_model_vs_raw": None,
                      "grpc_rps": None, "grpc_vs_http": None, "c1_p50_us": round(rows["attached, c=1"]["p50_us"], 1),
                      "c1_p50_single_us": None, "core_cpu_us_per_request": None}))
    return 1 if any(r["errors"] for r in rows.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
