"""The HTTP server with real requests on a loopback port: control API, /v1/models, events,
metrics, security and bad input.  (tritonclient's own calls are in test_tritonclient.py.)"""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import json
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import traceback
import urllib.error
import urllib.request
import zlib
from pathlib import Path

import aiohttp
import pytest
from serverutil import ServerThread

from modelconsole.console.cli import OneLineFormatter, describe_exception
from modelconsole.server.guard import ENCODINGS
from modelconsole.server.tokenfile import is_loopback, read_token
from modelconsole.server.web import ServerSettings

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
    if method in ("POST", "PUT", "DELETE") and "/api/" in url and kw.get("json") is None and "data" not in kw:
        kw["json"] = {}  # a control call is JSON, as every client sends it (the server refuses others)
    async with aiohttp.ClientSession() as s:
        async with s.request(method, url, **kw) as r:
            body = await r.read()
            return r.status, r.headers, body


def tiny_json(batch: int = 1, value: float = 0.5) -> dict:
    return {"inputs": [{"name": "input", "shape": [batch, 64], "datatype": "FP32", "data": [value] * (64 * batch)}]}


async def raw_exchange(hostport: str, data: bytes) -> tuple[int, dict[str, str], bytes]:
    """Send bytes exactly as given on a fresh connection; the answer's status, headers (lower-case
    names) and body.  For what aiohttp's client would not send: no Content-Length, corrupt codings."""
    host, port = hostport.split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        writer.write(data)
        await writer.drain()
        status_line = await asyncio.wait_for(reader.readline(), 10)
        headers: dict[str, str] = {}
        while (line := await asyncio.wait_for(reader.readline(), 10)) not in (b"\r\n", b""):
            name, _, value = line.decode().partition(":")
            headers[name.strip().lower()] = value.strip()
        body = await asyncio.wait_for(reader.readexactly(int(headers.get("content-length", "0"))), 10)
    finally:
        writer.close()
    return int(status_line.split()[1]), headers, body


def post_head(path: str, length: int | None, **headers: str) -> bytes:
    lines = [f"POST {path} HTTP/1.1", "Host: 127.0.0.1"]
    if length is not None:
        lines.append(f"Content-Length: {length}")
    lines += [f"{k.replace('_', '-')}: {v}" for k, v in headers.items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


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


CORRUPT = b"this is not compressed data at all"


@pytest.mark.parametrize("coding", ["gzip", "deflate", "br", "GZIP"])
async def test_corrupt_compressed_body_is_400_naming_the_coding(srv, coding, caplog):
    if coding.lower() not in ENCODINGS:
        pytest.skip(f"aiohttp cannot decode {coding} here (its package is not installed)")
    good = json.dumps(tiny_json()).encode()
    bodies = [CORRUPT, gzip.compress(good) + b"trailing garbage"] if coding.lower() == "gzip" else [CORRUPT]
    for body in bodies:
        head = post_head("/v2/models/tiny/infer", len(body), Content_Encoding=coding,
                         Content_Type="application/json")
        status, headers, answer = await raw_exchange(srv.hostport, head + body)
        assert status == 400, answer
        c = coding.lower()
        assert json.loads(answer) == {
            "error": f"cannot decode the request body: invalid {c} data (Content-Encoding: {c})"}
        assert headers["connection"] == "close"  # this connection's parser cannot find the next request
    # the server keeps serving, compressed bodies included, and logged no traceback for a client's mistake
    status, _, _ = await request("POST", srv.url + "/v2/models/tiny/infer", data=zlib.compress(good),
                                 headers={"Content-Encoding": "deflate"})
    assert status == 200
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], caplog.text


async def test_corrupt_gzip_on_the_control_api_is_400_too(srv):
    head = post_head("/api/models", len(CORRUPT), Content_Encoding="gzip", Content_Type="application/json")
    status, _, answer = await raw_exchange(srv.hostport, head + CORRUPT)
    assert status == 400 and "invalid gzip data" in json.loads(answer)["error"]


@pytest.mark.parametrize("coding", ["compress", "gzip, br", "x-unknown"])
async def test_unsupported_content_encoding_is_415_listing_the_supported(srv, coding):
    body = json.dumps(tiny_json()).encode()
    status, headers, answer = await raw_exchange(
        srv.hostport, post_head("/v2/models/tiny/infer", len(body), Content_Encoding=coding) + body)
    assert status == 415, answer
    error = json.loads(answer)["error"]
    assert error.startswith(f"Content-Encoding: {coding!r} is not supported; expected one of gzip, deflate")
    assert "identity" in error
    assert headers["accept-encoding"].startswith("gzip, deflate")
    status, _, _ = await request("POST", srv.url + "/v2/models/tiny/infer", data=body,
                                 headers={"Content-Encoding": "identity", "Content-Type": "application/json"})
    assert status == 200


async def test_repository_index_with_no_content_length(srv):
    """curl -X POST sends no Content-Length and no body (tritonclient sends Content-Length: 0)."""
    status, _, answer = await raw_exchange(srv.hostport, post_head("/v2/repository/index", None))
    assert status == 200, answer
    index = json.loads(answer)
    assert {"name": "tiny", "version": "1"}.items() <= next(m for m in index if m["name"] == "tiny").items()


async def test_short_timeout_parameter_is_504_with_a_message(tmp_path):
    """A request whose ``timeout`` passes while it waits in the queue is answered 504, not 500:
    "held" keeps its queue for max_queue_delay_ms (a batch of 8 never fills here)."""
    held = {"name": "held", "source": "zoo:tiny-mlp", "max_batch_size": 8, "max_queue_delay_ms": 1000,
            "warmup": 0}
    with ServerThread(tmp_path, models=[held]) as s:
        await request("POST", s.url + "/api/models/held/load")
        body = {**tiny_json(), "parameters": {"timeout": 1000}}  # microseconds: 1 ms
        status, _, answer = await request("POST", s.url + "/v2/models/held/infer", json=body)
        assert status == 504, answer
        assert "model held: request timed out after waiting" in json.loads(answer)["error"]
        status, _, answer = await request("POST", s.url + "/v2/models/held/infer", json=tiny_json())
        assert status == 200, answer  # without the short timeout it waits out the delay and is served


async def test_truncated_body_does_not_hang_the_server(srv):
    host, port = srv.hostport.split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    body = json.dumps(tiny_json()).encode()
    writer.write(b"POST /v2/models/tiny/infer HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
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


async def test_v1_models_in_openais_shape_and_one_model_by_id(srv):
    import time

    status, _, body = await request("GET", srv.url + "/v1/models?q=tiny")
    listed = next(m for m in json.loads(body)["data"] if m["id"] == "tiny")
    assert listed["owned_by"] == "modelconsole"
    assert 0 < listed["created"] <= time.time()
    status, _, body = await request("GET", srv.url + "/v1/models/tiny")
    assert status == 200
    one = json.loads(body)
    assert one["id"] == "tiny" and one["object"] == "model" and one["created"] == listed["created"]
    status, _, body = await request("GET", srv.url + "/v1/models/nope")
    assert status == 404 and json.loads(body)["error"] == "unknown model 'nope'"


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
    actions = [(e["action"], e["result"]) for e in json.loads(body)["entries"]]
    assert actions[::-1] == [("register", "ok"), ("load", "ok"), ("pin", "ok"), ("evict", "error"),
                             ("unpin", "ok"), ("priority", "ok"), ("evict", "ok")]  # the refusal too
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
    ("POST", "/api/models", {"name": "tiny", "version": "1", "source": "zoo:tiny-mlp"}, 409, "already registered"),
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

RECORD = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} (DEBUG|INFO|WARNING|ERROR|CRITICAL) +[\w.]+: ")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "MODELCONSOLE_TOKEN"}
    env.update(extra)
    return env


def _http(method: str, url: str, body: dict | None = None, token: str | None = None,
          timeout: float = 60) -> tuple[int, bytes]:
    """A blocking request (for threads and subprocess tests): status and body, errors included."""
    headers = {"Content-Type": "application/json"} if body is not None else {}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    data = json.dumps(body).encode() if body is not None else (b"" if method == "POST" else None)
    req = urllib.request.Request(url, data=data, method=method, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


class Serve:
    """``modelconsole --serve`` in a subprocess on a free loopback port; stderr goes to a file."""

    def __init__(self, tmp_path: Path, config: str, env: dict[str, str] | None = None):
        cfg = tmp_path / "mc.toml"
        cfg.write_text(config)
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = tmp_path / "stderr.log"
        with open(self.log_path, "w") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "modelconsole.console", "--serve", "--config", str(cfg),
                 "--port", str(self.port), "--store", str(tmp_path / "s.db")],
                stderr=log, env=env or _env())

    def wait_ready(self) -> Serve:
        deadline = time.monotonic() + 60
        while True:
            try:
                with urllib.request.urlopen(self.url + "/v2/health/ready", timeout=2) as r:
                    if r.status == 200:
                        return self
            except OSError:
                if time.monotonic() > deadline or self.proc.poll() is not None:
                    raise AssertionError("server did not come up: " + self.stderr()) from None
                time.sleep(0.2)

    @property
    def token(self) -> str | None:
        """The control token the server made at start (beside its store), if it made one."""
        return read_token(self.log_path.parent, self.port)

    def stop(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(60)

    def stderr(self) -> str:
        return self.log_path.read_text()

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


@contextlib.contextmanager
def serving(tmp_path: Path, config: str, env: dict[str, str] | None = None):
    s = Serve(tmp_path, config, env)
    try:
        yield s.wait_ready()
    finally:
        s.kill()


def assert_one_line_records(stderr: str) -> list[str]:
    """Every line of the log is a whole record (no traceback or message continues on the next)."""
    lines = stderr.splitlines()
    assert lines
    strays = [line for line in lines if not RECORD.match(line)]
    assert not strays, "lines that are not records:\n" + "\n".join(strays[:20])
    return lines


TINY = '[[models]]\nname = "tiny"\nsource = "zoo:tiny-mlp"\n'


def test_serve_refuses_a_public_bind_without_a_token(tmp_path):
    p = subprocess.run([sys.executable, "-m", "modelconsole.console", "--serve", "--host", "0.0.0.0",
                        "--store", str(tmp_path / "s.db")], capture_output=True, text=True, timeout=60, env=_env())
    assert p.returncode == 2
    assert "refusing to bind '0.0.0.0' without a token" in p.stderr
    assert not (tmp_path / "s.db").exists()


def test_serve_refuses_infer_requires_token_without_a_token(tmp_path):
    cfg = tmp_path / "mc.toml"
    cfg.write_text(TINY + "[server]\ninfer_requires_token = true\n")
    p = subprocess.run([sys.executable, "-m", "modelconsole.console", "--serve", "--config", str(cfg),
                        "--port", "0", "--store", str(tmp_path / "s.db"), "--no-token"],
                       capture_output=True, text=True, timeout=60, env=_env())
    assert p.returncode == 2, p.stderr
    assert "[server] infer_requires_token = true, but no token is set" in p.stderr
    assert "--token" in p.stderr and "MODELCONSOLE_TOKEN" in p.stderr
    assert not (tmp_path / "s.db").exists()
    with pytest.raises(ValueError, match="infer_requires_token needs a token"):
        ServerSettings(infer_requires_token=True)


def test_serve_takes_the_token_from_MODELCONSOLE_TOKEN(tmp_path):
    """On loopback too: with the variable set, /api/ and (infer_requires_token) infer need the bearer."""
    with serving(tmp_path, TINY + "[server]\ninfer_requires_token = true\n", _env(MODELCONSOLE_TOKEN=TOKEN)) as s:
        assert _http("GET", s.url + "/api/snapshot")[0] == 401
        assert _http("GET", s.url + "/api/snapshot", token="wrong")[0] == 403
        assert _http("GET", s.url + "/api/snapshot", token=TOKEN)[0] == 200
        assert _http("POST", s.url + "/v2/models/tiny/infer", tiny_json())[0] == 401
        status, body = _http("POST", s.url + "/v2/models/tiny/infer", tiny_json(), token=TOKEN)
        assert status == 200, body
        assert s.stop() == 0
        assert "token required for /api/ and /v2/repository" in s.stderr()


def test_serve_answers_then_drains_on_sigterm(tmp_path):
    with serving(tmp_path, TINY) as s:
        status, body = _http("POST", s.url + "/v2/models/tiny/infer", tiny_json(), timeout=30)
        assert status == 200 and json.loads(body)["model_version"] == "1"
        assert s.stop() == 0
        err = s.stderr()
        assert f"listening on http://127.0.0.1:{s.port}" in err
        assert "SIGTERM: shutting down" in err and "stopped" in err
        assert "loaded" in err  # engine events reach the log
        assert_one_line_records(err)


def _pending(url: str, model: str, token: str | None) -> int:
    status, body = _http("GET", url + "/api/models", token=token)
    assert status == 200
    snap = next(m for m in json.loads(body)["models"] if m["name"] == model)
    return snap["queue"] + snap["in_flight"]


def _refused_while(port: int, busy) -> bool:
    """Connect until the server refuses; whether it refused while ``busy()`` still held."""
    while busy():
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=2):
                pass
        except ConnectionRefusedError:
            return busy()
        time.sleep(0.02)
    return False


def test_serve_drains_queued_requests_on_sigterm_and_refuses_new_connections(tmp_path):
    """SIGTERM while requests wait in the queue: every one is answered 200, the listener closes
    at once (new connections are refused while they drain), the process exits 0.  "held" keeps
    requests queued for max_queue_delay_ms (its batch of 16 never fills), so they are surely
    still pending when the signal lands."""
    n = 6
    config = ('[[models]]\nname = "held"\nsource = "zoo:tiny-mlp"\nmax_batch_size = 16\n'
              "max_queue_delay_ms = 3000\nwarmup = 0\n")
    with serving(tmp_path, config) as s:
        assert _http("POST", s.url + "/api/models/held/load", {}, token=s.token)[0] == 200
        answers: list[tuple[int, bytes] | None] = [None] * n

        def client(i: int) -> None:
            answers[i] = _http("POST", s.url + "/v2/models/held/infer", tiny_json(value=i / n))

        threads = [threading.Thread(target=client, args=(i,)) for i in range(n)]
        for t in threads:
            t.start()
        deadline = time.monotonic() + 30
        while _pending(s.url, "held", s.token) < n:
            assert time.monotonic() < deadline, "the requests never all reached the queue"
            time.sleep(0.02)
        s.proc.send_signal(signal.SIGTERM)
        refused = _refused_while(s.port, lambda: any(t.is_alive() for t in threads))
        for t in threads:
            t.join(60)
        assert [a[0] if a else None for a in answers] == [200] * n, answers
        assert all(json.loads(a[1])["outputs"][0]["shape"] == [1, 10] for a in answers if a)
        assert s.proc.wait(60) == 0
        assert refused, "a new connection was accepted after SIGTERM while requests were draining"
        assert "SIGTERM: shutting down" in s.stderr()


def test_serve_logs_a_request_it_cannot_parse_on_one_line_without_its_bytes(tmp_path):
    """A request aiohttp's parser refuses: one INFO line naming the kind of mistake, no traceback
    (aiohttp's own carries the request's bytes, an Authorization header among them)."""
    with serving(tmp_path, TINY) as s:
        status, _, body = asyncio.run(raw_exchange(f"127.0.0.1:{s.port}", post_head(
            "/v2/repository/index", None, Content_Length="abc", Authorization="Bearer SECRET-abc")))
        assert status == 400 and b"malformed HTTP request" in body and b"SECRET" not in body
        assert s.stop() == 0
        lines = assert_one_line_records(s.stderr())
    refused = [line for line in lines if "refused a malformed request" in line]
    assert len(refused) == 1, lines
    assert "Traceback" not in refused[0] and "SECRET" not in "\n".join(lines)


def _raise_from_deep(message: str) -> None:
    def inner() -> None:
        raise ValueError(message)

    try:
        inner()
    except ValueError as e:
        raise RuntimeError("while serving") from e


def test_one_line_formatter_folds_exceptions_and_newlines():
    """What ``log.exception`` in the guard's catch-all prints under --serve: one line, the
    innermost frame of the exception and of its cause."""
    try:
        _raise_from_deep("bad\nvalue")
    except RuntimeError as e:
        record = logging.LogRecord("modelconsole.server", logging.ERROR, __file__, 1, "unhandled error in %s\n%s",
                                   ("POST", "/v2/x"), sys.exc_info())
        raised_at = traceback.extract_tb(e.__traceback__)[-1].lineno
        cause_at = traceback.extract_tb(e.__cause__.__traceback__)[-1].lineno
    line = OneLineFormatter().format(record)
    assert "\n" not in line
    assert RECORD.match(line), line
    assert line.endswith(f"modelconsole.server: unhandled error in POST /v2/x | RuntimeError: while serving "
                         f"(at test_server.py:{raised_at} in _raise_from_deep); caused by ValueError: bad value "
                         f"(at test_server.py:{cause_at} in inner)"), line
    assert record.exc_text is None  # other handlers still format the traceback their way
    every = OneLineFormatter(every_frame=True).format(record)  # --log-level DEBUG: every frame, innermost first
    assert "\n" not in every
    assert f"(at test_server.py:{cause_at} in inner < test_server.py:" in every
    assert describe_exception(ValueError("plain")) == "ValueError: plain"  # never raised: no frame
