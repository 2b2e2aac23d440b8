"""KServe V2 / Open Inference Protocol, as Triton extends it and ``tritonclient[http]`` speaks it.

Facts the handlers rely on are in ``docs/api.md`` and ``docs/design.md``.  What this server
implements, and says so in ``GET /v2``:

* core: health live/ready, server and model metadata, model ready, infer
  (JSON and the binary tensor extension, every V2 datatype plus BF16,
  gzip/deflate request bodies, compressed answers when asked for);
* ``model_configuration``: Triton's model-config JSON, so perf_analyzer runs;
* ``schedule_policy``: request parameters ``priority`` (0 = the model's
  default, 1 = most urgent) and ``timeout`` (microseconds; only shortens);
* ``model_repository``: index (an empty body is fine, with ``Content-Length: 0``
  as tritonclient sends it or with no Content-Length at all, as curl -X POST
  sends it), load, unload;
* ``statistics``: Triton's per-model statistics.

Routing: a request with no version goes where the engine routes it (the
active version, or an arm of the model's A/B split or canary); the answer's
``model_version`` says which version served.  A routing key (request
parameter ``routing_key``, else the ``X-Routing-Key`` header) keeps one
client on one arm; a request with a version in the URL ignores the split.
The request is checked against the inputs of the version that serves it
(which may not be the active one): a JSON body's tensors name themselves and
the engine validates them there, and a raw binary body
(``Inference-Header-Content-Length: 0``) is decoded by the engine against
that version's one input once it has routed the request.

Handlers only translate.  Every error is an ``EngineError`` (or an
``HttpError`` for a malformed URL or body) that the app's guard turns into
``{"error": ...}`` with Triton's status code.
"""

from __future__ import annotations

import json
import time
from typing import Any

from aiohttp import web

from modelconsole.scheduler import textenc
from modelconsole.scheduler.errors import ModelNotFound
from modelconsole.scheduler.tensors import TensorSpec

from . import codec
from .ipc import InferCall
from .web import CLOSING, ENGINE, LINK, VERSION, HttpError, json_response, read_body, read_json

EXTENSIONS = ["binary_tensor_data", "model_configuration", "schedule_policy", "model_repository", "statistics"]

# V2 datatype -> Triton model-config data_type
CONFIG_TYPES = {
    "BOOL": "TYPE_BOOL", "UINT8": "TYPE_UINT8", "UINT16": "TYPE_UINT16", "UINT32": "TYPE_UINT32",
    "UINT64": "TYPE_UINT64", "INT8": "TYPE_INT8", "INT16": "TYPE_INT16", "INT32": "TYPE_INT32",
    "INT64": "TYPE_INT64", "FP16": "TYPE_FP16", "FP32": "TYPE_FP32", "FP64": "TYPE_FP64",
    "BYTES": "TYPE_STRING", "BF16": "TYPE_BF16",
}
# Our lifecycle states -> the repository extension's
REPO_STATES = {"READY": "READY", "LOADING": "LOADING", "WARMING": "LOADING", "UNLOADING": "UNLOADING",
               "UNLOADED": "UNAVAILABLE", "FAILED": "UNAVAILABLE"}

_HEADER_LENGTH = "Inference-Header-Content-Length"
_ENGINE_MS = "X-Modelconsole-Engine-Ms"
_ROUTING_HEADER = "X-Routing-Key"


def add_routes(app: web.Application) -> None:
    r = app.router
    # infer first: aiohttp tries the /v2/models/{name}... routes in registration order
    r.add_post("/v2/models/{name}/infer", infer)
    r.add_post("/v2/models/{name}/versions/{version}/infer", infer)
    r.add_get("/v2/health/live", live)
    r.add_get("/v2/health/ready", ready)
    r.add_get("/v2", server_metadata)
    r.add_get("/v2/models/stats", statistics)
    r.add_post("/v2/repository/index", repository_index)
    r.add_post("/v2/repository/models/{name}/load", repository_load)
    r.add_post("/v2/repository/models/{name}/unload", repository_unload)
    for base in ("/v2/models/{name}", "/v2/models/{name}/versions/{version}"):
        r.add_get(base, model_metadata)
        r.add_get(base + "/ready", model_ready)
        r.add_get(base + "/config", model_config)
        r.add_get(base + "/stats", statistics)


# --------------------------------------------------------------------------- helpers


def _version(request: web.Request) -> str | None:
    v = request.match_info.get("version")
    if v is not None and not v.isdigit():
        raise HttpError(400, f"model version: expected a number (as in /versions/2), got '{v}'")
    return v


def _versions(engine: Any, name: str) -> list[str]:
    return [s["version"] for s in engine.snapshot_models(name)]


# --------------------------------------------------------------------------- health and metadata


async def live(request: web.Request) -> web.Response:
    return web.Response(status=200)


async def ready(request: web.Request) -> web.Response:
    if request.app[LINK].ready and not request.app[CLOSING].is_set():
        return web.Response(status=200)
    return web.Response(status=400)


# The answers as documents of the engine (the HTTP handlers below, and gRPC in the same process:
# grpc_v2.py calls these rather than HTTP to its own app)


def server_doc() -> dict[str, Any]:
    return {"name": "modelconsole", "version": VERSION, "extensions": EXTENSIONS}


def metadata_doc(engine: Any, name: str, version: str | None) -> dict[str, Any]:
    inst = engine.instance(name, version)
    return {
        "name": inst.name,
        "versions": _versions(engine, inst.name),
        "platform": inst.platform or "pytorch_libtorch",
        "inputs": _specs(public_inputs(inst)),
        "outputs": _specs(inst.outputs),
    }


def ready_check(engine: Any, name: str, version: str | None) -> None:
    """Nothing when the version is READY; HttpError 400 saying its state otherwise (404: unknown)."""
    inst = engine.instance(name, version)
    if inst.state == "READY":
        return
    hint = " (it loads on its first request)" if inst.state == "UNLOADED" else ""
    reason = f": {inst.reason}" if inst.reason else ""
    raise HttpError(400, f"model '{inst.name}' version {inst.version} is {inst.state}{reason}{hint}")


def config_doc(engine: Any, name: str, version: str | None) -> dict[str, Any]:
    inst = engine.instance(name, version)
    return triton_config(inst, _versions(engine, inst.name))


def stats_doc(engine: Any, name: str | None, version: str | None) -> dict[str, Any]:
    if name is None:
        snaps = engine.snapshot_models()
    else:
        inst = engine.instance(name, version)  # 404 for an unknown model or version
        snaps = [s for s in engine.snapshot_models(name) if version is None or s["version"] == inst.version]
    return {"model_stats": [triton_stats(s) for s in snaps]}


async def server_metadata(request: web.Request) -> web.Response:
    return json_response(server_doc())


def _specs(specs: Any) -> list[dict[str, Any]]:
    return [s.to_dict() for s in specs] if specs else []


async def model_metadata(request: web.Request) -> web.Response:
    return json_response(metadata_doc(request.app[ENGINE], request.match_info["name"], _version(request)))


def public_inputs(inst: Any) -> Any:
    """What a client sends: ``text`` (and ``text_pair``) for a model that takes text, its token
    ids being the front end's business; else the declared inputs."""
    plan = inst.text_plan
    if plan is None:
        return inst.inputs
    return (TensorSpec(textenc.TEXT, "BYTES", (-1,)),
            *((TensorSpec(textenc.TEXT_PAIR, "BYTES", (-1,)),) if plan.pair else ()))


async def model_ready(request: web.Request) -> web.Response:
    ready_check(request.app[ENGINE], request.match_info["name"], _version(request))
    return web.Response(status=200)


def _config_tensors(specs: Any, batching: bool) -> list[dict[str, Any]]:
    out = []
    for s in specs or ():
        dims = list(s.shape[1:] if batching and s.shape else s.shape)
        out.append({"name": s.name, "data_type": CONFIG_TYPES[s.datatype], "dims": dims})
    return out


def triton_config(inst: Any, versions: list[str]) -> dict[str, Any]:
    """The model as Triton's model-config JSON (what perf_analyzer reads)."""
    cfg = inst.cfg
    batching = cfg.max_batch_size > 0
    on_gpu = str(inst.device or cfg.device).startswith("cuda")
    ready = [r for r in inst.replica_set if r.state == "READY"]
    group: dict[str, Any] = {"name": inst.name, "kind": "KIND_GPU" if on_gpu else "KIND_CPU",
                             "count": len(ready) if ready else cfg.replicas}
    gpus = sorted({r.device.index or 0 for r in ready if r.device is not None and r.device.type == "cuda"})
    if gpus:
        group["gpus"] = gpus
    out: dict[str, Any] = {
        "name": inst.name,
        "platform": inst.platform or "pytorch_libtorch",
        "backend": "pytorch",
        "version_policy": {"specific": {"versions": [int(v) for v in versions]}},
        "max_batch_size": cfg.max_batch_size,
        "input": _config_tensors(public_inputs(inst), batching),
        "output": _config_tensors(inst.outputs, batching),
        "instance_group": [group],
        "response_cache": {"enable": bool(cfg.cache)},
        "parameters": {"modelconsole_source": {"string_value": cfg.source}},
    }
    if batching:
        out["dynamic_batching"] = {
            "max_queue_delay_microseconds": int(cfg.max_queue_delay_ms * 1000),
            "preserve_ordering": False,
            "priority_levels": cfg.priority_levels,
            "default_priority_level": cfg.priority,
            "default_queue_policy": {
                "timeout_action": "REJECT",
                "default_timeout_microseconds": int(cfg.timeout_ms * 1000),
                "allow_timeout_override": True,
                "max_queue_size": cfg.max_queue_size,
            },
        }
    return out


async def model_config(request: web.Request) -> web.Response:
    return json_response(config_doc(request.app[ENGINE], request.match_info["name"], _version(request)))


# --------------------------------------------------------------------------- infer


async def infer(request: web.Request) -> web.Response:
    """Decode, hand the call to the engine through the app's link (in process, or the engine
    core's over IPC), encode the answer."""
    link = request.app[LINK]
    name = request.match_info["name"]
    version = _version(request)
    text = await link.check(name, version)  # 404 before reading a byte of the body
    raw = request.headers.get(_HEADER_LENGTH)
    header_length = None
    if raw is not None:
        try:
            header_length = int(raw)
        except ValueError:
            header_length = -1
        if header_length < 0:
            raise HttpError(400, f"{_HEADER_LENGTH}: expected a non-negative integer, got '{raw}'")
    body = await read_body(request)
    if header_length == 0:  # the raw form: the body is the one input of the version that serves it
        req = codec.raw_request()
        call = InferCall(name, version, None, body)
    else:  # JSON (+ binary tail): every tensor names itself; the serving version validates it
        req = codec.decode_request(body, header_length)
        inputs = req.inputs
        if text is not None and textenc.TEXT in inputs:  # tokenized here, in the front end: never on the core
            inputs = await textenc.encode(text, inputs)
        call = InferCall(name, version, inputs)
    call.priority = req.priority
    call.timeout_ms = req.timeout_ms
    call.outputs = [o.name for o in req.outputs] if req.outputs else None
    call.routing_key = _routing_key(request, req)
    started = time.perf_counter()
    answer = await link.infer(call)
    # the engine's share of this answer (queue, batch, forward), so a proxy in front of this server
    # (a remote: model) can tell its network time from this server's work
    spent = {_ENGINE_MS: f"{(time.perf_counter() - started) * 1e3:.3f}"}
    payload, json_length = codec.encode_response(answer.model, answer.version, answer.outputs, req)
    if json_length is None:
        resp = web.Response(body=payload, content_type="application/json", headers=spent)
    else:
        resp = web.Response(body=payload, content_type="application/octet-stream",
                            headers={_HEADER_LENGTH: str(json_length), **spent})
    if len(payload) >= 1024 and "Accept-Encoding" in request.headers:
        resp.enable_compression()  # gzip or deflate, whichever the client accepts
    return resp


def _routing_key(request: web.Request, req: codec.V2Request) -> str | None:
    """The request parameter ``routing_key`` (a string), else the ``X-Routing-Key`` header; an
    empty key is no key.  The engine hashes it to pick the split's arm (sticky per key)."""
    key = req.parameters.get("routing_key")
    if key is None:
        key = request.headers.get(_ROUTING_HEADER)
    elif not isinstance(key, str):
        raise HttpError(400, f"parameters.routing_key: expected a string, got {json.dumps(key)}")
    return key or None


# --------------------------------------------------------------------------- repository extension


async def repository_index(request: web.Request) -> web.Response:
    body = await read_json(request, optional=True)
    only_ready = body.get("ready", False)
    if not isinstance(only_ready, bool):
        raise HttpError(400, f"ready: expected true or false, got {json.dumps(only_ready)}")
    out = []
    for snap in request.app[ENGINE].snapshot_models():
        state = REPO_STATES.get(snap["state"], "UNKNOWN")
        if only_ready and state != "READY":
            continue
        item = {"name": snap["name"], "version": snap["version"], "state": state}
        if snap["state"] == "UNLOADED":
            item["reason"] = "unloaded (loads on its first request)"
        elif snap.get("reason"):
            item["reason"] = snap["reason"]
        out.append(item)
    return json_response(out)


async def repository_load(request: web.Request) -> web.Response:
    body = await read_json(request, optional=True)
    params = body.get("parameters", {})
    if not isinstance(params, dict):
        raise HttpError(400, f"parameters: expected an object, got {json.dumps(params)}")
    unsupported = [k for k in params if k == "config" or k.startswith("file:")]
    if unsupported:
        raise HttpError(400, f"parameters.{unsupported[0]}: replacing a model's config or files at load is "
                             "not supported; register a new version with POST /api/models")
    await request.app[ENGINE].load(request.match_info["name"], actor="v2-repository")
    return web.Response(status=200)


async def repository_unload(request: web.Request) -> web.Response:
    body = await read_json(request, optional=True)
    params = body.get("parameters", {})
    if not isinstance(params, dict):
        raise HttpError(400, f"parameters: expected an object, got {json.dumps(params)}")
    if not isinstance(params.get("unload_dependents", False), bool):
        raise HttpError(400, "parameters.unload_dependents: expected true or false, "
                             f"got {json.dumps(params['unload_dependents'])}")
    engine = request.app[ENGINE]
    name = request.match_info["name"]
    snaps = engine.snapshot_models(name)
    if not snaps:
        raise ModelNotFound(f"unknown model '{name}'")
    for snap in snaps:  # Triton unloads the model: every version of it
        if snap["state"] not in ("UNLOADED", "FAILED"):
            await engine.unload(name, snap["version"], actor="v2-repository")
    return web.Response(status=200)


# --------------------------------------------------------------------------- statistics extension


def _duration(count: int, ms: float) -> dict[str, int]:
    return {"count": int(count), "ns": int(ms * 1e6)}


def triton_stats(snap: dict[str, Any]) -> dict[str, Any]:
    """One version's counters in the statistics extension's shape.

    ``success`` and ``queue`` count cache hits too (as Triton's do); compute
    counts batches run on the model.  We do not time input/output copies
    apart from the forward, so ``compute_input``/``compute_output`` carry
    counts with 0 ns, and per-batch-size durations are not split out.
    """
    st = snap["stats"]
    execs = st["execution_count"]
    last = st["last_inference"]
    return {
        "name": snap["name"],
        "version": snap["version"],
        "last_inference": int(last * 1000) if last else 0,
        "inference_count": st["inference_count"],
        "execution_count": execs,
        "inference_stats": {
            "success": _duration(st["success"], st.get("request_ms_total", 0.0)),
            "fail": _duration(st["fail"], 0.0),
            "queue": _duration(st["success"], st["queue_ms_total"]),
            "compute_input": _duration(execs, 0.0),
            "compute_infer": _duration(execs, st["compute_ms_total"]),
            "compute_output": _duration(execs, 0.0),
            "cache_hit": _duration(st["cache_hits"], 0.0),
            "cache_miss": _duration(st["cache_misses"], 0.0),
        },
        "batch_stats": [
            {"batch_size": int(size), "compute_input": _duration(n, 0.0), "compute_infer": _duration(n, 0.0),
             "compute_output": _duration(n, 0.0)}
            for size, n in st["batch_sizes"].items()
        ],
    }


async def statistics(request: web.Request) -> web.Response:
    return json_response(stats_doc(request.app[ENGINE], request.match_info.get("name"), _version(request)))

