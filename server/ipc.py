"""What front-end processes and the engine core say to each other about inference.

One infer request is an :class:`InferCall`; its answer an :class:`InferAnswer`
or an ``EngineError``.  Both cross the process boundary as multipart
messages (``frontend.py`` sends calls, ``core.py`` answers), and a message
carries **many** of them: everything a process has ready in one event-loop
iteration goes in one message, so under load the per-message costs (a
syscall, a wake-up of the other side) are shared by tens of requests.
``transport.py`` carries the messages (a Unix socket, or ZeroMQ).

A message is ``[header, frame, frame, ...]``.  The header is JSON (orjson)
with one entry per call or answer, in order; each tensor is one frame of its
V2 wire bytes (``codec.tensor_to_bytes``: little-endian, row-major; BYTES
length-prefixed) that is sent from the tensor's own memory and the other
side reads with ``np.frombuffer`` (``codec.tensor_from_bytes``): no pickle,
no per-element work for fixed-size datatypes.

Call entry: ``{"i": id, "m": model, "v": version|null, "p": priority|null,
"t": timeout_ms|null, "o": [output names]|null, "k": routing key|null,
"x": [[name, datatype, shape], ...], "d": the inputs' cache digest (hex)}``
with one frame per input (the front end hashes the inputs for the result
cache, so the core's loop never hashes tensor bytes), or
``"r": 1`` with one frame: a raw body (``Inference-Header-Content-Length:
0``), decoded by the core against the version that serves it.
A call with ``"c": 1`` and no frames only asks whether the model and version exist.

**Chunks.**  Calls of one message for the same model, version, priority,
timeout and outputs whose inputs agree in names, datatypes and non-batch
shapes travel as ONE entry, an :class:`InferChunk`: ``"i"`` is the list of
their ids, ``"n"`` each call's rows, ``"k"`` each call's routing key (or
null), ``"d"`` each call's digest, and each input is one frame holding every
call's rows stacked (``np.concatenate`` in the front end).  The core queues a
chunk as one entry and answers it in one entry: ``{"i": [ids], "n": [rows],
"m", "v", "x"}`` with each output's rows stacked, which the front end cuts
back into one answer per call; an error entry with a list ``"i"`` answers
each of those calls.
Answer entry: ``{"i": id, "m": model, "v": version, "x": [[name, datatype,
shape], ...]}`` with one frame per output, or ``{"i": id, "e": [kind,
status, message, retry_after]}``.

The core trusts nothing in a message: every field is type-checked and a
message that does not parse is dropped with a log line (``ProtocolError``);
a call whose tensors do not match their declared shape gets a 400 like the
same tensors over HTTP would.  ``run_call`` is the one place a call meets
the engine, in-process (``LocalLink``) or in the core.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import orjson

from modelconsole.scheduler import rows as rows_mod
from modelconsole.scheduler.cache import input_digest
from modelconsole.scheduler.errors import EngineError, InputError, ModelFailed, from_wire

from . import codec

__all__ = ["InferAnswer", "InferCall", "InferChunk", "ProtocolError", "Rows", "calls_of", "pack_answers",
           "pack_calls", "run_call", "unpack_answers", "unpack_calls"]


class ProtocolError(Exception):
    """A message that is not what this module writes (a bug or a stranger on the socket)."""


@dataclass(slots=True)
class InferCall:
    model: str
    version: str | None
    inputs: dict[str, Any] | None  # name -> numpy array / torch tensor (BF16); None with raw
    raw: Any = None  # the raw body's bytes (one input, decoded against the serving version)
    priority: int | None = None
    timeout_ms: float | None = None
    outputs: list[str] | None = None
    routing_key: str | None = None
    check_only: bool = False  # only: is there such a model and version? (link.CoreLink.check)
    digest: bytes | None = None  # the inputs' cache.input_digest (a front end hashes them, not the core)


@dataclass(slots=True)
class InferChunk:
    """Calls that share a model, version, priority, timeout and outputs, their inputs stacked:
    call ``k`` (id ``ids[k]``) holds ``parts[k]`` rows."""

    ids: list[int]
    parts: list[int]
    model: str
    version: str | None
    inputs: dict[str, Any]  # name -> the stacked numpy array
    priority: Any = None
    timeout_ms: Any = None
    outputs: list[str] | None = None
    keys: list[str | None] | None = None
    digests: list[bytes | None] | None = None

    def calls(self) -> list[InferCall]:
        """The chunk's calls one by one (views of the stacked inputs)."""
        keys, digests = self.keys, self.digests
        return [InferCall(self.model, self.version, one, None, self.priority, self.timeout_ms, self.outputs,
                          keys[k] if keys is not None else None, digest=digests[k] if digests is not None else None)
                for k, one in enumerate(rows_mod.part_views(self.inputs, self.parts))]


@dataclass(frozen=True, slots=True)
class Rows:
    """The calls a chunk's answer (or error) is for: their ids and each one's rows."""

    ids: list[int]
    parts: list[int]


class Inputs(dict[str, Any]):
    """Tensors by name that carry their ``cache.input_digest`` (the engine's cache reads it)."""

    __slots__ = ("digest",)
    digest: bytes


@dataclass(slots=True)
class InferAnswer:
    model: str
    version: str
    outputs: dict[str, Any]  # in the model's declared output order
    text: dict[str, Any] | None = None  # a check's answer: how the model takes text (textenc.TextPlan)


async def run_call(engine: Any, call: InferCall) -> InferAnswer:
    """One call on the engine; its outputs in the serving version's declared order."""
    if call.check_only:
        inst = engine.instance(call.model, call.version)  # ModelNotFound, with the engine's message
        plan = inst.text_plan
        return InferAnswer(inst.name, inst.version, {}, plan.to_dict() if plan is not None else None)
    inputs: Any  # the tensors, or (a raw body) how to decode them once the version is known
    if call.raw is not None:
        body = call.raw

        def inputs(inst: Any) -> dict[str, Any]:
            return codec.decode_raw(body, inst.inputs, inst.cfg.max_batch_size).inputs
    else:
        inputs = call_inputs(call)
    result = await engine.infer(call.model, inputs, version=call.version, priority=call.priority,
                                timeout_ms=call.timeout_ms, outputs=call.outputs, routing_key=call.routing_key)
    return to_answer(engine, result)


def call_inputs(call: InferCall) -> dict[str, Any]:
    """A call's tensors as the engine takes them (with the front end's cache digest, if any)."""
    if call.digest is None:
        return call.inputs or {}
    inputs = Inputs(call.inputs or {})
    inputs.digest = call.digest
    return inputs


def to_answer(engine: Any, result: Any) -> InferAnswer:
    """An engine result as the answer: its outputs in the serving version's declared order."""
    outs = result.outputs
    if len(outs) > 1:
        specs = engine.instance(result.model, result.version).outputs
        if specs:
            ordered = {s.name: outs[s.name] for s in specs if s.name in outs}
            if len(ordered) == len(outs):
                outs = ordered
    return InferAnswer(result.model, result.version, outs)


# --------------------------------------------------------------------------- calls


def pack_calls(calls: Sequence[tuple[int, InferCall]]) -> list[Any]:
    """One message for the calls; those that can share a chunk (``_chunk_key``) share one."""
    head = []
    frames: list[Any] = []
    groups: dict[Any, list[tuple[int, InferCall]]] = {}
    for i, c in calls:
        key = _chunk_key(c)
        if key is None:
            head.append(_pack_call(i, c, frames))
        else:
            groups.setdefault(key, []).append((i, c))
    for group in groups.values():
        head.append(_pack_call(*group[0], frames) if len(group) == 1 else _pack_chunk(group, frames))
    return [orjson.dumps(head), *frames]


def _pack_call(i: int, c: InferCall, frames: list[Any]) -> dict[str, Any]:
    entry: dict[str, Any] = {"i": i, "m": c.model, "v": c.version, "p": c.priority, "t": c.timeout_ms,
                             "o": c.outputs, "k": c.routing_key}
    if c.check_only:
        entry["c"] = 1
    elif c.raw is not None:
        entry["r"] = 1
        frames.append(c.raw)
    else:
        start = len(frames)
        entry["x"] = metas = _pack_tensors(c.inputs or {}, frames)
        entry["d"] = input_digest(sorted(((m[0], m[1], m[2], frames[start + k]) for k, m in enumerate(metas)),
                                         key=lambda e: e[0])).hex()
    return entry


def _chunk_key(c: InferCall) -> Any:
    """What calls must share to travel stacked in one chunk, or None for a call that travels alone:
    a check, a raw body, BYTES or BF16 inputs, inputs that disagree on their batch dimension."""
    if c.check_only or c.raw is not None or not c.inputs:
        return None
    sig = []
    batch = -1
    for name, v in c.inputs.items():
        if type(v) is not np.ndarray or v.dtype.kind not in "biuf" or v.ndim == 0 or v.shape[0] < 1:
            return None
        if batch == -1:
            batch = v.shape[0]
        elif v.shape[0] != batch:
            return None
        sig.append((name, v.dtype.str, v.shape[1:]))
    key = (c.model, c.version, type(c.priority), c.priority, type(c.timeout_ms), c.timeout_ms,
           tuple(c.outputs) if c.outputs is not None else None, tuple(sig))
    try:
        hash(key)
    except TypeError:  # a priority or timeout that is no number: the engine's own error, call by call
        return None
    return key


def _pack_chunk(group: list[tuple[int, InferCall]], frames: list[Any]) -> dict[str, Any]:
    c = group[0][1]
    calls = [call for _, call in group]
    names = list(c.inputs or {})
    parts = [next(iter((call.inputs or {}).values())).shape[0] for call in calls]
    digests = [input_digest(sorted(((name, *codec.tensor_to_bytes(name, v)) for name, v in (call.inputs or {}).items()),
                                   key=lambda e: e[0])).hex() for call in calls]
    stacked = {name: np.concatenate([(call.inputs or {})[name] for call in calls]) for name in names}
    keys = [call.routing_key for call in calls]
    return {"i": [i for i, _ in group], "n": parts, "m": c.model, "v": c.version, "p": c.priority, "t": c.timeout_ms,
            "o": c.outputs, "k": keys if any(k is not None for k in keys) else None,
            "x": _pack_tensors(stacked, frames), "d": digests}


def unpack_calls(frames: Sequence[Any]) -> list[tuple[Any, InferCall | InferChunk | EngineError]]:
    """The calls of one message, by id (an int, or a chunk's ``Rows``); a call or chunk whose
    tensors do not decode comes back as its error.

    ProtocolError when the message as a whole is not one (nothing in it is answered)."""
    head = _header(frames)
    out: list[tuple[Any, InferCall | InferChunk | EngineError]] = []
    pos = 1
    for entry in head:
        if type(entry) is dict and type(entry.get("i")) is list:
            key, chunk, pos = _unpack_chunk(entry, frames, pos)
            out.append((key, chunk))
            continue
        if type(entry) is not dict or type(entry.get("i")) is not int:
            raise ProtocolError("call entry without an integer 'i'")
        i = entry["i"]
        try:
            model, version = _str(entry, "m"), _opt_str(entry, "v")
            outputs = entry.get("o")
            if outputs is not None and (type(outputs) is not list or any(type(o) is not str for o in outputs)):
                raise ProtocolError("'o' is not a list of names")
            routing_key = _opt_str(entry, "k")
            priority, timeout = entry.get("p"), entry.get("t")  # checked by the engine, as over HTTP
            if entry.get("c") == 1:
                call = InferCall(model, version, None, check_only=True)
            elif entry.get("r") == 1:
                raw = _frame(frames, pos)
                pos += 1
                call = InferCall(model, version, None, raw, priority, timeout, outputs, routing_key)
            else:
                metas = entry.get("x")
                if type(metas) is not list:
                    raise ProtocolError("call entry without 'x' or 'r'")
                inputs, pos = _unpack_tensors(metas, frames, pos, "inputs")
                call = InferCall(model, version, inputs, None, priority, timeout, outputs, routing_key,
                                 digest=_digest(entry.get("d")))
        except (InputError, ProtocolError) as e:
            pos = _skip(entry, pos)
            out.append((i, e if isinstance(e, InputError) else EngineError(f"malformed call from the front end: {e}")))
            continue
        out.append((i, call))
    if pos != len(frames):
        raise ProtocolError(f"{len(frames) - pos} frames left over")
    return out


def calls_of(entries: Sequence[tuple[Any, InferCall | InferChunk | EngineError]],
             ) -> list[tuple[int, InferCall | EngineError]]:
    """``unpack_calls``' entries one call each: a chunk's calls (views), a chunk's error for each."""
    out: list[tuple[int, InferCall | EngineError]] = []
    for key, c in entries:
        if isinstance(c, InferChunk):
            out.extend(zip(c.ids, c.calls()))
        elif type(key) is Rows:
            out.extend((i, c) for i in key.ids)
        else:
            out.append((key, c))
    return out


def _unpack_chunk(entry: dict[str, Any], frames: Sequence[Any], pos: int) -> tuple[Rows, InferChunk | EngineError, int]:
    ids, parts = entry["i"], entry.get("n")
    if not ids or any(type(i) is not int for i in ids):
        raise ProtocolError("chunk entry whose 'i' is not a list of integers")
    if type(parts) is not list or len(parts) != len(ids) or any(type(n) is not int or n < 1 for n in parts):
        raise ProtocolError("chunk entry whose 'n' is not one positive row count per call")
    key = Rows(ids, parts)
    start = pos
    metas = entry.get("x")
    if type(metas) is not list or not metas:
        raise ProtocolError("chunk entry without inputs ('x')")
    try:
        keys, digests = entry.get("k"), entry.get("d")
        if keys is not None and (type(keys) is not list or len(keys) != len(ids) or
                                 any(k is not None and type(k) is not str for k in keys)):
            raise ProtocolError("'k' is not one routing key (or null) per call")
        if digests is not None and (type(digests) is not list or len(digests) != len(ids)):
            raise ProtocolError("'d' is not one digest per call")
        outputs = entry.get("o")
        if outputs is not None and (type(outputs) is not list or any(type(o) is not str for o in outputs)):
            raise ProtocolError("'o' is not a list of names")
        model, version = _str(entry, "m"), _opt_str(entry, "v")
        inputs, pos = _unpack_tensors(metas, frames, pos, "inputs")
        total = sum(parts)
        for name, t in inputs.items():
            if t.ndim == 0 or t.shape[0] != total:
                raise ProtocolError(f"chunk input '{name}' does not hold the {total} rows of its calls")
        return key, InferChunk(ids, parts, model, version, inputs, entry.get("p"), entry.get("t"), outputs, keys,
                               [_digest(d) for d in digests] if digests is not None else None), pos
    except (InputError, ProtocolError) as e:
        return key, (e if isinstance(e, InputError) else EngineError(f"malformed call from the front end: {e}")), \
            start + len(metas)


# --------------------------------------------------------------------------- answers


def pack_answers(answers: Sequence[tuple[Any, InferAnswer | EngineError]]) -> list[Any]:
    """``answers``: (a call's id, or a chunk's ``Rows``, its answer) each."""
    head = []
    frames: list[Any] = []
    for key, a in answers:
        i = key.ids if type(key) is Rows else key
        if isinstance(a, EngineError):
            head.append({"i": i, "e": [a.kind, a.status, a.message, a.retry_after]})
            continue
        try:
            metas = _pack_tensors(a.outputs, frames)
        except (TypeError, ValueError) as e:  # an output that is no V2 tensor: the model's fault
            head.append({"i": i, "e": ["model_error", 500, f"model '{a.model}' gave an output the protocol "
                                                           f"cannot carry: {e}", None]})
            continue
        entry = {"i": i, "m": a.model, "v": a.version, "x": metas}
        if a.text is not None:
            entry["t"] = a.text
        if type(key) is Rows:
            entry["n"] = key.parts
        head.append(entry)
    return [orjson.dumps(head), *frames]


def unpack_answers(frames: Sequence[Any]) -> list[tuple[int, InferAnswer | EngineError]]:
    head = _header(frames)
    out: list[tuple[int, InferAnswer | EngineError]] = []
    pos = 1
    for entry in head:
        i = entry["i"]
        ids = i if type(i) is list else [i]
        err = entry.get("e")
        if err is not None:
            kind, status, message, retry_after = err
            out.extend((one, from_wire(kind, status, message, retry_after)) for one in ids)
            continue
        outputs, pos = _unpack_tensors(entry["x"], frames, pos, "outputs")
        if type(i) is not list:
            out.append((i, InferAnswer(entry["m"], entry["v"], outputs, entry.get("t"))))
            continue
        at = rows_mod.offsets(entry["n"])
        short = [name for name, v in outputs.items() if getattr(v, "ndim", 0) == 0 or v.shape[0] != at[-1]]
        if short:  # the model's outputs do not have one row per input row: each call gets the error
            out.extend((one, ModelFailed(f"model '{entry['m']}' gave output '{short[0]}' without one row per "
                                         f"input row ({at[-1]})")) for one in ids)
            continue
        out.extend((one, InferAnswer(entry["m"], entry["v"], {name: v[at[k]:at[k + 1]] for name, v in outputs.items()}))
                   for k, one in enumerate(ids))
    return out


# --------------------------------------------------------------------------- helpers


def _pack_tensors(tensors: dict[str, Any], frames: list[Any]) -> list[list[Any]]:
    metas = []
    for name, value in tensors.items():
        datatype, shape, data = codec.tensor_to_bytes(name, value)
        metas.append([name, datatype, shape])
        frames.append(data)
    return metas


def _unpack_tensors(metas: list[Any], frames: Sequence[Any], pos: int, field: str) -> tuple[dict[str, Any], int]:
    tensors: dict[str, Any] = {}
    for meta in metas:
        if type(meta) is not list or len(meta) != 3 or type(meta[0]) is not str:
            raise ProtocolError(f"a tensor of '{field}' is not [name, datatype, shape]")
        name, datatype, shape = meta
        tensors[name] = codec.tensor_from_bytes(_frame(frames, pos), datatype, shape, f"{field}.{name}")
        pos += 1
    return tensors, pos


def _skip(entry: dict[str, Any], pos: int) -> int:
    """Where the next call's frames start, past a call that failed part-way."""
    if entry.get("r") == 1:
        return pos + 1
    metas = entry.get("x")
    return pos + len(metas) if type(metas) is list else pos


def _header(frames: Sequence[Any]) -> list[Any]:
    if not frames:
        raise ProtocolError("empty message")
    try:
        head = orjson.loads(_buffer(frames[0]))
    except orjson.JSONDecodeError as e:
        raise ProtocolError(f"header is not JSON: {e}") from None
    if type(head) is not list:
        raise ProtocolError("header is not a list")
    return head


def _frame(frames: Sequence[Any], pos: int) -> Any:
    if pos >= len(frames):
        raise ProtocolError("fewer frames than the header declares")
    return _buffer(frames[pos])


def _buffer(frame: Any) -> Any:
    """A frame's bytes without copying (a zmq.Frame's buffer; a memoryview or bytes as they are)."""
    return frame.buffer if hasattr(frame, "buffer") else frame


def _digest(value: Any) -> bytes | None:
    if value is None:
        return None
    if type(value) is not str or len(value) != 32:
        raise ProtocolError("'d' is not a 128-bit hex digest")
    try:
        return bytes.fromhex(value)
    except ValueError:
        raise ProtocolError("'d' is not a 128-bit hex digest") from None


def _str(entry: dict[str, Any], key: str) -> str:
    value = entry.get(key)
    if type(value) is not str:
        raise ProtocolError(f"'{key}' is not a string")
    return value


def _opt_str(entry: dict[str, Any], key: str) -> str | None:
    value = entry.get(key)
    if value is not None and type(value) is not str:
        raise ProtocolError(f"'{key}' is not a string")
    return value
