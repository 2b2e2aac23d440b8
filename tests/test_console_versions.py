"""The console's versions keys driven by Pilot on a real in-process engine (CPU, real torch):
``s`` hot swap (version picker, confirmation, live progress), ``a`` A/B split (weights
editor, per-arm metrics side by side), ``c`` canary (form, share shown live, promotion,
abort, the alert when one rolls back), bad input caught in the forms, read-only mode, and
the client calls underneath (LocalClient and RemoteClient over HTTP).

The model is ``zoo:tiny-mlp`` in two versions of different widths (v1 hidden 128, v2
hidden 64).  The rollback test adds a version built to fail (a factory module written into
tmp_path, as tests/test_versions.py does).
"""

from __future__ import annotations

import asyncio
import textwrap

import pytest
import torch
from consoleutil import cell, select
from textual.widgets import Input, Select
from waiting import until

from modelconsole.console import format as fmt
from modelconsole.console.app import PALETTE, ActionCommands, ModelConsoleApp
from modelconsole.console.client import ClientError, RemoteClient
from modelconsole.console.local import LocalClient
from modelconsole.console.screens import (
    CanaryScreen,
    ConfirmScreen,
    SplitScreen,
    VersionPickerScreen,
)
from modelconsole.scheduler.engine import Engine
from modelconsole.scheduler.store import Store

pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.*` is deprecated:DeprecationWarning")

if not all(hasattr(Engine, a) for a in ("swap", "set_split", "start_canary", "stop_canary", "routing")):
    pytest.skip("the engine has no versions routing yet (Engine.swap/set_split/start_canary/stop_canary/routing)",
                allow_module_level=True)

SIZE = (120, 40)
V1 = {"name": "tiny", "version": "1", "source": "zoo:tiny-mlp", "args": {"hidden": 128}, "warmup": 0,
      "max_queue_delay_ms": 1}
V2 = dict(V1, version="2", args={"hidden": 64})
SOLO = {"name": "solo", "source": "zoo:tiny-mlp", "warmup": 0}


class RecordingApp(ModelConsoleApp):
    """The console, keeping every notification it shows."""

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.notes: list[tuple[str, str]] = []

    def notify(self, message, *, title="", severity="information", **kw):
        self.notes.append((f"{title}: {message}" if title else str(message), severity))
        return super().notify(message, title=title, severity=severity, **kw)


@pytest.fixture
async def engine(tmp_path):
    eng = Engine(Store(tmp_path / "state.db"), model_roots=(str(tmp_path),), base_dir=str(tmp_path),
                 default_device="cpu", tick_s=0.2)
    await eng.start()
    for m in (V1, V2, SOLO):
        await eng.register(m)
    yield eng
    await eng.close()


@pytest.fixture
async def client(engine):
    c = LocalClient(engine)
    await c.start()
    yield c
    await c.close()


class Traffic:
    """Client tasks calling engine.infer on a name without a version until stopped."""

    def __init__(self, engine, name="tiny", clients=4, pause=0.002, inputs=None):
        self.engine, self.name, self.pause = engine, name, pause
        self.inputs = inputs or (lambda: {"input": torch.randn(1, 64)})
        self.answered = 0
        self.errors: list[BaseException] = []
        self._stop = False
        self._tasks = [asyncio.ensure_future(self._client()) for _ in range(clients)]

    async def _client(self):
        while not self._stop:
            try:
                await self.engine.infer(self.name, self.inputs())
                self.answered += 1
            except Exception as e:  # noqa: BLE001 - counted
                self.errors.append(e)
            await asyncio.sleep(self.pause)

    async def stop(self):
        self._stop = True
        await asyncio.gather(*self._tasks)


def screen_text(app) -> str:
    return "\n".join("".join(seg.text for seg in strip) for strip in app.screen._compositor.render_strips())


async def click(pilot, selector):
    """Click a button (after its previous press's 0.2 s "active" effect: a Button ignores clicks during it)."""
    await pilot.pause(0.25)
    await pilot.click(selector)
    await pilot.pause()


def noted(app, text, severity=None):
    return any(text in n and (severity is None or s == severity) for n, s in app.notes)


def logged(app, text):
    return any(text in line for line in app.event_lines)


# --------------------------------------------------------------------------- s: hot swap


async def test_swap_key_picks_a_version_confirms_and_swaps(client, engine):
    await engine.load("tiny")
    app = RecordingApp(client, refresh_s=0.25)
    async with app.run_test(size=SIZE) as pilot:
        await pilot.pause()
        assert cell(app, "tiny:1", "version") == "1*" and cell(app, "tiny:2", "version") == "2"
        select(app, "tiny:2")  # any row of the name: the swap acts on the name
        await pilot.press("s")
        assert isinstance(app.screen, VersionPickerScreen)
        assert [v for v, _ in app.screen.choices] == ["2"]  # every version but the active one
        await pilot.press("escape")
        await pilot.pause()
        assert not isinstance(app.screen, VersionPickerScreen) and engine.routing("tiny")["active"] == "1"
        await pilot.press("s", "enter")  # picks v2 ...
        assert isinstance(app.screen, ConfirmScreen) and "v1 → v2" in app.screen.title_text
        await pilot.press("enter")  # ... and the confirmation's default is Cancel
        await pilot.pause(0.3)
        assert engine.routing("tiny")["active"] == "1" and noted(app, "Swap: cancelled")
        await pilot.press("s", "enter", "y")
        await until(lambda: engine.routing("tiny")["active"] == "2", what="v2 active", pilot=pilot)
        await until(lambda: cell(app, "tiny:2", "version") == "2*" and cell(app, "tiny:1", "version") == "1",
                    what="the table shows v2 active", pilot=pilot)
        await until(lambda: noted(app, "tiny swapped v1 → v2"), what="the swap's answer", pilot=pilot)
        assert noted(app, "swapping tiny v1 → v2") and not logged(app, "swapping tiny v1 → v2")
        # the engine's progress events, in the log in order
        for text in ("swap v1 -> v2 started", "v2 loaded and warm", "requests now go to v2", "swap v1 -> v2 done"):
            await until(lambda text=text: logged(app, text), what=f"log: {text}", pilot=pilot)
        lines = list(app.event_lines)
        idx = [next(i for i, line in enumerate(lines) if t in line)
               for t in ("swap v1 -> v2 started", "requests now go to v2", "swap v1 -> v2 done")]
        assert idx == sorted(idx)
        await until(lambda: cell(app, "tiny:1", "state") == "UNLOADED", what="v1 drained and unloaded", pilot=pilot)
        # the engine refuses a swap it cannot do: its message, in a notification and the log
        await engine.swap("tiny", "1")
        await pilot.pause(0.5)
        select(app, "solo:1")
        await pilot.press("s")  # one version: nothing to pick
        assert not isinstance(app.screen, VersionPickerScreen) and noted(app, "solo has only v1", "warning")


async def test_swap_progress_shows_live(client, engine):
    """While routing.swap is set, the status line and the detail pane say where it is."""
    await engine.load("tiny")
    gate = asyncio.Event()
    real_load = engine._ensure_loaded

    async def held(inst):  # v2's load waits for the test: the swap stays in its "loading" phase
        if inst.version == "2":
            await gate.wait()
        return await real_load(inst)

    engine._ensure_loaded = held
    app = RecordingApp(client, refresh_s=0.25)
    try:
        async with app.run_test(size=SIZE) as pilot:
            await pilot.pause()
            select(app, "tiny:1")
            await pilot.press("s", "enter", "y")
            await until(lambda: "swap tiny 1→2: loading" in app.status_line.text, what="status line", pilot=pilot)
            await until(lambda: "swap tiny 1→2: loading" in app.detail.routing.text, what="detail line", pilot=pilot)
            assert cell(app, "tiny:1", "version") == "1*" and cell(app, "tiny:1", "route") == "→2 …"
            assert cell(app, "tiny:2", "route") == "swap in"
            await pilot.press("s")  # a second swap while one runs: refused before any call
            assert noted(app, "a swap of tiny is under way", "warning")
            await pilot.press("a")
            assert not isinstance(app.screen, SplitScreen)
            gate.set()
            await until(lambda: engine.routing("tiny")["active"] == "2", what="swap done", pilot=pilot)
            await until(lambda: "swap tiny" not in app.status_line.text, what="status line cleared", pilot=pilot)
            await until(lambda: cell(app, "tiny:2", "version") == "2*", what="table", pilot=pilot)
    finally:
        gate.set()
        engine._ensure_loaded = real_load


# --------------------------------------------------------------------------- a: A/B split


async def test_split_key_edits_weights_and_shows_arms_side_by_side(client, engine):
    await engine.load("tiny")
    app = RecordingApp(client, refresh_s=0.25)
    traffic = None
    async with app.run_test(size=SIZE) as pilot:
        await pilot.pause()
        select(app, "tiny:1")
        await pilot.press("a")
        form = app.screen
        assert isinstance(form, SplitScreen)
        assert form.weight_input("1").value == "100" and form.weight_input("2").value == ""  # prefilled
        # bad input is caught in the form, before any call
        form.weight_input("1").value = "lots"
        await click(pilot, "#split-ok")
        assert isinstance(app.screen, SplitScreen) and "weight of v1: 'lots' is not a number" in form.error_text
        form.weight_input("1").value = "-5"
        await click(pilot, "#split-ok")
        assert "at least 0" in form.error_text
        form.weight_input("1").value = "0"
        await click(pilot, "#split-ok")
        assert "at least one version a weight above 0" in form.error_text
        form.weight_input("1").value = "50"
        form.query_one("#split-shadow", Input).value = "7"
        await click(pilot, "#split-ok")
        assert "shadow: no version '7'" in form.error_text
        assert engine.routing("tiny")["weights"] == {}  # nothing reached the engine
        form.query_one("#split-shadow", Input).value = ""
        form.weight_input("2").value = "50"
        form.query_one("#split-metric", Input).value = "logits"
        await click(pilot, "#split-ok")
        await until(lambda: engine.routing("tiny")["weights"] == {"1": 50, "2": 50}, what="split applied", pilot=pilot)
        assert engine.routing("tiny")["metric_output"] == "logits"
        await until(lambda: cell(app, "tiny:1", "route") == "50%" and cell(app, "tiny:2", "route") == "50%",
                    what="the route column shows the arms", pilot=pilot)
        assert cell(app, "tiny:1", "version") == "1*"  # ver is always the version
        await until(lambda: noted(app, "tiny routes 1:50 2:50"), what="answer", pilot=pilot)
        assert logged(app, "tiny: split v1=50, v2=50")
        traffic = Traffic(engine)
        try:
            def arms():
                return engine.routing("tiny")["arms"]

            await until(lambda: all((arms().get(v) or {}).get("requests", 0) >= 10 for v in ("1", "2")),
                        what="requests on both arms", pilot=pilot)
            await until(lambda: "mean out" in app.detail.routing.text, what="arms in the detail pane", pilot=pilot)

            def rows():
                return {line.split()[0]: line.split() for line in app.detail.routing.text.splitlines()
                        if line.split() and line.split()[0] in ("1*", "2")}

            assert set(rows()) == {"1*", "2"}
            await until(lambda: all(int(r[2]) > 0 and r[-1] != "—" for r in rows().values()),
                        what="request counts and mean outputs shown", pilot=pilot)
            text = app.detail.routing.text
            rows = rows()
            assert "split v1 50% v2 50%" in text and "mean of 'logits'" in text
            assert rows["1*"][1] == "50%" and rows["2"][1] == "50%"
            assert "—" not in rows["1*"][5:] and "—" not in rows["2"][5:]  # p50, p95, mean output all measured
            assert "arm" in screen_text(app) and "mean out" in screen_text(app)  # visible, not only in memory
            # editing again starts from the current weights
            await pilot.press("a")
            assert app.screen.weight_input("1").value == "50" and app.screen.weight_input("2").value == "50"
            # everything on the active version clears the split
            app.screen.weight_input("1").value = "100"
            app.screen.weight_input("2").value = "0"
            await pilot.press("enter")
            await until(lambda: engine.routing("tiny")["weights"] == {}, what="split cleared", pilot=pilot)
            await until(lambda: cell(app, "tiny:1", "version") == "1*", what="ver column back to 1*", pilot=pilot)
        finally:
            await traffic.stop()
        assert traffic.errors == []
        # a refusal by the engine: its message, not the form's
        await engine.start_canary("tiny", "2", steps=(50, 100), interval_s=60.0)
        await pilot.pause(0.3)
        await pilot.press("a")
        app.screen.weight_input("1").value = "90"
        app.screen.weight_input("2").value = "10"
        await pilot.press("enter")
        await until(lambda: noted(app, "stop it before you change the split", "error"), what="refusal", pilot=pilot)
        assert logged(app, "✗ split tiny failed")
        await engine.stop_canary("tiny")


# --------------------------------------------------------------------------- c: canary


async def test_canary_key_starts_one_shows_its_share_and_it_promotes(client, engine):
    await engine.load("tiny")
    app = RecordingApp(client, refresh_s=0.25)
    traffic = None
    async with app.run_test(size=SIZE) as pilot:
        await pilot.pause()
        select(app, "tiny:1")
        await pilot.press("c")
        form = app.screen
        assert isinstance(form, CanaryScreen) and form.query_one("#can-version", Select).value == "2"
        steps = form.query_one("#can-steps", Input)
        for bad, message in (("50, 40, 100", "each step must be above the one before"),
                             ("25, 50", "the last step must be 100"), ("fifty, 100", "'fifty' is not a number")):
            steps.value = bad
            await click(pilot, "#canary-ok")
            assert isinstance(app.screen, CanaryScreen) and message in form.error_text, (bad, form.error_text)
        steps.value = "50, 100"
        form.query_one("#can-interval", Input).value = "soon"
        await click(pilot, "#canary-ok")
        assert "interval: 'soon' is not a number" in form.error_text
        form.query_one("#can-interval", Input).value = "0.2"
        form.query_one("#can-errors", Input).value = "7"
        await click(pilot, "#canary-ok")
        assert "a fraction 0..1 (0.05) or a percentage (5%)" in form.error_text
        form.query_one("#can-errors", Input).value = "5%"
        form.query_one("#can-p95", Input).value = "0.5"
        await click(pilot, "#canary-ok")
        assert "max p95 ratio" in form.error_text and "at least 1" in form.error_text
        assert engine.routing("tiny")["canary"] is None  # nothing reached the engine
        form.query_one("#can-p95", Input).value = "50"
        form.query_one("#can-min", Input).value = "5"
        await click(pilot, "#canary-ok")
        await until(lambda: (engine.routing("tiny")["canary"] or {}).get("state") == "running",
                    what="canary running", pilot=pilot)
        c = engine.routing("tiny")["canary"]
        assert c["steps"] == [50, 100] and c["interval_s"] == 0.2 and c["bounds"] == {
            "max_error_rate": 0.05, "max_p95_ratio": 50.0, "min_requests": 5}
        # no traffic yet: it waits at its first step, and the console shows it live
        await until(lambda: cell(app, "tiny:1", "route") == "1→2 50%" == cell(app, "tiny:2", "route"),
                    what="the route column shows the canary", pilot=pilot)
        await until(lambda: "canary tiny →2 50%" in app.status_line.text, what="status line", pilot=pilot)
        await until(lambda: "canary tiny 1→2 step 1/2 50% running" in app.detail.routing.text, what="detail", pilot=pilot)
        assert "bounds errors ≤5%, p95 ≤50× baseline" in app.detail.routing.text
        # c again offers to abort it; the default is Cancel
        await pilot.press("c")
        assert isinstance(app.screen, ConfirmScreen) and "Abort the canary on tiny" in app.screen.title_text
        await pilot.press("enter")
        await pilot.pause(0.3)
        assert engine.routing("tiny")["canary"]["state"] == "running"
        traffic = Traffic(engine)
        try:
            await until(lambda: engine.routing("tiny")["canary"]["state"] == "promoted", what="promotion", pilot=pilot)
            await until(lambda: engine.routing("tiny")["swap"] is None, what="the promotion's swap", pilot=pilot)
        finally:
            await traffic.stop()
        assert traffic.errors == []
        assert engine.routing("tiny")["active"] == "2"
        await until(lambda: cell(app, "tiny:2", "version") == "2*" and cell(app, "tiny:1", "version") == "1",
                    what="the table shows v2 active", pilot=pilot)
        await until(lambda: noted(app, "canary of version 2 promoted"), what="promotion notified", pilot=pilot)
        assert "canary tiny" not in app.status_line.text
        assert not app.alerts
        # the arms table is right after the promotion: v2 takes everything, v1 nothing
        select(app, "tiny:2")
        await until(lambda: "2*     100%" in app.detail.routing.text and "1        0%" in app.detail.routing.text,
                    what="the arms after the promotion", pilot=pilot)
        # a snapshot taken while the promotion's swap drained v1 shows "→2 …": the next one clears it
        await until(lambda: cell(app, "tiny:2", "route") == "" and cell(app, "tiny:1", "route") == "",
                    what="the route column after the swap", pilot=pilot)


async def test_canary_abort_from_the_console(client, engine):
    await engine.load("tiny")
    app = RecordingApp(client, refresh_s=0.25)
    async with app.run_test(size=SIZE) as pilot:
        await pilot.pause()
        await engine.start_canary("tiny", "2", steps=(25, 100), interval_s=60.0)
        await until(lambda: cell(app, "tiny:1", "route") == "1→2 25%", what="canary shown", pilot=pilot)
        select(app, "tiny:1")
        await pilot.press("c", "y")
        await until(lambda: engine.routing("tiny")["canary"]["state"] == "aborted", what="aborted", pilot=pilot)
        await until(lambda: cell(app, "tiny:1", "route") == "" and cell(app, "tiny:1", "version") == "1*",
                    what="share back to 0", pilot=pilot)
        await until(lambda: noted(app, "canary on tiny aborted"), what="answer", pilot=pilot)
        assert not app.alerts  # an abort is the operator's own doing: no alert


VMODELS = textwrap.dedent(
    '''
    import torch


    class Version(torch.nn.Module):
        def __init__(self, fail=0):
            super().__init__()
            self.lin = torch.nn.Linear(64, 10)
            self.fail = fail

        def forward(self, x):
            if self.fail:
                raise RuntimeError("injected failure")
            return self.lin(x)


    def build(fail=0):
        return Version(fail)
    '''
)


async def test_a_canary_that_rolls_back_raises_an_alert(client, engine, tmp_path):
    from safetensors.torch import save_file

    (tmp_path / "vmodels.py").write_text(VMODELS)
    lin = torch.nn.Linear(64, 10)
    save_file({"lin.weight": lin.weight.detach().contiguous(), "lin.bias": lin.bias.detach().contiguous()},
              str(tmp_path / "v.safetensors"))
    await engine.register({"name": "tiny", "version": "3", "source": "safetensors:v.safetensors",
                           "factory": "vmodels:build", "args": {"fail": 1}, "device": "cpu", "warmup": 0,
                           "max_batch_size": 1,
                           "inputs": [{"name": "input", "datatype": "FP32", "shape": [-1, 64]}],
                           "outputs": [{"name": "logits", "datatype": "FP32", "shape": [-1, 10]}]})
    await engine.load("tiny")
    app = RecordingApp(client, refresh_s=0.25)
    async with app.run_test(size=SIZE) as pilot:
        await pilot.pause()
        select(app, "tiny:1")
        await pilot.press("c")
        app.screen.query_one("#can-version", Select).value = "3"
        app.screen.query_one("#can-steps", Input).value = "25, 100"
        app.screen.query_one("#can-interval", Input).value = "30"
        app.screen.query_one("#can-min", Input).value = "5"
        await click(pilot, "#canary-ok")
        await until(lambda: (engine.routing("tiny")["canary"] or {}).get("state") == "running", what="run", pilot=pilot)
        traffic = Traffic(engine)
        try:
            await until(lambda: app.alerts, what="the alert", pilot=pilot)
        finally:
            await traffic.stop()
        assert engine.routing("tiny")["canary"]["state"] == "rolled_back"
        assert "rolled back" in app.alerts[0] and "error rate" in app.alerts[0]
        assert any(s == "error" and "canary rolled back" in n for n, s in app.notes)
        line = next(line for line in app.event_lines if "rolled back" in line and "⚠" in line)
        assert "canary of version 3 rolled back" in line
        # the log line is highlighted (not only red text)
        strips = [s for s in app.log_widget.lines if "rolled back" in s.text]
        assert strips and any(seg.style is not None and seg.style.bgcolor is not None for seg in strips[-1])
        await until(lambda: cell(app, "tiny:1", "route") == "" and cell(app, "tiny:1", "version") == "1*",
                    what="share back to 0", pilot=pilot)
        await until(lambda: "rolled_back" in app.detail.routing.text, what="the detail says so", pilot=pilot)
        assert "error rate" in app.detail.routing.text


# --------------------------------------------------------------------------- read-only, help, palette


async def test_read_only_hides_swap_split_and_canary(client, engine):
    await engine.load("tiny")
    app = RecordingApp(client, read_only=True, refresh_s=0.25)
    async with app.run_test(size=SIZE) as pilot:
        await pilot.pause()
        select(app, "tiny:1")
        await pilot.press("s", "a", "c")
        await pilot.pause(0.3)
        assert not isinstance(app.screen, (VersionPickerScreen, SplitScreen, CanaryScreen, ConfirmScreen))
        for action in ("swap", "split", "canary"):
            assert app.check_action(action, ()) is False
        footer = screen_text(app).splitlines()[-1]
        assert "Swap" not in footer and "A/B" not in footer and "Canary" not in footer
        titles = [t for t, _, _ in ActionCommands(app.screen)._commands()]
        assert not any(t.startswith(("Hot swap", "A/B split", "Canary")) for t in titles)
        rows = {row[2]: row for row in app.help_rows()}
        assert not {"swap", "split", "canary", "load", "unload", "evict", "pin", "register"} & set(rows)
        assert rows["help"][3] and rows["filter"][3]  # reading stays
        assert engine.routing("tiny")["active"] == "1" and engine.routing("tiny")["canary"] is None
    with pytest.raises(ClientError, match="read-only"):
        await LocalClient(engine, read_only=True).swap("tiny", "2")


async def test_keys_in_footer_help_and_palette(client):
    app = RecordingApp(client, refresh_s=0.25)
    async with app.run_test(size=SIZE) as pilot:
        await pilot.pause()
        footer = screen_text(app).splitlines()[-1]
        assert "s Swap" in footer and "a A/B" in footer and "c Canary" in footer and "q Quit" in footer
        rows = {row[2]: row for row in app.help_rows()}
        assert rows["swap"][0] == "s" and rows["split"][0] == "a" and rows["canary"][0] == "c"
        assert rows["sort"][0] == "o" and rows["reverse_sort"][0] == "O"  # sort moved off s
        titles = [t for t, _, _ in ActionCommands(app.screen)._commands()]
        for action in ("swap", "split", "canary"):
            assert next(t for a, t, _ in PALETTE if a == action) in titles
        await pilot.press("o")
        assert app.sort_column == "version"


# --------------------------------------------------------------------------- the client calls


async def test_local_client_versions_calls(client, engine):
    r = await client.set_split("tiny", {"1": 3, "2": 1}, metric_output="logits")
    assert r["weights"] == {"1": 3, "2": 1} and (await client.routing("tiny"))["metric_output"] == "logits"
    assert client.snapshot()["routing"]["tiny"]["weights"] == {"1": 3, "2": 1}
    with pytest.raises(ClientError) as e:
        await client.set_split("tiny", {"9": 1})
    assert e.value.status == 404 and "9" in e.value.message
    await client.set_split("tiny", {})
    r = await client.start_canary("tiny", "2", steps=[50, 100], interval_s=60.0, min_requests=None)
    assert r["canary"]["state"] == "running" and r["canary"]["bounds"]["min_requests"] == 20
    with pytest.raises(ClientError) as e:
        await client.start_canary("tiny", "2")
    assert e.value.status == 409 and "already under a canary" in e.value.message
    r = await client.stop_canary("tiny")
    assert r["canary"]["state"] == "aborted"
    r = await client.swap("tiny", "2")
    assert (r["from"], r["to"]) == ("1", "2") and r["seconds"] >= 0
    with pytest.raises(ClientError) as e:
        await client.swap("tiny", "2")
    assert e.value.status == 409 and "already active" in e.value.message
    with pytest.raises(ClientError) as e:
        await client.routing("nope")
    assert e.value.status == 404


async def test_remote_client_versions_calls(tmp_path):
    from serverutil import ServerThread

    with ServerThread(tmp_path, models=[V1, V2]) as srv:
        remote = RemoteClient(srv.url)
        await remote.start()
        try:
            r = await remote.set_split("tiny", {"1": 90, "2": 10})
            assert r["weights"] == {"1": 90, "2": 10}
            assert remote.snapshot()["routing"]["tiny"]["weights"] == {"1": 90, "2": 10}  # merged at once
            assert fmt.arms_label(remote.snapshot()["routing"]["tiny"]) == "1:90 2:10"
            await remote.set_split("tiny", {})
            with pytest.raises(ClientError) as e:
                await remote.set_split("tiny", {"1": "lots"})
            assert e.value.status == 400 and "weights.1" in e.value.message
            r = await remote.start_canary("tiny", "2", steps=[50, 100], interval_s=60.0, max_error_rate=0.1)
            assert r["canary"]["state"] == "running" and r["canary"]["bounds"]["max_error_rate"] == 0.1
            assert (await remote.routing("tiny"))["canary"]["share"] == 50
            r = await remote.stop_canary("tiny")
            assert r["canary"]["state"] == "aborted"
            r = await remote.swap("tiny", "2")
            assert (r["from"], r["to"]) == ("1", "2")
            models = {m["version"]: m for m in remote.snapshot()["models"] if m["name"] == "tiny"}
            assert models["2"]["active"] and not models["1"]["active"]  # shown before the next snapshot
            with pytest.raises(ClientError) as e:
                await remote.swap("tiny", "2")
            assert e.value.status == 409
        finally:
            await remote.close()
        ro = RemoteClient(srv.url, read_only=True)
        await ro.start()
        try:
            for call in (ro.swap("tiny", "1"), ro.set_split("tiny", {"1": 1}), ro.start_canary("tiny", "1"),
                         ro.stop_canary("tiny")):
                with pytest.raises(ClientError, match="read-only"):
                    await call
            assert (await ro.routing("tiny"))["active"] == "2"  # reading is allowed
        finally:
            await ro.close()


# --------------------------------------------------------------------------- formatting


def test_arms_label_and_form_parsing():
    assert fmt.arms_label(None) is None
    assert fmt.arms_label({"active": "1", "weights": {}}) is None
    assert fmt.arms_label({"active": "1", "weights": {"1": 9, "2": 1}}) == "1:90 2:10"
    assert fmt.arms_label({"active": "1", "weights": {"2": 5}}) == "2:100"
    assert fmt.arms_label({"active": "1", "weights": {}, "shadow": ["2"]}) == "1 2:sh"
    assert fmt.arms_label({"active": "1", "weights": {"1": 75, "2": 25},
                           "canary": {"version": "2", "baseline": "1", "share": 25, "state": "running"}}) == "1→2 25%"
    assert fmt.arms_label({"active": "1", "swap": {"to": "2", "phase": "loading"}}) == "1→2 …"
    assert fmt.version_text({"version": "1", "active": True}, None) == "1*"
    assert fmt.parse_weights({"1": "90", "2": "10", "3": ""}) == {"1": 90.0, "2": 10.0}
    with pytest.raises(ValueError, match="not a number"):
        fmt.parse_weights({"1": "x"})
    with pytest.raises(ValueError, match="above 0"):
        fmt.parse_weights({"1": "0", "2": ""})
    assert fmt.parse_steps("5, 25 50 100%") == [5, 25, 50, 100]
    with pytest.raises(ValueError, match="last step must be 100"):
        fmt.parse_steps("5 50")
    with pytest.raises(ValueError, match="must be at most 100"):
        fmt.parse_steps("50 150")
    assert fmt.parse_rate("5%") == 0.05 and fmt.parse_rate("0.1") == 0.1
    with pytest.raises(ValueError, match="percentage"):
        fmt.parse_rate("5")
    assert fmt.parse_versions("v2, 3", ["1", "2", "3"]) == ["2", "3"]
    rows = fmt.arm_rows({"active": "1", "weights": {"1": 1, "2": 1}, "arms": {
        "1": {"requests": 10, "errors": 1, "error_rate": 0.1, "p50_ms": 1.0, "p95_ms": 2.0, "mean_output": 0.25}}})
    assert [k for _, k in rows] == ["active", "arm"]
    assert rows[0][0].split() == ["1*", "50%", "10", "1", "10.0%", "1.00", "2.00", "0.25"]
    assert rows[1][0].split()[:4] == ["2", "50%", "0", "0"]
