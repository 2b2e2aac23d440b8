"""The Textual console driven by Pilot on a real in-process engine (zoo models, simulated GPUs).

Every key and dialog: load, unload/evict (Cancel by default), pin, priority,
register, filter, sort, theme, help, the command palette (``:`` and ctrl+p),
read-only mode, demo rate, quit (``q`` and ctrl+q, attached and embedded), and
the disconnected banner; the table updated in place; the GPU graphs' fixed
0-100 % axis; an eviction's reason in the log; and ``run_embedded``'s HTTP
server answering clients while the console runs.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import Counter
from types import SimpleNamespace

import pytest
import torch
from consoleutil import cell, http, local_client, select
from textual.app import App
from textual.command import CommandList, CommandPalette
from textual.widgets import Input
from waiting import until

from modelconsole.console import format as fmt
from modelconsole.console.app import PALETTE, ActionCommands, ModelConsoleApp
from modelconsole.console.local import LocalClient
from modelconsole.console.screens import ConfirmScreen, HelpScreen, RegisterScreen
from modelconsole.console.widgets import DeviceCard, Graph
from modelconsole.gpu.devices import SimulatedBackend
from modelconsole.scheduler.config import GpuConfig
from modelconsole.scheduler.engine import Engine
from modelconsole.scheduler.store import Store

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
    async with local_client(tmp_path, MODELS) as c:
        yield c


def rate_of(client, name):
    return next(m["stats"]["throughput_rps"] for m in client.snapshot()["models"] if m["name"] == name) or 0.0


def screen_text(app) -> str:
    return "\n".join("".join(seg.text for seg in strip) for strip in app.screen._compositor.render_strips())


async def test_main_screen_shows_models_gpus_detail_and_log(client):
    app = RecordingApp(client, refresh_s=0.25)
    async with app.run_test(size=SIZE) as pilot:
        await pilot.pause()
        assert {str(k.value) for k in app.table.rows} == {"tiny:1", "cnn:1", "sized:1"}
        # ranked: what an operator acts on first fits 80 columns; the sorted one has an arrow
        assert [c.label.plain for c in app.table.columns.values()][:8] == [
            " ", "model↑", "ver", "state", "health", "req/s", "err%", "p95ms"]
        assert cell(app, "tiny:1", "state") == "UNLOADED" and cell(app, "tiny:1", "version") == "1*"
        await until(lambda: len(app.gpus.cards) == 2, what="two GPU cards", pilot=pilot)
        await pilot.pause(0.3)
        text = screen_text(app)
        assert "Simulated GPU 0" in text and "Simulated GPU 1" in text and "util" in text
        assert "used 0 B · budget 256.0 MiB · total 256.0 MiB" in text, text  # nvitop's legend, MiB when small
        assert "processes: " in text
        assert any("tiny v1 registered" in line for line in app.event_lines)
        select(app, "sized:1")
        await pilot.pause()
        assert "sized v1" in screen_text(app)  # the detail pane follows the cursor
        assert "l Load" in text and "q Quit" in text and "? Help" in text  # the footer
        assert "? help · q quit" in text  # and the header


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
        await until(lambda: cell(app, "sized:1", "pin") == fmt.PIN_GLYPH, what="refresh during a load", pilot=pilot)
        assert cell(app, "tiny:1", "state") == "UNLOADED"
        gate.set()
        await until(lambda: cell(app, "tiny:1", "state") == "READY", what="tiny READY", pilot=pilot)
        select(app, "cnn:1")
        table = app.table
        # updated in place, never refilled: from here on the table must not lose or gain a row,
        # and a refresh rewrites only the cells whose text changed.  The real methods are
        # wrapped with counters that still call through.
        calls: Counter[str] = Counter()
        updates: list[tuple[str, str, str, str]] = []  # (row, column, text before, text after)
        def counting(name):
            real = getattr(table, name)

            def call(*a, **kw):
                calls[name] += 1
                return real(*a, **kw)

            return call

        for name in ("clear", "add_row", "add_rows", "remove_row", "update_cell", "update_cell_at"):
            setattr(table, name, counting(name))

        def recording_update_cells(changes, _real=table.update_cells):
            for row, col, value in changes:
                updates.append((row, col, cell(app, row, col), value.plain))
            return _real(changes)

        table.update_cells = recording_update_cells
        keys_before = list(table.rows)
        cells_before = {(k.value, c): table.get_cell(k, c) for k in keys_before for c in fmt.COLUMN_KEYS}
        await pilot.press("l")
        assert any("loading cnn v1" in n for n, _ in app.notes)  # visible at once
        await until(lambda: cell(app, "cnn:1", "state") == "READY", what="cnn READY", pilot=pilot)
        assert cell(app, "cnn:1", "device") in ("gpu0", "gpu1") and cell(app, "cnn:1", "memory") != "—"
        await until(lambda: any("cnn v1 is READY" in n for n, _ in app.notes), what="the answer", pilot=pilot)
        # one event line per action: the engine's own event, no "loading…" and "done" lines around it
        assert [line for line in app.event_lines if "cnn" in line][-1:] == [
            next(line for line in app.event_lines if "cnn v1 ready on gpu" in line)]
        # the engine's registered, loading and ready
        assert sum("cnn" in line for line in app.event_lines) == 3, list(app.event_lines)
        # more refreshes with changing data: a pin and a priority change made on the engine
        await client.engine.pin("cnn")
        await until(lambda: cell(app, "cnn:1", "pin") == fmt.PIN_GLYPH, what="cnn pinned in the table", pilot=pilot)
        await client.engine.set_priority("tiny", None, 1)
        await until(lambda: cell(app, "tiny:1", "priority").endswith("/P1"), what="tiny P1 in the table", pilot=pilot)
        assert calls == Counter(), calls  # no clear, no row added or removed, no cell-by-cell repaint
        assert all(a is b for a, b in zip(table.rows, keys_before, strict=True))  # the same row keys
        changed = {(row, col) for row, col, _, _ in updates}
        assert {("cnn:1", "state"), ("cnn:1", "device"), ("cnn:1", "pin"), ("tiny:1", "priority")} <= changed
        assert all(old != new for _, _, old, new in updates), updates  # only cells whose text changed
        for (row, col), before in cells_before.items():  # every other cell is the very same object
            if (row, col) not in changed:
                assert table.get_cell(row, col) is before, (row, col)
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
        # the answer was handled (it says so) and started nothing
        await until(lambda: sum(n == "Unload: cancelled." for n, _ in app.notes) == 1, what="cancel", pilot=pilot)
        assert client.engine.instance("tiny").state == "READY" and cell(app, "tiny:1", "state") == "READY"
        await pilot.press("u")
        await pilot.press("escape")
        await until(lambda: sum(n == "Unload: cancelled." for n, _ in app.notes) == 2, what="esc", pilot=pilot)
        assert client.engine.instance("tiny").state == "READY"
        await pilot.press("u", "tab", "enter")  # choose Unload
        await until(lambda: cell(app, "tiny:1", "state") == "UNLOADED", what="tiny UNLOADED", pilot=pilot)
        await until(lambda: any("tiny v1 unloaded" in line for line in app.event_lines), what="log", pilot=pilot)
        assert not any("✓" in line or "→" in line for line in app.event_lines)  # the engine's line only


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
        await until(lambda: cell(app, "sized:1", "state") != "READY", what="sized evicted", pilot=pilot)
        await until(lambda: any("evicted" in line for line in app.event_lines), what="evicted event", pilot=pilot)
        # evicting what is not loaded is not offered: e says why, and no dialog opens
        await until(lambda: app.check_action("evict", ()) is None, what="e greyed on an unloaded row", pilot=pilot)
        await pilot.press("e")
        await until(lambda: any(s == "warning" and "not loaded" in n for n, s in app.notes), what="why", pilot=pilot)
        assert not isinstance(app.screen, ConfirmScreen)


async def test_pin_and_priority_keys(client):
    app = RecordingApp(client, refresh_s=0.25)
    async with app.run_test(size=SIZE) as pilot:
        await pilot.pause()
        select(app, "tiny:1")
        await pilot.press("p")
        await until(lambda: cell(app, "tiny:1", "pin") == fmt.PIN_GLYPH, what="pinned", pilot=pilot)
        assert client.engine.instance("tiny").pinned
        await pilot.press("p")
        await until(lambda: cell(app, "tiny:1", "pin") != fmt.PIN_GLYPH, what="unpinned", pilot=pilot)
        assert not client.engine.instance("tiny").pinned
        assert cell(app, "tiny:1", "priority").endswith("/P2")
        await pilot.press("plus")
        await until(lambda: cell(app, "tiny:1", "priority").endswith("/P1"), what="P1", pilot=pilot)
        assert client.engine.instance("tiny").cfg.priority == 1
        await pilot.press("plus")  # already the most urgent
        assert any(s == "warning" and "already at P1" in n for n, s in app.notes)
        await pilot.press("minus", "minus")  # two quick presses build on each other
        await until(lambda: client.engine.instance("tiny").cfg.priority == 3, what="P3", pilot=pilot)
        await until(lambda: cell(app, "tiny:1", "priority").endswith("/P3"), what="P3 shown", pilot=pilot)
        assert any("base priority 2 -> 3" in line for line in app.event_lines)


async def test_register_form(client):
    app = RecordingApp(client, refresh_s=0.25)
    async with app.run_test(size=SIZE) as pilot:
        await pilot.pause()
        await pilot.press("r")
        assert isinstance(app.screen, RegisterScreen)
        await pilot.press("enter")  # nothing filled in: the form says what is missing, beside the field
        assert "name: required" in str(app.screen.query_one("#reg-name-error").render())
        app.screen.query_one("#reg-name", Input).value = "newbie"
        app.screen.query_one("#reg-source", Input).value = "zoo:tiny-mlp"
        app.screen.query_one("#reg-options", Input).value = "warmup=oops=1"
        app.screen.query_one("#reg-options", Input).focus()
        await pilot.press("enter")  # parses (warmup is the string "oops=1"); the engine refuses it
        form = app.screen
        await until(lambda: "warmup" in str(form.query_one("#reg-options-error").render()),
                    what="the refusal under the options field", pilot=pilot)
        # the form stays, with everything typed still there: fix the one field and register
        assert app.screen is form and form.query_one("#reg-name", Input).value == "newbie"
        assert "newbie:1" not in app.models
        form.query_one("#reg-version", Input).value = "7"
        form.query_one("#reg-options", Input).value = "warmup=0 max_batch_size=4"
        await pilot.click("#register-ok")
        await until(lambda: "newbie:7" in {str(k.value) for k in app.table.rows}, what="new row", pilot=pilot)
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
        assert "not valid JSON" in str(app.screen.query_one("#reg-options-error").render())
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
        def order() -> list[str]:
            return [str(r.key.value) for r in app.table.ordered_rows]

        assert order() == ["cnn:1", "sized:1", "tiny:1"]  # by name
        await pilot.press("O")
        assert order() == ["tiny:1", "sized:1", "cnn:1"]
        await pilot.press("o")
        assert app.sort_column == "version"
        app.sort_by("state", reverse=False)
        await client.engine.load("tiny")
        # READY sorts first, and follows live changes
        await until(lambda: order()[0] == "tiny:1", what="tiny:1 sorted first once READY", pilot=pilot)


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
        assert all(title in titles for a, title, _ in PALETTE if "Demo" not in title and a != "cycle_node")
        await pilot.press("ctrl+p")
        await pilot.pause()
        assert isinstance(app.screen, CommandPalette)
        await pilot.press(*"unload the")
        await pilot.pause(0.5)
        await pilot.press("enter")
        await until(lambda: isinstance(app.screen, ConfirmScreen), what="unload asked from the palette", pilot=pilot)
        await pilot.press("escape")
    light = RecordingApp(client, theme="modelconsole-light")
    async with light.run_test(size=SIZE) as pilot:
        await pilot.pause()
        assert light.theme == "modelconsole-light" and not light.current_theme.dark
    with pytest.raises(ValueError, match="unknown theme"):
        ModelConsoleApp(client, theme="no-such-theme")


def palette_titles(app) -> list[str]:
    """The commands the open palette lists, top to bottom."""
    found = app.screen.query_one(CommandList)
    return [found.get_option_at_index(i).hit.text for i in range(found.option_count)]


async def open_palette(pilot, *keys: str) -> list[str]:
    await pilot.press(*keys)
    await until(lambda: isinstance(pilot.app.screen, CommandPalette) and pilot.app.screen.has_class("-ready"),
                what=f"the palette opened by {'+'.join(keys)}", pilot=pilot)
    await pilot.pause()
    return palette_titles(pilot.app)


async def test_ctrl_p_opens_the_palette_listing_every_action(client):
    app = RecordingApp(client, refresh_s=0.25)
    async with app.run_test(size=SIZE) as pilot:
        await pilot.pause()
        # no demo here, and no fleet nodes to target
        actions = [title for action, title, _ in PALETTE if "Demo" not in title and action != "cycle_node"]
        sorts = [f"Sort by {fmt.COLUMN_LABELS[key]}" for key in fmt.COLUMN_KEYS]
        for key in ("ctrl+p",):
            titles = await open_palette(pilot, key)
            # every action, in the order of PALETTE, then the sort columns, then Textual's own commands
            assert titles[:len(actions) + len(sorts)] == actions + sorts, (key, titles)
            assert {"Theme", "Keys", "Screenshot"} <= set(titles[len(actions) + len(sorts):])
            assert titles.count("Quit") == 1  # Textual's Quit is the console's quit: listed once
            await pilot.press("escape")
            await until(lambda: not isinstance(app.screen, CommandPalette), what="palette closed", pilot=pilot)
        # an action picked from a search in the palette runs as its key would
        await open_palette(pilot, "ctrl+p")
        select(app, "tiny:1")
        await pilot.press(*"unload the")
        await pilot.pause(0.5)
        await pilot.press("enter")
        await until(lambda: isinstance(app.screen, ConfirmScreen), what="unload asked from the palette", pilot=pilot)
        assert app.screen.title_text == "Unload tiny v1?"
        await pilot.press("escape")
        # typing ':' into the filter types it, and opens nothing
        await pilot.press("slash", "colon")
        assert app.query_one("#filter", Input).value == ":" and not isinstance(app.screen, CommandPalette)
        await pilot.press("escape")
    # a keymap moves it by its binding id
    moved = RecordingApp(client, refresh_s=0.25, keymap={"palette": "k"})
    async with moved.run_test(size=SIZE) as pilot:
        await pilot.pause()
        await pilot.press("ctrl+p")
        await pilot.pause(0.2)
        assert not isinstance(moved.screen, CommandPalette)
        assert "Load the selected model" in await open_palette(pilot, "k")


async def test_keymap_remaps_by_binding_id(client):
    app = RecordingApp(client, refresh_s=0.25, keymap={"load": "L"})
    async with app.run_test(size=SIZE) as pilot:
        await pilot.pause()
        select(app, "tiny:1")
        await pilot.press("l")
        await pilot.pause(0.2)
        assert client.engine.instance("tiny").state == "UNLOADED"
        await pilot.press("L")
        await until(lambda: cell(app, "tiny:1", "state") == "READY", what="loaded by L", pilot=pilot)


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


@contextlib.asynccontextmanager
async def flowing(eng, name):
    """Requests to ``name`` every 10 ms while the block runs (so the console sees traffic)."""
    stop = asyncio.Event()

    async def traffic():
        while not stop.is_set():
            await eng.infer(name, {"input": torch.randn(1, 64)})
            await asyncio.sleep(0.01)

    task = asyncio.create_task(traffic())
    try:
        yield
    finally:
        stop.set()
        await task


async def test_quit_embedded_asks_while_traffic_flows(client):
    eng = client.engine
    await eng.load("tiny")
    async with flowing(eng, "tiny"):
        app = RecordingApp(client, embedded=True, refresh_s=0.25)
        async with app.run_test(size=SIZE) as pilot:
            await until(lambda: rate_of(client, "tiny") > 0, what="traffic", pilot=pilot)
            await pilot.press("q")
            assert isinstance(app.screen, ConfirmScreen) and "Traffic is flowing" in str(app.screen.message)
            await pilot.press("enter")  # Cancel
            await pilot.pause()
            assert app.is_running
            await pilot.press("q", "tab", "enter")
            await pilot.pause()
            assert not app.is_running


async def test_ctrl_q_is_the_quit_action(client):
    """ctrl+q (Textual's quit) goes through the console's quit: at once attached, asking first
    embedded while traffic flows, as q does."""
    for embedded in (False, True):  # no traffic yet: both leave at once
        app = RecordingApp(client, embedded=embedded)
        async with app.run_test(size=SIZE) as pilot:
            await pilot.pause()
            await pilot.press("ctrl+q")
            await pilot.pause()
            assert not app.is_running
    assert client.engine.accepting

    eng = client.engine
    await eng.load("tiny")
    async with flowing(eng, "tiny"):
        app = RecordingApp(client, embedded=True, refresh_s=0.25)
        async with app.run_test(size=SIZE) as pilot:
            await until(lambda: rate_of(client, "tiny") > 0, what="traffic", pilot=pilot)
            await pilot.press("ctrl+q")
            assert isinstance(app.screen, ConfirmScreen) and app.screen.title_text == "Quit while serving?"
            assert "Traffic is flowing" in str(app.screen.message)
            await pilot.press("ctrl+q")  # again while it asks: still the one question
            await pilot.pause()
            assert sum(isinstance(s, ConfirmScreen) for s in app.screen_stack) == 1
            await pilot.press("escape")  # cancelled: still running, still serving
            await pilot.pause()
            assert app.is_running and not isinstance(app.screen, ConfirmScreen)
            # from inside another dialog (the filter box has focus, ctrl+q is a priority key) too
            await pilot.press("slash", "ctrl+q")
            assert isinstance(app.screen, ConfirmScreen) and app.screen.title_text == "Quit while serving?"
            await pilot.press("tab", "enter")  # Quit
            await pilot.pause()
            assert not app.is_running


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
        await until(lambda: app.screen.has_class("-disconnected"), what="greyed", pilot=pilot)
        assert "connection lost to the engine — reconnecting" in app.query_one("#banner").text
        assert app.query_one("#banner").display
        await client.engine.load("tiny")
        await pilot.pause(0.5)
        assert cell(app, "tiny:1", "state") == "UNLOADED"  # the last picture stays
        client.connected = True
        await until(lambda: not app.screen.has_class("-disconnected"), what="recovered", pilot=pilot)
        await until(lambda: cell(app, "tiny:1", "state") == "READY", what="fresh picture", pilot=pilot)
        assert not app.query_one("#banner").display


# --------------------------------------------------------------------------- the GPU graphs' axis


def test_gpu_sparkline_axis_is_fixed_at_0_to_100_percent():
    low = fmt.spark([3.0] * 20, 20, 0.0, 100.0)
    assert low == fmt.BARS[0] * 20  # a flat 3 % is a row of the lowest bars, not full ones
    assert fmt.spark([100.0] * 20, 20, 0.0, 100.0) == fmt.BARS[-1] * 20
    assert fmt.spark([50.0] * 4, 4, 0.0, 100.0) == fmt.BARS[4] * 4  # half way up
    assert fmt.spark([3.0, 100.0], 4, 0.0, 100.0) == "  " + fmt.BARS[0] + fmt.BARS[-1]  # right-aligned
    # the latency graph's axis (hi None) follows the data instead: its own max is a full bar
    assert fmt.spark([3.0] * 4, 4, 0.0, None) == fmt.BARS[-1] * 4


async def test_gpu_card_graphs_use_the_fixed_axis():
    """A DeviceCard fed readings, as the GPU panel feeds it: its util and mem graphs draw 3 % as
    low bars and 100 % as full ones, whatever else is in the history."""

    class Cards(App):
        def compose(self):
            yield DeviceCard(0, id="low")
            yield DeviceCard(1, id="full")
            yield Graph("util", id="graph")

    def reading(index, util, used_frac):
        return {"index": index, "name": "Simulated GPU", "total_bytes": 1000 * MiB,
                "used_bytes": int(1000 * MiB * used_frac), "utilization_pct": util, "budget": {}}

    def bars(graph) -> str:
        return "".join(ch for ch in graph.render().plain if ch in fmt.BARS)

    app = Cards()
    async with app.run_test(size=(60, 12)) as pilot:
        low, full = app.query_one("#low", DeviceCard), app.query_one("#full", DeviceCard)
        for _ in range(10):
            low.update_reading(reading(0, 3.0, 0.03))
            full.update_reading(reading(1, 100.0, 1.0))
        await pilot.pause()
        assert bars(low.utilgraph) == fmt.BARS[0] * 10 and bars(low.memgraph) == fmt.BARS[0] * 10
        assert low.utilgraph.render().plain.endswith("  3%")
        assert bars(full.utilgraph) == fmt.BARS[-1] * 10 and bars(full.memgraph) == fmt.BARS[-1] * 10
        graph = app.query_one("#graph", Graph)
        graph.set_values([3.0] * 5 + [100.0] * 5)
        assert bars(graph) == fmt.BARS[0] * 5 + fmt.BARS[-1] * 5


# --------------------------------------------------------------------------- an eviction's reason


async def test_the_event_log_shows_an_evictions_reason(tmp_path):
    """A load that needs the memory of another model evicts it: the log widget shows the engine's
    eviction event with the reason (which model, why, the keep-values) the engine gave."""
    eng = Engine(Store(tmp_path / "state.db"), gpu=GpuConfig(reserve_mib=0, min_residency_s=0),
                 backend=SimulatedBackend([100 * MiB]), base_dir=str(tmp_path), tick_s=0.2)
    await eng.start()
    for name in ("a", "b", "c"):
        await eng.register({"name": name, "source": "zoo:sized", "args": {"mib": 40}, "warmup": 0, "device": "auto"})
    client = LocalClient(eng)
    await client.start()
    try:
        app = RecordingApp(client, refresh_s=0.25)
        async with app.run_test(size=(160, 40)) as pilot:
            await pilot.pause()
            for name in ("a", "b"):
                select(app, f"{name}:1")
                await pilot.press("l")
                await until(lambda n=name: cell(app, f"{n}:1", "state") == "READY", what=f"{name} READY", pilot=pilot)
            select(app, "c:1")
            await pilot.press("l")  # 100 MiB holds two of them: a third evicts one
            await until(lambda: cell(app, "c:1", "state") == "READY", what="c READY", pilot=pilot)
            evicted = [e for e in eng.events.recent if e.kind == "evicted"]
            assert len(evicted) == 1
            reason = evicted[0].data["reason"]
            victim = f"{evicted[0].model}:{evicted[0].version}"
            assert "to make room for c:1" in reason and victim in reason
            await until(lambda: cell(app, victim, "state") == "UNLOADED", what="the victim unloaded", pilot=pilot)

            def logged() -> str:  # the log wraps long events: read it as one text
                return " ".join(" ".join("".join(seg.text for seg in strip).split()) for strip in app.log_widget.lines)

            said = " ".join(f"evicted {victim} from gpu0 {reason}".split())
            await until(lambda: said in logged(), what="the eviction's reason in the log widget", pilot=pilot)
    finally:
        await client.close()
        await eng.close()


# --------------------------------------------------------------------------- the embedded server


EMBEDDED_CONFIG = """
[gpu]
simulate = "2x8GiB"

[[models]]
name = "tiny"
source = "zoo:tiny-mlp"
warmup = 0
"""


async def test_embedded_http_server_answers_while_the_console_runs(tmp_path):
    """``run_embedded`` (what ``modelconsole`` runs) with the app under Pilot instead of the
    terminal: while the console is up, real HTTP clients get answers from its server on a free
    loopback port (the health check, an infer), and the console shows what they did."""
    from modelconsole.console.run import run_embedded
    from modelconsole.scheduler.config import load_config
    from modelconsole.server.web import ServerSettings

    (tmp_path / "mc.toml").write_text(EMBEDDED_CONFIG)
    config = load_config(tmp_path / "mc.toml")
    settings = ServerSettings(host="127.0.0.1", port=0)  # the OS picks a free port
    seen: dict[str, str] = {}

    async def drive(app: ModelConsoleApp) -> None:
        async with app.run_test(size=SIZE) as pilot:
            await until(lambda: ((app.client.snapshot() or {}).get("server") or {}).get("url"),
                        what="the server's address", pilot=pilot)
            url = seen["url"] = app.client.snapshot()["server"]["url"]
            assert app.is_running and app.embedded and "embedded" in app.query_one("#status").text
            assert app.refresh_s == 0.5  # --interval
            ask = asyncio.to_thread  # the client waits in a thread; the loop serves it (and the console)
            status, _ = await ask(http, url + "/v2/health/ready")
            assert status == 200
            status, meta = await ask(http, url + "/v2/models/tiny")
            assert status == 200 and meta["name"] == "tiny"
            status, out = await ask(http, url + "/v2/models/tiny/infer", {"inputs": [
                {"name": "input", "shape": [2, 64], "datatype": "FP32", "data": [0.5] * 128}]})
            assert status == 200, out
            assert out["model_name"] == "tiny" and out["outputs"][0]["shape"][0] == 2
            # the request loaded tiny on the server: the console shows it, and the request
            await until(lambda: cell(app, "tiny:1", "state") == "READY", what="tiny READY in the console", pilot=pilot)
            await until(lambda: any("tiny v1 ready" in line for line in app.event_lines), what="the log", pilot=pilot)
            assert app.is_running
            status, _ = await ask(http, url + "/v2/health/ready")  # still answering
            assert status == 200
            await pilot.press("q")
            if isinstance(app.screen, ConfirmScreen):  # the request may still count as traffic
                await pilot.press("y")
            await pilot.pause()
            assert not app.is_running

    import io

    out = io.StringIO()
    rc = await run_embedded(config, settings, str(tmp_path / "s.db"), demo=False, theme=None, read_only=False,
                            run_app=drive, refresh_s=0.5, out=out)
    assert rc == 0
    # after q the terminal says it is draining, then that it stopped (not 5 s of a blank screen)
    lines = out.getvalue().splitlines()
    assert lines[0].startswith("modelconsole: stopping — draining ") and lines[-1] == "modelconsole: stopped."
    # the console ended: the embedded server stopped with it
    assert (await asyncio.to_thread(http, seen["url"] + "/v2/health/ready", None, 5.0))[0] is None


def test_the_console_ui_imports_neither_torch_nor_the_engine():
    import subprocess
    import sys

    code = ("import sys, modelconsole.console.app; "
            "print([m for m in sys.modules if m == 'torch' or m.startswith(('modelconsole.scheduler', "
            "'modelconsole.server', 'modelconsole.gpu'))])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_requests_waiting_for_memory_show_in_the_queue_cell_and_count_as_traffic():
    idle = {"name": "y", "version": "1", "state": "UNLOADED", "queue": 0, "in_flight": 0, "request_rate": 0.0}
    waiting = dict(idle, waiting_for_room=2)
    assert fmt.model_cells(idle)["queue"] == ("0", 0)
    assert fmt.model_cells(waiting)["queue"] == ("0+2", 2)
    assert not fmt.traffic_flowing({"models": [idle]})
    assert fmt.traffic_flowing({"models": [waiting]})


def test_replicas_and_fleet_nodes_are_spelled_out():
    one = {"replicas": [{"replica": 0, "state": "READY", "device": "cuda:0", "served": 3}]}
    assert fmt.replicas_line(one) is None  # one instance on one host: nothing to add
    two = {"replicas": [{"replica": 0, "state": "READY", "device": "cuda:0", "served": 7},
                        {"replica": 1, "state": "LOADING", "device": "cuda:1", "served": 0}]}
    assert fmt.replicas_line(two) == "replicas 1/2 READY: #0 cuda:0 (7) · #1 cuda:1 LOADING (0)"
    fleet = {"replicas": [{"replica": 0, "state": "READY", "device": "cpu", "served": 5, "node": "abcdef0123"}]}
    assert fmt.replicas_line(fleet) == "replicas 1/1 READY: #0 cpu@abcdef01 (5)"
    lines = fmt.node_lines([{"node": "abcdef0123", "health": "ok", "gpus": 2, "memory_used_bytes": 2**30,
                             "memory_total_bytes": 8 * 2**30, "rps": 12.5, "holds": ["tiny:1"]},
                            {"node": "99", "health": "lost", "gpus": 0, "rps": 0.0, "holds": []}])
    assert lines[0].split()[:5] == ["node", "health", "gpus", "memory", "req/s"]
    assert lines[1].startswith("abcdef01") and "ok" in lines[1] and "tiny:1" in lines[1]
    assert "lost" in lines[2] and lines[2].rstrip().endswith("-")
    assert fmt.node_lines([]) == []
