"""An operator's first shift, under Pilot on a real engine (and real servers where the console
attaches): views and the header that stay live behind a dialog, a register form that fits 80x24
and keeps what was typed, keys that say why they do nothing, bulk evict, 80 columns that keep the
filter, the sort and the GPU budget in view, the embedded server's address (or why it has none),
an attach that says where it looked for a token, a server that shuts down without a "reconnected",
help that lists every key, and a zoo model's delete that names no config file."""

from __future__ import annotations

import asyncio
import io
import socket

import pytest
import torch
from consoleutil import local_client, select
from serverutil import ServerThread
from test_console_app import RecordingApp, screen_text
from textual.widgets import Button, Input
from waiting import until

from modelconsole.console import cli
from modelconsole.console import format as fmt
from modelconsole.console.client import RemoteClient
from modelconsole.console.local import LocalClient
from modelconsole.console.screens import ConfirmScreen, HelpScreen, RegisterScreen
from modelconsole.console.views import DescribeScreen, LogScreen
from modelconsole.scheduler.config import demo_config
from modelconsole.scheduler.errors import Conflict
from modelconsole.server.web import ServerSettings


@pytest.fixture
async def client(tmp_path):
    async with local_client(tmp_path, [{"name": name, "source": "zoo:tiny-mlp", "warmup": 0, "device": "auto"}
                                       for name in ("tiny", "other", "third")]) as c:
        yield c


def header(app) -> str:
    return app.status_line.text


async def test_describe_logs_and_the_header_stay_live_behind_them(client):
    eng = client.engine
    app = RecordingApp(client, refresh_s=0.25)
    async with app.run_test(size=(120, 40)) as pilot:
        await pilot.pause()
        select(app, "tiny:1")
        await pilot.press("d")
        assert isinstance(app.screen, DescribeScreen)
        view = app.screen
        await until(lambda: "priority P2" in view.text, what="the first picture", pilot=pilot)
        # changed behind the view (as an API call would): priority, a load, answers
        await eng.set_priority("tiny", "1", 1)
        for _ in range(3):
            await eng.infer("tiny", {"input": torch.zeros(1, 64)})
        await until(lambda: "priority P1" in view.text, what="the new priority in describe", pilot=pilot)
        await until(lambda: "ok 3 " in view.text, what="the answers counted in describe", pilot=pilot)
        await until(lambda: "(1 ready)" in header(app), what="the header behind the view", pilot=pilot)
        await until(lambda: any(r.get("action") == "priority" for r in view.audit),
                    what="the audit re-read after the change", pilot=pilot)
        await pilot.press("l")
        logs = app.screen
        assert isinstance(logs, LogScreen)
        await eng.unload("tiny")
        await until(lambda: any("unloaded" in line for line in logs.lines), what="the new event in logs", pilot=pilot)
        await until(lambda: "(0 ready)" in header(app), what="the header again", pilot=pilot)
        await pilot.press("escape", "escape")
        # and behind a dialog, the header follows too
        await pilot.press("r")
        assert isinstance(app.screen, RegisterScreen)
        await eng.load("other")
        await until(lambda: "(1 ready)" in header(app), what="the header behind the register form", pilot=pilot)


def inside(app, widget) -> bool:
    r, screen = widget.region, app.screen.region
    return r.width > 0 and r.height > 0 and screen.contains_region(r)


async def test_the_register_form_fits_80x24_and_a_refusal_keeps_it(client):
    app = RecordingApp(client, refresh_s=0.25)
    async with app.run_test(size=(80, 24)) as pilot:
        await pilot.pause()
        await pilot.press("r")
        form = app.screen
        assert isinstance(form, RegisterScreen)
        await pilot.pause()
        for wid in ("reg-name", "reg-source", "reg-version", "reg-options"):
            assert inside(app, form.query_one(f"#{wid}", Input)), wid
        for bid in ("cancel", "register-ok"):
            assert inside(app, form.query_one(f"#{bid}", Button)), bid
        form.query_one("#reg-name", Input).value = "tiny"
        form.query_one("#reg-source", Input).value = "zoo:no-such-model"
        form.query_one("#reg-options", Input).value = "warmup=0"
        await pilot.click("#register-ok")
        await until(lambda: "no-such-model" in str(form.query_one("#reg-source-error").render()),
                    what="the refusal beside the source field", pilot=pilot)
        assert app.screen is form and form.query_one("#reg-options", Input).value == "warmup=0"
        await until(lambda: inside(app, form.query_one("#reg-source-error")), what="the error laid out", pilot=pilot)
        form.query_one("#reg-source", Input).value = "zoo:tiny-mlp"
        # pressed, not clicked: the refusal's line moved the buttons, and a click lands where the
        # button was at the last layout (the first click above shows the button clickable)
        form.query_one("#register-ok", Button).press()
        await until(lambda: "tiny:2" in app.models, what="registered after the fix", pilot=pilot)
        assert not isinstance(app.screen, RegisterScreen)


class SteadyRates(LocalClient):
    """The engine's snapshot, with the two rates the issue saw apart fixed to known values: the
    10 s answer rate (what the header shows) and the eviction policy's slow EWMA."""

    def snapshot(self):
        snap = super().snapshot()
        for m in snap["models"]:
            m["stats"] = dict(m.get("stats") or {}, throughput_rps=0.05)
            m["request_rate"] = 7.5
        return snap


async def test_the_quit_dialog_says_the_headers_rate(client):
    rates = SteadyRates(client.engine)
    app = RecordingApp(rates, embedded=True, refresh_s=0.25)
    async with app.run_test(size=(120, 40)) as pilot:
        await pilot.pause()
        total = fmt.rate(0.05 * 3)
        assert f"{total} req/s" in header(app)
        await pilot.press("q")
        assert isinstance(app.screen, ConfirmScreen)
        assert f"({total} req/s" in app.screen.message and "22.5" not in app.screen.message
        await pilot.press("escape")


async def test_keys_that_do_nothing_say_why_and_e_acts_on_the_marks(client):
    eng = client.engine
    app = RecordingApp(client, refresh_s=0.25)
    async with app.run_test(size=(120, 40)) as pilot:
        await pilot.pause()
        await pilot.press("n")
        assert any("this is one host" in n for n, s in app.notes if s == "warning")
        await pilot.press("left_square_bracket")
        assert any("runs no demo" in n for n, _ in app.notes)
        # evict is not offered where it must fail: an unloaded row, a pinned row
        select(app, "tiny:1")
        await pilot.pause()
        assert app.check_action("evict", ()) is None
        await pilot.press("e")
        assert not isinstance(app.screen, ConfirmScreen)
        assert any("not loaded" in n for n, _ in app.notes)
        for name in ("tiny", "other", "third"):
            await eng.load(name)
        await eng.pin("third")
        await until(lambda: app.models["third:1"].get("pinned") and app.check_action("evict", ()) is True,
                    what="the loaded row's evict offered", pilot=pilot)
        select(app, "third:1")
        await until(lambda: app.check_action("evict", ()) is None, what="the pinned row's evict greyed", pilot=pilot)
        # marks: e evicts the marked (one confirmation); the pinned one is left out, and said so
        for key in ("tiny:1", "other:1", "third:1"):
            select(app, key)
            await pilot.press("space")
        assert app.check_action("evict", ()) is True
        await pilot.press("e")
        assert any("third v1 is pinned" in n for n, _ in app.notes)
        assert isinstance(app.screen, ConfirmScreen) and app.screen.title_text == "Evict 2 marked versions?"
        await pilot.press("y")
        await until(lambda: eng.instance("tiny").state == eng.instance("other").state == "UNLOADED",
                    what="both marked versions evicted", pilot=pilot)
        assert eng.instance("third").state == "READY"


async def test_keys_that_need_a_demo_say_why_when_attached(tmp_path):
    with ServerThread(tmp_path, models=[{"name": "tiny", "source": "zoo:tiny-mlp", "warmup": 0}],
                      settings=ServerSettings(port=0, token="t")) as srv:
        remote = RemoteClient(srv.url, "t")
        await remote.start()
        try:
            app = RecordingApp(remote, refresh_s=0.25)
            async with app.run_test(size=(100, 30)) as pilot:
                await until(lambda: app.table.row_count == 1, what="the attached picture", pilot=pilot)
                await pilot.press("right_square_bracket")
                assert any("an attached console has none" in n for n, _ in app.notes)
        finally:
            await remote.close()


async def test_80_columns_keep_the_filter_sort_and_gpu_budget_in_view(client):
    eng = client.engine
    app = RecordingApp(client, refresh_s=0.25)
    async with app.run_test(size=(80, 24)) as pilot:
        await until(lambda: len(app.gpus.cards) == 2, what="GPU cards", pilot=pilot)
        await pilot.press("slash", *"t.*", "enter")
        await pilot.press("full_stop")  # sort by the next column
        await pilot.pause()
        lines = screen_text(app).splitlines()
        assert "filter /t.*/" in lines[0] and "sort ver↑" in lines[0], lines[0]
        gpu = [line for line in lines if line.startswith("▌GPU") or line.lstrip().startswith("GPU")]
        assert gpu and all("budget" in line and "total" in line for line in gpu), gpu
        # one flash line above the footer, never a toast over the table
        app.notify("a note for the operator")
        await pilot.pause()
        assert app.flash_text == "a note for the operator"
        assert "a note for the operator" in screen_text(app).splitlines()[-2]
        assert not app._notifications
        # a long event wraps instead of being cut at the pane's edge
        long = "the end of this long event message must be readable " * 3 + "END-OF-EVENT"
        eng.events.publish("note", long, model="tiny", version="1")
        await until(lambda: any("END-OF-EVENT" in line for line in screen_text(app).splitlines()),
                    what="the end of the long event on screen", pilot=pilot)


async def test_the_embedded_servers_address_and_a_port_in_use(tmp_path):
    from modelconsole.console.run import run_embedded
    from modelconsole.scheduler.config import load_config

    (tmp_path / "mc.toml").write_text('[[models]]\nname = "tiny"\nsource = "zoo:tiny-mlp"\nwarmup = 0\n')
    config = load_config(tmp_path / "mc.toml")
    seen = {}

    async def ok(app) -> None:
        async with app.run_test(size=(120, 30)) as pilot:
            await until(lambda: "http://127.0.0.1:" in app.status_line.text, what="the address", pilot=pilot)
            seen["ok"] = app.status_line.text
            app.exit()

    assert await run_embedded(config, ServerSettings(port=0), str(tmp_path / "a.db"), demo=False, theme=None,
                              read_only=False, run_app=ok, out=io.StringIO()) == 0
    assert "embedded · http://127.0.0.1:" in seen["ok"]
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]

        async def busy(app) -> None:
            async with app.run_test(size=(120, 30)) as pilot:
                await until(lambda: "HTTP server not started" in app.banner.text, what="the error on screen", pilot=pilot)
                seen["banner"] = app.banner.text
                seen["status"] = app.status_line.text
                assert app.banner.display or app.screen.has_class("-server-error")
                app.exit()

        assert await run_embedded(config, ServerSettings(port=port), str(tmp_path / "b.db"), demo=False,
                                  theme=None, read_only=False, run_app=busy, out=io.StringIO()) == 0
    assert f"127.0.0.1:{port}" in seen["banner"] and "no HTTP server" in seen["status"]


def test_attach_without_a_token_says_where_it_looked(tmp_path, capsys):
    with ServerThread(tmp_path, models=[{"name": "tiny", "source": "zoo:tiny-mlp", "warmup": 0}],
                      settings=ServerSettings(port=0, token="secret")) as srv:
        store = tmp_path / "elsewhere" / "s.db"
        rc = cli.main(["--attach", srv.url, "--store", str(store)])
    assert rc == 1
    err = capsys.readouterr().err
    assert f"server-{srv.server.port}.token" in err and str(store.parent) in err
    assert "--token" in err and "MODELCONSOLE_TOKEN" in err


async def test_a_workers_server_shutting_down_is_not_a_reconnect(tmp_path):
    srv = ServerThread(tmp_path, models=[{"name": "tiny", "source": "zoo:tiny-mlp", "warmup": 0}],
                       settings=ServerSettings(port=0, token="t"), workers=2)
    await asyncio.to_thread(srv.__enter__)
    remote = RemoteClient(srv.url, "t")
    seen = []
    try:
        await remote.start()

        async def follow() -> None:
            async for ev in remote.events():
                seen.append(ev)

        task = asyncio.create_task(follow())
        await asyncio.to_thread(srv.__exit__, None, None, None)
        deadline = asyncio.get_running_loop().time() + 15
        while not any(e["kind"] == "connection" for e in seen):
            assert asyncio.get_running_loop().time() < deadline, "no connection event"
            await asyncio.sleep(0.05)
        said = [e["message"] for e in seen if e["kind"] == "connection"]
        assert "shutting down" in said[0] and not any("reconnected" in m for m in said), said
        task.cancel()
    finally:
        await remote.close()


async def test_help_lists_every_key_distinctly_and_scrolls_at_80x24(client):
    app = RecordingApp(client, refresh_s=0.25)
    async with app.run_test(size=(80, 24)) as pilot:
        await pilot.pause()
        rows = {keys: desc for keys, desc, _, _ in app.help_rows()}
        assert rows["o"] != rows["."] and rows["."] != rows[","]
        assert {"g, home", "G, end", "enter"} <= set(rows)
        await pilot.press("question_mark")
        assert isinstance(app.screen, HelpScreen)
        assert any("--keymap" in n for n in app.screen.notes)
        await pilot.press("end")
        await pilot.pause()
        assert "--keymap" in screen_text(app)  # the last note, scrolled into view


async def test_deleting_a_built_in_model_names_no_config_file(tmp_path):
    from modelconsole.server.serve import start_engine

    engine = await start_engine(demo_config(), str(tmp_path / "s.db"))
    try:
        with pytest.raises(Conflict) as e:
            await engine.delete("tiny-mlp")
        assert "config file" not in e.value.message and "built-in demo" in e.value.message
        assert "--config FILE" in e.value.message
    finally:
        await engine.close()


def test_the_console_says_where_its_logs_go(tmp_path, capsys, monkeypatch):
    """A full-screen console writes its logs to a file: the path is printed before the screen is
    taken (it stays in the scrollback), beside --store when one is given, else the state directory."""
    import argparse

    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))
    for store, want in ((str(tmp_path / "db" / "s.db"), tmp_path / "db" / "modelconsole.log"),
                        (None, tmp_path / "state" / "modelconsole" / "log" / "modelconsole.log")):
        cli._console_log(argparse.Namespace(log_file=None, store=store), "WARNING")
        assert f"logs go to {want}" in capsys.readouterr().err
        assert want.parent.is_dir()
