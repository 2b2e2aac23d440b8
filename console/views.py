"""Full-screen views over one model, as k9s has them: describe (``d``/Enter) and logs (``l`` there).

Each view is handed a ``Picture`` callable that answers the version's latest
snapshot, its name's routing and its events (the app owns that state) and
re-reads it on the app's refresh period, so the view stays live.  ``y`` copies
the last error with OSC 52, which reaches the operator's own clipboard over
SSH.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import VerticalScroll
from textual.screen import Screen
from textual.widgets import Footer, RichLog, Static

from . import describe
from . import format as fmt
from .widgets import Line

# (snapshot or None when it is gone, routing, events oldest first)
Picture = Callable[[], "tuple[dict[str, Any] | None, dict[str, Any] | None, list[dict[str, Any]]]"]
Audit = Callable[[], Awaitable["list[dict[str, Any]]"]]
_UNSEEN = object()


class _ModelView(Screen[None]):
    BINDINGS = [
        Binding("escape,q", "close", "Back", id="view_back"),
        Binding("y", "copy_error", "Copy last error", id="view_copy"),
        Binding("g,home", "top", "Top", show=False),
        Binding("G,end", "bottom", "Bottom", show=False),
    ]

    def __init__(self, key: str, picture: Picture, audit: Audit, refresh_s: float) -> None:
        super().__init__()
        self.key = key
        self.picture = picture
        self.audit_call = audit
        self.audit: list[dict[str, Any]] = []
        self.refresh_s = refresh_s

    def on_mount(self) -> None:
        self.run_worker(self._read_audit(), group="view-audit", exit_on_error=False)
        self.set_interval(self.refresh_s, self.update_view)
        self.update_view()

    async def _read_audit(self) -> None:
        try:
            self.audit = await self.audit_call()
        except Exception as e:  # noqa: BLE001 - the view still shows the rest
            self.audit = [{"ts": None, "actor": "console", "action": "reading the audit log", "result": "error",
                           "detail": f"{type(e).__name__}: {e}"}]
        self.update_view()

    def update_view(self) -> None:  # pragma: no cover - each view has its own
        raise NotImplementedError

    def last_error(self) -> str | None:
        m, _, events = self.picture()
        return describe.last_error(m or {}, events, self.audit)

    def action_copy_error(self) -> None:
        err = self.last_error()
        if not err:
            self.notify(f"{self.key}: no error to copy.", timeout=3)
            return
        self.app.copy_to_clipboard(err)  # OSC 52: the terminal (over SSH too) puts it on the clipboard
        self.notify(f"copied: {err}", title="last error copied", timeout=4)

    def action_close(self) -> None:
        self.dismiss(None)


class DescribeScreen(_ModelView):
    """One version's whole picture: identity, memory (estimate vs measured), tensors, traffic and
    rate limit, routing, eviction's keep-value inputs, last error, config, audit history."""

    BINDINGS = [*_ModelView.BINDINGS, Binding("l", "logs", "Logs", id="view_logs")]
    _audit_after: Any = None  # the newest event when the audit was last read (_UNSEEN: before the first view)

    def on_mount(self) -> None:
        self._audit_after = _UNSEEN  # on_mount reads the audit itself
        super().on_mount()

    def compose(self) -> ComposeResult:
        yield Line(id="view-title", classes="view-title")
        with VerticalScroll(id="describe-scroll"):
            yield Static("", id="describe-body")
        yield Footer(compact=True, show_command_palette=False)

    def update_view(self) -> None:
        m, routing, events = self.picture()
        newest = events[-1] if events else None
        if self._audit_after is not _UNSEEN and newest is not self._audit_after:
            # something happened to the model (an action, a load): its audit rows may have grown
            self.run_worker(self._read_audit(), group="view-audit", exit_on_error=False)
        self._audit_after = newest
        title = self.query_one("#view-title", Line)
        body = self.query_one("#describe-body", Static)
        if m is None:
            title.set(f" describe {self.key}: gone (deleted or no longer in the snapshot) · esc goes back")
            return
        title.set(f" describe {fmt.row_key(m)} · {m.get('state')} · l logs · y copies the last error · esc back")
        self.text = describe.text(m, routing, self.audit, events)
        t = Text()
        for line in self.text.split("\n"):
            t.append(line + "\n", style="bold" if line.startswith("──") else "")
        body.update(t)

    def action_logs(self) -> None:
        self.app.push_screen(LogScreen(self.key.split(":")[0], self.picture, self.audit_call, self.refresh_s))

    def action_top(self) -> None:
        self.query_one("#describe-scroll", VerticalScroll).scroll_home(animate=False)

    def action_bottom(self) -> None:
        self.query_one("#describe-scroll", VerticalScroll).scroll_end(animate=False)


class LogScreen(_ModelView):
    """One model's events only (every version), wrapped, scrollable, following new ones."""

    def compose(self) -> ComposeResult:
        yield Line(id="view-title", classes="view-title")
        yield RichLog(id="model-log", wrap=True, markup=False, auto_scroll=True, max_lines=2000, min_width=20)
        yield Footer(compact=True, show_command_palette=False)

    def on_mount(self) -> None:
        self._last: dict[str, Any] | None = None  # the newest event shown (the app keeps a bounded window)
        self.lines: list[str] = []
        super().on_mount()

    def update_view(self) -> None:
        _, _, events = self.picture()
        self.query_one("#view-title", Line).set(
            f" logs {self.key} · {len(events)} events · y copies the last error · g/G top/bottom · esc back")
        log = self.query_one("#model-log", RichLog)
        # what came after the newest event shown: a count would stall once the window is full
        start = next((i + 1 for i in range(len(events) - 1, -1, -1) if events[i] is self._last), 0)
        for ev in events[start:]:
            line = f"{fmt.clock(ev.get('ts'))} {ev.get('message') or ev.get('kind')}"
            self.lines.append(line)
            log.write(Text(line, style={"error": "bold red", "warning": "yellow"}.get(ev.get("level") or "", "")))
        if events:
            self._last = events[-1]

    def action_top(self) -> None:
        self.query_one("#model-log", RichLog).scroll_home(animate=False)

    def action_bottom(self) -> None:
        self.query_one("#model-log", RichLog).scroll_end(animate=False)
