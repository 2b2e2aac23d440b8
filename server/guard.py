"""The one middleware every request passes (``make_guard``), so handlers stay plain.

It checks the bearer token where one is required (constant-time compare, ``bearer_status``:
the one token rule gRPC shares), refuses a Host header that is not ours (DNS rebinding) and a
cross-site browser request, and turns every error into ``{"error": "..."}`` with the status
the engine's error kind carries (400 bad input, 404 unknown, 409 conflict, 429 rate limited,
503 unavailable / queue full with ``Retry-After``, 504 deadline).  It also answers what aiohttp
would otherwise leave to the catch-all: a body in a ``Content-Encoding`` we cannot decode is a
415 listing the ones we can, and a body that is not valid data of its coding (corrupt gzip) is
a 400 that says so.  An exception nobody anticipated is logged and answered 500 — the process
keeps serving.  It counts what it answers over TCP (``modelconsole_frontend_requests_total``).
"""

from __future__ import annotations

import asyncio
import hmac
import logging
from typing import Any

from aiohttp import web

from modelconsole.scheduler.config import ConfigError
from modelconsole.scheduler.errors import EngineError

from . import body as body_mod
from .body import BodyError
from .web import (
    DRAINING,
    FORWARD_ROUTE,
    REQUESTS,
    VIA_HEADER,
    Handler,
    HttpError,
    ServerSettings,
    engine_error_response,
    error_response,
)

log = logging.getLogger("modelconsole.server")


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


def make_guard(settings: ServerSettings) -> Any:
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
        resp: web.StreamResponse | None = refusal(request, over_tcp)
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
        assert resp is not None  # every branch above answers
        if request.app[DRAINING].is_set() and not resp.prepared:
            resp.force_close()  # shutting down: answer, then close (the client opens no more here)
        counter = request.app[REQUESTS]
        if counter is not None and over_tcp and VIA_HEADER not in request.headers:
            # counted once, where a client reached us (not a gRPC call's internal one over a Unix socket)
            counter.labels("http", _CODES.get(resp.status) or str(resp.status)).inc()
        return resp

    return guard
