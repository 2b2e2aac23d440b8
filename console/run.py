"""Running the console: embedded (engine + HTTP server + console in one process) or attached.

Embedded (``modelconsole``): the engine and its store start, the HTTP server
starts beside them on the same event loop (clients keep being answered while
the operator works), ``--demo`` adds the zoo models and a traffic generator,
then the Textual app runs until the operator quits; everything then shuts
down in order (traffic, server, engine, store).

Attached (``modelconsole --attach URL``): a ``RemoteClient`` and the same
app; torch is never imported (``console.client`` and ``console.app`` don't,
and nothing here imports the engine in this mode).  Quitting leaves the
server running.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Awaitable, Callable
from typing import Any

log = logging.getLogger("modelconsole.console")


async def run_embedded(config: Any, settings: Any, store_path: str, *, demo: bool, theme: str | None,
                       read_only: bool, keymap: dict[str, str] | None = None,
                       run_app: Callable[[Any], Awaitable[Any]] | None = None, grpc_port: int | None = None,
                       refresh_s: float = 1.0, out: Any = None) -> int:
    """``run_app``: how the app runs once everything is up (default ``app.run_async()``, in the
    terminal); tests pass one that drives it headless under Pilot, the rest of the path unchanged.
    ``out``: where the lines after the console closes go (default stderr): quitting drains the
    engine for up to 10 s, and the terminal says so instead of sitting blank."""
    out = out if out is not None else sys.stderr
    from modelconsole.scheduler.config import DEMO_MODELS
    from modelconsole.server.app import Server
    from modelconsole.server.serve import start_engine

    from .app import ModelConsoleApp
    from .local import LocalClient

    engine = await start_engine(config, store_path)
    traffic = None
    started = Server(engine, settings, grpc_port=grpc_port)
    server: Server | None = started
    server_error = None
    try:
        await started.start()
    except OSError as e:  # the console is still useful without its server: say so in it
        server_error = f"HTTP server not started on {settings.host}:{settings.port}: {e.strerror or e}"
        log.warning(server_error)
        server = None
    try:
        if demo:
            from modelconsole.scheduler.demo import DemoTraffic

            names = set(engine.model_names())
            for m in DEMO_MODELS:
                if m["name"] not in names:
                    await engine.register(dict(m), actor="demo")
            traffic = DemoTraffic(engine)
            traffic.start()

        def server_info() -> dict[str, Any]:
            return {"url": server.url if server is not None else None, "error": server_error,
                    "token_required": settings.token is not None, "accepting": engine.accepting}

        client = LocalClient(engine, server_info)
        await client.start()
        try:
            app = ModelConsoleApp(client, embedded=True, read_only=read_only, theme=theme, demo=traffic,
                                  keymap=keymap or None, refresh_s=refresh_s)
        except ValueError as e:  # an unknown theme: say which exist
            await client.close()
            print(f"modelconsole: {e}", file=sys.stderr)
            return 2
        try:
            await (run_app(app) if run_app is not None else app.run_async())
        finally:
            await client.close()
    finally:
        busy = sum(m["queue"] + m["in_flight"] for m in engine.snapshot_models())
        print(f"modelconsole: stopping — draining {busy} queued or running requests (up to 10 s), then "
              "unloading the models…", file=out, flush=True)
        if traffic is not None:
            await traffic.stop()
        if server is not None:
            await server.stop()
        await engine.close(drain_timeout=10.0)
        print("modelconsole: stopped.", file=out, flush=True)
    return 0


async def run_attached(url: str, token: str | None, *, theme: str | None, read_only: bool,
                       keymap: dict[str, str] | None = None, refresh_s: float = 1.0,
                       token_hint: str | None = None) -> int:
    """``token_hint``: where the token was looked for and how to give one, said when the server
    refuses it."""
    from .app import ModelConsoleApp
    from .client import ClientError, RemoteClient

    client = RemoteClient(url, token, read_only=read_only)
    try:
        await client.start()
    except ClientError as e:
        hint = f"\nmodelconsole: {token_hint}" if token_hint and e.status in (401, 403) else ""
        print(f"modelconsole: cannot attach to {url}: {e.message}{hint}", file=sys.stderr)
        return 1
    try:
        try:
            app = ModelConsoleApp(client, embedded=False, read_only=read_only, theme=theme,
                                  keymap=keymap or None, refresh_s=refresh_s)
        except ValueError as e:  # an unknown theme: say which exist
            print(f"modelconsole: {e}", file=sys.stderr)
            return 2
        await app.run_async()
    finally:
        await client.close()
    return 0
