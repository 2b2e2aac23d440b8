"""``--workers N``: front-end processes beside one engine core, over real sockets.

The tritonclient suites (``test_tritonclient.py``, ``test_grpc.py``) already
run through two front ends; here is what only the split has: the same 4xx
answers from a front end as from one process, the control API, event
stream and metrics through a front end, batching of calls into IPC
messages, a malformed IPC message, a front end killed and restarted, a
drain that answers everything in flight, and front ends stopping when the
engine core dies.
"""

from __future__ import annotations

import asyncio
import gzip
import os
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import aiohttp
import numpy as np
import pytest
from serverutil import ServerThread

from modelconsole.console.client import RemoteClient
from modelconsole.server import transport
from modelconsole.server.web import ServerSettings

TOKEN = "workers-test-token"
MODELS = [
    {"name": "tiny", "source": "zoo:tiny-mlp", "max_queue_delay_ms": 1},
    # requests wait here until 64 arrive or 5 s pass: in flight long enough to drain them
    {"name": "slow", "source": "zoo:tiny-mlp", "max_batch_size": 64, "max_queue_delay_ms": 5000},
    {"name": "cached", "source": "zoo:tiny-mlp", "cache": True},
]


def tiny_body(batch: int = 1) -> dict:
    return {"inputs": [{"name": "input", "datatype": "FP32", "shape": [batch, 64],
                        "data": np.ones(batch * 64).tolist()}]}


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """One process and two front ends over the same models, to compare their answers."""
    settings = ServerSettings(port=0, token=TOKEN)
    with ServerThread(tmp_path_factory.mktemp("one"), MODELS, settings=settings) as one, \
            ServerThread(tmp_path_factory.mktemp("two"), MODELS, settings=settings, workers=2) as two:
        yield one, two


AUTH = {"Authorization": f"Bearer {TOKEN}"}

BAD_REQUESTS = [
    ("POST", "/v2/models/tiny/infer", {}, b"{not json", "invalid JSON"),
    ("POST", "/v2/models/tiny/infer", {}, b'{"inputs": [{"name": "input"}]}', "inputs"),
    ("POST", "/v2/models/nope/infer", {}, b'{"inputs": []}', "unknown model"),
    ("POST", "/v2/models/tiny/versions/x/infer", {}, b"{}", "model version"),
    ("POST", "/v2/models/tiny/infer", {"Inference-Header-Content-Length": "-3"}, b"{}", "non-negative"),
    ("POST", "/v2/models/tiny/infer", {"Content-Encoding": "zstd-x"}, b"{}", "Content-Encoding"),
    ("POST", "/v2/models/tiny/infer", {"Content-Encoding": "gzip"}, gzip.compress(b"\0" * (8 << 20)),
     "inflat"),
    ("POST", "/v2/models/tiny/infer", {"Inference-Header-Content-Length": "0"}, b"\0" * 12, "raw input"),
    ("GET", "/api/snapshot", {"Authorization": "Bearer wrong"}, None, "token"),
    ("GET", "/api/snapshot", {}, None, "Authorization"),
    ("POST", "/api/models/tiny/load", {**AUTH, "Content-Type": "text/plain"}, b"{}", "Content-Type"),
    ("POST", "/api/models", {**AUTH, "Content-Type": "application/json"}, b'{"name": "x", "source": "os:system"}',
     "source"),
    ("GET", "/v2/models/tiny", {"Origin": "http://evil.example"}, None, "cross-site"),
    ("GET", "/v2/models/nope/config", {}, None, "unknown model"),
    ("DELETE", "/v2/models/tiny", {}, None, ""),
    # a wrong method is a 405 with Allow wherever the route lives (a front end forwards control calls)
    ("PATCH", "/api/models/tiny/load", {**AUTH, "Content-Type": "text/plain"}, b"{}", "Method Not Allowed"),
    ("POST", "/api/snapshot", {**AUTH, "Content-Type": "text/plain"}, b"{}", "Method Not Allowed"),
    ("PUT", "/api/audit", AUTH, b"{}", "Method Not Allowed"),
    # DNS rebinding: a name that is not this server's, on every route
    ("GET", "/v1/models", {"Host": "rebound.example"}, None, "DNS rebinding"),
    ("POST", "/v2/models/tiny/infer", {"Host": "rebound.example:8000"}, b"{}", "DNS rebinding"),
    ("GET", "/metrics", {"Host": "rebound.example"}, None, "DNS rebinding"),
]


async def answer(session: aiohttp.ClientSession, base: str, method: str, path: str, headers: dict,
                 body: bytes | None) -> tuple[int, str]:
    async with session.request(method, base + path, headers=headers, data=body) as r:
        return r.status, await r.text()


async def test_a_front_end_refuses_exactly_as_one_process_does(pair):
    one, two = pair
    async with aiohttp.ClientSession(auto_decompress=False) as s:
        for method, path, headers, body, needle in BAD_REQUESTS:
            a = await answer(s, one.url, method, path, headers, body)
            b = await answer(s, two.url, method, path, headers, body)
            assert a[0] >= 400 and needle in a[1], (path, a)
            # the same status and message (a message naming the server's own address names its port)
            assert (a[0], a[1].replace(str(one.server.port), "PORT")) == \
                (b[0], b[1].replace(str(two.server.port), "PORT")), (method, path, headers)


async def test_the_same_allow_header_and_no_echo_of_an_oversized_header(pair):
    """405 carries Allow on both paths; a header over aiohttp's line limit is a 400 that names the
    mistake without echoing the header (Authorization included), on both paths."""
    secret = "Bearer " + "SECRET" * 3000
    async with aiohttp.ClientSession() as s:
        allows = []
        for srv in pair:
            async with s.patch(srv.url + "/api/models/tiny/load", headers={**AUTH, "Content-Type": "text/plain"},
                               data=b"{}") as r:
                allows.append((r.status, r.headers.get("Allow")))
            async with s.get(srv.url + "/v2/health/live", headers={"Authorization": secret}) as r:
                text = await r.text()
                assert r.status == 400 and "too long" in text and "SECRET" not in text, text
        assert allows[0] == allows[1] == (405, "POST")


async def test_failures_are_counted_by_kind_as_in_one_process(pair):
    """The engine core's fast path (Engine.submit) counts what engine.infer counts."""
    wrong = {"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 32], "data": [0.0] * 32}]}
    late = dict(tiny_body(), parameters={"timeout": 1})  # 1 us: over before the 5 s batch delay
    before = [srv.engine.instance("slow").stats.failures.copy() for srv in pair]
    async with aiohttp.ClientSession() as s:
        for srv in pair:
            for body, status in ((wrong, 400), (late, 504), (tiny_body(), 200)):
                async with s.post(srv.url + "/v2/models/slow/infer", json=body) as r:
                    assert r.status == status, await r.text()
    after = [srv.engine.instance("slow").stats.failures for srv in pair]
    deltas = [{k: a.get(k, 0) - b.get(k, 0) for k in a} for a, b in zip(after, before)]
    assert deltas[0] == deltas[1] and deltas[0].get("invalid_input") == 1 and deltas[0].get("deadline") == 1


async def test_infer_answers_match_one_process(pair):
    one, two = pair
    async with aiohttp.ClientSession() as s:
        for body in (tiny_body(1), tiny_body(5)):
            async with s.post(one.url + "/v2/models/tiny/infer", json=body) as r1, \
                    s.post(two.url + "/v2/models/tiny/infer", json=body) as r2:
                assert r1.status == r2.status == 200
                assert await r1.json() == await r2.json()
        raw = np.arange(64, dtype="<f4").tobytes()
        outs = []
        for srv in pair:
            async with s.post(srv.url + "/v2/models/tiny/infer", data=raw,
                              headers={"Inference-Header-Content-Length": "0"}) as r:
                assert r.status == 200
                outs.append(await r.read())
        assert outs[0] == outs[1]


async def test_front_ends_serve_without_torch(pair):
    """A front-end process decodes and encodes with numpy: torch (hundreds of MB per process) is
    not loaded in it after JSON, binary and raw requests and their answers (its memory map would
    hold libtorch)."""
    one, two = pair
    async with aiohttp.ClientSession() as s:
        for _ in range(4):
            async with s.post(two.url + "/v2/models/tiny/infer", json=tiny_body(2)) as r:
                assert r.status == 200
            async with s.post(two.url + "/v2/models/tiny/infer", data=np.ones(64, "<f4").tobytes(),
                              headers={"Inference-Header-Content-Length": "0"}) as r:
                assert r.status == 200
    pids = two.server.frontends.pids
    assert len(pids) == 2
    for pid in pids:
        maps = Path(f"/proc/{pid}/maps").read_text()
        assert "libtorch" not in maps, f"front end {pid} loaded torch"
    assert "libtorch" in Path(f"/proc/{os.getpid()}/maps").read_text()  # the check can see torch


async def test_control_events_and_metrics_through_a_front_end(pair):
    _, two = pair
    async with aiohttp.ClientSession(headers=AUTH, timeout=aiohttp.ClientTimeout(total=120)) as s:
        async with s.get(two.url + "/api/events") as stream:
            assert stream.status == 200 and stream.content_type == "text/event-stream"
            async with s.post(two.url + "/api/models/tiny/unload", json={}) as r:
                assert r.status == 200, await r.text()
            seen = b""
            while b'"kind":"unloaded"' not in seen:  # the stream ends only with the test's timeout
                seen += await stream.content.readany()
        async with s.get(two.url + "/api/audit", params={"model": "tiny"}) as r:
            entries = (await r.json())["entries"]
            assert entries[0]["action"] == "unload" and entries[0]["result"] == "ok"
        async with s.post(two.url + "/v2/models/tiny/infer", json=tiny_body()) as r:
            assert r.status == 200  # loads again on demand
        async with s.get(two.url + "/metrics") as r:
            text = await r.text()
            assert 'nv_inference_request_success{model="tiny",version="1"}' in text


async def test_the_result_cache_is_keyed_by_the_front_ends_hash(pair, monkeypatch):
    """A front end hashes the inputs for the cache while it packs them: the engine core's loop
    never hashes tensor bytes (its own input_digest is not called), and hits still happen."""
    from modelconsole.scheduler import cache

    one, two = pair
    calls = []
    real = cache.input_digest
    monkeypatch.setattr(cache, "input_digest", lambda entries: calls.append(1) or real(entries))
    body = tiny_body(3)
    hits_before = two.engine.instance("cached").stats.cache_hits
    async with aiohttp.ClientSession() as s:
        answers = []
        for srv in (two, two, one):
            async with s.post(srv.url + "/v2/models/cached/infer", json=body) as r:
                assert r.status == 200
                answers.append(await r.json())
    # exact: the same input in the same batch gives the same bits on every path, a cache hit and
    # another server included (tests/test_bit_identity.py shows it for every path under load)
    assert answers[0] == answers[1] == answers[2]
    assert two.engine.instance("cached").stats.cache_hits == hits_before + 1
    assert len(calls) == 1  # only the single process hashed on its loop


def test_the_console_attaches_through_a_front_end(pair):
    _, two = pair

    async def look() -> list[str]:
        client = RemoteClient(two.url, TOKEN)
        await client.start()
        try:
            return [m["name"] for m in client.snapshot()["models"]]
        finally:
            await client.close()

    assert {"tiny", "slow"} <= set(asyncio.run(look()))


def frontend_counts(text: str) -> dict[tuple[str, str], float]:
    """modelconsole_frontend_requests_total by (protocol, code) from a /metrics body."""
    import re

    out = {}
    for m in re.finditer(r'^modelconsole_frontend_requests_total\{code="(\w+)",protocol="(\w+)"\} (\S+)$', text, re.M):
        out[(m.group(2), m.group(1))] = float(m.group(3))
    return out


async def test_metrics_sum_the_front_ends_request_counters(pair):
    """/metrics counts requests answered by every front end (prometheus-client's multiprocess
    files), as one process counts its own: the same deltas for the same requests."""
    async with aiohttp.ClientSession() as s:
        deltas = []
        for srv in pair:
            async with s.get(srv.url + "/metrics") as r:
                before = frontend_counts(await r.text())
            for _ in range(6):
                async with s.post(srv.url + "/v2/models/tiny/infer", json=tiny_body()) as r:
                    assert r.status == 200
            for _ in range(3):
                async with s.post(srv.url + "/v2/models/tiny/infer", data=b"{no") as r:
                    assert r.status == 400
            async with s.get(srv.url + "/metrics") as r:
                after = frontend_counts(await r.text())
            deltas.append({k: after[k] - before.get(k, 0) for k in after if after[k] != before.get(k, 0)})
    # the first /metrics scrape itself is answered (200) before the second reads the counters
    assert deltas[0] == deltas[1] == {("http", "200"): 7, ("http", "400"): 3}, deltas


async def test_calls_share_ipc_messages_under_load(pair):
    _, two = pair
    core = two.server.core
    before_calls, before_messages = core.calls, core.messages
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=64)) as s:

        async def one() -> int:
            async with s.post(two.url + "/v2/models/tiny/infer", json=tiny_body()) as r:
                return r.status

        statuses = await asyncio.gather(*(one() for _ in range(400)))
    assert statuses == [200] * 400
    calls, messages = core.calls - before_calls, core.messages - before_messages
    assert calls == 400 and messages < calls, (calls, messages)


async def test_a_malformed_ipc_message_is_dropped_and_the_core_serves_on(pair):
    _, two = pair
    core = two.server.core
    dropped = core.dropped_messages
    received: asyncio.Queue = asyncio.Queue()
    end = transport.client_end(core.address, received.put_nowait, lambda: None)
    await end.start()
    garbage = [[b"not json"], [b"{}"], [b"[1, 2]"], [b'[{"i": 1, "m": "tiny", "x": [["input", "FP32", [1, 64]]]}]'],
               [b'[{"i": 1, "m": 5, "x": []}]', b"extra"]]
    for frames in garbage:
        end.send(frames)
    # a call with tensors that do not match their shape gets a 400 answer, like HTTP's
    end.send([b'[{"i": 9, "m": "tiny", "x": [["input", "FP32", [1, 64]]]}]', b"\0" * 10])
    reply = await asyncio.wait_for(received.get(), 30)
    assert b'"i":9' in bytes(reply[0]) and b"400" in bytes(reply[0])
    await end.close()
    assert core.dropped_messages == dropped + len(garbage)
    # bytes that are no record at all close that connection only
    reader, writer = await asyncio.open_unix_connection(core.address.removeprefix("unix://"))
    writer.write(b"\xff" * 64)
    assert await reader.read() == b""  # closed by the core
    writer.close()
    async with aiohttp.ClientSession() as s, s.post(two.url + "/v2/models/tiny/infer", json=tiny_body()) as r:
        assert r.status == 200


def test_a_dead_front_end_is_restarted_and_its_clients_are_not_left_waiting(tmp_path):
    with ServerThread(tmp_path, MODELS, workers=2) as srv:
        fronts = srv.server.frontends
        core = srv.server.core
        victim = fronts.procs[0].pid
        n = 16

        async def kill_with_requests_in_flight() -> list[str]:
            """16 requests wait in the engine (a 5 s batch delay) through both front ends when one
            is killed: each still ends, with its answer or with its connection closed, never a hang."""
            async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True),
                                             timeout=aiohttp.ClientTimeout(total=120)) as s:
                async def one() -> str:
                    try:
                        async with s.post(srv.url + "/v2/models/slow/infer", json=tiny_body()) as r:
                            await r.read()
                            return str(r.status)
                    except aiohttp.ClientConnectionError:
                        return "closed"

                tasks = [asyncio.create_task(one()) for _ in range(n)]
                deadline = time.monotonic() + 60
                while core.calls < n:
                    assert time.monotonic() < deadline, core.calls
                    await asyncio.sleep(0.02)
                os.kill(victim, signal.SIGKILL)
                return await asyncio.gather(*tasks)

        outcomes = asyncio.run(kill_with_requests_in_flight())
        assert len(outcomes) == n and set(outcomes) <= {"200", "closed"}, outcomes

        async def restarted() -> str:
            with srv.engine.subscribe() as sub:
                for ev in srv.engine.events.recent:
                    if ev.kind == "frontend_restarted":
                        return ev.message
                async for ev in sub:
                    if ev.kind == "frontend_restarted":
                        return ev.message

        message = srv.call(restarted)
        assert f"pid {victim}" in message and "signal 9" in message
        assert victim not in fronts.pids and len(fronts.pids) == 2 and fronts.restarts == 1

        async def traffic() -> list[int]:
            async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as s:
                async def one() -> int:
                    async with s.post(srv.url + "/v2/models/tiny/infer", json=tiny_body()) as r:
                        return r.status
                return await asyncio.gather(*(one() for _ in range(50)))

        assert asyncio.run(traffic()) == [200] * 50


def test_sigterm_drain_answers_every_request_in_flight(tmp_path):
    with ServerThread(tmp_path, MODELS, workers=2) as srv:
        core = srv.server.core
        n = 12

        async def main() -> list[int]:
            async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as s:
                async def one() -> int:
                    async with s.post(srv.url + "/v2/models/slow/infer", json=tiny_body()) as r:
                        return r.status

                tasks = [asyncio.create_task(one()) for _ in range(n)]
                deadline = time.monotonic() + 60
                while core.calls < n:  # every call has reached the engine core (they wait for a batch there)
                    assert time.monotonic() < deadline, core.calls
                    await asyncio.sleep(0.02)
                assert not any(t.done() for t in tasks)
                await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(srv.server.stop(), srv.loop))
                return await asyncio.gather(*tasks)

        assert asyncio.run(main()) == [200] * n


def _serve(tmp_path, log, env):
    with open(log, "w") as out:
        return subprocess.Popen([sys.executable, "-m", "modelconsole.console", "--serve", "--port", "0",
                                 "--workers", "2", "--grpc-port", "off", "--store", str(tmp_path / "s.db")],
                                stdout=out, stderr=subprocess.STDOUT, env=env)


def _front_end_pids(proc, log) -> list[int]:
    deadline = time.monotonic() + 120
    while True:
        assert proc.poll() is None and time.monotonic() < deadline, log.read_text()
        for line in log.read_text().splitlines():
            if "front-end processes (pids" in line:
                return [int(p) for p in line.split("(pids ")[1].split(")")[0].split()]
        time.sleep(0.1)


def test_front_ends_stop_when_the_engine_core_dies_and_the_next_start_cleans_up(tmp_path):
    """SIGKILL to the engine core: its front ends stop by themselves, its private run folder (under
    the state directory, not the system's temp) stays behind, and the next start removes it."""
    state = tmp_path / "state"
    env = {**os.environ, "MODELCONSOLE_STATE_DIR": str(state)}
    log = tmp_path / "serve.log"
    proc = _serve(tmp_path, log, env)
    second = None
    try:
        pids = _front_end_pids(proc, log)
        left = [d for d in (state / "run").iterdir() if d.name.startswith(f"{proc.pid}-")]
        assert len(left) == 1 and (left[0] / "control.sock").exists()
        assert oct(left[0].stat().st_mode & 0o777) == "0o700"
        fds = [os.pidfd_open(p) for p in pids]
        proc.kill()
        proc.wait(30)
        for fd in fds:  # a pidfd is readable once its process has exited
            ready, _, _ = select.select([fd], [], [], 60)
            assert ready, f"a front end outlived its engine core:\n{log.read_text()}"
            os.close(fd)
        assert "the engine core is gone" in log.read_text()
        assert left[0].exists()  # nothing could clean up after a SIGKILL...
        log2 = tmp_path / "serve2.log"
        second = _serve(tmp_path, log2, env)
        _front_end_pids(second, log2)
        assert not left[0].exists()  # ...the next start did
        assert "removed 1 run folder" in log2.read_text()
        assert [d.name.split("-")[0] for d in (state / "run").iterdir()] == [str(second.pid)]
    finally:
        for p in (proc, second):
            if p is not None and p.poll() is None:
                p.kill()
