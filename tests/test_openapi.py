"""docs/openapi.yaml against the code and a running server.

(a) the document is valid OpenAPI 3.1;
(b) it describes exactly the routes the aiohttp app registers (method and path
    template), and its enums and key lists match the code's constants;
(c) real answers of a running server (one module-scoped ``ServerThread``)
    validate against the response schema the spec gives for their status code
    (every status must be listed), with the declared content type and headers;
    request bodies the tests send validate against the request schemas;
(d) the ``bearerAuth`` requirements match what the server's guard enforces.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import struct
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
import pytest
import yaml
from aiohttp.test_utils import TestClient, TestServer
from jsonschema.exceptions import ValidationError
from openapi_schema_validator import OAS31Validator
from openapi_schema_validator import validate as schema_validate
from openapi_spec_validator import validate as spec_validate
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT202012
from serverutil import ServerThread

from modelconsole.scheduler import config as config_mod
from modelconsole.scheduler.events import Event
from modelconsole.scheduler.tensors import DATATYPES
from modelconsole.server import api, v2
from modelconsole.server.app import build_app
from modelconsole.server.web import HttpError, ServerSettings

SPEC_FILE = Path(__file__).resolve().parents[1] / "docs" / "openapi.yaml"
URI = "urn:modelconsole:openapi"
METHODS = ("get", "put", "post", "delete", "options", "head", "patch", "trace")
TOKEN = "openapi-test-token"


# --------------------------------------------------------------------------- fixtures and helpers


@pytest.fixture(scope="module")
def spec() -> dict[str, Any]:
    with open(SPEC_FILE, encoding="utf-8") as f:
        return yaml.safe_load(f)


@pytest.fixture(scope="module")
def registry(spec) -> Registry:
    """The whole document as one JSON Schema 2020-12 resource: ``#/components/...`` refs resolve in it."""
    return Registry().with_resource(URI, Resource(contents=spec, specification=DRAFT202012))


@pytest.fixture(scope="module")
def srv(tmp_path_factory):
    with ServerThread(tmp_path_factory.mktemp("openapi")) as s:
        s.call(lambda: s.engine.load("tiny"))  # READY on the simulated GPU, whatever subset of tests runs
        yield s


def _esc(segment: str) -> str:
    """A JSON-pointer segment."""
    return segment.replace("~", "~0").replace("/", "~1")


def _at(spec: dict[str, Any], pointer: str) -> Any:
    node: Any = spec
    for part in pointer.lstrip("/").split("/"):
        node = node[part.replace("~1", "/").replace("~0", "~")]
    return node


def check(registry: Registry, instance: Any, pointer: str) -> None:
    """Validate instance against the schema at ``pointer`` (``/components/schemas/X``) of the spec."""
    schema_validate(instance, {"$ref": f"{URI}#{pointer}"}, cls=OAS31Validator, registry=registry)


def schema(name: str) -> str:
    return f"/components/schemas/{name}"


def _response(spec: dict[str, Any], path: str, method: str, status: int) -> tuple[dict[str, Any], str]:
    """The response object the spec gives for this status (refs followed) and its JSON pointer."""
    responses = spec["paths"][path][method]["responses"]
    assert str(status) in responses, f"{method.upper()} {path} answered {status}, which the spec does not list"
    pointer = f"/paths/{_esc(path)}/{method}/responses/{status}"
    resp = responses[str(status)]
    while "$ref" in resp:
        pointer = resp["$ref"][1:]
        resp = _at(spec, pointer)
    return resp, pointer


def check_answer(spec, registry, path: str, method: str, status: int, headers: Any, body: bytes) -> Any:
    """The answer matches the spec: listed status, declared content type, required headers, schema."""
    resp, pointer = _response(spec, path, method, status)
    for name, header in (resp.get("headers") or {}).items():
        while "$ref" in header:
            header = _at(spec, header["$ref"][1:])
        if name not in headers:
            assert not header.get("required"), f"{method.upper()} {path} {status}: header {name} missing"
            continue
        value: Any = headers[name]
        if header["schema"].get("type") == "integer":
            value = int(value)
        schema_validate(value, header["schema"], cls=OAS31Validator)
    content = resp.get("content")
    if not content:
        assert body == b"", f"{method.upper()} {path} {status}: the spec says no body, got {body[:200]!r}"
        return None
    ctype = headers.get("Content-Type", "").split(";")[0].strip()
    assert ctype in content, f"{method.upper()} {path} {status}: Content-Type {ctype!r} not in {list(content)}"
    if ctype != "application/json":
        return body
    value = json.loads(body)
    check(registry, value, f"{pointer}/content/{_esc(ctype)}/schema")
    return value


async def request(srv, method: str, path: str, **kw) -> tuple[int, Any, bytes]:
    if method in ("POST", "PUT", "DELETE") and path.startswith("/api/") and kw.get("json") is None and "data" not in kw:
        kw["json"] = {}  # a control call is JSON, as every client sends it (the server refuses others)
    async with aiohttp.ClientSession() as s, s.request(method, srv.url + path, **kw) as r:
        return r.status, r.headers, await r.read()


def tiny_input(batch: int = 1) -> dict[str, Any]:
    return {"inputs": [{"name": "input", "shape": [batch, 64], "datatype": "FP32", "data": [0.25] * (64 * batch)}]}


def operations(spec: dict[str, Any]) -> list[tuple[str, str, dict[str, Any]]]:
    return [(p, m, op) for p, item in spec["paths"].items() for m, op in item.items() if m in METHODS]


# --------------------------------------------------------------------------- (a) valid


def test_document_is_valid_openapi_31(spec):
    assert spec["openapi"].startswith("3.1")
    spec_validate(spec)


def test_component_schemas_named_in_the_brief_exist(spec):
    names = set(spec["components"]["schemas"])
    for want in ("Error", "ModelSnapshot", "Snapshot", "Event", "V1ModelList", "V1Model", "AuditEntry",
                 "RegisterRequest", "PriorityRequest", "InferRequest", "InferResponse", "ModelMetadata",
                 "ServerMetadata", "RepositoryIndex", "ModelStats", "ModelConfig",
                 "SwapRequest", "SwapResult", "SplitRequest", "CanaryRequest", "Routing", "ArmStats"):
        assert want in names
    bearer = spec["components"]["securitySchemes"]["bearerAuth"]
    assert (bearer["type"], bearer["scheme"]) == ("http", "bearer")


# --------------------------------------------------------------------------- (b) routes and constants


def test_every_app_route_is_in_the_spec_and_back(spec, srv):
    app_routes = set()
    heads = set()
    for route in srv.server.app.router.routes():
        path = route.resource.canonical
        if route.method == "HEAD":  # aiohttp adds HEAD to every GET route but the event stream
            heads.add(path)
            continue
        app_routes.add((path, route.method.lower()))
    spec_routes = {(p, m) for p, m, _ in operations(spec)}
    assert app_routes - spec_routes == set(), "routes the server has and the spec lacks"
    assert spec_routes - app_routes == set(), "routes the spec describes and the server lacks"
    assert heads == {p for p, m in app_routes if m == "get"} - {"/api/events"}


def test_path_parameters_are_declared(spec):
    for path, method, op in operations(spec):
        declared = set()
        for p in spec["paths"][path].get("parameters", []) + op.get("parameters", []):
            if "$ref" in p:
                p = _at(spec, p["$ref"][1:])
            if p["in"] == "path":
                declared.add(p["name"])
        wanted = {seg[1:-1] for seg in path.split("/") if seg.startswith("{")}
        assert declared == wanted, f"{method.upper()} {path}"


def test_enums_and_key_lists_match_the_code(spec):
    s = spec["components"]["schemas"]
    assert s["State"]["enum"] == list(api.STATES)
    assert set(s["Datatype"]["enum"]) == set(DATATYPES)
    assert set(s["ModelConfigTensor"]["properties"]["data_type"]["enum"]) == set(v2.CONFIG_TYPES.values())
    assert set(v2.REPO_STATES.values()) | {"UNKNOWN"} == set(
        s["RepositoryIndex"]["items"]["properties"]["state"]["enum"])
    assert s["ServerMetadata"]["properties"]["extensions"]["examples"][0] == v2.EXTENSIONS
    # register: the top-level keys, and the options are exactly the model settings but name/version/source
    assert set(s["RegisterRequest"]["properties"]) == set(api.REGISTER_KEYS)
    assert set(s["ModelOptions"]["properties"]) == set(config_mod.MODEL_KEYS) - {"name", "version", "source"}
    # a snapshot's config: ModelConfig.to_dict(), every optional key included
    full = config_mod.model_from_dict({
        "name": "m", "source": "safetensors:w.safetensors", "factory": "pkg.mod:make", "args": {"a": 1},
        "dtype": "FP16", "keep_alive": 5, "estimate_mib": 10, "rate_limit": {"rps": 5},
        "inputs": [{"name": "x", "datatype": "FP32", "shape": [-1, 4]}],
        "outputs": [{"name": "y", "datatype": "FP32", "shape": [-1, 2]}],
    }).to_dict()
    settings_keys = set(s["ModelSettings"]["properties"]) | set(s["ModelOptions"]["properties"])
    assert set(full) <= settings_keys
    bare = config_mod.model_from_dict({"name": "m", "source": "zoo:tiny-mlp"}).to_dict()
    assert set(s["ModelSettings"]["required"]) == set(bare)
    assert set(s["Event"]["required"]) == {f.name for f in dataclasses.fields(Event)}
    # versions: the bodies' keys are what the handlers accept
    assert set(s["SwapRequest"]["properties"]) == set(api.SWAP_KEYS)
    assert set(s["SplitRequest"]["properties"]) == set(api.SPLIT_KEYS)
    assert set(s["CanaryRequest"]["properties"]) == set(api.CANARY_KEYS)


def test_request_schemas_refuse_what_the_server_refuses(registry):
    good = {"name": "x", "source": "zoo:tiny-mlp", "version": 2, "options": {"args": {"hidden": 8}, "priority": 1}}
    check(registry, good, schema("RegisterRequest"))
    for bad in ({"source": "zoo:tiny-mlp"},
                {"name": "x", "source": "zoo:tiny-mlp", "colour": 1},
                {"name": "x", "source": "zoo:tiny-mlp", "options": {"name": "y"}},
                {"name": "x", "source": "zoo:tiny-mlp", "options": {"batch": 4}},
                {"name": "x", "source": "zoo:tiny-mlp", "options": {"max_batch_size": "big"}},
                {"name": "bad name!", "source": "zoo:tiny-mlp"},
                {"name": "x", "source": "zoo"}):
        with pytest.raises(ValidationError):
            check(registry, bad, schema("RegisterRequest"))
    check(registry, {"priority": 1, "version": "1"}, schema("PriorityRequest"))
    check(registry, {"priority": 1, "version": 1}, schema("PriorityRequest"))
    for bad in ({}, {"priority": "1"}, {"priority": 1, "version": 0}, {"priority": 1, "version": "01"},
                {"priority": 1, "version": None}, {"priority": 1, "colour": 1}):
        with pytest.raises(ValidationError):
            check(registry, bad, schema("PriorityRequest"))
    # a version: the schema and the server's parser accept exactly the same values
    for value in ("1", "2", "999999999", 1, 2, 600.0, 999999999, "0", "01", "1000000000", 0, -1, 1e9, 2.5,
                  None, True, "", "2a", "٣", [1]):
        try:
            check(registry, value, schema("VersionRef"))
            schema_ok = True
        except ValidationError:
            schema_ok = False
        try:
            api._as_version(value, "version")
            server_ok = True
        except HttpError:
            server_ok = False
        assert schema_ok == server_ok, (value, schema_ok, server_ok)
    check(registry, tiny_input(), schema("InferRequest"))
    with pytest.raises(ValidationError):
        check(registry, {"inputs": []}, schema("InferRequest"))
    with pytest.raises(ValidationError):
        check(registry, dict(tiny_input(), parameters={"routing_key": 7}), schema("InferRequest"))
    check(registry, {"version": "2"}, schema("SwapRequest"))
    check(registry, {"version": 2}, schema("SwapRequest"))
    for bad in ({}, {"version": "two"}, {"version": "2", "force": True}):
        with pytest.raises(ValidationError):
            check(registry, bad, schema("SwapRequest"))
    check(registry, {"weights": {"1": 90, "2": 10.5}, "shadow": ["3"], "metric_output": "logits"},
          schema("SplitRequest"))
    check(registry, {"weights": {}}, schema("SplitRequest"))
    for bad in ({}, {"weights": [90, 10]}, {"weights": {"one": 1}}, {"weights": {"1": "90"}},
                {"weights": {"1": 1}, "shadow": "2"}, {"weights": {"1": 1}, "metric_output": 3},
                {"weights": {"1": 1}, "colour": 1}):
        with pytest.raises(ValidationError):
            check(registry, bad, schema("SplitRequest"))
    check(registry, {"version": "2", "steps": [5, 25, 50, 100], "interval_s": 60, "max_error_rate": 0.05,
                     "max_p95_ratio": 2.0, "min_requests": 20}, schema("CanaryRequest"))
    for bad in ({"steps": [5, 100]}, {"version": "2", "steps": "5,100"}, {"version": "2", "min_requests": 2.5},
                {"version": "2", "bounds": {}}):
        with pytest.raises(ValidationError):
            check(registry, bad, schema("CanaryRequest"))


# --------------------------------------------------------------------------- (c) real answers


# (method, spec path, concrete path, request kwargs, expected status); run in this order on one server
CASES: list[tuple[str, str, str, dict[str, Any], int]] = [
    ("get", "/v2/health/live", "/v2/health/live", {}, 200),
    ("get", "/v2/health/ready", "/v2/health/ready", {}, 200),
    ("get", "/v2", "/v2", {}, 200),
    ("get", "/v2/models/{name}", "/v2/models/tiny", {}, 200),
    ("get", "/v2/models/{name}/versions/{version}", "/v2/models/tiny/versions/1", {}, 200),
    ("get", "/v2/models/{name}/config", "/v2/models/tiny/config", {}, 200),
    ("get", "/v2/models/{name}/versions/{version}/config", "/v2/models/echo_bytes/versions/1/config", {}, 200),
    ("get", "/v2/models/{name}/ready", "/v2/models/echo_int8/ready", {}, 400),  # UNLOADED: a JSON error
    ("post", "/v2/models/{name}/infer", "/v2/models/tiny/infer", {"json": tiny_input(2)}, 200),
    ("post", "/v2/models/{name}/versions/{version}/infer", "/v2/models/echo_bytes/versions/1/infer",
     {"json": {"id": "req-7", "inputs": [{"name": "x", "shape": [1, 3], "datatype": "BYTES",
                                          "data": ["a", "bc", "def"]}]}}, 200),
    ("get", "/v2/models/{name}/ready", "/v2/models/tiny/ready", {}, 200),
    ("get", "/v2/models/{name}/versions/{version}/ready", "/v2/models/tiny/versions/1/ready", {}, 200),
    ("get", "/v2/models/stats", "/v2/models/stats", {}, 200),
    ("get", "/v2/models/{name}/stats", "/v2/models/tiny/stats", {}, 200),
    ("get", "/v2/models/{name}/versions/{version}/stats", "/v2/models/tiny/versions/1/stats", {}, 200),
    ("post", "/v2/repository/index", "/v2/repository/index", {}, 200),
    ("post", "/v2/repository/index", "/v2/repository/index", {"json": {"ready": True}}, 200),
    ("post", "/v2/repository/models/{name}/load", "/v2/repository/models/echo_uint8/load", {}, 200),
    ("post", "/v2/repository/models/{name}/unload", "/v2/repository/models/echo_uint8/unload",
     {"json": {"parameters": {"unload_dependents": False}}}, 200),
    ("post", "/v2/repository/models/{name}/load", "/v2/repository/models/tiny/load",
     {"json": {"parameters": {"config": "{}"}}}, 400),
    ("post", "/api/models", "/api/models",
     {"json": {"name": "oa_ctl", "source": "zoo:tiny-mlp", "options": {"args": {"hidden": 16}, "priority": 2}}},
     201),
    ("post", "/api/models/{name}/load", "/api/models/oa_ctl/load", {}, 200),
    ("post", "/api/models/{name}/pin", "/api/models/oa_ctl/pin", {"json": {"version": "1"}}, 200),
    ("post", "/api/models/{name}/evict", "/api/models/oa_ctl/evict", {}, 409),  # pinned
    ("post", "/api/models/{name}/unpin", "/api/models/oa_ctl/unpin", {"params": {"version": "1"}}, 200),
    ("post", "/api/models/{name}/evict", "/api/models/oa_ctl/evict", {}, 200),
    ("post", "/api/models/{name}/unload", "/api/models/oa_ctl/unload", {}, 200),
    ("post", "/api/models", "/api/models",
     {"json": {"name": "oa_big", "source": "zoo:sized", "options": {"args": {"mib": 20000}}}}, 201),
    ("post", "/api/models/{name}/load", "/api/models/oa_big/load", {}, 503),  # 24 GiB on a simulated 8 GiB
    ("put", "/api/models/{name}/priority", "/api/models/tiny/priority", {"json": {"priority": 1}}, 200),
    ("put", "/api/models/{name}/priority", "/api/models/tiny/priority", {"json": {}}, 400),
    # versions: two versions of one name, split, swap, canary
    ("post", "/api/models", "/api/models",
     {"json": {"name": "oa_ab", "source": "zoo:tiny-mlp", "options": {"args": {"hidden": 16}}}}, 201),
    ("post", "/api/models", "/api/models",
     {"json": {"name": "oa_ab", "version": "2", "source": "zoo:tiny-mlp", "options": {"args": {"hidden": 24}}}},
     201),
    ("get", "/api/models/{name}/routing", "/api/models/oa_ab/routing", {}, 200),
    ("put", "/api/models/{name}/split", "/api/models/oa_ab/split",
     {"json": {"weights": {"1": 90, "2": 10}, "metric_output": "logits"}}, 200),
    ("post", "/v2/models/{name}/infer", "/v2/models/oa_ab/infer",
     {"json": dict(tiny_input(), parameters={"routing_key": "client-1"})}, 200),
    ("post", "/v2/models/{name}/infer", "/v2/models/oa_ab/infer",
     {"json": tiny_input(), "headers": {"X-Routing-Key": "client-2"}}, 200),
    ("get", "/api/models/{name}/routing", "/api/models/oa_ab/routing", {}, 200),  # arms with counters
    ("get", "/api/snapshot", "/api/snapshot", {}, 200),  # with a routing entry
    ("put", "/api/models/{name}/split", "/api/models/oa_ab/split", {"json": {"weights": {"1": 0, "2": 0}}}, 400),
    ("put", "/api/models/{name}/split", "/api/models/oa_ab/split", {"json": {"weights": {"1": "x"}}}, 400),
    ("put", "/api/models/{name}/split", "/api/models/oa_ab/split", {"json": {"weights": {}}}, 200),
    ("post", "/api/models/{name}/swap", "/api/models/oa_ab/swap", {"json": {"version": "2"}}, 200),
    ("post", "/api/models/{name}/swap", "/api/models/oa_ab/swap", {"json": {"version": "2"}}, 409),  # active
    ("post", "/api/models/{name}/swap", "/api/models/oa_ab/swap", {"json": {"version": "9"}}, 404),
    ("post", "/api/models/{name}/swap", "/api/models/oa_ab/swap", {"json": {"version": "two"}}, 400),
    ("post", "/api/models/{name}/canary", "/api/models/oa_ab/canary",
     {"json": {"version": "1", "steps": [10, 50, 100], "interval_s": 3600, "max_error_rate": 0.05,
               "max_p95_ratio": 2.0, "min_requests": 20}}, 200),
    ("post", "/api/models/{name}/canary", "/api/models/oa_ab/canary", {"json": {"version": "1"}}, 409),
    ("get", "/api/models/{name}/routing", "/api/models/oa_ab/routing", {}, 200),  # canary under way
    ("delete", "/api/models/{name}/canary", "/api/models/oa_ab/canary", {}, 200),
    ("get", "/api/models/{name}/routing", "/api/models/nope/routing", {}, 404),
    ("get", "/api/snapshot", "/api/snapshot", {}, 200),
    ("get", "/api/models", "/api/models", {}, 200),
    ("get", "/api/models/{name}", "/api/models/tiny", {}, 200),
    ("get", "/api/audit", "/api/audit", {}, 200),
    ("get", "/api/audit", "/api/audit?model=oa_ctl&limit=3", {}, 200),
    ("get", "/api/audit", "/api/audit?limit=0", {}, 400),
    ("post", "/api/models", "/api/models", {"json": {"name": "tiny", "version": "1", "source": "zoo:tiny-mlp"}}, 409),
    ("post", "/api/models", "/api/models", {"json": {"name": "x", "source": "zoo:tiny-mlp", "colour": 1}}, 400),
    ("get", "/api/models/{name}", "/api/models/nope", {}, 404),
    ("get", "/v2/models/{name}", "/v2/models/nope", {}, 404),
    ("get", "/v2/models/{name}/versions/{version}", "/v2/models/tiny/versions/abc", {}, 400),
    ("get", "/v2/models/{name}/versions/{version}", "/v2/models/tiny/versions/9", {}, 404),
    ("post", "/v2/models/{name}/infer", "/v2/models/tiny/infer",
     {"json": {"inputs": [{"name": "input", "shape": [1, 63], "datatype": "FP32", "data": [0.0] * 63}]}}, 400),
    ("get", "/v1/models", "/v1/models?limit=2", {}, 200),
    ("get", "/v1/models", "/v1/models?state=ready&q=TIN", {}, 200),
    ("get", "/v1/models", "/v1/models?limit=0", {}, 400),
    ("get", "/metrics", "/metrics", {}, 200),
    ("get", "/metrics", "/metrics", {"headers": {"Accept": "application/openmetrics-text; version=1.0.0"}}, 200),
]


@pytest.mark.parametrize("method, path, concrete, kw, status", CASES,
                         ids=[f"{c[0].upper()} {c[2]} {c[4]}" for c in CASES])
async def test_real_answers_match_the_spec(spec, registry, srv, method, path, concrete, kw, status):
    op = spec["paths"][path][method]
    if "json" in kw and status < 400 and "requestBody" in op:  # what we send is what the spec describes
        body = op["requestBody"]
        if "$ref" in body:
            body = _at(spec, body["$ref"][1:])
        check(registry, kw["json"], _pointer_of(spec, body["content"]["application/json"]["schema"]))
    got, headers, raw = await request(srv, method.upper(), concrete, **kw)
    assert got == status, raw[:500]
    value = check_answer(spec, registry, path, method, got, headers, raw)
    if status >= 400:
        assert isinstance(value, dict) and value["error"]
    if path == "/v1/models" and status == 200:  # the ETag answers If-None-Match with a bare 304
        etag, body = headers["ETag"], raw
        for _ in range(5):  # live figures (throughput over 10 s) may move between two reads
            got, headers2, raw2 = await request(srv, "GET", concrete, headers={"If-None-Match": etag})
            if got == 304:
                break
            assert got == 200 and raw2 != body and headers2["ETag"] != etag  # a new body, a new tag
            etag, body = headers2["ETag"], raw2
        assert got == 304 and headers2["ETag"] == etag
        check_answer(spec, registry, path, method, got, headers2, raw2)
    if path == "/api/models" and status == 201:
        assert value["state"] == "UNLOADED" and value["config"]["args"] == kw["json"]["options"]["args"]


def _pointer_of(spec: dict[str, Any], node: dict[str, Any]) -> str:
    """The pointer of a schema given inline as a $ref (the request bodies in the spec all are)."""
    assert "$ref" in node, node
    return node["$ref"][1:]


async def test_binary_infer_round_trip_matches_the_spec(spec, registry, srv):
    """Binary input and binary output: the JSON header validates as an InferResponse."""
    header = json.dumps({
        "inputs": [{"name": "x", "shape": [2, 3], "datatype": "INT32", "parameters": {"binary_data_size": 24}}],
        "outputs": [{"name": "y", "parameters": {"binary_data": True}}],
    }).encode()
    check(registry, json.loads(header), schema("InferRequest"))
    data = np.arange(6, dtype="<i4").tobytes()
    path = "/v2/models/{name}/infer"
    got, headers, raw = await request(srv, "POST", "/v2/models/echo_int32/infer", data=header + data,
                                      headers={"Inference-Header-Content-Length": str(len(header)),
                                               "Content-Type": "application/octet-stream"})
    assert got == 200, raw[:300]
    resp, pointer = _response(spec, path, "post", 200)
    assert headers["Content-Type"].split(";")[0] == "application/octet-stream"
    assert "application/octet-stream" in resp["content"]
    assert "Inference-Header-Content-Length" in resp["headers"]
    n = int(headers["Inference-Header-Content-Length"])
    head = json.loads(raw[:n])
    check(registry, head, f"{pointer}/content/application~1json/schema")
    assert head["outputs"][0]["parameters"]["binary_data_size"] == 24
    assert list(struct.unpack("<6i", raw[n:])) == list(range(6))


async def test_raw_binary_infer_matches_the_spec(spec, registry, srv):
    """Inference-Header-Content-Length: 0 -- the body is the one input; every output comes back binary."""
    got, headers, raw = await request(srv, "POST", "/v2/models/tiny/infer",
                                      data=np.zeros(64, dtype="<f4").tobytes(),
                                      headers={"Inference-Header-Content-Length": "0"})
    assert got == 200, raw[:300]
    n = int(headers["Inference-Header-Content-Length"])
    head = json.loads(raw[:n])
    check(registry, head, schema("InferResponse"))
    assert head["outputs"][0]["shape"] == [1, 10] and len(raw) - n == 40


async def test_event_stream_frames_match_the_spec(spec, registry, srv):
    """retry first; with Last-Event-ID the history replays as `event` frames (id = seq); then a snapshot."""
    op = spec["paths"]["/api/events"]["get"]
    media = op["responses"]["200"]["content"]["text/event-stream"]
    documented = media["x-sse-events"]
    assert set(documented) == {"event", "snapshot", "dropped", "stopping"}
    frames: list[dict[str, str]] = []
    async with aiohttp.ClientSession() as s, s.get(srv.url + "/api/events", headers={"Last-Event-ID": "0"}) as r:
        assert r.status == 200
        assert r.headers["Content-Type"].split(";")[0] in op["responses"]["200"]["content"]
        frame: dict[str, str] = {}
        while not any(f.get("event") == "snapshot" for f in frames):
            line = (await asyncio.wait_for(r.content.readline(), 10)).decode().rstrip("\n")
            if not line:
                if frame:
                    frames.append(frame)
                frame = {}
                continue
            key, _, value = line.partition(": ")
            frame[key] = value
    assert frames[0] == {"retry": "2000"}
    kinds = [f["event"] for f in frames[1:]]
    assert set(kinds) <= set(documented)
    assert kinds[-1] == "snapshot" and kinds.count("event") >= 1  # the engine's history replayed
    for f in frames[1:]:
        data = json.loads(f["data"])
        check(registry, data, documented[f["event"]]["$ref"][1:])
        if f["event"] == "event":
            assert int(f["id"]) == data["seq"]
        else:
            assert "id" not in f
    check(registry, {"count": 3}, schema("SseDropped"))
    check(registry, {"reason": "the server is shutting down"}, schema("SseStopping"))
    bad, _, body = await request(srv, "GET", "/api/events", headers={"Last-Event-ID": "x"})
    assert bad == 400
    check_answer(spec, registry, "/api/events", "get", bad, {"Content-Type": "application/json"}, body)


async def test_snapshot_frame_and_model_lists_carry_active_and_origin(registry, srv):
    _, _, body = await request(srv, "GET", "/api/snapshot")
    snap = json.loads(body)
    assert snap["devices"], "the ServerThread simulates one GPU: the device schema is exercised"
    for m in snap["models"]:
        check(registry, m, schema("ModelListed"))
    assert any(m["eviction"] for m in snap["models"]), "a READY model on a managed device: eviction exercised"


# --------------------------------------------------------------------------- (d) security


class _NoEngine:
    """Enough for build_app (an engine with none of the optional faces, such as a fleet's); any
    handler that reaches the engine fails (500), which is not a 401."""

    def __getattr__(self, name: str) -> Any:
        raise AttributeError(f"no engine in this test ({name})")


def _requires_bearer(op: dict[str, Any]) -> str:
    """'always', 'optional' (an empty alternative: only with infer_requires_token) or 'never'."""
    sec = op.get("security")
    if not sec:
        return "never"
    assert all(set(s) <= {"bearerAuth"} for s in sec)
    return "optional" if {} in sec else "always"


@pytest.mark.parametrize("infer_too", [False, True])
async def test_bearer_requirements_match_the_guard(spec, registry, infer_too, caplog):
    app = build_app(_NoEngine(), ServerSettings(token=TOKEN, infer_requires_token=infer_too))
    async with TestServer(app) as server, TestClient(server) as client:
        for path, method, op in operations(spec):
            concrete = path.replace("{name}", "tiny").replace("{version}", "1")
            async with client.request(method.upper(), concrete) as r:
                body = await r.read()
                need = _requires_bearer(op)
                expect = need == "always" or (need == "optional" and infer_too)
                assert (r.status == 401) == expect, f"{method.upper()} {path}: {r.status} {body[:200]!r}"
                if expect:
                    check_answer(spec, registry, path, method, 401, r.headers, body)
                    async with client.request(method.upper(), concrete,
                                              headers={"Authorization": "Bearer wrong"}) as r2:
                        assert r2.status == 403
                        check_answer(spec, registry, path, method, 403, r2.headers, await r2.read())
