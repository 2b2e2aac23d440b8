"""The aiohttp application and the server's life.

Three faces, one engine (``build_app``):

* ``v2.py``      KServe V2 / Open Inference Protocol as Triton extends it — what
                 clients (``tritonclient[http]``, perf_analyzer, curl) speak;
* ``api.py``     the operator's control API under ``/api/``, the event stream,
                 and ``GET /v1/models``;
* ``metrics.py`` ``GET /metrics`` for Prometheus.

Every request passes one middleware first (``guard.py``), so handlers stay
plain.  What the modules share (the app's keys, ``ServerSettings``, the
errors, the body and JSON helpers) lives in ``web.py``, below all of them.

Safe by default: ``127.0.0.1``; when bound elsewhere a token is required
(``console/cli.py`` refuses to start without one); request bodies are bounded
(``[server] max_body_mib``, 64 MiB), and the codec refuses declared shapes the
body cannot hold before allocating anything.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from aiohttp import web

from . import api, metrics, rundir, tokenfile, v2
from .connections import ConnectionGuard, quiet_parse_errors
from .guard import make_guard
from .link import LocalLink
from .web import CLOSING, DRAINING, ENGINE, LINK, REQUESTS, SETTINGS, STARTED, ServerSettings, http_url

log = logging.getLogger("modelconsole.server")


def build_app(engine: Any, settings: ServerSettings | None = None) -> web.Application:
    """The whole HTTP face of one engine."""

    settings = settings or ServerSettings()
    app = web.Application(middlewares=[make_guard(settings)], client_max_size=settings.max_body_bytes)
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
        sockets: list[Any] = list(self._listener.sockets or [])
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
        assert self.grpc_port_setting is not None  # called only when gRPC is on
        grpc = GrpcFrontEnd(self.app[LINK], ControlProxy(path), self.settings, self.grpc_port_setting,
                            self.app[REQUESTS], engine=self.app[ENGINE])
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
