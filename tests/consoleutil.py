"""Helpers the console's tests share: wait for a condition, read and select table rows, HTTP."""

from __future__ import annotations

import contextlib
import json
import urllib.error
import urllib.request


def cell(app, key, col):
    return app.table.get_cell(key, col).plain


def select(app, key):
    app.table.move_cursor(row=app.table.get_row_index(key), animate=False)


def http(url: str, body: dict | None = None, timeout: float = 60.0) -> tuple[int | None, dict | None]:
    """(status, JSON answer) of a GET (or a POST of ``body``); (None, None) when nothing answers."""
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, method="POST" if body is not None else "GET",
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            raw = r.read()
            return r.status, json.loads(raw) if raw else None
    except urllib.error.HTTPError as e:
        return e.code, None
    except OSError:
        return None, None


@contextlib.asynccontextmanager
async def local_client(tmp_path, models):
    """An in-process console client on a real engine with two simulated 256 MiB GPUs and its store
    in ``tmp_path``, ``models`` registered; closed (client, then engine) on exit."""
    from modelconsole.console.local import LocalClient
    from modelconsole.gpu.devices import SimulatedBackend
    from modelconsole.scheduler.config import GpuConfig
    from modelconsole.scheduler.engine import Engine
    from modelconsole.scheduler.store import Store

    eng = Engine(Store(tmp_path / "state.db"), gpu=GpuConfig(reserve_mib=0, min_residency_s=0),
                 backend=SimulatedBackend([256 * 2**20, 256 * 2**20]), base_dir=str(tmp_path), tick_s=0.2)
    await eng.start()
    for m in models:
        await eng.register(m)
    c = LocalClient(eng)
    await c.start()
    try:
        yield c
    finally:
        await c.close()
        await eng.close()
