"""server/codec.py against tritonclient's own request builder and response parser."""

from __future__ import annotations

import struct

import ml_dtypes
import numpy as np
import orjson
import pytest
import torch
import tritonclient.http as th
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from modelconsole.scheduler.errors import InputError
from modelconsole.scheduler.tensors import DATATYPES, TensorSpec
from modelconsole.server.codec import (
    DecodeError,
    RequestedOutput,
    V2Request,
    decode_request,
    encode_error,
    encode_response,
)

Client = th.InferenceServerClient
NUMERIC = ["BOOL", "UINT8", "UINT16", "UINT32", "UINT64", "INT8", "INT16", "INT32", "INT64", "FP16", "FP32", "FP64"]


def sample(datatype: str, shape, seed: int = 0) -> np.ndarray:
    """A numpy array tritonclient accepts for datatype (BF16: ml_dtypes.bfloat16)."""
    rng = np.random.default_rng(seed)
    shape = tuple(shape)
    if datatype == "BOOL":
        return rng.integers(0, 2, shape).astype(bool)
    if datatype == "BYTES":
        words = [b"", b"a", "h\u00e9llo".encode(), b"x" * 70, "\u2603".encode()]
        flat = [words[k] for k in rng.integers(0, len(words), int(np.prod(shape, dtype=np.int64)))]
        arr = np.empty(len(flat), dtype=object)
        arr[:] = flat
        return arr.reshape(shape)
    if datatype == "BF16":
        return np.asarray(rng.standard_normal(shape) * 100).astype(ml_dtypes.bfloat16)
    if datatype.startswith("FP"):
        return np.asarray(rng.standard_normal(shape) * 100).astype(np.dtype(datatype.replace("FP", "float")))
    dtype = np.dtype(datatype.lower())
    info = np.iinfo(dtype)
    # the extremes of the type, then random values
    vals = rng.integers(info.min, info.max, int(np.prod(shape, dtype=np.int64)), dtype=dtype, endpoint=True)
    if vals.size >= 2:
        vals[0], vals[1] = info.min, info.max
    return vals.reshape(shape)


def build(arrays: dict, binary=True, outputs=None, **kw):
    """A request body exactly as tritonclient builds it: (body, header_length)."""
    inputs = []
    for name, arr in arrays.items():
        dt = "BF16" if arr.dtype == ml_dtypes.bfloat16 else th.np_to_triton_dtype(arr.dtype)
        inp = th.InferInput(name, list(arr.shape), dt)
        inp.set_data_from_numpy(arr, binary_data=binary if not isinstance(binary, dict) else binary[name])
        inputs.append(inp)
    return Client.generate_request_body(inputs, outputs=outputs, **kw)


def same(decoded, original: np.ndarray) -> bool:
    if isinstance(decoded, torch.Tensor):  # BF16
        assert decoded.dtype == torch.bfloat16 and original.dtype == ml_dtypes.bfloat16
        return tuple(decoded.shape) == original.shape and np.array_equal(
            decoded.view(torch.int16).numpy(), original.view(np.int16)
        )
    if original.dtype == object:
        return decoded.dtype == object and decoded.shape == original.shape and decoded.tolist() == original.tolist()
    return decoded.dtype == original.dtype and decoded.shape == original.shape and np.array_equal(decoded, original)


def parse(body: bytes, header_length):
    return Client.parse_response_body(body, verbose=False, header_length=header_length, content_encoding=None)


def decode_error(body, header_length=None, **kw) -> str:
    with pytest.raises(DecodeError) as e:
        decode_request(body, header_length, **kw)
    assert isinstance(e.value, InputError) and e.value.status == 400
    return e.value.message


def js(obj) -> bytes:
    return orjson.dumps(obj)


# ---------------------------------------------------------------- requests from tritonclient


@pytest.mark.parametrize("datatype,binary", [(dt, b) for dt in DATATYPES for b in (True, False)
                                              if b or dt != "BF16"])  # tritonclient refuses BF16 as JSON
def test_every_datatype_round_trips_from_tritonclient(datatype, binary):
    arr = sample(datatype, (2, 3), seed=1)
    body, hl = build({"t": arr}, binary=binary)
    assert (hl is None) == (not binary)
    req = decode_request(body, hl)
    assert list(req.inputs) == ["t"]
    assert same(req.inputs["t"], arr)


@pytest.mark.parametrize("datatype", DATATYPES)
def test_empty_tensors(datatype):
    arr = sample(datatype, (0, 4))
    body, hl = build({"t": arr}, binary=True)
    req = decode_request(body, hl)
    assert tuple(req.inputs["t"].shape) == (0, 4)


def test_binary_inputs_are_zero_copy_views_of_the_body_in_request_order():
    arrays = {"b": sample("FP32", (3, 5)), "a": sample("INT64", (2,)), "s": sample("BYTES", (4,)), "c": sample("UINT8", (7,))}
    body, hl = build(arrays, binary={"b": True, "a": False, "s": True, "c": True})
    req = decode_request(body, hl)
    assert list(req.inputs) == ["b", "a", "s", "c"]
    for name, arr in arrays.items():
        assert same(req.inputs[name], arr), name
    assert not req.inputs["b"].flags.writeable  # np.frombuffer over the bytes body
    assert req.inputs["a"].flags.writeable


def test_nested_and_flat_json_data():
    body = js({"inputs": [
        {"name": "n", "shape": [2, 2], "datatype": "INT32", "data": [[1, 2], [3, 4]]},
        {"name": "f", "shape": [2, 2], "datatype": "FP32", "data": [1, 2.5, 3, 4]},
        {"name": "b", "shape": [1, 3], "datatype": "BOOL", "data": [[True, False, True]]},
        {"name": "s", "shape": [2, 1], "datatype": "BYTES", "data": [["x"], ["\u00e9"]]},
        {"name": "h", "shape": [3], "datatype": "FP16", "data": [0.5, -2, 65504]},
        {"name": "u", "shape": [2], "datatype": "UINT64", "data": [0, 2**64 - 1]},
        {"name": "nan", "shape": [2], "datatype": "FP64", "data": [None, 1.0]},
    ]})
    req = decode_request(body, None)
    assert req.inputs["n"].dtype == np.int32 and req.inputs["n"].tolist() == [[1, 2], [3, 4]]
    assert req.inputs["f"].dtype == np.float32 and req.inputs["f"].tolist() == [[1, 2.5], [3, 4]]
    assert req.inputs["b"].dtype == np.bool_ and req.inputs["b"].tolist() == [[True, False, True]]
    assert req.inputs["s"].tolist() == [[b"x"], ["\u00e9".encode()]]
    assert req.inputs["h"].dtype == np.float16 and req.inputs["h"].tolist() == [0.5, -2, 65504]
    assert req.inputs["u"].dtype == np.uint64 and req.inputs["u"].tolist() == [0, 2**64 - 1]
    assert np.isnan(req.inputs["nan"][0]) and req.inputs["nan"][1] == 1.0


def test_request_parameters_id_priority_timeout():
    body, hl = build({"x": sample("FP32", (1, 4))}, request_id="req-7", priority=3, timeout=2500,
                     parameters={"custom": "v"})
    req = decode_request(body, hl)
    assert req.id == "req-7"
    assert req.priority == 3
    assert req.timeout_ms == 2.5
    assert req.parameters["custom"] == "v" and req.parameters["timeout"] == 2500
    # no outputs listed: tritonclient asks for every output in binary
    assert req.outputs is None and req.binary_output is True

    body, hl = build({"x": sample("FP32", (1, 4))}, binary=False, outputs=[th.InferRequestedOutput("y")])
    req = decode_request(body, hl)
    assert req.id is None and req.priority is None and req.timeout_ms is None
    assert req.binary_output is False and req.parameters == {}

    # priority is passed through (the engine checks the range); timeout 0 = the model's default
    req = decode_request(js({"parameters": {"priority": 0, "timeout": 0},
                             "inputs": [{"name": "x", "shape": [1], "datatype": "INT8", "data": [1]}]}), None)
    assert req.priority == 0 and req.timeout_ms is None


def test_requested_outputs_binary_flags():
    outs = [th.InferRequestedOutput("b", binary_data=True), th.InferRequestedOutput("a", binary_data=False)]
    body, hl = build({"x": sample("FP32", (1, 4))}, outputs=outs)
    req = decode_request(body, hl)
    assert req.outputs == [RequestedOutput("b", True), RequestedOutput("a", False)]
    # an output listed without binary_data follows parameters.binary_data_output
    body = js({"parameters": {"binary_data_output": True},
               "inputs": [{"name": "x", "shape": [1], "datatype": "INT8", "data": [1]}],
               "outputs": [{"name": "y"}, {"name": "z", "parameters": {"binary_data": False}}]})
    req = decode_request(body, None)
    assert req.outputs == [RequestedOutput("y", True), RequestedOutput("z", False)]
    # an empty list means every output
    body = js({"inputs": [{"name": "x", "shape": [1], "datatype": "INT8", "data": [1]}], "outputs": []})
    assert decode_request(body, None).outputs is None


def test_body_may_be_bytearray_or_memoryview():
    arr = sample("FP64", (3,))
    body, hl = build({"x": arr})
    for b in (bytearray(body), memoryview(body)):
        assert same(decode_request(b, hl).inputs["x"], arr)


def test_bool_bytes_other_than_0_1_are_true():
    head = js({"inputs": [{"name": "x", "shape": [3], "datatype": "BOOL", "parameters": {"binary_data_size": 3}}]})
    req = decode_request(head + b"\x00\x01\x07", len(head))
    assert req.inputs["x"].tolist() == [False, True, True]


# ---------------------------------------------------------------- raw body (header length 0)


def test_raw_body_single_input_batched():
    spec = TensorSpec("input", "FP32", (-1, 4))
    arr = np.arange(4, dtype=np.float32)
    req = decode_request(arr.tobytes(), 0, [spec], max_batch_size=8)
    assert req.inputs["input"].shape == (1, 4) and req.inputs["input"].tolist() == [arr.tolist()]
    assert req.outputs is None and req.binary_output is True


def test_raw_body_variable_dim_and_fixed_shape_and_bytes_and_bf16():
    req = decode_request(np.arange(6, dtype=np.int64).tobytes(), 0, [TensorSpec("t", "INT64", (-1, -1))], 4)
    assert req.inputs["t"].shape == (1, 6)
    req = decode_request(np.arange(6, dtype=np.int16).tobytes(), 0, [TensorSpec("t", "INT16", (2, 3))])
    assert req.inputs["t"].tolist() == [[0, 1, 2], [3, 4, 5]]
    raw = b"".join(struct.pack("<I", len(s)) + s for s in (b"ab", b"", b"xyz"))
    req = decode_request(raw, 0, [TensorSpec("s", "BYTES", (-1, -1))], 8)
    assert req.inputs["s"].tolist() == [[b"ab", b"", b"xyz"]]
    bf = np.array([1.5, -2.0], dtype=ml_dtypes.bfloat16)
    req = decode_request(bf.tobytes(), 0, [TensorSpec("b", "BF16", (2,))])
    assert req.inputs["b"].tolist() == [1.5, -2.0] and req.inputs["b"].dtype == torch.bfloat16


def test_raw_body_errors():
    specs = [TensorSpec("a", "FP32", (-1, 4)), TensorSpec("b", "FP32", (-1, 4))]
    assert "exactly one input" in decode_error(b"\0" * 16, 0, input_specs=specs, max_batch_size=4)
    assert "exactly one input" in decode_error(b"\0" * 16, 0)
    msg = decode_error(b"\0" * 12, 0, input_specs=[TensorSpec("a", "FP32", (-1, 4))], max_batch_size=4)
    assert "raw input 'a'" in msg and "3 FP32 elements" in msg
    msg = decode_error(b"\0" * 6, 0, input_specs=[TensorSpec("a", "FP32", (4,))])
    assert "6 bytes is not a whole number of FP32 elements" in msg
    msg = decode_error(b"\0" * 16, 0, input_specs=[TensorSpec("a", "FP32", (-1, -1, 2))], max_batch_size=0)
    assert "more than one variable dimension" in msg


# ---------------------------------------------------------------- responses through tritonclient


def as_output(arr: np.ndarray):
    """What a model hands back: a torch tensor (numeric, BF16) or an object array (BYTES)."""
    if arr.dtype == object:
        return arr
    if arr.dtype == ml_dtypes.bfloat16:
        return torch.from_numpy(arr.view(np.int16).copy()).view(torch.bfloat16)
    return torch.from_numpy(arr.copy())


@pytest.mark.parametrize("datatype", DATATYPES)
@pytest.mark.parametrize("binary", [True, False])
def test_every_datatype_response_parses_in_tritonclient(datatype, binary):
    arr = sample(datatype, (2, 3), seed=2)
    req = V2Request(None, {}, {}, [RequestedOutput("y", binary)], False, None, None)
    body, hl = encode_response("m", "1", {"y": as_output(arr)}, req)
    forced = datatype == "BF16"
    assert (hl is not None) == (binary or forced)
    res = parse(body, hl)
    got = res.as_numpy("y")
    if datatype == "BYTES":
        assert got.shape == arr.shape and got.tolist() == arr.tolist() if binary else \
            [[s.decode() for s in row] for row in arr.tolist()]
    else:
        assert got.dtype == arr.dtype and got.shape == arr.shape
        assert np.array_equal(got.view(np.int16) if forced else got, arr.view(np.int16) if forced else arr)
    meta = res.get_output("y")
    assert meta["datatype"] == datatype and meta["shape"] == [2, 3]
    assert ("parameters" in meta) == (binary or forced)


@pytest.mark.parametrize("datatype", NUMERIC + ["BF16"])
def test_numpy_outputs_too(datatype):
    arr = sample(datatype, (3,), seed=3)
    for binary in (True, False):
        req = V2Request(None, {}, {}, None, binary, None, None)
        body, hl = encode_response("m", "1", {"y": arr}, req)
        got = parse(body, hl).as_numpy("y")
        assert got.tobytes() == arr.tobytes() and got.shape == arr.shape


def test_response_order_selection_id_and_header_length():
    outs = {"a": torch.ones(2), "b": torch.zeros(1, dtype=torch.int32), "c": np.array([b"q"], dtype=object)}
    specs = [TensorSpec("c", "BYTES", (-1,)), TensorSpec("b", "INT32", (-1,)), TensorSpec("a", "FP32", (-1,))]
    # all outputs, JSON: model's declared order, plain JSON body, id echoed
    req = V2Request("r1", {}, {}, None, False, None, None)
    body, hl = encode_response("mod", "3", outs, req, specs)
    assert hl is None
    doc = orjson.loads(body)
    assert doc["model_name"] == "mod" and doc["model_version"] == "3" and doc["id"] == "r1"
    assert [o["name"] for o in doc["outputs"]] == ["c", "b", "a"]
    assert doc["outputs"][0]["data"] == ["q"] and doc["outputs"][2]["data"] == [1.0, 1.0]
    # mapping order without specs, no id when the request had none
    body, hl = encode_response("mod", "3", outs, V2Request(None, {}, {}, None, False, None, None))
    doc = orjson.loads(body)
    assert "id" not in doc and [o["name"] for o in doc["outputs"]] == ["a", "b", "c"]
    # only requested outputs, in requested order, mixed binary / JSON
    req = V2Request(None, {}, {}, [RequestedOutput("c", True), RequestedOutput("a", False)], False, None, None)
    body, hl = encode_response("mod", "3", outs, req, specs)
    assert hl is not None
    doc = orjson.loads(body[:hl])
    assert [o["name"] for o in doc["outputs"]] == ["c", "a"]
    assert doc["outputs"][0]["parameters"] == {"binary_data_size": 5}
    res = parse(body, hl)
    assert res.as_numpy("c").tolist() == [b"q"] and res.as_numpy("a").tolist() == [1.0, 1.0]
    assert res.as_numpy("b") is None
    # no request at all: every output as JSON
    body, hl = encode_response("mod", "3", outs, None)
    assert hl is None and len(orjson.loads(body)["outputs"]) == 3
    # a requested output the model does not have
    req = V2Request(None, {}, {}, [RequestedOutput("nope", True)], False, None, None)
    with pytest.raises(InputError, match="no output 'nope'"):
        encode_response("mod", "3", outs, req)


def test_full_round_trip_with_tritonclient_default_binary():
    x = sample("FP32", (2, 4))
    body, hl = build({"x": x})  # no outputs listed: binary_data_output
    req = decode_request(body, hl)
    y = torch.from_numpy(np.ascontiguousarray(req.inputs["x"]) * 2).T  # non-contiguous output
    body, hl = encode_response("m", "1", {"y": y}, req)
    assert hl is not None
    assert np.array_equal(parse(body, hl).as_numpy("y"), (x * 2).T)


def test_raw_request_gets_binary_outputs():
    req = decode_request(np.zeros(4, np.float32).tobytes(), 0, [TensorSpec("x", "FP32", (-1, 4))], 2)
    body, hl = encode_response("m", "1", {"y": torch.arange(3)}, req)
    assert hl is not None and parse(body, hl).as_numpy("y").tolist() == [0, 1, 2]


def test_non_utf8_bytes_output_goes_binary_even_when_json_asked():
    arr = np.array([b"\xff\xfe", b"ok"], dtype=object)
    req = V2Request(None, {}, {}, [RequestedOutput("s", False)], False, None, None)
    body, hl = encode_response("m", "1", {"s": arr}, req)
    assert hl is not None
    assert parse(body, hl).as_numpy("s").tolist() == [b"\xff\xfe", b"ok"]
    # str elements and numpy 'S' arrays are BYTES too
    body, hl = encode_response("m", "1", {"s": np.array(["a", "\u00e9"], dtype=object), "t": np.array([b"zz"])},
                               V2Request(None, {}, {}, None, True, None, None))
    res = parse(body, hl)
    assert res.as_numpy("s").tolist() == [b"a", "\u00e9".encode()] and res.as_numpy("t").tolist() == [b"zz"]


def test_encode_error():
    assert orjson.loads(encode_error('bad "x"\n')) == {"error": 'bad "x"\n'}


# ---------------------------------------------------------------- bad requests


def one(**fields):
    inp = {"name": "x", "shape": [2], "datatype": "INT32", "data": [1, 2]}
    inp.update(fields)
    return {"inputs": [inp]}


def with_tail(doc, tail: bytes):
    head = js(doc)
    return head + tail, len(head)


BAD_JSON = [
    (b"", "request body: invalid JSON"),
    (b"{", "request body: invalid JSON"),
    (b"[1, 2]", "request body: expected a JSON object, got [1, 2]"),
    (js({}), "inputs: expected a non-empty list"),
    (js({"inputs": []}), "inputs: expected a non-empty list"),
    (js({"inputs": [3]}), "inputs[0]: expected an object, got 3"),
    (js({"id": 5, **one()}), "id: expected a string, got 5"),
    (js({"parameters": [], **one()}), "parameters: expected an object"),
    (js({"parameters": {"priority": "high"}, **one()}), 'parameters.priority: expected an integer, got "high"'),
    (js({"parameters": {"priority": 1.5}, **one()}), "parameters.priority: expected an integer, got 1.5"),
    (js({"parameters": {"priority": True}, **one()}), "parameters.priority: expected an integer, got true"),
    (js({"parameters": {"timeout": -1}, **one()}), "parameters.timeout: expected a non-negative number"),
    (js({"parameters": {"binary_data_output": 1}, **one()}), "parameters.binary_data_output: expected true or false"),
    (js(one(name=7)), "inputs[0].name: expected a string, got 7"),
    (js({"inputs": one()["inputs"] * 2}), "inputs[1].name: duplicate input 'x'"),
    (js(one(datatype="FLOAT")), 'inputs[0].datatype: expected one of BOOL, '),
    (js(one(datatype=["FP32"])), 'inputs[0].datatype: expected one of'),
    (js(one(shape=[2, -3])), "inputs[0].shape: expected a list of non-negative integers, got [2, -3]"),
    (js(one(shape="2")), 'inputs[0].shape: expected a list of non-negative integers, got "2"'),
    (js(one(shape=[2.0])), "inputs[0].shape: expected a list of non-negative integers, got [2.0]"),
    (js(one(shape=[True])), "inputs[0].shape: expected a list of non-negative integers, got [true]"),
    (js(one(shape=[1] * 40)), "inputs[0].shape: at most 32 dimensions, got 40"),
    (js(one(shape=[10**12, 10**12])), "inputs[0].shape: [1000000000000, 1000000000000] has 1000000000000000000000000 elements, more than the body"),
    (js(one(shape=[0, 2**62])), "is too large"),
    (js(one(data=None)), "inputs[0] 'x': expected data or parameters.binary_data_size"),
    (js(one(data=5)), "inputs[0].data: expected a (nested) list of values, got 5"),
    (js(one(data=[1, 2, 3])), "inputs[0] 'x': data has 3 elements but shape [2] needs 2"),
    (js(one(data=[[1], [2, 3]])), "inputs[0].data: not a rectangular (nested) list of values"),
    (js(one(data=[1.5, 2])), "inputs[0].data: expected integers for INT32"),
    (js(one(data=["1", "2"])), "inputs[0].data: expected integers for INT32"),
    (js(one(data=[1, None])), "inputs[0].data: expected integers for INT32"),
    (js(one(data=[1, 2**40])), "inputs[0].data: values out of range for INT32 (-2147483648..2147483647)"),
    (js(one(datatype="UINT8", data=[-1, 2])), "inputs[0].data: values out of range for UINT8 (0..255)"),
    (js(one(datatype="INT64", data=[1, 2**63])), "values out of range for INT64"),
    (js(one(datatype="BOOL", data=[1, 0])), "inputs[0].data: expected true/false values for BOOL"),
    (js(one(datatype="FP32", data=[True, False])), "inputs[0].data: expected numbers for FP32"),
    (js(one(datatype="FP32", data=["a", 1])), "inputs[0].data: expected numbers for FP32"),
    (js(one(datatype="FP32", data=[{}, 1])), "inputs[0].data: expected numbers for FP32, got {}"),
    (js(one(datatype="FP32", data=[1e39, 1])), "inputs[0].data: values out of range for FP32"),
    (js(one(datatype="FP16", data=[70000, 1])), "inputs[0].data: values out of range for FP16"),
    (js(one(datatype="BF16", data=[1.0, 2.0])), "inputs[0] 'x': BF16 data cannot travel as JSON"),
    (js(one(datatype="BYTES", data=["a", 1])), "inputs[0].data: expected strings for BYTES, got 1"),
    (js(one(datatype="BYTES", data=[["a"], ["b"], ["c"]])), "inputs[0] 'x': data has 3 elements but shape [2] needs 2"),
    (js(one(parameters=[])), "inputs[0].parameters: expected an object"),
    (js(one(parameters={"shared_memory_region": "r"})), "inputs[0].parameters.shared_memory_region: shared memory is not supported"),
    (js(one(data=None, parameters={"binary_data_size": 8})), "inputs[0] 'x': parameters.binary_data_size needs the Inference-Header-Content-Length header"),
    (js(one(parameters={"binary_data_size": "8"})), "inputs[0].parameters.binary_data_size: expected a non-negative integer"),
    (js(one(parameters={"binary_data_size": 8})), "inputs[0] 'x': has both data and parameters.binary_data_size"),
    (js({**one(), "outputs": {"name": "y"}}), "outputs: expected a list of requested outputs"),
    (js({**one(), "outputs": ["y"]}), 'outputs[0]: expected an object, got "y"'),
    (js({"inputs": {"a": [[[[1]]]], "b": list(range(100))}}),
     'inputs: expected a non-empty list of input tensors, got {"a": [[[...]]], "b": [0, 1, 2, 3, 4, 5, 6, 7, ...]}'),
    (js({**one(), "outputs": [{"name": None}]}), "outputs[0].name: expected a string, got null"),
    (js({**one(), "outputs": [{"name": "y"}, {"name": "y"}]}), "outputs[1].name: duplicate output 'y'"),
    (js({**one(), "outputs": [{"name": "y", "parameters": 1}]}), "outputs[0].parameters: expected an object"),
    (js({**one(), "outputs": [{"name": "y", "parameters": {"binary_data": "yes"}}]}), 'outputs[0].parameters.binary_data: expected true or false, got "yes"'),
    (js({**one(), "outputs": [{"name": "y", "parameters": {"classification": 3}}]}), "outputs[0].parameters.classification: classification is not supported"),
    (js({**one(), "outputs": [{"name": "y", "parameters": {"shared_memory_region": "r"}}]}), "outputs[0].parameters.shared_memory_region"),
]


@pytest.mark.parametrize("body,expected", BAD_JSON, ids=[m[:40] for _, m in BAD_JSON])
def test_bad_json_requests(body, expected):
    assert expected in decode_error(body, None)


def binput(datatype="FP32", shape=(2,), size=8, name="x"):
    return {"name": name, "shape": list(shape), "datatype": datatype, "parameters": {"binary_data_size": size}}


BAD_BINARY = [
    (with_tail({"inputs": [binput(size=12)]}, b"\0" * 12),
     "inputs[0] 'x': parameters.binary_data_size is 12 bytes but shape [2] of FP32 needs 8"),
    (with_tail({"inputs": [binput(size=8)]}, b"\0" * 4),
     "inputs[0] 'x': parameters.binary_data_size 8 runs past the end of the body (4 bytes of binary data left)"),
    (with_tail({"inputs": [binput(size=8)]}, b"\0" * 12),
     "binary data: the inputs' binary_data_size add up to 8 bytes but the body carries 12 bytes after the JSON header"),
    (with_tail({"inputs": [binput(), binput("INT8", (3,), 3, "y")]}, b"\0" * 10),
     "inputs[1] 'y': parameters.binary_data_size 3 runs past the end of the body (2 bytes of binary data left)"),
    (with_tail(one(), b"\0"), "add up to 0 bytes but the body carries 1 bytes"),
    (with_tail({"inputs": [binput("BYTES", (3,), 8)]}, b"\0" * 8),
     "inputs[0] 'x': parameters.binary_data_size is 8 bytes, too small for the 3 BYTES elements of shape [3]"),
    (with_tail({"inputs": [binput("BYTES", (1,), 7)]}, struct.pack("<I", 5) + b"abc"),
     "inputs[0] 'x': BYTES element 0 (5 bytes) runs past the end of its data (7 bytes)"),
    (with_tail({"inputs": [binput("BYTES", (1,), 9)]}, struct.pack("<I", 2) + b"abc" + b"\0\0"),
     "inputs[0] 'x': 3 bytes left over after the 1 BYTES elements of its shape"),
    (with_tail({"inputs": [binput("BYTES", (2,), 9)]}, struct.pack("<I", 3) + b"abc" + b"\0\0"),
     "inputs[0] 'x': BYTES element 1's 4-byte length runs past the end of its data (9 bytes)"),
    (with_tail({"inputs": [binput("FP32", (10**12, 10**12), 8)]}, b"\0" * 8),
     "inputs[0].shape: [1000000000000, 1000000000000] has 1000000000000000000000000 elements"),
    (with_tail({"inputs": [binput("BYTES", (2**40,), 8)]}, b"\0" * 8), "more than the body"),
]


@pytest.mark.parametrize("case,expected", BAD_BINARY, ids=[m[:40] for _, m in BAD_BINARY])
def test_bad_binary_requests(case, expected):
    body, hl = case
    assert expected in decode_error(body, hl)


def test_bad_header_length():
    assert decode_error(b"x" * 300, 500) == "Inference-Header-Content-Length 500 exceeds the body (300 bytes)"
    assert "Inference-Header-Content-Length: expected a non-negative integer" in decode_error(b"{}", -1)
    assert "request JSON header: invalid JSON" in decode_error(js(one()) + b"\0", 3)


# ---------------------------------------------------------------- fuzz


FUZZ = settings(max_examples=400, deadline=None, database=None, suppress_health_check=list(HealthCheck))


def decodes_or_refuses(body, hl, specs=None, mbs=0):
    try:
        req = decode_request(body, hl, specs, mbs)
    except DecodeError as e:
        assert e.message and e.status == 400
        return None
    assert isinstance(req, V2Request)
    return req


RAW_SPECS = st.one_of(
    st.none(),
    st.lists(st.builds(TensorSpec, st.sampled_from(["a", "b"]), st.sampled_from(DATATYPES),
                       st.lists(st.integers(-1, 3), max_size=3).map(tuple)), min_size=1, max_size=2),
)


@FUZZ
@given(body=st.binary(max_size=300), hl=st.one_of(st.none(), st.integers(-3, 310)), specs=RAW_SPECS,
       mbs=st.integers(0, 4))
def test_fuzz_arbitrary_bytes(body, hl, specs, mbs):
    decodes_or_refuses(body, hl, specs, mbs)


json_scalar = st.one_of(st.none(), st.booleans(), st.integers(-(2**63), 2**64 - 1), st.floats(allow_nan=False),
                        st.text(max_size=5))
json_value = st.recursive(json_scalar, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                               st.dictionaries(st.text(max_size=3), inner, max_size=3)),
                          max_leaves=10)
RANGES = {dt: (int(np.iinfo(np.dtype(dt.lower())).min), int(np.iinfo(np.dtype(dt.lower())).max))
          for dt in NUMERIC if dt[0] in "UI"}
SIZES = {dt: np.dtype(dt.lower().replace("fp", "float")).itemsize for dt in NUMERIC if dt != "BOOL"}
SIZES.update(BOOL=1, BF16=2)


def sometimes(draw, good, bad=json_value, p_bad=0.06):
    """Mostly a well-formed value, now and then garbage."""
    return draw(bad) if draw(st.integers(0, 999)) >= 1000 * (1 - p_bad) else draw(good)


def mostly(good, bad=json_value):
    return st.one_of(*[good] * 12, bad)


def values_for(datatype):
    if datatype == "BOOL":
        return st.booleans()
    if datatype in RANGES:
        lo, hi = RANGES[datatype]
        return st.integers(max(lo - 2, -(2**63)), min(hi + 2, 2**64 - 1))  # a few out of range
    if datatype == "BYTES":
        return st.text(max_size=4)
    return st.one_of(st.floats(allow_nan=False, allow_infinity=False), st.integers(-(2**63), 2**63 - 1))


@st.composite
def structured_request(draw):
    """(body, header_length): request-shaped JSON, mostly valid, with a binary tail that mostly fits."""
    inputs, tail = [], b""
    for _ in range(draw(st.integers(1, 3))):
        dt = sometimes(draw, st.sampled_from(DATATYPES), st.sampled_from(["FP8", "", "fp32", 3]))
        shp = sometimes(draw, st.lists(st.integers(0, 3), max_size=3),
                        st.lists(st.one_of(st.integers(-2, 2**64 - 1), st.sampled_from([True, 1.5, "2"])), max_size=4))
        inp = {"name": sometimes(draw, st.just(f"i{len(inputs)}"), st.sampled_from(["i0", 7])), "shape": shp, "datatype": dt}
        ok = type(shp) is list and all(type(d) is int and d >= 0 for d in shp)
        count = int(np.prod(shp, dtype=object)) if ok else 1
        count = min(count, 64)
        how = draw(st.sampled_from(["json"] * 6 + ["binary"] * 6 + ["both", "none"]))
        if how in ("json", "both"):
            n = count + draw(st.sampled_from([0, 0, 0, -1, 1]))
            good = st.lists(values_for(dt) if dt in DATATYPES else json_scalar, min_size=max(n, 0), max_size=max(n, 0))
            flat = sometimes(draw, good, st.lists(json_scalar, max_size=4), p_bad=0.1)
            if draw(st.booleans()) and type(shp) is list and len(shp) == 2 and type(shp[1]) is int and shp[1] > 0 \
                    and type(shp[0]) is int and len(flat) == shp[0] * shp[1]:
                flat = [flat[r * shp[1]:(r + 1) * shp[1]] for r in range(shp[0])]  # nested row-major
            inp["data"] = flat
        if how in ("binary", "both"):
            if dt == "BYTES":
                items = draw(st.lists(st.binary(max_size=5), min_size=count, max_size=count))
                blob = b"".join(struct.pack("<I", len(b)) + b for b in items)
            else:
                blob = draw(st.binary(min_size=count * SIZES.get(dt, 1), max_size=count * SIZES.get(dt, 1)))
            blob = blob[: len(blob) - draw(st.sampled_from([0, 0, 0, 0, 1, 3]))] + draw(st.sampled_from([b"", b"", b"", b"\0"]))
            size = sometimes(draw, st.just(len(blob)), st.one_of(st.integers(-1, 2**64 - 1), json_value))
            inp["parameters"] = {"binary_data_size": size}
            tail += blob
        inputs.append(inp)
    doc = {"inputs": inputs}
    if draw(st.booleans()):
        doc["id"] = sometimes(draw, st.text(max_size=4))
    if draw(st.booleans()):
        doc["parameters"] = sometimes(draw, st.fixed_dictionaries({}, optional={
            "priority": mostly(st.integers(-3, 5)), "timeout": mostly(st.integers(0, 10**7)),
            "binary_data_output": mostly(st.booleans())}))
    if draw(st.booleans()):
        doc["outputs"] = sometimes(draw, st.lists(st.fixed_dictionaries(
            {"name": mostly(st.sampled_from(["a", "b"]))},
            optional={"parameters": st.fixed_dictionaries({"binary_data": mostly(st.booleans())})}), max_size=3))
    head = orjson.dumps(doc)
    mode = draw(st.sampled_from(["exact", "exact", "exact", "json", "off"]))
    if mode == "json":
        return head, None
    hl = len(head) if mode == "exact" else max(0, len(head) + draw(st.integers(-4, 4)))
    return head + tail, hl


@FUZZ
@given(case=structured_request())
def test_fuzz_structured_requests(case):
    decodes_or_refuses(*case)


@settings(max_examples=200, deadline=None, database=None, suppress_health_check=list(HealthCheck))
@given(specs=st.lists(st.tuples(st.sampled_from(DATATYPES), st.lists(st.integers(0, 3), max_size=3),
                                 st.booleans()), min_size=1, max_size=3),
       seed=st.integers(0, 2**16), binary_out=st.booleans())
def test_fuzz_valid_requests_round_trip(specs, seed, binary_out):
    arrays, binary = {}, {}
    for k, (dt, shp, b) in enumerate(specs):
        arrays[f"i{k}"] = sample(dt, shp, seed + k)
        binary[f"i{k}"] = b or dt == "BF16"
    body, hl = build(arrays, binary=binary)
    req = decode_request(body, hl)
    for name, arr in arrays.items():
        assert same(req.inputs[name], arr), name
    # echo the inputs back as outputs and read them with tritonclient
    outs = {name: as_output(arr) for name, arr in arrays.items()}
    req.outputs = [RequestedOutput(name, binary_out) for name in outs]
    body, hl = encode_response("m", "1", outs, req)
    res = parse(body, hl)
    for name, arr in arrays.items():
        got = res.as_numpy(name)
        if arr.dtype == object:
            assert [x if isinstance(x, bytes) else x.encode() for x in got.reshape(-1).tolist()] == arr.reshape(-1).tolist()
        else:
            assert got.shape == arr.shape and got.tobytes() == arr.tobytes(), name
