"""Resource limits over real sockets: bodies that inflate, bodies and heads that never finish,
and a graceful shutdown that answers every request sent on a kept-alive connection.

Each case waits on what the server does (an answer, a closed socket), never on a clock: the
timeouts are set short in the server's settings, and the test's own socket timeout only turns
a server that never acts into a failure instead of a hang.
"""

from __future__ import annotations

import http.client
import json
import signal
import socket
import threading
import zlib

import pytest
from serverutil import ServerThread
from test_server import serving, tiny_json

from modelconsole.server.web import ServerSettings

FAIL_AFTER = 30.0  # a socket read this long means the server never acted: a failure, not a wait


def gzip_of_zeros(inflated: int, chunk: int = 1 << 20) -> bytes:
    """A gzip stream of ``inflated`` zero bytes, built a chunk at a time (~1000:1)."""
    c = zlib.compressobj(9, zlib.DEFLATED, 31)
    zeros = bytes(chunk)
    out = [c.compress(zeros) for _ in range(inflated // chunk)]
    out.append(c.flush())
    return b"".join(out)


@pytest.fixture(scope="module")
def srv(tmp_path_factory):
    settings = ServerSettings(port=0, body_timeout_s=0.5, head_timeout_s=0.5, keepalive_timeout_s=0.5,
                              max_body_bytes=8 << 20)
    with ServerThread(tmp_path_factory.mktemp("limits"), settings=settings) as s:
        yield s


def _connect(srv) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", srv.server.port), timeout=FAIL_AFTER)
    return sock


def _read_all(sock: socket.socket) -> bytes:
    """Everything the server sends until it closes the connection."""
    out = b""
    while True:
        data = sock.recv(65536)
        if not data:
            return out
        out += data


def _status(raw: bytes) -> int:
    return int(raw.split(b" ", 2)[1])


def test_a_gzip_bomb_is_refused_and_its_connection_closed(srv):
    bomb = gzip_of_zeros(256 << 20)  # 256 MiB of zeros in ~256 KiB
    assert len(bomb) < 1 << 20
    sock = _connect(srv)
    head = (f"POST /v2/models/tiny/infer HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            f"Content-Encoding: gzip\r\nContent-Length: {len(bomb)}\r\n\r\n").encode()
    sender = threading.Thread(target=lambda: _send_quietly(sock, head + bomb), daemon=True)
    sender.start()
    raw = _read_all(sock)  # the answer, then EOF: the server does not read (or inflate) the rest
    sock.close()
    assert _status(raw) == 413, raw[:300]
    assert b"connection: close" in raw.lower()
    body = json.loads(raw.split(b"\r\n\r\n", 1)[1])
    assert "inflates more than" in body["error"] or "too large" in body["error"]
    # the server is fine: the next client is answered
    c = http.client.HTTPConnection("127.0.0.1", srv.server.port, timeout=FAIL_AFTER)
    c.request("POST", "/v2/models/tiny/infer", json.dumps(tiny_json()), {"Content-Type": "application/json"})
    assert c.getresponse().status == 200


def test_a_plain_body_over_the_limit_is_refused_before_it_is_read(srv):
    sock = _connect(srv)
    sock.sendall(b"POST /v2/models/tiny/infer HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: %d\r\n\r\n" % (64 << 20))
    raw = _read_all(sock)  # no body sent at all: the declared length alone is refused
    sock.close()
    assert _status(raw) == 413 and b"too large" in raw


def test_a_modestly_compressed_body_is_served(srv):
    """The ratio cap leaves ordinary gzip alone."""
    body = json.dumps({"inputs": [{"name": "input", "shape": [16, 64], "datatype": "FP32",
                                   "data": [i / 1024 for i in range(16 * 64)]}]}).encode()
    gz = zlib.compress(body, 6, wbits=31)
    c = http.client.HTTPConnection("127.0.0.1", srv.server.port, timeout=FAIL_AFTER)
    c.request("POST", "/v2/models/tiny/infer", gz, {"Content-Type": "application/json", "Content-Encoding": "gzip"})
    r = c.getresponse()
    assert r.status == 200, r.read()[:300]


def _send_quietly(sock: socket.socket, data: bytes) -> None:
    try:
        sock.sendall(data)
    except OSError:
        pass  # the server closed the connection: what the test expects


def test_half_a_body_gets_408_and_the_connection_closes(srv):
    sock = _connect(srv)
    sock.sendall(b"POST /v2/models/tiny/infer HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                 b"Content-Length: 1000\r\n\r\n{\"inputs\": [")
    raw = _read_all(sock)  # the server answers by itself once body_timeout_s has passed
    sock.close()
    assert _status(raw) == 408, raw[:300]
    assert b"body_timeout_s" in raw


def test_half_a_head_is_closed(srv):
    sock = _connect(srv)
    sock.sendall(b"POST /v2/models/tiny/infer HTTP/1.1\r\nHost: 127.0.0.1\r\n")
    assert _read_all(sock) == b""  # closed by the server (head_timeout_s), nothing answered
    sock.close()


def test_half_a_head_on_a_kept_alive_connection_is_closed(srv):
    c = http.client.HTTPConnection("127.0.0.1", srv.server.port, timeout=FAIL_AFTER)
    c.request("GET", "/v2/health/ready")
    r = c.getresponse()
    r.read()
    assert r.status == 200
    c.sock.sendall(b"GET /v2/health/ready HTTP/1.1\r\n")  # keepalive_timeout_s bounds this one
    assert c.sock.recv(100) == b""
    c.close()


# ------------------------------------------------------------------ graceful shutdown on kept-alive connections


def test_sigterm_answers_every_request_sent_on_a_kept_alive_connection(tmp_path):
    """32 clients each reuse one connection in a loop; SIGTERM lands mid-stream.  Every request
    written gets an answer (200, or 503 with Connection: close); what fails is only a new
    connection being refused, before any request is sent on it."""
    n_clients = 32
    config = '[[models]]\nname = "tiny"\nsource = "zoo:tiny-mlp"\nmax_batch_size = 32\n'
    with serving(tmp_path, config) as s:
        ready = threading.Barrier(n_clients + 1)
        results: list[dict[str, int]] = [dict(ok=0, unavailable=0, other=0, lost=0, refused=0)
                                         for _ in range(n_clients)]
        body = json.dumps(tiny_json())

        def client(i: int) -> None:
            r = results[i]
            conn = http.client.HTTPConnection("127.0.0.1", s.port, timeout=60)
            first = True
            while True:
                try:
                    conn.connect() if conn.sock is None else None
                except OSError:
                    r["refused"] += 1  # the listener is closed: nothing was sent
                    return
                try:
                    conn.request("POST", "/v2/models/tiny/infer", body, {"Content-Type": "application/json"})
                except OSError:
                    r["lost"] += 1  # the connection broke while the request was being written
                    return
                try:
                    resp = conn.getresponse()
                    resp.read()
                except (http.client.RemoteDisconnected, ConnectionError, http.client.BadStatusLine):
                    r["lost"] += 1  # written, never answered
                    return
                key = "ok" if resp.status == 200 else "unavailable" if resp.status == 503 else "other"
                r[key] += 1
                if first:
                    first = False
                    ready.wait(60)
                if resp.will_close:
                    conn.close()

        threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(n_clients)]
        for t in threads:
            t.start()
        ready.wait(60)  # every client has a kept-alive connection and traffic is flowing
        s.proc.send_signal(signal.SIGTERM)
        for t in threads:
            t.join(90)
        assert s.proc.wait(60) == 0
    lost = sum(r["lost"] for r in results)
    assert lost == 0, results
    assert all(r["other"] == 0 for r in results), results
    assert all(r["refused"] == 1 for r in results), results  # each ended at the closed listener


# ------------------------------------------------------------------ the decoder itself


@pytest.mark.parametrize("coding", ["gzip", "deflate", "deflate-raw", "gzip-members", "br"])
def test_compressed_bodies_decode_exactly_in_pieces(coding):
    """Whatever the chunking on the wire, the pieces join to the original, none over PIECE."""
    import random

    from modelconsole.server import body as body_mod

    rnd = random.Random(0)
    original = json.dumps([rnd.random() for _ in range(120_000)]).encode()  # ~2.3 MiB, ~2:1
    if coding == "gzip":
        wire = zlib.compress(original, 6, wbits=31)
    elif coding == "deflate":
        wire = zlib.compress(original, 6)
    elif coding == "deflate-raw":  # what some clients send as "deflate"
        c = zlib.compressobj(6, zlib.DEFLATED, -15)
        wire = c.compress(original) + c.flush()
    elif coding == "gzip-members":  # concatenated members are one gzip body
        half = len(original) // 2
        wire = zlib.compress(original[:half], 6, wbits=31) + zlib.compress(original[half:], 6, wbits=31)
    else:
        brotli = pytest.importorskip("brotli")
        wire = brotli.compress(original)
    name = {"deflate-raw": "deflate", "gzip-members": "gzip"}.get(coding, coding)
    decoder = body_mod._decoder(name)
    pieces = []
    for i in range(0, len(wire), 7919):  # an odd chunk size: boundaries anywhere
        pieces += list(decoder.feed(wire[i:i + 7919]))
    decoder.finish()
    assert b"".join(pieces) == original
    assert max(len(p) for p in pieces) <= body_mod.PIECE
    assert 0 < decoder.consumed <= len(wire)


def test_a_truncated_stream_is_invalid():
    from modelconsole.server import body as body_mod

    wire = zlib.compress(b"x" * 100_000, 6, wbits=31)
    decoder = body_mod._decoder("gzip")
    list(decoder.feed(wire[: len(wire) // 2]))
    with pytest.raises(body_mod.BodyError, match="ends early"):
        decoder.finish()
