"""KServe V2 / Triton infer bodies: request decoding and response encoding.

Pure functions, no web framework: the server hands over the body bytes and
the ``Inference-Header-Content-Length`` header, and writes back what
``encode_response`` returns.  The wire format is the one ``tritonclient.http``
speaks (docs/api.md and docs/design.md):

* a JSON object, optionally followed by a binary tail whose length the header
  gives; inputs with ``parameters.binary_data_size`` take their bytes from
  the tail, in input order;
* ``Inference-Header-Content-Length: 0``: the whole body is the one input of
  a single-input model (batch 1), every output comes back binary;
* BYTES elements are a 4-byte little-endian length then the bytes; BF16 is the
  upper half of a float32 (2 bytes); everything else is little-endian,
  row-major.

Every malformed body raises :class:`DecodeError` (HTTP 400) whose message
names the offending field; nothing else escapes ``decode_request``.  Sizes
are checked with Python ints before anything is allocated, so a declared
shape of [1e12, 1e12] costs nothing.

Hot path: orjson for JSON, ``np.frombuffer`` over the body (zero-copy,
read-only arrays) for binary tensors, vectorised checks for JSON data; only
BYTES tensors are walked element by element.
"""

from __future__ import annotations

import math
import struct
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, cast

import numpy as np
import orjson

from modelconsole.scheduler.errors import InputError
from modelconsole.scheduler.tensors import (
    DATATYPES,
    TensorSpec,
    element_size,
    is_torch_tensor,
    numpy_dtype,
    torch_module,
    torch_to_v2,
    v2_datatype,
)

__all__ = [
    "DecodeError",
    "RequestedOutput",
    "V2Request",
    "decode_raw",
    "decode_request",
    "encode_error",
    "encode_response",
    "raw_request",
    "tensor_from_bytes",
    "tensor_to_bytes",
]


class DecodeError(InputError):
    """A V2 infer body that cannot be decoded (HTTP 400); the message names the field."""


@dataclass(slots=True)
class RequestedOutput:
    name: str
    binary: bool  # return this output as binary data


@dataclass(slots=True)
class V2Request:
    id: str | None
    parameters: dict[str, Any]  # the request-level parameters as sent
    inputs: dict[str, Any]  # name -> numpy array (BYTES: object array of bytes; BF16: torch.bfloat16), request order
    outputs: list[RequestedOutput] | None  # None: all of the model's outputs
    binary_output: bool  # parameters.binary_data_output
    priority: int | None  # parameters.priority as sent (0 = the model's default)
    timeout_ms: float | None  # parameters.timeout (microseconds on the wire); 0 -> None


_MAX_DIMS = 32
_MAX_NONZERO_ELEMENTS = 1 << 48  # product of a shape's non-zero dims (an empty [0, 1e30] is refused too)

# datatype -> little-endian numpy dtype of its wire bytes (BF16: the raw 16 bits; BYTES: None)
_WIRE: dict[str, Any] = {}
for _dt in DATATYPES:
    if _dt == "BYTES":
        _WIRE[_dt] = None
    elif _dt == "BF16":
        _WIRE[_dt] = np.dtype("<i2")
    else:
        _WIRE[_dt] = numpy_dtype(_dt).newbyteorder("<")
_SIZE = {dt: element_size(dt) for dt in DATATYPES}
# wire bytes that are the numpy array as they are (no BOOL canonicalising, no BF16 view, no BYTES walk)
_DIRECT = {dt: d for dt, d in _WIRE.items() if d is not None and dt not in ("BOOL", "BF16")}
_INT_RANGE = {
    dt: (int(np.iinfo(d).min), int(np.iinfo(d).max))
    for dt, d in _WIRE.items()
    if d is not None and dt != "BF16" and d.kind in "iu"
}
_FLOATS = ("FP16", "FP32", "FP64")
_U32 = struct.Struct("<I")
_unpack_u32 = _U32.unpack_from
_NUMPY_OPT = orjson.OPT_SERIALIZE_NUMPY


def _show(value: Any, limit: int = 80) -> str:
    """A short JSON-like rendering of a parsed JSON value for error messages (bounded work)."""
    text = _fmt(value, 0)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _fmt(v: Any, depth: int) -> str:
    t = type(v)
    if t is list:
        if depth >= 3:
            return "[...]" if v else "[]"
        items = [_fmt(x, depth + 1) for x in v[:8]]
        if len(v) > 8:
            items.append("...")
        return "[" + ", ".join(items) + "]"
    if t is dict:
        if depth >= 3:
            return "{...}" if v else "{}"
        items = []
        for k, x in v.items():
            if len(items) == 8:
                items.append("...")
                break
            items.append(_fmt(k, 3) + ": " + _fmt(x, depth + 1))
        return "{" + ", ".join(items) + "}"
    if t is str:
        return orjson.dumps(v[:40]).decode() + ("..." if len(v) > 40 else "")
    try:
        return orjson.dumps(v).decode()
    except Exception:  # noqa: BLE001 - ints beyond 64 bits

        return repr(v)


def _shape_text(shape: Sequence[int]) -> str:
    return "[" + ", ".join(str(d) for d in shape) + "]"


# ---------------------------------------------------------------- decoding


def decode_request(
    body: bytes,
    header_length: int | None,
    input_specs: Sequence[TensorSpec] | None = None,
    max_batch_size: int = 0,
) -> V2Request:
    """Decode a V2 infer request body; raise DecodeError naming the bad field."""
    n = len(body)
    if header_length is None:
        head: Any = body
    else:
        if type(header_length) is not int or header_length < 0:
            raise DecodeError(
                f"Inference-Header-Content-Length: expected a non-negative integer, got {header_length!r}"
            )
        if header_length > n:
            raise DecodeError(f"Inference-Header-Content-Length {header_length} exceeds the body ({n} bytes)")
        if header_length == 0:
            return decode_raw(body, input_specs, max_batch_size)
        head = body if header_length == n else memoryview(body)[:header_length]
    try:
        obj = orjson.loads(head)
    except orjson.JSONDecodeError as e:
        what = "request body" if header_length is None else "request JSON header"
        raise DecodeError(f"{what}: invalid JSON ({e})") from None
    if type(obj) is not dict:
        raise DecodeError(f"request body: expected a JSON object, got {_show(obj)}")

    rid = obj.get("id")
    if rid is not None and type(rid) is not str:
        raise DecodeError(f"id: expected a string, got {_show(rid)}")

    params = obj.get("parameters")
    priority = None
    timeout_ms = None
    binary_output = False
    if params is None:
        params = {}
    elif type(params) is not dict:
        raise DecodeError(f"parameters: expected an object, got {_show(params)}")
    elif params:
        binary_output = params.get("binary_data_output", False)
        if type(binary_output) is not bool:
            raise DecodeError(f"parameters.binary_data_output: expected true or false, got {_show(binary_output)}")
        priority = params.get("priority")
        if priority is not None and type(priority) is not int:
            raise DecodeError(f"parameters.priority: expected an integer, got {_show(priority)}")
        timeout = params.get("timeout")
        if timeout is not None:
            if type(timeout) not in (int, float) or timeout < 0:
                raise DecodeError(
                    f"parameters.timeout: expected a non-negative number of microseconds, got {_show(timeout)}"
                )
            timeout_ms = timeout / 1000.0 if timeout else None

    in_list = obj.get("inputs")
    if type(in_list) is not list or not in_list:
        raise DecodeError(f"inputs: expected a non-empty list of input tensors, got {_show(in_list)}")
    inputs: dict[str, Any] = {}
    offset = n if header_length is None else header_length
    for i, inp in enumerate(in_list):
        if type(inp) is not dict:
            raise DecodeError(f"inputs[{i}]: expected an object, got {_show(inp)}")
        name = inp.get("name")
        if type(name) is not str:
            raise DecodeError(f"inputs[{i}].name: expected a string, got {_show(name)}")
        if name in inputs:
            raise DecodeError(f"inputs[{i}].name: duplicate input '{name}'")
        datatype = inp.get("datatype")
        if type(datatype) is not str or datatype not in _SIZE:
            raise DecodeError(
                f"inputs[{i}].datatype: expected one of {', '.join(DATATYPES)}, got {_show(datatype)}"
            )
        shape = inp.get("shape")
        count = _check_shape(shape, n, f"inputs[{i}]")
        shape = cast("list[int]", shape)  # checked: a list of non-negative ints
        where = f"inputs[{i}] '{name}'"

        p = inp.get("parameters")
        bds = None
        if p is not None:
            if type(p) is not dict:
                raise DecodeError(f"inputs[{i}].parameters: expected an object, got {_show(p)}")
            if p:
                if p.get("shared_memory_region") is not None:
                    raise DecodeError(f"inputs[{i}].parameters.shared_memory_region: shared memory is not supported")
                bds = p.get("binary_data_size")
                if bds is not None and (type(bds) is not int or bds < 0):
                    raise DecodeError(
                        f"inputs[{i}].parameters.binary_data_size: expected a non-negative integer, got {_show(bds)}"
                    )
        data = inp.get("data")
        if bds is not None:
            if data is not None:
                raise DecodeError(f"{where}: has both data and parameters.binary_data_size")
            if header_length is None:
                raise DecodeError(
                    f"{where}: parameters.binary_data_size needs the Inference-Header-Content-Length header"
                )
            end = offset + bds
            if end > n:
                raise DecodeError(
                    f"{where}: parameters.binary_data_size {bds} runs past the end of the body "
                    f"({n - offset} bytes of binary data left)"
                )
            inputs[name] = _from_binary(body, offset, bds, datatype, shape, count, where)
            offset = end
        elif data is not None:
            inputs[name] = _from_json(data, datatype, shape, count, f"inputs[{i}]", where)
        else:
            raise DecodeError(f"{where}: expected data or parameters.binary_data_size")
    if offset != n:
        used = offset - header_length  # type: ignore[operator]  # offset < n only with a header
        raise DecodeError(
            f"binary data: the inputs' binary_data_size add up to {used} bytes but the body carries "
            f"{n - header_length} bytes after the JSON header"  # type: ignore[operator]
        )

    out_list = obj.get("outputs")
    outputs: list[RequestedOutput] | None = None
    if out_list is not None and out_list != []:
        if type(out_list) is not list:
            raise DecodeError(f"outputs: expected a list of requested outputs, got {_show(out_list)}")
        outputs = []
        seen = set()
        for j, o in enumerate(out_list):
            if type(o) is not dict:
                raise DecodeError(f"outputs[{j}]: expected an object, got {_show(o)}")
            oname = o.get("name")
            if type(oname) is not str:
                raise DecodeError(f"outputs[{j}].name: expected a string, got {_show(oname)}")
            if oname in seen:
                raise DecodeError(f"outputs[{j}].name: duplicate output '{oname}'")
            seen.add(oname)
            binary = binary_output
            op = o.get("parameters")
            if op is not None:
                if type(op) is not dict:
                    raise DecodeError(f"outputs[{j}].parameters: expected an object, got {_show(op)}")
                if op:
                    b = op.get("binary_data")
                    if b is not None:
                        if type(b) is not bool:
                            raise DecodeError(
                                f"outputs[{j}].parameters.binary_data: expected true or false, got {_show(b)}"
                            )
                        binary = b
                    if op.get("shared_memory_region") is not None:
                        raise DecodeError(
                            f"outputs[{j}].parameters.shared_memory_region: shared memory is not supported"
                        )
                    cls = op.get("classification")
                    if cls is not None and cls != 0:
                        raise DecodeError(f"outputs[{j}].parameters.classification: classification is not supported")
            outputs.append(RequestedOutput(oname, binary))

    return V2Request(rid, params, inputs, outputs, binary_output, priority, timeout_ms)


def _check_shape(shape: Any, body_len: int, field: str) -> int:
    """Validate a declared shape; return its element count (bounded by the body's size)."""
    if type(shape) is not list or len(shape) > _MAX_DIMS:
        if type(shape) is list:
            raise DecodeError(f"{field}.shape: at most {_MAX_DIMS} dimensions, got {len(shape)}")
        raise DecodeError(f"{field}.shape: expected a list of non-negative integers, got {_show(shape)}")
    count = 1
    nonzero = 1
    for d in shape:
        if type(d) is not int or d < 0:
            raise DecodeError(f"{field}.shape: expected a list of non-negative integers, got {_show(shape)}")
        count *= d
        if d:
            nonzero *= d
    # every element takes at least one byte of the body, whatever its encoding
    if count > body_len:
        raise DecodeError(
            f"{field}.shape: {_show(shape)} has {count} elements, more than the body ({body_len} bytes) can carry"
        )
    if nonzero > _MAX_NONZERO_ELEMENTS:
        raise DecodeError(f"{field}.shape: {_show(shape)} is too large")
    return count


def _from_binary(body: Any, offset: int, nbytes: int, datatype: str, shape: list[Any], count: int, where: str) -> Any:
    if datatype == "BYTES":
        if count * 4 > nbytes:
            raise DecodeError(
                f"{where}: parameters.binary_data_size is {nbytes} bytes, too small for the {count} BYTES "
                f"elements of shape {_shape_text(shape)} (4-byte length each)"
            )
        items = _split_bytes(body, offset, nbytes, count, where)
        arr = np.empty(count, dtype=object)
        if count:
            arr[:] = items
        return arr.reshape(shape)
    size = _SIZE[datatype]
    if count * size != nbytes:
        raise DecodeError(
            f"{where}: parameters.binary_data_size is {nbytes} bytes but shape {_shape_text(shape)} "
            f"of {datatype} needs {count * size}"
        )
    return _wire_array(body, offset, count, datatype, shape)


def _wire_array(body: Any, offset: int, count: int, datatype: str, shape: Sequence[int]) -> Any:
    dtype = _WIRE[datatype]
    if datatype == "BF16":
        bits = np.frombuffer(body, dtype=dtype, count=count, offset=offset).copy() if count else np.empty(0, dtype)
        torch = torch_module()  # numpy has no bfloat16: the one place a front end imports torch
        return torch.from_numpy(bits).view(torch.bfloat16).reshape(tuple(shape))
    if not count:
        return np.empty(shape, dtype)
    arr = np.frombuffer(body, dtype=dtype, count=count, offset=offset)
    if datatype == "BOOL" and arr.view(np.uint8).max() > 1:
        arr = arr.view(np.uint8) != 0  # any non-zero byte is true; keep numpy's bools canonical
    return arr.reshape(shape)


def _split_bytes(body: Any, offset: int, nbytes: int, count: int | None, where: str) -> list[bytes]:
    """BYTES elements (4-byte LE length + bytes) filling exactly body[offset:offset+nbytes].

    With count None: as many elements as fill the region.
    """
    data = body[offset : offset + nbytes]
    if type(data) is not bytes:
        data = bytes(data)
    items: list[bytes] = []
    append = items.append
    pos = 0
    k = 0
    while (pos < nbytes) if count is None else (k < count):
        if pos + 4 > nbytes:
            raise DecodeError(
                f"{where}: BYTES element {k}'s 4-byte length runs past the end of its data ({nbytes} bytes)"
            )
        (length,) = _unpack_u32(data, pos)
        pos += 4
        end = pos + length
        if end > nbytes:
            raise DecodeError(
                f"{where}: BYTES element {k} ({length} bytes) runs past the end of its data ({nbytes} bytes)"
            )
        append(data[pos:end])
        pos = end
        k += 1
    if pos != nbytes:
        raise DecodeError(f"{where}: {nbytes - pos} bytes left over after the {count} BYTES elements of its shape")
    return items


def _from_json(data: Any, datatype: str, shape: list[Any], count: int, field: str, where: str) -> Any:
    if type(data) is not list:
        raise DecodeError(f"{field}.data: expected a (nested) list of values, got {_show(data)}")
    if datatype == "BYTES":
        items = _flatten_strings(data, field)
        if len(items) != count:
            raise DecodeError(
                f"{where}: data has {len(items)} elements but shape {_shape_text(shape)} needs {count}"
            )
        arr = np.empty(count, dtype=object)
        if count:
            arr[:] = items
        return arr.reshape(shape)
    if datatype == "BF16":
        raise DecodeError(
            f"{where}: BF16 data cannot travel as JSON; send it as binary data (parameters.binary_data_size)"
        )
    try:
        arr = np.array(data)
    except Exception:  # noqa: BLE001 - ragged, too deep, ...: all mean the same to the client
        raise DecodeError(f"{field}.data: not a rectangular (nested) list of values") from None
    if arr.size != count:
        raise DecodeError(f"{where}: data has {arr.size} elements but shape {_shape_text(shape)} needs {count}")
    dtype = _WIRE[datatype]
    if not count:
        return np.empty(shape, dtype)
    kind = arr.dtype.kind
    if datatype == "BOOL":
        if kind != "b":
            raise DecodeError(f"{field}.data: expected true/false values for BOOL")
    elif datatype in _FLOATS:
        if kind not in "fiu":
            if kind != "O":
                raise DecodeError(f"{field}.data: expected numbers for {datatype}")
            # null (what JSON writers make of NaN) among numbers
            for x in arr.reshape(-1).tolist():
                if x is not None and (type(x) not in (int, float)):
                    raise DecodeError(f"{field}.data: expected numbers for {datatype}, got {_show(x)}")
            arr = np.array([np.nan if x is None else x for x in arr.reshape(-1).tolist()], dtype=np.float64)
        if datatype != "FP64" and (datatype == "FP16" or arr.dtype.kind == "f"):
            # JSON has no infinities: an inf after the cast is an overflow, refuse it (and numpy's warning)
            try:
                with np.errstate(over="raise"):
                    return arr.astype(dtype).reshape(shape)
            except FloatingPointError:
                raise DecodeError(f"{field}.data: values out of range for {datatype}") from None
    else:
        lo, hi = _INT_RANGE[datatype]
        if kind not in "iu":
            if kind not in "fO":
                raise DecodeError(f"{field}.data: expected integers for {datatype}")
            # numpy turns ints beyond int64 mixed with small ones into float64: look at the values themselves
            flat = np.array(data, dtype=object).reshape(-1).tolist()
            for x in flat:
                if type(x) is not int:
                    raise DecodeError(f"{field}.data: expected integers for {datatype}, got {_show(x)}")
            if min(flat) < lo or max(flat) > hi:
                raise DecodeError(f"{field}.data: values out of range for {datatype} ({lo}..{hi})")
            return np.array(flat, dtype=dtype).reshape(shape)
        if arr.dtype != dtype and (int(arr.min()) < lo or int(arr.max()) > hi):
            raise DecodeError(f"{field}.data: values out of range for {datatype} ({lo}..{hi})")
    return arr.astype(dtype, copy=False).reshape(shape)


def _flatten_strings(data: list[Any], field: str) -> list[bytes]:
    """Nested lists of strings -> flat list of utf-8 bytes (iterative: no recursion limit)."""
    out: list[bytes] = []
    append = out.append
    stack = [iter(data)]
    while stack:
        for x in stack[-1]:
            if type(x) is str:
                try:
                    append(x.encode())
                except UnicodeEncodeError:
                    raise DecodeError(f"{field}.data: a string is not valid unicode") from None
            elif type(x) is list:
                stack.append(iter(x))
                break
            else:
                raise DecodeError(f"{field}.data: expected strings for BYTES, got {_show(x)}")
        else:
            stack.pop()
    return out


def raw_request() -> V2Request:
    """The request-level facts of a raw body (``Inference-Header-Content-Length: 0``): no id, no
    parameters, every output binary.  Its one input is ``decode_raw``'s, against the inputs of
    whichever version serves the request (the server leaves that to the engine's routing)."""
    return V2Request(None, {}, {}, None, True, None, None)


def decode_raw(body: Any, specs: Sequence[TensorSpec] | None, max_batch_size: int = 0) -> V2Request:
    """Inference-Header-Content-Length: 0 -- the whole body is the one input (batch 1) of a
    model whose inputs are ``specs``: its name, datatype and shape come from them, not the body."""
    if not specs or len(specs) != 1:
        got = "no input description" if not specs else f"{len(specs)} inputs"
        raise DecodeError(
            f"Inference-Header-Content-Length 0 (the body is one raw input) needs a model with exactly one input; "
            f"got {got}"
        )
    spec = specs[0]
    datatype = spec.datatype
    where = f"raw input '{spec.name}'"
    n = len(body)
    shape = list(spec.shape)
    if max_batch_size > 0 and shape and shape[0] == -1:
        shape[0] = 1
    var = [i for i, d in enumerate(shape) if d < 0]
    if len(var) > 1:
        raise DecodeError(
            f"{where}: cannot tell the shape of a raw binary input from its size: shape "
            f"{_shape_text(spec.shape)} has more than one variable dimension"
        )
    fixed = 1
    for d in shape:
        if d >= 0:
            fixed *= d
    if datatype == "BYTES":
        items = _split_bytes(body, 0, n, None, where)
        count = len(items)
    else:
        size = _SIZE[datatype]
        if n % size:
            raise DecodeError(f"{where}: {n} bytes is not a whole number of {datatype} elements ({size} bytes each)")
        count = n // size
    if var:
        if fixed == 0 or count % fixed:
            raise DecodeError(
                f"{where}: {count} {datatype} elements do not fit shape {_shape_text(spec.shape)}"
            )
        shape[var[0]] = count // fixed
    elif fixed != count:
        raise DecodeError(
            f"{where}: the body holds {count} {datatype} elements ({n} bytes) but shape "
            f"{_shape_text(shape)} needs {fixed}"
        )
    if datatype == "BYTES":
        arr = np.empty(count, dtype=object)
        if count:
            arr[:] = items
        value = arr.reshape(shape)
    else:
        value = _wire_array(body, 0, count, datatype, shape)
    return V2Request(None, {}, {spec.name: value}, None, True, None, None)


# ---------------------------------------------------------------- encoding


def encode_response(
    model: str,
    version: str,
    outputs: Mapping[str, Any],
    req: V2Request | None,
    output_specs: Sequence[TensorSpec] = (),
) -> tuple[bytes, int | None]:
    """Encode an infer response; returns (body, JSON header length or None when all JSON).

    Raises InputError for a requested output the mapping lacks and TypeError
    for a value that is not a V2 tensor (a server-side bug).
    """
    if req is None or req.outputs is None:
        default_binary = req.binary_output if req is not None else False
        if output_specs:
            names = [s.name for s in output_specs if s.name in outputs]
            if len(names) != len(outputs):
                known = set(names)
                names.extend(k for k in outputs if k not in known)
        else:
            names = list(outputs)
        wanted = [(name, default_binary) for name in names]
    else:
        wanted = [(ro.name, ro.binary) for ro in req.outputs]

    entries: list[dict[str, Any]] = []
    blobs: list[Any] = []
    for name, binary in wanted:
        try:
            value = outputs[name]
        except KeyError:
            raise InputError(f"outputs: the model has no output '{name}'") from None
        datatype, arr = _output_array(name, value)
        shape = list(arr.shape)
        if datatype == "BYTES":
            items = arr.reshape(-1).tolist()
            if not binary:
                strs = _bytes_as_strings(items)
                if strs is None:
                    binary = True
                else:
                    entries.append({"name": name, "datatype": "BYTES", "shape": shape, "data": strs})
                    continue
            blob = _serialize_bytes(items)
            blobs.append(blob)
            entries.append(
                {"name": name, "datatype": "BYTES", "shape": shape, "parameters": {"binary_data_size": len(blob)}}
            )
            continue
        if not arr.flags.c_contiguous:
            arr = np.ascontiguousarray(arr)
        flat = arr.reshape(-1)
        if binary or datatype == "BF16":
            blobs.append(flat)
            entries.append(
                {"name": name, "datatype": datatype, "shape": shape, "parameters": {"binary_data_size": flat.nbytes}}
            )
        else:
            if datatype == "FP16":
                flat = flat.astype(np.float32)  # orjson has no float16; every FP16 value is exact in FP32
            entries.append({"name": name, "datatype": datatype, "shape": shape, "data": flat})

    resp: dict[str, Any] = {"model_name": model, "model_version": version}
    if req is not None and req.id:
        resp["id"] = req.id
    resp["outputs"] = entries
    head = orjson.dumps(resp, option=_NUMPY_OPT)
    if not blobs:
        return head, None
    return b"".join([head, *blobs]), len(head)


def _output_array(name: str, value: Any) -> tuple[str, Any]:
    """(datatype, numpy array) for one output; BF16 comes back as its raw int16 bits."""
    if is_torch_tensor(value):
        datatype = torch_to_v2().get(value.dtype)
        if datatype is None:
            raise TypeError(f"output '{name}': torch dtype {value.dtype} has no V2 datatype")
        if not value.is_cpu:
            value = value.cpu()
        if value.requires_grad:
            value = value.detach()
        if datatype == "BF16":
            return datatype, value.view(torch_module().int16).numpy()
        return datatype, value.numpy()
    if isinstance(value, np.ndarray):
        dtype = value.dtype
        if not dtype.isnative:
            value = value.astype(dtype.newbyteorder("="))
            dtype = value.dtype
        datatype = v2_datatype(dtype)
        if datatype is None:
            if dtype.name == "bfloat16":  # ml_dtypes.bfloat16
                return "BF16", value.view(np.int16)
            raise TypeError(f"output '{name}': numpy dtype {dtype} has no V2 datatype")
        return datatype, value
    raise TypeError(f"output '{name}': expected a torch tensor or numpy array, got {type(value).__name__}")


def _bytes_as_strings(items: list[Any]) -> list[str] | None:
    """BYTES elements as JSON strings; None if one is not valid utf-8 (send binary then)."""
    out: list[str] = []
    append = out.append
    for x in items:
        if isinstance(x, bytes):
            try:
                append(x.decode())
            except UnicodeDecodeError:
                return None
        elif isinstance(x, str):
            append(x)
        else:
            append(str(x))
    return out


def _serialize_bytes(items: list[Any]) -> bytes:
    parts: list[bytes] = []
    append = parts.append
    for x in items:
        if not isinstance(x, bytes):
            x = x.encode() if isinstance(x, str) else str(x).encode()
        append(len(x).to_bytes(4, "little"))
        append(x)
    return b"".join(parts)


def tensor_to_bytes(name: str, value: Any) -> tuple[str, list[int], Any]:
    """One tensor as (datatype, shape, its V2 wire bytes): what a binary output, a gRPC
    ``raw_output_contents`` entry and an IPC frame carry.  The bytes are a view of the
    tensor's memory where it is contiguous (no copy); BYTES elements are length-prefixed."""
    torch = sys.modules.get("torch")  # a front end without torch has no tensor to encode
    if torch is not None and type(value) is torch.Tensor and value.is_cpu and not value.requires_grad \
            and value.is_contiguous():
        datatype = torch_to_v2().get(value.dtype)
        if datatype is not None and datatype != "BF16":  # the common answer: its memory as it is
            return datatype, list(value.shape), value.numpy().reshape(-1).view(np.uint8) if value.numel() else b""
    datatype, arr = _output_array(name, value)
    shape = list(arr.shape)
    if datatype == "BYTES":
        return datatype, shape, _serialize_bytes(arr.reshape(-1).tolist())
    if not arr.flags.c_contiguous:
        arr = np.ascontiguousarray(arr)
    return datatype, shape, arr.reshape(-1).view(np.uint8) if arr.size else b""


def tensor_from_bytes(data: Any, datatype: Any, shape: Any, where: str) -> Any:
    """The tensor that ``data`` (V2 wire bytes) holds, checked against ``datatype`` and ``shape``;
    DecodeError naming ``where`` otherwise.  Zero-copy for fixed-size datatypes (a read-only
    view of ``data``).  The inverse of :func:`tensor_to_bytes`."""
    dtype = _DIRECT.get(datatype) if type(datatype) is str else None
    if dtype is not None and type(shape) is list and 0 < len(shape) <= _MAX_DIMS and \
            all(type(d) is int and d > 0 for d in shape) and math.prod(shape) * dtype.itemsize == len(data):
        return np.frombuffer(data, dtype).reshape(shape)  # the common tensor: a checked view
    if type(datatype) is not str or datatype not in _WIRE:
        raise DecodeError(f"{where}.datatype: expected one of {', '.join(DATATYPES)}, got {_show(datatype)}")
    nbytes = len(data)
    count = _check_shape(shape, max(nbytes, 1) if datatype != "BYTES" else nbytes, where)
    return _from_binary(data, 0, nbytes, datatype, shape, count, where)


def encode_error(message: str) -> bytes:
    """The V2 error body: {"error": message}."""
    return orjson.dumps({"error": message})
