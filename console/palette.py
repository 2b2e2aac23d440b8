"""The command line's widgets and the command palette: what a typed ``:`` line completes to,
and every console action (and Textual's own commands) in ctrl+p, in one stable order.

They reach the app through ``Console``, the three calls they need, so they do not
import it.
"""

from __future__ import annotations

from collections.abc import Iterable
from functools import partial
from typing import Any, Protocol, runtime_checkable

from textual.binding import Binding
from textual.command import DiscoveryHit, Hit, Hits, Provider
from textual.suggester import Suggester
from textual.widgets import Input

from . import format as fmt
from .keys import PALETTE


@runtime_checkable
class Console(Protocol):
    """What the palette and the command line ask of the app."""

    def completions(self, text: str) -> list[str]: ...

    def allowed(self, action: str, main: bool = False) -> bool: ...

    def sort_by(self, col: str, reverse: bool | None = None) -> None: ...


class CommandSuggester(Suggester):
    """The ``:`` line's inline completion: the first command line its last word can become."""

    def __init__(self, app: Console) -> None:
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
        if not isinstance(app, Console):
            return
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
        if not isinstance(app, Console):
            return []
        out: list[tuple[str, str, Any]] = []
        for action, title, help_text in PALETTE:
            if app.allowed(action, main=True):
                out.append((title, help_text, partial(self.app.run_action, action)))
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
