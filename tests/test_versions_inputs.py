"""Versions of one name with different inputs: a request without a version is decoded and
validated against the version that serves it, not the one the handler would have looked up first.
Over HTTP on a real server, and in-process for ``Engine.infer``'s inputs-as-a-function contract.

v1 is ``zoo:tiny-mlp`` (input ``input``, FP32 [-1, 64]); v2 is a small ``zoo:encoder`` (input
``input_ids``, INT64 [-1, 8]).  The raw binary form (``Inference-Header-Content-Length: 0``) names
no tensor: its body is the serving version's one input, so it is where decoding against the wrong
version shows (a 256-byte FP32 body is 32 INT64 elements, not v2's 8).
"""

from __future__ import annotations

import asyncio
import json
import threading
from typing import Any

import aiohttp
import numpy as np
import pytest
from serverutil import ServerThread

from modelconsole.scheduler import routing
from modelconsole.scheduler.engine import Engine
from modelconsole.server import codec
from modelconsole.server.web import LINK

SEQ = 8
ENCODER = {"layers": 1, "d_model": 16, "heads": 2, "seq": SEQ, "vocab": 100}


def _mixed(name: str) -> list[dict[str, Any]]:
    return [
        {"name": name, "version": "1", "source": "zoo:tiny-mlp", "max_queue_delay_ms": 0},
        {"name": name, "version": "2", "source": "zoo:encoder", "args": ENCODER, "max_queue_delay_ms": 0},
    ]


MODELS = [*_mixed("swapped"), *_mixed("midbody"), *_mixed("split")]


@pytest.fixture(scope="module")
def srv(tmp_path_factory):
    with ServerThread(tmp_path_factory.mktemp("versions_inputs"), models=MODELS) as s:
        yield s


V1_RAW = np.full(64, 0.25, dtype="<f4").tobytes()  # v1's one input, [1, 64] FP32
V2_RAW = np.arange(SEQ, dtype="<i8").tobytes()  # v2's one input, [1, 8] INT64
V1_JSON = {"inputs": [{"name": "input", "shape": [1, 64], "datatype": "FP32", "data": [0.25] * 64}]}
V2_JSON = {"inputs": [{"name": "input_ids", "shape": [1, SEQ], "datatype": "INT64", "data": list(range(SEQ))}]}


async def raw_infer(s: aiohttp.ClientSession, srv: ServerThread, name: str, body: bytes,
                    version: str | None = None, key: str | None = None) -> tuple[int, dict[str, Any], bytes]:
    """One raw-binary infer: (status, JSON header of the answer or the error body, binary tail)."""
    path = f"/v2/models/{name}/versions/{version}/infer" if version else f"/v2/models/{name}/infer"
    headers = {"Inference-Header-Content-Length": "0", "Content-Type": "application/octet-stream"}
    if key is not None:
        headers["X-Routing-Key"] = key
    async with s.post(srv.url + path, data=body, headers=headers) as r:
        raw = await r.read()
        hl = r.headers.get("Inference-Header-Content-Length")
        if hl is None:
            return r.status, json.loads(raw), b""
        return r.status, json.loads(raw[:int(hl)]), raw[int(hl):]


async def json_infer(s: aiohttp.ClientSession, srv: ServerThread, name: str,
                     body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
    async with s.post(f"{srv.url}/v2/models/{name}/infer", json=body) as r:
        return r.status, await r.json()


async def swap(s: aiohttp.ClientSession, srv: ServerThread, name: str, version: str) -> None:
    async with s.post(f"{srv.url}/api/models/{name}/swap", json={"version": version}) as r:
        assert r.status == 200, await r.text()


def check_v2_answer(status: int, head: dict[str, Any], tail: bytes) -> None:
    assert status == 200, head
    assert head["model_version"] == "2"
    out = head["outputs"][0]
    assert out["name"] == "embedding" and out["shape"] == [1, ENCODER["d_model"]] and out["datatype"] == "FP32"
    assert len(tail) == 4 * ENCODER["d_model"]


async def test_unversioned_request_after_a_swap_is_decoded_against_v2(srv):
    async with aiohttp.ClientSession() as s:
        status, head, tail = await raw_infer(s, srv, "swapped", V1_RAW)
        assert status == 200 and head["model_version"] == "1" and head["outputs"][0]["name"] == "logits"
        status, head, _ = await raw_infer(s, srv, "swapped", V2_RAW)  # v2's body while v1 is active
        assert status == 400 and "'input'" in head["error"], head

        await swap(s, srv, "swapped", "2")

        check_v2_answer(*await raw_infer(s, srv, "swapped", V2_RAW))
        status, head, _ = await raw_infer(s, srv, "swapped", V1_RAW)  # v1's body: not v2's shape
        assert status == 400, head
        assert "raw input 'input_ids'" in head["error"] and "32 INT64 elements" in head["error"], head
        status, body = await json_infer(s, srv, "swapped", V2_JSON)
        assert status == 200 and body["model_version"] == "2" and body["outputs"][0]["name"] == "embedding"
        status, body = await json_infer(s, srv, "swapped", V1_JSON)
        assert status == 400 and body["error"] == "missing input 'input_ids' (expected inputs: input_ids)", body
        # an explicit version still gets that version's decoding (v1 loads again on demand)
        status, head, _ = await raw_infer(s, srv, "swapped", V1_RAW, version="1")
        assert status == 200 and head["model_version"] == "1"


async def test_a_body_still_arriving_when_the_swap_switches_is_decoded_against_v2(srv):
    """The handler looks the model up before it reads the body; the swap switches while the body
    is still on the wire: the body is decoded against the version that serves it, v2."""
    host, port = srv.url.removeprefix("http://").split(":")
    link = srv.server.app[LINK]
    checked = threading.Event()  # the handler looked the model up: next it reads the body
    looked_up = link.check

    async def check(name: str, version: str | None) -> Any:
        found = await looked_up(name, version)
        checked.set()
        return found

    async with aiohttp.ClientSession() as s:
        status, head, _ = await raw_infer(s, srv, "midbody", V1_RAW)
        assert status == 200 and head["model_version"] == "1"
        reader, writer = await asyncio.open_connection(host, int(port))
        link.check = check  # this server's own link, watched: it answers as before
        try:
            writer.write(b"POST /v2/models/midbody/infer HTTP/1.1\r\nHost: %s\r\n"
                         b"Inference-Header-Content-Length: 0\r\nContent-Length: %d\r\n\r\n"
                         % (host.encode(), len(V2_RAW)) + V2_RAW[:3])
            await writer.drain()
            # the handler has looked v1 up and waits for the rest of the body (it runs on, without
            # yielding, from the lookup to the body's read: the swap below is answered after that)
            assert await asyncio.to_thread(checked.wait, 30)
            await swap(s, srv, "midbody", "2")
            writer.write(V2_RAW[3:])
            await writer.drain()
            head = (await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 30)).decode()
            lines = head.split("\r\n")
            headers = {k.strip().lower(): v.strip() for k, v in (ln.split(":", 1) for ln in lines[1:] if ":" in ln)}
            body = await reader.readexactly(int(headers["content-length"]))
        finally:
            link.check = looked_up
            writer.close()
    status = int(lines[0].split()[1])
    hl = headers.get("inference-header-content-length")
    assert hl is not None, f"{lines[0]}: {body.decode(errors='replace')}"
    check_v2_answer(status, json.loads(body[:int(hl)]), body[int(hl):])


async def test_each_split_arm_decodes_a_raw_body_against_its_own_inputs(srv):
    """A 50/50 split between two versions whose inputs differ: a routing key sticks to one arm, and
    the body that arm expects is accepted, whichever version is active."""
    weights = {"1": 50, "2": 50}
    async with aiohttp.ClientSession() as s:
        async with s.put(f"{srv.url}/api/models/split/split", json={"weights": weights}) as r:
            assert r.status == 200, await r.text()
        table = routing.Table(weights)
        arms = {f"client-{i}": table.choose(routing.sticky_u("split", f"client-{i}")) for i in range(24)}
        assert set(arms.values()) == {"1", "2"}  # both arms are exercised
        for key, arm in arms.items():
            status, head, tail = await raw_infer(s, srv, "split", V1_RAW if arm == "1" else V2_RAW, key=key)
            if arm == "2":
                check_v2_answer(status, head, tail)
            else:
                assert status == 200 and head["model_version"] == "1", head
                assert head["outputs"][0]["name"] == "logits" and len(tail) == 4 * 10  # ten FP32 logits
        # the other arm's body, sent with the same key: refused with that arm's input named
        key2 = next(k for k, a in arms.items() if a == "2")
        status, head, _ = await raw_infer(s, srv, "split", V1_RAW, key=key2)
        assert status == 400 and "raw input 'input_ids'" in head["error"], head
        status, routed = await _routing(s, srv, "split")
        assert routed["arms"]["2"]["errors"] == 1 and routed["arms"]["1"]["errors"] == 0


async def _routing(s: aiohttp.ClientSession, srv: ServerThread, name: str) -> tuple[int, dict[str, Any]]:
    async with s.get(f"{srv.url}/api/models/{name}/routing") as r:
        return r.status, await r.json()


async def test_inputs_given_as_a_function_are_made_for_the_version_that_serves(tmp_path):
    """In-process: a function of the serving instance is called for the routed arm once it is
    loaded (a lazy load first), and once more for each shadow copy, with the shadow's instance."""
    calls: list[tuple[str, str]] = []

    def raw(body: bytes):
        def decode(inst):
            calls.append((inst.version, inst.state))
            return codec.decode_raw(body, inst.inputs, inst.cfg.max_batch_size).inputs
        return decode

    async with Engine(base_dir=str(tmp_path), default_device="cpu") as engine:
        for cfg in _mixed("fn"):
            await engine.register(cfg)
        result = await engine.infer("fn", raw(V1_RAW))  # v1 is active and not loaded yet
        assert result.version == "1" and calls == [("1", "READY")]
        await engine.set_split("fn", {"1": 100}, shadow=["2"])
        calls.clear()
        result = await engine.infer("fn", raw(V1_RAW))
        assert result.version == "1" and list(result.outputs) == ["logits"]
        for _ in range(200):  # the shadow copy runs on its own (and loads v2 first)
            if len(calls) == 2:
                break
            await asyncio.sleep(0.02)
        assert sorted(calls) == [("1", "READY"), ("2", "READY")]
        arms = engine.routing("fn")["arms"]
        # v1's body does not fit v2's input: the shadow's error is counted on its arm, never returned
        assert arms["2"]["errors"] == 1 and arms["1"]["errors"] == 0
