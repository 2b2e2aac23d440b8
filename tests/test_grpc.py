"""The unmodified ``tritonclient[grpc]`` (sync and aio) against KServe V2 over gRPC.

The same kind of suite ``test_tritonclient.py`` runs over HTTP, against one
process (gRPC on the engine's loop) and against two front-end processes
(``--workers 2``, both listening on the gRPC port).  Errors must carry the
gRPC status the HTTP status maps to, with the same message.
"""

from __future__ import annotations

import threading
from pathlib import Path

import grpc
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.grpc.aio as aioclient
from google.protobuf import descriptor_pb2
from serverutil import DATATYPES, ServerThread, echo_model
from test_tritonclient import Blocking, assert_echoed, sample
from tritonclient.utils import InferenceServerException

from modelconsole.server import grpc_v2
from modelconsole.server.web import ServerSettings

TOKEN = "grpc-test-token"
ROOT = Path(__file__).resolve().parent.parent


def models() -> list[dict]:
    return [
        {"name": "tiny", "source": "zoo:tiny-mlp", "max_queue_delay_ms": 1},
        {"name": "limited", "source": "zoo:tiny-mlp", "rate_limit": {"rps": 0.01, "burst": 1}},
        *[echo_model(dt) for dt in DATATYPES],
    ]


@pytest.fixture(scope="module", params=[0, 2], ids=["one-process", "2-front-ends"])
def srv(request, tmp_path_factory):
    settings = ServerSettings(port=0, token=TOKEN)
    with ServerThread(tmp_path_factory.mktemp("grpc"), models(), settings=settings, workers=request.param,
                      grpc_port=0) as s:
        yield s


@pytest.fixture(params=["sync", "aio"])
async def triton(request, srv):
    if request.param == "sync":
        c = grpcclient.InferenceServerClient(url=srv.grpc_hostport)
        yield Blocking(c)
        c.close()
    else:
        async with aioclient.InferenceServerClient(url=srv.grpc_hostport) as c:
            yield c


AUTH = {"authorization": f"Bearer {TOKEN}"}


def tiny_input(batch: int = 1) -> grpcclient.InferInput:
    x = grpcclient.InferInput("input", [batch, 64], "FP32")
    x.set_data_from_numpy(np.random.default_rng(batch).random((batch, 64), dtype=np.float32))
    return x


def test_the_shipped_descriptor_is_the_proto_compiled():
    from grpc_tools import protoc

    out = ROOT / "build" / "kserve_v2.desc"
    out.parent.mkdir(exist_ok=True)
    assert protoc.main(["protoc", f"-I{ROOT / 'server/protos'}", f"--descriptor_set_out={out}",
                        str(ROOT / "server/protos/kserve_v2.proto")]) == 0
    fresh = descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes())
    shipped = descriptor_pb2.FileDescriptorSet.FromString((ROOT / "server/protos/kserve_v2.desc").read_bytes())
    assert fresh == shipped, "regenerate server/protos/kserve_v2.desc (command in the .proto)"


def test_field_numbers_are_tritonclients():
    """Every field we declare has the number and type tritonclient's generated classes use."""
    from tritonclient.grpc import model_config_pb2, service_pb2

    theirs = {**service_pb2.DESCRIPTOR.message_types_by_name, **model_config_pb2.DESCRIPTOR.message_types_by_name}

    def check(ours, their):
        for f in ours.fields:
            t = their.fields_by_name[f.name]
            assert (f.number, f.type) == (t.number, t.type), f"{ours.full_name}.{f.name}"
        for nested in ours.nested_types:
            if not nested.GetOptions().map_entry:
                check(nested, their.nested_types_by_name[nested.name])

    for name, cls in grpc_v2.M.items():
        check(cls.DESCRIPTOR, theirs[name])


async def test_health_and_metadata(triton):
    assert await triton.is_server_live() and await triton.is_server_ready()
    meta = await triton.get_server_metadata()
    assert meta.name == "modelconsole" and "model_repository" in meta.extensions
    m = await triton.get_model_metadata("tiny")
    assert m.name == "tiny" and list(m.versions) == ["1"]
    assert [(t.name, t.datatype, list(t.shape)) for t in m.inputs] == [("input", "FP32", [-1, 64])]
    assert await triton.is_model_ready("tiny", "1") in (True, False)


async def test_model_config(triton):
    cfg = (await triton.get_model_config("tiny")).config
    assert cfg.name == "tiny" and cfg.max_batch_size > 0
    assert [(i.name, list(i.dims)) for i in cfg.input] == [("input", [64])]
    assert cfg.input[0].data_type == grpcclient.model_config_pb2.TYPE_FP32
    assert cfg.dynamic_batching.default_queue_policy.max_queue_size > 0
    assert cfg.instance_group[0].count == 1


async def test_infer_matches_http(triton, srv):
    import tritonclient.http as httpclient

    x = np.random.default_rng(0).random((4, 64), dtype=np.float32)
    gi = grpcclient.InferInput("input", [4, 64], "FP32")
    gi.set_data_from_numpy(x)
    got = await triton.infer("tiny", [gi], request_id="r-7")
    assert got.get_response().id == "r-7" and got.get_response().model_version == "1"
    h = httpclient.InferenceServerClient(srv.hostport)
    hi = httpclient.InferInput("input", [4, 64], "FP32")
    hi.set_data_from_numpy(x)
    want = h.infer("tiny", [hi]).as_numpy("logits")
    np.testing.assert_array_equal(got.as_numpy("logits"), want)


@pytest.mark.parametrize("datatype", DATATYPES)
async def test_every_datatype_round_trips(triton, datatype):
    if datatype == "BF16":
        pytest.skip("tritonclient.grpc's InferInput refuses BF16 numpy arrays (its own check)")
    data = sample(datatype)
    x = grpcclient.InferInput("x", list(data.shape), datatype)
    x.set_data_from_numpy(data)
    r = await triton.infer(f"echo_{datatype.lower()}", [x])
    assert_echoed(r.as_numpy("y"), data, datatype)


async def test_requested_outputs_priority_and_timeout(triton):
    r = await triton.infer("tiny", [tiny_input()], model_version="1", priority=1, timeout=5_000_000,
                           outputs=[grpcclient.InferRequestedOutput("logits")])
    assert r.as_numpy("logits").shape == (1, 10)
    with pytest.raises(InferenceServerException) as e:
        await triton.infer("tiny", [tiny_input()], priority=9)
    assert e.value.status() == "StatusCode.INVALID_ARGUMENT" and "priority" in e.value.message()


async def test_statistics(triton):
    before = (await triton.get_inference_statistics("tiny")).model_stats[0].inference_stats.success.count
    for _ in range(3):
        await triton.infer("tiny", [tiny_input()])
    stats = (await triton.get_inference_statistics("tiny")).model_stats
    assert len(stats) == 1 and stats[0].name == "tiny" and stats[0].version == "1"
    assert stats[0].inference_stats.success.count == before + 3
    every = (await triton.get_inference_statistics()).model_stats
    assert {"tiny", "echo_fp32"} <= {s.name for s in every}


async def test_repository_needs_the_token(triton):
    with pytest.raises(InferenceServerException) as e:
        await triton.get_model_repository_index()
    assert e.value.status() == "StatusCode.UNAUTHENTICATED"
    with pytest.raises(InferenceServerException) as e:
        await triton.load_model("echo_int8", headers={"authorization": "Bearer wrong"})
    assert e.value.status() == "StatusCode.PERMISSION_DENIED"
    await triton.load_model("echo_int8", headers=AUTH)
    assert await triton.is_model_ready("echo_int8")
    index = {m.name: m.state for m in (await triton.get_model_repository_index(headers=AUTH)).models}
    assert index["echo_int8"] == "READY"
    await triton.unload_model("echo_int8", headers=AUTH)
    assert not await triton.is_model_ready("echo_int8")
    with pytest.raises(InferenceServerException) as e:
        await triton.load_model("nope", headers=AUTH)
    assert e.value.status() == "StatusCode.NOT_FOUND" and "unknown model 'nope'" in e.value.message()


def error_cases() -> list[tuple[str, tuple, dict, str, str]]:
    wrong = grpcclient.InferInput("input", [1, 32], "FP32")
    wrong.set_data_from_numpy(np.zeros((1, 32), np.float32))
    wrong_type = grpcclient.InferInput("input", [1, 64], "FP64")
    wrong_type.set_data_from_numpy(np.zeros((1, 64), np.float64))
    ok = [tiny_input()]
    return [
        ("infer", ("nope", ok), {}, "NOT_FOUND", "unknown model 'nope'"),
        ("infer", ("tiny", ok), {"model_version": "3"}, "NOT_FOUND", "no version '3'"),
        ("infer", ("tiny", ok), {"model_version": "x"}, "INVALID_ARGUMENT", "model_version: expected a number"),
        ("get_model_metadata", ("nope",), {}, "NOT_FOUND", "unknown model 'nope'"),
        ("get_model_config", ("nope",), {}, "NOT_FOUND", "unknown model 'nope'"),
        ("get_inference_statistics", ("nope",), {}, "NOT_FOUND", "unknown model 'nope'"),
        ("infer", ("tiny", [wrong]), {}, "INVALID_ARGUMENT", "expected shape [-1, 64]"),
        ("infer", ("tiny", [wrong_type]), {}, "INVALID_ARGUMENT", "expected datatype FP32"),
        ("infer", ("tiny", ok), {"outputs": [grpcclient.InferRequestedOutput("nope")]}, "INVALID_ARGUMENT",
         "unknown output 'nope'"),
    ]


@pytest.mark.parametrize("case", range(len(error_cases())),
                         ids=[f"{m}-{status}" for m, _, _, status, _ in error_cases()])
async def test_errors_carry_grpc_statuses(triton, case):
    method, args, kwargs, status, needle = error_cases()[case]
    with pytest.raises(InferenceServerException) as e:
        await getattr(triton, method)(*args, **kwargs)
    assert e.value.status() == f"StatusCode.{status}", e.value
    assert needle in e.value.message()
    assert (await triton.infer("tiny", [tiny_input()])).as_numpy("logits").shape == (1, 10)  # still serving


def test_rate_limited_is_resource_exhausted_with_retry_after(srv):
    channel = grpc.insecure_channel(srv.grpc_hostport)
    infer = channel.unary_unary("/inference.GRPCInferenceService/ModelInfer",
                                request_serializer=grpc_v2.M["ModelInferRequest"].SerializeToString,
                                response_deserializer=grpc_v2.M["ModelInferResponse"].FromString)
    req = typed_request("limited", "input", "FP32", [1, 64], fp32_contents=[0.5] * 64)
    codes = []
    for _ in range(3):
        try:
            infer(req)
            codes.append("OK")
        except grpc.RpcError as e:
            codes.append(e.code().name)
            retry = dict(e.trailing_metadata() or ()).get("retry-after")
    assert codes[0] == "OK" and "RESOURCE_EXHAUSTED" in codes[1:], codes
    assert retry is not None and int(retry) >= 1
    channel.close()


def typed_request(model: str, name: str, datatype: str, shape: list[int], **contents) -> object:
    req = grpc_v2.M["ModelInferRequest"](model_name=model)
    t = req.inputs.add(name=name, datatype=datatype, shape=shape)
    for field, values in contents.items():
        getattr(t.contents, field).extend(values)
    return req


def test_typed_contents_and_their_errors(srv):
    """Clients other than tritonclient send tensors in the typed ``contents`` fields."""
    channel = grpc.insecure_channel(srv.grpc_hostport)
    infer = channel.unary_unary("/inference.GRPCInferenceService/ModelInfer",
                                request_serializer=grpc_v2.M["ModelInferRequest"].SerializeToString,
                                response_deserializer=grpc_v2.M["ModelInferResponse"].FromString)
    r = infer(typed_request("echo_int32", "x", "INT32", [2, 3], int_contents=[1, 2, 3, 4, 5, -6]))
    out = np.frombuffer(r.raw_output_contents[0], dtype="<i4").reshape(list(r.outputs[0].shape))
    np.testing.assert_array_equal(out, [[1, 2, 3], [4, 5, -6]])
    r = infer(typed_request("echo_bytes", "x", "BYTES", [1, 3], bytes_contents=[b"a", b"", b"\xff"]))
    assert r.outputs[0].datatype == "BYTES" and r.raw_output_contents[0] == b"\1\0\0\0a\0\0\0\0\1\0\0\0\xff"
    bad = [
        (typed_request("echo_int32", "x", "INT32", [2, 3], int_contents=[1, 2]), "int_contents: 2 values"),
        (typed_request("echo_fp16", "x", "FP16", [1, 3]), "must come in raw_input_contents"),
        (typed_request("echo_int8", "x", "INT8", [1, 3], int_contents=[1, 2, 300]), "does not fit INT8"),
    ]
    for req, needle in bad:
        with pytest.raises(grpc.RpcError) as e:
            infer(req)
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and needle in e.value.details()
    raw = grpc_v2.M["ModelInferRequest"](model_name="tiny")
    raw.inputs.add(name="input", datatype="FP32", shape=[1, 64])
    raw.raw_input_contents.append(b"\0" * 10)
    with pytest.raises(grpc.RpcError) as e:
        infer(raw)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "inputs.input" in e.value.details()
    unimplemented = channel.unary_unary("/inference.GRPCInferenceService/SystemSharedMemoryStatus",
                                        request_serializer=lambda b: b, response_deserializer=lambda b: b)
    with pytest.raises(grpc.RpcError) as e:
        unimplemented(b"")
    assert e.value.code() == grpc.StatusCode.UNIMPLEMENTED
    channel.close()


def test_grpc_requests_are_counted_once_by_protocol_and_code(srv):
    """modelconsole_frontend_requests_total{protocol="grpc"} counts each call by its status; the
    JSON a gRPC call asks of the engine's app internally is not counted as an HTTP request."""
    import urllib.request

    from test_workers import frontend_counts

    def counts() -> dict:
        with urllib.request.urlopen(srv.url + "/metrics", timeout=30) as r:
            return frontend_counts(r.read().decode())

    client = grpcclient.InferenceServerClient(url=srv.grpc_hostport)
    before = counts()
    client.get_model_metadata("tiny")
    client.infer("tiny", [tiny_input()])
    with pytest.raises(InferenceServerException):
        client.get_model_metadata("nope")
    after = counts()
    client.close()
    delta = {k: after[k] - before.get(k, 0) for k in after if after[k] != before.get(k, 0)}
    assert delta == {("grpc", "OK"): 2, ("grpc", "NOT_FOUND"): 1, ("http", "200"): 1}, delta  # + the first scrape


def test_stream_infer_answers_each_request_by_id(srv):
    """tritonclient's streaming API: every request answered, a bad one with its error, matched by id."""
    import queue

    got: queue.Queue = queue.Queue()
    client = grpcclient.InferenceServerClient(url=srv.grpc_hostport)
    client.start_stream(callback=lambda result, error: got.put((result, error)))
    wrong = grpcclient.InferInput("input", [1, 32], "FP32")
    wrong.set_data_from_numpy(np.zeros((1, 32), np.float32))
    for k in range(5):
        client.async_stream_infer("tiny", [tiny_input(k + 1)], request_id=f"r{k}")
    client.async_stream_infer("tiny", [wrong], request_id="bad")
    answers = [got.get(timeout=60) for _ in range(6)]
    client.stop_stream()
    client.close()
    ok = {r.get_response().id: r.as_numpy("logits").shape for r, e in answers if e is None}
    errors = [e for r, e in answers if e is not None]
    assert ok == {f"r{k}": (k + 1, 10) for k in range(5)}
    assert len(errors) == 1 and "expected shape [-1, 64]" in errors[0].message()


def test_connections_that_say_nothing_are_closed(tmp_path):
    """The HTTP side's bounds hold for gRPC too: a connection that never sends the HTTP/2 preface
    is closed after head_timeout_s, an idle one after keepalive_timeout_s (the test waits for
    the server to close each socket: recv returns b"")."""
    import socket

    settings = ServerSettings(port=0, head_timeout_s=0.5, keepalive_timeout_s=1.0)
    with ServerThread(tmp_path, [{"name": "tiny", "source": "zoo:tiny-mlp"}], settings=settings,
                      grpc_port=0) as s:
        silent = socket.create_connection(("127.0.0.1", s.server.grpc_port))
        silent.settimeout(60)
        while silent.recv(1024):  # the server's own SETTINGS, then its close (not the test's timeout)
            pass
        silent.close()
        channel = grpc.insecure_channel(s.grpc_hostport)
        grpc.channel_ready_future(channel).result(timeout=60)
        live = channel.unary_unary("/inference.GRPCInferenceService/ServerLive",
                                   request_serializer=grpc_v2.M["ServerLiveRequest"].SerializeToString,
                                   response_deserializer=grpc_v2.M["ServerLiveResponse"].FromString)
        assert live(grpc_v2.M["ServerLiveRequest"]()).live
        # after keepalive_timeout_s idle the server sends GOAWAY: the channel reconnects on the next call
        idle = threading.Event()
        channel.subscribe(lambda state: idle.set() if state == grpc.ChannelConnectivity.IDLE else None)
        assert idle.wait(60), "the idle connection was not closed by the server"
        assert live(grpc_v2.M["ServerLiveRequest"]()).live
        channel.close()
