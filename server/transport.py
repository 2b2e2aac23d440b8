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
import struct
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

log = logging.getLogger("modelconsole.server.transport")

OnServerMessage = Callable[[Any, list[Any]], None]  # (peer identity, frames)
OnMessage = Callable[[list[Any]], None]

_U32 = struct.Struct("<I")
MAX_FRAMES = 1 << 16  # more frames than this in one record is not a message of ours: the connection closes


class KeepAwake:
    """Keeps an event loop polling instead of sleeping, for a bounded moment.

    Waking an idle process costs the kernel's wake-up and the CPU's way out of a
    deep idle state, paid twice per request through a front end (the core on the
    call, the front end on the answer) when requests come one at a time.  A loop
    that expects a message very soon stays awake instead: while ``extend``'s
    deadline is ahead, a callback re-queues itself every iteration, so the loop
    polls its sockets (all of them, the worker threads' wake-ups too) without
    blocking, and finds the message the moment it lands.  Costs a busy core for at
    most the budget after each ``extend``; nothing is delayed by it."""

    def __init__(self, budget_s: float):
        self.budget_s = budget_s
        self.until = 0.0
        self.active = False
        self._loop: asyncio.AbstractEventLoop | None = None

    def extend(self) -> None:
        if self.budget_s <= 0:
            return
        self.until = time.perf_counter() + self.budget_s
        if not self.active:
            self.active = True
            self._loop = asyncio.get_running_loop()
            self._loop.call_soon(self._tick)

    def _tick(self) -> None:
        if time.perf_counter() < self.until and self._loop is not None:
            self._loop.call_soon(self._tick)
        else:
            self.active = False


def _record(frames: Sequence[Any]) -> list[Any]:
    """A message as one record: [count][length...][frames...], little-endian u32s."""
    sizes = [memoryview(f).nbytes for f in frames]
    head = struct.pack(f"<I{len(frames)}I", len(frames), *sizes)
    return [head, *frames]


FRAME_ALIGNMENT = 64  # tensors.ALIGNMENT: a tensor read from a frame needs no copy to be aligned


def _aligned_frames(buf: bytearray, start: int, sizes: Sequence[int]) -> list[memoryview]:
    """The frames of one record, copied once (as one message needs) into one writable buffer
    where each starts at a 64-byte boundary, so the engine takes the tensors as they are
    (``tensors.to_tensor`` would otherwise copy each misaligned input on the core's loop)."""
    spans = [(n + FRAME_ALIGNMENT - 1) & -FRAME_ALIGNMENT for n in sizes]
    block = np.empty(sum(spans) + FRAME_ALIGNMENT, np.uint8)
    skip = -block.ctypes.data % FRAME_ALIGNMENT
    out = memoryview(block.data)[skip:]
    frames = []
    at, src = 0, start
    with memoryview(buf) as whole:  # released before the caller trims buf
        for size, span in zip(sizes, spans):
            out[at:at + size] = whole[src:src + size]
            frames.append(out[at:at + size])
            at += span
            src += size
    return frames


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
            frames = _aligned_frames(buf, pos + table, sizes)
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


class UnixServerEnd:
    def __init__(self, path: str, on_message: OnServerMessage):
        self.path = path
        self.on_message = on_message
        self._server: asyncio.AbstractServer | None = None
        self.peers: set[_Records] = set()

    async def start(self) -> None:
        def factory() -> _Records:
            proto: _Records

            def lost() -> None:
                self.peers.discard(proto)

            proto = _Records(lambda frames: self.on_message(proto, frames), lost)
            self.peers.add(proto)
            return proto

        self._server = await asyncio.get_running_loop().create_unix_server(factory, self.path)

    def send(self, peer: _Records, frames: Sequence[Any]) -> None:
        peer.send(frames)

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

    async def start(self) -> None:
        await asyncio.get_running_loop().create_unix_connection(lambda: self.proto, self.path)

    def send(self, frames: Sequence[Any]) -> None:
        self.proto.send(frames)

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
