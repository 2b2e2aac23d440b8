"""The unmodified ``tritonclient[http]`` (sync and aio) against a real server on a loopback port.

Every client method the server implements, JSON and binary tensors, every
datatype (through ``zoo:identity`` echo models), compression, request
parameters, and the errors a client sees.
"""

from __future__ import annotations

import json

import ml_dtypes
import numpy as np
import pytest
import tritonclient.http as httpclient
import tritonclient.http.aio as aioclient
from tritonclient.utils import InferenceServerException, np_to_triton_dtype

from serverutil import DATATYPES, ServerThread


@pytest.fixture(scope="module")
def srv(tmp_path_factory):
    with ServerThread(tmp_path_factory.mktemp("triton")) as s:
        yield s


@pytest.fixture(scope="module")
def client(srv):
    c = httpclient.InferenceServerClient(url=srv.hostport, concurrency=4)
    yield c
    c.close()


def sample(datatype: str, batch: int = 2, width: int = 3) -> np.ndarray:
    rng = np.random.default_rng(7)
    shape = (batch, width)
    if datatype == "BYTES":
        return np.array([f"s{i}-é".encode() for i in range(batch * width)], dtype=np.object_).reshape(shape)
    if datatype == "BOOL":
        return rng.integers(0, 2, shape).astype(bool)
    if datatype == "BF16":
        return rng.standard_normal(shape).astype(ml_dtypes.bfloat16)
    dtype = {"FP16": np.float16, "FP32": np.float32, "FP64": np.float64}.get(datatype)
    if dtype is not None:
        return rng.standard_normal(shape).astype(dtype)
    info = np.iinfo(getattr(np, datatype.lower()))
    return rng.integers(info.min, info.max, shape, dtype=getattr(np, datatype.lower()), endpoint=True)


def tiny_input(binary: bool, batch: int = 1) -> httpclient.InferInput:
    x = httpclient.InferInput("input", [batch, 64], "FP32")
    x.set_data_from_numpy(np.linspace(-1, 1, 64 * batch, dtype=np.float32).reshape(batch, 64), binary_data=binary)
    return x


# --------------------------------------------------------------------------- health, metadata, config


def test_health_and_server_metadata(client):
    assert client.is_server_live() and client.is_server_ready()
    meta = client.get_server_metadata()
    assert meta["name"] == "modelconsole"
    assert {"binary_tensor_data", "model_repository", "statistics"} <= set(meta["extensions"])


def test_model_metadata_ready_and_config(client):
    meta = client.get_model_metadata("tiny")
    assert meta["name"] == "tiny" and meta["versions"] == ["1"]
    assert meta["inputs"] == [{"name": "input", "datatype": "FP32", "shape": [-1, 64]}]
    assert meta["outputs"] == [{"name": "logits", "datatype": "FP32", "shape": [-1, 10]}]
    assert client.get_model_metadata("tiny", "1")["name"] == "tiny"
    cfg = client.get_model_config("tiny")
    assert cfg["max_batch_size"] == 32
    assert cfg["input"] == [{"name": "input", "data_type": "TYPE_FP32", "dims": [64]}]
    assert cfg["dynamic_batching"]["default_queue_policy"]["max_queue_size"] == 1024
    client.load_model("tiny")
    assert client.is_model_ready("tiny") and client.is_model_ready("tiny", "1")
    assert not client.is_model_ready("echo_int16")  # registered, not loaded


# --------------------------------------------------------------------------- infer


@pytest.mark.parametrize("binary_in", [False, True])
@pytest.mark.parametrize("binary_out", [False, True])
def test_infer_tiny_json_and_binary(client, binary_in, binary_out):
    out = httpclient.InferRequestedOutput("logits", binary_data=binary_out)
    r = client.infer("tiny", [tiny_input(binary_in, batch=3)], outputs=[out], request_id="req-7")
    logits = r.as_numpy("logits")
    assert logits.shape == (3, 10) and logits.dtype == np.float32
    resp = r.get_response()
    assert resp["model_name"] == "tiny" and resp["model_version"] == "1" and resp["id"] == "req-7"
    # same answer both ways
    ref = client.infer("tiny", [tiny_input(True, batch=3)]).as_numpy("logits")
    np.testing.assert_allclose(logits, ref, rtol=1e-6)


@pytest.mark.parametrize("datatype", DATATYPES)
def test_every_datatype_round_trips(client, datatype):
    data = sample(datatype)
    assert np_to_triton_dtype(data.dtype) == datatype
    # FP16 and BF16 travel only as binary data (the protocol); the rest both ways
    for binary in ((True,) if datatype in ("FP16", "BF16") else (False, True)):
        x = httpclient.InferInput("x", list(data.shape), datatype)
        x.set_data_from_numpy(data, binary_data=binary)
        out = httpclient.InferRequestedOutput("y", binary_data=binary or datatype in ("FP16", "BF16"))
        got = client.infer(f"echo_{datatype.lower()}", [x], outputs=[out]).as_numpy("y")
        assert got.shape == data.shape
        if datatype == "BYTES":  # JSON carries strings (the client gives str), binary carries bytes
            assert [v if isinstance(v, bytes) else v.encode() for v in got.ravel()] == list(data.ravel())
        else:
            np.testing.assert_array_equal(got.astype(data.dtype), data)


def test_priority_timeout_and_version_in_path(client):
    r = client.infer("tiny", [tiny_input(True)], model_version="1", priority=1, timeout=5_000_000)
    assert r.get_response()["model_version"] == "1"
    with pytest.raises(InferenceServerException) as e:
        client.infer("tiny", [tiny_input(True)], priority=9)
    assert e.value.status() == "400" and "priority" in e.value.message()


@pytest.mark.parametrize("algorithm", ["gzip", "deflate"])
def test_compressed_requests_and_responses(client, algorithm):
    r = client.infer("tiny", [tiny_input(False, batch=8)], request_compression_algorithm=algorithm,
                     response_compression_algorithm=algorithm)
    assert r.as_numpy("logits").shape == (8, 10)


# --------------------------------------------------------------------------- repository and statistics


def test_repository_index_load_unload(client):
    index = client.get_model_repository_index()  # the sync client sends no body, no Content-Length
    by_name = {(m["name"], m["version"]): m for m in index}
    assert ("tiny", "1") in by_name and ("echo_bytes", "1") in by_name
    client.load_model("echo_int64")
    assert client.is_model_ready("echo_int64")
    states = {m["name"]: m["state"] for m in client.get_model_repository_index()}
    assert states["echo_int64"] == "READY"
    client.unload_model("echo_int64")
    assert not client.is_model_ready("echo_int64")
    states = {m["name"]: m["state"] for m in client.get_model_repository_index()}
    assert states["echo_int64"] == "UNAVAILABLE"
    with pytest.raises(InferenceServerException) as e:
        client.load_model("tiny", config=json.dumps({"max_batch_size": 4}))
    assert e.value.status() == "400" and "parameters.config" in e.value.message()
    with pytest.raises(InferenceServerException) as e:
        client.load_model("nope")
    assert e.value.status() == "404"


def test_statistics(client):
    before = client.get_inference_statistics("tiny")["model_stats"][0]["inference_stats"]["success"]["count"]
    for _ in range(3):
        client.infer("tiny", [tiny_input(True)])
    stats = client.get_inference_statistics("tiny")["model_stats"]
    assert len(stats) == 1 and stats[0]["name"] == "tiny" and stats[0]["version"] == "1"
    inf = stats[0]["inference_stats"]
    assert inf["success"]["count"] == before + 3 and inf["success"]["ns"] > 0
    assert inf["compute_infer"]["count"] >= 1 and inf["queue"]["ns"] >= 0
    assert stats[0]["batch_stats"] and stats[0]["last_inference"] > 0
    every = client.get_inference_statistics()["model_stats"]
    assert {"tiny", "echo_fp32"} <= {s["name"] for s in every}
    assert client.get_inference_statistics("tiny", "1")["model_stats"][0]["version"] == "1"


# --------------------------------------------------------------------------- errors


def test_errors_reach_the_client_with_statuses(client):
    cases = [
        (lambda: client.infer("nope", [tiny_input(True)]), "404", "unknown model 'nope'"),
        (lambda: client.infer("tiny", [tiny_input(True)], model_version="3"), "404", "no version '3'"),
        (lambda: client.get_model_metadata("nope"), "404", "unknown model"),
    ]
    wrong = httpclient.InferInput("input", [1, 32], "FP32")
    wrong.set_data_from_numpy(np.zeros((1, 32), np.float32))
    cases.append((lambda: client.infer("tiny", [wrong]), "400", "expected shape [-1, 64]"))
    wrong_type = httpclient.InferInput("input", [1, 64], "FP64")
    wrong_type.set_data_from_numpy(np.zeros((1, 64), np.float64))
    cases.append((lambda: client.infer("tiny", [wrong_type]), "400", "expected datatype FP32"))
    unknown = httpclient.InferInput("nope", [1, 64], "FP32")
    unknown.set_data_from_numpy(np.zeros((1, 64), np.float32))
    cases.append((lambda: client.infer("tiny", [unknown]), "400", "input"))
    bad_out = httpclient.InferRequestedOutput("nope")
    cases.append((lambda: client.infer("tiny", [tiny_input(True)], outputs=[bad_out]), "400", "unknown output 'nope'"))
    for call, status, needle in cases:
        with pytest.raises(InferenceServerException) as e:
            call()
        assert e.value.status() == status, e.value
        assert needle in e.value.message()
    assert client.infer("tiny", [tiny_input(True)]).as_numpy("logits").shape == (1, 10)  # still serving


# --------------------------------------------------------------------------- aio client


async def test_aio_client_end_to_end(srv):
    async with aioclient.InferenceServerClient(url=srv.hostport) as c:
        assert await c.is_server_live() and await c.is_server_ready()
        assert (await c.get_server_metadata())["name"] == "modelconsole"
        assert (await c.get_model_metadata("tiny"))["platform"]
        assert (await c.get_model_config("tiny"))["max_batch_size"] == 32
        for binary in (False, True):
            x = aioclient.InferInput("input", [2, 64], "FP32")
            x.set_data_from_numpy(np.ones((2, 64), np.float32), binary_data=binary)
            out = aioclient.InferRequestedOutput("logits", binary_data=binary)
            r = await c.infer("tiny", [x], outputs=[out])
            assert r.as_numpy("logits").shape == (2, 10)
        data = sample("BYTES")
        x = aioclient.InferInput("x", list(data.shape), "BYTES")
        x.set_data_from_numpy(data)
        got = (await c.infer("echo_bytes", [x])).as_numpy("y")
        assert [v if isinstance(v, bytes) else v.encode() for v in got.ravel()] == list(data.ravel())
        index = await c.get_model_repository_index()
        assert any(m["name"] == "tiny" for m in index)
        await c.load_model("echo_uint32")
        assert await c.is_model_ready("echo_uint32")
        await c.unload_model("echo_uint32")
        assert not await c.is_model_ready("echo_uint32")
        stats = await c.get_inference_statistics("tiny")
        assert stats["model_stats"][0]["inference_stats"]["success"]["count"] >= 2
        with pytest.raises(InferenceServerException) as e:
            await c.infer("nope", [x])
        assert e.value.status() == "404"
