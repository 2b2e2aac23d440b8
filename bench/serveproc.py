"""A real ``modelconsole --serve`` subprocess for the HTTP benchmarks (bench/http.py, bench/swap.py)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path


def start_server(tmp: Path, port: int, config: str, extra: list[str] | None = None,
                 cpus: list[int] | None = None) -> subprocess.Popen:
    """Write ``config`` into ``tmp``, start ``--serve`` on 127.0.0.1:``port`` and return it once ready.

    The server runs as a user would start it: no environment tweaks (it chooses
    its torch threads itself, ``[server] torch_threads``); an ``OMP_NUM_THREADS``
    the bench itself set for its own process is not passed on.  ``extra``: more flags
    (the default is one process without gRPC); ``cpus``: the CPUs it (and its front-end
    processes) may run on.
    """
    (tmp / "bench.toml").write_text(config)
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    proc = subprocess.Popen([sys.executable, "-m", "modelconsole.console", "--serve", "--config",
                             str(tmp / "bench.toml"), "--port", str(port), "--store", str(tmp / "store.db"),
                             "--log-level", "WARNING", *(extra or ["--workers", "0", "--grpc-port", "off"])],
                            env=env, preexec_fn=(lambda: os.sched_setaffinity(0, cpus)) if cpus else None)
    deadline = time.monotonic() + 120
    while True:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/v2/health/ready", timeout=2) as r:
                if r.status == 200:
                    return proc
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit("the server did not start") from None
            time.sleep(0.2)


def control_token(tmp: Path, port: int) -> str:
    """The control token the server made at start: it writes ``server-PORT.token`` (mode 0600)
    beside its store, as ``modelconsole --attach`` reads it."""
    from modelconsole.server.tokenfile import read_token

    token = read_token(tmp, port)
    if not token:
        raise SystemExit(f"the server wrote no token file for port {port} in {tmp}")
    return token

