"""``modelconsole --check-config``: the operator's ``nginx -t``.

Validates the file, then loads every model once — load, warmup, one
inference on random valid inputs — and reports a row per model.  It uses
no store: checking a config never changes the operator's state.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from .config import Config
from .engine import Engine
from .errors import EngineError
from .tensors import random_tensor


@dataclass
class CheckRow:
    model: str
    version: str
    source: str
    device: str
    load_seconds: float | None
    footprint_bytes: int
    status: str  # "ok" or the error

    @property
    def ok(self) -> bool:
        return self.status == "ok"


async def check_config(config: Config) -> list[CheckRow]:
    engine = Engine.from_config(config, store=None)
    rows: list[CheckRow] = []
    await engine.start()
    try:
        for cfg in config.models:
            row = CheckRow(cfg.name, cfg.version, cfg.source, cfg.device, None, 0, "ok")
            rows.append(row)
            try:
                await engine.register(cfg, actor="check-config")
                inst = engine.instance(cfg.name, cfg.version)
                started = time.perf_counter()
                await engine.load(cfg.name, cfg.version, actor="check-config")
                row.load_seconds = time.perf_counter() - started
                row.device = str(inst.device)
                row.footprint_bytes = inst.footprint_bytes
                inputs = {s.name: random_tensor(s) for s in inst.input_specs}
                result = await engine.infer(cfg.name, inputs, version=cfg.version)
                missing = [s.name for s in inst.output_specs if s.name not in result.outputs]
                if missing:
                    row.status = f"inference returned no output {missing[0]}"
            except EngineError as e:
                row.status = e.message
            except Exception as e:  # noqa: BLE001 - one broken model must not hide the others
                row.status = f"{type(e).__name__}: {e}"
    finally:
        await engine.close()
    return rows


def human_bytes(n: int) -> str:
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n} B"


def format_rows(rows: list[CheckRow]) -> str:
    header = ("MODEL", "VERSION", "SOURCE", "DEVICE", "LOAD", "FOOTPRINT", "STATUS")
    table = [header] + [
        (
            r.model,
            r.version,
            r.source,
            r.device,
            f"{r.load_seconds:.2f}s" if r.load_seconds is not None else "-",
            human_bytes(r.footprint_bytes) if r.footprint_bytes else "-",
            r.status,
        )
        for r in rows
    ]
    widths = [max(len(row[i]) for row in table) for i in range(len(header) - 1)]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row[:-1], widths)) + "  " + row[-1] for row in table]
    return "\n".join(lines)
