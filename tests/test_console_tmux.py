"""The embedded console in a real terminal: ``modelconsole --demo`` under tmux.

Keys go in with ``tmux send-keys`` and the screen comes back with ``tmux
capture-pane``, so this is what an operator sees: the models table, a model
loaded with ``l`` and unloaded with ``u`` (confirmed with ``y``), and ``q``
(confirmed while traffic flows) ending the process.  While the console runs,
real HTTP clients get answers from its embedded server (the health check, a
model's metadata, an infer), and once it has quit nothing answers there.

The demo's traffic generator loads any model a request reaches, so before
touching a model the test slows it to its floor with ``[`` and works on
``tiny-mlp``, the model it sends least to.  Everything polls the pane with a
deadline; nothing waits a fixed time.  The test runs its own tmux server (a
unique ``-L`` socket) and session, and kills both whatever happens.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
import time
import uuid

import pytest
from consoleutil import http

MODEL = "tiny-mlp"  # sorted last of the demo's three, so the traffic's Zipf weights make it the quietest


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Tmux:
    def __init__(self) -> None:
        tag = uuid.uuid4().hex[:10]
        self.socket = f"mc-test-{tag}"
        self.session = f"mc-console-{tag}"
        self.env = dict(os.environ, LANG="C.UTF-8", LC_ALL="C.UTF-8")
        self.env.pop("TMUX", None)  # never talk to a tmux this test runs inside

    def run(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        return subprocess.run(["tmux", "-L", self.socket, *args], capture_output=True, text=True,
                              timeout=30, check=check, env=self.env)

    def start(self, command: str, cwd: str) -> None:
        self.run("new-session", "-d", "-s", self.session, "-x", "120", "-y", "40", "-c", cwd, command)

    def keys(self, *keys: str) -> None:
        self.run("send-keys", "-t", self.session, *keys)

    def capture(self) -> str:
        return self.run("capture-pane", "-p", "-t", self.session, check=False).stdout

    def close(self) -> None:
        self.run("kill-session", "-t", self.session, check=False)
        self.run("kill-server", check=False)


def row_state(screen: str, name: str) -> str | None:
    """The state column of ``name``'s row in the models table ("tiny-mlp  1*  READY  gpu0 ...")."""
    for line in screen.splitlines():
        m = re.match(rf"\W*{re.escape(name)}(?: \[pin\])?\s+\d+\*?\s+([A-Z]+)\b", line)
        if m:
            return m.group(1)
    return None


def wait_for(tmux: Tmux, cond, what: str, timeout: float = 30.0, log: str | None = None) -> str:
    """Poll the pane until cond(screen) holds; the screen that satisfied it."""
    deadline = time.monotonic() + timeout
    screen = ""
    while time.monotonic() < deadline:
        screen = tmux.capture()
        if cond(screen):
            return screen
        time.sleep(0.1)
    tail = ""
    if log and os.path.exists(log):
        with open(log) as f:
            tail = "\n--- modelconsole.log ---\n" + f.read()[-3000:]
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}; the screen:\n{screen}{tail}")


def infer_body(meta: dict) -> dict:
    """A V2 infer request for a model's metadata: each input, batch 1, filled with zeros."""
    inputs = []
    for spec in meta["inputs"]:
        shape = [1 if d < 0 else d for d in spec["shape"]]
        n = 1
        for d in shape:
            n *= d
        inputs.append({"name": spec["name"], "shape": shape, "datatype": spec["datatype"], "data": [0] * n})
    return {"inputs": inputs}


@pytest.mark.skipif(shutil.which("tmux") is None, reason="needs tmux")
def test_demo_console_in_tmux_loads_unloads_and_quits(tmp_path):
    port = free_port()
    store = tmp_path / "s.db"
    log = str(tmp_path / "modelconsole.log")  # where the console logs with --store in tmp_path
    console = " ".join(shlex.quote(a) for a in (
        sys.executable, "-m", "modelconsole.console", "--demo", "--store", str(store), "--port", str(port)))
    # the shell stays after the console ends, to say how it ended
    command = f"{console}; echo MC_EXIT=$?; sleep 600"
    tmux = Tmux()
    try:
        tmux.start(command, str(tmp_path))

        screen = wait_for(tmux, lambda s: all(row_state(s, n) for n in ("encoder", "small-cnn", MODEL))
                          and "l Load" in s, "the models table and the footer", timeout=90, log=log)
        header = next(line for line in screen.splitlines() if line.split()[:3] == ["model↑", "ver", "state"])
        assert "device" in header and "health" in header and "p95ms" in header
        assert "? help · q quit" in screen.splitlines()[0]

        # the embedded HTTP server answers clients while the console runs in the terminal
        url = f"http://127.0.0.1:{port}"
        assert http(url + "/v2/health/ready")[0] == 200
        status, meta = http(url + "/v2/models/small-cnn")
        assert status == 200 and meta["name"] == "small-cnn"
        status, out = http(url + "/v2/models/small-cnn/infer", infer_body(meta))
        assert status == 200 and out["model_name"] == "small-cnn" and out["outputs"], out
        wait_for(tmux, lambda s: row_state(s, "small-cnn") == "READY", "small-cnn READY after the infer", log=log)

        for _ in range(7):  # the demo's traffic, halved down to its floor (0.5 req/s)
            tmux.keys("[")
        wait_for(tmux, lambda s: "demo 0.50 req/s" in s, "the demo rate at its floor", log=log)

        for _ in range(2):  # the table is sorted by name: encoder, small-cnn, tiny-mlp
            tmux.keys("Down")
        wait_for(tmux, lambda s: f"{MODEL} v1 (active)" in s, f"{MODEL} selected (the detail pane's heading)",
                 log=log)

        def unload() -> None:
            tmux.keys("u")
            wait_for(tmux, lambda s: f"Unload {MODEL} v1?" in s, "the unload confirmation", log=log)
            tmux.keys("y")
            # the row shows UNLOADED.  Should a demo request reload it before a capture catches
            # that, the unload's own answer ("tiny-mlp v1 is UNLOADED", in a notification and the
            # log) and the row loading again are what is left to see (the answer says "was unloaded"
            # when the traffic had started loading it again before the answer left the engine).
            wait_for(tmux, lambda s: row_state(s, MODEL) == "UNLOADED"
                     or (f"{MODEL} v1 is UNLOADED" in s or f"{MODEL} v1 was unloaded" in s)
                     and row_state(s, MODEL) in ("LOADING", "WARMING", "READY"),
                     f"{MODEL} UNLOADED", log=log)

        # the traffic may have loaded it already (requests load what they reach): start from unloaded
        if row_state(tmux.capture(), MODEL) != "UNLOADED":
            wait_for(tmux, lambda s: row_state(s, MODEL) in ("READY", "UNLOADED"), f"{MODEL} settled", log=log)
            if row_state(tmux.capture(), MODEL) == "READY":
                unload()

        tmux.keys("l")
        screen = wait_for(tmux, lambda s: row_state(s, MODEL) == "READY", f"{MODEL} READY", log=log)
        # the console's own answer to the load (a notification and a log line; the engine's event
        # says "ready", lowercase), or, if a demo request got there first, that it was loaded already
        wait_for(tmux, lambda s: f"{MODEL} v1 is READY" in s or "already loaded" in s,
                 "the load's answer", log=log)

        unload()

        tmux.keys("q")
        screen = wait_for(tmux, lambda s: "Quit while serving?" in s or "MC_EXIT=" in s, "quit", log=log)
        if "MC_EXIT=" not in screen:
            tmux.keys("y")
        screen = wait_for(tmux, lambda s: "MC_EXIT=" in s, "the console to exit", timeout=60, log=log)
        assert "MC_EXIT=0" in screen, screen
        # the terminal said what it was doing while the engine drained
        assert "modelconsole: stopping — draining" in screen and "modelconsole: stopped." in screen, screen
        assert http(url + "/v2/health/ready", timeout=5)[0] is None  # its server went with it
    finally:
        tmux.close()
