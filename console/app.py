"""The operator console: a Textual app over an ``EngineClient`` (embedded or attached).

The app never imports torch, the scheduler or the server: it reads
``client.snapshot()`` on a timer and ``client.events()`` in an async worker,
and changes things through the client's control calls, each run as a worker
on the app's loop, so the screen keeps updating while a model loads.  The app
wires and paints; its parts live beside it: ``picture.py`` (what it knows of
the engine: the table's data model), ``actions.py`` (what keys and commands do
to the engine), ``keys.py`` (bindings and permissions) and ``palette.py``.

Refreshing is cheap on purpose: the models table is diffed by row key
(``name:version``) and only changed cells are rewritten, inside one
``batch_update()``, repainting only their rows; the GPU and detail widgets
repaint only when their text changed; while a dialog or a describe/logs view
is open only the picture those read and the header are kept current.  Below 34 rows the layout goes compact (80x24
is a first-class size); ``:`` runs commands (``commands.py``) through the
same actions the keys reach.

The caller owns the client: it calls ``client.start()`` before ``run()`` and
``client.close()`` after.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from functools import partial
from typing import Any, ClassVar

from rich.text import Text
from textual import events, on
from textual.app import App, ComposeResult
from textual.binding import BindingType
from textual.command import Provider
from textual.containers import Horizontal
from textual.coordinate import Coordinate
from textual.widgets import DataTable, Footer, Input, RichLog
from textual.widgets.data_table import ColumnKey

from modelconsole.themes import DEFAULT_THEME, THEMES, stylesheet

from . import commands as cmds
from . import format as fmt
from . import keys, status
from .actions import ModelActions, evict_refusal, label_of
from .client import EngineClient
from .keys import DEMO_ACTIONS, MAIN_ONLY, MUTATING, PALETTE
from .palette import ActionCommands, CommandInput, CommandSuggester
from .picture import Picture
from .screens import HelpScreen
from .views import DescribeScreen, LogScreen
from .widgets import DetailPane, GpuPanel, Line, ModelTable, SortText

__all__ = ["PALETTE", "ActionCommands", "ModelConsoleApp"]

COMPACT_BELOW_ROWS = 34  # a terminal shorter than this gets one line per GPU and a shorter bottom pane
# engine events after which the table should show the new state at once, not at the next tick
STATE_EVENTS = frozenset({"loading", "loaded", "load_failed", "unloading", "unloaded", "evicted", "pinned",
                          "unpinned", "priority", "registered", "expired", "oom", "connection", "deleted"})
# events of versions routing (swap_started/loaded/switched/done, split, canary_*): refresh at once too
ROUTING_EVENT_PREFIXES = ("swap", "split", "canary", "shadow", "routing", "version")
# events that raise an alert: a notification that stays, and the log line highlighted
ALERT_EVENTS = frozenset({"canary_rolled_back"})
ALERT_STYLE = "bold white on red"
THEME_CYCLE = (DEFAULT_THEME, *(t.name for t in THEMES if t.name != DEFAULT_THEME),
               "textual-dark", "nord", "gruvbox", "textual-light")
LEVEL_STYLE = {"error": "bold red", "warning": "yellow"}


class ModelConsoleApp(App[None]):
    """The console.  ``embedded``: the engine lives in this process (quitting stops it, so ``q``
    asks while traffic flows); ``read_only``: every state-changing action is hidden and refused;
    ``theme``: a registered theme's name; ``demo``: an object with a settable ``rate`` (req/s)
    that ``[``/``]`` halve/double; ``refresh_s``: the screen's refresh period;
    ``keymap``: binding id -> keys, to remap (e.g. ``{"load": "L"}``)."""

    CSS_PATH = str(stylesheet())
    TITLE = "modelconsole"
    # the console's actions, and Textual's
    COMMANDS: ClassVar[set[type[Provider] | Callable[[], type[Provider]]]] = {ActionCommands}
    ENABLE_COMMAND_PALETTE = True

    BINDINGS: ClassVar[list[BindingType]] = list(keys.BINDINGS)

    def __init__(self, client: EngineClient, *, embedded: bool = False, read_only: bool = False,
                 theme: str | None = None, demo: Any = None, refresh_s: float = 1.0,
                 keymap: dict[str, str] | None = None) -> None:
        super().__init__()
        self.client = client
        self.embedded = embedded
        self.read_only = bool(read_only or getattr(client, "read_only", False))
        self.demo = demo
        self.refresh_s = max(0.25, float(refresh_s))
        for t in THEMES:
            self.register_theme(t)
        name = theme or DEFAULT_THEME
        if name not in self.available_themes:
            raise ValueError(f"unknown theme '{name}': choose one of {', '.join(sorted(self.available_themes))}")
        self.theme = name
        if keymap:
            self.set_keymap(keymap)
        self.picture = Picture()  # what the console knows of the engine (the table's data model)
        self.ops = ModelActions(self)  # what the keys and : commands do to the engine
        self.alerts: list[str] = []  # alerts raised (a canary rolled back), oldest first
        self._cells: dict[str, dict[str, tuple[str, Any]]] = {}  # row key -> shown (text, sort value)
        self.event_lines: deque[str] = deque(maxlen=1000)  # the event log, as plain text
        self._seeded = False
        self._snapshot_ts: float | None = None
        self.target_node: str | None = None  # attached to a fleet: the node l/u/e/p act on (None: all)
        self._styles: dict[str, str] = {}
        self._restyle = True
        self._soon = False
        self._connected = True
        self._asking_quit = False  # the quit confirmation is on screen
        self._main: Any = None
        self._timer: Any = None
        self._evictable: bool | None = None  # whether e acts on the selected row (the footer greys it)
        self._server_error: str | None = None  # the embedded HTTP server could not start: why
        self._flash_timer: Any = None
        self.flash_text = ""  # what the flash line says now

    @property
    def models(self) -> dict[str, dict[str, Any]]:
        """Row key -> the version's latest snapshot."""
        return self.picture.models

    @property
    def routing(self) -> dict[str, dict[str, Any]]:
        return self.picture.routing

    @property
    def marked(self) -> set[str]:
        """Row keys marked with space: u, e and p act on them all."""
        return self.picture.marked

    def shown_keys(self) -> set[str]:
        """The row keys the table shows now (the filter hides the others)."""
        return set(self._cells)

    # ------------------------------------------------------------------ layout

    def compose(self) -> ComposeResult:
        with Horizontal(id="header"):
            yield Line(id="status")
            yield Line("? help · q quit", id="keys")
        yield Line(id="banner")
        yield GpuPanel(id="gpus")
        yield Line(id="nodes")  # the fleet's nodes (--serve --cluster); hidden on one host
        table = ModelTable(id="models", cursor_type="row", zebra_stripes=False)
        yield table
        with Horizontal(id="bottom"):
            yield DetailPane(id="detail")
            # wrapped: an event is read whole, never cut mid-sentence at the pane's edge
            yield RichLog(id="events", max_lines=1000, wrap=True, markup=False, auto_scroll=True, min_width=20)
        yield Input(placeholder="filter: a regular expression over name:version, state, device "
                                "(enter keeps it, esc clears)", id="filter")
        yield CommandInput(placeholder=":command (tab completes; e.g. unload tiny-mlp · swap tiny-mlp 2 · "
                                "split tiny-mlp 1=80 2=20 · model tiny) — esc cancels",
                    id="command", suggester=CommandSuggester(self))
        yield Line(id="flash")  # notifications: one line under the table, never a toast over it
        yield Footer(compact=True, show_command_palette=False)  # ": Palette" is in the list already

    def notify(self, message: str, *, title: str = "", severity: str = "information",
               timeout: float | None = None, markup: bool = True) -> None:
        """On the main screen (and under its dialogs) a notification is the flash line: one line
        above the footer, replaced by the next, gone after ``timeout``; toasts would cover the
        table at 80x24.  Full-screen views (describe, logs) keep Textual's toasts."""
        from textual.screen import ModalScreen

        flash = self._flash_line() if self.screen_stack else None
        if flash is None or not (self.screen is self._main or isinstance(self.screen, ModalScreen)):
            super().notify(message, title=title, severity=severity, timeout=timeout, markup=markup)  # type: ignore[arg-type]
            return
        text = " · ".join(part.strip() for part in str(message).splitlines() if part.strip())
        if title:
            text = f"{title}: {text}"
        style = {"error": "bold red", "warning": "yellow"}.get(severity, "")
        flash.set(Text(f" {text}", style=style, no_wrap=True, overflow="ellipsis"))
        self.flash_text = text
        if self._flash_timer is not None:
            self._flash_timer.stop()
        seconds = timeout if timeout is not None else (8.0 if severity == "error" else 4.0)
        self._flash_timer = self.set_timer(seconds, self._clear_flash)

    def _flash_line(self) -> Line | None:
        if self._main is None:
            return None
        try:
            return self._main.query_one("#flash", Line)
        except Exception:  # noqa: BLE001 - not composed yet, or the app is closing
            return None

    def _clear_flash(self) -> None:
        flash = self._flash_line()
        if flash is not None:
            flash.set("")
        self.flash_text = ""

    def on_mount(self) -> None:
        self._main = self.screen
        self.table = self.query_one("#models", ModelTable)
        self.gpus = self.query_one("#gpus", GpuPanel)
        self.nodes_panel = self.query_one("#nodes", Line)
        self.nodes_panel.display = False
        self.detail = self.query_one("#detail", DetailPane)
        self.log_widget = self.query_one("#events", RichLog)
        self.status_line = self.query_one("#status", Line)
        self.banner = self.query_one("#banner", Line)
        self.filter_box = self.query_one("#filter", Input)
        self.command_box = self.query_one("#command", Input)
        self.bottom = self.query_one("#bottom")
        for key, label, width in fmt.COLUMNS:
            self.table.add_column(label, key=key, width=width)
        self.table.fixed_columns = fmt.FROZEN  # pin and name stay put when the table scrolls sideways
        self._label_sorted()
        self._fit(self.size.width, self.size.height)
        self.table.focus()
        self.theme_changed_signal.subscribe(self, self._on_theme_changed)
        self.refresh_view(force=True)  # seeds the log with the snapshot's recent events first...
        self.run_worker(self._consume_events(), name="events", group="events", exit_on_error=False)  # ...then follows
        self._timer = self.set_interval(self.refresh_s, self.refresh_view, name="refresh")

    def set_refresh(self, seconds: float) -> None:
        """The refresh period (``--interval``, ``:interval``): 0.25 s at the fastest, as nvitop."""
        self.refresh_s = min(60.0, max(0.25, float(seconds)))
        if self._timer is not None:
            self._timer.stop()
        self._timer = self.set_interval(self.refresh_s, self.refresh_view, name="refresh")

    def on_resize(self, event: events.Resize) -> None:
        if self._main is not None:  # mounted
            self._fit(event.size.width, event.size.height)

    def _fit(self, width: int, height: int) -> None:
        """A short terminal (80x24) is a first-class size: one line per GPU and a shorter bottom
        pane, so the table keeps at least 8 rows."""
        compact = 0 < height < COMPACT_BELOW_ROWS
        if self._main is not None:
            self._main.set_class(compact, "-compact")
        self.gpus.set_compact(compact)

    # ------------------------------------------------------------------ permissions

    def allowed(self, action: str, main: bool = False) -> bool:
        """Whether ``action`` may run now (``main``: as if from the main screen)."""
        if action in MUTATING and self.read_only:
            return False
        if action in DEMO_ACTIONS and self.demo is None:
            return False
        if action == "cycle_node" and not self.fleet_nodes():
            return False  # one host: there is no node to pick
        if not main and action in MAIN_ONLY and self._main is not None and (
            not self.screen_stack or self.screen is not self._main
        ):
            return False
        return True

    def check_action(self, action: str, parameters: tuple[object, ...]) -> bool | None:
        if action in ("filter", "command_line") and isinstance(self.focused, Input):
            return False  # typed into the box that has the focus
        if action == "clear_filter" and not (self.picture.filter_text or self._filter_visible() or self.marked
                                             or self._command_visible()):
            return False
        if action == "evict" and self.allowed(action) and self._main is not None and not self.marked \
                and evict_refusal(self.selected()):
            return None  # shown greyed: it would fail on this row (pressing it says why)
        return self.allowed(action)

    def why_not(self, action: str) -> str | None:
        """Why a key of the main screen does nothing here, in words; None when it acts."""
        if action in MUTATING and self.read_only:
            return "changes the engine, and this console was started with --read-only."
        if action in DEMO_ACTIONS and self.demo is None:
            return ("sets the demo's traffic, and "
                    + ("an attached console has none: the server's clients send the traffic."
                       if self.client.url else "this console runs no demo (start it with --demo)."))
        if action == "cycle_node" and not self.fleet_nodes():
            return "picks the node that actions act on in a fleet (--serve --cluster); this is one host."
        m = self.selected()
        if action == "evict" and not self.marked and m is not None and (refusal := evict_refusal(m)):
            return f"does nothing: {label_of(m)} {refusal}."
        return None

    def on_key(self, event: events.Key) -> None:
        """A key that does nothing here says why (read-only, no demo, one host), rather than
        nothing at all (its binding is hidden and refused)."""
        if self.screen is not self._main or self.focused is not self.table:
            return
        b = keys.binding_for_key(event.key, self._keymap)
        reason = self.why_not(b.action) if b is not None else None
        if b is not None and reason is not None:
            prefix = "read-only: " if b.action in MUTATING and self.read_only else ""
            self.notify(f"{prefix}{event.key} ({b.description.lower()}) {reason}", severity="warning", timeout=4)
            event.stop()

    # ------------------------------------------------------------------ refresh

    def refresh_view(self, force: bool = False) -> None:
        """Read the client's latest snapshot and update what changed."""
        if not self.screen_stack:
            return  # the app is closing (a timer outlived the screens): nothing to paint
        behind = not force and self._main is not None and self.screen is not self._main
        connected = bool(self.client.connected)
        if connected != self._connected:
            self._set_connected(connected)
        try:
            snap = self.client.snapshot()
        except Exception as e:  # noqa: BLE001 - an engine shutting down: say so, keep the picture
            self.status_line.set(f" modelconsole: cannot read a snapshot: {type(e).__name__}: {e}")
            return
        if snap is None:
            self.status_line.set(" modelconsole: waiting for the first snapshot…")
            return
        if not self._seeded:
            self._seeded = True
            for ev in snap.get("events") or ():
                self.add_event(ev)
        if not connected and self._snapshot_ts is not None:
            return  # keep the last picture (greyed) until the link is back
        server_error = (snap.get("server") or {}).get("error")
        if server_error and connected and server_error != self._server_error:
            self._server_error = server_error  # e.g. the port is in use: on screen, not only in a log file
            self.banner.set(f" ⚠ {server_error} — the console works; clients cannot reach this engine")
            (self._main or self.screen).add_class("-server-error")
        self._snapshot_ts = snap.get("ts") or time.time()
        self.picture.routing = snap.get("routing") or {}
        if behind:
            # a dialog or a describe/logs view is on top: keep the picture those read (and the
            # header, which a dialog leaves in view) current, but leave the hidden table alone
            self.picture.models = {fmt.row_key(m): m for m in snap.get("models") or ()}
            self.show_status(snap)
            return
        with self.batch_update():
            self._update_models(snap.get("models") or [])
            self.gpus.update_devices(snap.get("devices") or [])
            self._update_nodes(snap.get("nodes") or [])
            self._update_detail()
            self.show_status(snap)

    def refresh_soon(self) -> None:
        """Refresh within 50 ms, coalescing bursts (an event, an action's answer)."""
        if not self._soon:
            self._soon = True
            self.set_timer(0.05, self._refresh_now)

    def _update_nodes(self, nodes: list[dict[str, Any]]) -> None:
        lines = fmt.node_lines(nodes)
        self.nodes_panel.display = bool(lines)
        if lines:
            self.nodes_panel.styles.height = len(lines)
            self.nodes_panel.set("\n".join(lines))

    def _refresh_now(self) -> None:
        self._soon = False
        self.refresh_view()

    def _set_connected(self, connected: bool) -> None:
        self._connected = connected
        main = self._main or self.screen
        main.set_class(not connected, "-disconnected")
        if not connected:
            since = fmt.clock(self._snapshot_ts) if self._snapshot_ts else "—"
            where = self.client.url or "the engine"
            self.banner.set(
                f" ⚠ connection lost to {where} — reconnecting…  (the picture below is from {since})")
        else:
            self.banner.set(f" ⚠ {self._server_error}" if self._server_error else "")

    def _style(self, kind: str, value: str) -> str:
        return self._styles.get(f"{kind}:{value}", "")

    def _on_theme_changed(self, theme: Any) -> None:
        self._restyle = True
        self.refresh_soon()

    def _compute_styles(self) -> None:
        v = self.get_css_variables()
        ok, warn, err = v.get("success", "green"), v.get("warning", "yellow"), v.get("error", "red")
        muted = "dim"
        self._styles = {
            "state:READY": f"bold {ok}", "state:LOADING": warn, "state:WARMING": warn, "state:UNLOADING": warn,
            "state:FAILED": f"bold {err}", "state:UNLOADED": muted,
            "health:ok": ok, "health:idle": muted, "health:slow": warn, "health:errors": f"bold {err}",
            "health:failed": f"bold {err}", "health:—": muted,
        }

    def _cell(self, col: str, text: str, sort_value: Any, name_key: Any, version_key: Any) -> SortText:
        style = self._style(col, text) if col in ("state", "health") else \
            "bold reverse" if col == "name" and text.startswith("✓") else ""
        cell = SortText(text, style=style, no_wrap=True, overflow="ellipsis")
        cell.sort_key = (sort_value, name_key, version_key)
        return cell

    def _update_models(self, models: list[dict[str, Any]]) -> None:
        """Diff the rows the picture shows against the table's cells: add, rewrite only the
        changed cells (one repaint), remove; sort again when a row came or a sort value moved."""
        table = self.table
        restyle = self._restyle
        if restyle:
            self._compute_styles()
            self._restyle = False
        shown: set[str] = set()
        added = resort = False
        sort_col = self.picture.sort_col
        changes: list[tuple[str, str, Any]] = []
        for key, cells in self.picture.observe(models, time.monotonic()):
            shown.add(key)
            nk, vk = cells["name"][1], cells["version"][1]
            old = self._cells.get(key)
            if old is None:
                table.add_row(*[self._cell(c, *cells[c], nk, vk) for c in fmt.COLUMN_KEYS], key=key)
                added = True
            else:
                for c in fmt.COLUMN_KEYS:
                    new = cells[c]
                    if restyle or old[c][0] != new[0] or (c == sort_col and old[c][1] != new[1]):
                        changes.append((key, c, self._cell(c, *new, nk, vk)))
                        if c == sort_col:
                            resort = True
            self._cells[key] = cells
        table.update_cells(changes)  # only the changed cells, one repaint
        for key in [k for k in self._cells if k not in shown]:
            table.remove_row(key)
            del self._cells[key]
        if added or resort:
            self._sort()

    def _sort(self) -> None:
        selected = self.selected_key()
        self.table.sort(self.picture.sort_col, key=lambda cell: cell.sort_key, reverse=self.picture.sort_reverse)
        self._label_sorted()
        if selected is not None and selected in self._cells:
            row = self.table.get_row_index(selected)
            if row != self.table.cursor_row:
                self.table.move_cursor(row=row, animate=False)

    def _update_detail(self) -> None:
        key = self.selected_key()
        m = self.models.get(key) if key else None
        evictable = evict_refusal(m) is None
        if evictable != self._evictable:
            self._evictable = evictable
            if self.screen_stack:
                self.refresh_bindings()  # the footer greys e where evicting would fail
        if m is None:
            self.detail.show(None, deque(), deque(), [])
            return
        assert key is not None
        lat, rate = self.picture.histories(key)
        self.detail.show(m, lat, rate, self.picture.recent_events(key, m["name"]), self.routing.get(m["name"]))

    def show_status(self, snap: dict[str, Any]) -> None:
        server = snap.get("server") or {}
        if self.client.url:
            where = f"attached to {self.client.url}"
        elif self.embedded:
            where = f"embedded · {server['url']}" if server.get("url") else "embedded (no HTTP server)"
        else:
            where = "in-process"
        demo = float(getattr(self.demo, "rate", 0.0) or 0.0) if self.demo is not None else None
        view = status.View(where, self.size.width, bool(self._server_error or not self.client.connected),
                           len(self._cells), self.target_node, dict(self.ops.swapping), demo, self.read_only)
        self.status_line.set(status.status_text(snap, self.picture, view))

    # ------------------------------------------------------------------ events

    async def _consume_events(self) -> None:
        async for ev in self.client.events():
            self.add_event(ev, live=True)

    def add_event(self, ev: dict[str, Any], live: bool = False) -> None:
        """Show one engine (or console) event in the log and in its model's detail; ``live``: it
        just happened (not the snapshot's history), so an alert event raises an alert."""
        kind = ev.get("kind")
        if not self.picture.add_event(ev):
            return  # already shown (the snapshot's recent events overlap the stream)
        alert = live and self._is_alert(ev)
        self.log_line(("⚠ " if alert else "") + (ev.get("message") or kind or "?"), ev.get("level") or "info",
                  ev.get("ts"), alert=alert)
        if alert:
            self._alert(ev)
        elif live and kind == "canary_promoted":
            self.notify(ev.get("message") or "canary promoted", title="canary promoted", timeout=8)
        if self._seeded and (kind in STATE_EVENTS or str(kind or "").startswith(ROUTING_EVENT_PREFIXES)):
            self.refresh_soon()

    @staticmethod
    def _is_alert(ev: dict[str, Any]) -> bool:
        return ev.get("kind") in ALERT_EVENTS

    def _alert(self, ev: dict[str, Any]) -> None:
        """A canary rolled back: a notification that stays until read, and the log line highlighted."""
        message = ev.get("message") or ev.get("kind") or "alert"
        self.alerts.append(message)
        what = f"{ev['model']}: " if ev.get("model") else ""
        title = "canary rolled back" if ev.get("kind") == "canary_rolled_back" else str(ev.get("kind"))
        self.notify(message, title=f"⚠ {what}{title}", severity="error", timeout=60)

    def log_line(self, message: str, level: str = "info", ts: float | None = None, alert: bool = False) -> None:
        line = f"{fmt.clock(ts)} {message}"
        self.event_lines.append(line)
        style = ALERT_STYLE if alert else LEVEL_STYLE.get(level, "")
        self.log_widget.write(Text(line, style=style))

    # ------------------------------------------------------------------ selection

    def selected_key(self) -> str | None:
        table = self.table
        if table.row_count == 0:
            return None
        row = min(max(table.cursor_row, 0), table.row_count - 1)
        try:
            return table.coordinate_to_cell_key(Coordinate(row, 0)).row_key.value
        except Exception:  # noqa: BLE001 - no such cell: nothing selected
            return None

    def selected(self) -> dict[str, Any] | None:
        key = self.selected_key()
        return self.models.get(key) if key else None

    @on(DataTable.RowHighlighted, "#models")
    def _row_highlighted(self, event: DataTable.RowHighlighted) -> None:
        self._update_detail()

    def need_selection(self) -> dict[str, Any] | None:
        m = self.selected()
        if m is None:
            self.notify("No model selected.", severity="warning")
        return m

    # ------------------------------------------------------------------ actions (actions.py)

    def fleet_nodes(self) -> list[str]:
        """The live nodes of the fleet this console is attached to (none on one host)."""
        snap = self.client.snapshot() or {}
        return [n["node"] for n in snap.get("nodes") or () if n.get("health") in ("ok", "degraded")]

    def action_cycle_node(self) -> None:
        self.ops.cycle_node()

    def action_load(self) -> None:
        self.ops.load()

    def action_unload(self) -> None:
        self.ops.unload()

    def action_evict(self) -> None:
        self.ops.evict()

    def action_delete(self) -> None:
        self.ops.delete()

    def action_pin(self) -> None:
        self.ops.pin()

    def action_priority_up(self) -> None:
        self.ops.priority_up()

    def action_priority_down(self) -> None:
        self.ops.priority_down()

    def action_register(self) -> None:
        self.ops.register()

    def action_swap(self) -> None:
        self.ops.swap()

    def action_split(self) -> None:
        self.ops.split()

    def action_canary(self) -> None:
        self.ops.canary()

    def run_command(self, text: str) -> bool:
        """Run a ``:`` command line; a mistake is a notification saying what was expected."""
        return self.ops.run_command(text)

    # -- filter, sort, theme, demo, help, quit

    def _command_visible(self) -> bool:
        box = getattr(self, "command_box", None)
        return box is not None and box.has_class("-active")

    def _filter_visible(self) -> bool:
        box = getattr(self, "filter_box", None)
        return box is not None and box.has_class("-active")

    def action_filter(self) -> None:
        box = self.filter_box
        box.add_class("-active")
        box.value = self.picture.filter_text
        self.screen.set_focus(box)  # at once (focus() waits a turn): the next keys of a paste go here
        self.refresh_bindings()

    def set_filter(self, text: str) -> None:
        error = self.picture.set_filter(text)
        if error is not None:
            self.notify(f"filter: /{text}/ is not a regular expression ({error}); matching it as plain text.",
                        severity="warning", timeout=4)
        self.refresh_view(force=True)

    @on(Input.Changed, "#filter")
    def _filter_changed(self, event: Input.Changed) -> None:
        self.set_filter(event.value.strip())

    @on(Input.Submitted, "#filter")
    def _filter_submitted(self, event: Input.Submitted) -> None:
        self.set_filter(event.value.strip())
        event.input.remove_class("-active")
        self.table.focus()
        self.refresh_bindings()

    def action_clear_filter(self) -> None:
        if self._command_visible():
            self._close_command_line()
            return
        if not self.picture.filter_text and not self._filter_visible() and self.marked:
            self.marked.clear()  # no filter to clear: esc clears the marks
            self.notify("marks cleared.", timeout=2)
            self.refresh_view(force=True)
            return
        box = self.filter_box
        box.remove_class("-active")
        if box.value:
            box.value = ""
        self.set_filter("")
        self.table.focus()
        self.refresh_bindings()

    def sort_by(self, col: str, reverse: bool | None = None) -> None:
        """Sort by ``col``; ``reverse`` None: a newly picked column starts in its natural order
        (numbers largest first), the same column keeps its order."""
        self.picture.sort_to(col, reverse)
        self._sort()
        snap = self.client.snapshot()
        if snap:
            self.show_status(snap)
        self.notify(f"sorted by {fmt.COLUMN_LABELS[col]} {'↓' if self.picture.sort_reverse else '↑'}", timeout=2)

    @property
    def sort_column(self) -> str:
        return self.picture.sort_col

    def action_sort(self) -> None:
        self.sort_by(self.picture.sort_step(+1))

    def action_reverse_sort(self) -> None:
        self.sort_by(self.picture.sort_col, not self.picture.sort_reverse)

    def action_sort_next(self) -> None:
        self.sort_by(self.picture.sort_step(+1))

    def action_sort_prev(self) -> None:
        self.sort_by(self.picture.sort_step(-1))

    @on(DataTable.HeaderSelected, "#models")
    def _header_clicked(self, event: DataTable.HeaderSelected) -> None:
        """A click on a column's header sorts by it; a second click reverses the order."""
        col = str(event.column_key.value)
        if col == self.picture.sort_col:
            self.sort_by(col, not self.picture.sort_reverse)
        else:
            self.sort_by(col)

    def _label_sorted(self) -> None:
        """An arrow in the sorted column's header, none in the others'."""
        table = self.table
        for key, label, _ in fmt.COLUMNS:
            column = table.columns.get(ColumnKey(key))
            if column is None:
                continue
            mark = "↓" if self.picture.sort_reverse else "↑"
            text = label.strip() + mark if key == self.picture.sort_col else label
            if column.label.plain != text:
                column.label = Text(text)
                table.refresh()

    # -- describe, logs, marks, the command line, the detail pane

    def _picture(self, key: str) -> Any:
        def picture() -> tuple[dict[str, Any] | None, dict[str, Any] | None, list[dict[str, Any]]]:
            m = self.models.get(key)
            name = key.partition(":")[0]
            return m, self.routing.get(name), self.picture.events_of(name)
        return picture

    def describe(self, key: str) -> None:
        name, _, version = key.partition(":")
        self.push_screen(DescribeScreen(key, self._picture(key), partial(self._audit_of, name, version),
                                        self.refresh_s))

    async def _audit_of(self, name: str, version: str | None) -> list[dict[str, Any]]:
        rows = await self.client.audit(200, name)
        return [r for r in rows if version is None or r.get("version") in (None, version)]

    def action_describe(self) -> None:
        key = self.selected_key()
        if key is None:
            self.notify("No model selected.", severity="warning")
            return
        self.describe(key)

    @on(DataTable.RowSelected, "#models")
    def _row_selected(self, event: DataTable.RowSelected) -> None:
        """Enter on a row describes it (k9s)."""
        if event.row_key.value is not None:
            self.describe(str(event.row_key.value))

    def logs(self, name: str) -> None:
        key = next((k for k in self.models if k.partition(":")[0] == name), f"{name}:")
        self.push_screen(LogScreen(name, self._picture(key), partial(self._audit_of, name, None), self.refresh_s))

    def action_logs(self) -> None:
        m = self.need_selection()
        if m is not None:
            self.logs(m["name"])

    def action_mark(self) -> None:
        key = self.selected_key()
        if key is None:
            return
        self.marked.symmetric_difference_update({key})
        self.refresh_view(force=True)
        if self.table.cursor_row < self.table.row_count - 1:
            self.table.move_cursor(row=self.table.cursor_row + 1, animate=False)

    def action_toggle_pane(self) -> None:
        hidden = not self.bottom.has_class("-hidden")
        self.bottom.set_class(hidden, "-hidden")
        self.notify("detail pane hidden (i shows it)" if hidden else "detail pane shown", timeout=2)

    def action_command_line(self) -> None:
        box = self.command_box
        box.add_class("-active")
        box.value = ":"
        self.screen.set_focus(box)  # at once (focus() waits a turn): the next keys of a paste go here
        box.cursor_position = 1

    def _close_command_line(self) -> None:
        self.command_box.remove_class("-active")
        self.command_box.value = ""
        self.table.focus()

    def completions(self, text: str) -> list[str]:
        return cmds.complete(text, self.picture.versions_by_name(),
                             [label.strip() for _, label, _ in fmt.COLUMNS if label.strip()])

    @on(Input.Submitted, "#command")
    def _command_submitted(self, event: Input.Submitted) -> None:
        text = event.value
        self._close_command_line()
        if text.strip(" :"):
            self.run_command(text)

    def select(self, name: str, version: str | None) -> bool:
        """Move the cursor to ``name``'s ``version`` (its active one when None); say so when the
        filter hides it."""
        version = version or self.picture.active_version(name)
        key = f"{name}:{version}"
        if key not in self._cells:
            self.notify(f"{name} v{version} is hidden by the filter /{self.picture.filter_text}/: esc clears it.",
                        severity="warning")
            return False
        self.table.move_cursor(row=self.table.get_row_index(key), animate=False)
        return True

    def jump(self, pattern: str) -> bool:
        """Move the cursor to the first row shown whose name:version contains ``pattern``."""
        p = pattern.lower()
        for row in range(self.table.row_count):
            key = self.table.coordinate_to_cell_key(Coordinate(row, 0)).row_key.value
            if key is not None and p in str(key).lower():
                self.table.move_cursor(row=row, animate=False)
                return True
        self.notify(f":model: nothing shown matches '{pattern}'", severity="warning")
        return False

    def action_cycle_theme(self) -> None:
        names = [n for n in THEME_CYCLE if n in self.available_themes]
        i = names.index(self.theme) if self.theme in names else -1
        self.theme = names[(i + 1) % len(names)]
        self.notify(f"theme {self.theme}", timeout=2)

    def _demo_rate(self, factor: float) -> None:
        if self.demo is None:
            return
        rate = float(getattr(self.demo, "rate", 0.0) or 0.0)
        new = rate * factor if rate > 0 else 1.0
        new = min(max(new, 0.125), 10_000.0)
        self.demo.rate = new
        self.log_line(f"→ demo traffic {fmt.rate(rate)} → {fmt.rate(new)} req/s")
        self.notify(f"demo traffic {fmt.rate(new)} req/s", timeout=2)
        snap = self.client.snapshot()
        if snap:
            self.show_status(snap)

    def action_demo_slower(self) -> None:
        self._demo_rate(0.5)

    def action_demo_faster(self) -> None:
        self._demo_rate(2.0)

    def help_rows(self) -> list[tuple[str, str, str, bool]]:
        """(keys, description, binding id, enabled now) per key (``keys.help_rows``)."""
        return keys.help_rows(self._keymap, self.read_only, partial(self.allowed, main=True), self.get_key_display)

    def action_help(self) -> None:
        notes = [*([keys.READ_ONLY_NOTE] if self.read_only else []), *keys.HELP_NOTES]
        self.push_screen(HelpScreen(self.help_rows(), notes))

    def action_request_quit(self) -> None:
        """Quit: attached (or with no traffic) at once; embedded while traffic flows, after a
        confirmation, since quitting stops the engine and its HTTP server."""
        if self.embedded and fmt.traffic_flowing(self.client.snapshot()):
            if self._asking_quit:
                return  # the question is on screen already: one is enough
            models = (self.client.snapshot() or {}).get("models") or []
            rate = sum(fmt.throughput(m) for m in models)  # the header's figure: answers/s over 10 s
            busy = sum((m.get("queue") or 0) + (m.get("in_flight") or 0) for m in models)
            self._asking_quit = True
            self.ops.confirm("Quit while serving?",
                          f"Traffic is flowing ({fmt.rate(rate)} req/s, {busy} queued or running). Quitting stops "
                          "the embedded engine and its HTTP server.", "Quit", self.exit, self._quit_answered)
            return
        self.exit()

    def _quit_answered(self) -> None:
        self._asking_quit = False

    async def action_quit(self) -> None:
        """Textual's quit (ctrl+q, a priority key that works from any screen): the same as ``q``,
        so an embedded console asks first while traffic flows instead of stopping at once."""
        self.action_request_quit()
