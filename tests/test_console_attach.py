"""Attach mode end to end: the console (``RemoteClient`` + ``ModelConsoleApp`` under Pilot)
against a real ``modelconsole --serve`` subprocess on a loopback port.

The table shows the server's models; ``l`` loads the selected one on the server and
``u`` + confirm unloads it (both checked over HTTP, not through the console); ``q``
leaves the server running; a server killed under a running console greys the picture
and shows the reconnect banner, and a new server on the same port is picked up by
itself.  And the attach path never imports torch: not on import, and not in a
whole Pilot session against a real server (run in a fresh interpreter).
"""

from __future__ import annotations

import asyncio
import json
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from waiting import until

from modelconsole.console.app import ModelConsoleApp
from modelconsole.console.client import RemoteClient
from modelconsole.console.screens import ConfirmScreen
from modelconsole.server.tokenfile import read_token

SIZE = (120, 40)
CONFIG = """
[gpu]
simulate = "2x8GiB"

[[models]]
name = "tiny"
source = "zoo:tiny-mlp"
warmup = 0

[[models]]
name = "spare"
source = "zoo:tiny-mlp"
warmup = 0
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http_status(url: str, timeout: float = 2.0) -> int | None:
    """The status of GET url; None when nothing answers."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code
    except OSError:
        return None


def http_json(url: str, method: str = "GET", timeout: float = 60.0, token: str | None = None):
    headers = {"Content-Type": "application/json"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    req = urllib.request.Request(url, method=method, data=b"{}" if method == "POST" else None, headers=headers)
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return json.loads(r.read())


class ServeProcess:
    """``modelconsole --serve`` as a subprocess; can be stopped and started again on its port."""

    def __init__(self, tmp: Path):
        self.tmp = tmp
        self.config = tmp / "mc.toml"
        self.config.write_text(CONFIG)
        self.store = tmp / "s.db"
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None
        self.runs = 0

    def start(self) -> None:
        self.runs += 1
        if self.runs > 1:
            self.log.close()
        self.log = open(self.tmp / f"serve-{self.runs}.log", "w")  # noqa: SIM115 - closed in kill()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "modelconsole.console", "--serve", "--config", str(self.config),
             "--port", str(self.port), "--store", str(self.store)],
            stdout=self.log, stderr=subprocess.STDOUT, cwd=self.tmp)

    def wait_ready(self, timeout: float = 90.0) -> None:
        deadline = time.monotonic() + timeout
        while http_status(self.url + "/v2/health/ready") != 200:
            if self.proc is None or self.proc.poll() is not None:
                raise AssertionError(f"the server exited ({self.proc and self.proc.returncode}):\n{self.log_text()}")
            if time.monotonic() > deadline:
                raise AssertionError(f"the server was not ready within {timeout:.0f} s:\n{self.log_text()}")
            time.sleep(0.1)

    def terminate(self, timeout: float = 60.0) -> int:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self.log.close()

    def log_text(self) -> str:
        self.log.flush()
        return "".join(p.read_text() for p in sorted(self.tmp.glob("serve-*.log")))[-4000:]

    @property
    def token(self) -> str:
        """The control token the server made at start (written beside its store, mode 0600)."""
        token = read_token(self.tmp, self.port)
        assert token, f"no token file for port {self.port} in {self.tmp}"
        return token

    def state(self, name: str) -> str:
        return http_json(f"{self.url}/api/models/{name}", token=self.token)["versions"][0]["state"]


@pytest.fixture
def server(tmp_path):
    s = ServeProcess(tmp_path)
    s.start()
    try:
        s.wait_ready()
        yield s
    finally:
        s.kill()


def cell(app: ModelConsoleApp, key: str, col: str) -> str:
    return app.table.get_cell(key, col).plain


def rows(app: ModelConsoleApp) -> set[str]:
    return {str(k.value) for k in app.table.rows}


async def test_attached_console_drives_a_real_server_and_survives_its_restart(server):
    ask = asyncio.to_thread  # HTTP checks off the loop: the app keeps running while they wait

    # -- load, unload, quit: the server keeps running
    client = RemoteClient(server.url, server.token)
    await client.start()
    try:
        app = ModelConsoleApp(client, refresh_s=0.25)
        async with app.run_test(size=SIZE) as pilot:
            await until(lambda: rows(app) == {"tiny:1", "spare:1"}, what="the server's models", pilot=pilot)
            assert cell(app, "tiny:1", "state") == "UNLOADED"
            assert f"attached to {server.url}" in app.query_one("#status").text
            app.table.move_cursor(row=app.table.get_row_index("tiny:1"), animate=False)
            await pilot.pause()
            assert app.selected_key() == "tiny:1"

            await pilot.press("l")

            async def tiny_is(state: str) -> bool:
                return await ask(server.state, "tiny") == state

            await until(lambda: tiny_is("READY"), what="tiny READY on the server", pilot=pilot)
            await until(lambda: cell(app, "tiny:1", "state") == "READY", what="tiny READY in the table", pilot=pilot)
            assert await ask(server.state, "spare") == "UNLOADED"  # only the selected row

            await pilot.press("u")
            assert isinstance(app.screen, ConfirmScreen)
            await pilot.press("tab", "enter")  # focus the Unload button, press it
            await until(lambda: tiny_is("UNLOADED"), what="tiny UNLOADED on the server", pilot=pilot)
            await until(lambda: cell(app, "tiny:1", "state") == "UNLOADED", what="tiny UNLOADED in the table", pilot=pilot)

            await pilot.press("q")
            await pilot.pause()
            assert not app.is_running
        assert await ask(http_status, server.url + "/v2/health/ready") == 200
        assert server.proc.poll() is None
    finally:
        await client.close()

    # -- a version registered at run time is deleted from the console (X, confirmed), for good
    def register_extra() -> None:
        req = urllib.request.Request(f"{server.url}/api/models", method="POST", data=json.dumps(
            {"name": "extra", "source": "zoo:tiny-mlp", "options": {"warmup": 0}}).encode(),
            headers={"Content-Type": "application/json", "Authorization": f"Bearer {server.token}"})
        with urllib.request.urlopen(req, timeout=60) as r:
            assert r.status == 201

    await ask(register_extra)
    client = RemoteClient(server.url, server.token)
    await client.start()
    try:
        app = ModelConsoleApp(client, refresh_s=0.25)
        async with app.run_test(size=SIZE) as pilot:
            await until(lambda: "extra:1" in rows(app), what="the registered model", pilot=pilot)
            app.table.move_cursor(row=app.table.get_row_index("extra:1"), animate=False)
            await pilot.pause()
            await pilot.press("X")
            assert isinstance(app.screen, ConfirmScreen)
            await pilot.press("tab", "enter")
            await until(lambda: "extra:1" not in rows(app), what="the row gone", pilot=pilot)
            def gone() -> bool:
                try:
                    http_json(f"{server.url}/api/models/extra", token=server.token)
                except urllib.error.HTTPError as e:
                    return e.code == 404
                return False

            assert await ask(gone)
            await pilot.press("q")
            await pilot.pause()
    finally:
        await client.close()

    # -- the server dies under a running console, and a new one on the same port is found
    client = RemoteClient(server.url, server.token)
    await client.start()
    try:
        app = ModelConsoleApp(client, refresh_s=0.25)
        async with app.run_test(size=SIZE) as pilot:
            await until(lambda: rows(app) == {"tiny:1", "spare:1"}, what="the server's models", pilot=pilot)
            assert client.connected and not app.screen.has_class("-disconnected")

            assert await ask(server.terminate) == 0
            await until(lambda: not client.connected, what="client.connected False", pilot=pilot)
            await until(lambda: app.screen.has_class("-disconnected"), what="the greyed picture", pilot=pilot)
            banner = app.query_one("#banner")
            assert "connection lost to " + server.url in banner.text and "reconnecting" in banner.text
            assert banner.display
            assert rows(app) == {"tiny:1", "spare:1"}  # the last picture stays
            await pilot.pause(1.0)
            assert not client.connected  # still down: nothing answers on the port

            server.start()
            await ask(server.wait_ready)
            # a change made on the new server only: the picture must be fresh, not the old one
            await ask(http_json, f"{server.url}/api/models/spare/load", "POST", 60.0, server.token)
            await until(lambda: client.connected, what="reconnected by itself", pilot=pilot)
            await until(lambda: not app.screen.has_class("-disconnected"), what="no longer greyed", pilot=pilot)
            assert not app.query_one("#banner").display
            await until(lambda: cell(app, "spare:1", "state") == "READY", what="the new server's picture", pilot=pilot)
            await until(lambda: any("reconnected to" in line for line in app.event_lines),
                        what="the reconnection in the log", pilot=pilot)
            await pilot.press("q")
            await pilot.pause()
            assert not app.is_running
        assert await ask(http_status, server.url + "/v2/health/ready") == 200
    finally:
        await client.close()


ATTACHED_SESSION = r"""
import asyncio, sys, time

sys.path.insert(0, sys.argv[3])  # the tests' folder: their one wait helper (it imports no torch)
from waiting import until

from modelconsole.console.app import ModelConsoleApp
from modelconsole.console.client import RemoteClient
from modelconsole.console.screens import ConfirmScreen, HelpScreen
from textual.command import CommandPalette


async def main(url, token):
    client = RemoteClient(url, token)
    await client.start()
    try:
        app = ModelConsoleApp(client, refresh_s=0.25)
        async with app.run_test(size=(120, 40)) as pilot:
            cell = lambda key, col: app.table.get_cell(key, col).plain
            await until(lambda: {str(k.value) for k in app.table.rows} == {"tiny:1", "spare:1"}, "rows", pilot=pilot)
            await until(lambda: len(app.gpus.cards) == 2, "GPU cards", pilot=pilot)
            app.table.move_cursor(row=app.table.get_row_index("tiny:1"), animate=False)
            await pilot.pause()
            await pilot.press("l")  # a load on the server, answered with its tensors' facts
            await until(lambda: cell("tiny:1", "state") == "READY", "tiny READY", pilot=pilot)
            await pilot.press("question_mark")
            assert isinstance(app.screen, HelpScreen)
            await pilot.press("escape", "ctrl+p")
            await until(lambda: isinstance(app.screen, CommandPalette), "the palette", pilot=pilot)
            await pilot.press("escape", "u")
            assert isinstance(app.screen, ConfirmScreen)
            await pilot.press("y")
            await until(lambda: cell("tiny:1", "state") == "UNLOADED", "tiny UNLOADED", pilot=pilot)
            await pilot.press("q")
            await pilot.pause()
            assert not app.is_running
    finally:
        await client.close()
    heavy = sorted(m for m in sys.modules if m == "torch" or m.startswith(("torch.", "modelconsole.scheduler",
                                                                          "modelconsole.server", "modelconsole.gpu")))
    assert "torch" not in sys.modules, heavy
    assert not heavy, heavy
    print("ATTACHED-SESSION-OK")


asyncio.run(main(sys.argv[1], sys.argv[2]))
"""


def test_an_attached_session_never_imports_torch(server):
    """A whole Pilot session in attach mode against the real server (rows, GPU cards, a load and
    an unload, help, the palette, quit), in a fresh interpreter: this test process has torch
    imported for the other tests, so only a subprocess can tell that the console did not."""
    proc = subprocess.run([sys.executable, "-c", ATTACHED_SESSION, server.url, server.token,
                           str(Path(__file__).parent)], capture_output=True, text=True,
                          timeout=300, check=False)
    assert proc.returncode == 0 and "ATTACHED-SESSION-OK" in proc.stdout, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert server.state("tiny") == "UNLOADED"  # the session really drove the server


def test_the_attach_path_never_imports_torch():
    code = "import sys; from modelconsole.console import app, client, run; assert 'torch' not in sys.modules"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr
