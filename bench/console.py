"""The console's own cost: CPU per refresh cycle, and how long a key takes to show.

    python bench/console.py            # 100 models, under a minute
    python bench/console.py --quick    # fewer cycles and keys, ~25 s

The console (``ModelConsoleApp``) runs headless (``App.run_test``) at 120x40
over a real in-process engine (simulated ``2x24GiB`` GPUs, the models run on
the CPU) with ``--models`` registered versions (zoo:tiny-mlp and zoo:identity),
a quarter of them loaded and fed by a background traffic task calling
``engine.infer`` on the same event loop, so every snapshot differs from the
last (request counts, rates, latencies, GPU utilisation).

What is measured, exactly:

* ``refresh_cpu_ms``: CPU time of the **main thread** (``time.thread_time``,
  so the engine's worker threads are not counted) from calling
  ``app.refresh_view(force=True)`` until the frame it causes has been
  composed and encoded, plus 50 ms more for follow-up frames (idle time
  costs no CPU).  "Composed and encoded": headless Textual skips turning the
  compositor's update into terminal escape codes, so ``App._display`` is
  wrapped to do that (``CompositorUpdate.render_segments``) as a real
  terminal's driver would; only the write to a tty is missing.  The
  periodic refresh timer is set to an hour so that only the bench's
  refreshes run, and traffic is paused (and the requests in flight are
  drained) during each measured window so that the window holds the
  console's work, not the engine's request handling on the shared loop;
  traffic runs between windows, so each window renders a changed snapshot.
  Anything else the loop does in the window (the engine's janitor tick,
  Textual's own housekeeping) is counted too: nothing is subtracted.
  ``refresh_view`` alone (the synchronous diff of the table, GPU panel,
  detail pane and status line, before any painting) is shown separately.
* ``key_to_paint_ms``: wall time from handing a ``down``/``up`` key event to
  the app's driver (``driver.send_message``, the same path a terminal's key
  takes) until the end of the first ``_display`` after which the screen a
  terminal would show (every frame's escape codes applied to a 120x40
  character grid, ``Terminal``) has the newly selected model's heading in the
  detail pane's region: the cursor's move alone (it usually paints a frame
  earlier) does not count.  The grid is fed after each frame's clock stops.
  This runs with traffic flowing and the normal 1 s refresh timer, so some
  presses land on a refresh.  Textual's idle heuristics (``pilot.pause``)
  are not used: they would also wait on the engine's threads' CPU.

* ``refresh_cpu_ms_80x24``: ``refresh_cpu_ms`` again with the console at 80x24
  (an SSH session's default size), where the table shows fewer rows.

Prints a table, then as its LAST line one JSON object:
``{"refresh_cpu_ms": <median>, "key_to_paint_ms": <median>, "refresh_cpu_ms_80x24": <median>}``
(targets at 120x40 with 100 models: <= 20 and <= 50).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

# `python bench/console.py` puts bench/ first on sys.path, where bench/http.py would shadow the standard
# library's http package (torch, aiohttp and tritonclient import it): move bench/ to the end.
_HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _HERE] + [str(_HERE)]

from rich.cells import get_character_cell_size
from textual import events
from textual._compositor import CompositorUpdate

from modelconsole.console.app import ModelConsoleApp
from modelconsole.console.local import LocalClient
from modelconsole.scheduler.config import GpuConfig
from modelconsole.scheduler.engine import Engine
from modelconsole.scheduler.store import Store
from modelconsole.scheduler.tensors import TensorSpec, random_tensor

SIZE = (120, 40)
SMALL = (80, 24)  # an SSH session's default terminal: a first-class size


def quantile(xs: list[float], q: float) -> float:
    s = sorted(xs)
    if not s:
        return float("nan")
    i = min(len(s) - 1, max(0, round(q * (len(s) - 1))))
    return s[i]


def model_defs(n: int) -> list[dict[str, Any]]:
    """n versions: four tiny MLPs for every identity model, spread over the simulated GPUs."""
    out = []
    for i in range(n):
        if i % 5 == 4:
            out.append({"name": f"echo-{i:03d}", "source": "zoo:identity", "warmup": 0, "device": "auto",
                        "max_queue_delay_ms": 0,
                        "inputs": [{"name": "x", "datatype": "FP32", "shape": [-1, 8]}],
                        "outputs": [{"name": "y", "datatype": "FP32", "shape": [-1, 8]}]})
        else:
            out.append({"name": f"mlp-{i:03d}", "source": "zoo:tiny-mlp", "warmup": 0, "device": "auto",
                        "max_queue_delay_ms": 0})
    return out


class Traffic:
    """Requests round-robin over the loaded models, on the app's event loop; can be paused
    (and drained) so a measurement window holds only the console's work."""

    def __init__(self, engine: Engine, names: list[str], rate: float):
        self.engine = engine
        self.names = names
        self.rate = rate
        self.running = asyncio.Event()
        self.running.set()
        self.sent = self.ok = self.failed = 0
        self._inputs: dict[str, dict[str, Any]] = {}
        self._pending: set[asyncio.Task] = set()
        self._task: asyncio.Task | None = None

    def _input(self, name: str) -> dict[str, Any]:
        if name not in self._inputs:
            snap = self.engine.snapshot_models(name)[0]
            specs = [TensorSpec(i["name"], i["datatype"], tuple(i["shape"])) for i in snap["inputs"]]
            self._inputs[name] = {s.name: random_tensor(s) for s in specs}
        return self._inputs[name]

    async def _one(self, name: str) -> None:
        try:
            await self.engine.infer(name, self._input(name))
            self.ok += 1
        except Exception:  # noqa: BLE001 - counted, the bench goes on
            self.failed += 1

    async def _run(self) -> None:
        i = 0
        while True:
            await self.running.wait()
            await asyncio.sleep(1.0 / self.rate)
            if not self.running.is_set():
                continue
            name = self.names[i % len(self.names)]
            i += 1
            self.sent += 1
            t = asyncio.create_task(self._one(name))
            self._pending.add(t)
            t.add_done_callback(self._pending.discard)

    def start(self) -> None:
        self._task = asyncio.create_task(self._run())

    async def pause(self) -> None:
        self.running.clear()
        if self._pending:
            await asyncio.gather(*list(self._pending), return_exceptions=True)

    def resume(self) -> None:
        self.running.set()

    async def stop(self) -> None:
        await self.pause()
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)


class Terminal:
    """What a terminal would show: the frames' escape codes applied to a character grid
    (cursor moves and text; styles ignored)."""

    CODE = re.compile(r"\x1b\[(\d+);(\d+)H|\x1b\[[0-9;?]*[A-Za-z]|\x1b\][^\x07\x1b]*(?:\x07|\x1b\\)|\x1b.")

    def __init__(self, width: int, height: int):
        self.width, self.height = width, height
        self.grid = [[" "] * width for _ in range(height)]
        self.x = self.y = 0

    def _put(self, text: str) -> None:
        row = self.grid[self.y] if 0 <= self.y < self.height else None
        for ch in text:
            w = get_character_cell_size(ch)
            if row is not None and 0 <= self.x < self.width and w:
                row[self.x] = ch
                if w == 2 and self.x + 1 < self.width:
                    row[self.x + 1] = ""
            self.x += w

    def feed(self, data: str) -> None:
        pos = 0
        for m in self.CODE.finditer(data):
            self._put(data[pos:m.start()])
            if m.group(1):
                self.y, self.x = int(m.group(1)) - 1, int(m.group(2)) - 1
            pos = m.end()
        self._put(data[pos:])

    def text(self, region: Any) -> str:
        return "\n".join("".join(self.grid[y][region.x:region.right])
                         for y in range(max(0, region.y), min(self.height, region.bottom)))


class Frames:
    """Wraps ``app._display``: encodes each frame as a terminal driver would (the escape codes
    it would write), optionally feeds them to a ``Terminal``, and wakes waiters."""

    def __init__(self, app: ModelConsoleApp, terminal: Terminal | None = None):
        self.app = app
        self.terminal = terminal
        self.count = 0
        self.last_end = 0.0
        self.encode_ms: list[float] = []
        self._changed = asyncio.Event()
        self._watch: tuple[Any, asyncio.Future[float]] | None = None
        original = app._display

        def display(screen: Any, renderable: Any) -> None:
            original(screen, renderable)
            if renderable is None or app._batch_count:
                return
            data = None
            if isinstance(renderable, CompositorUpdate) and app.is_headless:
                t = time.perf_counter()
                data = renderable.render_segments(app.console)  # the escape codes a terminal would get
                self.encode_ms.append((time.perf_counter() - t) * 1e3)
            self.count += 1
            end = self.last_end = time.perf_counter()
            if data is not None and self.terminal is not None:
                self.terminal.feed(data)  # after the clock stopped: the bench's own cost
                if self._watch is not None and self._watch[0](self.terminal):
                    fut = self._watch[1]
                    self._watch = None
                    if not fut.done():
                        fut.set_result(end)
            self._changed.set()

        app._display = display  # type: ignore[method-assign]

    async def next(self, timeout: float = 5.0) -> float:
        """Wait for the next frame; the perf_counter at its end."""
        self._changed.clear()
        await asyncio.wait_for(self._changed.wait(), timeout)
        return self.last_end

    def watch(self, shows: Any) -> asyncio.Future[float]:
        """A future: the end of the first frame after which ``shows(terminal)`` holds."""
        fut: asyncio.Future[float] = asyncio.get_running_loop().create_future()
        self._watch = (shows, fut)
        return fut


async def run(args: argparse.Namespace) -> dict[str, Any]:
    tmp = tempfile.TemporaryDirectory(prefix="mc-bench-console-")
    engine = Engine(Store(Path(tmp.name) / "state.db"),
                    gpu=GpuConfig(simulate="2x24GiB", reserve_mib=0, min_residency_s=0),
                    base_dir=tmp.name, tick_s=1.0)
    await engine.start()
    t0 = time.perf_counter()
    defs = model_defs(args.models)
    for m in defs:
        await engine.register(m)
    loaded = [m["name"] for m in defs[:: max(1, round(1 / args.loaded_fraction))]]
    for name in loaded:
        await engine.load(name)
    setup_s = time.perf_counter() - t0
    traffic = Traffic(engine, loaded, args.rate)
    client = LocalClient(engine)
    await client.start()
    res: dict[str, Any] = {"setup_s": setup_s, "models": len(defs), "loaded": len(loaded)}
    try:
        traffic.start()
        res |= await measure_refresh(client, traffic, args)
        small = await measure_refresh(client, traffic, args, SMALL)
        res["refresh_cpu_ms_80x24"] = small["refresh_cpu_ms"]
        res["rows_80x24"] = small["visible_rows"]
        res |= await measure_keys(client, args)
        res["traffic"] = {"sent": traffic.sent, "ok": traffic.ok, "failed": traffic.failed}
    finally:
        await traffic.stop()
        await client.close()
        await engine.close()
        tmp.cleanup()
    return res


async def measure_refresh(client: LocalClient, traffic: Traffic, args: argparse.Namespace,
                          size: tuple[int, int] = SIZE) -> dict[str, Any]:
    app = ModelConsoleApp(client, refresh_s=3600.0)  # only the bench's refreshes run
    frames = Frames(app)
    sync_ms: list[float] = []
    cycle_ms: list[float] = []
    wall_ms: list[float] = []
    frames_per: list[int] = []
    changed_rows: list[int] = []
    async with app.run_test(size=size) as pilot:
        await pilot.pause(0.5)
        app.table.move_cursor(row=0, animate=False)
        warmup = 3
        for i in range(args.cycles + warmup):
            traffic.resume()
            await asyncio.sleep(args.gap)  # traffic changes the snapshot
            await traffic.pause()
            await asyncio.sleep(0.02)  # completions delivered, the loop quiet
            before = {k: dict(v) for k, v in app._cells.items()}
            n0 = frames.count
            c0 = time.thread_time()
            w0 = time.perf_counter()
            app.refresh_view(force=True)
            c1 = time.thread_time()
            try:
                end = await frames.next(timeout=5.0)
            except TimeoutError:
                end = time.perf_counter()  # nothing to paint (unchanged snapshot): the refresh alone
            await asyncio.sleep(0.05)  # follow-up frames, if any, land in the window too
            c2 = time.thread_time()
            if i < warmup:
                continue
            sync_ms.append((c1 - c0) * 1e3)
            cycle_ms.append((c2 - c0) * 1e3)
            wall_ms.append((end - w0) * 1e3)
            frames_per.append(frames.count - n0)
            changed_rows.append(sum(1 for k, v in app._cells.items() if before.get(k) != v))
        traffic.resume()
        rows = app.table.row_count
        visible = min(rows, app.table.scrollable_content_region.height - app.table.header_height)
    return {"refresh_sync_ms": sync_ms, "refresh_cpu_ms": cycle_ms, "refresh_wall_ms": wall_ms,
            "frames_per_refresh": frames_per, "changed_rows": changed_rows, "rows": rows,
            "encode_ms": frames.encode_ms, "visible_rows": visible}


async def measure_keys(client: LocalClient, args: argparse.Namespace) -> dict[str, Any]:
    app = ModelConsoleApp(client, refresh_s=1.0)  # as an operator runs it
    terminal = Terminal(*SIZE)
    frames = Frames(app, terminal)
    rng = random.Random(0)
    key_ms: list[float] = []
    misses = 0
    async with app.run_test(size=SIZE) as pilot:
        await pilot.pause(0.5)
        app.table.move_cursor(row=0, animate=False)
        await asyncio.sleep(0.3)
        direction = 1
        detail = app.detail.region
        for _ in range(args.keys):
            await asyncio.sleep(rng.uniform(0.05, 0.25))  # land anywhere in the refresh period
            row = app.table.cursor_row
            if not 0 <= row + direction < app.table.row_count:
                direction = -direction
            target_key = app.table.ordered_rows[row + direction].key.value
            m = app.models[target_key]
            want = f"{m['name']} v{m['version']}"  # the detail pane's heading for the new selection
            assert want not in terminal.text(detail)
            painted = frames.watch(lambda term, want=want: want in term.text(detail))
            key = "down" if direction > 0 else "up"
            t0 = time.perf_counter()
            app._driver.send_message(events.Key(key, None))
            try:
                end = await asyncio.wait_for(painted, 5.0)
            except TimeoutError:
                misses += 1
                continue
            assert app.selected_key() == target_key
            key_ms.append((end - t0) * 1e3)
    return {"key_to_paint_ms": key_ms, "key_misses": misses}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", type=int, default=100, help="registered model versions (100)")
    p.add_argument("--cycles", type=int, default=None, help="measured refresh cycles (60; --quick 25)")
    p.add_argument("--keys", type=int, default=None, help="measured key presses (80; --quick 30)")
    p.add_argument("--rate", type=float, default=200.0, help="traffic, requests/s over the loaded models (200)")
    p.add_argument("--loaded-fraction", type=float, default=0.25, help="share of the models loaded (0.25)")
    p.add_argument("--gap", type=float, default=0.25, help="seconds of traffic between refresh cycles (0.25)")
    p.add_argument("--quick", action="store_true", help="fewer cycles and keys")
    args = p.parse_args()
    args.cycles = args.cycles or (25 if args.quick else 60)
    args.keys = args.keys or (30 if args.quick else 80)
    t0 = time.perf_counter()
    res = asyncio.run(run(args))

    def row(label: str, xs: list[float], unit: str = "ms") -> str:
        if not xs:
            return f"{label:<48}{'—':>9}{'—':>9}{0:>6}"
        return f"{label:<48}{statistics.median(xs):>9.2f}{quantile(xs, 0.9):>9.2f}{len(xs):>6}  {unit}"

    print(f"console at {SIZE[0]}x{SIZE[1]}: {res['models']} models ({res['rows']} rows), {res['loaded']} loaded, "
          f"traffic {args.rate:g} req/s between cycles ({res['traffic']['ok']} ok, {res['traffic']['failed']} "
          f"failed); setup {res['setup_s']:.1f} s")
    print(f"{'':<48}{'median':>9}{'p90':>9}{'n':>6}")
    print(row("refresh_view() alone, main-thread CPU", res["refresh_sync_ms"]))
    print(row("refresh cycle (refresh+paint), main-thread CPU", res["refresh_cpu_ms"]))
    print(row("refresh -> frame out, wall", res["refresh_wall_ms"]))
    print(row("  frame encoding (escape codes), CPU", res["encode_ms"]))
    print(row("  rows changed per cycle", [float(x) for x in res["changed_rows"]], "rows"))
    print(row("  frames per cycle", [float(x) for x in res["frames_per_refresh"]], "frames"))
    print(row(f"refresh cycle at 80x24 ({res['rows_80x24']} rows shown), CPU", res["refresh_cpu_ms_80x24"]))
    print(row("key (down/up) -> detail pane painted, wall", res["key_to_paint_ms"]))
    if res["key_misses"]:
        print(f"  {res['key_misses']} key presses were not seen painted within 5 s (not counted)")
    print(f"targets: refresh cycle <= 20 ms CPU, key to paint <= 50 ms; total {time.perf_counter() - t0:.0f} s")
    out = {"refresh_cpu_ms": round(statistics.median(res["refresh_cpu_ms"]), 2),
           "key_to_paint_ms": round(statistics.median(res["key_to_paint_ms"]), 2)
           if res["key_to_paint_ms"] else None,
           "refresh_cpu_ms_80x24": round(statistics.median(res["refresh_cpu_ms_80x24"]), 2)}
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
