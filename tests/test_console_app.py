"""The Textual console driven by Pilot on a real in-process engine (zoo models, simulated GPUs).

Every key and dialog: load, unload/evict (Cancel by default), pin, priority,
register, filter, sort, theme, help, the command palette, read-only mode, demo
rate, quit (attached and embedded), and the disconnected banner.
"""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import pytest
import torch
from consoleutil import cell, select, until
from modelconsole.console.app import PALETTE, ActionCommands, ModelConsoleApp
from modelconsole.console.client import LocalClient
from modelconsole.console.screens import ConfirmScreen, HelpScreen, RegisterScreen
from modelconsole.gpu.devices import SimulatedBackend
from modelconsole.scheduler.config import GpuConfig
from modelconsole.scheduler.engine import Engine
from modelconsole.scheduler.store import Store
from textual.command import CommandPalette
from textual.widgets import Input

MiB = 2**20
SIZE = (120, 40)
MODELS = (
    {"name": "tiny", "source": "zoo:tiny-mlp", "warmup": 0, "device": "auto"},
    {"name": "cnn", "source": "zoo:small-cnn", "warmup": 0, "device": "auto"},
    {"name": "sized", "source": "zoo:sized", "args": {"mib": 4}, "warmup": 0, "device": "auto"},
)


class RecordingApp(ModelConsoleApp):
    """The console, keeping every notification it shows."""

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.notes: list[tuple[str, str]] = []

    def notify(self, message, *, title="", severity="information", **kw):
        self.notes.append((str(message), severity))
        return super().notify(message, title=title, severity=severity, **kw)


@pytest.fixture
async def client(tmp_path):
    backend = SimulatedBackend([256 * MiB, 256 * MiB])
    eng = Engine(Store(tmp_path / "state.db"), gpu=GpuConfig(reserve_mib=0, min_residency_s=0), backend=backend,
                 base_dir=str(tmp_path), tick_s=0.2)
    await eng.start()
    for m in MODELS:
        await eng.register(m)
    c = LocalClient(eng)
    await c.start()
    yield c
    await c.close()
    await eng.close()


def rate_of(client, name):
    return next(m["request_rate"] for m in client.snapshot()["models"] if m["name"] == name) or 0.0


def screen_text(app) -> str:
    return "\n".join("".join(seg.text for seg in strip) for strip in app.screen._compositor.render_strips())


async def test_main_screen_shows_models_gpus_detail_and_log(client):
    app = RecordingApp(client, refresh_s=0.25)
    async with app.run_test(size=SIZE) as pilot:
        await pilot.pause()
        assert {str(k.value) for k in app.table.rows} == {"tiny:1", "cnn:1", "sized:1"}
        assert [c.label.plain for c in app.table.columns.values()][:3] == ["model", "ver", "state"]
        assert cell(app, "tiny:1", "state") == "UNLOADED" and cell(app, "tiny:1", "version") == "1*"
        await until(pilot, lambda: len(app.gpus.cards) == 2, what="two GPU cards")
        await pilot.pause(0.3)
        text = screen_text(app)
        assert "Simulated GPU 0" in text and "Simulated GPU 1" in text and "util" in text
        assert "0.0/0.2/0.2 GiB" in text  # used / budget / total
        assert any("tiny v1 registered" in line for line in app.event_lines)
        select(app, "sized:1")
        await pilot.pause()
        assert "sized v1" in screen_text(app)  # the detail pane follows the cursor
        assert "l Load" in text and "q Quit" in text  # the footer


async def test_load_key_loads_the_selected_model_without_freezing(client):
    gate = asyncio.Event()
    real_load = client.load

    async def held_load(name, version=None):  # a load that takes as long as the test wants
        await gate.wait()
        return await real_load(name, version)

    client.load = held_load
    app = RecordingApp(client, refresh_s=0.25)
    async with app.run_test(size=SIZE) as pilot:
        await pilot.pause()
        select(app, "tiny:1")
        await pilot.press("l")
        # while the load is pending the console keeps answering keys and refreshing
        await pilot.press("up")
        assert app.selected_key() == "sized:1"
        await pilot.press("down")
        assert app.selected_key() == "tiny:1"
        await client.engine.pin("sized")
        await until(pilot, lambda: "[pin]" in cell(app, "sized:1", "name"), what="refresh during a load")
        assert cell(app, "tiny:1", "state") == "UNLOADED"
        gate.set()
        await until(pilot, lambda: cell(app, "tiny:1", "state") == "READY", what="tiny READY")
        select(app, "cnn:1")
        rows_before = list(app.table.rows)
        await pilot.press("l")
        assert any("loading cnn v1" in n for n, _ in app.notes)  # visible at once
        await until(pilot, lambda: cell(app, "cnn:1", "state") == "READY", what="cnn READY")
        assert cell(app, "cnn:1", "device") in ("gpu0", "gpu1") and cell(app, "cnn:1", "memory") != "—"
        await until(pilot, lambda: any("✓ cnn v1 is READY" in line for line in app.event_lines), what="log")
        assert any("cnn v1 ready" in line for line in app.event_lines)  # the engine's own event
        assert list(app.table.rows) == rows_before  # updated in place, never refilled
        assert app.selected_key() == "cnn:1"
        # a second l on a READY model says so and does nothing
        await pilot.press("l")
        assert any("already loaded" in n for n, _ in app.notes)


async def test_unload_asks_and_cancel_is_the_default(client):
    await client.engine.load("tiny")
    app = RecordingApp(client, refresh_s=0.25)
    async with app.run_test(size=SIZE) as pilot:
        await pilot.pause()
        select(app, "tiny:1")
        await pilot.press("u")
        assert isinstance(app.screen, ConfirmScreen)
        assert app.focused is not None and app.focused.id == "cancel"
        await pilot.press("enter")  # the default: Cancel
        await pilot.pause()
        assert not isinstance(app.screen, ConfirmScreen)
        await pilot.pause(0.3)
        assert client.engine.instance("tiny").state == "READY" and cell(app, "tiny:1", "state") == "READY"
        await pilot.press("u")
        await pilot.press("escape")
        await pilot.pause(0.3)
        assert client.engine.instance("tiny").state == "READY"
        await pilot.press("u", "tab", "enter")  # choose Unload
        await until(pilot, lambda: cell(app, "tiny:1", "state") == "UNLOADED", what="tiny UNLOADED")
        await until(pilot, lambda: any("✓ tiny v1 is UNLOADED" in line for line in app.event_lines), what="log")


async def test_evict_asks_and_confirm_evicts(client):
    await client.engine.load("sized")
    app = RecordingApp(client, refresh_s=0.25)
    async with app.run_test(size=SIZE) as pilot:
        await pilot.pause()
        select(app, "sized:1")
        await pilot.press("e")
        assert isinstance(app.screen, ConfirmScreen)
        assert "keep value" in str(app.screen.message)  # why it would go
        await pilot.press("enter")
        await pilot.pause(0.3)
        assert client.engine.instance("sized").state == "READY"
        await pilot.press("e")
        await pilot.click("#confirm")
        await until(pilot, lambda: cell(app, "sized:1", "state") != "READY", what="sized evicted")
        await until(pilot, lambda: any("evicted" in line for line in app.event_lines), what="evicted event")
        # evicting what is not loaded: a clear error, in a notification and the log
        await pilot.press("e", "y")
        await until(pilot, lambda: any(s == "error" and "not loaded" in n for n, s in app.notes), what="error")
        assert any("✗ evict sized v1 failed" in line for line in app.event_lines)


async def test_pin_and_priority_keys(client):
    app = RecordingApp(client, refresh_s=0.25)
    async with app.run_test(size=SIZE) as pilot:
        await pilot.pause()
        select(app, "tiny:1")
        await pilot.press("p")
        await until(pilot, lambda: "[pin]" in cell(app, "tiny:1", "name"), what="pinned")
        assert client.engine.instance("tiny").pinned
        await pilot.press("p")
        await until(pilot, lambda: "[pin]" not in cell(app, "tiny:1", "name"), what="unpinned")
        assert not client.engine.instance("tiny").pinned
        assert cell(app, "tiny:1", "priority").endswith("/P2")
        await pilot.press("plus")
        await until(pilot, lambda: cell(app, "tiny:1", "priority").endswith("/P1"), what="P1")
        assert client.engine.instance("tiny").cfg.priority == 1
        await pilot.press("plus")  # already the most urgent
        assert any(s == "warning" and "already at P1" in n for n, s in app.notes)
        await pilot.press("minus", "minus")  # two quick presses build on each other
        await until(pilot, lambda: client.engine.instance("tiny").cfg.priority == 3, what="P3")
        await until(pilot, lambda: cell(app, "tiny:1", "priority").endswith("/P3"), what="P3 shown")
        assert any("base priority 2 -> 3" in line for line in app.event_lines)


async def test_register_form(client):
    app = RecordingApp(client, refresh_s=0.25)
    async with app.run_test(size=SIZE) as pilot:
        await pilot.pause()
        await pilot.press("r")
        assert isinstance(app.screen, RegisterScreen)
        await pilot.press("enter")  # nothing filled in: the form says what is missing
        assert "name: required" in str(app.screen.query_one("#reg-error").render())
        app.screen.query_one("#reg-name", Input).value = "newbie"
        app.screen.query_one("#reg-source", Input).value = "zoo:tiny-mlp"
        app.screen.query_one("#reg-options", Input).value = "warmup=oops=1"
        app.screen.query_one("#reg-options", Input).focus()
        await pilot.press("enter")  # parses (warmup is the string "oops=1"); the engine refuses it
        await until(pilot, lambda: any(s == "error" and "warmup" in n for n, s in app.notes), what="refusal")
        assert not isinstance(app.screen, RegisterScreen)
        await pilot.press("r")
        app.screen.query_one("#reg-name", Input).value = "newbie"
        app.screen.query_one("#reg-source", Input).value = "zoo:tiny-mlp"
        app.screen.query_one("#reg-version", Input).value = "7"
        app.screen.query_one("#reg-options", Input).value = "warmup=0 max_batch_size=4"
        await pilot.click("#register-ok")
        await until(pilot, lambda: "newbie:7" in {str(k.value) for k in app.table.rows}, what="new row")
        assert client.engine.instance("newbie", "7").cfg.max_batch_size == 4
        assert cell(app, "newbie:7", "state") == "UNLOADED"
        assert any("newbie v7 registered" in n for n, _ in app.notes)
        # a bad options string never leaves the form
        await pilot.press("r")
        app.screen.query_one("#reg-name", Input).value = "x"
        app.screen.query_one("#reg-source", Input).value = "zoo:tiny-mlp"
        app.screen.query_one("#reg-options", Input).value = "{not json"
        await pilot.click("#register-ok")
        assert isinstance(app.screen, RegisterScreen)
        assert "not valid JSON" in str(app.screen.query_one("#reg-error").render())
        await pilot.press("escape")
        assert not isinstance(app.screen, RegisterScreen)


async def test_filter_and_sort(client):
    app = RecordingApp(client, refresh_s=0.25)
    async with app.run_test(size=SIZE) as pilot:
        await pilot.pause()
        await pilot.press("slash")
        box = app.query_one("#filter", Input)
        assert box.has_focus
        await pilot.press("c", "n", "n")
        await pilot.pause()
        assert {str(k.value) for k in app.table.rows} == {"cnn:1"}
        await pilot.press("enter")  # keeps the filter, back to the table
        await pilot.pause(0.4)
        assert app.table.has_focus and {str(k.value) for k in app.table.rows} == {"cnn:1"}
        assert "filter /cnn/" in app.query_one("#status").text
        await pilot.press("escape")  # clears it
        await pilot.pause()
        assert {str(k.value) for k in app.table.rows} == {"tiny:1", "cnn:1", "sized:1"}
        await pilot.press("slash", "t", "i", "n")  # esc while typing: cleared and closed too
        await pilot.pause()
        assert {str(k.value) for k in app.table.rows} == {"tiny:1"}
        await pilot.press("escape")
        await pilot.pause()
        assert not box.has_class("-active") and app.table.has_focus
        assert {str(k.value) for k in app.table.rows} == {"tiny:1", "cnn:1", "sized:1"}
        order = lambda: [str(r.key.value) for r in app.table.ordered_rows]
        assert order() == ["cnn:1", "sized:1", "tiny:1"]  # by name
        await pilot.press("O")
        assert order() == ["tiny:1", "sized:1", "cnn:1"]
        await pilot.press("o")
        assert app.sort_column == "version"
        app.sort_by("state", reverse=False)
        await client.engine.load("tiny")
        await pilot.pause(0.5)
        assert order()[0] == "tiny:1"  # READY sorts first, and follows live changes


async def test_theme_help_and_palette(client):
    app = RecordingApp(client, refresh_s=0.25)
    async with app.run_test(size=SIZE) as pilot:
        await pilot.pause()
        assert app.theme == "modelconsole-dark"
        await pilot.press("t")
        assert app.theme == "modelconsole-light"
        await pilot.press("t")
        assert app.theme not in ("modelconsole-dark", "modelconsole-light")
        await pilot.press("question_mark")
        assert isinstance(app.screen, HelpScreen)
        ids = {row[2] for row in app.screen.rows}
        assert {"load", "unload", "evict", "pin", "priority_up", "priority_down", "register", "filter",
                "palette", "theme", "help", "quit", "sort"} <= ids
        assert all(row[3] for row in app.screen.rows if row[2] in ("load", "unload"))
        await pilot.press("escape")
        assert not isinstance(app.screen, HelpScreen)
        # the palette holds every action
        titles = [t for t, _, _ in ActionCommands(app.screen)._commands()]
        assert all(title in titles for _, title, _ in PALETTE if "Demo" not in title)
        await pilot.press("colon")
        await pilot.pause()
        assert isinstance(app.screen, CommandPalette)
        await pilot.press(*"unload the")
        await pilot.pause(0.5)
        await pilot.press("enter")
        await until(pilot, lambda: isinstance(app.screen, ConfirmScreen), what="unload asked from the palette")
        await pilot.press("escape")
    light = RecordingApp(client, theme="modelconsole-light")
    async with light.run_test(size=SIZE) as pilot:
        await pilot.pause()
        assert light.theme == "modelconsole-light" and not light.current_theme.dark
    with pytest.raises(ValueError, match="unknown theme"):
        ModelConsoleApp(client, theme="no-such-theme")


async def test_keymap_remaps_by_binding_id(client):
    app = RecordingApp(client, refresh_s=0.25, keymap={"load": "L"})
    async with app.run_test(size=SIZE) as pilot:
        await pilot.pause()
        select(app, "tiny:1")
        await pilot.press("l")
        await pilot.pause(0.2)
        assert client.engine.instance("tiny").state == "UNLOADED"
        await pilot.press("L")
        await until(pilot, lambda: cell(app, "tiny:1", "state") == "READY", what="loaded by L")


async def test_read_only_blocks_every_change(client):
    await client.engine.load("tiny")
    app = RecordingApp(client, read_only=True, refresh_s=0.25)
    async with app.run_test(size=SIZE) as pilot:
        await pilot.pause()
        select(app, "cnn:1")
        await pilot.press("l", "p", "plus", "r")
        select(app, "tiny:1")
        await pilot.press("u", "e")
        await pilot.pause(0.4)
        assert not isinstance(app.screen, (ConfirmScreen, RegisterScreen))
        eng = client.engine
        assert eng.instance("cnn").state == "UNLOADED" and eng.instance("tiny").state == "READY"
        assert not eng.instance("cnn").pinned and eng.instance("cnn").cfg.priority == 2
        for action in ("load", "unload", "evict", "pin", "priority_up", "priority_down", "register"):
            assert app.check_action(action, ()) is False
        text = screen_text(app)
        assert "READ-ONLY" in text and "Load" not in text.splitlines()[-1]  # hidden from the footer
        titles = [t for t, _, _ in ActionCommands(app.screen)._commands()]
        assert "Load the selected model" not in titles and "Help: every key" in titles


async def test_demo_rate_keys(client):
    demo = SimpleNamespace(rate=4.0)
    app = RecordingApp(client, demo=demo, refresh_s=0.25)
    async with app.run_test(size=SIZE) as pilot:
        await pilot.pause()
        await pilot.press("right_square_bracket")
        assert demo.rate == 8.0
        await pilot.press("left_square_bracket", "left_square_bracket")
        assert demo.rate == 2.0
        assert "demo 2.00 req/s" in app.query_one("#status").text
    plain = RecordingApp(client)
    async with plain.run_test(size=SIZE) as pilot:
        await pilot.pause()
        assert plain.check_action("demo_faster", ()) is False
        await pilot.press("right_square_bracket")  # nothing happens, nothing breaks


async def test_quit_attached_leaves_at_once(client):
    app = RecordingApp(client)
    async with app.run_test(size=SIZE) as pilot:
        await pilot.pause()
        await pilot.press("q")
        await pilot.pause()
        assert not app.is_running
    assert client.engine.accepting  # the engine was not touched


async def test_quit_embedded_asks_while_traffic_flows(client):
    eng = client.engine
    await eng.load("tiny")
    stop = asyncio.Event()

    async def traffic():
        while not stop.is_set():
            await eng.infer("tiny", {"input": torch.randn(1, 64)})
            await asyncio.sleep(0.01)

    task = asyncio.create_task(traffic())
    try:
        app = RecordingApp(client, embedded=True, refresh_s=0.25)
        async with app.run_test(size=SIZE) as pilot:
            await until(pilot, lambda: rate_of(client, "tiny") > 0, what="traffic")
            await pilot.press("q")
            assert isinstance(app.screen, ConfirmScreen) and "Traffic is flowing" in str(app.screen.message)
            await pilot.press("enter")  # Cancel
            await pilot.pause()
            assert app.is_running
            await pilot.press("q", "tab", "enter")
            await pilot.pause()
            assert not app.is_running
    finally:
        stop.set()
        await task


async def test_quit_embedded_without_traffic_does_not_ask(client):
    app = RecordingApp(client, embedded=True)
    async with app.run_test(size=SIZE) as pilot:
        await pilot.pause()
        await pilot.press("q")
        await pilot.pause()
        assert not app.is_running


async def test_lost_connection_banner_and_recovery(client):
    app = RecordingApp(client, refresh_s=0.25)
    async with app.run_test(size=SIZE) as pilot:
        await pilot.pause()
        client.connected = False
        await until(pilot, lambda: app.screen.has_class("-disconnected"), what="greyed")
        assert "connection lost to the engine — reconnecting" in app.query_one("#banner").text
        assert app.query_one("#banner").display
        await client.engine.load("tiny")
        await pilot.pause(0.5)
        assert cell(app, "tiny:1", "state") == "UNLOADED"  # the last picture stays
        client.connected = True
        await until(pilot, lambda: not app.screen.has_class("-disconnected"), what="recovered")
        await until(pilot, lambda: cell(app, "tiny:1", "state") == "READY", what="fresh picture")
        assert not app.query_one("#banner").display


def test_the_console_ui_imports_neither_torch_nor_the_engine():
    import subprocess
    import sys

    code = ("import sys, modelconsole.console.app; "
            "print([m for m in sys.modules if m == 'torch' or m.startswith(('modelconsole.scheduler', "
            "'modelconsole.server', 'modelconsole.gpu'))])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
