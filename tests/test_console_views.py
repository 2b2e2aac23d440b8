"""The console as an operator drives it over SSH (issue 15), under Pilot on a real in-process
engine with simulated GPUs: 80x24 as a first-class size, the describe and log views (with the
last error copied over OSC 52), sort keys, marks, the ``:`` command line, the register form with
keys that arrive in one read, and what read-only and a bad filter say."""

from __future__ import annotations

import pytest
from consoleutil import cell, local_client, select
from test_console_app import RecordingApp, screen_text
from textual import events
from textual.widgets import DataTable
from waiting import until

from modelconsole.console import format as fmt
from modelconsole.console.screens import ConfirmScreen, RegisterScreen
from modelconsole.console.views import DescribeScreen, LogScreen


@pytest.fixture
async def client(tmp_path):
    """Twelve registered versions (tiny v1 and v2, cnn, and nine more), two 256 MiB GPUs."""
    common = {"warmup": 0, "device": "auto"}
    models = [{"name": "tiny", "source": "zoo:tiny-mlp", **common},
              {"name": "tiny", "version": "2", "source": "zoo:tiny-mlp", **common},
              {"name": "cnn", "source": "zoo:small-cnn", **common},
              *({"name": f"m{i:02d}", "source": "zoo:tiny-mlp", **common} for i in range(9))]
    async with local_client(tmp_path, models) as c:
        yield c


KEY_NAMES = {"\t": "tab", ":": "colon", " ": "space", "-": "minus", "=": "equals_sign", "\r": "enter"}


def paste(app, text: str) -> None:
    """Every key of ``text`` handed to the app at once, as one read from a terminal brings them."""
    for ch in text:
        app.post_message(events.Key(KEY_NAMES.get(ch, ch), ch))


def visible_rows(app) -> int:
    table = app.table
    return min(table.row_count, table.scrollable_content_region.height - table.header_height)


async def test_80x24_keeps_8_rows_health_p95_and_help_in_view(client):
    app = RecordingApp(client, refresh_s=0.25)
    async with app.run_test(size=(80, 24)) as pilot:
        await until(lambda: len(app.gpus.cards) == 2, what="GPU cards", pilot=pilot)
        await pilot.pause()
        assert app.table.row_count == 12
        assert visible_rows(app) >= 8
        text = screen_text(app)
        lines = text.splitlines()
        assert "? help" in lines[0] and "q quit" in lines[0]
        assert "health" in text and "p95ms" in text and "req/s" in text and "err%" in text
        assert sum(line.startswith("▌GPU") for line in lines) == 2  # one line per GPU
        # i hides the detail pane: more rows
        before = visible_rows(app)
        await pilot.press("i")
        await pilot.pause()
        assert visible_rows(app) == 12 > before
        # scrolled sideways, the name column stays
        app.table.scroll_to(x=60, animate=False)
        await pilot.pause()
        assert any(line.lstrip(" ◆").startswith("tiny") for line in screen_text(app).splitlines())
    big = RecordingApp(client, refresh_s=0.25)
    async with big.run_test(size=(160, 48)) as pilot:
        await pilot.pause()
        assert "? help" in screen_text(big).splitlines()[0] and visible_rows(big) == 12


async def test_sort_keys_arrows_and_header_clicks(client):
    app = RecordingApp(client, refresh_s=0.25)
    async with app.run_test(size=(120, 40)) as pilot:
        await pilot.pause()
        label = lambda key: app.table.columns[key].label.plain  # noqa: E731
        assert label("name") == "model↑"
        await pilot.press("full_stop")  # the next column: ver, A→Z
        assert app.sort_column == "version" and label("version") == "ver↑" and label("name") == "model"
        while app.sort_column != "rate":
            await pilot.press("full_stop")
        assert label("rate") == "req/s↓"  # numbers: largest first
        await pilot.press("comma")
        assert app.sort_column == "health" and label("health") == "health↑"  # , goes back
        # a header click sorts by that column; a second click reverses it
        app.table.post_message(DataTable.HeaderSelected(app.table, app.table.columns["state"].key, 3,
                                                        app.table.columns["state"].label))
        await pilot.pause()
        assert app.sort_column == "state" and label("state") == "state↑"
        app.table.post_message(DataTable.HeaderSelected(app.table, app.table.columns["state"].key, 3,
                                                        app.table.columns["state"].label))
        await pilot.pause()
        assert label("state") == "state↓"
        # g / G / Home / End
        await pilot.press("G")
        assert app.table.cursor_row == 11
        await pilot.press("g")
        assert app.table.cursor_row == 0
        await pilot.press("end")
        assert app.table.cursor_row == 11
        await pilot.press("home")
        assert app.table.cursor_row == 0


async def test_space_marks_rows_for_one_bulk_unload_and_pin(client):
    eng = client.engine
    await eng.load("tiny")
    await eng.load("cnn")
    app = RecordingApp(client, refresh_s=0.25)
    async with app.run_test(size=(120, 40)) as pilot:
        await pilot.pause()
        select(app, "tiny:1")
        await pilot.press("space")
        select(app, "cnn:1")
        await pilot.press("space")
        assert app.marked == {"tiny:1", "cnn:1"} and cell(app, "cnn:1", "name").startswith("✓")
        assert "2 marked" in app.status_line.text
        await pilot.press("p")  # pin both, no question
        await until(lambda: eng.instance("tiny").pinned and eng.instance("cnn").pinned, what="both pinned", pilot=pilot)
        assert not app.marked
        for key in ("tiny:1", "cnn:1"):
            select(app, key)
            await pilot.press("space")
        # a filter hides one of them: the confirmation says so
        app.set_filter("cnn")
        await pilot.press("u")
        assert isinstance(app.screen, ConfirmScreen)
        assert app.screen.title_text == "Unload 2 marked versions?" and "1 of them hidden by the filter" in \
            app.screen.message
        await pilot.press("y")
        await until(lambda: eng.instance("tiny").state == eng.instance("cnn").state == "UNLOADED",
                    what="both unloaded", pilot=pilot)


async def test_the_command_line_runs_actions_with_arguments_and_completes(client):
    eng = client.engine
    await eng.load("tiny")
    app = RecordingApp(client, refresh_s=0.25)
    async with app.run_test(size=(120, 40)) as pilot:
        await pilot.pause()
        await pilot.press("colon", *"unl", "tab")
        assert app.command_box.value == ":unload "
        await pilot.press(*"ti", "tab")
        assert app.command_box.value == ":unload tiny "
        await pilot.press("tab")  # two versions: completion lists them
        assert any("1  2" in n for n, _ in app.notes)
        await pilot.press("enter")  # no version: the active one, after the usual confirmation
        assert isinstance(app.screen, ConfirmScreen) and app.screen.title_text == "Unload tiny v1?"
        await pilot.press("y")
        await until(lambda: eng.instance("tiny").state == "UNLOADED", what="tiny unloaded", pilot=pilot)
        assert app.run_command(":model m04") and app.selected_key() == "m04:1"
        assert app.run_command(":split tiny 1=80 2=20")
        await until(lambda: eng.routing("tiny")["weights"] == {"1": 80, "2": 20}, what="split", pilot=pilot)
        assert app.run_command(":split tiny 1=100")
        await until(lambda: eng.routing("tiny")["weights"] == {}, what="split removed", pilot=pilot)
        assert app.run_command(":swap tiny 2")
        await until(lambda: eng.routing("tiny")["active"] == "2", what="swapped to v2", timeout=30, pilot=pilot)
        assert app.run_command(":sort p95 desc") and app.sort_column == "p95"
        assert app.run_command(":interval 2") and app.refresh_s == 2.0
        # mistakes say what was expected; nothing runs
        for bad, said in ((":swap nope 2", "no model 'nope'"), (":swap tiny 9", "tiny has no version '9'"),
                          (":split tiny 1=x", "the weight of v1 is not a number"), (":frobnicate", "unknown command"),
                          (":interval 0.1", "between 0.25 and 60")):
            assert not app.run_command(bad)
            assert said in app.notes[-1][0], (bad, app.notes[-1])
        assert eng.routing("tiny")["active"] == "2"
        # a command line typed in one read (a paste over SSH) lands in the box whole
        paste(app, ":model cnn\r")
        await until(lambda: app.selected_key() == "cnn:1", what="the pasted command ran", pilot=pilot)


async def test_describe_and_logs_views_with_the_last_error_copied(client):
    eng = client.engine
    await eng.load("tiny")
    app = RecordingApp(client, refresh_s=0.25)
    async with app.run_test(size=(120, 40)) as pilot:
        await pilot.pause()
        select(app, "tiny:1")
        await pilot.press("X", "y")  # delete while loaded: refused, and audited with its error
        await until(lambda: any("delete" in n and "failed" in n or "unload it first" in n
                                       for n, _ in app.notes), what="the refusal", pilot=pilot)
        assert sum("delete" in line for line in app.event_lines) == 1  # one line for the failed action
        await pilot.press("enter")  # Enter describes, as d does
        assert isinstance(app.screen, DescribeScreen)
        await until(lambda: "audit history" in getattr(app.screen, "text", "")
                    and "delete v1 → error" in app.screen.text, what="the audit rows", pilot=pilot)
        text = app.screen.text
        for part in ("── identity", "tiny v1 (active) · READY", "device gpu", "── memory", "estimate", "measured",
                     "── tensors", "in  input FP32 [-1, 64]", "rate limit none", "── routing", "keep value",
                     "── config", "max_batch_size = ", "── last error", "delete refused"):
            assert part in text, part
        await pilot.press("y")  # OSC 52: the last error on the operator's clipboard
        assert "delete refused" in app.clipboard and "unload it first" in app.clipboard
        await pilot.press("l")  # the model's events only
        assert isinstance(app.screen, LogScreen)
        await until(lambda: any("tiny v1 ready" in line for line in app.screen.lines), what="tiny's events", pilot=pilot)
        assert all("cnn" not in line and "m0" not in line for line in app.screen.lines)
        await pilot.press("escape", "escape")
        assert app.screen is app._main
        await pilot.press("L")  # L from the table too
        assert isinstance(app.screen, LogScreen)


async def test_register_form_blank_version_and_keys_in_one_read(client):
    eng = client.engine
    app = RecordingApp(client, refresh_s=0.25)
    async with app.run_test(size=(80, 24)) as pilot:
        await pilot.pause()
        await pilot.press("r")
        assert isinstance(app.screen, RegisterScreen)
        # as over SSH or a paste: every key in one read, Tab between the fields
        paste(app, "tiny\tzoo:tiny-mlp\t\twarmup=0\r")
        # the blank version is the next number, as the form says
        await until(lambda: "tiny:3" in app.models, what="tiny v3 registered", pilot=pilot)
        assert eng.instance("tiny", "3").cfg.warmup == 0


async def test_read_only_and_a_bad_filter_say_why(client):
    app = RecordingApp(client, refresh_s=0.25, read_only=True)
    async with app.run_test(size=(80, 24)) as pilot:
        await pilot.pause()
        select(app, "tiny:1")
        await pilot.press("l")
        assert any("read-only: l" in n and "--read-only" in n for n, _ in app.notes)
        assert client.engine.instance("tiny").state == "UNLOADED"
        assert not app.run_command(":load tiny") and "read-only" in app.notes[-1][0]
        await pilot.press("slash", "left_parenthesis")
        await pilot.pause()
        assert any("not a regular expression" in n for n, _ in app.notes)
        assert "not a regex" in app.status_line.text
        assert fmt.COLUMN_LABELS["pin"] == "pin"
