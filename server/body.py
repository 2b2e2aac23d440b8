"""Reading a request body within bounds: size, inflation, and time.

A body is the one thing a client fully controls, so reading it is bounded
three ways, each answered with a clear status on a connection that is then
closed (its parser cannot know where the next request would start, and
reading the rest just to skip it is the work an attacker wants us to do):

* **size** — at most ``max_body_bytes`` after decoding (413);
* **inflation** — a compressed body may inflate at most ``max_inflation``
  times its compressed size once past ``INFLATION_FLOOR`` (413): a 2 MiB
  gzip of zeros would otherwise cost 2 GiB of decompression.  aiohttp
  inflates a chunk at a time as we read (never the whole body in one piece),
  so stopping the read stops the inflation; the server runs with
  ``lingering_time=0`` so aiohttp does not read (and inflate) the rest of an
  abandoned body after the answer either;
* **time** — the whole body within ``body_timeout_s`` (408): a client that
  sends half a body and waits does not hold a connection and a file
  descriptor forever.  (Request heads have their own deadline: see
  ``HeadTimeout`` in app.py.)
"""

from __future__ import annotations

import asyncio

from aiohttp import web

# Below this much decoded data no ratio is judged: small bodies of zeros compress absurdly well.
INFLATION_FLOOR = 1 << 20


class BodyError(Exception):
    """The body broke a bound; ``status`` and ``message`` are the answer (connection closed)."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


async def read_body(request: web.Request, max_bytes: int, max_inflation: float, timeout_s: float) -> bytes:
    """The decoded body, or BodyError (413 too large or too inflated, 408 too slow)."""
    try:
        async with asyncio.timeout(timeout_s):
            if "Content-Encoding" not in request.headers:
                return await _plain(request, max_bytes)
            return await _inflated(request, max_bytes, max_inflation)
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


async def _inflated(request: web.Request, max_bytes: int, max_inflation: float) -> bytes:
    content = request.content
    parts: list[bytes] = []
    total = 0
    while True:
        chunk = await content.readany()
        if not chunk:
            break
        total += len(chunk)
        if total > max_bytes:
            raise _too_large(max_bytes, decoded=True)
        compressed = max(1, getattr(content, "total_compressed_bytes", None) or 1)
        if total > INFLATION_FLOOR and total > max_inflation * compressed:
            raise BodyError(413, f"request body inflates more than {max_inflation:g} times its compressed size "
                                 f"({total} bytes from {compressed} so far; [server] max_inflation_ratio)")
        parts.append(chunk)
    return b"".join(parts)


def _too_large(max_bytes: int, decoded: bool = False) -> BodyError:
    what = "decoded request body" if decoded else "request body"
    return BodyError(413, f"{what} too large: the limit is {max_bytes} bytes ([server] max_body_mib)")
