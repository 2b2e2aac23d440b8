"""The operator console: a Textual app over an ``EngineClient`` (embedded or attached).

The app never imports torch, the scheduler or the server: it reads
``client.snapshot()`` on a timer and ``client.events()`` in an async worker,
and changes things through the client's control calls, each run as a worker
on the app's loop, so the screen keeps updating while a model loads.

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

import re
import time
from collections import deque
from collections.abc import Iterable
from functools import partial
from typing import Any, ClassVar

from rich.text import Text
from textual import events, on
from textual.app import App, ComposeResult
from textual.binding import Binding
from textual.command import DiscoveryHit, Hit, Hits, Provider
from textual.containers import Horizontal
from textual.coordinate import Coordinate
from textual.suggester import Suggester
from textual.widgets import DataTable, Footer, Input, RichLog
from textual.widgets.data_table import ColumnKey

from modelconsole.themes import DEFAULT_THEME, THEMES, stylesheet

from . import __version__
from . import commands as cmds
from . import format as fmt
from .client import ClientError, EngineClient
from .screens import (
    CanaryScreen,
    ConfirmScreen,
    HelpScreen,
    RegisterScreen,
    SplitScreen,
    VersionPickerScreen,
)
from .views import DescribeScreen, LogScreen
from .widgets import HISTORY, DetailPane, GpuPanel, Line, ModelTable, SortText

# actions that change the engine: hidden and refused in read-only mode
MUTATING = frozenset({"load", "unload", "evict", "pin", "priority_up", "priority_down", "register",
                      "swap", "split", "canary", "delete"})
COMPACT_BELOW_ROWS = 34  # a terminal shorter than this gets one line per GPU and a shorter bottom pane
DEMO_ACTIONS = frozenset({"demo_slower", "demo_faster"})
# actions that make sense only on the main screen (not from inside a dialog)
MAIN_ONLY = MUTATING | DEMO_ACTIONS | frozenset({"filter", "sort", "reverse_sort", "help", "cycle_theme",
                                                 "request_quit", "clear_filter", "sort_next", "sort_prev",
                                                 "describe", "logs", "mark", "command_line", "toggle_pane"})
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
FAILURE_MEMORY_S = 30.0  # a model that failed a request this recently shows health "errors"
LEVEL_STYLE = {"error": "bold red", "warning": "yellow"}

# (action, palette title, help) for the command palette; every action the keys reach
PALETTE: tuple[tuple[str, str, str], ...] = (
    ("load", "Load the selected model", "load its weights onto its device (l)"),
    ("unload", "Unload the selected model", "stop serving it and free its memory, after a confirmation (u)"),
    ("evict", "Evict the selected model", "free its device memory now, as an eviction would (e)"),
    ("pin", "Pin / unpin the selected model", "a pinned model is never evicted (p)"),
    ("priority_up", "Raise base priority", "one level more urgent, toward P1 (+)"),
    ("priority_down", "Lower base priority", "one level less urgent (-)"),
    ("register", "Register a model", "name, source, version and options (r)"),
    ("delete", "Delete the selected version", "for good; the model too when it is its only version (X, del)"),
    ("swap", "Hot swap to another version", "load it beside the active one, switch, drain, unload the old (s)"),
    ("split", "A/B split between versions", "weights per version, shadow versions, a metric output (a)"),
    ("canary", "Canary a version (or abort one)", "rising steps within error and p95 bounds, or abort (c)"),
    ("describe", "Describe the selected version", "config, tensors, memory, routing, keep value, audit (d, enter)"),
    ("logs", "Logs of the selected model", "its events only, wrapped; y copies the last error (L)"),
    ("mark", "Mark / unmark the selected row", "u, e and p then act on every marked row (space)"),
    ("command_line", "Command line", ":unload NAME, :swap NAME 2, :split NAME 1=80 2=20, :model NAME (:)"),
    ("filter", "Filter models", "a regular expression over name, version, state, device (/)"),
    ("clear_filter", "Clear the filter (and the marks)", "show every model (esc)"),
    ("sort_next", "Sort by the column to the right", "numbers largest first; a header click sorts too (.)"),
    ("sort_prev", "Sort by the column to the left", "(,)"),
    ("sort", "Cycle the sort column (as . does)", "(o)"),
    ("reverse_sort", "Reverse the sort order", "(O)"),
    ("toggle_pane", "Show / hide the detail pane", "more rows for the table (i)"),
    ("cycle_theme", "Next theme", "cycle the console's themes (t)"),
    ("cycle_node", "Target node", "attached to a fleet: load/unload/evict/pin act on one node, or all (n)"),
    ("demo_slower", "Demo traffic: halve the rate", "([)"),
    ("demo_faster", "Demo traffic: double the rate", "(])"),
    ("help", "Help: every key", "(?)"),
    ("request_quit", "Quit", "attached: the server keeps running (q)"),
)


class CommandSuggester(Suggester):
    """The ``:`` line's inline completion: the first command line its last word can become."""

    def __init__(self, app: ModelConsoleApp) -> None:
        super().__init__(use_cache=False, case_sensitive=True)
        self.console = app

    async def get_suggestion(self, value: str) -> str | None:
        found = self.console.completions(value)
        return found[0] if found else None


class CommandInput(Input):
    """The ``:`` line: Tab completes (to the one candidate, or to what all candidates share,
    listing them), instead of moving the focus."""

    BINDINGS = [Binding("tab", "complete", "Complete", show=False, priority=True)]

    def __init__(self, **kw: Any) -> None:
        super().__init__(select_on_focus=False, **kw)

    def action_complete(self) -> None:
        app = self.app
        assert isinstance(app, ModelConsoleApp)
        found = app.completions(self.value)
        if not found:
            return
        if len(found) == 1:
            self.value = found[0] + ("" if found[0].endswith("=") else " ")
        else:
            common = found[0]
            for f in found[1:]:
                while not f.startswith(common):
                    common = common[:-1]
            if len(common) > len(self.value):
                self.value = common
            app.notify("  ".join(f.rsplit(" ", 1)[-1] for f in found[:20]), title="completions", timeout=4)
        self.cursor_position = len(self.value)


class ActionCommands(Provider):
    """Every console action in the command palette (the ones read-only mode allows), then
    Textual's own commands (theme, keys, screenshot...).  One provider for both, so the
    palette lists them in the same order every time: two providers' hits arrive
    interleaved, in an order that changes from run to run."""

    def _commands(self) -> Iterable[tuple[str, str, Any]]:
        app = self.app
        if not isinstance(app, ModelConsoleApp):
            return []
        out = []
        for action, title, help_text in PALETTE:
            if app.allowed(action, main=True):
                out.append((title, help_text, partial(app.run_action, action)))
        for key in fmt.COLUMN_KEYS:
            label = fmt.COLUMN_LABELS[key]
            out.append((f"Sort by {label}", f"sort the models table by its '{label}' column",
                        partial(app.sort_by, key)))
        return out

    def _system(self, discovery: bool) -> list[tuple[str, str, Any]]:
        """Textual's system commands, by title (as its own provider lists them), less its Quit:
        the console's own (above) is the same action, and says what quitting does."""
        found = sorted(self.app.get_system_commands(self.screen), key=lambda c: c[0])
        return [(title, help_text, callback) for title, help_text, callback, discover in found
                if (discover or not discovery) and callback != self.app.action_quit]

    async def discover(self) -> Hits:
        for title, help_text, callback in [*self._commands(), *self._system(True)]:
            yield DiscoveryHit(title, callback, help=help_text)

    async def search(self, query: str) -> Hits:
        matcher = self.matcher(query)
        for title, help_text, callback in [*self._commands(), *self._system(False)]:
            score = matcher.match(title)
            if score > 0:
                yield Hit(score, matcher.highlight(title), callback, help=help_text)


class ModelConsoleApp(App[None]):
    """The console.  ``embedded``: the engine lives in this process (quitting stops it, so ``q``
    asks while traffic flows); ``read_only``: every state-changing action is hidden and refused;
    ``theme``: a registered theme's name; ``demo``: an object with a settable ``rate`` (req/s)
    that ``[``/``]`` halve/double; ``refresh_s``: the screen's refresh period;
    ``keymap``: binding id -> keys, to remap (e.g. ``{"load": "L"}``)."""

    CSS_PATH = str(stylesheet())
    TITLE = "modelconsole"
    COMMANDS: ClassVar[set[type[Provider]]] = {ActionCommands}  # the console's actions, and Textual's
    ENABLE_COMMAND_PALETTE = True

    BINDINGS = [
        # help and quit first: the footer shows them even when it cannot show everything
        Binding("question_mark,f1", "help", "Help", id="help", key_display="?"),
        Binding("q", "request_quit", "Quit", id="quit"),
        Binding("d", "describe", "Describe", id="describe"),
        Binding("L", "logs", "Logs", id="logs", show=False),
        Binding("l", "load", "Load", id="load"),
        Binding("u", "unload", "Unload", id="unload"),
        Binding("e", "evict", "Evict", id="evict"),
        Binding("p", "pin", "Pin", id="pin"),
        Binding("plus,equals_sign", "priority_up", "Prio+", id="priority_up", key_display="+"),
        Binding("minus", "priority_down", "Prio-", id="priority_down", key_display="-"),
        Binding("r", "register", "Register", id="register"),
        Binding("X,delete", "delete", "Delete", id="delete", show=False),
        Binding("s", "swap", "Swap", id="swap"),
        Binding("a", "split", "A/B", id="split"),
        Binding("c", "canary", "Canary", id="canary"),
        # attached to a fleet: which node l/u/e/p act on (all of them, or one; the status line says)
        Binding("n", "cycle_node", "Node", id="node", show=False),
        # priority: a "/tiny" or ":unload tiny" that arrives in one read (SSH, a paste) opens the
        # box before the rest is handed out, so the rest is typed into it (check_action lets the
        # key through to an input that has the focus)
        Binding("slash", "filter", "Filter", id="filter", key_display="/", priority=True),
        Binding("escape", "clear_filter", "Clear filter", id="clear_filter", show=False),
        Binding("full_stop", "sort_next", "Sort →", id="sort_next", key_display=".", show=False),
        Binding("comma", "sort_prev", "Sort ←", id="sort_prev", key_display=",", show=False),
        Binding("o", "sort", "Sort", id="sort", show=False),  # the footer is full: help and palette list it
        Binding("O", "reverse_sort", "Reverse sort", id="reverse_sort", show=False),
        Binding("space", "mark", "Mark", id="mark", show=False),
        Binding("colon", "command_line", "Command", id="command", key_display=":", priority=True),
        # naming ``command_palette`` here stops Textual adding its own ctrl+p
        Binding("ctrl+p", "command_palette", "Palette", id="palette", show=False),
        Binding("i", "toggle_pane", "Pane", id="pane", show=False),
        Binding("t", "cycle_theme", "Theme", id="theme"),
        Binding("left_square_bracket", "demo_slower", "Demo-", id="demo_slower", key_display="["),
        Binding("right_square_bracket", "demo_faster", "Demo+", id="demo_faster", key_display="]"),
    ]

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
        # the picture
        self.models: dict[str, dict[str, Any]] = {}  # row key -> the version's latest snapshot
        self.routing: dict[str, dict[str, Any]] = {}  # model name -> its routing (split, canary, swap)
        self.alerts: list[str] = []  # alerts raised (a canary rolled back), oldest first
        self._swapping: dict[str, str] = {}  # name -> version: swaps this console started, until answered
        self._cells: dict[str, dict[str, tuple[str, Any]]] = {}  # row key -> shown (text, sort value)
        self._lat_hist: dict[str, deque[float]] = {}
        self._rate_hist: dict[str, deque[float]] = {}
        self._fail_seen: dict[str, tuple[int, float]] = {}
        self._model_events: dict[str, deque[dict[str, Any]]] = {}
        self._name_events: dict[str, deque[dict[str, Any]]] = {}  # a model's events, every version (logs)
        self.marked: set[str] = set()  # row keys marked with space: u and p act on them all
        self.event_lines: deque[str] = deque(maxlen=1000)  # the event log, as plain text
        self._max_seq = 0
        self._seeded = False
        self._snapshot_ts: float | None = None
        self._sort_col = "name"
        self._sort_reverse = False
        self._filter_text = ""
        self.target_node: str | None = None  # attached to a fleet: the node l/u/e/p act on (None: all)
        self._filter_re: re.Pattern[str] | None = None
        self._filter_error: str | None = None
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
        if action == "cycle_node" and not self._fleet_nodes():
            return False  # one host: there is no node to pick
        if not main and action in MAIN_ONLY and self._main is not None and (
            not self.screen_stack or self.screen is not self._main
        ):
            return False
        return True

    def check_action(self, action: str, parameters: tuple[object, ...]) -> bool | None:
        if action in ("filter", "command_line") and isinstance(self.focused, Input):
            return False  # typed into the box that has the focus
        if action == "clear_filter" and not self._filter_text and not self._filter_visible() and not self.marked \
                and not self._command_visible():
            return False
        if action == "evict" and self.allowed(action) and self._main is not None and not self.marked \
                and self.evict_refusal(self.selected()):
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
        if action == "cycle_node" and not self._fleet_nodes():
            return "picks the node that actions act on in a fleet (--serve --cluster); this is one host."
        m = self.selected()
        if action == "evict" and not self.marked and m is not None and (refusal := self.evict_refusal(m)):
            return f"does nothing: {self._label(m)} {refusal}."
        return None

    def on_key(self, event: events.Key) -> None:
        """A key that does nothing here says why (read-only, no demo, one host), rather than
        nothing at all (its binding is hidden and refused)."""
        if self.screen is not self._main or self.focused is not self.table:
            return
        for b in self.BINDINGS:
            assert isinstance(b, Binding)
            keys = (self._keymap.get(b.id, b.key) if b.id else b.key).split(",")
            if event.key not in [k.strip() for k in keys]:
                continue
            reason = self.why_not(b.action)
            if reason is not None:
                prefix = "read-only: " if b.action in MUTATING and self.read_only else ""
                self.notify(f"{prefix}{event.key} ({b.description.lower()}) {reason}", severity="warning", timeout=4)
                event.stop()
            return

    @staticmethod
    def evict_refusal(m: dict[str, Any] | None) -> str | None:
        """Why evicting ``m`` would fail (the engine refuses pinned and unloaded versions)."""
        if m is None:
            return None
        if m.get("pinned"):
            return "is pinned: unpin it (p) before evicting it"
        if m.get("state") in ("UNLOADED", "FAILED", None):
            return "is not loaded: there is nothing to evict"
        return None

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
        self.routing = snap.get("routing") or {}
        if behind:
            # a dialog or a describe/logs view is on top: keep the picture those read (and the
            # header, which a dialog leaves in view) current, but leave the hidden table alone
            self.models = {fmt.row_key(m): m for m in snap.get("models") or ()}
            self._update_status(snap)
            return
        with self.batch_update():
            self._update_models(snap.get("models") or [])
            self.gpus.update_devices(snap.get("devices") or [])
            self._update_nodes(snap.get("nodes") or [])
            self._update_detail()
            self._update_status(snap)

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

    def _matches(self, m: dict[str, Any]) -> bool:
        if self._filter_re is None:
            return True
        hay = f"{m.get('name')}:{m.get('version')} {m.get('state')} {m.get('device') or ''}"
        return self._filter_re.search(hay) is not None

    def _update_models(self, models: list[dict[str, Any]]) -> None:
        table = self.table
        now = time.monotonic()
        restyle = self._restyle
        if restyle:
            self._compute_styles()
            self._restyle = False
        current: dict[str, dict[str, Any]] = {}
        shown: set[str] = set()
        added = resort = False
        sort_col = self._sort_col
        changes: list[tuple[str, str, Any]] = []
        for m in models:
            key = fmt.row_key(m)
            current[key] = m
            stats = m.get("stats") or {}
            # histories (one sample per refresh) for the detail pane
            lat = self._lat_hist.get(key)
            if lat is None:
                lat = self._lat_hist[key] = deque(maxlen=HISTORY)
                self._rate_hist[key] = deque(maxlen=HISTORY)
            lat.append(((stats.get("latency_ms") or {}).get("p95")) or 0.0)
            self._rate_hist[key].append(fmt.throughput(m))
            fails = stats.get("fail") or 0
            seen = self._fail_seen.get(key)
            if seen is None:
                self._fail_seen[key] = (fails, -FAILURE_MEMORY_S)  # failures before we looked are not news
            elif fails != seen[0]:
                self._fail_seen[key] = (fails, now if fails > seen[0] else seen[1])
            recent = now - self._fail_seen[key][1] < FAILURE_MEMORY_S
            if not self._matches(m):
                continue
            shown.add(key)
            cells = fmt.model_cells(m, recent, self.routing.get(m.get("name")))
            if key in self.marked:
                cells["name"] = ("✓" + cells["name"][0], cells["name"][1])
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
        self.marked &= set(current)  # a deleted version is no longer marked
        for gone in [k for k in self._lat_hist if k not in current]:
            self._lat_hist.pop(gone, None)
            self._rate_hist.pop(gone, None)
            self._fail_seen.pop(gone, None)
        self.models = current
        if added or resort:
            self._sort()

    def _sort(self) -> None:
        selected = self.selected_key()
        self.table.sort(self._sort_col, key=lambda cell: cell.sort_key, reverse=self._sort_reverse)
        self._label_sorted()
        if selected is not None and selected in self._cells:
            row = self.table.get_row_index(selected)
            if row != self.table.cursor_row:
                self.table.move_cursor(row=row, animate=False)

    def _update_detail(self) -> None:
        key = self.selected_key()
        m = self.models.get(key) if key else None
        evictable = self.evict_refusal(m) is None
        if evictable != self._evictable:
            self._evictable = evictable
            if self.screen_stack:
                self.refresh_bindings()  # the footer greys e where evicting would fail
        if m is None:
            self.detail.show(None, deque(), deque(), [])
            return
        events = list(self._model_events.get(key, ())) + list(self._model_events.get(m["name"], ()))
        events.sort(key=lambda e: e.get("ts") or 0)
        self.detail.show(m, self._lat_hist.get(key, deque()), self._rate_hist.get(key, deque()), events,
                         self.routing.get(m["name"]))

    def _update_status(self, snap: dict[str, Any]) -> None:
        models = snap.get("models") or []
        ready = sum(1 for m in models if m.get("state") == "READY")
        total_rate = sum(fmt.throughput(m) for m in models)
        total_err = sum((m.get("stats") or {}).get("error_rps") or 0.0 for m in models)
        server = snap.get("server") or {}
        if self.client.url:
            where = f"attached to {self.client.url}"
        elif self.embedded:
            where = f"embedded · {server['url']}" if server.get("url") else "embedded (no HTTP server)"
        else:
            where = "in-process"
        # what the operator set (filter, sort) right after the counts: a narrow terminal cuts the
        # end of the line, and these must stay in view (k9s keeps its filter in the breadcrumb)
        parts = [f"{len(models)} models ({ready} ready)",
                 f"{fmt.rate(total_rate)} req/s" + (f" ({fmt.rate(total_err)} err/s)" if total_err else ""),
                 f"sort {fmt.COLUMN_LABELS[self._sort_col].strip()}{'↓' if self._sort_reverse else '↑'}"]
        if self._filter_text:
            bad = " (not a regex: as text)" if self._filter_error else ""
            parts.append(f"filter /{self._filter_text}/ {len(self._cells)} of {len(models)}{bad}")
        width = self.size.width
        if width >= 100 or self._server_error or not self.client.connected:
            parts.insert(0, where)
        if width >= 140:
            parts.insert(0, f"modelconsole {__version__}")
        if self.marked:
            parts.append(f"{len(self.marked)} marked (u, e, p act on them; esc clears)")
        if snap.get("nodes"):
            live = sum(1 for n in snap["nodes"] if n.get("health") in ("ok", "degraded"))
            degraded = sum(1 for n in snap["nodes"] if n.get("health") == "degraded")
            target = f"node {self.target_node[:8]}" if self.target_node else "all nodes"
            parts.append(f"fleet {live} nodes" + (f" ({degraded} degraded)" if degraded else "")
                         + f" · actions on {target} (n)")
        for name in sorted(set(self.routing) | set(self._swapping)):
            routing = self.routing.get(name)
            line = fmt.swap_line(name, routing)
            if line is None and name in self._swapping:
                line = f"swap {name} →{self._swapping[name]}: starting"
            if line is None and fmt.canary_running(routing):
                c = (routing or {}).get("canary") or {}
                line = f"canary {name} →{c.get('version', '?')} {fmt._num(c.get('share') or 0)}%"
            if line:
                parts.append(line)
        if self.demo is not None:
            parts.append(f"demo {fmt.rate(float(getattr(self.demo, 'rate', 0.0) or 0.0))} req/s")
        if self.read_only:
            parts.append("READ-ONLY")
        self.status_line.set(" " + " · ".join(parts))

    # ------------------------------------------------------------------ events

    async def _consume_events(self) -> None:
        async for ev in self.client.events():
            self.add_event(ev, live=True)

    def add_event(self, ev: dict[str, Any], live: bool = False) -> None:
        """Show one engine (or console) event in the log and in its model's detail; ``live``: it
        just happened (not the snapshot's history), so an alert event raises an alert."""
        kind = ev.get("kind")
        seq = ev.get("seq")
        if kind == "connection" and (ev.get("data") or {}).get("restarted"):
            self._max_seq = 0  # a new server numbers its events from 1 again
        if seq is not None:
            if seq <= self._max_seq:
                return  # already shown (the snapshot's recent events overlap the stream)
            self._max_seq = seq
        alert = live and self._is_alert(ev)
        self._log(("⚠ " if alert else "") + (ev.get("message") or kind or "?"), ev.get("level") or "info",
                  ev.get("ts"), alert=alert)
        if alert:
            self._alert(ev)
        elif live and kind == "canary_promoted":
            self.notify(ev.get("message") or "canary promoted", title="canary promoted", timeout=8)
        name = ev.get("model")
        if name:
            key = f"{name}:{ev['version']}" if ev.get("version") is not None else name
            self._model_events.setdefault(key, deque(maxlen=20)).append(ev)
            self._name_events.setdefault(name, deque(maxlen=1000)).append(ev)
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

    def _log(self, message: str, level: str = "info", ts: float | None = None, alert: bool = False) -> None:
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

    def _need_selection(self) -> dict[str, Any] | None:
        m = self.selected()
        if m is None:
            self.notify("No model selected.", severity="warning")
        return m

    # ------------------------------------------------------------------ running actions

    def _run(self, label: str, call: Any, done: Any = None, model: str | None = None) -> None:
        """Run a client call as a worker; its outcome goes to a notification.  The event log gets
        one line per action: the engine's own event when it succeeds (loaded, unloaded, pinned...),
        or one ``✗`` line when it was refused or failed without an error event of the engine's
        (a failed load has its ``load_failed`` event already).  ``model``: the name it acts on."""
        since = self._max_seq

        async def job() -> None:
            try:
                result = await call()
            except ClientError as e:
                self._failed(label, e.message, model, since)
                return
            except Exception as e:  # noqa: BLE001 - whatever it was, the operator reads it
                self._failed(label, f"{type(e).__name__}: {e}", model, since)
                return
            message = done(result) if done is not None else f"{label}: done"
            self.notify(message, title="done")
            self.refresh_soon()

        self.run_worker(job(), name=label, group="actions", exit_on_error=False)

    def _failed(self, label: str, message: str, model: str | None = None, since: int = 0) -> None:
        logged = model is not None and any(
            (ev.get("seq") or 0) > since and ev.get("level") == "error" for ev in self._name_events.get(model, ()))
        if not logged:
            self._log(f"✗ {label} failed: {message}", "error")
        self.notify(message, title=f"{label} failed", severity="error", timeout=8)
        self.refresh_soon()

    def _started(self, message: str) -> None:
        self.notify(message, timeout=3)

    @staticmethod
    def _label(m: dict[str, Any]) -> str:
        return f"{m['name']} v{m['version']}"

    # ------------------------------------------------------------------ actions

    def _fleet_nodes(self) -> list[str]:
        snap = self.client.snapshot() or {}
        return [n["node"] for n in snap.get("nodes") or () if n.get("health") in ("ok", "degraded")]

    def _where(self) -> dict[str, str]:
        """``node=`` for the control calls while one node is the target (``n``)."""
        return {"node": self.target_node} if self.target_node else {}

    def action_cycle_node(self) -> None:
        """The whole fleet, then each live node in turn: what l, u, e and p act on."""
        nodes = self._fleet_nodes()
        order = [None, *nodes]
        i = order.index(self.target_node) if self.target_node in order else 0
        self.target_node = order[(i + 1) % len(order)]
        where = f"node {self.target_node[:8]} only" if self.target_node else "the whole fleet"
        self.notify(f"load, unload, evict and pin now act on {where}.", timeout=3)
        snap = self.client.snapshot()
        if snap:
            self._update_status(snap)  # the status line says so at once, not at the next refresh

    def action_load(self) -> None:
        m = self._need_selection()
        if m is None:
            return
        label = self._label(m)
        if m.get("state") == "READY":
            self.notify(f"{label} is already loaded.")
            return
        self._started(f"loading {label}…")
        self._run(f"load {label}", partial(self.client.load, m["name"], m["version"], **self._where()),
                  lambda r: f"{label} is {r.get('state', 'READY')} on {fmt.device_label(r)}"
                  + (f" ({r['load_seconds']:.1f} s)" if r.get("load_seconds") else ""), model=m["name"])

    def _confirm(self, title: str, message: str, confirm_label: str, then: Any, after: Any = None) -> None:
        def answered(ok: bool | None) -> None:
            if after is not None:
                after()
            if ok:
                then()
            else:
                self.notify(f"{confirm_label}: cancelled.", timeout=2)
            self.refresh_soon()

        self.push_screen(ConfirmScreen(title, message, confirm_label), answered)

    def _bulk(self, verb: str, call: Any, confirm: bool) -> bool:
        """``verb`` every marked version (space): one confirmation that says how many, and how
        many of them the filter hides; one worker per version.  False when nothing is marked."""
        found, hidden = self._marked_models()
        if not found:
            return False
        labels = ", ".join(self._label(m) for m in found)
        hide = f" ({hidden} of them hidden by the filter)" if hidden else ""

        def go() -> None:
            for m in found:
                self._run(f"{verb} {self._label(m)}", partial(call, m), model=m["name"])
            self.marked.clear()
            self.refresh_view(force=True)
            self.refresh_bindings()

        if confirm:
            self._confirm(f"{verb.capitalize()} {len(found)} marked versions?", f"{labels}{hide}.",
                          verb.capitalize(), go)
        else:
            self._started(f"{verb} {len(found)} marked versions{hide}")
            go()
        return True

    def action_unload(self) -> None:
        if self._bulk("unload", lambda m: self.client.unload(m["name"], m["version"], **self._where()), True):
            return
        m = self._need_selection()
        if m is None:
            return
        label = self._label(m)
        busy = f" Its {m.get('queue', 0)} queued and {m.get('in_flight', 0)} running requests finish first." \
            if m.get("queue") or m.get("in_flight") else ""
        pinned = " It is pinned." if m.get("pinned") else ""

        def go() -> None:
            self._started(f"unloading {label}…")
            self._run(f"unload {label}", partial(self.client.unload, m["name"], m["version"], **self._where()),
                      lambda r: f"{label} is UNLOADED" if r.get("state", "UNLOADED") == "UNLOADED"
                      else f"{label} was unloaded; a request is loading it again ({r['state']})")

        self._confirm(f"Unload {label}?",
                      f"{label} stops serving until it is loaded again and its memory is freed.{busy}{pinned}",
                      "Unload", go)

    def action_evict(self) -> None:
        found, _ = self._marked_models()
        if found:
            why = {fmt.row_key(m): self.evict_refusal(m) for m in found}
            refused = [f"{self._label(m)} {why[fmt.row_key(m)]}" for m in found if why[fmt.row_key(m)]]
            if refused:
                self.notify("; ".join(refused[:4]) + (" …" if len(refused) > 4 else "") + " — left out.",
                            severity="warning", timeout=6)
            keep = {key for key, refusal in why.items() if not refusal}
            if not keep:
                return
            self.marked &= keep
            self._bulk("evict", lambda m: self.client.evict(m["name"], m["version"], **self._where()), True)
            return
        m = self._need_selection()
        if m is None:
            return
        label = self._label(m)
        refusal = self.evict_refusal(m)
        if refusal:
            self.notify(f"{label} {refusal}.", severity="warning", timeout=4)
            return
        why = "\n".join(fmt.eviction_lines(m.get("eviction"), m))

        def go() -> None:
            self._started(f"evicting {label}…")
            self._run(f"evict {label}", partial(self.client.evict, m["name"], m["version"], **self._where()),
                      lambda r: f"{label} evicted ({r.get('state', '?')})")

        self._confirm(f"Evict {label}?",
                      f"Free {label}'s device memory now; its next request reloads it "
                      f"(from the host tier when there is one).\n{why}", "Evict", go)

    def action_delete(self) -> None:
        m = self._need_selection()
        if m is None:
            return
        label = self._label(m)
        versions = [x for x in (self.client.snapshot() or {}).get("models") or () if x.get("name") == m["name"]]
        whole = len(versions) <= 1  # its only version: the model goes with it
        what = f"model {m['name']} (its only version, v{m['version']})" if whole else label

        def go() -> None:
            self._started(f"deleting {what}…")
            self._run(f"delete {what}", partial(self.client.delete, m["name"], None if whole else m["version"]),
                      lambda r: f"deleted {r.get('name')} " + ", ".join(f"v{v}" for v in r.get("deleted", [])))

        self._confirm(f"Delete {what}?",
                      f"{what} is removed for good: its registration, pin and priority, here and after a "
                      "restart (the audit log keeps the record). Refused while it is loaded, active with "
                      "other versions, or in a split, swap or canary.", "Delete", go)

    def action_pin(self) -> None:
        found, _ = self._marked_models()
        pin_all = not all(m.get("pinned") for m in found)  # all pinned already: unpin them
        if self._bulk("pin" if pin_all else "unpin",
                      lambda m: self.client.pin(m["name"], m["version"], pin_all, **self._where()), False):
            return
        m = self._need_selection()
        if m is None:
            return
        label = self._label(m)
        pinned = not m.get("pinned")
        verb = "pin" if pinned else "unpin"
        self._started(f"{verb}ning {label}…")
        self._run(f"{verb} {label}", partial(self.client.pin, m["name"], m["version"], pinned, **self._where()),
                  lambda r: f"{label} {'pinned: never evicted' if r.get('pinned') else 'unpinned'}")

    def _priority(self, step: int) -> None:
        m = self._need_selection()
        if m is None:
            return
        cfg = m.get("config") or {}
        base = int(cfg.get("priority") or 1)
        levels = int(cfg.get("priority_levels") or base)
        new = base + step
        label = self._label(m)
        if not 1 <= new <= levels:
            self.notify(f"{label} is already at P{base} "
                        f"({'the most urgent' if new < 1 else 'the least urgent'} of {levels} levels).",
                        severity="warning")
            return
        # later presses build on this one, before the snapshot says so
        m["config"] = dict(cfg, priority=new)
        self._started(f"{label}: base priority P{base} → P{new}")

        def done(r: dict[str, Any]) -> str:
            return f"{label} base priority is P{(r.get('config') or {}).get('priority', new)}"

        self._run(f"priority {label}", partial(self.client.set_priority, m["name"], m["version"], new), done)

    def action_priority_up(self) -> None:
        self._priority(-1)  # P1 is the most urgent

    def action_priority_down(self) -> None:
        self._priority(+1)

    def action_register(self) -> None:
        """The register form stays open until the registration succeeds: a refusal shows under
        the field it names, with everything typed still there."""

        async def register(form: dict[str, Any]) -> dict[str, Any]:
            return await self.client.register(form["name"], form["source"], form["version"], form["options"])

        def answered(result: dict[str, Any] | None) -> None:
            if not result:
                return
            self.notify(f"{result.get('name', '?')} v{result.get('version', '?')} registered "
                        f"({result.get('state', 'UNLOADED')}); l loads it", title="done")
            self.refresh_soon()

        self.push_screen(RegisterScreen(register), answered)

    # -- versions: swap, split, canary

    def _versions(self, name: str) -> list[dict[str, Any]]:
        """The name's registered versions (their latest snapshots), in version order."""
        found = [m for m in self.models.values() if m.get("name") == name]
        return sorted(found, key=lambda m: fmt._version_sort(m.get("version")))

    def _active_version(self, name: str) -> str | None:
        routing = self.routing.get(name) or {}
        if routing.get("active") is not None:
            return str(routing["active"])
        return next((str(m["version"]) for m in self._versions(name) if m.get("active")), None)

    @staticmethod
    def _version_desc(m: dict[str, Any]) -> str:
        cfg = m.get("config") or {}
        return f"{m.get('state', '?')} · {m.get('source') or cfg.get('source', '?')}"

    def _swap_busy(self, name: str) -> bool:
        swap = (self.routing.get(name) or {}).get("swap")
        if swap or name in self._swapping:
            to = (swap or {}).get("to") or self._swapping.get(name)
            self.notify(f"a swap of {name} is under way (→ v{to}): wait for it to finish.", severity="warning")
            return True
        return False

    def _name_free_of_swaps(self) -> str | None:
        """The selected model's name for a version action; None (having said why) when nothing
        is selected or a swap of that name is under way."""
        m = self._need_selection()
        if m is None or self._swap_busy(m["name"]):
            return None
        return m["name"]

    def action_swap(self) -> None:
        name = self._name_free_of_swaps()
        if name is None:
            return
        active = self._active_version(name)
        choices = [(str(v["version"]), self._version_desc(v)) for v in self._versions(name)
                   if str(v["version"]) != active]
        if not choices:
            self.notify(f"{name} has only v{active}: register another version (r) to swap to.", severity="warning")
            return

        def picked(version: str | None) -> None:
            if version is None:
                self.notify("swap: cancelled.", timeout=2)
                return

            def go() -> None:
                self._swap(name, active, version)

            self._confirm(f"Swap {name} v{active} → v{version}?",
                          f"v{version} is loaded and warmed beside v{active} (others may be evicted to make "
                          f"room), then routing switches at once; v{active} finishes everything queued and "
                          f"running, then unloads. If v{version} fails to load or warm, v{active} keeps serving.",
                          "Swap", go)

        self.push_screen(VersionPickerScreen(f"Swap {name} (active v{active}) to…", choices,
                                             "enter picks · esc cancels"), picked)

    def _swap(self, name: str, active: str | None, version: str) -> None:
        self._swapping[name] = version
        self._started(f"swapping {name} v{active} → v{version}…")

        async def call() -> dict[str, Any]:
            try:
                return await self.client.swap(name, version)
            finally:
                self._swapping.pop(name, None)

        def done(r: dict[str, Any]) -> str:
            secs = r.get("seconds")
            return (f"{name} swapped v{r.get('from', active)} → v{r.get('to', version)}"
                    + (f" in {secs:.1f} s" if isinstance(secs, (int, float)) else ""))

        self._run(f"swap {name}", call, done, model=name)
        self.refresh_soon()

    def action_split(self) -> None:
        name = self._name_free_of_swaps()
        if name is None:
            return
        versions = [str(v["version"]) for v in self._versions(name)]
        active = self._active_version(name)
        if len(versions) < 2:
            self.notify(f"{name} has only v{active}: register another version (r) to split between.",
                        severity="warning")
            return
        routing = self.routing.get(name) or {}
        weights = {str(v): float(w) for v, w in (routing.get("weights") or {}).items() if w}
        if not weights and active is not None:
            weights = {active: 100.0}

        def answered(form: dict[str, Any] | None) -> None:
            if not form:
                return
            if set(form["weights"]) == {active} and not form["shadow"]:
                form["weights"] = {}  # everything on the active version: no split at all
            shown = fmt.arms_label({"active": active, "weights": form["weights"], "shadow": form["shadow"]}) \
                or f"everything to v{active}"
            self._started(f"split {name}: {shown}")
            self._run(f"split {name}",
                      partial(self.client.set_split, name, form["weights"], form["shadow"] or None,
                              form["metric_output"]),
                      lambda r: f"{name} routes {fmt.arms_label(r) or 'everything to v' + str(r.get('active'))}",
                      model=name)

        self.push_screen(SplitScreen(name, versions, weights, [str(v) for v in routing.get("shadow") or ()],
                                     routing.get("metric_output")), answered)

    def action_canary(self) -> None:
        m = self._need_selection()
        if m is None:
            return
        name = m["name"]
        routing = self.routing.get(name) or {}
        if fmt.canary_running(routing):
            c = routing.get("canary") or {}
            base = c.get("baseline") or self._active_version(name)

            def stop() -> None:
                self._started(f"aborting the canary on {name}…")
                self._run(f"abort canary {name}", partial(self.client.stop_canary, name),
                          lambda r: f"canary on {name} aborted: v{r.get('active', base)} serves everything")

            self._confirm(f"Abort the canary on {name}?",
                          f"v{c.get('version', '?')} is at {fmt._num(c.get('share') or 0)}% of {name}'s traffic. "
                          f"Aborting sends its share back to 0: v{base} serves everything.", "Abort canary", stop)
            return
        if self._swap_busy(name):
            return
        active = self._active_version(name) or "?"
        candidates = [str(v["version"]) for v in self._versions(name) if str(v["version"]) != active]
        if not candidates:
            self.notify(f"{name} has only v{active}: register another version (r) to canary.", severity="warning")
            return

        def answered(form: dict[str, Any] | None) -> None:
            if not form:
                return
            version = form.pop("version")
            steps = form["steps"]
            self._started(f"canary on {name}: v{active} → v{version} in steps {', '.join(map(fmt._num, steps))} %")

            def done(r: dict[str, Any]) -> str:
                c = r.get("canary") or {}
                return f"canary on {name} started: v{version} at {fmt._num(c.get('share') or steps[0])}%"

            self._run(f"canary {name}", partial(self.client.start_canary, name, version, **form), done, model=name)

        self.push_screen(CanaryScreen(name, active, candidates), answered)

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
        box.value = self._filter_text
        self.screen.set_focus(box)  # at once (focus() waits a turn): the next keys of a paste go here
        self.refresh_bindings()

    def set_filter(self, text: str) -> None:
        self._filter_text = text
        if not text:
            self._filter_re = None
        else:
            try:
                self._filter_re = re.compile(text, re.IGNORECASE)
                self._filter_error = None
            except re.error as e:
                self._filter_re = re.compile(re.escape(text), re.IGNORECASE)
                if self._filter_error != str(e):
                    self.notify(f"filter: /{text}/ is not a regular expression ({e}); matching it as plain text.",
                                severity="warning", timeout=4)
                self._filter_error = str(e)
        if not text:
            self._filter_error = None
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
        if not self._filter_text and not self._filter_visible() and self.marked:
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
        if col not in fmt.COLUMN_LABELS:
            raise ValueError(f"no column '{col}'")
        if reverse is None and col != self._sort_col:
            reverse = col in fmt.DESCENDING_FIRST
        self._sort_col = col
        if reverse is not None:
            self._sort_reverse = reverse
        self._sort()
        snap = self.client.snapshot()
        if snap:
            self._update_status(snap)
        self.notify(f"sorted by {fmt.COLUMN_LABELS[col]} {'↓' if self._sort_reverse else '↑'}", timeout=2)

    @property
    def sort_column(self) -> str:
        return self._sort_col

    def action_sort(self) -> None:
        self._sort_step(+1)

    def action_reverse_sort(self) -> None:
        self.sort_by(self._sort_col, not self._sort_reverse)

    def _sort_step(self, step: int) -> None:
        keys = fmt.COLUMN_KEYS
        self.sort_by(keys[(keys.index(self._sort_col) + step) % len(keys)])

    def action_sort_next(self) -> None:
        self._sort_step(+1)

    def action_sort_prev(self) -> None:
        self._sort_step(-1)

    @on(DataTable.HeaderSelected, "#models")
    def _header_clicked(self, event: DataTable.HeaderSelected) -> None:
        """A click on a column's header sorts by it; a second click reverses the order."""
        col = str(event.column_key.value)
        if col == self._sort_col:
            self.sort_by(col, not self._sort_reverse)
        else:
            self.sort_by(col)

    def _label_sorted(self) -> None:
        """An arrow in the sorted column's header, none in the others'."""
        table = self.table
        for key, label, _ in fmt.COLUMNS:
            column = table.columns.get(ColumnKey(key))
            if column is None:
                continue
            text = label.strip() + ("↓" if self._sort_reverse else "↑") if key == self._sort_col else label
            if column.label.plain != text:
                column.label = Text(text)
                table.refresh()

    # -- describe, logs, marks, the command line, the detail pane

    def _picture(self, key: str) -> Any:
        def picture() -> tuple[dict[str, Any] | None, dict[str, Any] | None, list[dict[str, Any]]]:
            m = self.models.get(key)
            name = key.partition(":")[0]
            events = list(self._name_events.get(name, ()))
            return m, self.routing.get(name), events
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
        m = self._need_selection()
        if m is not None:
            self.logs(m["name"])

    def action_mark(self) -> None:
        key = self.selected_key()
        if key is None:
            return
        self.marked ^= {key}
        self.refresh_view(force=True)
        if self.table.cursor_row < self.table.row_count - 1:
            self.table.move_cursor(row=self.table.cursor_row + 1, animate=False)

    def _marked_models(self) -> tuple[list[dict[str, Any]], int]:
        """The marked versions, and how many of them the filter hides."""
        found = [self.models[k] for k in sorted(self.marked) if k in self.models]
        return found, sum(1 for k in self.marked if k in self.models and k not in self._cells)

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
        return cmds.complete(text, self.versions_by_name(), [label.strip() for _, label, _ in fmt.COLUMNS
                                                             if label.strip()])

    def versions_by_name(self) -> dict[str, list[str]]:
        out: dict[str, list[str]] = {}
        for m in self.models.values():
            out.setdefault(str(m["name"]), []).append(str(m["version"]))
        return {n: sorted(v, key=fmt._version_sort) for n, v in out.items()}

    @on(Input.Submitted, "#command")
    def _command_submitted(self, event: Input.Submitted) -> None:
        text = event.value
        self._close_command_line()
        if text.strip(" :"):
            self.run_command(text)

    def run_command(self, text: str) -> bool:
        """Run a ``:`` command line; a mistake is a notification saying what was expected."""
        try:
            c = cmds.parse(text, self.versions_by_name())
        except ValueError as e:
            self.notify(str(e), title="command", severity="error", timeout=6)
            return False
        if c.action in MUTATING | {"unpin"} and self.read_only:
            self.notify(f"read-only: :{c.action} changes the engine, and this console was started with --read-only.",
                        severity="warning", timeout=4)
            return False
        if c.name is not None and c.action not in ("logs", "split"):
            if not self._select(c.name, c.version):
                return False
        act = c.action
        if act == "model":
            return self._jump(c.args[0])
        if act in ("load", "unload", "evict", "delete", "canary"):
            getattr(self, f"action_{act}")()
        elif act in ("pin", "unpin"):
            m = self.selected()
            if m is not None and bool(m.get("pinned")) != (act == "pin"):
                self.action_pin()
            elif m is not None:
                self.notify(f"{self._label(m)} is already {'pinned' if act == 'pin' else 'unpinned'}.", timeout=3)
        elif act == "swap":
            active = self._active_version(str(c.name))
            if c.version == active:
                self.notify(f"{c.name} v{c.version} is already active.", severity="warning")
            elif not self._swap_busy(str(c.name)):
                self._swap(str(c.name), active, str(c.version))
        elif act == "split":
            name = str(c.name)
            if self._swap_busy(name):
                return False
            active = self._active_version(name)
            weights = {} if set(c.weights) == {active} else c.weights
            self._run(f"split {name}", partial(self.client.set_split, name, weights, None, None),
                      lambda r: f"{name} routes {fmt.arms_label(r) or 'everything to v' + str(r.get('active'))}",
                      model=name)
        elif act == "describe":
            key = self.selected_key()
            if key is not None:
                self.describe(key)
        elif act == "logs":
            self.logs(str(c.name) if c.name else (self.selected() or {}).get("name", ""))
        elif act == "sort":
            return self._sort_command(c.args)
        elif act == "filter":
            self.set_filter(c.args[0] if c.args else "")
        elif act == "interval":
            self.set_refresh(float(c.args[0]))
            self.notify(f"refreshing every {fmt._num(self.refresh_s)} s", timeout=2)
        elif act == "theme":
            if c.args and c.args[0] not in self.available_themes:
                self.notify(f"no theme '{c.args[0]}' (themes: {', '.join(sorted(self.available_themes))})",
                            severity="error")
                return False
            if c.args:
                self.theme = c.args[0]
            else:
                self.action_cycle_theme()
        elif act == "help":
            self.action_help()
        elif act == "quit":
            self.action_request_quit()
        return True

    def _sort_command(self, args: tuple[str, ...]) -> bool:
        want = args[0].lower()
        col = next((k for k, label, _ in fmt.COLUMNS if want in (k.lower(), label.strip().lower())), None)
        if col is None:
            col = next((k for k, label, _ in fmt.COLUMNS if label.strip().lower().startswith(want)), None)
        if col is None:
            self.notify(f":sort: no column '{args[0]}' (columns: "
                        f"{', '.join(fmt.COLUMN_LABELS[k] for k in fmt.COLUMN_KEYS)})", severity="error")
            return False
        self.sort_by(col, None if len(args) < 2 else args[1].lower() == "desc")
        return True

    def _select(self, name: str, version: str | None) -> bool:
        """Move the cursor to ``name``'s ``version`` (its active one when None); say so when the
        filter hides it."""
        version = version or self._active_version(name)
        key = f"{name}:{version}"
        if key not in self._cells:
            self.notify(f"{name} v{version} is hidden by the filter /{self._filter_text}/: esc clears it.",
                        severity="warning")
            return False
        self.table.move_cursor(row=self.table.get_row_index(key), animate=False)
        return True

    def _jump(self, pattern: str) -> bool:
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
        self._log(f"→ demo traffic {fmt.rate(rate)} → {fmt.rate(new)} req/s")
        self.notify(f"demo traffic {fmt.rate(new)} req/s", timeout=2)
        snap = self.client.snapshot()
        if snap:
            self._update_status(snap)

    def action_demo_slower(self) -> None:
        self._demo_rate(0.5)

    def action_demo_faster(self) -> None:
        self._demo_rate(2.0)

    def help_rows(self) -> list[tuple[str, str, str, bool]]:
        """(keys, description, binding id, enabled now) per key; read-only leaves out every action
        that changes the engine, as the footer and the palette do."""
        rows = []
        for b in self.BINDINGS:
            assert isinstance(b, Binding)
            if self.read_only and b.action in MUTATING:
                continue
            keys = self._keymap.get(b.id, b.key) if b.id else b.key
            shown = ", ".join(self.get_key_display(Binding(k.strip(), b.action)) for k in keys.split(","))
            desc = next((title for a, title, _ in PALETTE if a == b.action), b.description)
            rows.append((shown, desc, b.id or "", self.allowed(b.action, main=True)))
        # the table's own keys (ModelTable's bindings)
        rows += [("↑, ↓, pgup, pgdn", "Select a model", "", True), ("g, home", "First row", "", True),
                 ("G, end", "Last row", "", True), ("enter", "Describe the selected version (as d)", "", True)]
        return rows

    def action_help(self) -> None:
        notes = [
            "ctrl+q quits like q: embedded, it asks first while traffic flows.",
            "↑/↓/pgup/pgdn select a model; the pane below shows it.",
            "Unload and evict ask first: Enter or Esc cancels, Tab then Enter (or y) confirms.",
            "Base priority: P1 is the most urgent; + moves toward P1.",
            ("Versions act on the selected model's name: s swaps its active version, a edits its A/B "
             "weights, c starts a canary (or aborts the running one)."),
            "Remap keys by binding id: --keymap load=L,unload=U (or MODELCONSOLE_KEYMAP).",
        ]
        if self.read_only:
            notes.insert(0, "READ-ONLY: the actions that change the engine are hidden and refused.")
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
            self._confirm("Quit while serving?",
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
