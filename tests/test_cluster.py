"""The fleet on a real local Ray cluster (``ray.cluster_utils.Cluster``: a head and more nodes in
this machine, every process on 127.0.0.1, simulated GPUs as the custom resource ``sim_gpu``).

One cluster serves the module (starting one costs seconds); the tests run in file order and
the last ones change it (a node removed, the controller killed).  Each waits on the fleet's
own answers (``wait_for``: the controller's node list, the snapshot), never on a clock."""

from __future__ import annotations

import asyncio
import ipaddress
import json
import os
import re

import pytest
from waiting import until

from modelconsole.cluster import rayenv

# before Ray is imported: it reads these when its modules load (every process on 127.0.0.1)
rayenv.apply_loopback_env()
pytest.importorskip("ray")

import aiohttp  # noqa: E402
import psutil  # noqa: E402

from modelconsole.cluster import launch, placement  # noqa: E402
from modelconsole.scheduler.config import load_config  # noqa: E402
from modelconsole.server.web import ServerSettings  # noqa: E402

TOKEN = "fleet-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
CONFIG = """
[[models]]
name = "tiny"
source = "zoo:tiny-mlp"
warmup = 0
replicas = 2

[[models]]
name = "solo"
source = "zoo:tiny-mlp"
warmup = 0

[[models]]
name = "slow"
source = "zoo:tiny-mlp"
warmup = 0
max_queue_delay_ms = 2000
max_batch_size = 256

[server]
grpc_port = 0

[cluster]
frontend_port = 0
"""
ROW = {"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 64], "data": [0.5] * 64}]}


# ------------------------------------------------------------------ placement (pure)


def test_place_prefers_holders_then_room_then_the_cheapest_eviction_and_spreads():
    nodes = [placement.NodeView("a", free_bytes=10, holds=frozenset({"m:1"}), outstanding=5),
             placement.NodeView("b", free_bytes=100, outstanding=1),
             placement.NodeView("c", free_bytes=50),
             placement.NodeView("d", free_bytes=0, cheapest_keep=0.1),
             placement.NodeView("e", free_bytes=0, cheapest_keep=5.0),
             placement.NodeView("f", free_bytes=1000, alive=False)]
    assert placement.place("m:1", 40, nodes, 1) == ["a"]
    assert placement.place("m:1", 40, nodes, 3) == ["a", "b", "c"]
    assert placement.place("n:1", 40, nodes, 5) == ["b", "c", "d", "e", "a"]  # a lacks room: last but evictions
    assert placement.place("n:1", 40, nodes, 9) == ["b", "c", "d", "e", "a"]  # one replica per node, dead skipped
    assert placement.place("m:1", 40, nodes, 1, exclude=["a"]) == ["b"]


def test_pick_takes_the_least_outstanding_holder():
    assert placement.pick([("a", 3), ("b", 1), ("c", 1)]) == "b"
    assert placement.pick([("a", 3), ("b", 1)], exclude=["b"]) == "a"
    assert placement.pick([("a", 3)], exclude=["a"]) is None


def test_a_node_that_keeps_failing_is_said_once_then_summarised():
    from modelconsole.cluster.controller import FAILURE_SUMMARY_S, failure_report

    say, state = failure_report(None, 100.0, "OSError: [Errno 98] Address already in use")
    assert say is not None and "Address already in use" in say and state.attempts == 1
    for k in range(1, 20):  # a retry every tick: nothing more to say for a while
        say, state = failure_report(state, 100.0 + k * 0.5, "OSError: [Errno 98] Address already in use")
        assert say is None
    say, state = failure_report(state, 100.0 + FAILURE_SUMMARY_S + 1, "the same")
    assert say is not None and "21 attempts" in say and "the same" in say
    say, state = failure_report(state, 100.0 + FAILURE_SUMMARY_S + 2, "the same")
    assert say is None


def test_the_nodes_panel_says_what_a_lost_node_held_and_why_a_node_is_degraded():
    from modelconsole.console.format import node_lines

    lines = node_lines([
        {"node": "aaaaaaaa11", "health": "lost", "holds": [], "held": ["tiny:1"], "gpus": 0},
        {"node": "bbbbbbbb22", "health": "degraded", "holds": ["tiny:1"], "gpus": 0,
         "frontend_error": "its front end could not serve on 127.0.0.1:8000: [Errno 98] Address already in use"},
    ])
    assert "lost" in lines[1] and "nothing (held tiny:1)" in lines[1]
    assert "degraded" in lines[2] and "tiny:1" in lines[2] and "127.0.0.1:8000" in lines[2]


def test_cluster_address_setting():
    assert rayenv.gcs_address("ray") == "auto"
    assert rayenv.gcs_address("ray://10.0.0.1:6379") == "10.0.0.1:6379"
    with pytest.raises(ValueError, match="ray://HOST:PORT"):
        rayenv.gcs_address("http://x")


# ------------------------------------------------------------------ a real cluster


class Fleet:
    def __init__(self, cluster, controller, control_port, config_path, store_path):
        self.cluster = cluster
        self.controller = controller
        self.control_port = control_port
        self.config_path = config_path
        self.store_path = store_path
        self.stopped = False  # the last test stops the fleet through the CLI

    async def info(self):
        return await self.controller.ready.remote()

    async def frontends(self):
        return {n: v["frontend"] for n, v in (await self.info())["nodes"].items()
                if v["health"] == "ok" and v["frontend"]}


@pytest.fixture(scope="module")
def fleet(tmp_path_factory):
    import ray
    from ray.cluster_utils import Cluster

    where = tmp_path_factory.mktemp("fleet")
    (where / "fleet.toml").write_text(CONFIG)
    config = load_config(where / "fleet.toml")
    control_port = rayenv.free_port()
    config = type(config)(**{**config.__dict__, "cluster": type(config.cluster)(control_port=control_port,
                                                                                 frontend_port=0)})
    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 1, "node_ip_address": "127.0.0.1", "include_dashboard": False, "resources": {"sim_gpu": 1}})
    cluster.add_node(num_cpus=1, node_ip_address="127.0.0.1", resources={"sim_gpu": 1})
    ray.init(address=cluster.address, namespace=rayenv.NAMESPACE, log_to_driver=False)
    spec = launch.controller_spec(config, ServerSettings(port=0, token=TOKEN), str(where / "fleet.db"),
                                  simulate_gpu_size="2GiB")
    controller = launch.start_controller(spec)
    asyncio.run(launch.wait_for_nodes(controller, 2))
    f = Fleet(cluster, controller, control_port, where / "fleet.toml", where / "fleet.db")
    yield f
    try:
        if not f.stopped:
            ray.get(controller.shutdown.remote(), timeout=60)
            ray.kill(controller, no_restart=True)
    finally:
        ray.shutdown()
        cluster.shutdown()


async def snapshot(url):
    async with aiohttp.ClientSession() as s, s.get(url + "/api/snapshot", headers=AUTH) as r:
        assert r.status == 200, await r.text()
        return await r.json()


async def version_of(url, name):
    snap = await snapshot(url)
    return next(m for m in snap["models"] if m["name"] == name)


async def infer(session, url, name, **kw):
    async with session.post(f"{url}/v2/models/{name}/infer", json=ROW, **kw) as r:
        return r.status, await r.json(), r.headers


def test_every_ray_process_listens_on_loopback_only(fleet):
    me = psutil.Process()
    procs = [me, *me.children(recursive=True)]
    listening = []
    for p in procs:
        try:
            conns = p.net_connections(kind="inet")
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        listening += [(p.pid, p.name(), c.laddr.ip, c.laddr.port) for c in conns if c.status == psutil.CONN_LISTEN]
    assert len(procs) > 5 and listening, "the cluster's processes were not found"
    outside = [x for x in listening if not _loopback(x[2])]
    assert not outside, f"listening outside 127.0.0.0/8: {outside}"


def _loopback(address: str) -> bool:
    ip = ipaddress.ip_address(address)
    mapped = getattr(ip, "ipv4_mapped", None)  # gRPC binds "::ffff:127.0.0.1": IPv4 loopback on a v6 socket
    return (mapped or ip).is_loopback


async def test_every_node_answers_the_whole_api_and_lists_every_node(fleet):
    urls = await fleet.frontends()
    assert len(urls) == 2
    for url in urls.values():
        snap = await snapshot(url)
        assert {n["node"] for n in snap["nodes"] if n["health"] == "ok"} == set(urls)
        assert {m["name"] for m in snap["models"]} == {"tiny", "solo", "slow"}
        async with aiohttp.ClientSession() as s:
            async with s.get(url + "/api/snapshot") as r:
                assert r.status == 401  # the control plane's token, on every node
            async with s.get(url + "/v2/models/nope") as r:
                assert r.status == 404


async def test_replicas_spread_over_nodes_and_requests_reach_both(fleet):
    urls = list((await fleet.frontends()).values())
    async with aiohttp.ClientSession() as s:
        async with s.post(urls[0] + "/api/models/tiny/load", json={}, headers=AUTH) as r:
            assert r.status == 200, await r.text()
            body = await r.json()
        assert len(body["nodes"]) == 2  # replicas = 2: one per node
        await until(lambda: _routed_by_every_frontend(fleet, "tiny", 2), "both holders in every routing table")
        results = await asyncio.gather(*(infer(s, urls[i % 2], "tiny") for i in range(200)))
    assert all(st == 200 for st, _, _ in results)
    tiny = await until(lambda: _answered(urls[0], "tiny", 200), "the nodes' reports counting 200 answers")
    served = {r["node"]: r["served"] for r in tiny["replicas"]}
    assert len(served) == 2 and all(n > 0 for n in served.values()), served
    # the control plane's /metrics (through a node's front end): one series per node, summing up
    async with aiohttp.ClientSession() as s, s.get(urls[1] + "/metrics") as r:
        assert r.status == 200
        text = await r.text()
    series = re.findall(r'^nv_inference_request_success\{([^}]*)\} ([0-9.e+]+)$', text, re.M)
    per_node = {dict(kv.split("=", 1) for kv in labels.split(","))["node"].strip('"'): float(v)
                for labels, v in series if 'model="tiny"' in labels}
    assert set(per_node) == set(served), (per_node, served)
    assert sum(per_node.values()) >= 200
    # the snapshot's percentiles are over both nodes' requests: the median of the union lies
    # between the nodes' medians (within a histogram bucket, 10 %)
    p50s = [float(v) for labels, v in re.findall(r'^modelconsole_request_latency_ms\{([^}]*)\} ([0-9.e+]+)$', text, re.M)
            if 'model="tiny"' in labels and 'quantile="0.5"' in labels]
    assert len(p50s) == 2, p50s
    merged = tiny["stats"]["latency_ms"]["p50"]
    assert min(p50s) / 1.1 <= merged <= max(p50s) * 1.1, (merged, p50s)
    # every node's front end counted the infer calls it answered, with its node label
    nodes = list((await fleet.frontends()).keys())
    counted = await until(lambda: _frontend_counts(urls[1], nodes, 100), "each front end's 100 answers in /metrics")
    assert set(counted) >= set(nodes), counted


async def _frontend_counts(url, nodes, at_least):
    async with aiohttp.ClientSession() as s, s.get(url + "/metrics") as r:
        text = await r.text()
    counts = {}
    for labels, v in re.findall(r'^modelconsole_frontend_requests_total\{([^}]*)\} ([0-9.e+]+)$', text, re.M):
        kv = dict(x.split("=", 1) for x in labels.split(","))
        if kv["protocol"] == '"http"' and kv["code"] == '"200"':
            counts[kv["node"].strip('"')] = float(v)
    return counts if all(counts.get(n, 0) >= at_least for n in nodes) else None


async def _answered(url, name, n):
    v = await version_of(url, name)
    return v if v["stats"]["success"] >= n else None


async def _routed_by_every_frontend(fleet, name, count):
    import ray

    for node in await fleet.frontends():
        stats = await ray.get_actor(rayenv.frontend_name(node), namespace=rayenv.NAMESPACE).stats.remote()
        if len(stats["holders"].get(name, {}).get("1", [])) < count:
            return False
    return True


async def test_a_miss_is_placed_by_the_controller_and_answered(fleet):
    urls = list((await fleet.frontends()).values())
    async with aiohttp.ClientSession() as s:  # the first requests miss on both front ends at once
        results = await asyncio.gather(*(infer(s, urls[k % 2], "solo") for k in range(8)))
    for status, body, _ in results:
        assert status == 200 and body["model_name"] == "solo"
    solo = await until(lambda: _held(urls[0], "solo"), "solo held somewhere")
    assert len(solo["nodes"]) == 1
    snap = await snapshot(urls[0])
    placed = [e for e in snap["events"] if e["kind"] == "placed" and "solo:1" in e["message"]]
    assert len(placed) == 1, [e["message"] for e in placed]  # one placement for one miss


async def _held(url, name):
    v = await version_of(url, name)
    return v if v["nodes"] else None


async def test_every_node_serves_kserve_v2_over_grpc_too(fleet):
    import numpy as np
    import ray
    import tritonclient.grpc as grpcclient

    for node in await fleet.frontends():
        stats = await ray.get_actor(rayenv.frontend_name(node), namespace=rayenv.NAMESPACE).stats.remote()
        assert stats["grpc_port"], stats

        def call(port=stats["grpc_port"]):
            client = grpcclient.InferenceServerClient(f"127.0.0.1:{port}")
            try:
                meta = client.get_model_metadata("tiny")
                x = grpcclient.InferInput("input", [1, 64], "FP32")
                x.set_data_from_numpy(np.full((1, 64), 0.5, dtype=np.float32))
                out = client.infer("tiny", [x]).as_numpy("logits")
                return meta.name, out.shape
            finally:
                client.close()

        assert await asyncio.to_thread(call) == ("tiny", (1, 10))


async def test_a_pin_follows_the_version_to_a_node_that_takes_it_later(fleet):
    urls = await fleet.frontends()
    url = next(iter(urls.values()))
    solo = await until(lambda: _held(url, "solo"), "solo held")  # placed by the miss test
    holder = solo["nodes"][0]
    other = next(n for n in urls if n != holder)
    async with aiohttp.ClientSession() as s:
        async with s.post(url + "/api/models/solo/pin", json={}, headers=AUTH) as r:
            assert r.status == 200, await r.text()
        assert await _pinned_on(holder, "solo")
        async with s.post(f"{url}/api/models/solo/load?node={other}", json={}, headers=AUTH) as r:
            assert r.status == 200, await r.text()
        await until(lambda: _pinned_on(other, "solo"), "the controller pinning solo where it was loaded later")
        async with s.post(url + "/api/models/solo/unpin", json={}, headers=AUTH) as r:
            assert r.status == 200, await r.text()
    for node in (holder, other):
        assert not await _pinned_on(node, "solo")


async def _pinned_on(node, name):
    import ray

    report = await ray.get_actor(rayenv.core_name(node), namespace=rayenv.NAMESPACE).report.remote()
    return any(m["name"] == name and m["pinned"] for m in report["snapshot"]["models"])


async def test_a_model_is_deleted_from_the_fleet_only_once_no_node_holds_it(fleet):
    import ray

    urls = await fleet.frontends()
    url = next(iter(urls.values()))
    async with aiohttp.ClientSession() as s:
        reg = {"name": "gone", "source": "zoo:tiny-mlp", "options": {"warmup": 0}}
        async with s.post(url + "/api/models", json=reg, headers=AUTH) as r:
            assert r.status == 201, await r.text()
        async with s.post(url + "/api/models/gone/load", json={}, headers=AUTH) as r:
            assert r.status == 200, await r.text()
        async with s.delete(url + "/api/models/gone", headers=AUTH) as r:
            assert r.status == 409 and "loaded on node" in (await r.json())["error"]
        async with s.post(url + "/api/models/gone/unload", json={}, headers=AUTH) as r:
            assert r.status == 200, await r.text()
        async with s.delete(url + "/api/models/gone", headers=AUTH) as r:
            assert r.status == 200 and await r.json() == {"name": "gone", "deleted": ["1"]}
        async with s.get(url + "/api/models/gone", headers=AUTH) as r:
            assert r.status == 404
    for node in urls:
        report = await ray.get_actor(rayenv.core_name(node), namespace=rayenv.NAMESPACE).report.remote()
        assert all(m["name"] != "gone" for m in report["snapshot"]["models"])


async def test_control_calls_name_a_node_or_get_a_clear_400(fleet):
    urls = await fleet.frontends()
    url = next(iter(urls.values()))
    async with aiohttp.ClientSession() as s:
        async with s.post(url + "/api/models/solo/unload?node=nonsense", json={}, headers=AUTH) as r:
            assert r.status == 400
            assert "node: expected the id of a live node" in (await r.json())["error"]
        async with s.post(url + "/api/models/missing/load", json={}, headers=AUTH) as r:
            assert r.status == 404


async def test_a_canary_ramps_on_every_node_at_once_and_promotes_cluster_wide(fleet):
    urls = list((await fleet.frontends()).values())
    url = urls[0]
    async with aiohttp.ClientSession() as s:
        for v in ("1", "2"):
            reg = {"name": "can", "version": v, "source": "zoo:tiny-mlp", "options": {"warmup": 0}}
            async with s.post(url + "/api/models", json=reg, headers=AUTH) as r:
                assert r.status == 201, await r.text()
        async with s.post(url + "/api/models/can/load?version=1", json={}, headers=AUTH) as r:
            assert r.status == 200, await r.text()
        plan = {"version": "2", "steps": [50, 100], "interval_s": 0.3, "min_requests": 5}
        async with s.post(url + "/api/models/can/canary", json=plan, headers=AUTH) as r:
            assert r.status == 200, await r.text()
            started = await r.json()
        assert started["canary"]["share"] == 50 and started["weights"] == {"1": 50, "2": 50}
        stop = asyncio.Event()

        async def traffic() -> list[int]:
            statuses = []
            i = 0
            while not stop.is_set():
                st, _, _ = await infer(s, urls[i % len(urls)], "can")
                statuses.append(st)
                i += 1
            return statuses

        load = asyncio.ensure_future(traffic())
        try:
            routing = await until(lambda: _canary_done(url, "can"), "the fleet canary promoted")
        finally:
            stop.set()
            statuses = await load
    assert routing["canary"]["state"] == "promoted" and routing["active"] == "2"
    assert set(statuses) == {200}
    assert (await _event(url, "canary_promoted")) is not None


async def _canary_done(url, name):
    async with aiohttp.ClientSession() as s, s.get(f"{url}/api/models/{name}/routing", headers=AUTH) as r:
        routing = await r.json()
    c = routing.get("canary") or {}
    return routing if c.get("state") in ("promoted", "rolled_back", "aborted") else None


async def test_the_attached_console_shows_every_node_and_what_it_holds(fleet):
    from modelconsole.console.app import ModelConsoleApp
    from modelconsole.console.client import RemoteClient

    urls = await fleet.frontends()
    client = RemoteClient(next(iter(urls.values())), TOKEN)
    await client.start()
    try:
        app = ModelConsoleApp(client, refresh_s=0.25)
        async with app.run_test(size=(140, 40)) as pilot:
            async def shown() -> bool:
                await pilot.pause()
                text = app.query_one("#nodes").text
                return all(n[:8] in text for n in urls) and "tiny:1" in text

            await until(shown, "the nodes panel listing every node and its models")
            assert app.query_one("#nodes").display
            # n: the next actions act on one node; l loads the selected version there only
            await pilot.press("n")
            target = app.target_node
            assert target in urls and f"actions on node {target[:8]}" in app.query_one("#status").text
            app.table.move_cursor(row=app.table.get_row_index("slow:1"), animate=False)
            await pilot.pause()
            assert app.selected_key() == "slow:1"
            await pilot.press("l")
            slow = await until(lambda: _held(next(iter(urls.values())), "slow"), "slow loaded from the console")
            assert slow["nodes"] == [target]
            await pilot.press("q")
    finally:
        await client.close()


async def test_a_node_removed_mid_traffic_leaves_no_request_unanswered(fleet):
    before = set(await fleet.frontends())
    node = fleet.cluster.add_node(num_cpus=1, node_ip_address="127.0.0.1", resources={"sim_gpu": 1})
    urls = await until(lambda: _nodes_up(fleet, 3), "the third node's engine core and front end")
    new = (set(urls) - before).pop()
    head_url = next(u for n, u in urls.items() if n != new)
    keep, spare = sorted(before)
    async with aiohttp.ClientSession() as s:
        async with s.post(f"{head_url}/api/models/slow/load?node={new}", json={}, headers=AUTH) as r:
            assert r.status == 200, await r.text()
        await until(lambda: _held(head_url, "slow"), "slow held on the new node")
        # tiny (replicas = 2) on `keep` and on the node about to be lost, not on `spare`
        for action, where in (("load", keep), ("unload", spare), ("load", new)):
            async with s.post(f"{head_url}/api/models/tiny/{action}?node={where}", json={}, headers=AUTH) as r:
                assert r.status == 200, await r.text()
        await until(lambda: _on_nodes(head_url, "tiny", {keep, new}), "tiny on keep and the new node")
        # slow batches wait 2 s: the requests below sit in the new node's queue when it goes
        traffic = [asyncio.ensure_future(infer(s, head_url, "slow")) for _ in range(40)]
        await until(lambda: _queued_on(head_url, "slow"), "requests queued on the new node")
        await asyncio.to_thread(fleet.cluster.remove_node, node)
        results = await asyncio.wait_for(asyncio.gather(*traffic), 120)
    statuses = [st for st, _, _ in results]
    assert len(statuses) == 40 and set(statuses) <= {200, 503}, statuses
    assert statuses.count(200) >= 1
    for st, body, headers in results:
        if st == 503:
            assert headers.get("Retry-After") and "retry" in body["error"]
    await until(lambda: _health(head_url, new, "lost"), "the node marked lost")
    gone = next(n for n in (await snapshot(head_url))["nodes"] if n["node"] == new)
    assert gone["holds"] == [] and sorted(gone["held"]) == ["slow:1", "tiny:1"], gone  # says what it held
    # the replica of tiny lost with the node is placed again on a live node; slow (held by no live
    # node) waits for its next request, as on a first one
    await until(lambda: _on_nodes(head_url, "tiny", {keep, spare}), "tiny's lost replica placed again")
    restored = await _event(head_url, "replica_restored")
    assert restored is not None and "tiny:1" in restored and spare[:8] in restored, restored
    assert (await version_of(head_url, "tiny"))["replicas_short"] == 0
    lost = await _event(head_url, "node_lost")
    assert lost is not None and new in lost, " ".join(e["kind"] + (e["message"] if "node" in e["kind"] else "") for e in (await snapshot(head_url))["events"])


async def _on_nodes(url, name, nodes):
    return set((await version_of(url, name))["nodes"]) == nodes


async def _health(url, node, health):
    return any(n["node"] == node and n["health"] == health for n in (await snapshot(url))["nodes"])


async def _nodes_up(fleet, n):
    urls = await fleet.frontends()
    return urls if len(urls) >= n else None


async def _queued_on(url, name):
    v = await version_of(url, name)
    return v["queue"] + v["in_flight"] > 0


async def _event(url, kind):
    """The first ``kind`` event in the fleet's history, replayed by the event stream."""
    async with aiohttp.ClientSession() as s, s.get(url + "/api/events?last_event_id=0", headers=AUTH) as r:
        name = None
        async for line in r.content:
            text = line.decode().strip()
            if text.startswith("event: "):
                name = text[7:]
            elif text.startswith("data: ") and name == "snapshot":
                return None  # the history is replayed before the first snapshot
            elif text.startswith("data: ") and name == "event":
                e = json.loads(text[6:])
                if e["kind"] == kind:
                    return e["message"] + " " + str(e.get("data", {}).get("node"))
    return None


async def test_the_controller_restarts_with_everything_the_operator_changed(fleet):
    import ray

    urls = list((await fleet.frontends()).values())
    url = urls[0]
    async with aiohttp.ClientSession() as s:
        reg = {"name": "later", "source": "zoo:tiny-mlp", "options": {"warmup": 0}}
        async with s.post(url + "/api/models", json=reg, headers=AUTH) as r:
            assert r.status == 201, await r.text()
        reg2 = {"name": "later", "version": "2", "source": "zoo:tiny-mlp", "options": {"warmup": 0}}
        async with s.post(url + "/api/models", json=reg2, headers=AUTH) as r:
            assert r.status == 201, await r.text()
        async with s.put(url + "/api/models/later/split", json={"weights": {"1": 70, "2": 30}}, headers=AUTH) as r:
            assert r.status == 200, await r.text()
        first = (await fleet.info())["restarted_at"]
        ray.kill(fleet.controller, no_restart=False)
        info = await until(lambda: _restarted(fleet, first), "the controller restarted by Ray")
        assert info["url"].endswith(f":{fleet.control_port}")
        later = await until(lambda: _model(url, "later"), "the restored registry through a front end")
        assert {m["version"] for m in later} == {"1", "2"}
        async with s.get(url + "/api/models/later/routing", headers=AUTH) as r:
            assert (await r.json())["weights"] == {"1": 70.0, "2": 30.0}
        async with s.get(url + "/api/audit?model=later", headers=AUTH) as r:
            actions = [e["action"] for e in (await r.json())["entries"]]
        assert "register" in actions and "split" in actions
        status, body, _ = await infer(s, url, "later")  # the engine cores still serve the split
        assert status == 200 and body["model_version"] in ("1", "2")


async def _restarted(fleet, first):
    try:
        info = await asyncio.wait_for(fleet.controller.ready.remote(), 30)
    except Exception:  # noqa: BLE001 - restarting
        return None
    return info if info["restarted_at"] != first else None


async def _model(url, name):
    try:
        async with aiohttp.ClientSession() as s, s.get(f"{url}/api/models/{name}", headers=AUTH) as r:
            return (await r.json())["versions"] if r.status == 200 else None
    except aiohttp.ClientError:
        return None


async def test_serve_cluster_joins_the_fleet_says_where_it_listens_and_stops_it(fleet, tmp_path):
    """``modelconsole --serve --cluster ray://ADDRESS`` as an operator runs it (last: it stops the fleet)."""
    import signal
    import subprocess
    import sys

    env = dict(os.environ, MODELCONSOLE_TOKEN=TOKEN)
    cmd = [sys.executable, "-m", "modelconsole.console", "--serve", "--cluster",
           f"ray://{fleet.cluster.address}", "--config", str(fleet.config_path), "--store",
           str(fleet.store_path), "--port", "0"]
    proc = await asyncio.create_subprocess_exec(*cmd, env=env, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL)
    lines: list[str] = []
    try:
        async def read_until(text: str) -> None:
            while True:
                line = (await asyncio.wait_for(proc.stderr.readline(), 120)).decode()
                assert line, "the process ended:\n" + "".join(lines)
                lines.append(line)
                if text in line:
                    return

        await read_until("control plane on")
        await read_until("front end on")
        assert any(f"control plane on http://127.0.0.1:{fleet.control_port} " in ln for ln in lines), lines
        url = next(iter((await fleet.frontends()).values()))
        async with aiohttp.ClientSession() as s:
            assert (await infer(s, url, "slow"))[0] == 200  # loaded somewhere
            # in flight when the signal comes: slow's batches wait 2 s in the queue
            traffic = [asyncio.ensure_future(infer(s, url, "slow")) for _ in range(8)]
            await until(lambda: _queued_on(url, "slow"), "requests queued for slow")
            proc.send_signal(signal.SIGTERM)
            await read_until("stopping the fleet")
            results = await asyncio.wait_for(asyncio.gather(*traffic, return_exceptions=True), 120)
        # the fleet drains as one host does: every request in flight is answered, none is reset
        assert [r if isinstance(r, BaseException) else r[0] for r in results] == [200] * 8
        assert await asyncio.wait_for(proc.wait(), 120) == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    fleet.stopped = True
