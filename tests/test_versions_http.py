"""Versions over HTTP on a real server: hot swap under concurrent load, A/B split with sticky
routing keys, explicit versions ignoring the split, canary start/abort, and bad input refused
with a message naming the problem while nothing changes.

Each test uses its own model name on one module-scoped ``ServerThread``, so they do not depend on
their order.  Two versions of each name: v1 ``zoo:tiny-mlp`` and v2 the same with another hidden
size (same inputs and outputs, different answers).
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import aiohttp
import pytest
from serverutil import ServerThread


def _pair(name: str, **v2_extra: Any) -> list[dict[str, Any]]:
    return [
        {"name": name, "version": "1", "source": "zoo:tiny-mlp", "max_queue_delay_ms": 1},
        {"name": name, "version": "2", "source": "zoo:tiny-mlp", "args": {"hidden": 64}, "max_queue_delay_ms": 1,
         **v2_extra},
    ]


MODELS = [
    *_pair("m"),        # swap under load
    *_pair("ab"),       # split, sticky keys, explicit versions
    *_pair("can"),      # canary start / abort
    *_pair("bad"),      # bad input, nothing changed
    *_pair("slow", warmup=8000),  # a swap that takes a while: a split during it is refused
]


@pytest.fixture(scope="module", params=[0, 2], ids=["one-process", "2-front-ends"])
def srv(request, tmp_path_factory):
    """Each test against one process and against two front-end processes (--workers 2): the engine
    core's fast path (Engine.submit) must swap, split and reroute exactly as engine.infer does."""
    with ServerThread(tmp_path_factory.mktemp("versions"), models=MODELS, workers=request.param) as s:
        yield s


def infer_body(routing_key: Any = None, value: float = 0.5) -> dict[str, Any]:
    body: dict[str, Any] = {"inputs": [{"name": "input", "shape": [1, 64], "datatype": "FP32",
                                        "data": [value] * 64}]}
    if routing_key is not None:
        body["parameters"] = {"routing_key": routing_key}
    return body


async def call(session: aiohttp.ClientSession, srv: ServerThread, method: str, path: str,
               **kw: Any) -> tuple[int, Any]:
    if method in ("POST", "PUT", "DELETE") and path.startswith("/api/") and kw.get("json") is None and "data" not in kw:
        kw["json"] = {}  # a control call is JSON, as every client sends it (the server refuses others)
    async with session.request(method, srv.url + path, **kw) as r:
        raw = await r.read()
        return r.status, (json.loads(raw) if raw else None)


async def served_by(session, srv, name: str, *, key: Any = None, header: str | None = None,
                    version: str | None = None) -> str:
    """One inference; the version that served it (asserting a 200)."""
    path = f"/v2/models/{name}/versions/{version}/infer" if version else f"/v2/models/{name}/infer"
    headers = {"X-Routing-Key": header} if header is not None else None
    status, body = await call(session, srv, "POST", path, json=infer_body(key), headers=headers)
    assert status == 200, body
    return body["model_version"]


def _stable(routing: dict[str, Any]) -> dict[str, Any]:
    """The routing without the per-arm counters (which move with traffic)."""
    return {k: v for k, v in routing.items() if k != "arms"}


async def _gather_limited(n: int, fn, concurrency: int = 16) -> list[Any]:
    sem = asyncio.Semaphore(concurrency)

    async def one(i: int) -> Any:
        async with sem:
            return await fn(i)

    return await asyncio.gather(*(one(i) for i in range(n)))


# --------------------------------------------------------------------------- hot swap


async def test_swap_under_concurrent_http_load_loses_nothing(srv):
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=64)) as s:
        status, body = await call(s, srv, "POST", "/api/models/m/load")
        assert status == 200, body
        status, before = await call(s, srv, "GET", "/api/models/m/routing")
        assert status == 200 and before["active"] == "1"

        records: list[tuple[float, float, int, str | None]] = []  # (start, end, status, model_version)
        errors: list[str] = []
        stop = asyncio.Event()

        async def loop(i: int) -> None:
            n = 0
            while not stop.is_set():
                t0 = time.monotonic()
                try:
                    async with s.post(srv.url + "/v2/models/m/infer", json=infer_body(value=i + n / 1000)) as r:
                        raw = await r.read()
                        version = json.loads(raw).get("model_version") if r.status == 200 else None
                        records.append((t0, time.monotonic(), r.status, version))
                        if r.status != 200:
                            errors.append(raw.decode()[:300])
                except Exception as e:  # noqa: BLE001 - a lost request is a failure to count
                    records.append((t0, time.monotonic(), -1, None))
                    errors.append(repr(e))
                n += 1

        loops = [asyncio.create_task(loop(i)) for i in range(16)]
        while len(records) < 100:  # traffic flowing on version 1
            await asyncio.sleep(0.01)
        swap_started = time.monotonic()
        status, result = await call(s, srv, "POST", "/api/models/m/swap", json={"version": "2"},
                                    headers={"X-Modelconsole-Actor": "test-swap"})
        swap_done = time.monotonic()
        while sum(1 for r in records if r[0] > swap_done) < 100:  # and on version 2
            await asyncio.sleep(0.01)
        stop.set()
        await asyncio.gather(*loops)

        assert status == 200, result
        assert result["name"] == "m" and result["from"] == "1" and result["to"] == "2"
        assert result["seconds"] >= 0
        assert errors == [], f"{len(errors)} failed of {len(records)}: {errors[:3]}"
        assert len(records) > 100
        assert all(st == 200 for _, _, st, _ in records)
        before_swap = [v for t0, t1, _, v in records if t1 < swap_started]
        after_swap = [v for t0, t1, _, v in records if t0 > swap_done]
        assert len(before_swap) >= 10 and set(before_swap) == {"1"}
        assert len(after_swap) >= 10 and set(after_swap) == {"2"}, "requests sent after the swap answered went to v1"

        status, after = await call(s, srv, "GET", "/api/models/m/routing")
        assert status == 200 and after["active"] == "2" and after["swap"] is None
        status, detail = await call(s, srv, "GET", "/api/models/m")
        states = {v["version"]: (v["state"], v["active"]) for v in detail["versions"]}
        assert states["2"] == ("READY", True)
        assert states["1"][1] is False
        status, audit = await call(s, srv, "GET", "/api/audit?model=m&limit=20")
        assert any(e["action"] == "swap" and e["actor"] == "test-swap" for e in audit["entries"]), audit


# --------------------------------------------------------------------------- A/B split


async def test_split_routes_by_weight_and_routing_keys_are_sticky(srv):
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=64)) as s:
        status, routing = await call(s, srv, "PUT", "/api/models/ab/split",
                                     json={"weights": {"1": 90, "2": 10}, "metric_output": "logits"})
        assert status == 200, routing
        assert routing["name"] == "ab" and routing["active"] == "1"
        assert set(routing["weights"]) == {"1", "2"}
        assert routing["weights"]["1"] == pytest.approx(9 * routing["weights"]["2"])
        assert routing["metric_output"] == "logits"
        status, got = await call(s, srv, "GET", "/api/models/ab/routing")
        assert status == 200 and _stable(got) == _stable(routing)

        # without a key: by weight (n=400, p=0.1: sd 0.015; bounds at 4 sd)
        versions = await _gather_limited(400, lambda i: served_by(s, srv, "ab"))
        share = versions.count("2") / len(versions)
        assert 0.04 <= share <= 0.16, share
        assert set(versions) == {"1", "2"}

        # a routing key in the request parameters: every request of a key lands on one arm
        keys = [f"client-{i}" for i in range(100)]
        arms: dict[str, set[str]] = {k: set() for k in keys}

        async def keyed(i: int) -> None:
            k = keys[i % len(keys)]
            arms[k].add(await served_by(s, srv, "ab", key=k))

        await _gather_limited(len(keys) * 3, keyed)
        assert all(len(v) == 1 for v in arms.values()), {k: v for k, v in arms.items() if len(v) > 1}
        on = {k: next(iter(v)) for k, v in arms.items()}
        on_two = [k for k in keys if on[k] == "2"]
        on_one = [k for k in keys if on[k] == "1"]
        assert on_two and on_one, "100 keys at 90/10 all landed on one arm"

        # the X-Routing-Key header does the same, and the same key lands on the same arm either way
        for k in on_two[:3] + on_one[:3]:
            seen = {await served_by(s, srv, "ab", header=k) for _ in range(3)}
            assert seen == {on[k]}
        # the parameter wins over the header
        assert await served_by(s, srv, "ab", key=on_two[0], header=on_one[0]) == "2"
        assert await served_by(s, srv, "ab", key=on_one[0], header=on_two[0]) == "1"

        # a version in the URL ignores the split (and the key)
        explicit = await _gather_limited(50, lambda i: served_by(s, srv, "ab", version="1", key=on_two[0]))
        assert set(explicit) == {"1"}
        assert await served_by(s, srv, "ab", version="2", key=on_one[0]) == "2"

        # a routing key that is not a string is refused, naming the parameter
        status, body = await call(s, srv, "POST", "/v2/models/ab/infer", json=infer_body(routing_key=7))
        assert status == 400 and "parameters.routing_key" in body["error"]

        # per-arm metrics, side by side
        status, got = await call(s, srv, "GET", "/api/models/ab/routing")
        arms_stats = got["arms"]
        assert arms_stats["1"]["requests"] > arms_stats["2"]["requests"] > 0
        for arm in ("1", "2"):
            st = arms_stats[arm]
            assert st["errors"] == 0 and st["error_rate"] in (0, 0.0)
            assert st["p50_ms"] is not None and st["p95_ms"] >= st["p50_ms"]
            assert isinstance(st["mean_output"], float)
        assert arms_stats["1"]["mean_output"] != arms_stats["2"]["mean_output"]  # two different models
        status, snap = await call(s, srv, "GET", "/api/snapshot")
        assert "ab" in snap["routing"] and snap["routing"]["ab"]["weights"] == got["weights"]

        # clearing the split: everything to the active version again
        status, cleared = await call(s, srv, "PUT", "/api/models/ab/split", json={"weights": {}})
        assert status == 200 and not cleared["weights"], cleared
        assert {await served_by(s, srv, "ab", key=k) for k in on_two[:5]} == {"1"}


# --------------------------------------------------------------------------- canary


async def test_canary_start_and_abort_over_http(srv):
    async with aiohttp.ClientSession() as s:
        status, body = await call(s, srv, "POST", "/api/models/can/load")
        assert status == 200, body
        status, routing = await call(s, srv, "POST", "/api/models/can/canary",
                                     json={"version": 2, "steps": [10, 50, 100], "interval_s": 3600,
                                           "max_error_rate": 0.1, "max_p95_ratio": 3, "min_requests": 5})
        assert status == 200, routing
        assert routing["canary"] is not None and routing["active"] == "1"
        assert routing["weights"].get("2", 0) > 0, routing
        share = routing["weights"]["2"] / sum(routing["weights"].values())
        assert share == pytest.approx(0.10)
        versions = await _gather_limited(200, lambda i: served_by(s, srv, "can"))
        assert set(versions) <= {"1", "2"} and "1" in versions

        # a second canary on the same model: 409, and nothing changed
        status, body = await call(s, srv, "POST", "/api/models/can/canary", json={"version": "2"})
        assert status == 409 and "canary" in body["error"], body
        status, now = await call(s, srv, "GET", "/api/models/can/routing")
        assert now["weights"] == routing["weights"] and now["canary"] is not None
        # nor a split or a swap while it runs
        status, body = await call(s, srv, "PUT", "/api/models/can/split", json={"weights": {"1": 1}})
        assert status == 409 and "canary" in body["error"], body
        status, body = await call(s, srv, "POST", "/api/models/can/swap", json={"version": "2"})
        assert status == 409 and "canary" in body["error"], body

        # abort: the new arm's share goes to 0, the baseline serves everything
        status, aborted = await call(s, srv, "DELETE", "/api/models/can/canary")
        assert status == 200, aborted
        assert aborted["active"] == "1"
        assert not aborted["weights"].get("2"), aborted
        assert aborted["canary"] is None or aborted["canary"].get("state") != "running", aborted
        assert set(await _gather_limited(30, lambda i: served_by(s, srv, "can"))) == {"1"}


# --------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("method, path, body, status, needles", [
    # the engine's checks
    ("PUT", "split", {"weights": {"1": 0, "2": 0}}, 400, ["weights"]),
    ("PUT", "split", {"weights": {"1": 50, "9": 50}}, (400, 404), ["9"]),
    ("POST", "swap", {"version": "9"}, 404, ["9"]),
    ("POST", "swap", {"version": "1"}, 409, ["active"]),
    ("POST", "canary", {"version": "9"}, 404, ["9"]),
    ("POST", "canary", {"version": "1"}, (400, 409), ["1"]),
    # the handler's checks
    ("PUT", "split", {"weights": [90, 10]}, 400, ["weights"]),
    ("PUT", "split", {"weights": {"one": 90}}, 400, ["weights", "one"]),
    ("PUT", "split", {"weights": {"1": "90"}}, 400, ["weights.1"]),
    ("PUT", "split", {"weights": {"1": True}}, 400, ["weights.1"]),
    ("PUT", "split", {"weight": {"1": 90}}, 400, ["weight", "unknown field"]),
    ("PUT", "split", {}, 400, ["weights", "required"]),
    ("PUT", "split", {"weights": {"1": 1}, "shadow": "2"}, 400, ["shadow"]),
    ("PUT", "split", {"weights": {"1": 1}, "shadow": ["two"]}, 400, ["shadow[0]"]),
    ("PUT", "split", {"weights": {"1": 1}, "metric_output": 3}, 400, ["metric_output"]),
    ("POST", "swap", {}, 400, ["version", "required"]),
    ("POST", "swap", {"version": "two"}, 400, ["version"]),
    ("POST", "swap", {"version": True}, 400, ["version"]),
    ("POST", "swap", {"version": "2", "force": True}, 400, ["force", "unknown field"]),
    ("POST", "canary", {"steps": [5, 100]}, 400, ["version", "required"]),
    ("POST", "canary", {"version": "2", "steps": "5,100"}, 400, ["steps"]),
    ("POST", "canary", {"version": "2", "steps": [5, "all"]}, 400, ["steps[1]"]),
    ("POST", "canary", {"version": "2", "interval_s": "1m"}, 400, ["interval_s"]),
    ("POST", "canary", {"version": "2", "max_error_rate": None}, 400, ["max_error_rate"]),
    ("POST", "canary", {"version": "2", "min_requests": 2.5}, 400, ["min_requests"]),
    ("POST", "canary", {"version": "2", "bounds": {}}, 400, ["bounds", "unknown field"]),
    ("DELETE", "canary", {"now": True}, 400, ["now", "unknown field"]),
])
async def test_bad_input_is_refused_naming_the_problem_and_changes_nothing(srv, method, path, body, status,
                                                                           needles):
    async with aiohttp.ClientSession() as s:
        st, before = await call(s, srv, "GET", "/api/models/bad/routing")
        assert st == 200
        got, answer = await call(s, srv, method, f"/api/models/bad/{path}", json=body)
        assert got in (status if isinstance(status, tuple) else (status,)), answer
        for needle in needles:
            assert needle in answer["error"], answer
        st, after = await call(s, srv, "GET", "/api/models/bad/routing")
        assert after == before
        assert after["active"] == "1" and not after["weights"] and after["canary"] is None


async def test_bad_bodies_and_unknown_models(srv):
    async with aiohttp.ClientSession() as s:
        as_json = {"Content-Type": "application/json"}
        st, body = await call(s, srv, "PUT", "/api/models/bad/split", data=b"{not json", headers=as_json)
        assert st == 400 and "JSON" in body["error"]
        st, body = await call(s, srv, "POST", "/api/models/bad/swap", data=b"", headers=as_json)
        assert st == 400 and "body" in body["error"]
        for method, path, payload in (("GET", "routing", None), ("POST", "swap", {"version": "2"}),
                                      ("PUT", "split", {"weights": {"1": 1}}), ("POST", "canary", {"version": "2"}),
                                      ("DELETE", "canary", None)):
            st, body = await call(s, srv, method, f"/api/models/nope/{path}", json=payload)
            assert st == 404 and "nope" in body["error"], (method, path, body)


async def test_split_during_a_swap_is_refused(srv):
    """v2 of "slow" warms for a while, so the swap is under way long enough to collide with."""
    async with aiohttp.ClientSession() as s:
        status, body = await call(s, srv, "POST", "/api/models/slow/load")
        assert status == 200, body
        _, before = await call(s, srv, "GET", "/api/models/slow/routing")
        swap = asyncio.create_task(call(s, srv, "POST", "/api/models/slow/swap", json={"version": "2"}))
        deadline = time.monotonic() + 10
        routing = before
        while routing["swap"] is None and not swap.done() and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
            _, routing = await call(s, srv, "GET", "/api/models/slow/routing")
        if routing["swap"] is None:
            await swap
            pytest.skip("the swap finished before a split could collide with it")
        refused = [
            await call(s, srv, "PUT", "/api/models/slow/split", json={"weights": {"1": 50, "2": 50}}),
            await call(s, srv, "POST", "/api/models/slow/canary", json={"version": "2"}),
            await call(s, srv, "POST", "/api/models/slow/swap", json={"version": "2"}),
        ]
        still_swapping = not swap.done()
        status, result = await swap
        assert status == 200 and result["to"] == "2", result
        if not still_swapping:
            pytest.skip("the swap finished while the refused calls were being made")
        for st, body in refused:
            assert st == 409 and "swap" in body["error"], body
        _, after = await call(s, srv, "GET", "/api/models/slow/routing")
        assert after["active"] == "2" and not after["weights"] and after["swap"] is None
