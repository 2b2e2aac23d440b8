"""The console's keys: every binding, the command palette's titles, and which actions a
console may run where (read-only, no demo, inside a dialog).

Declarations and pure functions only, so the help screen, the footer, the palette
and the key handler read one table, and a test can read it without an app.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

from textual.binding import Binding

# actions that change the engine: hidden and refused in read-only mode
MUTATING = frozenset({"load", "unload", "evict", "pin", "priority_up", "priority_down", "register",
                      "swap", "split", "canary", "delete"})
DEMO_ACTIONS = frozenset({"demo_slower", "demo_faster"})
# actions that make sense only on the main screen (not from inside a dialog)
MAIN_ONLY = MUTATING | DEMO_ACTIONS | frozenset({"filter", "sort", "reverse_sort", "help", "cycle_theme",
                                                 "request_quit", "clear_filter", "sort_next", "sort_prev",
                                                 "describe", "logs", "mark", "command_line", "toggle_pane"})

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

BINDINGS: list[Binding] = [
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

# the table's own keys (ModelTable's bindings), for the help screen
TABLE_KEYS: tuple[tuple[str, str], ...] = (
    ("↑, ↓, pgup, pgdn", "Select a model"), ("g, home", "First row"), ("G, end", "Last row"),
    ("enter", "Describe the selected version (as d)"))

HELP_NOTES: tuple[str, ...] = (
    "ctrl+q quits like q: embedded, it asks first while traffic flows.",
    "↑/↓/pgup/pgdn select a model; the pane below shows it.",
    "Unload and evict ask first: Enter or Esc cancels, Tab then Enter (or y) confirms.",
    "Base priority: P1 is the most urgent; + moves toward P1.",
    ("Versions act on the selected model's name: s swaps its active version, a edits its A/B "
     "weights, c starts a canary (or aborts the running one)."),
    "Remap keys by binding id: --keymap load=L,unload=U (or MODELCONSOLE_KEYMAP).",
)
READ_ONLY_NOTE = "READ-ONLY: the actions that change the engine are hidden and refused."


def binding_keys(b: Binding, keymap: Mapping[str, str]) -> list[str]:
    """The keys that reach ``b`` now: the keymap's (by binding id) where it remaps it."""
    keys = keymap.get(b.id, b.key) if b.id else b.key
    return [k.strip() for k in keys.split(",")]


def binding_for_key(key: str, keymap: Mapping[str, str]) -> Binding | None:
    """The console binding that ``key`` reaches, if any."""
    return next((b for b in BINDINGS if key in binding_keys(b, keymap)), None)


def palette_title(action: str, default: str) -> str:
    return next((title for a, title, _ in PALETTE if a == action), default)


def help_rows(keymap: Mapping[str, str], read_only: bool, allowed: Callable[[str], bool],
              key_display: Callable[[Binding], str]) -> list[tuple[str, str, str, bool]]:
    """(keys, description, binding id, enabled now) per key; read-only leaves out every action
    that changes the engine, as the footer and the palette do.  ``allowed``: whether an action
    may run from the main screen; ``key_display``: how the app shows one key."""
    rows = []
    for b in BINDINGS:
        if read_only and b.action in MUTATING:
            continue
        shown = ", ".join(key_display(Binding(k, b.action)) for k in binding_keys(b, keymap))
        rows.append((shown, palette_title(b.action, b.description), b.id or "", allowed(b.action)))
    rows += [(k, desc, "", True) for k, desc in TABLE_KEYS]
    return rows
