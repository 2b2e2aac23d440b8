"""The ``modelconsole`` command.

Today it offers ``--check-config [FILE]`` (validate a config and load every
model once, like ``nginx -t``).  The engine is imported lazily so that a
future ``--attach`` mode never loads torch.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys

from . import __version__


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
    p.add_argument("--log-level", default="WARNING", help="DEBUG, INFO, WARNING (default) or ERROR")
    return p


def _load(path: str | None):
    from modelconsole.scheduler.config import demo_config, load_config

    return load_config(path) if path else demo_config()


def check_config(path: str | None) -> int:
    from modelconsole.scheduler.check import check_config as run_check, format_rows
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


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=getattr(logging, str(args.log_level).upper(), logging.WARNING),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    if args.check_config is not None:
        return check_config(args.check_config or args.config)
    print(
        "modelconsole: the console and the HTTP server are not built yet.\n"
        "  modelconsole --check-config [FILE]   validate a config and load every model once",
        file=sys.stderr,
    )
    return 2


if __name__ == "__main__":
    sys.exit(main())
