"""The control plane's token when the operator gave none: made at start, kept in a 0600 file.

Following Jupyter: a server on loopback with no ``--token`` makes a random
one, writes it to ``server-<port>.token`` beside the store (readable by its
owner only).  The file stays when the server stops, and the next start on
that port uses it again, so a console attached across a restart reconnects.
``--attach`` to a loopback URL reads that file by itself, so the operator
types nothing, and a web page in the operator's browser, which cannot read
files, cannot drive ``/api/``.
``--no-token`` turns the control plane's token off explicitly (loopback only).

No torch and no engine here: the attached console imports this.
"""

from __future__ import annotations

import ipaddress
import os
import secrets
from pathlib import Path


def is_loopback(host: str) -> bool:
    """127.0.0.1, ::1, localhost: only this machine can connect."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def new_token() -> str:
    return secrets.token_urlsafe(32)


def token_path(store_dir: str | Path, port: int) -> Path:
    return Path(store_dir) / f"server-{port}.token"


def write_token(store_dir: str | Path, port: int, token: str) -> Path:
    """Write the token with mode 0600 from the start (never world-readable, not even briefly)."""
    path = token_path(store_dir, port)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, token.encode() + b"\n")
    finally:
        os.close(fd)
    os.replace(tmp, path)
    return path


def read_token(store_dir: str | Path, port: int) -> str | None:
    """The token a local server wrote for ``port``; None when there is no such file (or it is
    readable by others than its owner: a file anyone could have written is not trusted)."""
    path = token_path(store_dir, port)
    try:
        st = path.stat()
        if st.st_mode & 0o077 or (hasattr(os, "getuid") and st.st_uid != os.getuid()):
            return None
        return path.read_text(encoding="utf-8").strip() or None
    except OSError:
        return None
