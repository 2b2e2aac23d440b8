"""A front-end process hands everything but inference to the engine core's own app.

The control API, the event stream, ``/metrics``, ``/v1/models`` and V2's
metadata, config, statistics and repository calls are rare next to infer
calls, and their answers must be exactly what one process gives.  So the
engine core runs the very same aiohttp app (``app.build_app``) on a Unix
socket in a private directory, and a front end forwards those requests to
it: the answer is the single-process answer by construction.

The front end has already applied its guard (token, cross-site, coding,
JSON) and read the body within its bounds; it forwards the decoded body with
the client's headers minus the hop-by-hop ones, and the core checks the
token again.  An event stream is relayed chunk by chunk until either side
ends it (a shutdown ends it, as in one process).  A core that cannot be
reached answers 503.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Any

import aiohttp
from aiohttp import web

from .web import CLOSING, FORWARD_ROUTE, VIA_HEADER, HttpError, read_body

log = logging.getLogger("modelconsole.server.proxy")

# Not forwarded: hop-by-hop headers, what the forwarded body no longer has (its coding and length),
# and what the front end's guard has already judged (origin).
_DROP_REQUEST = frozenset(h.lower() for h in (
    "Connection", "Keep-Alive", "Transfer-Encoding", "TE", "Upgrade", "Proxy-Authorization", "Proxy-Connection",
    "Host", "Content-Length", "Content-Encoding", "Origin", "Sec-Fetch-Site", "Sec-Fetch-Mode", "Sec-Fetch-Dest",
    "Trailer",
))
_DROP_RESPONSE = frozenset(h.lower() for h in (
    "Connection", "Keep-Alive", "Transfer-Encoding", "Content-Length", "Server", "Date",
))

PROXY: web.AppKey[ControlProxy] = web.AppKey("proxy")


class ControlProxy:
    """Forwards to the engine core's app on a Unix socket (``unix_path``), or to a fleet's control
    plane over TCP (``base_url``, cluster/frontend.py)."""

    def __init__(self, unix_path: str | None = None, base_url: str | None = None):
        self.unix_path = unix_path
        self.base = base_url.rstrip("/") if base_url else "http://engine-core"
        self._session: aiohttp.ClientSession | None = None
        self._streams: set[aiohttp.ClientResponse] = set()

    def _client(self) -> aiohttp.ClientSession:
        if self._session is None:
            connector = (aiohttp.UnixConnector(path=self.unix_path, limit=64) if self.unix_path is not None
                         else aiohttp.TCPConnector(limit=64))
            self._session = aiohttp.ClientSession(
                connector=connector,
                auto_decompress=False,  # the client's Accept-Encoding went through; its coding comes back as is
                timeout=aiohttp.ClientTimeout(total=None, sock_connect=10),
            )
        return self._session

    async def forward(self, request: web.Request) -> web.StreamResponse:
        body = await read_body(request) if request.body_exists else None
        headers = {k: v for k, v in request.headers.items() if k.lower() not in _DROP_REQUEST}
        headers[VIA_HEADER] = "front-end"  # counted where the client reached us, not again upstream
        try:
            upstream = await self._client().request(request.method, self.base + request.path_qs,
                                                    data=body, headers=headers, allow_redirects=False)
        except (aiohttp.ClientConnectionError, OSError) as e:
            raise HttpError(503, f"the engine core is not reachable ({e})", {"Retry-After": "1"}) from None
        try:
            out_headers = {k: v for k, v in upstream.headers.items() if k.lower() not in _DROP_RESPONSE}
            if upstream.content_type != "text/event-stream":
                data = await upstream.read()
                return web.Response(status=upstream.status, body=data, headers=out_headers)
            return await self._relay(request, upstream, out_headers)
        finally:
            upstream.release()

    async def call(self, method: str, path: str, body: bytes | None, token: str | None) -> tuple[int, Any, bytes]:
        """One call of another protocol's front end (gRPC) to the engine's app: (status, headers, body)."""
        headers = {"Content-Type": "application/json"} if body is not None else {}
        headers[VIA_HEADER] = "front-end"
        if token is not None:
            headers["Authorization"] = f"Bearer {token}"
        try:
            async with self._client().request(method, self.base + path, data=body,
                                              headers=headers) as upstream:
                return upstream.status, upstream.headers, await upstream.read()
        except (aiohttp.ClientConnectionError, OSError) as e:
            raise HttpError(503, f"the engine core is not reachable ({e})", {"Retry-After": "1"}) from None

    async def _relay(self, request: web.Request, upstream: aiohttp.ClientResponse,
                     headers: dict[str, str]) -> web.StreamResponse:
        closing = request.app[CLOSING]
        if closing.is_set():  # this front end is stopping: a console must not "reconnect" to it
            raise HttpError(503, "the server is shutting down", {"Retry-After": "2"})
        resp = web.StreamResponse(status=upstream.status, headers=headers)
        await resp.prepare(request)
        self._streams.add(upstream)
        try:
            while not closing.is_set():
                chunk = await upstream.content.readany()
                if not chunk:
                    break
                await resp.write(chunk)
        except (aiohttp.ClientError, ConnectionResetError):
            pass
        finally:
            self._streams.discard(upstream)
        if closing.is_set():
            with contextlib.suppress(ConnectionResetError, aiohttp.ClientError):
                await resp.write(b'event: stopping\ndata: {"reason":"the server is shutting down"}\n\n')
        return resp

    def end_streams(self) -> None:
        """Shutdown: end every relayed event stream now (their handlers return)."""
        for upstream in list(self._streams):
            upstream.close()

    async def close(self) -> None:
        self.end_streams()
        if self._session is not None:
            await self._session.close()


async def forward(request: web.Request) -> web.StreamResponse:
    return await request.app[PROXY].forward(request)


def add_routes(app: web.Application, proxy: ControlProxy) -> None:
    app[PROXY] = proxy
    # named so the guard leaves method and content-type judgements to the engine core, which knows
    # the real routes (a front end would otherwise answer 415 where one process answers 405)
    app.router.add_route("*", "/{tail:.*}", forward, name=FORWARD_ROUTE)
