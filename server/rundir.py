"""Private run folders (Unix sockets, the front ends' metric files) under the state directory.

A server with front ends or gRPC needs a folder only its user can enter for its
sockets.  It lives under the state directory (``$MODELCONSOLE_STATE_DIR``, else
``platformdirs.user_state_dir("modelconsole")``: ``~/.local/state/modelconsole``
on Linux), in ``run/PID-XXXX``, so a server killed with SIGKILL leaves its
folder where the next start finds it: every start removes the folders whose
process is gone.  A Unix socket's path may be at most 107 bytes; where the state
directory is too deep for that, the folder goes to the system's temporary
directory instead, named ``modelconsole-PID-XXXX`` and cleaned the same way.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shutil
import tempfile
from pathlib import Path

log = logging.getLogger("modelconsole.server")

_SOCKET_ROOM = 107 - len("/control.sock") - 16  # sun_path's limit, less the longest name and the folder's own
_OURS = re.compile(r"^(?:modelconsole-)?(\d+)-[A-Za-z0-9_]+$")


def state_dir() -> Path:
    override = os.environ.get("MODELCONSOLE_STATE_DIR")
    if override:
        return Path(override)
    import platformdirs

    return Path(platformdirs.user_state_dir("modelconsole", appauthor=False))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process: not ours to judge
    return True


def clean_stale(*roots: Path) -> list[Path]:
    """Remove the run folders under ``roots`` whose process is gone; the ones removed."""
    gone = []
    for root in roots:
        if not root.is_dir():
            continue
        for entry in root.iterdir():
            m = _OURS.match(entry.name)
            if m is None or not entry.is_dir() or (root == Path(tempfile.gettempdir())
                                                   and not entry.name.startswith("modelconsole-")):
                continue
            pid = int(m.group(1))
            if pid == os.getpid() or _alive(pid):
                continue
            with contextlib.suppress(OSError):
                if entry.stat().st_uid == os.getuid():
                    shutil.rmtree(entry)
                    gone.append(entry)
    if gone:
        log.info("removed %d run folder(s) left by servers that were killed: %s", len(gone),
                 ", ".join(str(g) for g in gone))
    return gone


def make_run_dir() -> str:
    """A new private folder (mode 0700) for this process's sockets, after removing stale ones."""
    run = state_dir() / "run"
    temp = Path(tempfile.gettempdir())
    clean_stale(run, temp)
    if len(str(run)) <= _SOCKET_ROOM:
        try:
            run.mkdir(parents=True, exist_ok=True, mode=0o700)
            return tempfile.mkdtemp(prefix=f"{os.getpid()}-", dir=run)
        except OSError as e:
            log.warning("run folder not made under %s (%s): using %s", run, e, temp)
    return tempfile.mkdtemp(prefix=f"modelconsole-{os.getpid()}-")
