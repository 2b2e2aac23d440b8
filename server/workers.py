"""``--serve --workers N``: the engine core's side of front-end processes.

:class:`WorkerServer` has ``Server``'s face (``start``, ``stop``, ``port``,
``url``) so ``serve.py`` runs either.  It starts, in order:

1. the core's end of the infer link (``core.CoreServer``) and the core's own
   app on a Unix socket (``proxy.py`` forwards the control API, events,
   metrics and metadata to it), both in a private 0700 directory;
2. N front-end processes (``frontend.py``, ``FrontEnds``), each told its
   settings on stdin, on the public port (and the gRPC port), reserved for
   them by a socket bound with SO_REUSEPORT that never listens, so ``--port 0``
   picks one port for every front end and a restarted front end always gets
   it back.

A front end that exits while the server runs is restarted (an event says
so; a crash loop backs off up to 10 s).  Its clients saw their connections
close, an error at once; the engine finishes their work and the core drops
the answers.  If the engine core dies, the front ends see their stdin close
and stop (503 for what they hold).  ``stop`` drains front ends first (they
still reach the engine to answer what is in flight), then the control app.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import os
import shutil
import signal
import socket
import sys
from collections.abc import Callable
from typing import Any

from . import rundir, tokenfile
from .app import Server
from .core import CoreServer
from .web import ServerSettings, http_url

log = logging.getLogger("modelconsole.server.workers")

READY_TIMEOUT_S = 120.0  # seconds on a busy machine


def reserve_port(host: str, port: int) -> socket.socket:
    """A bound, never-listening SO_REUSEPORT socket holding (host, port) for the front ends.

    A port some other server already listens on is refused first (EADDRINUSE), as a plain
    bind would: SO_REUSEPORT alone would let this server join that one's group and take
    half of its connections."""
    family, kind, proto, _, addr = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    if port:
        with socket.socket(family, kind, proto) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # TIME_WAIT is no reason to refuse
            probe.bind(addr)
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    try:
        sock.bind(addr)
    except OSError:
        sock.close()
        raise
    return sock


class FrontEnds:
    """N front-end processes on one port (``--serve --workers N``, and a fleet node's): the port
    (and gRPC's) reserved for them, the processes started, watched, restarted, drained.

    ``ipc``: the engine core's address; ``control``: where they forward the control API
    (``{"control": Unix path}`` of the core's app, or ``{"control_url": URL}`` of a fleet's
    control plane); ``counts_dir``: where they write their request counters."""

    def __init__(self, count: int, settings: ServerSettings, ipc: str, control: dict[str, str], counts_dir: str,
                 on_event: Callable[[str, str, str], None], *, grpc_port: int | None = None,
                 grpc_required: bool = True, log_level: str = "INFO"):
        self.count = count
        self.settings = settings
        self.ipc = ipc
        self.control = control
        self.grpc_port_setting = grpc_port
        self.grpc_required = grpc_required  # False: a port that cannot be bound is a warning, not a failure
        self.log_level = log_level
        self.env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": counts_dir}
        self.on_event = on_event
        self.port: int | None = None
        self.grpc_port: int | None = None
        self.spec: dict[str, Any] = {}
        self.procs: list[asyncio.subprocess.Process | None] = [None] * count
        self.restarts = 0
        self._reserved: list[socket.socket] = []
        self._keepers: list[asyncio.Task[None]] = []
        self._stopping = False

    async def start(self) -> None:
        s = self.settings
        try:
            main = reserve_port(s.host, s.port)
            self._reserved.append(main)
            self.port = main.getsockname()[1]
            if self.grpc_port_setting is not None:
                try:
                    g = reserve_port(s.host, self.grpc_port_setting)
                except OSError as e:
                    if self.grpc_required:
                        raise
                    log.warning("gRPC not started (%s): set --grpc-port to another port, or off", e)
                else:
                    self._reserved.append(g)
                    self.grpc_port = g.getsockname()[1]
            front = dataclasses.replace(s, port=self.port, reuse_port=True, token_dir=None)
            self.spec = {"settings": dataclasses.asdict(front), "ipc": self.ipc, **self.control,
                         "grpc_port": self.grpc_port, "log_level": self.log_level}
            await asyncio.gather(*(self._spawn(k) for k in range(self.count)))
        except BaseException:
            await self.stop()
            raise
        loop = asyncio.get_running_loop()
        self._keepers = [loop.create_task(self._keep(k)) for k in range(self.count)]

    async def _spawn(self, k: int) -> None:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "modelconsole.server.frontend",
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, env=self.env)
        assert proc.stdin is not None and proc.stdout is not None
        proc.stdin.write(json.dumps(dict(self.spec, index=k)).encode() + b"\n")
        await proc.stdin.drain()
        try:
            line = await asyncio.wait_for(proc.stdout.readline(), READY_TIMEOUT_S)
        except TimeoutError:
            line = b""
        if line.strip() != b"ready":
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()
            raise RuntimeError(f"front end {k} did not start (exit status {proc.returncode}; its log is above)")
        self.procs[k] = proc

    async def _keep(self, k: int) -> None:
        delay = 0.0
        while not self._stopping:
            proc = self.procs[k]
            assert proc is not None
            started = asyncio.get_running_loop().time()
            rc = await proc.wait()
            if self._stopping:
                return
            self.restarts += 1
            lived = asyncio.get_running_loop().time() - started
            delay = 0.0 if lived > 10 else min(10.0, max(0.25, delay * 2))
            how = f"signal {-rc}" if rc < 0 else f"status {rc}"
            if delay:
                await asyncio.sleep(delay)
            while not self._stopping:
                try:
                    await self._spawn(k)
                    break
                except RuntimeError as e:
                    log.error("%s; trying again in 10 s", e)
                    await asyncio.sleep(10)
            else:
                return
            now = getattr(self.procs[k], "pid", "?")
            self.on_event("frontend_restarted", f"front end {k} (pid {proc.pid}) exited with {how}: its "
                                                f"connections were closed; restarted as pid {now}", "warning")

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self.procs if p is not None]

    async def stop(self) -> None:
        """SIGTERM to each: they drain (new connections refused, in-flight calls answered); past
        the server's shutdown timeout and grace the ones left are killed.  The port goes last."""
        timeout = self.settings.shutdown_timeout_s + self.settings.drain_grace_s + 5
        self._stopping = True
        for task in self._keepers:
            task.cancel()
        live = [p for p in self.procs if p is not None and p.returncode is None]
        for p in live:
            with contextlib.suppress(ProcessLookupError):
                p.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(asyncio.gather(*(p.wait() for p in live)), timeout)
        except TimeoutError:
            for p in live:
                if p.returncode is None:
                    log.warning("front end pid %d did not stop within %.0fs: killed", p.pid, timeout)
                    with contextlib.suppress(ProcessLookupError):
                        p.kill()
            await asyncio.gather(*(p.wait() for p in live))
        for q in self.procs:
            if q is not None and q.stdin is not None:
                q.stdin.close()
        for sock in self._reserved:
            sock.close()
        self._reserved = []


class WorkerServer:
    """The engine core with N front-end processes in front of it (module docstring)."""

    def __init__(self, engine: Any, settings: ServerSettings, workers: int, *, grpc_port: int | None = None,
                 grpc_required: bool = True, log_level: str = "INFO"):
        if workers < 1:
            raise ValueError(f"workers: expected at least 1, got {workers}")
        self.engine = engine
        self.settings = settings
        self.workers = workers
        self.grpc_port_setting = grpc_port
        self.grpc_required = grpc_required  # False: a port that cannot be bound is a warning, not a failure
        self.log_level = log_level
        self.port: int | None = None
        self.grpc_port: int | None = None
        self.token_file: Any = None
        self.core: CoreServer | None = None
        self.control: Server | None = None
        self.frontends: FrontEnds | None = None
        self._dir: str | None = None

    async def start(self) -> None:
        s = self.settings
        self._dir = rundir.make_run_dir()  # 0700: only this user reaches the core
        try:
            address = f"ipc://{self._dir}/engine" if s.ipc == "zmq" else f"unix://{self._dir}/engine.sock"
            self.core = CoreServer(self.engine, address, s.ipc_spin_us)
            await self.core.start()
            control = os.path.join(self._dir, "control.sock")
            counts = os.path.join(self._dir, "metrics")  # the front ends' counters (prometheus multiprocess files)
            os.mkdir(counts)
            self.control = Server(self.engine, dataclasses.replace(s, unix_path=control, token_dir=None,
                                                                   frontends_metrics_dir=counts))
            await self.control.start()
            self.frontends = FrontEnds(self.workers, s, self.core.address, {"control": control}, counts, self._event,
                                       grpc_port=self.grpc_port_setting, grpc_required=self.grpc_required,
                                       log_level=self.log_level)
            await self.frontends.start()
            self.port, self.grpc_port = self.frontends.port, self.frontends.grpc_port
        except BaseException:
            await self.stop()
            raise
        if s.token is not None and s.token_dir is not None and self.port is not None:
            self.token_file = tokenfile.write_token(s.token_dir, self.port, s.token)
        log.info("listening on http://%s:%s with %d front-end processes (pids %s)%s", s.host, self.port,
                 self.workers, " ".join(map(str, self.frontends.pids)),
                 f"; gRPC on {s.host}:{self.grpc_port}" if self.grpc_port is not None else "")

    def _event(self, kind: str, message: str, level: str) -> None:
        self.engine.events.publish(kind, message, level=level)  # --serve logs every engine event

    @property
    def url(self) -> str:
        return http_url(self.settings.host, self.port)

    async def stop(self) -> None:
        if self.frontends is not None:
            await self.frontends.stop()
            self.frontends = None
        if self.control is not None:
            await self.control.stop()
            self.control = None
        if self.core is not None:
            await self.core.close()
            self.core = None
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None
