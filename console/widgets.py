"""The console's small widgets: each repaints only when its content changed, never relayouts.

Every widget here has a fixed height set in ``themes/console.tcss``, so an
update is a ``refresh()`` of its own region, not a layout pass.
"""

from __future__ import annotations

from collections import deque
from typing import Any

from rich.cells import cell_len
from rich.segment import Segment
from rich.style import Style
from rich.text import Text
from textual.binding import Binding
from textual.containers import Horizontal, VerticalScroll
from textual.widget import Widget
from textual.widgets import DataTable
from textual.widgets.data_table import CellDoesNotExist, ColumnKey, RowKey

from . import format as fmt

HISTORY = 120  # samples kept per graph (one per refresh)


class Line(Widget):
    """One or more lines of text; ``set()`` repaints only when the text changed."""

    DEFAULT_CSS = "Line { height: 1; text-wrap: nowrap; text-overflow: ellipsis; }"

    def __init__(self, text: str | Text = "", **kw: Any) -> None:
        super().__init__(**kw)
        self._text: str | Text = text

    @property
    def text(self) -> str:
        return self._text.plain if isinstance(self._text, Text) else self._text

    def set(self, text: str | Text) -> None:
        if text != self._text:
            grew = self.text.count("\n") != (text.plain if isinstance(text, Text) else text).count("\n")
            self._text = text
            self.refresh(layout=grew)  # a new line count may change an auto height

    def render(self) -> Text:
        return self._text if isinstance(self._text, Text) else Text(self._text, no_wrap=True, overflow="ellipsis")


class Graph(Widget):
    """A one-line history graph on a fixed axis: ``lo``..``hi`` (``hi`` None: 0..the data's max).

    Textual's Sparkline scales min→max, which makes a flat 3 % look like a
    full bar; utilisation needs a 0–100 % axis, so this draws its own."""

    DEFAULT_CSS = "Graph { height: 1; }"

    def __init__(self, label: str, *, lo: float = 0.0, hi: float | None = 100.0, unit: str = "%",
                 **kw: Any) -> None:
        super().__init__(**kw)
        self.label = label
        self.lo, self.hi, self.unit = lo, hi, unit
        self.values: list[float] = []
        self._key: tuple[Any, ...] | None = None

    def set_values(self, values: list[float] | deque[float]) -> None:
        vals = list(values)
        key = (len(vals), vals[-1] if vals else None, vals[0] if vals else None, sum(vals))
        if key != self._key:
            self._key = key
            self.values = vals
            self.refresh()

    def render(self) -> Text:
        width = self.size.width
        last = self.values[-1] if self.values else None
        if last is None:
            tail = "  —"
        elif self.unit == "%":
            tail = f" {last:3.0f}%"
        else:
            tail = f" {fmt.ms(last) if self.unit == 'ms' else fmt.rate(last)}{self.unit}"
        head = f"{self.label:<6}"
        room = max(0, width - len(head) - len(tail))
        t = Text(head, style="dim", no_wrap=True)
        t.append(fmt.spark(self.values, room, self.lo, self.hi), style="bold")
        t.append(tail)
        return t


def gpu_facts(d: dict[str, Any]) -> list[str]:
    """Utilisation, temperature, power (when the device reports them) and kernel slots."""
    facts = [f"util {fmt.pct(d.get('utilization_pct'))}"]
    if d.get("temperature_c") is not None:
        facts.append(f"{d['temperature_c']:.0f}°C")
    if d.get("power_w") is not None:
        facts.append(f"{d['power_w']:.0f} W")
    slots = d.get("slots") or {}
    if slots:
        facts.append(f"slots {slots.get('running', 0)}/{slots.get('slots', 0)}")
    return facts


def memory_legend(d: dict[str, Any], short: bool = False) -> str:
    """``used 1.2 GiB · budget 70.0 GiB · total 140 GiB`` (MiB for small amounts), as nvitop
    labels its bar; the bar's ``│`` marks the budget.  ``short``: ``1.2G used · 70.0G budget · 140.0G total``
    for one line at 80 columns."""
    budget = (d.get("budget") or {}).get("usable_bytes")

    def size(n: float | None) -> str:
        if short and n is not None:
            return f"{n / fmt.GiB:.1f}G" if n >= fmt.GiB else f"{n / fmt.MiB:.0f}M"
        return f"{n / fmt.GiB:.1f} GiB" if n is not None and n >= fmt.GiB else fmt.size(n)

    used, total = size(d.get("used_bytes") or 0), size(d.get("total_bytes") or 0)
    if short:
        return f"{used} used · {size(budget)} budget · {total} total"
    return f"used {used} · budget {size(budget)} · total {total}"


def process_line(d: dict[str, Any]) -> str:
    """Each process's memory on the device, the engine's own first (``this``), largest first."""
    own = (d.get("budget") or {}).get("own_pid")
    procs = sorted(d.get("processes") or (), key=lambda p: (p.get("pid") != own, -(p.get("used_bytes") or 0)))
    if not procs:
        return "processes: none reported"
    parts = []
    for p in procs[:4]:
        who = "this engine" if p.get("pid") == own else (p.get("name") or f"pid {p.get('pid')}")
        if p.get("pid") == 0:
            who = "others (simulated)"
        parts.append(f"{who} {fmt.size(p.get('used_bytes') or 0)}")
    more = f" · +{len(procs) - 4} more" if len(procs) > 4 else ""
    return "processes: " + " · ".join(parts) + more


class DeviceCard(Widget):
    """One GPU, as nvitop shows it: name, utilisation, temperature and power; memory as a bar
    with a used/budget/total legend; each process's memory; utilisation and memory history on
    a fixed 0–100 % axis.  ``compact``: all of it on one line (a short terminal)."""

    def __init__(self, index: int, **kw: Any) -> None:
        super().__init__(**kw)
        self.index = index
        self.mem_hist: deque[float] = deque(maxlen=HISTORY)
        self.util_hist: deque[float] = deque(maxlen=HISTORY)
        self.last: dict[str, Any] | None = None

    def compose(self):
        # kept as attributes: an update never queries the DOM (and survives teardown)
        self.title_line = Line(id="title", classes="card-title")
        self.membar = Line(id="membar")
        self.procs = Line(id="procs", classes="card-procs")
        self.utilgraph = Graph("util", id="utilgraph")
        self.memgraph = Graph("mem", id="memgraph")
        yield from (self.title_line, self.membar, self.procs)
        with Horizontal(classes="card-graphs"):
            yield self.utilgraph
            yield self.memgraph

    def update_reading(self, d: dict[str, Any], record: bool = True) -> None:
        self.last = d
        total = d.get("total_bytes") or 0
        used = d.get("used_bytes") or 0
        budget = (d.get("budget") or {}).get("usable_bytes")
        if record:
            self.mem_hist.append(100.0 * used / total if total else 0.0)
            self.util_hist.append(float(d.get("utilization_pct") or 0.0))
        compact = self.has_class("-compact")
        frac = used / total if total else 0.0
        mark = budget / total if total and budget else None
        title = Text(no_wrap=True, overflow="ellipsis")
        title.append(f"GPU{d.get('index')} ", style="bold")
        title.append(f"{d.get('name', '?')}  ")
        title.append(" · ".join(gpu_facts(d)), style="dim")
        if compact:  # memory first (used, budget, total), then the facts, the name last: 80 columns cut the end
            line = Text(no_wrap=True, overflow="ellipsis")
            line.append(f"GPU{d.get('index')} ", style="bold")
            line.append(fmt.bar(frac, 10, mark), style="bold" if frac < 0.9 else "bold red")
            line.append(f" {memory_legend(d, short=True)} ")
            line.append(" · ".join(gpu_facts(d)), style="dim")
            line.append(f" · {d.get('name', '?')}", style="dim")
            self.title_line.set(line)
            return
        self.title_line.set(title)
        legend = memory_legend(d)
        width = max(8, self.size.width - len(legend) - 2) if self.size.width else 20
        membar = Text(no_wrap=True, overflow="ellipsis")
        membar.append(fmt.bar(frac, width, mark), style="bold" if frac < 0.9 else "bold red")
        membar.append(f" {legend}")
        self.membar.set(membar)
        self.procs.set(Text(process_line(d), style="dim", no_wrap=True, overflow="ellipsis"))
        self.utilgraph.set_values(self.util_hist)
        self.memgraph.set_values(self.mem_hist)


class GpuPanel(Widget):
    """A card per device in a grid (as many columns as fit at ``CARD_WIDTH``), a card added
    the first time a device shows up; ``compact`` (a short terminal): one line per device."""

    CARD_WIDTH = 44
    CARD_HEIGHT = 4

    def __init__(self, **kw: Any) -> None:
        super().__init__(**kw)
        self.cards: dict[int, DeviceCard] = {}
        self._empty: Line | None = None
        self.compact = False

    def on_mount(self) -> None:
        self._empty = Line("no GPU devices: models run on the CPU", classes="empty")
        self.mount(self._empty)
        self._regrid()

    def set_compact(self, compact: bool) -> None:
        if compact == self.compact:
            return
        self.compact = compact
        for card in self.cards.values():
            card.set_class(compact, "-compact")
            if card.last is not None and card.children:
                card.update_reading(card.last, record=False)
        self._regrid()

    def _regrid(self) -> None:
        n = max(1, len(self.cards))
        if not self.cards:
            self.styles.grid_size_columns = 1
            self.styles.height = 1
            return
        if self.compact:
            self.styles.grid_size_columns = 1
            self.styles.height = min(n, 4)
            return
        width = self.size.width or self.app.size.width
        cols = max(1, min(n, width // self.CARD_WIDTH))
        rows = -(-n // cols)
        self.styles.grid_size_columns = cols
        self.styles.height = min(rows, 3) * self.CARD_HEIGHT

    def update_devices(self, devices: list[dict[str, Any]]) -> None:
        new = [d for d in devices if d.get("index") not in self.cards]
        if new:
            if self._empty is not None:
                self._empty.remove()
                self._empty = None
            for d in new:
                card = DeviceCard(d["index"], classes="card -compact" if self.compact else "card")
                self.cards[d["index"]] = card
                self.mount(card)
                # the card composes when mounted: feed it after that
                self.call_after_refresh(card.update_reading, d)
            self._regrid()
        for d in devices:
            shown = self.cards.get(d.get("index", -1))
            if shown is not None and d not in new and shown.is_mounted and shown.children:
                shown.update_reading(d)


class DetailPane(VerticalScroll):
    """The selected model: identity, its name's routing (swap progress, canary, per-arm metrics
    side by side), latency and throughput graphs, batch sizes, queue, eviction value and why
    (with the policy's slow request-rate EWMA), and its recent events."""

    def __init__(self, **kw: Any) -> None:
        super().__init__(**kw)
        # kept as attributes: an update never queries the DOM (and survives teardown)
        self.head = Line(id="d-head", classes="detail-head")
        self.routing = Line(id="d-routing", classes="detail-routing")
        self.facts = Line(id="d-facts", classes="detail-facts")
        self.lat = Graph("p95", hi=None, unit="ms", id="d-lat")
        self.rates = Graph("req/s", hi=None, unit="/s", id="d-rate")
        self.more = Line(id="d-more", classes="detail-more")

    def compose(self):
        yield from (self.head, self.routing, self.facts, self.lat, self.rates, self.more)

    def show_routing(self, name: str, routing: dict[str, Any] | None) -> None:
        """The name's swap, canary and arms, or nothing (the line hides) without a routing."""
        if not fmt.has_routing(routing):
            self.routing.set("")
            self.routing.display = False
            return
        assert routing is not None
        t = Text(no_wrap=True, overflow="ellipsis")
        swap = fmt.swap_line(name, routing)
        if swap:
            t.append(f"⇄ {swap}\n", style="bold")
        canary = fmt.canary_line(name, routing)
        if canary:
            state = str((routing.get("canary") or {}).get("state") or "")
            t.append(f"⚑ {canary}\n", style="bold red" if "roll" in state or "fail" in state else "bold")
        weights = fmt.shares(routing)
        head = "split " + (" ".join(f"v{v} {fmt._num(w)}%" for v, w in weights.items()) or "—")
        if routing.get("shadow"):
            head += " · shadow " + ", ".join(f"v{v}" for v in routing["shadow"])
        if routing.get("metric_output"):
            head += f" · mean of '{routing['metric_output']}'"
        t.append(head + "\n")
        t.append(fmt.ARM_HEADER + "\n", style="bold underline")
        for row, kind in fmt.arm_rows(routing):
            t.append(row + "\n", style={"active": "bold", "canary": "", "shadow": "dim"}.get(kind, ""))
        t.rstrip()
        self.routing.display = True
        self.routing.set(t)

    def show(self, m: dict[str, Any] | None, lat: deque[float], rates: deque[float],
             events: list[dict[str, Any]], routing: dict[str, Any] | None = None) -> None:
        head, facts, more = self.head, self.facts, self.more
        self.show_routing(m["name"] if m else "", routing if m else None)
        if m is None:
            head.set(Text("no model selected", style="dim"))
            facts.set("")
            more.set("")
            self.lat.set_values([])
            self.rates.set_values([])
            return
        stats = m.get("stats") or {}
        cfg = m.get("config") or {}
        lat_ms = stats.get("latency_ms") or {}
        t = Text(no_wrap=True, overflow="ellipsis")
        t.append(f"{m['name']} v{m['version']}", style="bold")
        t.append(f"{' (active)' if m.get('active') else ''}  {m.get('state')} on {fmt.device_label(m)}")
        if m.get("pinned"):
            t.append("  pinned", style="bold")
        if m.get("stalled"):
            t.append("  STALLED: a forward pass is past its deadlines", style="bold red")
        head.set(t)
        lines = [
            f"source {m.get('source') or cfg.get('source', '?')}"
            + (" · from a trusted root (may be unpickled)" if m.get("trusted") else ""),
            f"memory {fmt.size(m.get('footprint_bytes') or 0)} (weights {fmt.size(m.get('weight_bytes'))})"
            + (f" · loaded in {m['load_seconds']:.2f} s" if m.get("load_seconds") else ""),
            (f"queue {m.get('queue', 0)}"
             + (f" · {m['waiting_for_room']} waiting for memory" if m.get("waiting_for_room") else "")
             + f" · in flight {m.get('in_flight', 0)} · {fmt.rate(fmt.throughput(m))} req/s"
             f" · urgency {m.get('urgency') or 0:.2f}"
             f" · P{cfg.get('priority', '?')} of {cfg.get('priority_levels', '?')}"),
            (f"latency p50 {fmt.ms(lat_ms.get('p50'))} · p95 {fmt.ms(lat_ms.get('p95'))} · "
             f"p99 {fmt.ms(lat_ms.get('p99'))} ms (target {fmt.ms(m.get('latency_target_ms'))} ms)"),
        ]
        replicas = fmt.replicas_line(m)
        if replicas:
            lines.append(replicas)
        facts.set("\n".join(lines))
        self.lat.set_values(lat)
        self.rates.set_values(rates)
        hit = fmt.cache_hit_pct(stats)
        failures = stats.get("failures") or {}
        body = Text(no_wrap=True, overflow="ellipsis")
        body.append(f"batch sizes {fmt.batch_sizes(stats)}\n")
        body.append(f"ok {stats.get('success', 0)} · failed {stats.get('fail', 0)}"
                    + (f" ({', '.join(f'{k} {v}' for k, v in failures.items())})" if failures else "")
                    + f" · cache hits {fmt.pct(hit)}\n")
        if m.get("reason"):
            body.append(f"reason: {m['reason']}\n", style="bold red")
        body.append("eviction ", style="bold")
        body.append("\n".join(fmt.eviction_lines(m.get("eviction"), m)) + "\n")
        body.append("recent events\n", style="bold")
        for ev in events[-8:]:
            style = {"error": "red", "warning": "yellow"}.get(ev.get("level") or "", "")
            body.append(f" {fmt.clock(ev.get('ts'))} {ev.get('message', '')}\n", style=style)
        if not events:
            body.append(" —\n", style="dim")
        more.set(body)


class SortText(Text):
    """A models-table cell that carries the value its column sorts by."""

    sort_key: Any = None


class ModelTable(DataTable):
    """A DataTable whose rendered cells survive other cells' updates.

    DataTable keys its cell cache on a table-wide update counter, so one
    ``update_cell`` re-renders every visible cell (through Rich, the bulk of a
    refresh's CPU).  Here a rendered cell is reused while the cell object is
    the same one (updates always put a new object), at the same row, width,
    style and cursor: a refresh re-renders only the cells that changed, and a
    cursor move only the two rows it touches.  Header and label cells, and any
    surprise from the base class, go the ordinary way.
    """

    BINDINGS = [
        Binding("home,g", "cursor_top", "First row", show=False),
        Binding("end,G", "cursor_bottom", "Last row", show=False),
    ]

    def __init__(self, *a: Any, **kw: Any) -> None:
        super().__init__(*a, **kw)
        self._kept: dict[tuple[Any, Any], tuple[Any, tuple[Any, ...], Any]] = {}

    def _render_cell(self, row_index: int, column_index: int, base_style: Any, width: int,
                     cursor: bool = False, hover: bool = False) -> Any:
        if row_index < 0 or column_index < 0:
            return super()._render_cell(row_index, column_index, base_style, width, cursor, hover)
        try:
            row_key = self._row_locations.get_key(row_index)
            column_key = self._column_locations.get_key(column_index)
            if row_key is None or column_key is None:
                raise KeyError(row_index if row_key is None else column_index)
            value = self._data[row_key][column_key]
        except (KeyError, AttributeError, IndexError):
            return super()._render_cell(row_index, column_index, base_style, width, cursor, hover)
        sig = (row_index, base_style, width, cursor, hover, self._show_hover_cursor, self._pseudo_class_state,
               self.fixed_rows, self.fixed_columns)
        kept = self._kept.get((row_key, column_key))
        if kept is not None and kept[0] is value and kept[1] == sig:
            return kept[2]
        lines = self._render_text_cell(value, row_key, row_index, column_index, base_style, width, cursor, hover)
        if lines is None:
            lines = super()._render_cell(row_index, column_index, base_style, width, cursor, hover)
        self._kept[(row_key, column_key)] = (value, sig, lines)
        return lines

    def _render_text_cell(self, value: Any, row_key: Any, row_index: int, column_index: int, base_style: Style,
                          width: int, cursor: bool, hover: bool) -> list[list[Segment]] | None:
        """A one-line plain-styled text that fits its cell, as segments built directly: the same
        segments Rich's Padding/Styled/render_lines pipeline makes for it (a test compares them
        cell by cell), at a fraction of the cost; anything else (spans, an ellipsis, wrapping,
        an empty cell) answers None and goes the ordinary way."""
        if type(value) is not SortText or value.spans or not value.plain or "\n" in value.plain:
            return None
        row = self.rows.get(row_key)
        pad = self.cell_padding
        inner = width - 2 * pad
        text = value.plain
        if row is None or row.height != 1 or inner <= 0 or cell_len(text) > inner:
            return None
        fixed = row_index < self.fixed_rows or column_index < self.fixed_columns
        component, post = self._get_styles_to_render_cell(
            False, False, fixed, hover, cursor, self.show_cursor, self._show_hover_cursor,
            self.cursor_foreground_priority == "css", self.cursor_background_priority == "css")
        pre = base_style + Style.from_meta({"row": row_index, "column": column_index}) + component
        own = self.app.console.get_style(value.style) if value.style else None
        null = Style()

        def styled(style: Style | None) -> Style:
            s = pre + style
            return s + post if post else s

        line = [Segment(" " * pad, styled(null))] if pad else []
        line.append(Segment(text, styled(own)))
        fill = inner - cell_len(text)
        if fill:
            line.append(Segment(" " * fill, styled(null)))
        if pad:
            line.append(Segment(" " * pad, styled(null)))
        return [line]

    def action_cursor_top(self) -> None:
        if self.row_count:
            self.move_cursor(row=0, animate=False)

    def action_cursor_bottom(self) -> None:
        if self.row_count:
            self.move_cursor(row=self.row_count - 1, animate=False)

    def update_cells(self, changes: list[tuple[str, str, Any]]) -> None:
        """``update_cell`` for many cells, repainting only the rows they are in (each
        ``update_cell`` marks the whole table dirty: ~50 µs apiece, and every visible row is
        painted again)."""
        if not changes:
            return
        data = getattr(self, "_data", None)
        if data is None or not hasattr(self, "_update_count"):  # not the DataTable we know
            for row_key, column_key, value in changes:
                self.update_cell(row_key, column_key, value)
            return
        rows: set[int] = set()
        for row_key, column_key, value in changes:
            rk, ck = RowKey(row_key), ColumnKey(column_key)
            if rk not in self._row_locations or ck not in self._column_locations:
                raise CellDoesNotExist(f"No cell exists for row_key={rk!r}, column_key={ck!r}.")
            data[rk][ck] = value
            row = self._row_locations.get(rk)
            if row is not None:  # checked above: the key has a row
                rows.add(row)
        self._update_count += 1
        # repaint the changed rows only (the columns have fixed widths: nothing else moves); a
        # row off screen costs nothing
        for row in rows:
            self.refresh_row(row)

    def remove_row(self, row_key: Any) -> None:
        super().remove_row(row_key)
        key = row_key.value if hasattr(row_key, "value") else row_key
        for k in [k for k in self._kept if (k[0].value if hasattr(k[0], "value") else k[0]) == key]:
            del self._kept[k]

    def clear(self, columns: bool = False) -> Any:
        self._kept.clear()
        return super().clear(columns)
