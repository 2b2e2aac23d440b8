"""The ``modelconsole`` command.

* ``modelconsole [--config FILE] [--demo]``: the console with the engine and
  the HTTP server embedded (``console/run.py``);
* ``--attach URL``: the same console on a running ``--serve`` process;
* ``--serve``: the engine and the HTTP server, headless (``server/serve.py``);
* ``--check-config [FILE]``: validate a config and load every model once,
  like ``nginx -t``.

The engine is imported lazily so that ``--attach`` never loads torch.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import logging
import os
import re
import sys
import traceback
from typing import TYPE_CHECKING, Any

from . import __version__

if TYPE_CHECKING:
    from modelconsole.scheduler.config import Config
    from modelconsole.server.web import ServerSettings

LOG_FORMAT = "%(asctime)s %(levelname)-7s %(name)s: %(message)s"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="modelconsole",
        description="Serve several PyTorch models on this machine's GPUs and steer them from a terminal.",
    )
    p.add_argument("--version", action="version", version=f"modelconsole {__version__}")
    p.add_argument(
        "--check-config",
        metavar="FILE",
        nargs="?",
        const="",
        help="validate FILE (or the demo zoo if none), load every model once, print a table; "
        "exit status 1 on any failure",
    )
    p.add_argument("--config", metavar="FILE", help="the TOML configuration (default: the demo zoo)")
    p.add_argument("--serve", action="store_true",
                   help="run the engine and the HTTP server headless until SIGINT/SIGTERM")
    p.add_argument("--host", help="address to bind (default: [server] host, else 127.0.0.1)")
    p.add_argument("--port", type=int, help="port to bind (default: [server] port, else 8000; 0 picks a free one)")
    p.add_argument("--store", metavar="PATH",
                   help="the SQLite store (default: [store] path, else the user's data directory)")
    p.add_argument("--token", help="bearer token for /api/ and /v2/repository (or MODELCONSOLE_TOKEN); "
                   "with none given, a loopback server makes one at start and writes it (mode 0600) to "
                   "server-PORT.token beside the store, where --attach finds it")
    p.add_argument("--no-token", action="store_true",
                   help="serve /api/ and /v2/repository without a token (loopback only; not recommended)")
    p.add_argument("--access-log", action="store_true", help="log one line per HTTP request")
    p.add_argument("--cluster", metavar="ray[://ADDRESS]|local:N",
                   help="with --serve: run as a fleet on a Ray cluster (docs/cluster.md); \"ray\" joins the cluster "
                        "this machine belongs to, ray://HOST:PORT the head's GCS address (or [cluster] ray_address); "
                        "local:N starts N Ray nodes on 127.0.0.1 here, for trying and testing a fleet")
    p.add_argument("--workers", type=int, metavar="N",
                   help="--serve: N front-end processes on the port (HTTP, gRPC, V2 decoding) beside one engine "
                   "core; 0: one process (default: [server] workers, else chosen from the cores: 0 with 2 "
                   "or fewer, else half the cores, at most 8)")
    p.add_argument("--grpc-port", metavar="PORT|off",
                   help="KServe V2 over gRPC on this port (default with --serve: [server] grpc_port, else 8001; "
                   "the console serves gRPC only when given; 0 picks a free port; off: none)")
    p.add_argument("--attach", metavar="URL",
                   help="open the console on a running `modelconsole --serve` (e.g. http://127.0.0.1:8000)")
    p.add_argument("--demo", action="store_true",
                   help="embedded console: add the zoo models and run a traffic generator ([ and ] change its rate)")
    p.add_argument("--theme", help="console theme (t cycles them): modelconsole-dark, modelconsole-light, "
                   "or any Textual theme")
    p.add_argument("--read-only", action="store_true", help="console: hide every action that changes state")
    p.add_argument("--interval", type=_interval, default=1.0, metavar="SECONDS",
                   help="console: the refresh period, 0.25 to 60 s (default 1; :interval changes it live)")
    p.add_argument("--keymap", metavar="ID=KEYS,...",
                   help="console: remap keys by binding id (see ? for the ids), e.g. load=L,unload=U or "
                   "quit=ctrl+q; or set MODELCONSOLE_KEYMAP")
    p.add_argument("--log-file", metavar="PATH",
                   help="console modes: where logs go (default: modelconsole.log in the folder of "
                   "--store when one is given, else the state directory; printed at start)")
    p.add_argument("--log-level", default=None, help="DEBUG, INFO, WARNING or ERROR "
                   "(default: INFO with --serve, else WARNING)")
    return p


def _load(path: str | None):
    from modelconsole.scheduler.config import demo_config, load_config

    return load_config(path) if path else demo_config()


def check_config(path: str | None) -> int:
    from modelconsole.scheduler.check import check_config as run_check
    from modelconsole.scheduler.check import format_rows
    from modelconsole.scheduler.config import ConfigError

    try:
        config = _load(path)
    except ConfigError as e:
        print(f"modelconsole: {e}", file=sys.stderr)
        return 1
    if not config.models:
        print(f"modelconsole: {path}: no [[models]] to check", file=sys.stderr)
        return 1
    rows = asyncio.run(run_check(config))
    print(format_rows(rows))
    failed = [r for r in rows if not r.ok]
    where = path or "the demo zoo"
    if failed:
        print(f"\n{where}: {len(failed)} of {len(rows)} models failed", file=sys.stderr)
        return 1
    print(f"\n{where}: all {len(rows)} models loaded and answered")
    return 0


def server_settings(args: argparse.Namespace, config: Config) -> tuple[ServerSettings, str] | str:
    """The server's settings from flags over the config file; a message if they are unsafe.

    The control plane always has a token unless ``--no-token`` says otherwise:
    one given (flag, environment, config), else one made now and written beside
    the store once the port is known (server/tokenfile.py)."""
    from pathlib import Path

    from modelconsole.server.tokenfile import is_loopback, new_token, read_token
    from modelconsole.server.web import ServerSettings

    host = args.host if args.host is not None else config.server.host
    port = args.port if args.port is not None else config.server.port
    if not 0 <= port <= 65535:
        return f"--port: expected 0-65535, got {port}"
    token = args.token or os.environ.get("MODELCONSOLE_TOKEN") or config.server.token
    if token and args.no_token:
        return "--no-token and a token (--token, MODELCONSOLE_TOKEN or [server] token) contradict each other"
    token_dir = None
    if not token and not args.no_token and is_loopback(host):
        store = store_path(args, config)
        token_dir = str(Path(store).resolve().parent if store != ":memory:" else default_store_dir())
        token = (read_token(token_dir, port) if port else None) or new_token()
    if not is_loopback(host) and not token:
        return (f"refusing to bind {host!r} without a token: anyone who can reach it could load, unload and "
                "register models. Pass --token (or set MODELCONSOLE_TOKEN, or [server] token), or bind 127.0.0.1.")
    if config.server.infer_requires_token and not token:
        return ("[server] infer_requires_token = true, but no token is set, so no infer call would be checked. "
                "Pass --token (or set MODELCONSOLE_TOKEN, or [server] token), or set infer_requires_token = false.")
    from modelconsole.scheduler.config import listener_fields

    return ServerSettings(**dict(listener_fields(config.server), host=host, port=port, token=token or None),
                          max_body_bytes=int(config.server.max_body_mib * 2**20),
                          access_log=args.access_log, token_dir=token_dir,
                          ipc_spin_us=config.server.ipc_spin_us or 0.0), host


def store_path(args: argparse.Namespace, config) -> str:
    from modelconsole.scheduler.store import default_path

    return args.store or config.store.path or str(default_path())


def default_store_dir():
    """Where the store lives when none is given (no torch: the attached console calls this)."""
    from pathlib import Path

    import platformdirs

    return Path(platformdirs.user_data_dir("modelconsole", appauthor=False))


def attach_token(args: argparse.Namespace, url: str) -> str | None:
    """--token, MODELCONSOLE_TOKEN, else the token file a local server wrote for the URL's port
    (beside --store if given, else beside the default store)."""
    return attach_token_and_hint(args, url)[0]


def attach_token_and_hint(args: argparse.Namespace, url: str) -> tuple[str | None, str]:
    """The token for ``url`` and, for a refusal, where it was looked for and how to give one."""
    from pathlib import Path
    from urllib.parse import urlsplit

    from modelconsole.server.tokenfile import is_loopback, read_token, token_path

    how = "give one with --token T or MODELCONSOLE_TOKEN=T"
    token = args.token or os.environ.get("MODELCONSOLE_TOKEN")
    if token:
        return token, "the token given (--token or MODELCONSOLE_TOKEN) was refused: check it"
    if args.no_token:
        return None, f"--no-token sent none; {how}"
    parts = urlsplit(url)
    if not parts.hostname or not is_loopback(parts.hostname):
        return None, f"no token given, and a remote server's token file is not read; {how}"
    port = parts.port or (443 if parts.scheme == "https" else 80)
    where = Path(args.store).resolve().parent if args.store and args.store != ":memory:" else default_store_dir()
    path = token_path(where, port)
    token = read_token(where, port)
    if token is None:
        return None, (f"no token given, and no token file at {path} (a local server writes it beside its "
                      f"store: pass that server's --store PATH), or {how}")
    return token, f"the token in {path} was refused (another server's?): {how}"


def _config(args: argparse.Namespace) -> Any:
    """The config file's contents (the demo zoo without one); None, said on stderr, if it is wrong."""
    from modelconsole.scheduler.config import ConfigError

    try:
        return _load(args.config)
    except ConfigError as e:
        print(f"modelconsole: {e}", file=sys.stderr)
        return None


def _refuse(*checked: object) -> int:
    """A setting came back as a message (its refusal): the first one is said on stderr; exit 2."""
    print(f"modelconsole: {next(v for v in checked if isinstance(v, str))}", file=sys.stderr)
    return 2


def serve(args: argparse.Namespace) -> int:
    from modelconsole.server.serve import serve as run

    config = _config(args)
    if config is None:
        return 1
    settings = server_settings(args, config)
    if isinstance(settings, str):
        return _refuse(settings)
    cluster = args.cluster if args.cluster is not None else config.cluster.ray_address
    if cluster is not None:
        return serve_cluster(args, config, settings[0], cluster)
    workers = workers_setting(args, config)
    grpc = grpc_setting(args, config.server.grpc_port)
    if isinstance(workers, str) or isinstance(grpc, str):
        return _refuse(workers, grpc)
    chosen = settings[0]
    if config.server.ipc_spin_us is None and workers:
        from modelconsole.scheduler.policy import ipc_spin_us

        chosen = dataclasses.replace(chosen, ipc_spin_us=ipc_spin_us(_cores(), workers))
    if config.server.gil_switch_us is not None:
        # the engine's loop and its model threads share one interpreter lock: a model thread whose
        # forward returned waits for it up to this long while the loop is busy
        sys.setswitchinterval(config.server.gil_switch_us / 1e6)
    try:
        return _run_loop(run(config, chosen, store_path(args, config), workers=workers, grpc_port=grpc,
                             grpc_required=args.grpc_port is not None))
    except Exception as e:  # noqa: BLE001 - a clear line, not a traceback, for what stops the start
        logging.getLogger("modelconsole").debug("start failed", exc_info=True)
        print(f"modelconsole: {type(e).__name__}: {e}", file=sys.stderr)
        return 1


def serve_cluster(args: argparse.Namespace, config, settings, address: str) -> int:
    """``--serve --cluster``: the fleet's controller, engine cores and front ends on Ray (cluster/)."""
    from modelconsole.scheduler.config import ConfigError, cluster_address

    try:
        cluster_address("--cluster", address)
    except ConfigError as e:
        print(f"modelconsole: {e}", file=sys.stderr)
        return 2
    # front-end processes per node: --workers, else [server] workers, else none (the node's
    # front-end actor serves HTTP itself)
    workers = args.workers if args.workers is not None else (config.server.workers or 0)
    if workers < 0:
        print(f"modelconsole: --workers: expected 0 (one front end per node) or more, got {workers}", file=sys.stderr)
        return 2
    try:
        from modelconsole.cluster import launch
    except ImportError as e:
        print(f"modelconsole: --cluster needs Ray: pip install 'modelconsole[cluster]' ({e})", file=sys.stderr)
        return 2
    try:
        return asyncio.run(launch.serve(config, settings, store_path(args, config), address, workers=workers))
    except Exception as e:  # noqa: BLE001 - a clear line, not a traceback
        logging.getLogger("modelconsole").debug("cluster start failed", exc_info=True)
        print(f"modelconsole: {type(e).__name__}: {e}", file=sys.stderr)
        return 1


def workers_setting(args: argparse.Namespace, config) -> int | str:
    """--workers over [server] workers over the policy's choice for this machine's cores."""
    if args.workers is not None:
        if args.workers < 0:
            return f"--workers: expected 0 (one process) or more, got {args.workers}"
        return args.workers
    if config.server.workers is not None:
        return config.server.workers
    from modelconsole.scheduler.policy import frontend_workers

    return frontend_workers(_cores())


def _cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def grpc_setting(args: argparse.Namespace, default: int | None) -> int | None | str:
    """--grpc-port PORT|off, else ``default`` (the config's for --serve, None in the console)."""
    if args.grpc_port is None:
        return default
    if args.grpc_port == "off":
        return None
    try:
        port = int(args.grpc_port)
    except ValueError:
        port = -1
    if not 0 <= port <= 65535:
        return f"--grpc-port: expected a port 0-65535 or off, got {args.grpc_port!r}"
    return port


def _run_loop(coro) -> int:
    """asyncio.run, on uvloop where it is installed (Linux, macOS): the server's per-request
    cost is mostly event-loop and socket work, which uvloop does in C."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coro)
    return uvloop.run(coro)


def parse_keymap(text: str | None) -> dict[str, str] | str:
    """``load=L,unload=U`` -> {"load": "L", "unload": "U"}; a message if it is malformed."""
    out: dict[str, str] = {}
    for part in (text or "").split(","):
        if not part.strip():
            continue
        ident, sep, keys = part.partition("=")
        if not sep or not ident.strip() or not keys.strip():
            return f"--keymap: expected ID=KEYS pairs separated by commas (e.g. load=L,unload=U), got {part!r}"
        out[ident.strip()] = keys.strip()
    return out


def _interval(text: str) -> float:
    """``--interval``: seconds between refreshes, as nvitop bounds it (never faster than 0.25 s)."""
    try:
        seconds = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected seconds (e.g. 2 or 0.5), got '{text}'") from None
    if not 0.25 <= seconds <= 60:
        raise argparse.ArgumentTypeError(f"expected 0.25 to 60 seconds, got {text}")
    return seconds


def attach(args: argparse.Namespace) -> int:
    """The console on a running server: no engine, no torch."""
    from .run import run_attached

    url = args.attach if "://" in args.attach else f"http://{args.attach}"
    token, hint = attach_token_and_hint(args, url)
    keymap = parse_keymap(args.keymap or os.environ.get("MODELCONSOLE_KEYMAP"))
    if isinstance(keymap, str):
        return _refuse(keymap)
    return asyncio.run(run_attached(url.rstrip("/"), token, theme=args.theme, read_only=args.read_only,
                                    keymap=keymap, refresh_s=args.interval, token_hint=hint))


def embedded(args: argparse.Namespace) -> int:
    from .run import run_embedded

    config = _config(args)
    if config is None:
        return 1
    if args.demo and args.config is None:
        from modelconsole.scheduler.config import with_demo_devices

        config = with_demo_devices(config)
    settings = server_settings(args, config)
    keymap = parse_keymap(args.keymap or os.environ.get("MODELCONSOLE_KEYMAP"))
    grpc = grpc_setting(args, None)
    if isinstance(settings, str) or isinstance(keymap, str) or isinstance(grpc, str):
        return _refuse(settings, keymap, grpc)
    path = store_path(args, config)
    return _run_loop(run_embedded(config, settings[0], path, demo=args.demo, theme=args.theme,
                                  read_only=args.read_only, keymap=keymap, grpc_port=grpc,
                                  refresh_s=args.interval))


def _console_log(args: argparse.Namespace, level: str) -> None:
    """A full-screen console owns the terminal: logs go to a file."""
    from pathlib import Path

    if args.log_file:
        path = Path(args.log_file)
    elif args.store and args.store != ":memory:":
        path = Path(args.store).resolve().parent / "modelconsole.log"
    else:
        import platformdirs

        path = Path(platformdirs.user_log_dir("modelconsole", appauthor=False)) / "modelconsole.log"
    path.parent.mkdir(parents=True, exist_ok=True)
    logging.basicConfig(level=getattr(logging, level.upper(), logging.WARNING), format=LOG_FORMAT,
                        filename=str(path))
    # the screen is about to belong to the console: say once, where it stays in the scrollback,
    # where its log lines go
    print(f"modelconsole: logs go to {path}", file=sys.stderr, flush=True)


_NEWLINES = re.compile(r"[ \t]*[\r\n]+\s*")


def describe_exception(exc: BaseException, every_frame: bool = False) -> str:
    """``Type: message (at file.py:12 in func)``, then ``; caused by ...`` for its causes.

    The innermost frame says where it was raised, which is what a log reader
    needs to find it; ``every_frame`` (``--log-level DEBUG``) lists the whole
    traceback, innermost first, still on one line.
    """
    parts: list[str] = []
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen and len(parts) < 5:
        seen.add(id(current))
        parts.append(_one_exception(current, every_frame))
        current = current.__cause__ or (None if current.__suppress_context__ else current.__context__)
    return "; caused by ".join(parts)


def _one_exception(exc: BaseException, every_frame: bool) -> str:
    text = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
    frames = traceback.extract_tb(exc.__traceback__)
    if frames:
        shown = frames[::-1] if every_frame else frames[-1:]
        text += " (at " + " < ".join(f"{os.path.basename(f.filename)}:{f.lineno} in {f.name}" for f in shown) + ")"
    return text


class OneLineFormatter(logging.Formatter):
    """One record, one line on stderr, so ``journalctl`` and ``grep`` see each record whole.

    Exceptions (``log.exception``, aiohttp's "Error handling request") are
    folded onto their record's line after `` | `` by ``describe_exception``;
    a newline inside a message becomes a space.  The record itself is not
    changed (``exc_text`` is not cached), so other handlers format it their way.
    """

    def __init__(self, fmt: str = LOG_FORMAT, *, every_frame: bool = False):
        super().__init__(fmt)
        self.every_frame = every_frame

    def format(self, record: logging.LogRecord) -> str:
        record.message = record.getMessage()
        if self.usesTime():
            record.asctime = self.formatTime(record, self.datefmt)
        line = self.formatMessage(record)
        exc = record.exc_info[1] if record.exc_info else None
        if exc is not None:
            line += " | " + describe_exception(exc, self.every_frame)
        elif record.exc_text:
            line += " | " + record.exc_text
        if record.stack_info:
            line += " | stack: " + record.stack_info
        return _NEWLINES.sub(" ", line.strip())


def _stderr_log(level: str) -> None:
    """--serve and --check-config: one line per record on stderr (see OneLineFormatter)."""
    numeric = getattr(logging, str(level).upper(), logging.WARNING)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(OneLineFormatter(every_frame=numeric <= logging.DEBUG))
    logging.basicConfig(level=numeric, handlers=[handler])


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.cluster is not None and not args.serve:
        print("modelconsole: --cluster runs a fleet headless: use it with --serve (then --attach any node's "
              "front end)", file=sys.stderr)
        return 2
    level = args.log_level or ("INFO" if args.serve else "WARNING")
    console = args.check_config is None and not args.serve
    if console:
        _console_log(args, level)
    else:
        _stderr_log(level)
    if args.check_config is not None:
        return check_config(args.check_config or args.config)
    if args.serve:
        return serve(args)
    if args.attach:
        return attach(args)
    return embedded(args)


if __name__ == "__main__":
    sys.exit(main())
