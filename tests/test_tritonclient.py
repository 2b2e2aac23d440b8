"""The unmodified ``tritonclient[http]`` (sync and aio) against a real server on a loopback port:
one process, and the engine core behind two front-end processes (``--workers 2``).

Every client method the server implements, JSON and binary tensors, every
datatype (through ``zoo:identity`` echo models), compression, request
parameters, and the errors a client sees.  Each test runs twice, through the
``triton`` fixture: once with the sync client (gevent) and once with
``tritonclient.http.aio`` (aiohttp), with the same steps and the same
helpers, so neither client's coverage lags the other's.
"""

from __future__ import annotations

import json

import ml_dtypes
import numpy as np
import pytest
import tritonclient.http as httpclient
import tritonclient.http.aio as aioclient
from serverutil import DATATYPES, ServerThread
from tritonclient.utils import InferenceServerException, np_to_triton_dtype


@pytest.fixture(scope="module", params=[0, 2], ids=["one-process", "2-front-ends"])
def srv(request, tmp_path_factory):
    """The same suite against one process and against two front-end processes (--workers 2)."""
    with ServerThread(tmp_path_factory.mktemp("triton"), workers=request.param) as s:
        yield s


@pytest.fixture(scope="module")
def client(srv):
    c = httpclient.InferenceServerClient(url=srv.hostport, concurrency=4)
    yield c
    c.close()


class Blocking:
    """The sync client behind the aio client's interface (every method awaitable), so each
    test is written once and runs on both.  The sync call blocks the test's loop, which is
    fine: the server runs on its own loop in its own thread."""

    def __init__(self, client: httpclient.InferenceServerClient):
        self._client = client

    def __getattr__(self, name: str):
        method = getattr(self._client, name)

        async def call(*args, **kwargs):
            return method(*args, **kwargs)

        return call


@pytest.fixture(params=["sync", "aio"])
async def triton(request, srv, client):
    if request.param == "sync":
        yield Blocking(client)
    else:
        async with aioclient.InferenceServerClient(url=srv.hostport) as c:
            yield c


def test_both_clients_share_the_tensor_classes():
    """The helpers below build inputs with httpclient's classes for both clients."""
    assert aioclient.InferInput is httpclient.InferInput
    assert aioclient.InferRequestedOutput is httpclient.InferRequestedOutput


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


async def test_health_and_server_metadata(triton):
    assert await triton.is_server_live() and await triton.is_server_ready()
    meta = await triton.get_server_metadata()
    assert meta["name"] == "modelconsole"
    assert {"binary_tensor_data", "model_repository", "statistics"} <= set(meta["extensions"])


async def test_model_metadata_ready_and_config(triton):
    meta = await triton.get_model_metadata("tiny")
    assert meta["name"] == "tiny" and meta["versions"] == ["1"]
    assert meta["inputs"] == [{"name": "input", "datatype": "FP32", "shape": [-1, 64]}]
    assert meta["outputs"] == [{"name": "logits", "datatype": "FP32", "shape": [-1, 10]}]
    assert (await triton.get_model_metadata("tiny", "1"))["name"] == "tiny"
    cfg = await triton.get_model_config("tiny")
    assert cfg["max_batch_size"] == 32
    assert cfg["input"] == [{"name": "input", "data_type": "TYPE_FP32", "dims": [64]}]
    assert cfg["dynamic_batching"]["default_queue_policy"]["max_queue_size"] == 1024
    assert (await triton.get_model_config("tiny", "1"))["name"] == "tiny"
    await triton.load_model("tiny")
    assert await triton.is_model_ready("tiny") and await triton.is_model_ready("tiny", "1")
    assert not await triton.is_model_ready("echo_int16")  # registered, never loaded


# --------------------------------------------------------------------------- infer


@pytest.mark.parametrize("binary_in", [False, True])
@pytest.mark.parametrize("binary_out", [False, True])
async def test_infer_tiny_json_and_binary(triton, binary_in, binary_out):
    out = httpclient.InferRequestedOutput("logits", binary_data=binary_out)
    r = await triton.infer("tiny", [tiny_input(binary_in, batch=3)], outputs=[out], request_id="req-7")
    logits = r.as_numpy("logits")
    assert logits.shape == (3, 10) and logits.dtype == np.float32
    resp = r.get_response()
    assert resp["model_name"] == "tiny" and resp["model_version"] == "1" and resp["id"] == "req-7"
    # the same bits both ways: the same input in the same batch (one request, run alone) gives the
    # same outputs whether it came as JSON or binary (its bytes are placed at a 64-byte boundary
    # before the kernel sees them, so where the decoder left them cannot change the rounding)
    ref = (await triton.infer("tiny", [tiny_input(True, batch=3)])).as_numpy("logits")
    np.testing.assert_array_equal(logits, ref)


def echo_requests(datatype: str, data: np.ndarray) -> list[tuple[httpclient.InferInput, httpclient.InferRequestedOutput]]:
    """The echo model's request in every form the datatype travels: FP16 and BF16 only as binary
    data (the protocol), the rest as JSON and as binary."""
    out = []
    for binary in ((True,) if datatype in ("FP16", "BF16") else (False, True)):
        x = httpclient.InferInput("x", list(data.shape), datatype)
        x.set_data_from_numpy(data, binary_data=binary)
        out.append((x, httpclient.InferRequestedOutput("y", binary_data=binary)))
    return out


def assert_echoed(got: np.ndarray, data: np.ndarray, datatype: str) -> None:
    assert got.shape == data.shape
    if datatype == "BYTES":  # JSON carries strings (the client gives str), binary carries bytes
        assert [v if isinstance(v, bytes) else v.encode() for v in got.ravel()] == list(data.ravel())
    else:
        np.testing.assert_array_equal(got.astype(data.dtype), data)


@pytest.mark.parametrize("datatype", DATATYPES)
async def test_every_datatype_round_trips(triton, datatype):
    data = sample(datatype)
    assert np_to_triton_dtype(data.dtype) == datatype
    for x, out in echo_requests(datatype, data):
        got = (await triton.infer(f"echo_{datatype.lower()}", [x], outputs=[out])).as_numpy("y")
        assert_echoed(got, data, datatype)


async def test_priority_timeout_and_version_in_path(triton):
    r = await triton.infer("tiny", [tiny_input(True)], model_version="1", priority=1, timeout=5_000_000)
    assert r.get_response()["model_version"] == "1"
    with pytest.raises(InferenceServerException) as e:
        await triton.infer("tiny", [tiny_input(True)], priority=9)
    assert e.value.status() == "400" and "priority" in e.value.message()


@pytest.mark.parametrize("algorithm", ["gzip", "deflate"])
async def test_compressed_requests_and_responses(triton, algorithm):
    r = await triton.infer("tiny", [tiny_input(False, batch=8)], request_compression_algorithm=algorithm,
                           response_compression_algorithm=algorithm)
    assert r.as_numpy("logits").shape == (8, 10)


# --------------------------------------------------------------------------- repository and statistics


async def test_repository_index_load_unload(triton):
    # tritonclient posts an empty body with Content-Length: 0 (geventhttpclient adds it); a POST
    # with no Content-Length at all is test_server.py's test_repository_index_with_no_content_length
    index = await triton.get_model_repository_index()
    by_name = {(m["name"], m["version"]): m for m in index}
    assert ("tiny", "1") in by_name and ("echo_bytes", "1") in by_name
    await triton.load_model("echo_int64")
    assert await triton.is_model_ready("echo_int64")
    states = {m["name"]: m["state"] for m in await triton.get_model_repository_index()}
    assert states["echo_int64"] == "READY"
    await triton.unload_model("echo_int64")
    assert not await triton.is_model_ready("echo_int64")
    states = {m["name"]: m["state"] for m in await triton.get_model_repository_index()}
    assert states["echo_int64"] == "UNAVAILABLE"
    with pytest.raises(InferenceServerException) as e:
        await triton.load_model("tiny", config=json.dumps({"max_batch_size": 4}))
    assert e.value.status() == "400" and "parameters.config" in e.value.message()
    with pytest.raises(InferenceServerException) as e:
        await triton.load_model("nope")
    assert e.value.status() == "404" and "unknown model 'nope'" in e.value.message()


async def test_statistics(triton):
    stats = await triton.get_inference_statistics("tiny")
    before = stats["model_stats"][0]["inference_stats"]["success"]["count"]
    for _ in range(3):
        await triton.infer("tiny", [tiny_input(True)])
    stats = (await triton.get_inference_statistics("tiny"))["model_stats"]
    assert len(stats) == 1 and stats[0]["name"] == "tiny" and stats[0]["version"] == "1"
    inf = stats[0]["inference_stats"]
    assert inf["success"]["count"] == before + 3 and inf["success"]["ns"] > 0
    assert inf["compute_infer"]["count"] >= 1 and inf["queue"]["ns"] >= 0
    assert stats[0]["batch_stats"] and stats[0]["last_inference"] > 0
    every = (await triton.get_inference_statistics())["model_stats"]
    assert {"tiny", "echo_fp32"} <= {s["name"] for s in every}
    assert (await triton.get_inference_statistics("tiny", "1"))["model_stats"][0]["version"] == "1"


# --------------------------------------------------------------------------- errors


def error_cases() -> list[tuple[str, tuple, dict, str, str]]:
    """(client method, args, kwargs, status, part of the server's message) for calls the server refuses."""
    wrong = httpclient.InferInput("input", [1, 32], "FP32")
    wrong.set_data_from_numpy(np.zeros((1, 32), np.float32))
    wrong_type = httpclient.InferInput("input", [1, 64], "FP64")
    wrong_type.set_data_from_numpy(np.zeros((1, 64), np.float64))
    unknown = httpclient.InferInput("nope", [1, 64], "FP32")
    unknown.set_data_from_numpy(np.zeros((1, 64), np.float32))
    ok = [tiny_input(True)]
    return [
        ("infer", ("nope", ok), {}, "404", "unknown model 'nope'"),
        ("infer", ("tiny", ok), {"model_version": "3"}, "404", "no version '3'"),
        ("get_model_metadata", ("nope",), {}, "404", "unknown model 'nope'"),
        ("get_model_config", ("nope",), {}, "404", "unknown model 'nope'"),
        ("get_inference_statistics", ("nope",), {}, "404", "unknown model 'nope'"),
        ("infer", ("tiny", [wrong]), {}, "400", "expected shape [-1, 64]"),
        ("infer", ("tiny", [wrong_type]), {}, "400", "expected datatype FP32"),
        ("infer", ("tiny", [unknown]), {}, "400", "input"),
        ("infer", ("tiny", ok), {"outputs": [httpclient.InferRequestedOutput("nope")]}, "400",
         "unknown output 'nope'"),
    ]


@pytest.mark.parametrize("case", range(len(error_cases())),
                         ids=[f"{method}-{status}-{needle}" for method, _, _, status, needle in error_cases()])
async def test_errors_reach_the_client_with_statuses(triton, case):
    method, args, kwargs, status, needle = error_cases()[case]
    with pytest.raises(InferenceServerException) as e:
        await getattr(triton, method)(*args, **kwargs)
    assert e.value.status() == status, e.value
    assert needle in e.value.message()
    assert (await triton.infer("tiny", [tiny_input(True)])).as_numpy("logits").shape == (1, 10)  # still serving
