"""One front-end process of ``--serve --workers N``: ``python -m modelconsole.server.frontend``.

It listens on the server's port beside its siblings (SO_REUSEPORT: the kernel
spreads connections over them) and does the per-request work that grows with
the traffic: HTTP, the token check, V2 decoding and its 4xx answers, and the
answer's encoding.  Infer calls go to the engine core over IPC (``transport.py``)
(``link.CoreLink``); everything else is forwarded to the core's own app
(``proxy.py``), so its answers are exactly one process's.  With a gRPC port
it serves KServe V2 over gRPC too (``grpc_v2.py``), through the same link.

The supervisor (``workers.py``, in the engine core) writes one JSON line of
settings to its stdin and keeps stdin open: EOF means the core is gone, and
the front end then answers what is in flight with 503 and exits.  It writes
``ready`` to stdout once it listens.  SIGTERM drains it (no new connections,
open ones answered with ``Connection: close``, in-flight calls finish);
SIGINT is the supervisor's to act on (a terminal's Ctrl-C reaches the whole
process group).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import sys
import time
from typing import Any

from aiohttp import web

from .app import Server
from .guard import make_guard
from .link import CoreLink
from .proxy import ControlProxy
from .web import CLOSING, DRAINING, LINK, REQUESTS, SETTINGS, STARTED, ServerSettings

log = logging.getLogger("modelconsole.server.frontend")


def requests_counter() -> Any:
    """This process's ``modelconsole_frontend_requests_total``, written to its file in
    PROMETHEUS_MULTIPROC_DIR (the supervisor sets it) for the engine core's /metrics to sum."""
    from .metrics import frontend_requests

    return frontend_requests(None)


def build_frontend_app(link: Any, proxy: ControlProxy, settings: ServerSettings,
                       requests: Any = None) -> web.Application:
    """The HTTP face of a front-end process: infer and health here, the rest forwarded.
    ``requests``: the counter it counts answers on (default: this process's, ``requests_counter``)."""
    from . import proxy as proxy_mod
    from . import v2

    app = web.Application(middlewares=[make_guard(settings)], client_max_size=settings.max_body_bytes)
    app[LINK] = link
    app[REQUESTS] = requests if requests is not None else requests_counter()
    app[SETTINGS] = settings
    app[STARTED] = time.time()
    app[CLOSING] = asyncio.Event()
    app[DRAINING] = asyncio.Event()
    r = app.router
    r.add_post("/v2/models/{name}/infer", v2.infer)
    r.add_post("/v2/models/{name}/versions/{version}/infer", v2.infer)
    r.add_get("/v2/health/live", v2.live)

    async def ready(request: web.Request) -> web.StreamResponse:
        if app[CLOSING].is_set() or not link.ready:
            return web.Response(status=400)
        return await proxy.forward(request)  # the engine's own readiness

    r.add_get("/v2/health/ready", ready)
    proxy_mod.add_routes(app, proxy)  # everything else

    async def on_shutdown(app: web.Application) -> None:
        app[CLOSING].set()
        proxy.end_streams()

    app.on_shutdown.append(on_shutdown)
    return app


async def run(spec: dict[str, Any], stdin_eof: asyncio.Future[None]) -> int:
    settings = ServerSettings(**spec["settings"])
    link = CoreLink(spec["ipc"], settings.ipc_spin_us)
    await link.start()
    # the control API: the engine core's app on its Unix socket, or a fleet's control plane (a URL)
    proxy = ControlProxy(base_url=spec["control_url"]) if spec.get("control_url") else ControlProxy(spec["control"])
    app = build_frontend_app(link, proxy, settings)
    server = Server(None, settings, app=app)
    await server.start()
    grpc = None
    if spec.get("grpc_port") is not None:
        from .grpc_v2 import GrpcFrontEnd

        grpc = GrpcFrontEnd(link, proxy, settings, spec["grpc_port"], app[REQUESTS])
        await grpc.start()
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    why = "SIGTERM"

    def on_term() -> None:
        stop.set()

    def on_eof(_: Any) -> None:
        nonlocal why
        why = "the engine core is gone"
        link.fail_all("the engine core stopped")
        stop.set()

    loop.add_signal_handler(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    stdin_eof.add_done_callback(on_eof)
    sys.stdout.write("ready\n")
    sys.stdout.flush()
    await stop.wait()
    log.info("front end %s (pid %d) stopping: %s", spec.get("index"), os.getpid(), why)
    if grpc is not None:
        await grpc.stop(settings.shutdown_timeout_s)
    await server.stop()
    await proxy.close()
    await link.close()
    return 0


class _OneLine(logging.Formatter):
    """One line per record, as ``--serve`` logs (a traceback's lines joined with ' | ')."""

    def format(self, record: logging.LogRecord) -> str:
        return " | ".join(line.strip() for line in super().format(record).splitlines() if line.strip())


async def _main() -> int:
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    line = await reader.readline()
    spec = json.loads(line)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_OneLine(f"%(asctime)s %(levelname)-7s %(name)s[fe{spec.get('index')}]: %(message)s"))
    logging.basicConfig(level=getattr(logging, str(spec.get("log_level", "INFO")).upper(), logging.INFO),
                        handlers=[handler])
    eof: asyncio.Future[None] = loop.create_future()

    async def watch() -> None:
        while await reader.read(4096):
            pass
        if not eof.done():
            eof.set_result(None)

    watcher = loop.create_task(watch())
    try:
        return await run(spec, eof)
    finally:
        watcher.cancel()


def main() -> int:
    try:
        import uvloop
    except ImportError:
        return asyncio.run(_main())
    return uvloop.run(_main())


if __name__ == "__main__":
    sys.exit(main())
