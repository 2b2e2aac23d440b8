"""A real modelconsole server on a loopback port, in a background thread, for HTTP tests.

The engine, its SQLite store and the aiohttp server run on their own event
loop in a thread, exactly as ``--serve`` runs them, so both blocking clients
(``tritonclient.http``, which uses gevent) and asyncio clients can talk to it.
``call`` runs a coroutine on the server's loop (to inspect or poke the engine
from the test thread without racing it).
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from modelconsole.scheduler.config import parse_config
from modelconsole.server.serve import make_server, start_engine
from modelconsole.server.web import ServerSettings

DATATYPES = ("BOOL", "UINT8", "UINT16", "UINT32", "UINT64", "INT8", "INT16", "INT32", "INT64",
             "FP16", "FP32", "FP64", "BYTES", "BF16")


def echo_model(datatype: str, width: int = 3) -> dict[str, Any]:
    """zoo:identity declared for one datatype: input "x" [-1, width] -> output "y" the same."""
    return {
        "name": f"echo_{datatype.lower()}",
        "source": "zoo:identity",
        "inputs": [{"name": "x", "datatype": datatype, "shape": [-1, width]}],
        "outputs": [{"name": "y", "datatype": datatype, "shape": [-1, width]}],
        "max_queue_delay_ms": 0,
        "warmup": 0,
    }


def default_models() -> list[dict[str, Any]]:
    return [
        {"name": "tiny", "source": "zoo:tiny-mlp", "max_queue_delay_ms": 1},
        {"name": "cached", "source": "zoo:tiny-mlp", "cache": True},
        *[echo_model(dt) for dt in DATATYPES],
    ]


class ServerThread:
    def __init__(self, tmp: Path, models: list[dict[str, Any]] | None = None,
                 settings: ServerSettings | None = None, extra: dict[str, Any] | None = None,
                 workers: int = 0, grpc_port: int | None = None):
        raw: dict[str, Any] = {"models": default_models() if models is None else models,
                               "gpu": {"simulate": "1x8GiB"}}
        raw.update(extra or {})
        self.config = parse_config(raw, str(tmp))
        self.store_path = str(tmp / "store.db")
        self.settings = settings or ServerSettings(port=0)
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="test-server", daemon=True)
        self.engine: Any = None
        self.server: Any = None  # a Server, or with workers a WorkerServer (front-end processes)
        self.workers = workers
        self.grpc_port = grpc_port

    def __enter__(self) -> ServerThread:
        self._thread.start()
        self.call(self._start)
        return self

    async def _start(self) -> None:
        self.engine = await start_engine(self.config, self.store_path)
        self.server = make_server(self.engine, self.settings, self.workers, self.grpc_port)
        await self.server.start()

    async def _stop(self) -> None:
        if self.server is not None:
            await self.server.stop()
        if self.engine is not None:
            await self.engine.close(drain_timeout=5.0)

    def __exit__(self, *exc: Any) -> None:
        try:
            self.call(self._stop, timeout=60)
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(10)
            self.loop.close()

    def call(self, fn: Callable[[], Awaitable[Any]], timeout: float = 60) -> Any:
        return asyncio.run_coroutine_threadsafe(fn(), self.loop).result(timeout)

    @property
    def url(self) -> str:
        assert self.server is not None
        return self.server.url

    @property
    def hostport(self) -> str:
        """What tritonclient wants: host:port without a scheme."""
        return self.url.removeprefix("http://")

    @property
    def grpc_hostport(self) -> str:
        assert self.server is not None and self.server.grpc_port is not None
        return f"127.0.0.1:{self.server.grpc_port}"
