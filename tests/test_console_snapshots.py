"""Snapshot tests of the console (pytest-textual-snapshot): the main screen and its dialogs, with the
data and every clock frozen, so a snapshot changes only when what the console draws changes.

The data is one real snapshot (``tests/data/console_snapshot.json``: the dict ``build_snapshot``
returns) recorded from a real engine on two simulated 24 GiB GPUs, with zoo models loaded, one
pinned, one failed to load, and a few requests served; then everything time-dependent in it
(timestamps, load times, latencies, rates, idle/resident times, uptime, utilisation, pids) was
replaced by fixed values.  ``python tests/test_console_snapshots.py`` records it again.

``FrozenClient`` serves that snapshot and no events.  What else moves is pinned down here:
the event clock (``format.time``: a fixed now, UTC instead of the machine's timezone), the
version in the status line, the Input cursor's blink, the refresh timer (an hour, so it never
fires), and the history graphs (filled to their full length, so they do not depend on how many
refreshes happened before the screenshot).

Update the SVGs (``tests/__snapshots__/test_console_snapshots/``) after an intended change with
``pytest tests/test_console_snapshots.py --snapshot-update`` and look at them; a failing run
writes ``snapshot_report.html`` with the differences side by side.
"""

from __future__ import annotations

import copy
import json
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from textual.command import CommandList, CommandPalette
from textual.screen import ModalScreen
from textual.widgets import Input
from waiting import until

from modelconsole.console import format as fmt
from modelconsole.console import status as status_module
from modelconsole.console.app import ModelConsoleApp
from modelconsole.console.client import EngineClient
from modelconsole.console.screens import ConfirmScreen, HelpScreen, RegisterScreen
from modelconsole.console.widgets import HISTORY

DATA = Path(__file__).parent / "data" / "console_snapshot.json"
SIZE = (120, 40)
T0 = 1735732800.0  # 2025-01-01 12:00:00 UTC: the engine's start in the frozen data
NOW = T0 + 900.0  # the snapshot's time, and the frozen clock's


def frozen_snapshot() -> dict[str, Any]:
    return json.loads(DATA.read_text())


class FrozenClient(EngineClient):
    """An engine that never changes: the same snapshot every time, no events; a control call
    answers the model's snapshot unchanged (as if it had been a no-op)."""

    def __init__(self, snapshot: dict[str, Any], *, read_only: bool = False) -> None:
        super().__init__(read_only)
        self._snapshot = snapshot
        self.url = None
        self.connected = True

    async def start(self) -> None:
        pass

    def snapshot(self) -> dict[str, Any]:
        return self._snapshot

    def _answer(self, action: str, name: str, version: str | None) -> dict[str, Any]:
        self._check_writable(action)
        return self._find(name, version)

    def _find(self, name: str, version: str | None) -> dict[str, Any]:
        for m in self._snapshot["models"]:
            if m["name"] == name and (m["version"] == version if version is not None else m["active"]):
                return copy.deepcopy(m)
        raise AssertionError(f"no model {name} v{version} in the frozen snapshot")

    async def load(self, name: str, version: str | None = None) -> dict[str, Any]:
        return self._answer("load", name, version)

    async def unload(self, name: str, version: str | None = None) -> dict[str, Any]:
        return self._answer("unload", name, version)

    async def evict(self, name: str, version: str | None = None) -> dict[str, Any]:
        return self._answer("evict", name, version)

    async def pin(self, name: str, version: str | None = None, pinned: bool = True) -> dict[str, Any]:
        return self._answer("pin", name, version)

    async def delete(self, name: str, version: str | None = None) -> dict[str, Any]:
        self._check_writable("delete")
        return {"name": name, "deleted": [version or "1"]}

    async def set_priority(self, name: str, version: str | None, priority: int) -> dict[str, Any]:
        return self._answer("set priority", name, version)

    async def register(self, name: str, source: str, version: str | None = None,
                       options: dict[str, Any] | None = None) -> dict[str, Any]:
        self._check_writable("register")
        return {"name": name, "version": version or "1", "source": source, "state": "UNLOADED"}

    async def audit(self, limit: int = 100, model: str | None = None) -> list[dict[str, Any]]:
        return []

    # versions routing: the routing answered unchanged (the snapshot's, else one version serving all)

    async def routing(self, name: str) -> dict[str, Any]:
        found = (self._snapshot.get("routing") or {}).get(name)
        if found is not None:
            return copy.deepcopy(found)
        active = self._find(name, None)["version"]
        return {"name": name, "active": active, "weights": {}, "shadow": [], "metric_output": None,
                "swap": None, "canary": None, "arms": {}}

    async def swap(self, name: str, version: str) -> dict[str, Any]:
        active = self._answer("swap", name, None)["version"]
        return {"name": name, "from": active, "to": active, "seconds": 0.0}

    async def set_split(self, name: str, weights: dict[str, float], shadow: list[str] | None = None,
                        metric_output: str | None = None) -> dict[str, Any]:
        self._check_writable("set a split")
        return await self.routing(name)

    async def start_canary(self, name: str, version: str, **params: Any) -> dict[str, Any]:
        self._check_writable("start a canary")
        return await self.routing(name)

    async def stop_canary(self, name: str) -> dict[str, Any]:
        self._check_writable("stop a canary")
        return await self.routing(name)


# format.clock's view of time: a fixed now, and UTC whatever the machine's timezone.
FROZEN_TIME = SimpleNamespace(time=lambda: NOW, localtime=time.gmtime, gmtime=time.gmtime,
                              strftime=time.strftime, monotonic=time.monotonic)


@pytest.fixture(autouse=True)
def frozen(monkeypatch):
    monkeypatch.setattr(fmt, "time", FROZEN_TIME)
    # the status line shows the package version: a release must not change every snapshot
    monkeypatch.setattr(status_module, "__version__", "0.0.0")
    # the Input cursor blinks on a 0.5 s timer: keep it shown (the focused input shows a cursor)
    monkeypatch.setattr(Input, "_toggle_cursor", lambda self: None)
    monkeypatch.delenv("NO_COLOR", raising=False)  # read by App.__init__: colours in every snapshot


class SnapshotApp(ModelConsoleApp):
    """The console, remembering the screen and status line it showed when the screenshot was
    taken: the tests check they are the state they claim (``--snapshot-update`` accepts anything)."""

    shown: Any = None
    status: str = ""

    def export_screenshot(self, *args: Any, **kw: Any) -> str:
        self.shown, self.status = self.screen, self.status_line.text
        return super().export_screenshot(*args, **kw)


def console(*, read_only: bool = False, **kw: Any) -> SnapshotApp:
    # refresh_s: an hour, so the periodic refresh never fires during a test (each refresh
    # adds a point to the history graphs); steady() refreshes a known number of times instead.
    return SnapshotApp(FrozenClient(frozen_snapshot(), read_only=read_only), refresh_s=3600.0, **kw)


async def steady(pilot) -> None:
    """The console as it looks after running a while on unchanging data: the GPU cards laid
    out and every history graph full (HISTORY refreshes), however many refreshes the start
    happened to make (the first snapshot's events ask for one more, on a 50 ms timer)."""
    app = pilot.app
    await until(lambda: len(app.gpus.cards) == 2
                and all(c.children and c.size.width for c in app.gpus.cards.values()), what="GPU cards", pilot=pilot)
    for _ in range(HISTORY):
        app.refresh_view(force=True)
    await pilot.pause()


def select(app: ModelConsoleApp, key: str) -> None:
    app.table.move_cursor(row=app.table.get_row_index(key), animate=False)


def test_main_screen(snap_compare):
    app = console()
    ok = snap_compare(app, terminal_size=SIZE, run_before=steady)
    assert not isinstance(app.shown, ModalScreen) and app.theme == "modelconsole-dark"
    assert ok


def test_main_screen_light_theme(snap_compare):
    app = console(theme="modelconsole-light")
    ok = snap_compare(app, terminal_size=SIZE, run_before=steady)
    assert not isinstance(app.shown, ModalScreen) and not app.current_theme.dark
    assert ok


def test_unload_confirm_dialog(snap_compare):
    async def before(pilot):
        await steady(pilot)
        select(pilot.app, "tiny:1")  # READY
        await pilot.pause()

    app = console()
    ok = snap_compare(app, press=["u"], terminal_size=SIZE, run_before=before)
    assert isinstance(app.shown, ConfirmScreen) and app.shown.title_text == "Unload tiny v1?"
    assert ok


def test_evict_confirm_dialog(snap_compare):
    async def before(pilot):
        await steady(pilot)
        select(pilot.app, "tiny:1")  # READY, not pinned: the dialog says why it would go
        await pilot.pause()

    app = console()
    ok = snap_compare(app, press=["e"], terminal_size=SIZE, run_before=before)
    assert isinstance(app.shown, ConfirmScreen) and app.shown.title_text == "Evict tiny v1?"
    assert "keep value" in app.shown.message
    assert ok


def test_quit_confirm_dialog(snap_compare):
    # embedded, with the frozen data's traffic flowing (tiny 2.4 req/s): q asks first
    app = console(embedded=True)
    ok = snap_compare(app, press=["q"], terminal_size=SIZE, run_before=steady)
    assert isinstance(app.shown, ConfirmScreen) and app.shown.title_text == "Quit while serving?"
    assert "embedded" in app.status
    assert ok


def test_command_palette(snap_compare):
    listed: list[str] = []

    async def before(pilot):
        await steady(pilot)
        await pilot.press("ctrl+p")
        # the palette gathers its commands in a worker: wait until it has listed them all
        await until(lambda: isinstance(pilot.app.screen, CommandPalette)
                    and pilot.app.screen.has_class("-ready"), what="the palette's commands", pilot=pilot)
        await pilot.pause()
        found = pilot.app.screen.query_one(CommandList)
        listed.extend(found.get_option_at_index(i).hit.text for i in range(found.option_count))

    app = console()
    ok = snap_compare(app, terminal_size=SIZE, run_before=before)
    assert isinstance(app.shown, CommandPalette)
    assert listed[:3] == ["Load the selected model", "Unload the selected model", "Evict the selected model"]
    assert ok


def test_register_form(snap_compare):
    app = console()
    ok = snap_compare(app, press=["r"], terminal_size=SIZE, run_before=steady)
    assert isinstance(app.shown, RegisterScreen)
    assert ok


def test_help_screen(snap_compare):
    app = console()
    ok = snap_compare(app, press=["question_mark"], terminal_size=SIZE, run_before=steady)
    assert isinstance(app.shown, HelpScreen)
    assert ok


def test_filter_active(snap_compare):
    app = console()
    ok = snap_compare(app, press=["slash", "t", "i", "n", "y"], terminal_size=SIZE, run_before=steady)
    assert "filter /tiny/ 3 of 7" in app.status
    assert ok


def test_read_only_main_screen(snap_compare):
    app = console(read_only=True)
    ok = snap_compare(app, terminal_size=SIZE, run_before=steady)
    assert not isinstance(app.shown, ModalScreen) and "READ-ONLY" in app.status
    assert ok


def test_disconnected(snap_compare):
    async def before(pilot):
        await steady(pilot)
        pilot.app.client.connected = False  # the link drops: the next refresh greys the picture
        pilot.app.refresh_view()
        await pilot.pause()

    app = console()
    ok = snap_compare(app, terminal_size=SIZE, run_before=before)
    assert app.shown.has_class("-disconnected")
    assert ok


def screen_text(app: ModelConsoleApp) -> str:
    return "\n".join("".join(seg.text for seg in strip) for strip in app.screen._compositor.render_strips())


def visible_rows(app: ModelConsoleApp) -> int:
    """Model rows the table shows without scrolling."""
    table = app.table
    return min(table.row_count, table.scrollable_content_region.height - table.header_height)


@pytest.mark.parametrize("size", [(80, 24), (160, 48)])
def test_main_screen_sizes(snap_compare, size):
    """80x24 is a first-class size: every model row (7 here, at least 8 when there are more),
    health and p95 on screen, ? in the header; 160x48 shows more columns, not fewer rows."""
    seen: dict[str, Any] = {}

    async def before(pilot):
        await steady(pilot)
        app = pilot.app
        seen.update(rows=visible_rows(app), text=screen_text(app), room=app.table.scrollable_content_region.height)

    app = console()
    ok = snap_compare(app, terminal_size=size, run_before=before)
    text = seen["text"]
    header = text.splitlines()[0]
    assert "? help" in header and "q quit" in header
    assert seen["rows"] == 7  # every model
    assert seen["room"] - 1 >= 8  # and room for 8 rows (the header row aside)
    for column in ("model", "state", "health", "req/s", "err%", "p95ms"):
        assert column in text, column
    assert "GPU0" in text and "GPU1" in text
    assert ok


def test_describe_view(snap_compare):
    async def before(pilot):
        await steady(pilot)
        select(pilot.app, "tiny:1")
        await pilot.pause()

    app = console()
    ok = snap_compare(app, press=["d"], terminal_size=SIZE, run_before=before)
    assert type(app.shown).__name__ == "DescribeScreen" and app.shown.key == "tiny:1"
    assert ok


def test_log_view_80x24(snap_compare):
    async def before(pilot):
        await steady(pilot)
        select(pilot.app, "broken:1")
        await pilot.pause()

    app = console()
    ok = snap_compare(app, press=["L"], terminal_size=(80, 24), run_before=before)
    assert type(app.shown).__name__ == "LogScreen"
    assert any("broken v1 failed to load" in line for line in app.shown.lines)
    assert ok


def test_command_line(snap_compare):
    app = console()
    ok = snap_compare(app, press=["colon", *"swap ti"], terminal_size=SIZE, run_before=steady)
    assert app.command_box.value == ":swap ti"
    assert ok


async def test_cells_built_directly_equal_richs_rendering():
    """ModelTable draws a plain one-line cell as segments it builds itself (the refresh's hot
    path): segment for segment what DataTable's Rich pipeline makes, for every cell of the frozen
    table, on and off the cursor, hovered or not, over plain and styled rows."""
    from rich.style import Style
    from textual.widgets import DataTable

    app = console()
    async with app.run_test(size=SIZE) as pilot:
        await steady(pilot)
        t = app.table
        direct = 0
        for cursor_row in (0, 3):
            t.move_cursor(row=cursor_row, animate=False)
            await pilot.pause()
            for r in range(t.row_count):
                rk = t._row_locations.get_key(r)
                for c, column in enumerate(t.ordered_columns):
                    value = t._data[rk][column.key]
                    width = column.get_render_width(t)
                    for cursor in (False, True):
                        for base in (t.rich_style, t.rich_style + Style(bgcolor="red", italic=True)):
                            got = t._render_text_cell(value, rk, r, c, base, width, cursor, cursor)
                            if got is None:
                                continue
                            direct += 1
                            assert got == DataTable._render_cell(t, r, c, base, width, cursor, cursor), (r, c)
        assert direct > 0.8 * 2 * 4 * t.row_count * len(t.columns)  # most cells take the direct way


# --------------------------------------------------------------------------- recording the data


async def record() -> dict[str, Any]:
    """One real snapshot from a real engine (simulated GPUs, zoo models), as ``build_snapshot``
    returns it in-process; torch and the engine are imported only here."""
    import tempfile

    import torch

    from modelconsole.console.local import LocalClient
    from modelconsole.gpu.devices import SimulatedBackend
    from modelconsole.scheduler.config import GpuConfig
    from modelconsole.scheduler.engine import Engine
    from modelconsole.scheduler.errors import EngineError
    from modelconsole.scheduler.store import Store

    gib = 2**30
    tmp = Path(tempfile.mkdtemp())
    (tmp / "broken.pt").write_bytes(b"not a torchscript archive")  # registers; fails to load
    eng = Engine(Store(tmp / "state.db"), gpu=GpuConfig(reserve_mib=0, min_residency_s=0),
                 backend=SimulatedBackend([24 * gib, 24 * gib]), base_dir=str(tmp), tick_s=0.2)
    await eng.start()
    try:
        for m in (
            {"name": "tiny", "source": "zoo:tiny-mlp", "latency_target_ms": 50},
            {"name": "cnn", "source": "zoo:small-cnn", "priority": 1},
            {"name": "encoder", "source": "zoo:encoder", "args": {"layers": 2, "d_model": 256, "heads": 4, "seq": 64}},
            {"name": "sized", "source": "zoo:sized", "args": {"mib": 512}},
            {"name": "tiny-big", "source": "zoo:tiny-mlp", "args": {"hidden": 1024}},
            {"name": "tiny", "source": "zoo:tiny-mlp", "version": "2"},
            {"name": "broken", "source": "torchscript:broken.pt",
             "inputs": [{"name": "x", "datatype": "FP32", "shape": [-1, 4]}],
             "outputs": [{"name": "y", "datatype": "FP32", "shape": [-1, 2]}]},
        ):
            await eng.register({"warmup": 0, "device": "auto", **m})
        client = LocalClient(eng)
        for name in ("tiny", "cnn", "encoder", "sized"):
            await eng.load(name)
        try:
            await eng.load("broken")
        except EngineError:
            pass
        await eng.pin("cnn")
        torch.manual_seed(0)
        for name, n, inputs in (("tiny", 40, lambda: {"input": torch.randn(1, 64)}),
                                ("cnn", 12, lambda: {"input": torch.randn(2, 3, 32, 32)}),
                                ("encoder", 5, lambda: {"input_ids": torch.randint(0, 1000, (1, 64))}),
                                ("sized", 3, lambda: {"input": torch.randn(4, 16)})):
            for _ in range(n):
                await eng.infer(name, inputs())
        return client.snapshot()
    finally:
        await eng.close()


def normalise(snap: dict[str, Any]) -> dict[str, Any]:
    """Every time-dependent value in a recorded snapshot replaced by a fixed one: the engine
    started at T0, loaded its models half a minute later, and the snapshot is from T0 + 15 min."""
    from modelconsole.scheduler.policy import Residency, explain

    snap_in_ts = snap["ts"]
    snap = copy.deepcopy(snap)
    snap["ts"] = NOW
    snap["server"].update(started=T0, uptime_s=NOW - T0)
    for d, util in zip(snap["devices"], (38.0, 12.0)):
        d.update(ts=NOW, utilization_pct=util)  # simulated devices read 0 %: show some
        for p in d["processes"]:
            p["pid"] = 4242
        d["budget"]["own_pid"] = 4242
    # per loaded model: (load seconds, request rate, idle s, (p50, p95, p99) ms); encoder misses its 100 ms target
    fixed = {"tiny": (0.42, 2.4, 0.4, (0.85, 1.9, 3.4)), "cnn": (0.61, 0.8, 1.2, (4.2, 11.5, 18.0)),
             "encoder": (2.35, 0.25, 4.0, (38.0, 142.0, 188.0)), "sized": (1.18, 0.0, 610.0, (0.31, 0.52, 0.6))}
    loaded_at: dict[str, float] = {}
    t = T0
    for ev in snap["events"]:  # in order, a second or so apart; loads from T0 + 30 s on
        if ev["kind"] == "loading" and t < T0 + 30:
            t = T0 + 30.0
        if ev["kind"] == "loaded":
            name = ev["model"]
            old = ev["data"]["load_seconds"]
            t += fixed[name][0]
            loaded_at[name] = t = round(t, 3)
            ev["data"]["load_seconds"] = fixed[name][0]
            ev["message"] = ev["message"].replace(f" in {old:.2f}s ", f" in {fixed[name][0]:.2f}s ")
        ev["ts"] = round(t, 3)
        t += 1.0 if ev["kind"] != "loading" else 0.0
    for m in snap["models"]:
        m["stats"].update(throughput_rps=0.0, error_rps=0.0)
        m["registered_at"] = T0
        if m["state"] == "FAILED":
            continue
        if m["name"] not in fixed or not m["active"]:
            assert m["state"] == "UNLOADED" and not m["stats"]["success"], m
            continue
        load_s, rate, idle_s, (p50, p95, p99) = fixed[m["name"]]
        stats = m["stats"]
        n = stats["execution_count"]
        stats.update(last_inference=NOW - idle_s, latency_ms={"p50": p50, "p95": p95, "p99": p99},
                     compute_ms_total=round(n * p50 * 0.8, 3), queue_ms_total=round(n * p50 * 0.1, 3),
                     request_ms_total=round(n * p50, 3), throughput_rps=rate, error_rps=0.0)
        m.update(load_seconds=load_s, loaded_at=loaded_at[m["name"]], request_rate=rate, urgency=0.0)
        ev = m["eviction"]
        m["eviction"] = explain(Residency(key=ev["key"], bytes=ev["bytes"], request_rate=rate, reload_seconds=load_s,
                                          base_priority=ev["base_priority"], pinned=ev["pinned"], busy=False,
                                          loaded_at=loaded_at[m["name"]], last_used=NOW - idle_s), NOW)
        m["eviction"].update(resident_s=round(NOW - loaded_at[m["name"]], 3), idle_s=idle_s)  # no float noise
    recorded_at = snap_in_ts

    def walk(v: Any) -> None:  # no wall-clock time of the recording is left
        if isinstance(v, dict):
            for x in v.values():
                walk(x)
        elif isinstance(v, list):
            for x in v:
                walk(x)
        elif isinstance(v, float):
            assert abs(v - recorded_at) > 86400, v

    walk(snap)
    json.dumps(snap, allow_nan=False)  # plain JSON: no inf or nan left
    return snap


if __name__ == "__main__":
    import asyncio

    DATA.parent.mkdir(exist_ok=True)
    DATA.write_text(json.dumps(normalise(asyncio.run(record())), indent=1, sort_keys=True, ensure_ascii=False) + "\n")
    print(f"wrote {DATA}")
