"""KServe V2 over HTTP with binary tensors, as a client speaks it: numpy in, numpy out, no torch.

Used by the ``remote:`` source (a model whose forward is another server) and
by ``modelconsole.client.Model`` (which must import without torch), so it
needs nothing but numpy and the error kinds.  A request is a JSON header
naming each input with ``binary_data_size``, then the raw bytes in order;
``Inference-Header-Content-Length`` says where the JSON ends.  Answers are
asked for in binary and read back the same way.  An error answer becomes the
engine's own error kind: by the ``X-Modelconsole-Error-Kind`` header a
modelconsole server sends, else by its status.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from .errors import EngineError, from_wire

HEADER = "Inference-Header-Content-Length"
KIND_HEADER = "X-Modelconsole-Error-Kind"
ENGINE_MS_HEADER = "X-Modelconsole-Engine-Ms"  # a modelconsole server's own time on an answer
CONTENT_TYPE = "application/octet-stream"

NUMPY_TO_V2 = {
    np.dtype(np.bool_): "BOOL", np.dtype(np.uint8): "UINT8", np.dtype(np.uint16): "UINT16",
    np.dtype(np.uint32): "UINT32", np.dtype(np.uint64): "UINT64", np.dtype(np.int8): "INT8",
    np.dtype(np.int16): "INT16", np.dtype(np.int32): "INT32", np.dtype(np.int64): "INT64",
    np.dtype(np.float16): "FP16", np.dtype(np.float32): "FP32", np.dtype(np.float64): "FP64",
}
V2_TO_NUMPY = {v: k for k, v in NUMPY_TO_V2.items()}
# the kind a status means when the server does not say (another V2 server)
KIND_BY_STATUS = {400: "invalid_input", 403: "forbidden", 404: "not_found", 409: "conflict", 429: "rate_limited",
                  503: "unavailable", 504: "deadline"}


class WireError(ValueError):
    """An answer that is not the V2 protocol (or not the tensors asked for)."""


def model_url(base: str, model: str, version: str | None = None, suffix: str = "") -> str:
    """``base/v2/models/{model}[/versions/{version}]{suffix}``, the names quoted."""
    from urllib.parse import quote

    url = f"{base}/v2/models/{quote(model, safe='')}"
    if version is not None:
        url += f"/versions/{quote(version, safe='')}"
    return url + suffix


def as_array(value: Any) -> np.ndarray:
    """numpy as is; a torch tensor (or anything with ``.numpy()``) on the CPU, without importing torch."""
    if isinstance(value, np.ndarray):
        return value
    if hasattr(value, "detach") and hasattr(value, "cpu"):
        return np.asarray(value.detach().cpu().numpy())
    return np.asarray(value)


def encode_request(inputs: Mapping[str, Any], outputs: Sequence[str] | None = None,
                   request_id: str | None = None) -> tuple[bytes, int]:
    """(body, JSON header length) of a V2 infer request with every tensor in binary."""
    arrays = [(name, np.ascontiguousarray(as_array(v))) for name, v in inputs.items()]
    header: dict[str, Any] = {"inputs": []}
    blobs: list[bytes] = []
    for name, a in arrays:
        if a.dtype == object or a.dtype.kind in ("U", "S"):  # text: V2 BYTES, each a 4-byte length then its bytes
            datatype, blob = "BYTES", bytes_to_wire(name, a)
        else:
            found = NUMPY_TO_V2.get(a.dtype)
            if found is None:
                raise ValueError(f"input '{name}': dtype {a.dtype} has no V2 datatype")
            datatype, blob = found, a.tobytes()
        blobs.append(blob)
        header["inputs"].append({"name": name, "datatype": datatype, "shape": list(a.shape),
                                 "parameters": {"binary_data_size": len(blob)}})
    if outputs is not None:
        header["outputs"] = [{"name": n, "parameters": {"binary_data": True}} for n in outputs]
    else:
        header["parameters"] = {"binary_data_output": True}
    if request_id is not None:
        header["id"] = request_id
    head = json.dumps(header, separators=(",", ":")).encode()
    return b"".join([head, *blobs]), len(head)


def bytes_to_wire(name: str, a: np.ndarray) -> bytes:
    """A BYTES tensor's binary form: per element (row-major), its length (uint32 LE) and bytes."""
    parts = []
    for v in a.reshape(-1):
        b = v.encode("utf-8") if isinstance(v, str) else bytes(v) if isinstance(v, (bytes, bytearray)) else None
        if b is None:
            raise ValueError(f"input '{name}': BYTES elements must be str or bytes, got {type(v).__name__}")
        parts += [len(b).to_bytes(4, "little"), b]
    return b"".join(parts)


def _objects(items: list[bytes]) -> np.ndarray:
    array = np.empty(len(items), dtype=object)
    array[:] = items
    return array


def bytes_from_wire(name: str, raw: bytes) -> list[bytes]:
    """The elements of a BYTES tensor's binary form."""
    out, pos = [], 0
    while pos < len(raw):
        if pos + 4 > len(raw):
            raise WireError(f"output '{name}': a BYTES element's length is cut off")
        n = int.from_bytes(raw[pos:pos + 4], "little")
        if pos + 4 + n > len(raw):
            raise WireError(f"output '{name}': a BYTES element runs past the output's bytes")
        out.append(raw[pos + 4:pos + 4 + n])
        pos += 4 + n
    return out


def decode_response(body: bytes, header_length: int | None) -> dict[str, np.ndarray]:
    """The outputs of a V2 infer answer (binary, JSON ``data``, or both), by name."""
    head_end = header_length if header_length is not None else len(body)
    try:
        doc = json.loads(body[:head_end])
    except ValueError as e:
        raise WireError(f"the answer is not V2 JSON: {e}") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("outputs"), list):
        raise WireError("the answer has no outputs list")
    out: dict[str, np.ndarray] = {}
    offset = head_end
    for o in doc["outputs"]:
        try:
            name, datatype, shape = o["name"], o["datatype"], [int(d) for d in o["shape"]]
        except (KeyError, TypeError, ValueError):
            raise WireError(f"an output without name, datatype and shape: {str(o)[:200]}") from None
        dtype = V2_TO_NUMPY.get(datatype) if datatype != "BYTES" else np.dtype(object)
        if dtype is None:
            raise WireError(f"output '{name}': datatype {datatype} is not served here")
        size = (o.get("parameters") or {}).get("binary_data_size")
        if size is not None:
            raw = body[offset:offset + int(size)]
            offset += int(size)
            if len(raw) != int(size):
                raise WireError(f"output '{name}': the answer ends before its {size} bytes")
            array = _objects(bytes_from_wire(name, raw)) if datatype == "BYTES" else np.frombuffer(raw, dtype=dtype)
        elif datatype == "BYTES":
            array = _objects([str(v).encode("utf-8") for v in o.get("data") or ()])
        else:
            array = np.asarray(o.get("data"), dtype=dtype)
        try:
            out[name] = array.reshape(shape)
        except ValueError:
            raise WireError(f"output '{name}': {array.size} values do not make shape {shape}") from None
    return out


def error_from_answer(status: int, body: bytes, headers: Mapping[str, str], where: str = "") -> EngineError:
    """The engine error an error answer stands for: same kind, status and message."""
    try:
        message = str(json.loads(body).get("error") or body[:300].decode(errors="replace"))
    except (ValueError, AttributeError):
        message = body[:300].decode(errors="replace") or f"HTTP {status}"
    kind = headers.get(KIND_HEADER) or KIND_BY_STATUS.get(status, "internal")
    retry = headers.get("Retry-After")
    retry_after = float(retry) if retry and retry.replace(".", "", 1).isdigit() else None
    return from_wire(kind, status, f"{where}{message}", retry_after)
