"""The control plane under attack and under load, over real sockets.

* a web page cannot drive it: a foreign Origin is 403, a non-JSON control
  call 415, and nothing answers a CORS preflight with an invitation;
* a server started without a token makes one, writes it 0600 beside the
  store, and ``--attach`` finds it; ``--no-token`` is explicit;
* 200 concurrent control calls: no 5xx, and exactly one audit row per call
  (failed ones with their error).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import stat
import subprocess
import sys
import urllib.error
import urllib.request

import aiohttp
import pytest
from serverutil import ServerThread
from test_server import _env, serving

from modelconsole.console.cli import attach_token
from modelconsole.server.tokenfile import read_token, token_path, write_token

MODELS = [{"name": f"m{i}", "source": "zoo:tiny-mlp", "args": {"hidden": 16}, "warmup": 0,
           "priority_levels": 3} for i in range(4)]


@pytest.fixture(scope="module")
def srv(tmp_path_factory):
    with ServerThread(tmp_path_factory.mktemp("cp"), models=MODELS) as s:
        yield s


async def send(method: str, url: str, **kw) -> tuple[int, dict, dict]:
    async with aiohttp.ClientSession() as s, s.request(method, url, **kw) as r:
        raw = await r.read()
        return r.status, dict(r.headers), (json.loads(raw) if raw else {})


# ------------------------------------------------------------------ cross-site


@pytest.mark.parametrize("origin", ["http://evil.example", "null", "http://127.0.0.1:1"])
async def test_a_foreign_origin_is_refused_and_changes_nothing(srv, origin):
    before = srv.engine.instance("m0").pinned
    status, headers, body = await send("POST", srv.url + "/api/models/m0/pin", json={},
                                       headers={"Origin": origin})
    assert status == 403 and "cross-site request refused" in body["error"], body
    assert not any(k.lower().startswith("access-control-") for k in headers)
    assert srv.engine.instance("m0").pinned == before


async def test_the_servers_own_origin_and_no_origin_pass(srv):
    own = srv.url  # http://127.0.0.1:PORT, as a browser on the server's own page would send
    status, _, body = await send("GET", srv.url + "/api/models/m0", headers={"Origin": own})
    assert status == 200, body
    status, _, _ = await send("GET", srv.url + "/api/models/m0")
    assert status == 200


async def test_sec_fetch_site_cross_site_is_refused(srv):
    status, _, body = await send("POST", srv.url + "/api/models/m0/unpin", json={},
                                 headers={"Sec-Fetch-Site": "cross-site"})
    assert status == 403 and "Sec-Fetch-Site" in body["error"]


@pytest.mark.parametrize("content_type, data", [
    ("text/plain", b'{"priority": 1}'),  # what a no-preflight fetch() sends
    ("application/x-www-form-urlencoded", b"priority=1"),  # an HTML form
    ("multipart/form-data; boundary=x", b"--x--"),
    (None, b""),
])
async def test_a_control_call_must_be_json(srv, content_type, data):
    headers = {"Content-Type": content_type} if content_type else {}
    status, _, body = await send("PUT", srv.url + "/api/models/m1/priority", data=data, headers=headers)
    assert status == 415, body
    assert "Content-Type: control calls need 'application/json'" in body["error"]
    assert srv.engine.instance("m1").cfg.priority == 2


async def test_no_cors_preflight_is_invited(srv):
    status, headers, _ = await send("OPTIONS", srv.url + "/api/models/m0/load", headers={
        "Origin": "http://evil.example", "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "content-type"})
    assert status in (403, 405), status
    assert not any(k.lower().startswith("access-control-") for k in headers)


# ------------------------------------------------------------------ the token file


def test_token_file_is_private_and_read_back(tmp_path):
    path = write_token(tmp_path, 8123, "s3cret")
    assert path == token_path(tmp_path, 8123)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert read_token(tmp_path, 8123) == "s3cret"
    assert read_token(tmp_path, 8124) is None
    path.chmod(0o644)  # readable by others: not trusted (anyone could have planted it)
    assert read_token(tmp_path, 8123) is None


def test_serve_without_a_token_makes_one_and_attach_finds_it(tmp_path):
    with serving(tmp_path, '[[models]]\nname = "tiny"\nsource = "zoo:tiny-mlp"\n') as s:
        path = token_path(tmp_path, s.port)
        assert path.exists() and stat.S_IMODE(path.stat().st_mode) == 0o600
        token = path.read_text().strip()
        assert len(token) >= 32
        req = urllib.request.Request(s.url + "/api/snapshot")
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(req, timeout=30)
        assert e.value.code == 401
        req.add_header("Authorization", f"Bearer {token}")
        with urllib.request.urlopen(req, timeout=30) as r:
            assert r.status == 200
        # what --attach URL --store PATH reads by itself
        args = argparse.Namespace(token=None, no_token=False, store=str(tmp_path / "s.db"))
        env = os.environ.pop("MODELCONSOLE_TOKEN", None)
        try:
            assert attach_token(args, s.url) == token
            assert attach_token(argparse.Namespace(token=None, no_token=False, store=None),
                                "http://example.com:8000") is None  # never sent elsewhere
        finally:
            if env is not None:
                os.environ["MODELCONSOLE_TOKEN"] = env
        # inference stays open
        data = json.dumps({"inputs": [{"name": "input", "shape": [1, 64], "datatype": "FP32",
                                       "data": [0.0] * 64}]}).encode()
        with urllib.request.urlopen(urllib.request.Request(s.url + "/v2/models/tiny/infer", data=data),
                                    timeout=60) as r:
            assert r.status == 200


def test_no_token_is_explicit_and_loopback_only(tmp_path):
    p = subprocess.run([sys.executable, "-m", "modelconsole.console", "--serve", "--host", "0.0.0.0",
                        "--no-token", "--store", str(tmp_path / "s.db")],
                       capture_output=True, text=True, timeout=60, env=_env())
    assert p.returncode == 2 and "without a token" in p.stderr
    p = subprocess.run([sys.executable, "-m", "modelconsole.console", "--serve", "--token", "x",
                        "--no-token", "--store", str(tmp_path / "s.db")],
                       capture_output=True, text=True, timeout=60, env=_env())
    assert p.returncode == 2 and "contradict" in p.stderr


# ------------------------------------------------------------------ concurrency and the audit log


def _calls(n: int, seed: int = 7) -> list[tuple[str, str, dict]]:
    """n control calls over the models: loads, unloads, pins, priorities, splits (some refused)."""
    rnd = random.Random(seed)
    out = []
    for _ in range(n):
        m = f"m{rnd.randrange(4)}"
        kind = rnd.choice(["load", "unload", "pin", "unpin", "priority", "bad_priority", "split", "evict",
                           "unknown"])
        if kind in ("load", "unload", "pin", "unpin", "evict"):
            out.append(("POST", f"/api/models/{m}/{kind}", {}))
        elif kind == "priority":
            out.append(("PUT", f"/api/models/{m}/priority", {"priority": rnd.randint(1, 3)}))
        elif kind == "bad_priority":
            out.append(("PUT", f"/api/models/{m}/priority", {"priority": 9}))
        elif kind == "split":
            out.append(("PUT", f"/api/models/{m}/split", {"weights": {}}))
        else:
            out.append(("POST", "/api/models/ghost/load", {}))
    return out


async def test_200_concurrent_control_calls_no_5xx_one_audit_row_each(srv):
    calls = _calls(200)
    before = {e["id"] for e in await _audit(srv)}

    async with aiohttp.ClientSession() as s:
        async def one(i: int, method: str, path: str, body: dict) -> int:
            async with s.request(method, srv.url + path, json=body,
                                 headers={"X-Modelconsole-Actor": f"c{i}"}) as r:
                await r.read()
                return r.status

        statuses = await asyncio.gather(*(one(i, *c) for i, c in enumerate(calls)))

    assert not [st for st in statuses if st >= 500], statuses
    rows = [e for e in await _audit(srv) if e["id"] not in before]
    by_actor: dict[str, list[dict]] = {}
    for e in rows:
        by_actor.setdefault(e["actor"], []).append(e)
    for i, st in enumerate(statuses):
        got = by_actor.get(f"c{i}", [])
        assert len(got) == 1, (i, calls[i], st, got)
        if st < 300:
            assert got[0]["result"] == "ok", (calls[i], got)
        else:
            assert got[0]["result"] == "error" and got[0]["detail"], (calls[i], st, got)
    assert len(rows) == len(calls)
    # the engine and the store agree afterwards: pins and priorities as the last acknowledged call left them
    pins = set(srv.call(srv.engine.store.pins))
    for i in range(4):
        inst = srv.engine.instance(f"m{i}")
        assert ((inst.name, inst.version) in pins) == inst.pinned


async def _audit(srv) -> list[dict]:
    status, _, body = await send("GET", srv.url + "/api/audit?limit=10000")
    assert status == 200
    return body["entries"]


async def test_store_transactions_do_not_interleave(tmp_path):
    """The store alone: concurrent writers, one failing mid-transaction, lose nobody's rows."""
    from modelconsole.scheduler.store import Store

    async with Store(tmp_path / "s.db") as store:
        bad = ("INSERT INTO nowhere VALUES (?)", (1,))  # fails inside its transaction

        async def good(i: int) -> None:
            await store.audit(f"a{i}", "pin", "m", "1")

        async def failing() -> None:
            with pytest.raises(Exception, match="nowhere"):
                await store._tx([store._audit_row("x", "pin", "m", "1", {}, "ok", None), bad])

        await asyncio.gather(*(good(i) for i in range(50)), *(failing() for _ in range(10)),
                             *(good(i) for i in range(50, 100)))
        rows = await store.audit_log(1000)
        assert sorted(r["actor"] for r in rows) == sorted(f"a{i}" for i in range(100))


# ------------------------------------------------------------------ small ones: a 4xx naming the field, never a 500


@pytest.mark.parametrize("method, path, body, status, needle", [
    ("POST", "/api/models", {"name": "n", "source": "torchscript:a\u0000b.pt"}, 400, "control characters"),
    ("POST", "/api/models/m0/load", {"version": 600.0}, 404, "no version '600'"),  # 600.0 is 600 (JSON)
    ("POST", "/api/models/m0/load", {"version": "0"}, 400, "version: expected a version number from 1"),
    ("POST", "/api/models/m0/load", {"version": None}, 400, "version: expected a version number"),
    ("POST", "/api/models/m0/load", {"version": 1.5}, 400, "version: expected a version number"),
    ("POST", "/api/models/m0/load", {"colour": 1}, 400, "colour: unknown field"),
    ("PUT", "/api/models/m0/priority", {"priority": 4}, 400, "priority: expected an integer from 1"),
    ("POST", "/api/models/m0/canary", {"version": "1", "steps": [50, 25, 100]}, 400, "steps"),
    ("PUT", "/api/models/m0/split", {"weights": {"0": 1}}, 400, "weights (key \"0\")"),
])
async def test_bad_values_are_4xx_naming_the_field(srv, method, path, body, status, needle):
    before = [e for e in await _audit(srv) if e["result"] == "ok"]
    got, _, answer = await send(method, srv.url + path, json=body)
    assert got == status, answer
    assert needle in answer["error"], answer
    assert [e for e in await _audit(srv) if e["result"] == "ok"] == before  # nothing changed


@pytest.mark.parametrize("query, header", [("last_event_id=-1", None), ("last_event_id=", None),
                                           (None, "-5"), (None, ""), ("last_event_id=x", "3")])
async def test_a_bad_last_event_id_is_400(srv, query, header):
    url = srv.url + "/api/events" + (f"?{query}" if query is not None else "")
    headers = {"Last-Event-ID": header} if header is not None else {}
    status, _, body = await send("GET", url, headers=headers)
    assert status == 400 and "expected an event sequence number" in body["error"], body
