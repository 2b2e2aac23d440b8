"""``modelconsole --serve``: the engine and the HTTP server, headless, until SIGINT or SIGTERM.

Shutdown is graceful and bounded: stop accepting connections, let the
requests in flight (and everything already queued) finish within
``shutdown_timeout_s``, free every model, close the store (everything the
operator changed is already in it: each change is committed before it is
acknowledged), exit 0.  A second signal during shutdown exits at once
(status 1); the store's WAL keeps it consistent.

Engine events (loads, evictions, failures, operator actions) are logged to
stderr one per line, so ``journalctl -u modelconsole`` tells the story.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
from typing import Any

from .app import Server
from .web import ServerSettings

log = logging.getLogger("modelconsole.serve")

_LEVELS = {"info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR}


async def _log_events(engine: Any) -> None:
    events = logging.getLogger("modelconsole.events")
    with engine.subscribe(maxsize=10_000) as sub:
        async for ev in sub:
            events.log(_LEVELS.get(ev.level, logging.INFO), "%s: %s", ev.kind, ev.message)


async def start_engine(config: Any, store_path: str) -> Any:
    """The engine of a config, with its store opened and the stored changes restored."""
    from modelconsole.scheduler.engine import Engine
    from modelconsole.scheduler.store import Store

    engine = Engine.from_config(config, Store(store_path))
    await engine.start(config.models, from_file=config.path is not None)
    return engine


def make_server(engine: Any, settings: ServerSettings, workers: int = 0, grpc_port: int | None = None,
                log_level: str = "INFO", grpc_required: bool = True) -> Any:
    """One process (``workers`` 0: HTTP and gRPC on this event loop) or an engine core with
    ``workers`` front-end processes (``workers.py``); both have ``start``/``stop``/``port``/``url``."""
    if workers:
        from .workers import WorkerServer

        return WorkerServer(engine, settings, workers, grpc_port=grpc_port, grpc_required=grpc_required,
                            log_level=log_level)
    return Server(engine, settings, grpc_port=grpc_port, grpc_required=grpc_required)


async def serve(config: Any, settings: ServerSettings, store_path: str, *, stop: asyncio.Event | None = None,
                workers: int = 0, grpc_port: int | None = None, grpc_required: bool = True) -> int:
    """``grpc_required`` False (the default port, not asked for): a gRPC port in use is a warning."""
    loop = asyncio.get_running_loop()
    stop = stop or asyncio.Event()
    engine = await start_engine(config, store_path)
    logger = loop.create_task(_log_events(engine))
    server = make_server(engine, settings, workers, grpc_port, logging.getLevelName(log.getEffectiveLevel()),
                         grpc_required)
    try:
        await server.start()
    except OSError as e:
        log.error("cannot listen on %s:%s: %s", settings.host, settings.port, e.strerror or e)
        logger.cancel()
        await engine.close()
        return 1
    signals = 0

    def on_signal(signum: int) -> None:
        nonlocal signals
        signals += 1
        if signals > 1:
            log.error("second %s during shutdown: exiting now", signal.Signals(signum).name)
            os._exit(1)
        log.info("%s: shutting down (in-flight requests get up to %.0fs)", signal.Signals(signum).name,
                 settings.shutdown_timeout_s)
        stop.set()

    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, on_signal, signum)
    n = len(engine.snapshot_models())
    log.info("modelconsole serving %d model version%s on %s (store %s)", n, "" if n == 1 else "s", server.url,
             store_path)
    try:
        await stop.wait()
    finally:
        await server.stop()  # no new connections; in-flight requests finish
        await engine.close(drain_timeout=settings.shutdown_timeout_s)
        logger.cancel()
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(signum)
        log.info("stopped")
    return 0
