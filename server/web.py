"""What every module of the server shares, below all of them: the app's typed keys, the
server's settings, the errors a handler answers with, and the body and JSON helpers.

``app.py`` (the app and its life), ``guard.py`` (the middleware every request passes),
``api.py``, ``v2.py``, ``grpc_v2.py``, ``proxy.py`` and ``frontend.py`` import from here;
this module imports none of them.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import orjson
from aiohttp import web

from modelconsole.scheduler.config import Listener
from modelconsole.scheduler.errors import EngineError

from . import body as body_mod

if TYPE_CHECKING:  # annotations only: a front-end process never imports the engine
    from modelconsole.scheduler.engine import Engine

    from .link import Link


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
ENGINE: web.AppKey[Engine] = web.AppKey("engine")  # the in-process engine (front ends have none)
SETTINGS: web.AppKey[ServerSettings] = web.AppKey("settings")
STARTED: web.AppKey[float] = web.AppKey("started", float)
CLOSING: web.AppKey[asyncio.Event] = web.AppKey("closing", asyncio.Event)
DRAINING: web.AppKey[asyncio.Event] = web.AppKey("draining", asyncio.Event)
LINK: web.AppKey[Link] = web.AppKey("link")  # how infer calls reach the engine (link.py)
# modelconsole_frontend_requests_total (metrics.py); None where this app does not count (the engine core's
# control app behind front ends: they counted the request)
REQUESTS: web.AppKey[Any] = web.AppKey("requests", object)



@dataclass(frozen=True)
class ServerSettings(Listener):
    """A running server's settings: the ``Listener`` fields (as ``[server]`` and the flags chose
    them), and what only a running server knows."""

    max_body_bytes: int = 64 * 2**20
    drain_grace_s: float = 1.0  # at shutdown, open connections may still send a request (answered, then closed)
    snapshot_interval_s: float = 1.0  # the event stream's periodic snapshot
    shutdown_timeout_s: float = 30.0  # in-flight requests get this long at shutdown
    access_log: bool = False  # one line per request costs ~10% of throughput: off unless asked
    # Where a token made at start (tokenfile.py) is written once the port is known; None: not written.
    token_dir: str | None = None
    reuse_port: bool = False  # SO_REUSEPORT: several front-end processes listen on one port (workers.py)
    unix_path: str | None = None  # listen on this Unix socket instead of host:port (the engine core's control app)
    ipc_spin_us: float = 0.0  # --workers at low load: keep the loops awake this long (transport.KeepAwake)
    frontends_metrics_dir: str | None = None  # the engine core's app: /metrics sums the front ends' counters here
    # allowed_hosts (Listener): a web page that rebinds its own name to 127.0.0.1 sends its name: refused.

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


FORWARD_ROUTE = "forward-to-core"  # a front end's catch-all route to the engine core (proxy.py)
VIA_HEADER = "X-Modelconsole-Via"  # set by a front end forwarding a call: it counted the call already


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


def http_url(host: str, port: int | None) -> str:
    """The URL clients use for (host, port); an IPv6 address in brackets."""
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"
