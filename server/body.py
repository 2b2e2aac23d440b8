"""Reading a request body within bounds: size, inflation, and time.

A body is the one thing a client fully controls, so reading it is bounded
three ways, each answered with a clear status on a connection that is then
closed (its parser cannot know where the next request would start, and
reading the rest just to skip it is the work an attacker wants us to do):

* **size** — at most ``max_body_bytes`` after decoding (413);
* **inflation** — a compressed body may inflate at most ``max_inflation``
  times the compressed bytes consumed so far, once past ``INFLATION_FLOOR``
  (413): a 2 MiB gzip of zeros would otherwise cost 2 GiB of decompression.
  The server decodes bodies itself (aiohttp's ``auto_decompress`` is off:
  it counts the bytes it was given, not the ones it consumed, so a ratio
  judged on its figures lets a bomb inflate to the size limit first), in
  pieces of at most ``PIECE`` bytes with the event loop free between them,
  so no request waits behind one body's inflation.  What is left of a
  refused body is dropped unparsed (``connections.py``);
* **time** — the whole body within ``body_timeout_s`` (408): a client that
  sends half a body and waits does not hold a connection and a file
  descriptor forever.  (Request heads have their own deadline: see
  ``HeadTimeout`` in app.py.)
"""

from __future__ import annotations

import asyncio
import zlib
from collections.abc import Iterator

from aiohttp import web

# Below this much decoded data no ratio is judged: small bodies of zeros compress absurdly well.
INFLATION_FLOOR = 64 << 10
PIECE = 64 << 10  # the most one decompression step produces before the loop gets a turn

try:
    import brotli  # aiohttp's own optional dependency for Content-Encoding: br
except ImportError:  # pragma: no cover - depends on the environment
    brotli = None

CODINGS = ("gzip", "deflate", *(("br",) if brotli is not None else ()))


class BodyError(Exception):
    """The body broke a bound; ``status`` and ``message`` are the answer (connection closed)."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


async def read_body(request: web.Request, max_bytes: int, max_inflation: float, timeout_s: float) -> bytes:
    """The decoded body, or BodyError (413 too large or too inflated, 408 too slow, 400 not valid
    data of its coding)."""
    coding = request.headers.get("Content-Encoding", "identity").strip().lower()
    if coding == "identity" and request.content.is_eof():
        return await _plain(request, max_bytes)  # all of it has arrived: no wait, no timer needed
    try:
        async with asyncio.timeout(timeout_s):
            if coding == "identity":
                return await _plain(request, max_bytes)
            return await _inflated(request, coding, max_bytes, max_inflation)
    except TimeoutError:
        raise BodyError(408, f"the request body did not arrive within {timeout_s:g} s "
                             "([server] body_timeout_s)") from None


async def _plain(request: web.Request, max_bytes: int) -> bytes:
    length = request.content_length
    if length is not None and length > max_bytes:  # refused before reading a byte
        raise _too_large(max_bytes)
    try:
        return await request.read()  # aiohttp stops at client_max_size (= max_bytes) too
    except web.HTTPRequestEntityTooLarge:
        raise _too_large(max_bytes) from None


async def _inflated(request: web.Request, coding: str, max_bytes: int, max_inflation: float) -> bytes:
    decoder = _decoder(coding)
    parts: list[bytes] = []
    total = 0
    async for chunk in request.content.iter_any():
        for piece in decoder.feed(chunk):
            total += len(piece)
            if total > max_bytes:
                raise _too_large(max_bytes, decoded=True)
            consumed = max(1, decoder.consumed)
            if total >= INFLATION_FLOOR and total > max_inflation * consumed:
                raise BodyError(413, f"request body inflates more than {max_inflation:g} times its compressed "
                                     f"size ({total} bytes from {consumed} so far; [server] max_inflation_ratio)")
            parts.append(piece)
            await asyncio.sleep(0)  # other requests run between pieces
    decoder.finish()
    return b"".join(parts)


class _Zlib:
    """gzip (members may follow each other) or deflate (zlib-wrapped, or raw as some clients send it)."""

    def __init__(self, coding: str):
        self.coding = coding
        self.consumed = 0
        self._d: zlib._Decompress | None = None

    def _new(self, first: int) -> zlib._Decompress:
        if self.coding == "gzip":
            return zlib.decompressobj(16 + zlib.MAX_WBITS)
        # RFC 1950: a zlib stream's first byte has compression method 8 in its low bits
        return zlib.decompressobj(zlib.MAX_WBITS if first & 0x0F == 8 else -zlib.MAX_WBITS)

    def feed(self, data: bytes) -> Iterator[bytes]:
        while data:
            if self._d is None or (self._d.eof and self.coding == "gzip"):
                self._d = self._new(data[0])  # the first stream, or the next gzip member
            elif self._d.eof:
                raise _invalid(self.coding, "data after the end of the stream")
            d = self._d
            try:
                out = d.decompress(data, PIECE)
                rest = d.unconsumed_tail or d.unused_data
                self.consumed += len(data) - len(rest)
                data = rest
                if out:
                    yield out
                while not data and len(out) == PIECE and not d.eof:  # output still pending inside zlib
                    out = d.decompress(b"", PIECE)
                    if out:
                        yield out
            except zlib.error:
                raise _invalid(self.coding) from None

    def finish(self) -> None:
        if self._d is None or not self._d.eof:
            raise _invalid(self.coding, "the stream ends early")


class _Brotli:
    def __init__(self) -> None:
        self.consumed = 0
        self._d = brotli.Decompressor()

    def feed(self, data: bytes) -> Iterator[bytes]:
        try:
            self.consumed += len(data)  # brotli keeps what it has not used: an upper bound
            out = self._d.process(data, output_buffer_limit=PIECE)
            while True:
                if out:
                    yield out
                if self._d.can_accept_more_data():
                    return
                out = self._d.process(b"", output_buffer_limit=PIECE)
        except brotli.error:
            raise _invalid("br") from None

    def finish(self) -> None:
        if not self._d.is_finished():
            raise _invalid("br", "the stream ends early")


def _decoder(coding: str) -> _Zlib | _Brotli:
    if coding in ("gzip", "deflate"):
        return _Zlib(coding)
    if coding == "br" and brotli is not None:
        return _Brotli()
    raise BodyError(415, f"Content-Encoding: {coding!r} is not supported")  # the guard checked it already


def _invalid(coding: str, why: str | None = None) -> BodyError:
    detail = f" ({why})" if why else ""
    return BodyError(400, f"cannot decode the request body: invalid {coding} data{detail} (Content-Encoding: {coding})")


def _too_large(max_bytes: int, decoded: bool = False) -> BodyError:
    what = "decoded request body" if decoded else "request body"
    return BodyError(413, f"{what} too large: the limit is {max_bytes} bytes ([server] max_body_mib)")
