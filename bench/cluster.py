"""Fleet benchmark: the same CPU-bound workload on 1, 2 and 4 Ray nodes, and a node killed under load.

    python bench/cluster.py                 # the 16-core GPU host: 1, 2 and 4 nodes
    python bench/cluster.py --quick         # the 2-core machine: 1 and 2 nodes, short rows

What runs (so the figures mean something):

* a real local Ray cluster per row (``ray.cluster_utils.Cluster``: a head and
  N-1 more nodes, every process on 127.0.0.1, dashboard off), the fleet
  started as ``--serve --cluster`` starts it (``cluster/launch.py``), each
  node's engine core pinned to its own cores (``--cores-per-node``);
* the model: a small transformer encoder (``--layers``, d_model 128, 64
  tokens: ~2 MB of weights, a few ms of one core a sample) so a request is
  CPU work, with ``replicas`` = N (one per node) and ``torch_threads`` as
  configured; loaded before the row starts;
* the load: ``--concurrency`` keep-alive HTTP clients per node (the same
  load per node at every size) (aiohttp) in
  ``--clients`` spawned processes (1 with ``--quick``), sending
  single-sample V2 JSON requests round-robin to every node's front end for ``--seconds``; req/s counts 200 answers;
  with ``--workers N`` each node's front end is N processes over the local transport to its engine core;
* the kill: at the most nodes, traffic for ``--seconds``, a non-head node
  removed halfway; ``unanswered_on_node_kill`` counts requests that got no
  HTTP answer at all (a 503 with Retry-After is an answer), ``failover_s``
  is how long after the removal the last request in flight at that moment
  was answered.

* the restore: right after the kill a new node joins; ``replica_restore_s``
  is the time from the loss until the version is READY on ``replicas`` nodes
  again and the new node's front end answers it;
* the stop: the fleet stopped as SIGTERM stops it (``Controller.shutdown``)
  under the same load; ``lost_on_fleet_sigterm`` counts the requests sent
  before the stop that got no HTTP answer.

The LAST line is one JSON object with exactly ``nodes`` (the most),
``scaling_efficiency`` (req/s at the most nodes ÷ (nodes × req/s at one)),
``unanswered_on_node_kill``, ``failover_s``, ``replica_restore_s`` and
``lost_on_fleet_sigterm``.
"""

from __future__ import annotations

import sys
from pathlib import Path

# bench/ holds http.py: the folder goes to the END of the import path, so the standard library's
# http (urllib3, aiohttp, Ray) is the one imported
_HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _HERE] + [str(_HERE)]

import argparse  # noqa: E402
import asyncio  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

from modelconsole.cluster import rayenv  # noqa: E402

rayenv.apply_loopback_env()  # before Ray is imported: every process on 127.0.0.1

TOKEN = "bench-token"
ERRORS: dict[str, int] = {}  # client-side failures by exception type (printed)


def config_text(layers: int, replicas: int, threads: int) -> str:
    """A small transformer encoder: ~2 MB of weights (in cache on every core, so nodes on one
    machine do not contend for memory bandwidth) and a few ms of one core per sample."""
    return f"""
[server]
torch_threads = {threads}

[[models]]
name = "work"
source = "zoo:encoder"
args = {{ layers = {layers}, d_model = 128, heads = 4, seq = {SEQ}, vocab = 1000 }}
device = "cpu"
warmup = 1
replicas = {replicas}
max_batch_size = 32

[cluster]
frontend_port = 0
"""


SEQ = 64


def row_body() -> bytes:
    return json.dumps({"inputs": [{"name": "input_ids", "datatype": "INT64", "shape": [1, SEQ],
                                   "data": [(7 * i) % 1000 for i in range(SEQ)]}]}).encode()


def _client_process(urls: list[str], concurrency: int, seconds: float, out) -> None:
    """One load-generator process (spawned): its records and client errors go back on ``out``."""
    records = asyncio.run(drive(urls, concurrency, seconds))
    out.put((records, ERRORS))


async def drive_many(urls: list[str], concurrency: int, seconds: float, processes: int,
                     on_half=None) -> list[tuple[float, float, int]]:
    """``drive`` in ``processes`` spawned processes (one Python loop cannot load four nodes), the
    kill fired from here halfway; CLOCK_MONOTONIC is one clock for every process."""
    if processes <= 1:
        return await drive(urls, concurrency, seconds, on_half)
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    procs = [ctx.Process(target=_client_process, args=(urls, max(1, concurrency // processes), seconds, out))
             for _ in range(processes)]
    for p in procs:
        p.start()
    if on_half is not None:
        await asyncio.sleep(1.0 + seconds / 2)  # the processes' start, then half the row: when the kill lands
        await on_half()
    records: list[tuple[float, float, int]] = []
    for _ in procs:
        recs, errs = await asyncio.to_thread(out.get)
        records += recs
        for k, v in errs.items():
            ERRORS[k] = ERRORS.get(k, 0) + v
    for p in procs:
        p.join()
    return records


async def drive(urls: list[str], concurrency: int, seconds: float, on_half=None,
                halt: asyncio.Event | None = None) -> list[tuple[float, float, int]]:
    """(start, end, status) of every request; status 0: no HTTP answer.  Once ``halt`` is set
    no client starts another request (the fleet is stopping)."""
    import aiohttp

    body = row_body()
    records: list[tuple[float, float, int]] = []
    stop_at = time.monotonic() + seconds
    half = time.monotonic() + seconds / 2
    fired = asyncio.Event()

    async def client(i: int, session: aiohttp.ClientSession) -> None:
        url = f"{urls[i % len(urls)]}/v2/models/work/infer"
        while time.monotonic() < stop_at and not (halt is not None and halt.is_set()):
            t0 = time.monotonic()
            try:
                async with session.post(url, data=body, headers={"Content-Type": "application/json"}) as r:
                    await r.read()
                    status = r.status
            except (TimeoutError, aiohttp.ClientError, OSError) as e:
                status = 0
                ERRORS[type(e).__name__] = ERRORS.get(type(e).__name__, 0) + 1
            records.append((t0, time.monotonic(), status))
            if on_half is not None and not fired.is_set() and time.monotonic() >= half:
                fired.set()
                asyncio.get_running_loop().create_task(on_half())

    timeout = aiohttp.ClientTimeout(total=120)
    async with aiohttp.ClientSession(timeout=timeout, connector=aiohttp.TCPConnector(limit=0)) as session:
        await asyncio.gather(*(client(i, session) for i in range(concurrency)))
    return records


def run_row(n: int, args: argparse.Namespace, kill: bool) -> dict:
    import ray
    from ray.cluster_utils import Cluster

    from modelconsole.cluster import launch
    from modelconsole.scheduler.config import load_config
    from modelconsole.server.web import ServerSettings

    where = Path(tempfile.mkdtemp(prefix="mc-cluster-bench-"))
    (where / "fleet.toml").write_text(config_text(args.layers, n, args.torch_threads))
    config = load_config(where / "fleet.toml")
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "node_ip_address": "127.0.0.1",
                                                            "include_dashboard": False})
    # the kill row has one node more: a spare with room, sent no load, that takes the lost replica
    others = [cluster.add_node(num_cpus=1, node_ip_address="127.0.0.1") for _ in range(n - 1 + kill)]
    ray.init(address=cluster.address, namespace=rayenv.NAMESPACE, log_to_driver=False)
    cluster.wait_for_nodes()
    try:
        ids = [node["NodeID"] for node in ray.nodes() if node["Alive"]]
        cores = sorted(os.sched_getaffinity(0))
        k = args.cores_per_node
        pin = {nid: cores[i * k:(i + 1) * k] for i, nid in enumerate(ids)} if len(cores) >= len(ids) * k else {}
        spec = launch.controller_spec(config, ServerSettings(port=0, token=TOKEN), str(where / "fleet.db"),
                                      cpus=pin, workers=args.workers)
        controller = launch.start_controller(spec)

        async def go() -> dict:
            import aiohttp

            info = await launch.wait_for_nodes(controller, len(ids))
            front = {nid: v["frontend"] for nid, v in info["nodes"].items() if v["frontend"]}
            load = next(iter(front.values())) + "/api/models/work/load"
            auth = {"Authorization": f"Bearer {TOKEN}"}
            async with aiohttp.ClientSession() as s, s.post(load, json={}, headers=auth) as r:
                assert r.status == 200, await r.text()
                holders = (await r.json())["nodes"]  # replicas = n: n nodes
            by_id = {o.node_id: o for o in others}
            spare = next((i for i in front if i not in holders), None) if kill else None
            doomed = next((h for h in reversed(holders) if h in by_id), None) if kill else None  # not the head
            # clients of the node that goes lose their connection with it: load goes to the others' front ends
            urls = [front[h] for h in holders if h != doomed]
            killed_at: list[float] = []
            restore: list[asyncio.Task] = []

            async def kill_one() -> None:
                killed_at.append(time.monotonic())
                await asyncio.to_thread(cluster.remove_node, by_id[doomed])
                if spare is not None:
                    restore.append(asyncio.get_running_loop().create_task(
                        restored(urls[0], n, killed_at[0], spare, front[spare])))

            # the same load per node at every size: concurrency grows with the nodes (per-node batches alike)
            clients = args.concurrency * n
            await drive_many(urls, clients, 1.0, args.clients)  # warm every connection and holder
            recs = await drive_many(urls, clients, args.seconds, args.clients, kill_one if kill else None)
            ok = [r for r in recs if r[2] == 200]
            out = {"nodes": n, "rps": len(ok) / args.seconds, "requests": len(recs),
                   "errors": sum(1 for r in recs if r[2] != 200), "pinned": bool(pin),
                   "unanswered": sum(1 for r in recs if r[2] == 0), "failover_s": 0.0}
            if killed_at:
                t = killed_at[0]
                in_flight = [r for r in recs if r[0] <= t <= r[1]]
                out["failover_s"] = max((r[1] - t for r in in_flight), default=0.0)
                out["replica_restore_s"] = await asyncio.wait_for(restore[0], 180) if restore else None
                out.update(await stop_under_load(urls, clients))
            else:
                await controller.shutdown.remote()
            return out

        async def restored(url: str, replicas: int, lost_at: float, spare: str, spare_url: str) -> float:
            """Seconds from the loss until the version is READY on ``replicas`` nodes again, the
            spare among them, and the spare's front end answers it (the controller's restore)."""
            import aiohttp

            auth = {"Authorization": f"Bearer {TOKEN}"}
            async with aiohttp.ClientSession() as s:
                while time.monotonic() - lost_at < 120:
                    async with s.get(url + "/api/models/work", headers=auth) as r:
                        m = (await r.json())["versions"][0]
                    if len(m.get("nodes", [])) >= replicas and spare in m["nodes"]:
                        async with s.post(spare_url + "/v2/models/work/infer", data=row_body(),
                                          headers={"Content-Type": "application/json"}) as r:
                            if r.status == 200:
                                return time.monotonic() - lost_at
                    await asyncio.sleep(0.05)
            return float("inf")

        async def stop_under_load(urls: list[str], clients: int) -> dict:
            """The fleet stopped as SIGTERM stops it (``Controller.shutdown``) with requests in
            flight: how many of those sent before the stop got no HTTP answer at all."""
            halt = asyncio.Event()
            stopped_at: list[float] = []

            async def stop() -> None:
                stopped_at.append(time.monotonic())
                halt.set()
                await controller.shutdown.remote()

            info = await controller.ready.remote()
            live = [v["frontend"] for v in info["nodes"].values() if v["health"] == "ok" and v["frontend"]]
            recs = await drive(live, clients, 4.0, stop, halt)
            t = stopped_at[0] if stopped_at else float("inf")
            before = [r for r in recs if r[0] <= t]
            return {"lost_on_fleet_sigterm": sum(1 for r in before if r[2] == 0),
                    "in_flight_at_sigterm": sum(1 for r in before if r[1] >= t),
                    "sigterm_non_200": sum(1 for r in before if r[2] not in (0, 200))}

        return asyncio.run(go())
    finally:
        ray.shutdown()
        cluster.shutdown()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--nodes", default="1,2,4", help="node counts, comma-separated (default 1,2,4)")
    p.add_argument("--quick", action="store_true", help="1 and 2 nodes, 4 s rows (the 2-core machine)")
    p.add_argument("--seconds", type=float, default=10.0)
    p.add_argument("--concurrency", type=int, default=64, help="connections per node (the total grows with nodes)")
    p.add_argument("--layers", type=int, default=6, help="the encoder's layers: the work per request")
    p.add_argument("--cores-per-node", type=int, default=3, help="cores each node's engine core is pinned to")
    p.add_argument("--torch-threads", type=int, default=1)
    p.add_argument("--clients", type=int, default=4, help="load-generator processes (1 with --quick)")
    p.add_argument("--workers", type=int, default=0,
                   help="front-end processes per node over the local transport (0: the node's front-end actor)")
    args = p.parse_args()
    counts = [1, 2] if args.quick else [int(x) for x in args.nodes.split(",")]
    if args.quick:
        args.seconds, args.concurrency, args.cores_per_node, args.clients = 4.0, 16, 1, 1
    rows = [run_row(n, args, kill=False) for n in counts]
    most = max(counts)
    kill = run_row(most, args, kill=True) if most > 1 else {"unanswered": 0, "failover_s": 0.0,
                                                             "replica_restore_s": None, "lost_on_fleet_sigterm": None}
    base = rows[0]["rps"]
    top = next(r for r in rows if r["nodes"] == most)["rps"]
    print(f"front ends per node: {args.workers or 'the node actor'}")
    print(f"{'nodes':>5} {'req/s':>9} {'per node':>9} {'requests':>9} {'errors':>7} {'pinned':>6}")
    for r in rows:
        print(f"{r['nodes']:>5} {r['rps']:>9.0f} {r['rps'] / r['nodes']:>9.0f} {r['requests']:>9} {r['errors']:>7} "
              f"{str(r['pinned']):>6}")
    print(f"node killed at {most} nodes: {kill.get('unanswered')} unanswered, failover {kill.get('failover_s'):.2f} s, "
          f"{kill.get('errors', 0)} non-200 answers (503 with Retry-After while it was placed again)")
    if kill.get("replica_restore_s") is not None:
        print(f"a node joined in the lost one's place: the replica served again {kill['replica_restore_s']:.2f} s "
              f"after the loss")
        print(f"fleet stopped (SIGTERM's path) with {kill['in_flight_at_sigterm']} requests in flight: "
              f"{kill['lost_on_fleet_sigterm']} without an answer, {kill['sigterm_non_200']} non-200 answers")
    if ERRORS:
        print("requests without an HTTP answer, by client error:", ERRORS)
    print(json.dumps({"nodes": most, "scaling_efficiency": round(top / (most * base), 3) if base else None,
                      "unanswered_on_node_kill": kill.get("unanswered"),
                      "failover_s": round(kill.get("failover_s", 0.0), 3),
                      "replica_restore_s": (round(kill["replica_restore_s"], 2)
                                            if kill.get("replica_restore_s") is not None else None),
                      "lost_on_fleet_sigterm": kill.get("lost_on_fleet_sigterm")}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
