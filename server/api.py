"""The operator's face: the control API under ``/api/``, the event stream, and ``GET /v1/models``.

Everything the console shows comes from ``GET /api/snapshot`` and
``GET /api/events``; everything it changes goes through a control call here,
so ``modelconsole --attach`` can do over HTTP what the embedded console does
in-process.  Each control call is one engine call, which writes its audit row
(and the state it changes) to the store before the call is answered.

Documented in ``docs/api.md``; ``docs/openapi.yaml`` describes every route
and a test checks the running server against it.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import math
import time
from typing import Any

from aiohttp import web

from modelconsole.scheduler.routing import DEFAULT_STEPS

from .web import CLOSING, ENGINE, SETTINGS, STARTED, VERSION, HttpError, dumps, json_response, read_json

STATES = ("UNLOADED", "LOADING", "WARMING", "READY", "UNLOADING", "FAILED")
REGISTER_KEYS = ("name", "version", "source", "options")
SNAPSHOT_EVENTS = 100  # recent events carried in a snapshot
SWAP_KEYS = ("version",)
SPLIT_KEYS = ("weights", "shadow", "metric_output")
CANARY_KEYS = ("version", "steps", "interval_s", "max_error_rate", "max_p95_ratio", "min_requests")


def add_routes(app: web.Application) -> None:
    r = app.router
    r.add_get("/api/snapshot", snapshot)
    r.add_get("/api/events", events, allow_head=False)  # a stream: HEAD would get its bytes
    r.add_get("/api/audit", audit)
    r.add_get("/api/models", list_models)
    r.add_post("/api/models", register)
    r.add_get("/api/models/{name}", get_model)
    r.add_delete("/api/models/{name}", delete_model)
    r.add_delete("/api/models/{name}/versions/{version}", delete_version)
    for action in ("load", "unload", "evict", "pin", "unpin"):
        r.add_post(f"/api/models/{{name}}/{action}", _control(action))
    r.add_put("/api/models/{name}/priority", set_priority)
    r.add_post("/api/models/{name}/swap", swap)
    r.add_put("/api/models/{name}/split", set_split)
    r.add_post("/api/models/{name}/canary", start_canary)
    r.add_delete("/api/models/{name}/canary", stop_canary)
    r.add_get("/api/models/{name}/routing", get_routing)
    r.add_get("/v1/models", v1_models)
    r.add_get("/v1/models/{name}", v1_model)


# --------------------------------------------------------------------------- observation


def build_snapshot(engine: Any, server: dict[str, Any]) -> dict[str, Any]:
    """What ``GET /api/snapshot`` answers (and the embedded console reads in-process):
    the engine's snapshot, ``server`` facts, and the most recent events."""
    snap = engine.snapshot()
    snap["server"] = server
    snap["events"] = [e.to_dict() for e in list(engine.events.recent)[-SNAPSHOT_EVENTS:]]
    snap["ts"] = time.time()
    return snap


def full_snapshot(app: web.Application) -> dict[str, Any]:
    engine = app[ENGINE]
    return build_snapshot(engine, {
        "version": VERSION,
        "started": app[STARTED],
        "uptime_s": time.time() - app[STARTED],
        "accepting": engine.accepting,
        "token_required": app[SETTINGS].token is not None,
    })


async def snapshot(request: web.Request) -> web.Response:
    return json_response(full_snapshot(request.app))


def _sse(kind: str, data: Any, event_id: int | None = None) -> bytes:
    head = f"id: {event_id}\n" if event_id is not None else ""
    return f"{head}event: {kind}\ndata: ".encode() + dumps(data) + b"\n\n"


async def events(request: web.Request) -> web.StreamResponse:
    """Server-sent events: ``event`` for each engine event (``id`` = its sequence number, so a
    client reconnecting with ``Last-Event-ID`` gets what it missed, as far as the engine's
    recent history reaches), ``snapshot`` every ``snapshot_interval_s`` (and at once), and
    ``dropped`` when this client read too slowly and lost events."""
    app = request.app
    engine = app[ENGINE]
    closing: asyncio.Event = app[CLOSING]
    interval = app[SETTINGS].snapshot_interval_s
    given = [(f, v) for f, v in (("Last-Event-ID", request.headers.get("Last-Event-ID")),
                                 ("last_event_id", request.query.get("last_event_id"))) if v is not None]
    for field, value in given:  # both are checked; the header wins when both are given
        if not (value.isascii() and value.isdigit() and len(value) <= 18):
            raise HttpError(400, f"{field}: expected an event sequence number (an integer >= 0), got {value!r}")
    raw = given[0][1] if given else None
    last_seq = int(raw) if raw is not None else 0
    if closing.is_set():  # a console reconnecting to a server that is stopping: not "reconnected"
        raise HttpError(503, "the server is shutting down", {"Retry-After": "2"})
    resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache",
                                       "X-Accel-Buffering": "no"})
    await resp.prepare(request)
    loop = asyncio.get_running_loop()
    with engine.subscribe(maxsize=1000) as sub:
        await resp.write(b"retry: 2000\n\n")
        if raw is not None:
            recent = list(engine.events.recent)
            if recent and last_seq > recent[-1].seq or not recent:
                last_seq = 0  # an id from before a restart: this run's numbering began again
            missed = [ev for ev in recent if ev.seq > last_seq]
            if missed and missed[0].seq > last_seq + 1:  # older than the history kept: say how many are gone
                await resp.write(_sse("dropped", {"count": missed[0].seq - last_seq - 1}))
            for ev in recent:
                if ev.seq > last_seq:
                    await resp.write(_sse("event", ev.to_dict(), ev.seq))
                    last_seq = ev.seq
        await resp.write(_sse("snapshot", full_snapshot(app)))
        next_snapshot = loop.time() + interval
        dropped = 0
        stopping = asyncio.ensure_future(closing.wait())
        try:
            while not closing.is_set():
                got = asyncio.ensure_future(sub.get())
                await asyncio.wait((got, stopping), timeout=max(0.0, next_snapshot - loop.time()),
                                   return_when=asyncio.FIRST_COMPLETED)
                if not got.done():
                    got.cancel()
                    if closing.is_set():
                        # the last word: a console says "shutting down", not "lost; reconnecting"
                        await resp.write(_sse("stopping", {"reason": "the server is shutting down"}))
                        break
                    await resp.write(_sse("snapshot", full_snapshot(app)))
                    next_snapshot = loop.time() + interval
                    continue
                ev = got.result()
                if sub.dropped != dropped:
                    await resp.write(_sse("dropped", {"count": sub.dropped - dropped}))
                    dropped = sub.dropped
                if ev.seq > last_seq:
                    await resp.write(_sse("event", ev.to_dict(), ev.seq))
                    last_seq = ev.seq
        except (ConnectionResetError, asyncio.CancelledError):
            pass  # the client went away, or the server is stopping
        finally:
            stopping.cancel()
    return resp


async def audit(request: web.Request) -> web.Response:
    limit = _int_param(request, "limit", 100, 1, 10_000)
    model = request.query.get("model")
    return json_response({"entries": await request.app[ENGINE].audit_log(limit, model)})


async def list_models(request: web.Request) -> web.Response:
    return json_response({"models": request.app[ENGINE].snapshot_models()})


async def get_model(request: web.Request) -> web.Response:
    name = request.match_info["name"]
    engine = request.app[ENGINE]
    engine.instance(name)  # 404 for an unknown name
    return json_response({"name": name, "versions": engine.snapshot_models(name)})


# --------------------------------------------------------------------------- control


async def register(request: web.Request) -> web.Response:
    """``{"name", "version"?, "source", "options"?: {config keys}}`` -> 201 and the new version."""
    body = await read_json(request)
    unknown = [k for k in body if k not in REGISTER_KEYS]
    if unknown:
        raise HttpError(400, f"{unknown[0]}: unknown field (expected {', '.join(REGISTER_KEYS)}; "
                             "model settings go in options)")
    for key in ("name", "source"):
        if key not in body:
            raise HttpError(400, f"{key}: required")
    options = body.get("options", {})
    if not isinstance(options, dict):
        raise HttpError(400, f"options: expected an object of model settings, got {type(options).__name__}")
    clash = [k for k in options if k in ("name", "version", "source")]
    if clash:
        raise HttpError(400, f"options.{clash[0]}: give {clash[0]} at the top level, not in options")
    raw = {k: body[k] for k in ("name", "version", "source") if k in body}
    if "version" in raw and isinstance(raw["version"], int) and not isinstance(raw["version"], bool):
        raw["version"] = str(raw["version"])
    raw.update(options)
    engine = request.app[ENGINE]
    snap = await engine.register(raw, actor=_actor(request))
    return json_response(_listed(engine, snap), status=201)


def _listed(engine: Any, snap: dict[str, Any]) -> dict[str, Any]:
    """A version's snapshot as the lists give it (with ``active`` and ``origin``)."""
    for s in engine.snapshot_models(snap["name"]):
        if s["version"] == snap["version"]:
            return s
    return snap


def _actor(request: web.Request) -> str:
    return request.headers.get("X-Modelconsole-Actor", "api")[:64] or "api"


CONTROL_KEYS = ("version",)


async def _version_of(request: web.Request) -> str | None:
    """The version a control call names: ``{"version": ...}`` in the body, else ``?version=``,
    else None (the active one).  ``{}`` is the body that names none."""
    body = await read_json(request, optional=True)
    _only(body, CONTROL_KEYS)
    return _body_or_query_version(request, body)


def _body_or_query_version(request: web.Request, body: dict[str, Any]) -> str | None:
    """Both are checked when both are given; the body's wins."""
    query = request.query.get("version")
    from_query = _as_version(query, "?version") if query is not None else None
    return _as_version(body["version"], "version") if "version" in body else from_query


def _control(action: str) -> Any:
    async def handler(request: web.Request) -> web.Response:
        engine = request.app[ENGINE]
        name = request.match_info["name"]
        version = await _version_of(request)
        actor = _actor(request)
        # ?node=ID: on a fleet (cluster/), act on that node only; without it, the whole fleet
        where = {"node": request.query["node"]} if "node" in request.query else {}
        if where and not hasattr(engine, "nodes"):
            raise HttpError(400, "node: only a fleet (--serve --cluster) has nodes; leave it out here")
        if action == "load":
            snap = await engine.load(name, version, actor=actor, **where)
        elif action == "unload":
            snap = await engine.unload(name, version, actor=actor, **where)
        elif action == "evict":
            snap = await engine.evict(name, version, actor=actor, **where)
        else:
            snap = await engine.pin(name, version, pinned=action == "pin", actor=actor, **where)
        return json_response(_listed(engine, snap))

    handler.__name__ = f"control_{action}"
    return handler


async def delete_model(request: web.Request) -> web.Response:
    """The model name and every version of it, for good (409 while one is loaded, routed, or from
    the config file; the message says which)."""
    result = await request.app[ENGINE].delete(request.match_info["name"], None, actor=_actor(request))
    return json_response(result)


async def delete_version(request: web.Request) -> web.Response:
    version = _as_version(request.match_info["version"], "version")
    result = await request.app[ENGINE].delete(request.match_info["name"], version, actor=_actor(request))
    return json_response(result)


async def set_priority(request: web.Request) -> web.Response:
    body = await read_json(request)
    if "priority" not in body:
        raise HttpError(400, "priority: required (an integer, 1 is most urgent)")
    _only(body, ("priority", "version"))
    version = _body_or_query_version(request, body)
    engine = request.app[ENGINE]
    snap = await engine.set_priority(request.match_info["name"], version, body["priority"], actor=_actor(request))
    return json_response(_listed(engine, snap))


# --------------------------------------------------------------------------- versions: swap, split, canary
#
# The handlers check the body's shape (known fields, types) and name the field when it is wrong;
# the engine checks the meaning (versions exist, weights sum to something positive, nothing else
# under way) and answers 400/404/409 with its own message.  Each is one engine call, audited.


def _only(body: dict[str, Any], allowed: tuple[str, ...]) -> None:
    unknown = [k for k in body if k not in allowed]
    if unknown:
        expected = f"expected {', '.join(allowed)}" if allowed else "this call takes no fields"
        raise HttpError(400, f"{unknown[0]}: unknown field ({expected})")


MAX_VERSION = 999_999_999  # config.py's rule: up to nine digits, no leading zero


def _as_version(value: Any, field: str) -> str:
    """A version number (``VersionRef`` in docs/openapi.yaml): a string of digits from "1" to
    "999999999" without a leading zero, or that integer (JSON has one number type: ``2.0`` is 2)."""
    if isinstance(value, float) and not isinstance(value, bool) and value.is_integer():
        value = int(value)
    if isinstance(value, int) and not isinstance(value, bool) and 1 <= value <= MAX_VERSION:
        return str(value)
    if isinstance(value, str) and value.isascii() and value.isdigit() and value[0] != "0" and len(value) <= 9:
        return value
    raise HttpError(400, f"{field}: expected a version number from 1 to {MAX_VERSION} such as \"2\", "
                         f"got {json.dumps(value)}")


def _as_number(value: Any, field: str) -> float:
    if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
        return value
    raise HttpError(400, f"{field}: expected a number, got {json.dumps(value)}")


async def swap(request: web.Request) -> web.Response:
    """``{"version": "2"}`` -> ``{"name", "from", "to", "seconds"}`` once the new version serves."""
    body = await read_json(request)
    _only(body, SWAP_KEYS)
    if "version" not in body:
        raise HttpError(400, "version: required (the version to swap to, such as \"2\")")
    version = _as_version(body["version"], "version")
    result = await request.app[ENGINE].swap(request.match_info["name"], version, actor=_actor(request))
    return json_response(result)


async def set_split(request: web.Request) -> web.Response:
    """``{"weights": {"1": 90, "2": 10}, "shadow"?: ["3"], "metric_output"?: "logits"}`` -> the
    routing; ``{"weights": {}}`` clears the split."""
    body = await read_json(request)
    _only(body, SPLIT_KEYS)
    if "weights" not in body:
        raise HttpError(400, 'weights: required (an object of version -> weight, such as {"1": 90, "2": 10}; '
                             "{} clears the split)")
    raw = body["weights"]
    if not isinstance(raw, dict):
        raise HttpError(400, f"weights: expected an object of version -> weight, got {json.dumps(raw)}")
    weights = {}
    for key, value in raw.items():
        version = _as_version(key, f"weights (key {json.dumps(key)})")
        weights[version] = _as_number(value, f"weights.{key}")
    shadow = body.get("shadow")
    if shadow is not None:
        if not isinstance(shadow, list):
            raise HttpError(400, f"shadow: expected a list of versions such as [\"3\"], got {json.dumps(shadow)}")
        shadow = [_as_version(v, f"shadow[{i}]") for i, v in enumerate(shadow)]
    metric = body.get("metric_output")
    if metric is not None and not isinstance(metric, str):
        raise HttpError(400, f"metric_output: expected an output name (a string), got {json.dumps(metric)}")
    routing = await request.app[ENGINE].set_split(request.match_info["name"], weights, shadow=shadow,
                                                  metric_output=metric, actor=_actor(request))
    return json_response(routing)


async def start_canary(request: web.Request) -> web.Response:
    """``{"version": "2", "steps"?: [5, 25, 50, 100], "interval_s"?: 60, "max_error_rate"?: 0.05,
    "max_p95_ratio"?: 2.0, "min_requests"?: 20}`` -> the routing with the canary under way."""
    body = await read_json(request)
    _only(body, CANARY_KEYS)
    if "version" not in body:
        raise HttpError(400, "version: required (the new version to roll out, such as \"2\")")
    kw: dict[str, Any] = {}
    version = _as_version(body["version"], "version")
    if "steps" in body:
        steps = body["steps"]
        if not isinstance(steps, list):
            raise HttpError(400, f"steps: expected a list of percentages such as {list(DEFAULT_STEPS)}, "
                                 f"got {json.dumps(steps)}")
        kw["steps"] = tuple(_as_number(v, f"steps[{i}]") for i, v in enumerate(steps))
    for key in ("interval_s", "max_error_rate", "max_p95_ratio"):
        if key in body:
            kw[key] = _as_number(body[key], key)
    if "min_requests" in body:
        n = body["min_requests"]
        if isinstance(n, float) and n.is_integer() and abs(n) < 2**53:
            n = int(n)  # JSON has one number type: 20.0 is the integer 20 (as JSON Schema reads it)
        if not isinstance(n, int) or isinstance(n, bool):
            raise HttpError(400, f"min_requests: expected an integer, got {json.dumps(n)}")
        kw["min_requests"] = n
    routing = await request.app[ENGINE].start_canary(request.match_info["name"], version,
                                                     actor=_actor(request), **kw)
    return json_response(routing)


async def stop_canary(request: web.Request) -> web.Response:
    """Abort the canary: the new arm's share goes to 0 and the baseline keeps serving."""
    body = await read_json(request, optional=True)
    _only(body, ())
    routing = await request.app[ENGINE].stop_canary(request.match_info["name"], actor=_actor(request))
    return json_response(routing)


async def get_routing(request: web.Request) -> web.Response:
    return json_response(request.app[ENGINE].routing(request.match_info["name"]))


# --------------------------------------------------------------------------- GET /v1/models


def _int_param(request: web.Request, key: str, default: int, lo: int, hi: int) -> int:
    raw = request.query.get(key)
    if raw is None:
        return default
    try:
        value = int(raw)
    except ValueError:
        value = lo - 1
    if not lo <= value <= hi:
        raise HttpError(400, f"{key}: expected an integer from {lo} to {hi}, got '{raw}'")
    return value


def health(snap: dict[str, Any]) -> str:
    """``failed`` (cannot load, or a forward pass stalled past its requests' deadlines),
    ``degraded`` (p95 over its latency target, queue ≥ 90% full, or over 5% of answers failed
    in the model), else ``ok``."""
    if snap["state"] == "FAILED" or snap.get("stalled"):
        return "failed"
    st = snap["stats"]
    p95 = st["latency_ms"]["p95"]
    cfg = snap["config"]
    errors = st["failures"].get("model_error", 0)
    answered = st["success"] + st["fail"]
    if (p95 is not None and p95 > snap["latency_target_ms"]) \
            or snap["queue"] >= 0.9 * cfg.get("max_queue_size", 1024) \
            or (answered >= 20 and errors / answered > 0.05):
        return "degraded"
    return "ok"


def _version_entry(snap: dict[str, Any]) -> dict[str, Any]:
    st = snap["stats"]
    answered = st["cache_hits"] + st["cache_misses"]
    return {
        "version": snap["version"],
        "active": snap["active"],
        "state": snap["state"],
        "reason": snap["reason"],
        "device": snap["device"],
        "memory_bytes": snap["footprint_bytes"],
        "pinned": snap["pinned"],
        "trusted": snap["trusted"],
        "priority": snap["config"].get("priority"),
        "health": health(snap),
        "metrics": {
            "request_rate": round(snap["request_rate"], 3),
            "throughput_rps": round(st["throughput_rps"], 3),
            "error_rps": round(st["error_rps"], 3),
            "queue": snap["queue"],
            "waiting_for_room": snap["waiting_for_room"],
            "in_flight": snap["in_flight"],
            "success": st["success"],
            "fail": st["fail"],
            "p50_ms": st["latency_ms"]["p50"],
            "p95_ms": st["latency_ms"]["p95"],
            "cache_hit_ratio": st["cache_hits"] / answered if answered else None,
        },
    }


def v1_list(snaps: list[dict[str, Any]]) -> list[dict[str, Any]]:
    by_name: dict[str, list[dict[str, Any]]] = {}
    for s in snaps:
        by_name.setdefault(s["name"], []).append(s)
    out = []
    for name, versions in by_name.items():
        entries = [_version_entry(s) for s in versions]
        active = next((e for e in entries if e["active"]), entries[0])
        out.append({
            "id": name,
            "object": "model",
            # OpenAI's fields: when the name's first version was registered (Unix seconds), and who serves it
            "created": int(min((s.get("registered_at") or 0.0) for s in versions)),
            "owned_by": "modelconsole",
            "active_version": active["version"],
            "state": active["state"],
            "health": active["health"],
            "versions": entries,
        })
    return out


async def v1_model(request: web.Request) -> web.Response:
    """One model as ``/v1/models`` lists it (OpenAI's ``GET /v1/models/{id}``)."""
    name = request.match_info["name"]
    models = v1_list(request.app[ENGINE].snapshot_models(name))
    if not models:
        request.app[ENGINE].instance(name)  # 404 with the engine's message
        raise HttpError(404, f"unknown model '{name}'")
    return json_response(models[0])


async def v1_models(request: web.Request) -> web.Response:
    """One aggregated list; ``?state=`` (any version in that state), ``?q=`` (name contains,
    case-insensitive), ``limit`` (1–1000, default 100) and ``after`` (the last name of the
    previous page).  An ETag over the body: a client polling with If-None-Match gets 304."""
    q = request.query
    state = q.get("state")
    if state is not None and state.upper() not in STATES:
        raise HttpError(400, f"state: expected one of {', '.join(STATES)}, got '{state}'")
    limit = _int_param(request, "limit", 100, 1, 1000)
    after = q.get("after")
    needle = q.get("q", "").lower()
    models = v1_list(request.app[ENGINE].snapshot_models())
    if state is not None:
        models = [m for m in models if any(v["state"] == state.upper() for v in m["versions"])]
    if needle:
        models = [m for m in models if needle in m["id"].lower()]
    if after is not None:
        models = [m for m in models if m["id"] > after]
    page = models[:limit]
    body = dumps({
        "object": "list",
        "data": page,
        "has_more": len(models) > limit,
        "next_after": page[-1]["id"] if len(models) > limit else None,
    })
    etag = '"' + hashlib.blake2b(body, digest_size=16).hexdigest() + '"'
    inm = request.headers.get("If-None-Match")
    if inm is not None and (inm.strip() == "*" or etag in [t.strip() for t in inm.split(",")]):
        return web.Response(status=304, headers={"ETag": etag})
    return web.Response(body=body, content_type="application/json", headers={"ETag": etag})
