"""What happens on a connection before and after aiohttp's parser: head deadlines and lingering close.

``ConnectionGuard`` sits between the socket and aiohttp's protocol for every
connection the server accepts:

* **head deadline** — a connection whose first request head has not
  arrived within ``head_timeout_s`` is closed.  aiohttp's keep-alive timer
  only starts after a first answer (and then also covers the heads that
  follow), so without this a client that sends a few bytes of headers holds
  a connection and a file descriptor forever.
* **lingering close without parsing** — when a request's body is refused
  part-way (too large, inflating too much: body.py), the rest of it must not
  reach the parser, which would inflate it.  Nor may the socket simply close
  with the client's bytes still arriving: the kernel then answers with a
  reset, which can destroy our 413 before the client reads it.  So the guard
  drops every further byte, and aiohttp's close becomes a half-close (FIN
  after the answer) followed by the real close when the client closes, or
  after ``LINGER_S`` / ``LINGER_BYTES``.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any, cast

_log = logging.getLogger("modelconsole.server")

LINGER_S = 2.0  # how long a refused body's bytes are read and dropped before the socket closes
LINGER_BYTES = 64 << 20  # and at most this many


class _Transport:
    """The socket's transport as aiohttp sees it: the same, but ``close`` may linger."""

    def __init__(self, transport: asyncio.Transport, guard: ConnectionGuard):
        self._transport = transport
        self.connection_guard = guard
        # bound once: aiohttp's hot path calls these directly, no __getattr__ on each write
        self.write = transport.write
        self.writelines = transport.writelines
        self.is_closing = transport.is_closing
        self.get_extra_info = transport.get_extra_info
        self.pause_reading = transport.pause_reading
        self.resume_reading = transport.resume_reading
        self.get_write_buffer_size = transport.get_write_buffer_size
        self.abort = transport.abort

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)

    def close(self) -> None:
        self.connection_guard.close()


class ConnectionGuard(asyncio.Protocol):
    def __init__(self, inner: Any, head_timeout_s: float, loop: asyncio.AbstractEventLoop):
        self._inner = inner
        self._head_timeout_s = head_timeout_s
        self._loop = loop
        self._transport: asyncio.Transport | None = None
        self._head_timer: asyncio.TimerHandle | None = None
        self._tail = b""
        self._discarding = False
        self._discarded = 0
        self._linger_timer: asyncio.TimerHandle | None = None

    # ------------------------------------------------------------ asyncio.Protocol

    def connection_made(self, transport: Any) -> None:
        self._transport = transport
        self._head_timer = self._loop.call_later(self._head_timeout_s, self._head_expired)
        self._inner.connection_made(_Transport(transport, self))

    def data_received(self, data: bytes) -> None:
        if self._discarding:
            self._discarded += len(data)
            if self._discarded > LINGER_BYTES:
                self._close_now()
            return
        if self._head_timer is not None:
            seen = self._tail + data
            if b"\r\n\r\n" in seen:
                self._head_timer.cancel()
                self._head_timer = None
                self._tail = b""
            else:
                self._tail = seen[-3:]
        self._inner.data_received(data)

    def eof_received(self) -> bool | None:
        if self._discarding:
            self._close_now()  # the client is done sending: nothing left to reset
            return None
        return self._inner.eof_received()

    def connection_lost(self, exc: Exception | None) -> None:
        for timer in (self._head_timer, self._linger_timer):
            if timer is not None:
                timer.cancel()
        self._head_timer = self._linger_timer = None
        self._transport = None
        self._inner.connection_lost(exc)

    def pause_writing(self) -> None:
        self._inner.pause_writing()

    def resume_writing(self) -> None:
        self._inner.resume_writing()

    # ------------------------------------------------------------ for the server

    def discard_rest(self) -> None:
        """From now on, drop what the client sends (a refused body); closing lingers."""
        self._discarding = True

    def close(self) -> None:
        """aiohttp's close: at once, or (discarding) a half-close now and the close later."""
        t = self._transport
        if t is None or t.is_closing():
            return
        if not self._discarding or not t.can_write_eof():
            t.close()
            return
        if self._linger_timer is None:
            t.write_eof()  # our answer, then FIN; the client's remaining bytes are read and dropped
            self._linger_timer = self._loop.call_later(LINGER_S, self._close_now)

    # ------------------------------------------------------------ internals

    def _head_expired(self) -> None:
        self._head_timer = None
        self._close_now()

    def _close_now(self) -> None:
        t = self._transport
        if t is not None and not t.is_closing():
            t.close()


def _parse_error_text(exc: BaseException | None) -> str:
    """What a malformed request is told: the kind of mistake, never the bytes it sent (an
    oversized header's text would otherwise come back, Authorization included)."""
    from aiohttp import http_exceptions as hx

    if isinstance(exc, hx.LineTooLong):
        return "malformed HTTP request: the request line or a header is too long (at most 8190 bytes each)"
    if isinstance(exc, hx.BadHttpMethod):
        return "malformed HTTP request: not an HTTP method"
    if isinstance(exc, hx.InvalidURLError):
        return "malformed HTTP request: the request target is not a valid URL"
    if isinstance(exc, hx.InvalidHeader):
        return "malformed HTTP request: a header is invalid"
    if isinstance(exc, hx.TransferEncodingError | hx.ContentLengthError):
        return "malformed HTTP request: the body's length or transfer encoding is invalid"
    return "malformed HTTP request"


_QUIET: dict[type, type] = {}


def _quiet_class(base: type) -> type:
    """``base`` (aiohttp's RequestHandler) with ``handle_error`` answering parse errors quietly.  It
    adds no slots, so a live handler can take it as its class."""
    cls = _QUIET.get(base)
    if cls is None:
        from aiohttp import web

        def handle_error(self: Any, request: Any, status: int = 500, exc: BaseException | None = None,
                         message: str | None = None) -> Any:
            if status >= 500 or exc is None:
                return cast(Any, base).handle_error(self, request, status, exc, message)
            text = _parse_error_text(exc)
            _log.info("refused a malformed request from %s: %s", request.remote, text)
            resp = web.json_response({"error": text}, status=status)
            resp.force_close()
            return resp

        cls = _QUIET[base] = type("QuietRequestHandler", (base,), {"__slots__": (), "handle_error": handle_error})
    return cls


def quiet_parse_errors(handler: Any) -> Any:
    """``handler`` (aiohttp's per-connection RequestHandler) answering a request its parser refused
    with ``{"error": ...}`` that names the kind of mistake and echoes nothing, logged on one line
    without the request's bytes.  Other errors (500s) keep aiohttp's own handling."""
    handler.__class__ = _quiet_class(type(handler))
    return handler
