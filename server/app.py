"""The aiohttp application: routes, the one guard every request passes, and the server's life.

Three faces, one engine (``build_app``):

* ``v2.py``      KServe V2 / Open Inference Protocol as Triton extends it — what
                 clients (``tritonclient[http]``, perf_analyzer, curl) speak;
* ``api.py``     the operator's control API under ``/api/``, the event stream,
                 and ``GET /v1/models``;
* ``metrics.py`` ``GET /metrics`` for Prometheus.

One middleware (``_guard``) does what every route needs, so handlers stay
plain: it checks the bearer token where one is required (constant-time
compare), and turns every error into ``{"error": "..."}`` with the status the
engine's error kind carries (400 bad input, 404 unknown, 409 conflict, 429
rate limited, 503 unavailable / queue full with ``Retry-After``, 504 deadline).
It also answers what aiohttp would otherwise leave to the catch-all: a body
in a ``Content-Encoding`` we cannot decode is a 415 listing the ones we can,
and a body that is not valid data of its coding (corrupt gzip) is a 400 that
says so.  An exception nobody anticipated is logged (on one line under
``--serve``: ``OneLineFormatter`` in ``console/cli.py``) and answered 500 —
the process keeps serving.

Safe by default: ``127.0.0.1``; when bound elsewhere a token is required
(``console/cli.py`` refuses to start without one); request bodies are bounded
(``[server] max_body_mib``, 64 MiB), and the codec refuses declared shapes the
body cannot hold before allocating anything.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import os
import shutil
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
from aiohttp import web

from modelconsole.scheduler.config import ConfigError
from modelconsole.scheduler.errors import EngineError

from . import body as body_mod
from . import rundir, tokenfile
from .body import BodyError
from .connections import ConnectionGuard, quiet_parse_errors
from .link import LocalLink

log = logging.getLogger("modelconsole.server")


def _package_version() -> str:
    """The installed distribution's version (the server sits below the console, so it does not
    import ``modelconsole.console.__version__``)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("modelconsole")
    except PackageNotFoundError:  # running from a source tree that is not installed
        return "0+unknown"


VERSION = _package_version()

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

# What every handler may read from its app (typed keys, as aiohttp recommends)
ENGINE: web.AppKey[Any] = web.AppKey("engine", object)
SETTINGS: web.AppKey[ServerSettings] = web.AppKey("settings", object)
STARTED: web.AppKey[float] = web.AppKey("started", float)
CLOSING: web.AppKey[asyncio.Event] = web.AppKey("closing", asyncio.Event)
DRAINING: web.AppKey[asyncio.Event] = web.AppKey("draining", asyncio.Event)
LINK: web.AppKey[Any] = web.AppKey("link", object)  # how infer calls reach the engine (link.py)
# modelconsole_frontend_requests_total (metrics.py); None where this app does not count (the engine core's
# control app behind front ends: they counted the request)
REQUESTS: web.AppKey[Any] = web.AppKey("requests", object)


@dataclass(frozen=True)
class ServerSettings:
    host: str = "127.0.0.1"
    port: int = 8000
    token: str | None = None
    infer_requires_token: bool = False  # also ask clients' infer calls for the token
    max_body_bytes: int = 64 * 2**20
    max_inflation_ratio: float = 100.0  # a compressed body may grow this many times (judged past 64 KiB decoded)
    body_timeout_s: float = 30.0  # the whole body must arrive within this
    head_timeout_s: float = 15.0  # a new connection's first request head must arrive within this
    keepalive_timeout_s: float = 30.0  # an idle kept-alive connection (or a half-sent next head) is closed
    drain_grace_s: float = 1.0  # at shutdown, open connections may still send a request (answered, then closed)
    snapshot_interval_s: float = 1.0  # the event stream's periodic snapshot
    shutdown_timeout_s: float = 30.0  # in-flight requests get this long at shutdown
    access_log: bool = False  # one line per request costs ~10% of throughput: off unless asked
    # Where a token made at start (tokenfile.py) is written once the port is known; None: not written.
    token_dir: str | None = None
    reuse_port: bool = False  # SO_REUSEPORT: several front-end processes listen on one port (workers.py)
    unix_path: str | None = None  # listen on this Unix socket instead of host:port (the engine core's control app)
    ipc: str = "unix"  # --workers: how front ends reach the engine core (transport.py): "unix" or "zmq"
    ipc_spin_us: float = 0.0  # --workers at low load: keep the loops awake this long (transport.KeepAwake)
    frontends_metrics_dir: str | None = None  # the engine core's app: /metrics sums the front ends' counters here
    # Host names requests may carry besides IP literals, localhost and ``host`` ([server] allowed_hosts);
    # "*" allows any.  A web page that rebinds its own name to 127.0.0.1 sends its name: refused.
    allowed_hosts: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        # Without a token the guard has nothing to compare, so the flag would silently check nothing.
        if self.infer_requires_token and not self.token:
            raise ValueError("infer_requires_token needs a token: without one no infer call would be checked")


class HttpError(Exception):
    """An error a handler answers with before the engine is involved (bad URL, bad JSON)."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = headers or {}


def error_response(status: int, message: str, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(status=status, body=json.dumps({"error": message}).encode(),
                        content_type="application/json", headers=headers)


def engine_error_response(e: EngineError) -> web.Response:
    # the kind too, so a client (modelconsole.client, a remote: model) raises the same error class
    headers = {"X-Modelconsole-Error-Kind": e.kind}
    if e.retry_after is not None:
        headers["Retry-After"] = str(max(1, int(e.retry_after + 0.999)))
    return error_response(e.status, e.message, headers)


def _needs_token(path: str, infer_too: bool) -> bool:
    if path.startswith("/api/") or path.startswith("/v2/repository"):
        return True
    return infer_too and path.startswith("/v2/") and path.endswith("/infer")


def bearer_status(authorization: str, token: str) -> int | None:
    """The one token rule of every protocol: None when ``authorization`` carries the bearer token
    (constant-time compare), 401 when it is empty, 403 when it is wrong."""
    if not authorization:
        return 401
    scheme, _, value = authorization.partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(value.strip().encode(), token.encode()):
        return 403
    return None


def _check_token(request: web.Request, token: str) -> web.Response | None:
    status = bearer_status(request.headers.get("Authorization", ""), token)
    if status == 401:
        return error_response(401, "this call needs 'Authorization: Bearer <token>'",
                              {"WWW-Authenticate": 'Bearer realm="modelconsole"'})
    if status == 403:
        return error_response(403, "the bearer token is not valid")
    return None


def host_names(settings: ServerSettings) -> frozenset[str] | None:
    """The names a request's Host may carry (beside any IP literal); None: any name."""
    names = {h.strip().lower().rstrip(".") for h in settings.allowed_hosts}
    if "*" in names:
        return None
    names |= {"localhost", settings.host.lower().strip("[]")}
    return frozenset(names)


def host_name(header: str) -> str:
    """``Host: name:port`` -> name (lowercase, no trailing dot); an IPv6 literal without brackets."""
    h = header.strip().lower()
    if h.startswith("["):
        return h[1:h.find("]")] if "]" in h else h[1:]
    if h.count(":") == 1:
        h = h.split(":", 1)[0]
    return h.rstrip(".")


def _is_ip(name: str) -> bool:
    import ipaddress

    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


def _foreign_host(request: web.Request, names: frozenset[str] | None,
                  seen: dict[str, bool]) -> web.Response | None:
    """403 for a request whose Host names neither this server nor an IP address: DNS rebinding (a web
    page whose own name now resolves to 127.0.0.1 reaches a loopback server with its name in Host).
    ``seen``: the verdict per Host header (pure; kept by the guard, bounded), so a header is parsed once."""
    header = request.headers.get("Host")
    if names is None or header is None:
        return None
    ok = seen.get(header)
    if ok is None:
        name = host_name(header)
        ok = name in names or _is_ip(name)
        if len(seen) >= 4096:
            seen.clear()
        seen[header] = ok
    if ok:
        return None
    return error_response(403, "request refused: its Host header is not a name of this server (a guard against "
                               "DNS rebinding); to serve under that name, add it to [server] allowed_hosts")


def _cross_site(request: web.Request) -> web.Response | None:
    """403 for a request a web page sent: a foreign ``Origin`` or ``Sec-Fetch-Site: cross-site``.

    Browsers add ``Origin`` to cross-origin requests and to every POST; no V2
    client or console sends one.  A page the operator visits could otherwise
    POST a "simple" request (``text/plain``, no preflight) to a loopback
    server.  The server's own origin (``http://<Host header>``) is allowed.
    """
    origin = request.headers.get("Origin")
    if origin is not None:
        own = {f"http://{request.host}", f"https://{request.host}"}
        if origin not in own:
            return error_response(403, "cross-site request refused: the Origin header names another site "
                                       "than this server; modelconsole's API is not for web pages")
    if request.headers.get("Sec-Fetch-Site") == "cross-site":
        return error_response(403, "cross-site request refused (Sec-Fetch-Site: cross-site)")
    return None


_BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})
FORWARD_ROUTE = "forward-to-core"  # a front end's catch-all route to the engine core (proxy.py)
VIA_HEADER = "X-Modelconsole-Via"  # set by a front end forwarding a call: it counted the call already


def _not_json(request: web.Request) -> web.Response | None:
    """415 for a control call whose body is not declared JSON.

    POST is the method a web page can send cross-site without a CORS
    preflight (as an HTML form or a ``text/plain`` fetch); neither can set
    ``application/json`` without one, which nothing here answers.  PUT and
    PATCH carry JSON bodies here too; DELETE carries none (and is always
    preflighted).  A route that does not exist for the method is left to
    its 404/405.
    """
    if request.method not in _BODY_METHODS or not request.path.startswith("/api/"):
        return None
    if request.match_info.http_exception is not None:
        return None
    if request.match_info.route.name == FORWARD_ROUTE:  # a front end forwarding it: the core judges it
        return None
    if request.content_type == "application/json":
        return None
    got = request.headers.get("Content-Type")
    shown = repr(got) if got else "none"
    return error_response(415, "Content-Type: control calls need 'application/json' (an empty body is {}), "
                               f"got {shown}")


ENCODINGS = (*body_mod.CODINGS, "identity")  # what body.py decodes


def _check_encoding(request: web.Request) -> web.Response | None:
    """415 for a body coding we cannot decode (RFC 9110 15.5.16: say which we accept)."""
    got = request.headers.get("Content-Encoding")
    if got is None or got.strip().lower() in ENCODINGS:
        return None
    accepted = ", ".join(ENCODINGS)
    return error_response(415, f"Content-Encoding: {got!r} is not supported; expected one of {accepted} "
                               "(a single coding)", {"Accept-Encoding": accepted})


def _unreadable_body(request: web.Request, e: web.RequestPayloadError) -> web.Response:
    """400 for a body aiohttp could not read (bad chunking), on a closing connection.

    The parser of this connection is broken past this point (it cannot find
    where the next request starts), so the answer says ``Connection: close``.
    Marking the body finished keeps aiohttp from reading it again after the
    answer, which would raise the same error and log it as "Unhandled
    exception" with a traceback.  (Compressed bodies are decoded by body.py,
    whose errors are BodyErrors.)
    """
    detail = getattr(e.__cause__, "message", None) or str(e)
    request.content.feed_eof()
    resp = error_response(400, "cannot read the request body: " + " ".join(str(detail).split()))
    resp.force_close()
    return resp


def _refused_body(request: web.Request, resp: web.Response) -> web.Response:
    """The answer to a body we stopped reading: the rest is dropped unparsed (never inflated)
    and the connection closes after the answer (connections.py)."""
    guard = getattr(request.transport, "connection_guard", None)
    if guard is not None:
        guard.discard_rest()
    resp.force_close()
    return resp


_CODES = {code: str(code) for code in range(100, 600)}


def _make_guard(settings: ServerSettings) -> Any:
    token = settings.token
    infer_too = settings.infer_requires_token

    names = host_names(settings)
    hosts_seen: dict[str, bool] = {}

    def refusal(request: web.Request, over_tcp: bool) -> web.Response | None:
        """What every request must pass before its handler runs: host, origin, token, coding, JSON.
        ``over_tcp``: a client's connection (a front end's own hop, and gRPC's, is a Unix socket)."""
        refused = _foreign_host(request, names, hosts_seen) if over_tcp else None
        refused = refused or _cross_site(request)
        if refused is None and token is not None and _needs_token(request.path, infer_too):
            refused = _check_token(request, token)
        return refused or _check_encoding(request) or _not_json(request)

    @web.middleware
    async def guard(request: web.Request, handler: Handler) -> web.StreamResponse:
        over_tcp = not isinstance(request.transport and request.transport.get_extra_info("sockname"), str)
        resp = refusal(request, over_tcp)
        if resp is None:
            try:
                resp = await handler(request)
            except EngineError as e:
                resp = engine_error_response(e)
            except HttpError as e:
                resp = error_response(e.status, e.message, e.headers)
            except ConfigError as e:
                resp = error_response(400, str(e))
            except web.RequestPayloadError as e:
                resp = _unreadable_body(request, e)
            except BodyError as e:
                resp = _refused_body(request, error_response(e.status, e.message))
            except web.HTTPException as e:
                if e.status < 400 or e.content_type == "application/json":
                    raise
                resp = error_response(e.status, e.reason if e.text is None or e.text.startswith(str(e.status))
                                      else e.text, {k: v for k, v in e.headers.items() if k == "Allow"})
            except (asyncio.CancelledError, ConnectionResetError):
                raise
            except Exception:  # noqa: BLE001 - one bad request must not take the server down
                log.exception("unhandled error in %s %s", request.method, request.path)
                resp = error_response(500, "internal error (logged by the server)")
        if request.app[DRAINING].is_set() and not resp.prepared:
            resp.force_close()  # shutting down: answer, then close (the client opens no more here)
        counter = request.app[REQUESTS]
        if counter is not None and over_tcp and VIA_HEADER not in request.headers:
            # counted once, where a client reached us (not a gRPC call's internal one over a Unix socket)
            counter.labels("http", _CODES.get(resp.status) or str(resp.status)).inc()
        return resp

    return guard


async def read_body(request: web.Request) -> bytes:
    """The request body within the server's bounds (body.py): 413 / 408 otherwise."""
    s = request.app[SETTINGS]
    return await body_mod.read_body(request, s.max_body_bytes, s.max_inflation_ratio, s.body_timeout_s)


async def read_json(request: web.Request, *, optional: bool = False) -> dict[str, Any]:
    """The body as a JSON object; an empty body is {} when ``optional``."""
    body = await read_body(request)
    if not body.strip():
        if optional:
            return {}
        raise HttpError(400, "expected a JSON object in the request body, got an empty body")
    try:
        value = json.loads(body)
    except (ValueError, UnicodeDecodeError) as e:
        raise HttpError(400, f"the request body is not valid JSON: {e}") from None
    if not isinstance(value, dict):
        raise HttpError(400, f"expected a JSON object in the request body, got {type(value).__name__}")
    return value


def dumps(value: Any) -> bytes:
    """JSON for every answer and event: orjson (NaN and ±Inf become null, as JSON has no
    such numbers; numpy values serialise natively; anything else by ``_jsonable``)."""
    return orjson.dumps(value, default=_jsonable, option=orjson.OPT_SERIALIZE_NUMPY | orjson.OPT_NON_STR_KEYS)


def json_response(value: Any, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(status=status, body=dumps(value), content_type="application/json", headers=headers)


def _jsonable(value: Any) -> Any:
    if hasattr(value, "tolist"):
        return value.tolist()
    if isinstance(value, (set, frozenset, tuple)):
        return list(value)
    return str(value)


def build_app(engine: Any, settings: ServerSettings | None = None) -> web.Application:
    """The whole HTTP face of one engine."""
    from . import api, metrics, v2

    settings = settings or ServerSettings()
    app = web.Application(middlewares=[_make_guard(settings)], client_max_size=settings.max_body_bytes)
    app[ENGINE] = engine
    app[LINK] = LocalLink(engine)
    app[SETTINGS] = settings
    app[STARTED] = time.time()
    app[CLOSING] = asyncio.Event()
    app[DRAINING] = asyncio.Event()
    v2.add_routes(app)
    api.add_routes(app)
    registry = metrics.make_registry(engine, settings.frontends_metrics_dir)
    # this app counts the requests it answers, unless front-end processes do (they are summed instead)
    app[REQUESTS] = metrics.frontend_requests(registry, engine) if settings.frontends_metrics_dir is None else None

    async def get_metrics(request: web.Request) -> web.Response:
        body, content_type = metrics.render(registry, request.headers.get("Accept"))
        resp = web.Response(body=body)
        resp.headers["Content-Type"] = content_type
        return resp

    app.router.add_get("/metrics", get_metrics)

    async def on_shutdown(app: web.Application) -> None:
        app[CLOSING].set()  # event streams end, so shutdown does not wait on them

    app.on_shutdown.append(on_shutdown)
    return app


def http_url(host: str, port: int | None) -> str:
    """The URL clients use for (host, port); an IPv6 address in brackets."""
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


class Server:
    """Runs an app on a host and port; ``stop()`` stops accepting and drains.

    Shutdown in order: the listener closes (new connections are refused);
    for ``drain_grace_s`` the connections already open may still send a
    request, which is served and answered with ``Connection: close`` (a
    client reusing a kept-alive connection gets an answer, not a silent
    close); requests in flight finish (bounded by ``shutdown_timeout_s``);
    then every connection is closed.
    """

    def __init__(self, engine: Any, settings: ServerSettings, *, app: web.Application | None = None,
                 grpc_port: int | None = None, grpc_required: bool = True):
        self.engine = engine
        self.settings = settings
        self.app = app if app is not None else build_app(engine, settings)
        self.grpc_port_setting = grpc_port  # KServe V2 over gRPC on this loop too (grpc_v2.py); None: off
        self.grpc_required = grpc_required  # False: a port that cannot be bound is a warning, not a failure
        self.grpc: Any = None
        self._grpc_dir: str | None = None  # holds the Unix socket gRPC's metadata calls use
        self._unix: asyncio.AbstractServer | None = None
        self._runner: web.AppRunner | None = None
        self._listener: asyncio.AbstractServer | None = None
        self.port: int | None = None
        self.token_file: Path | None = None

    async def start(self) -> None:
        s = self.settings
        # lingering_time=0: a body left unread (refused, too large) is not read to its end after the
        # answer; the connection closes instead (body.py).
        # auto_decompress=False: body.py decodes compressed bodies itself, in bounded pieces.
        self._runner = web.AppRunner(self.app, access_log=log if s.access_log else None,
                                     shutdown_timeout=s.shutdown_timeout_s, handle_signals=False,
                                     lingering_time=0, keepalive_timeout=s.keepalive_timeout_s,
                                     auto_decompress=False)
        await self._runner.setup()
        loop = asyncio.get_running_loop()
        server = self._runner.server
        assert server is not None

        def protocol() -> asyncio.Protocol:
            return ConnectionGuard(quiet_parse_errors(server()), s.head_timeout_s, loop)

        if s.unix_path is not None:
            self._listener = await loop.create_unix_server(protocol, s.unix_path, backlog=1024)
            os.chmod(s.unix_path, 0o600)
            self.port = None
            log.info("control app on unix:%s", s.unix_path)
            return
        self._listener = await loop.create_server(protocol, s.host, s.port, reuse_address=True,
                                                  reuse_port=s.reuse_port or None, backlog=1024)
        sockets = self._listener.sockets or []
        self.port = sockets[0].getsockname()[1] if sockets else s.port
        if s.token is not None and s.token_dir is not None:
            self.token_file = tokenfile.write_token(s.token_dir, self.port, s.token)
        if self.grpc_port_setting is not None:
            try:
                await self._start_grpc(protocol)
            except OSError as e:
                if self.grpc_required:
                    raise
                log.warning("gRPC not started (%s): set --grpc-port to another port, or off", e)
                await self._stop_grpc()
        where = f" (in {self.token_file}: --attach reads it)" if self.token_file else ""
        log.info("listening on http://%s:%s (token %s)", s.host, self.port,
                 f"required for /api/ and /v2/repository{where}" if s.token else "off: --no-token")

    async def _start_grpc(self, protocol: Callable[[], asyncio.Protocol]) -> None:
        """gRPC beside HTTP: its metadata calls reach this app over a private Unix socket."""
        from .grpc_v2 import GrpcFrontEnd
        from .proxy import ControlProxy

        self._grpc_dir = rundir.make_run_dir()
        path = os.path.join(self._grpc_dir, "control.sock")
        self._unix = await asyncio.get_running_loop().create_unix_server(protocol, path)
        grpc = GrpcFrontEnd(self.app[LINK], ControlProxy(path), self.settings, self.grpc_port_setting,
                            self.app[REQUESTS])
        try:
            await grpc.start()
        except OSError:
            await grpc.servicer.control.close()
            raise
        self.grpc = grpc

    async def _stop_grpc(self) -> None:
        if self.grpc is not None:
            grpc, self.grpc = self.grpc, None
            await grpc.stop(self.settings.shutdown_timeout_s)
            await grpc.servicer.control.close()
        if self._grpc_dir is not None:
            if self._unix is not None:
                self._unix.close()
            shutil.rmtree(self._grpc_dir, ignore_errors=True)
            self._grpc_dir = None

    @property
    def grpc_port(self) -> int | None:
        return self.grpc.port if self.grpc is not None else None

    @property
    def url(self) -> str:
        return http_url(self.settings.host, self.port)

    async def stop(self) -> None:
        """Stop accepting, answer what open connections still send (then close them), let
        in-flight requests finish (bounded by shutdown_timeout_s)."""
        await self._stop_grpc()
        if self._runner is None:
            return
        runner, self._runner = self._runner, None
        listener, self._listener = self._listener, None
        if listener is not None:
            listener.close()  # new connections are refused from here
        self.app[DRAINING].set()  # every answer from here says Connection: close
        self.app[CLOSING].set()  # event streams end now rather than hold their connections
        server = runner.server
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.settings.drain_grace_s
        while server is not None and server.connections and loop.time() < deadline:
            await asyncio.sleep(0.02)
        await runner.cleanup()
