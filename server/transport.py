"""How ``ipc.py``'s messages (lists of frames) travel between front ends and the engine core.

Two transports, chosen by the address (``[server] ipc``):

* ``unix://PATH`` — a Unix stream socket driven by the event loops themselves
  (uvloop where installed).  A message is one length-prefixed record written
  with one ``writelines`` (the frames go out from their own memory in one
  ``writev``); the reader's loop wakes on the socket directly.
* ``ipc://PATH`` — ZeroMQ (pyzmq) DEALER/ROUTER over its ``ipc`` transport.
  ZeroMQ hands every message to its own I/O thread and wakes the peer's loop
  through another; measured on the engine core (docs/benchmarks.md), those
  sends were a third of its busy time and the hops added latency at c=1.

Both ends keep message boundaries and order; ``on_message`` gets the frames
as buffers (memoryviews or zmq frames, read without copying).  A server end
knows each peer by an opaque identity and answers to it; a peer that went
away is forgotten and what is sent to it dropped.
"""

from __future__ import annotations

import asyncio
import logging
import select
import struct
import time
from collections.abc import Callable, Sequence
from typing import Any

log = logging.getLogger("modelconsole.server.transport")

OnServerMessage = Callable[[Any, list[Any]], None]  # (peer identity, frames)
OnMessage = Callable[[list[Any]], None]

_U32 = struct.Struct("<I")
MAX_FRAMES = 1 << 16  # more frames than this in one record is not a message of ours: the connection closes


def spin_until_readable(poller: select.poll, budget_s: float) -> bool:
    """Poll (never sleep) for up to ``budget_s`` until a registered socket is readable.

    Waking an idle event loop costs the kernel's wake-up and the core's way out of a
    deep idle state, paid twice per request through a front end (core, then front end)
    when requests come one at a time.  A loop that expects a message very soon keeps
    its core busy for a bounded moment instead: the loop's next poll then finds the
    message without sleeping.  Bounded by ``budget_s``; returns whether one arrived."""
    end = time.perf_counter() + budget_s
    while True:
        if poller.poll(0):
            return True
        if time.perf_counter() >= end:
            return False


def _record(frames: Sequence[Any]) -> list[Any]:
    """A message as one record: [count][length...][frames...], little-endian u32s."""
    sizes = [memoryview(f).nbytes for f in frames]
    head = struct.pack(f"<I{len(frames)}I", len(frames), *sizes)
    return [head, *frames]


class _Records(asyncio.Protocol):
    """Length-prefixed records in, a list of frame views out (one per complete record)."""

    def __init__(self, on_message: OnMessage, on_lost: Callable[[], None]):
        self.on_message = on_message
        self.on_lost = on_lost
        self.transport: asyncio.Transport | None = None
        self._buf = bytearray()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        buf = self._buf
        buf += data
        pos = 0
        n = len(buf)
        while n - pos >= 4:
            (count,) = _U32.unpack_from(buf, pos)
            if count > MAX_FRAMES:
                log.warning("a record of %d frames on the IPC socket: not ours; closing that connection", count)
                buf.clear()
                if self.transport is not None:
                    self.transport.close()
                return
            table = 4 + 4 * count
            if n - pos < table:
                break
            sizes = struct.unpack_from(f"<{count}I", buf, pos + 4)
            end = pos + table + sum(sizes)
            if n < end:
                break
            # one copy per message, writable (a bytearray): tensors read from it need no second copy
            # before torch takes them (tensors.to_tensor copies read-only arrays)
            view = memoryview(buf[pos + table:end])
            frames = []
            at = 0
            for size in sizes:
                frames.append(view[at:at + size])
                at += size
            pos = end
            try:
                self.on_message(frames)
            except Exception:  # noqa: BLE001 - the stream stays in step; the handler logs its own
                log.exception("message handler failed")
        if pos:
            del buf[:pos]

    def connection_lost(self, exc: Exception | None) -> None:
        self.on_lost()

    def send(self, frames: Sequence[Any]) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.writelines(_record(frames))

    def fileno(self) -> int | None:
        sock = self.transport.get_extra_info("socket") if self.transport is not None else None
        return sock.fileno() if sock is not None else None


class UnixServerEnd:
    def __init__(self, path: str, on_message: OnServerMessage):
        self.path = path
        self.on_message = on_message
        self._server: asyncio.AbstractServer | None = None
        self.peers: set[_Records] = set()
        self._poller: select.poll | None = None  # every peer's socket, for spin()

    async def start(self) -> None:
        def factory() -> _Records:
            proto: _Records

            def lost() -> None:
                self.peers.discard(proto)
                self._poller = None

            proto = _Records(lambda frames: self.on_message(proto, frames), lost)
            self.peers.add(proto)
            self._poller = None
            return proto

        self._server = await asyncio.get_running_loop().create_unix_server(factory, self.path)

    def send(self, peer: _Records, frames: Sequence[Any]) -> None:
        peer.send(frames)

    def spin(self, budget_s: float) -> bool:
        """``spin_until_readable`` on every peer's socket."""
        if self._poller is None:
            self._poller = select.poll()
            for peer in self.peers:
                fd = peer.fileno()
                if fd is not None:
                    self._poller.register(fd, select.POLLIN)
        return spin_until_readable(self._poller, budget_s)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for peer in list(self.peers):
            if peer.transport is not None:
                peer.transport.close()


class UnixClientEnd:
    def __init__(self, path: str, on_message: OnMessage, on_lost: Callable[[], None]):
        self.path = path
        self.proto = _Records(on_message, on_lost)
        self._poller: select.poll | None = None

    async def start(self) -> None:
        await asyncio.get_running_loop().create_unix_connection(lambda: self.proto, self.path)
        fd = self.proto.fileno()
        if fd is not None:
            self._poller = select.poll()
            self._poller.register(fd, select.POLLIN)

    def send(self, frames: Sequence[Any]) -> None:
        self.proto.send(frames)

    def spin(self, budget_s: float) -> bool:
        """``spin_until_readable`` on the socket to the core."""
        return self._poller is not None and spin_until_readable(self._poller, budget_s)

    async def close(self) -> None:
        if self.proto.transport is not None:
            self.proto.transport.close()


class _ZmqEnd:
    """A ZeroMQ socket read by a task of the loop; the two ends differ in kind and delivery."""

    def __init__(self, address: str, kind: str, bind: bool):
        import zmq
        import zmq.asyncio

        self.address = address
        self._bind = bind
        self._ctx = zmq.asyncio.Context()
        self._sock = self._ctx.socket(getattr(zmq, kind))
        for opt in (zmq.LINGER, zmq.SNDHWM, zmq.RCVHWM):
            self._sock.setsockopt(opt, 0)  # never drop, never block: the engine bounds its queues
        self._reader: asyncio.Task[None] | None = None

    async def start(self) -> None:
        (self._sock.bind if self._bind else self._sock.connect)(self.address)
        self._reader = asyncio.get_running_loop().create_task(self._read())

    async def _read(self) -> None:
        while True:
            frames = await self._sock.recv_multipart(copy=False)
            try:
                self._deliver(frames)
            except Exception:  # noqa: BLE001
                log.exception("message handler failed")

    def _deliver(self, frames: list[Any]) -> None:
        raise NotImplementedError

    def spin(self, budget_s: float) -> bool:
        return False  # ZeroMQ's own I/O thread wakes the loop: nothing to poll here

    async def close(self) -> None:
        if self._reader is not None:
            self._reader.cancel()
            await asyncio.gather(self._reader, return_exceptions=True)
        self._sock.close(0)
        self._ctx.term()


class ZmqServerEnd(_ZmqEnd):
    def __init__(self, address: str, on_message: OnServerMessage):
        super().__init__(address, "ROUTER", bind=True)
        self.on_message = on_message

    def _deliver(self, frames: list[Any]) -> None:
        if len(frames) >= 2:  # [peer identity, frames...]
            self.on_message(frames[0].bytes, [f.buffer for f in frames[1:]])

    def send(self, peer: bytes, frames: Sequence[Any]) -> None:
        self._sock.send_multipart([peer, *frames], copy=False)


class ZmqClientEnd(_ZmqEnd):
    def __init__(self, address: str, on_message: OnMessage, on_lost: Callable[[], None]):
        super().__init__(address, "DEALER", bind=False)  # ZeroMQ reconnects by itself: on_lost is not called
        self.on_message = on_message

    def _deliver(self, frames: list[Any]) -> None:
        self.on_message([f.buffer for f in frames])

    def send(self, frames: Sequence[Any]) -> None:
        self._sock.send_multipart(list(frames), copy=False)


def server_end(address: str, on_message: OnServerMessage) -> UnixServerEnd | ZmqServerEnd:
    if address.startswith("unix://"):
        return UnixServerEnd(address.removeprefix("unix://"), on_message)
    if address.startswith("ipc://"):
        return ZmqServerEnd(address, on_message)
    raise ValueError(f"IPC address: expected unix://PATH or ipc://PATH, got {address!r}")


def client_end(address: str, on_message: OnMessage, on_lost: Callable[[], None]) -> UnixClientEnd | ZmqClientEnd:
    if address.startswith("unix://"):
        return UnixClientEnd(address.removeprefix("unix://"), on_message, on_lost)
    if address.startswith("ipc://"):
        return ZmqClientEnd(address, on_message, on_lost)
    raise ValueError(f"IPC address: expected unix://PATH or ipc://PATH, got {address!r}")
