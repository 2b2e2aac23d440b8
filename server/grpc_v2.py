"""KServe V2 over gRPC: ``inference.GRPCInferenceService`` as ``tritonclient[grpc]`` speaks it.

Served with grpcio's asyncio server, beside the HTTP front end of the same
process (``--grpc-port``; with ``--workers N`` every front-end process
listens on the port, SO_REUSEPORT being grpcio's default on Linux).  The
messages are built from ``protos/kserve_v2.desc`` (our ``kserve_v2.proto``,
compiled) into a **private** descriptor pool: a process that also imports
tritonclient's generated classes (tests do) has both without a clash.

Calls:

* ``ModelInfer`` goes through the same link as an HTTP infer call
  (``link.py``): tensors from ``raw_input_contents`` (V2 wire bytes, read
  without copying by ``codec.tensor_from_bytes``) or the typed ``contents``
  fields; outputs always come back as ``raw_output_contents``, as Triton
  answers.  Request parameters ``priority``, ``timeout`` (microseconds) and
  ``routing_key`` mean what they mean over HTTP.
* health, metadata, config and statistics are the documents ``v2.py`` builds
  for HTTP: from the engine itself where it runs in this process
  (``--workers 0``), else from the engine core's HTTP app
  (``proxy.ControlProxy``), as are the repository calls everywhere; so both
  protocols tell the same story, and this translates it.
* ``ModelStreamInfer`` (tritonclient's ``start_stream`` / ``async_stream_infer``):
  each request of the stream is one ``ModelInfer``, answered as it completes;
* the shared-memory, trace and log calls are not served: UNIMPLEMENTED.

Errors carry the gRPC status the HTTP status maps to (``STATUS``): 400
INVALID_ARGUMENT, 401 UNAUTHENTICATED, 403 PERMISSION_DENIED, 404 NOT_FOUND,
409 FAILED_PRECONDITION, 413 RESOURCE_EXHAUSTED, 429 RESOURCE_EXHAUSTED, 500
INTERNAL, 503 UNAVAILABLE (with ``retry-after`` in the trailing metadata),
504 DEADLINE_EXCEEDED; the message is the one HTTP would give.  The token
(``authorization: Bearer ...`` metadata) guards the repository calls, and
infer calls too with ``infer_requires_token``.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from importlib import resources
from typing import Any
from urllib.parse import quote

import grpc
import numpy as np
import orjson
from google.protobuf import descriptor_pb2, descriptor_pool, json_format, message_factory

from modelconsole.scheduler import textenc
from modelconsole.scheduler.errors import EngineError

from . import codec, v2
from .guard import bearer_status
from .ipc import InferCall
from .proxy import ControlProxy
from .web import HttpError, ServerSettings

log = logging.getLogger("modelconsole.server.grpc")

SERVICE = "inference.GRPCInferenceService"

STATUS = {
    400: grpc.StatusCode.INVALID_ARGUMENT, 401: grpc.StatusCode.UNAUTHENTICATED,
    403: grpc.StatusCode.PERMISSION_DENIED, 404: grpc.StatusCode.NOT_FOUND,
    405: grpc.StatusCode.UNIMPLEMENTED, 408: grpc.StatusCode.DEADLINE_EXCEEDED,
    409: grpc.StatusCode.FAILED_PRECONDITION, 413: grpc.StatusCode.RESOURCE_EXHAUSTED,
    415: grpc.StatusCode.INVALID_ARGUMENT, 429: grpc.StatusCode.RESOURCE_EXHAUSTED,
    500: grpc.StatusCode.INTERNAL, 503: grpc.StatusCode.UNAVAILABLE, 504: grpc.StatusCode.DEADLINE_EXCEEDED,
}


def _messages() -> dict[str, Any]:
    data = resources.files("modelconsole.server").joinpath("protos/kserve_v2.desc").read_bytes()
    pool = descriptor_pool.DescriptorPool()
    for f in descriptor_pb2.FileDescriptorSet.FromString(data).file:
        pool.Add(f)
    file = pool.FindFileByName("kserve_v2.proto")
    return {name: message_factory.GetMessageClass(d) for name, d in file.message_types_by_name.items()}


M = _messages()

# Typed contents field per datatype (what a client without raw_input_contents fills)
_CONTENTS = {
    "BOOL": ("bool_contents", np.bool_), "INT8": ("int_contents", np.int8), "INT16": ("int_contents", np.int16),
    "INT32": ("int_contents", np.int32), "INT64": ("int64_contents", np.int64),
    "UINT8": ("uint_contents", np.uint8), "UINT16": ("uint_contents", np.uint16),
    "UINT32": ("uint_contents", np.uint32), "UINT64": ("uint64_contents", np.uint64),
    "FP32": ("fp32_contents", np.float32), "FP64": ("fp64_contents", np.float64),
    "BYTES": ("bytes_contents", object),
}


class GrpcError(Exception):
    def __init__(self, status: int, message: str, retry_after: float | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.retry_after = retry_after


class Servicer:
    """The calls (module docstring); one per front end."""

    def __init__(self, link: Any, control: ControlProxy, settings: ServerSettings, engine: Any = None):
        self.link = link
        self.control = control
        self.settings = settings
        # the engine of this process (--workers 0): metadata is read from it directly; a front-end
        # process has none and asks the engine core's app (``control``)
        self.engine = engine

    # ---------------------------------------------------------------- plumbing

    def _check_token(self, context: grpc.aio.ServicerContext) -> None:
        token = self.settings.token
        if token is None:
            return
        status = bearer_status(dict(context.invocation_metadata() or ()).get("authorization", ""), token)
        if status == 401:
            raise GrpcError(401, "this call needs the metadata 'authorization: Bearer <token>'")
        if status == 403:
            raise GrpcError(403, "the bearer token is not valid")

    async def _json(self, method: str, path: str, body: Any = None) -> tuple[int, Any]:
        """The engine app's answer to one call: (status, JSON or None); its errors as GrpcError."""
        data = orjson.dumps(body) if body is not None else None
        status, headers, payload = await self.control.call(method, path, data, self.settings.token)
        value = orjson.loads(payload) if payload and headers.get("Content-Type", "").startswith(
            "application/json") else None
        if status >= 400 and not (path.endswith("/ready") and status == 400):
            message = value.get("error") if isinstance(value, dict) else None
            retry = headers.get("Retry-After")
            raise GrpcError(status, message or f"HTTP {status}", float(retry) if retry else None)
        return status, value

    @staticmethod
    def _model_path(name: str, version: str) -> str:
        if not name:
            raise GrpcError(400, "name: expected a model name, got an empty string")
        path = f"/v2/models/{quote(name, safe='')}"
        if version:
            if not version.isdigit():
                raise GrpcError(400, f"version: expected a number (as in '2') or empty, got '{version}'")
            path += f"/versions/{version}"
        return path

    # ---------------------------------------------------------------- health and metadata

    async def ServerLive(self, request: Any, context: Any) -> Any:
        return M["ServerLiveResponse"](live=True)

    async def _doc(self, build: Callable[..., Any], path: str, *args: Any) -> Any:
        """A metadata document: built from this process's engine (``v2``'s builders), or the
        engine core's app's JSON answer to ``path``; an HTTP error as the gRPC status."""
        if self.engine is None:
            return (await self._json("GET", path))[1]
        try:
            return build(self.engine, *args)
        except HttpError as e:
            raise GrpcError(e.status, e.message) from None

    async def ServerReady(self, request: Any, context: Any) -> Any:
        if not self.link.ready:
            return M["ServerReadyResponse"](ready=False)
        if self.engine is not None:
            return M["ServerReadyResponse"](ready=True)
        status, _ = await self._json("GET", "/v2/health/ready")
        return M["ServerReadyResponse"](ready=status == 200)

    async def ModelReady(self, request: Any, context: Any) -> Any:
        path = self._model_path(request.name, request.version)
        if self.engine is None:
            status, _ = await self._json("GET", path + "/ready")
            return M["ModelReadyResponse"](ready=status == 200)
        try:
            v2.ready_check(self.engine, request.name, request.version or None)
        except HttpError:
            return M["ModelReadyResponse"](ready=False)
        return M["ModelReadyResponse"](ready=True)

    async def ServerMetadata(self, request: Any, context: Any) -> Any:
        value = await self._doc(lambda _engine: v2.server_doc(), "/v2")
        return json_format.ParseDict(value, M["ServerMetadataResponse"](), ignore_unknown_fields=True)

    async def ModelMetadata(self, request: Any, context: Any) -> Any:
        value = await self._doc(v2.metadata_doc, self._model_path(request.name, request.version), request.name,
                                request.version or None)
        return json_format.ParseDict(value, M["ModelMetadataResponse"](), ignore_unknown_fields=True)

    async def ModelConfig(self, request: Any, context: Any) -> Any:
        value = await self._doc(v2.config_doc, self._model_path(request.name, request.version) + "/config",
                                request.name, request.version or None)
        resp = M["ModelConfigResponse"]()
        json_format.ParseDict(value, resp.config, ignore_unknown_fields=True)
        return resp

    async def ModelStatistics(self, request: Any, context: Any) -> Any:
        path = self._model_path(request.name, request.version) + "/stats" if request.name else "/v2/models/stats"
        if not request.name and request.version:
            raise GrpcError(400, "version: a version needs a model name")
        value = await self._doc(v2.stats_doc, path, request.name or None, request.version or None)
        return json_format.ParseDict(value, M["ModelStatisticsResponse"](), ignore_unknown_fields=True)

    # ---------------------------------------------------------------- repository

    async def RepositoryIndex(self, request: Any, context: Any) -> Any:
        self._check_token(context)
        _, value = await self._json("POST", "/v2/repository/index", {"ready": request.ready})
        return json_format.ParseDict({"models": value}, M["RepositoryIndexResponse"](), ignore_unknown_fields=True)

    async def RepositoryModelLoad(self, request: Any, context: Any) -> Any:
        self._check_token(context)
        await self._repository(request, "load")
        return M["RepositoryModelLoadResponse"]()

    async def RepositoryModelUnload(self, request: Any, context: Any) -> Any:
        self._check_token(context)
        await self._repository(request, "unload")
        return M["RepositoryModelUnloadResponse"]()

    async def _repository(self, request: Any, action: str) -> None:
        if not request.model_name:
            raise GrpcError(400, "model_name: expected a model name, got an empty string")
        params = {k: getattr(v, v.WhichOneof("parameter_choice") or "string_param")
                  for k, v in request.parameters.items()}
        if any(isinstance(v, bytes) for v in params.values()):
            raise GrpcError(400, "parameters: file contents are not accepted; register a new version with "
                                 "POST /api/models")
        await self._json("POST", f"/v2/repository/models/{quote(request.model_name, safe='')}/{action}",
                         {"parameters": params})

    # ---------------------------------------------------------------- inference

    async def ModelInfer(self, request: Any, context: Any) -> Any:
        if self.settings.infer_requires_token:
            self._check_token(context)
        call = infer_call(request)
        if call.inputs is not None and textenc.TEXT in call.inputs:
            text = await self.link.check(call.model, call.version)
            if text is not None:  # tokenized here, in the front end, as over HTTP
                call.inputs = await textenc.encode(text, call.inputs)
        answer = await self.link.infer(call)
        resp = M["ModelInferResponse"](model_name=answer.model, model_version=answer.version, id=request.id)
        wanted = call.outputs
        for name, value in answer.outputs.items():
            if wanted is not None and name not in wanted:
                continue
            datatype, shape, data = codec.tensor_to_bytes(name, value)
            resp.outputs.add(name=name, datatype=datatype, shape=shape)
            resp.raw_output_contents.append(bytes(data))
        return resp


def _param(p: Any) -> Any:
    which = p.WhichOneof("parameter_choice")
    return getattr(p, which) if which else None


def infer_call(request: Any) -> InferCall:
    """A ModelInferRequest as the engine's call; GrpcError (400) naming the field otherwise."""
    name = request.model_name
    if not name:
        raise GrpcError(400, "model_name: expected a model name, got an empty string")
    version = request.model_version or None
    if version is not None and not version.isdigit():
        raise GrpcError(400, f"model_version: expected a number (as in '2') or empty, got '{version}'")
    params = {k: _param(v) for k, v in request.parameters.items()}
    priority = params.get("priority")
    if priority is not None and (isinstance(priority, bool) or not isinstance(priority, int)):
        raise GrpcError(400, f"parameters.priority: expected an integer (int64_param), got {priority!r}")
    timeout = params.get("timeout")
    timeout_ms = None
    if timeout is not None:
        if isinstance(timeout, bool) or not isinstance(timeout, int) or timeout < 0:
            raise GrpcError(400, f"parameters.timeout: expected non-negative microseconds (int64_param), "
                                 f"got {timeout!r}")
        timeout_ms = timeout / 1000.0 if timeout else None
    key = params.get("routing_key")
    if key is not None and not isinstance(key, str):
        raise GrpcError(400, f"parameters.routing_key: expected a string (string_param), got {key!r}")
    raw = request.raw_input_contents
    if raw and len(raw) != len(request.inputs):
        raise GrpcError(400, f"raw_input_contents: {len(raw)} entries for {len(request.inputs)} inputs "
                             "(one per input, in order)")
    inputs: dict[str, Any] = {}
    for k, t in enumerate(request.inputs):
        where = f"inputs.{t.name}"
        if t.name in inputs:
            raise GrpcError(400, f"inputs: '{t.name}' appears twice")
        shape = list(t.shape)
        if raw:
            inputs[t.name] = codec.tensor_from_bytes(raw[k], t.datatype, shape, where)
        else:
            inputs[t.name] = _from_contents(t, shape, where)
    outputs = [o.name for o in request.outputs] or None
    return InferCall(name, version, inputs, None, priority, timeout_ms, outputs, key or None)


def _from_contents(t: Any, shape: list[int], where: str) -> Any:
    spec = _CONTENTS.get(t.datatype)
    if spec is None:
        raise GrpcError(400, f"{where}.datatype: {t.datatype!r} must come in raw_input_contents "
                             f"(typed contents carry {', '.join(_CONTENTS)})")
    field, dtype = spec
    values = getattr(t.contents, field)
    count = 1
    for d in shape:
        if d < 0:
            raise GrpcError(400, f"{where}.shape: expected non-negative dimensions, got {shape}")
        count *= d
    if len(values) != count:
        raise GrpcError(400, f"{where}.contents.{field}: {len(values)} values for shape {shape} ({count} expected)")
    if dtype is object:
        arr = np.empty(count, dtype=object)
        arr[:] = list(values)
        return arr.reshape(shape)
    try:
        return np.asarray(values, dtype=dtype).reshape(shape)
    except OverflowError:
        raise GrpcError(400, f"{where}.contents.{field}: a value does not fit {t.datatype}") from None


def _unary(fn: Callable[[Any, Any], Awaitable[Any]], req_cls: Any, resp_cls: Any,
           counter: Any) -> grpc.RpcMethodHandler:
    ok = counter.labels("grpc", "OK") if counter is not None else None

    async def handle(request: Any, context: grpc.aio.ServicerContext) -> Any:
        try:
            reply = await fn(request, context)
            if ok is not None:
                ok.inc()
            return reply
        except (GrpcError, EngineError) as e:
            status = e.status
            message = e.message
            retry = e.retry_after
        except Exception:  # noqa: BLE001 - one call's failure; the server keeps serving
            log.exception("unhandled error in gRPC %s", fn.__name__)
            status, message, retry = 500, "internal error (logged by the server)", None
        if retry is not None:
            context.set_trailing_metadata((("retry-after", str(max(1, int(retry + 0.999)))),))
        code = STATUS.get(status, grpc.StatusCode.UNKNOWN)
        if counter is not None:
            counter.labels("grpc", code.name).inc()
        await context.abort(code, message)

    return grpc.unary_unary_rpc_method_handler(handle, request_deserializer=req_cls.FromString,
                                               response_serializer=resp_cls.SerializeToString)


def _stream(servicer: Servicer, counter: Any) -> grpc.RpcMethodHandler:
    """``ModelStreamInfer``: every request of the stream is one ``ModelInfer``, run as it
    arrives; answers go back as they are ready (tritonclient matches them by ``id``), an
    error as ``error_message`` with the request's id, model and version."""

    async def handle(requests: Any, context: grpc.aio.ServicerContext) -> Any:
        out: asyncio.Queue[Any] = asyncio.Queue()
        running: set[asyncio.Task[None]] = set()
        loop = asyncio.get_running_loop()

        async def answer(request: Any) -> None:
            try:
                reply = M["ModelStreamInferResponse"](infer_response=await servicer.ModelInfer(request, context))
                code = "OK"
            except (GrpcError, EngineError) as e:
                reply = M["ModelStreamInferResponse"](error_message=e.message, infer_response=M["ModelInferResponse"](
                    id=request.id, model_name=request.model_name, model_version=request.model_version))
                code = STATUS.get(e.status, grpc.StatusCode.UNKNOWN).name
            except Exception:  # noqa: BLE001 - one request's failure; the stream goes on
                log.exception("unhandled error in a gRPC stream's request")
                reply = M["ModelStreamInferResponse"](error_message="internal error (logged by the server)")
                code = "INTERNAL"
            if counter is not None:
                counter.labels("grpc", code).inc()
            out.put_nowait(reply)

        async def read() -> None:
            async for request in requests:
                task = loop.create_task(answer(request))
                running.add(task)
                task.add_done_callback(running.discard)
            while running:
                await asyncio.gather(*list(running))
            out.put_nowait(None)

        reader = loop.create_task(read())
        try:
            while (reply := await out.get()) is not None:
                yield reply
        finally:
            reader.cancel()
            for task in list(running):
                task.cancel()

    return grpc.stream_stream_rpc_method_handler(handle, request_deserializer=M["ModelInferRequest"].FromString,
                                                 response_serializer=M["ModelStreamInferResponse"].SerializeToString)


def handlers(servicer: Servicer, counter: Any = None) -> grpc.GenericRpcHandler:
    """``counter``: modelconsole_frontend_requests_total (metrics.py), or None."""
    methods = {"ModelStreamInfer": _stream(servicer, counter)}
    for name in ("ServerLive", "ServerReady", "ModelReady", "ServerMetadata", "ModelMetadata", "ModelInfer",
                 "ModelConfig", "ModelStatistics", "RepositoryIndex", "RepositoryModelLoad",
                 "RepositoryModelUnload"):
        methods[name] = _unary(getattr(servicer, name), M[f"{name}Request"], M[f"{name}Response"], counter)
    return grpc.method_handlers_generic_handler(SERVICE, methods)


class GrpcFrontEnd:
    """The gRPC server of one process: ``start`` listens, ``stop`` drains."""

    def __init__(self, link: Any, control: ControlProxy, settings: ServerSettings, port: int, counter: Any = None,
                 engine: Any = None):
        self.servicer = Servicer(link, control, settings, engine)
        self.counter = counter
        self.settings = settings
        self.requested_port = port
        self.port: int | None = None
        self._server: grpc.aio.Server | None = None

    async def start(self) -> None:
        s = self.settings
        limit = s.max_body_bytes
        self._server = grpc.aio.server(options=[
            ("grpc.max_receive_message_length", limit), ("grpc.max_send_message_length", -1),
            # front-end processes share the port; one process alone must not join another server's group
            ("grpc.so_reuseport", 1 if s.reuse_port else 0),
            # the HTTP side's read bounds: a connection that never completes its handshake is closed
            # after head_timeout_s, an idle one after keepalive_timeout_s
            ("grpc.server_handshake_timeout_ms", int(s.head_timeout_s * 1000)),
            ("grpc.max_connection_idle_ms", int(s.keepalive_timeout_s * 1000)),
        ])
        self._server.add_generic_rpc_handlers((handlers(self.servicer, self.counter),))
        host = f"[{s.host}]" if ":" in s.host else s.host
        try:
            self.port = self._server.add_insecure_port(f"{host}:{self.requested_port}")
        except RuntimeError:
            self.port = 0
        if not self.port:
            raise OSError(f"cannot listen for gRPC on {s.host}:{self.requested_port}")
        await self._server.start()
        log.info("gRPC (KServe V2) on %s:%d", s.host, self.port)

    async def stop(self, grace: float) -> None:
        if self._server is not None:
            server, self._server = self._server, None
            await server.stop(grace)
