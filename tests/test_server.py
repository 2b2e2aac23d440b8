"""The HTTP server with real requests on a loopback port: control API, /v1/models, events,
metrics, security and bad input.  (tritonclient's own calls are in test_tritonclient.py.)"""

from __future__ import annotations

import asyncio
import gzip
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import aiohttp
import numpy as np
import pytest

from modelconsole.server.app import ServerSettings, is_loopback
from serverutil import ServerThread

TOKEN = "s3cret-token"


@pytest.fixture(scope="module")
def srv(tmp_path_factory):
    with ServerThread(tmp_path_factory.mktemp("srv")) as s:
        yield s


@pytest.fixture(scope="module")
def secured(tmp_path_factory):
    settings = ServerSettings(port=0, token=TOKEN, infer_requires_token=True)
    with ServerThread(tmp_path_factory.mktemp("sec"), settings=settings) as s:
        yield s


async def request(method: str, url: str, **kw):
    async with aiohttp.ClientSession() as s:
        async with s.request(method, url, **kw) as r:
            body = await r.read()
            return r.status, r.headers, body


def tiny_json(batch: int = 1, value: float = 0.5) -> dict:
    return {"inputs": [{"name": "input", "shape": [batch, 64], "datatype": "FP32", "data": [value] * (64 * batch)}]}


# --------------------------------------------------------------------------- V2 over raw HTTP


async def test_json_infer_and_model_version(srv):
    status, headers, body = await request("POST", srv.url + "/v2/models/tiny/infer", json=tiny_json(2))
    assert status == 200, body
    out = json.loads(body)
    assert out["model_name"] == "tiny" and out["model_version"] == "1"
    assert out["outputs"][0]["name"] == "logits" and out["outputs"][0]["shape"] == [2, 10]
    assert len(out["outputs"][0]["data"]) == 20


async def test_gzip_request_body_and_compressed_answer(srv):
    body = gzip.compress(json.dumps(tiny_json(32)).encode())
    status, headers, raw = await request(
        "POST", srv.url + "/v2/models/tiny/infer", data=body,
        headers={"Content-Encoding": "gzip", "Content-Type": "application/json", "Accept-Encoding": "gzip"})
    assert status == 200, raw
    assert headers.get("Content-Encoding") == "gzip"  # the client decompressed it for us
    assert json.loads(raw)["outputs"][0]["shape"] == [32, 10]


@pytest.mark.parametrize("payload, headers, status, needle", [
    (b"{not json", {}, 400, "JSON"),
    (b"[1, 2]", {}, 400, "object"),
    (json.dumps({"inputs": [{"name": "input", "shape": [1, 63], "datatype": "FP32", "data": [0.0] * 63}]}).encode(),
     {}, 400, "expected shape [-1, 64]"),
    (json.dumps({"inputs": [{"name": "input", "shape": [1, 64], "datatype": "INT32", "data": [0] * 64}]}).encode(),
     {}, 400, "expected datatype FP32"),
    (json.dumps({"inputs": [{"name": "input", "shape": [1, 64], "datatype": "FP32", "data": [0.0] * 10}]}).encode(),
     {}, 400, "input"),
    (json.dumps({"inputs": [{"name": "input", "shape": [10**9, 10**9], "datatype": "FP32",
                             "parameters": {"binary_data_size": 16}}]}).encode() + b"\0" * 16,
     {"Inference-Header-Content-Length": "-"}, 400, "Inference-Header-Content-Length"),
    (b'{"inputs": []}', {"Inference-Header-Content-Length": "500"}, 400, "500"),
    (json.dumps({"inputs": [{"name": "input", "shape": [1, 64], "datatype": "FP32",
                             "parameters": {"binary_data_size": 256}}]}).encode() + b"\0" * 100,
     "split", 400, "input"),
    (json.dumps({"inputs": [{"name": "input", "shape": [100000, 100000, 64], "datatype": "FP32",
                             "parameters": {"binary_data_size": 256}}]}).encode() + b"\0" * 256,
     "split", 400, "input"),
])
async def test_bad_infer_requests_get_400_naming_the_problem(srv, payload, headers, status, needle):
    if headers == "split":  # a binary request: the JSON part's length in the header
        headers = {"Inference-Header-Content-Length": str(payload.index(b"}]}") + 3)}
    got, _, body = await request("POST", srv.url + "/v2/models/tiny/infer", data=payload, headers=headers)
    assert got == status, body
    err = json.loads(body)["error"]
    assert needle in err
    # the server keeps serving
    ok, _, _ = await request("POST", srv.url + "/v2/models/tiny/infer", json=tiny_json())
    assert ok == 200


async def test_unknown_model_and_version_are_404_and_bad_version_400(srv):
    status, _, body = await request("POST", srv.url + "/v2/models/nope/infer", json=tiny_json())
    assert status == 404 and "unknown model 'nope'" in json.loads(body)["error"]
    status, _, body = await request("POST", srv.url + "/v2/models/tiny/versions/7/infer", json=tiny_json())
    assert status == 404 and "no version '7'" in json.loads(body)["error"]
    status, _, body = await request("GET", srv.url + "/v2/models/tiny/versions/abc")
    assert status == 400 and "version" in json.loads(body)["error"]


async def test_body_limit_is_413_and_connection_survives(tmp_path):
    with ServerThread(tmp_path, settings=ServerSettings(port=0, max_body_bytes=4096)) as s:
        status, _, body = await request("POST", s.url + "/v2/models/tiny/infer", json=tiny_json(64))
        assert status == 413 and "4096" in json.loads(body)["error"]
        status, _, _ = await request("POST", s.url + "/v2/models/tiny/infer", json=tiny_json(1))
        assert status == 200


async def test_truncated_body_does_not_hang_the_server(srv):
    host, port = srv.hostport.split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    body = json.dumps(tiny_json()).encode()
    writer.write(b"POST /v2/models/tiny/infer HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 b"Content-Length: %d\r\n\r\n" % len(body) + body[:40])
    await writer.drain()
    writer.close()  # the client vanishes mid-body
    status, _, _ = await request("POST", srv.url + "/v2/models/tiny/infer", json=tiny_json())
    assert status == 200


# --------------------------------------------------------------------------- /v1/models


async def test_v1_models_filters_pagination_and_etag(srv):
    status, headers, body = await request("GET", srv.url + "/v1/models?limit=3")
    assert status == 200
    page = json.loads(body)
    assert page["object"] == "list" and len(page["data"]) == 3 and page["has_more"]
    names = [m["id"] for m in page["data"]]
    assert names == sorted(names)
    status, _, body = await request("GET", srv.url + f"/v1/models?limit=3&after={page['next_after']}")
    assert json.loads(body)["data"][0]["id"] > names[-1]
    status, _, body = await request("GET", srv.url + "/v1/models?q=ECHO_FP")
    assert sorted(m["id"] for m in json.loads(body)["data"]) == ["echo_fp16", "echo_fp32", "echo_fp64"]
    entry = json.loads(body)["data"][0]
    v = entry["versions"][0]
    for key in ("version", "state", "device", "memory_bytes", "health", "metrics", "active", "pinned"):
        assert key in v
    # state filter: tiny was used above, so it is READY
    status, _, body = await request("GET", srv.url + "/v1/models?state=ready&limit=1000")
    assert "tiny" in [m["id"] for m in json.loads(body)["data"]]
    # ETag: the same list again is a 304
    status, headers, body = await request("GET", srv.url + "/v1/models?q=echo_bool")
    etag = headers["ETag"]
    status, headers2, body2 = await request("GET", srv.url + "/v1/models?q=echo_bool",
                                            headers={"If-None-Match": etag})
    assert status == 304 and body2 == b"" and headers2["ETag"] == etag
    for bad, needle in (("state=sleepy", "state: expected one of"), ("limit=0", "limit"), ("limit=x", "limit")):
        status, _, body = await request("GET", srv.url + "/v1/models?" + bad)
        assert status == 400 and needle in json.loads(body)["error"]


# --------------------------------------------------------------------------- control API


async def test_register_load_pin_priority_evict_unload_and_audit(srv):
    base = srv.url + "/api/models"
    status, _, body = await request("POST", base, json={"name": "ctl", "source": "zoo:tiny-mlp",
                                                        "options": {"args": {"hidden": 32}, "priority": 2}})
    assert status == 201, body
    assert json.loads(body)["state"] == "UNLOADED"
    status, _, body = await request("POST", base + "/ctl/load")
    assert status == 200 and json.loads(body)["state"] == "READY"
    status, _, body = await request("POST", base + "/ctl/pin")
    assert status == 200 and json.loads(body)["pinned"] is True
    status, _, body = await request("POST", base + "/ctl/evict")
    assert status == 409 and "pinned" in json.loads(body)["error"]
    status, _, body = await request("POST", base + "/ctl/unpin", json={"version": "1"})
    assert status == 200 and json.loads(body)["pinned"] is False
    status, _, body = await request("PUT", base + "/ctl/priority", json={"priority": 1})
    assert status == 200 and json.loads(body)["config"]["priority"] == 1
    status, _, body = await request("POST", base + "/ctl/evict")
    assert status == 200 and json.loads(body)["state"] == "UNLOADED"
    status, _, body = await request("GET", srv.url + "/api/audit?model=ctl")
    actions = [e["action"] for e in json.loads(body)["entries"]]
    assert actions[::-1] == ["register", "load", "pin", "unpin", "priority", "evict"]
    # the priority survives in the store
    prios = srv.call(lambda: srv.engine.store.priorities())
    assert prios[("ctl", "1")] == 1


@pytest.mark.parametrize("method, path, payload, status, needle", [
    ("POST", "/api/models", {"source": "zoo:tiny-mlp"}, 400, "name: required"),
    ("POST", "/api/models", {"name": "x", "source": "zoo:tiny-mlp", "colour": 1}, 400, "colour: unknown field"),
    ("POST", "/api/models", {"name": "x", "source": "zoo:nope"}, 400, "unknown zoo model"),
    ("POST", "/api/models", {"name": "bad name!", "source": "zoo:tiny-mlp"}, 400, "name"),
    ("POST", "/api/models", {"name": "x", "source": "zoo:tiny-mlp", "options": {"max_batch_size": "big"}},
     400, "max_batch_size"),
    ("POST", "/api/models", {"name": "x", "source": "zoo:tiny-mlp", "options": []}, 400, "options"),
    ("POST", "/api/models", {"name": "tiny", "source": "zoo:tiny-mlp"}, 409, "already registered"),
    ("POST", "/api/models/nope/load", None, 404, "unknown model"),
    ("POST", "/api/models/tiny/load", {"version": "9"}, 404, "no version '9'"),
    ("POST", "/api/models/tiny/load", {"version": [1]}, 400, "version"),
    ("PUT", "/api/models/tiny/priority", {"priority": 7}, 400, "priority: expected an integer from 1"),
    ("PUT", "/api/models/tiny/priority", {}, 400, "priority: required"),
    ("POST", "/api/models/echo_int8/evict", None, 409, "not loaded"),
])
async def test_control_api_refuses_bad_calls_and_changes_nothing(srv, method, path, payload, status, needle):
    before = srv.call(lambda: srv.engine.store.audit_log(1000))
    kw = {"json": payload} if payload is not None else {}
    got, _, body = await request(method, srv.url + path, **kw)
    assert got == status, body
    assert needle in json.loads(body)["error"]
    after = srv.call(lambda: srv.engine.store.audit_log(1000))
    assert [e for e in after if e["result"] == "ok"] == [e for e in before if e["result"] == "ok"]
    assert "x" not in srv.engine.model_names()


async def test_snapshot_and_event_stream(srv):
    status, _, body = await request("GET", srv.url + "/api/snapshot")
    snap = json.loads(body)
    assert {"models", "devices", "cache", "host_tier", "server", "events"} <= set(snap)
    assert snap["devices"][0]["backend"] == "simulated"
    kinds: list[str] = []
    seen_snapshot = False
    async with aiohttp.ClientSession() as s:
        async with s.get(srv.url + "/api/events") as r:
            assert r.headers["Content-Type"].startswith("text/event-stream")
            await request("POST", srv.url + "/api/models/echo_uint8/load")
            deadline = time.monotonic() + 10
            kind = None
            while time.monotonic() < deadline and not ("loaded" in kinds and seen_snapshot):
                line = (await asyncio.wait_for(r.content.readline(), 5)).decode().rstrip("\n")
                if line.startswith("event: "):
                    kind = line[7:]
                elif line.startswith("data: ") and kind == "event":
                    kinds.append(json.loads(line[6:])["kind"])
                elif line.startswith("data: ") and kind == "snapshot":
                    seen_snapshot = "models" in json.loads(line[6:])
    assert "loaded" in kinds and seen_snapshot


async def test_event_stream_replays_after_last_event_id(srv):
    await request("POST", srv.url + "/api/models/echo_uint16/load")
    recent = json.loads((await request("GET", srv.url + "/api/snapshot"))[2])["events"]
    last = recent[-1]["seq"]
    await request("POST", srv.url + "/api/models/echo_uint16/unload")
    async with aiohttp.ClientSession() as s:
        async with s.get(srv.url + "/api/events", headers={"Last-Event-ID": str(last)}) as r:
            got = []
            while len(got) < 1:
                line = (await asyncio.wait_for(r.content.readline(), 5)).decode()
                if line.startswith("id: "):
                    got.append(int(line[4:]))
    assert got[0] == last + 1 or got[0] > last


async def test_metrics_endpoint(srv):
    await request("POST", srv.url + "/v2/models/tiny/infer", json=tiny_json())
    status, headers, body = await request("GET", srv.url + "/metrics")
    assert status == 200 and headers["Content-Type"].startswith("text/plain")
    text = body.decode()
    assert 'nv_inference_request_success{model="tiny",version="1"}' in text
    assert "nv_gpu_memory_total_bytes" in text


# --------------------------------------------------------------------------- security


async def test_token_guards_control_repository_and_infer(secured):
    url = secured.url
    status, headers, body = await request("GET", url + "/api/snapshot")
    assert status == 401 and "Bearer" in headers["WWW-Authenticate"]
    status, _, body = await request("GET", url + "/api/snapshot", headers={"Authorization": "Bearer wrong"})
    assert status == 403
    status, _, _ = await request("GET", url + "/api/snapshot", headers={"Authorization": f"Bearer {TOKEN}"})
    assert status == 200
    status, _, _ = await request("POST", url + "/v2/repository/index")
    assert status == 401
    status, _, _ = await request("POST", url + "/v2/models/tiny/infer", json=tiny_json())
    assert status == 401  # infer_requires_token
    status, _, _ = await request("POST", url + "/v2/models/tiny/infer", json=tiny_json(),
                                 headers={"Authorization": f"Bearer {TOKEN}"})
    assert status == 200
    status, _, _ = await request("GET", url + "/v2/health/ready")  # health stays open for probes
    assert status == 200


def test_loopback_detection():
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("192.168.1.4") and not is_loopback("example.com")


# --------------------------------------------------------------------------- modelconsole --serve


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_serve_refuses_a_public_bind_without_a_token(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "MODELCONSOLE_TOKEN"}
    p = subprocess.run([sys.executable, "-m", "modelconsole.console", "--serve", "--host", "0.0.0.0",
                        "--store", str(tmp_path / "s.db")], capture_output=True, text=True, timeout=60, env=env)
    assert p.returncode == 2
    assert "refusing to bind '0.0.0.0' without a token" in p.stderr
    assert not (tmp_path / "s.db").exists()


def test_serve_answers_then_drains_on_sigterm(tmp_path):
    cfg = tmp_path / "mc.toml"
    cfg.write_text('[[models]]\nname = "tiny"\nsource = "zoo:tiny-mlp"\n')
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "modelconsole.console", "--serve", "--config", str(cfg),
                             "--port", str(port), "--store", str(tmp_path / "s.db")],
                            stderr=subprocess.PIPE, text=True)
    try:
        import urllib.request

        deadline = time.monotonic() + 60
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/v2/health/ready", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise AssertionError("server did not come up: " + (proc.stderr.read() if proc.poll() else ""))
                time.sleep(0.2)
        req = urllib.request.Request(f"http://127.0.0.1:{port}/v2/models/tiny/infer",
                                     data=json.dumps(tiny_json()).encode(), method="POST")
        with urllib.request.urlopen(req, timeout=30) as r:
            assert json.loads(r.read())["model_version"] == "1"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
        err = proc.stderr.read()
        assert "listening on http://127.0.0.1:%d" % port in err
        assert "SIGTERM: shutting down" in err and "stopped" in err
        assert "loaded" in err  # engine events reach the log
    finally:
        if proc.poll() is None:
            proc.kill()
