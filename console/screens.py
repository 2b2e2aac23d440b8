"""The console's dialogs: confirmation (Cancel by default), the register form, and help."""

from __future__ import annotations

from typing import Any

from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.screen import ModalScreen
from textual.widgets import Button, Input, Label, Static

from . import format as fmt


class ConfirmScreen(ModalScreen[bool]):
    """Ask before something destructive.  Cancel has the focus, so Enter (or Esc, or n)
    cancels; only choosing the confirm button (Tab, Enter; a click; or y) goes ahead."""

    BINDINGS = [
        Binding("escape,n", "cancel", "Cancel", show=False),
        Binding("y", "confirm", "Confirm", show=False),
        Binding("left,right", "app.focus_next", show=False),
    ]

    def __init__(self, title: str, message: str, confirm_label: str = "Confirm", **kw: Any) -> None:
        super().__init__(**kw)
        self.title_text = title
        self.message = message
        self.confirm_label = confirm_label

    def compose(self) -> ComposeResult:
        with Vertical(id="dialog", classes="dialog"):
            yield Label(self.title_text, id="dialog-title")
            yield Static(self.message, id="dialog-message")
            with Horizontal(classes="buttons"):
                yield Button("Cancel", id="cancel", variant="primary")
                yield Button(self.confirm_label, id="confirm", variant="error")

    def on_mount(self) -> None:
        self.query_one("#cancel", Button).focus()

    def on_button_pressed(self, event: Button.Pressed) -> None:
        event.stop()
        self.dismiss(event.button.id == "confirm")

    def action_cancel(self) -> None:
        self.dismiss(False)

    def action_confirm(self) -> None:
        self.dismiss(True)


class RegisterScreen(ModalScreen["dict[str, Any] | None"]):
    """Register a model (or a new version): name, source, version, options (JSON or key=value).
    Answers ``{"name", "source", "version", "options"}`` or None when cancelled."""

    BINDINGS = [Binding("escape", "cancel", "Cancel", show=False)]

    def compose(self) -> ComposeResult:
        with Vertical(id="register", classes="dialog"):
            yield Label("Register a model", id="dialog-title")
            yield Label("name")
            yield Input(placeholder="e.g. resnet", id="reg-name")
            yield Label("source")
            yield Input(placeholder="zoo:tiny-mlp · torchscript:path.pt · safetensors:dir", id="reg-source")
            yield Label("version (optional: the next number)")
            yield Input(placeholder="", id="reg-version")
            yield Label("options (JSON object, or key=value ...)")
            yield Input(placeholder='device=cpu max_batch_size=16  or  {"warmup": 2}', id="reg-options")
            yield Static("", id="reg-error")
            with Horizontal(classes="buttons"):
                yield Button("Cancel", id="cancel")
                yield Button("Register", id="register-ok", variant="primary")

    def on_mount(self) -> None:
        self.query_one("#reg-name", Input).focus()

    def _value(self, wid: str) -> str:
        return self.query_one(f"#{wid}", Input).value.strip()

    def _error(self, message: str) -> None:
        self.query_one("#reg-error", Static).update(Text(message, style="bold red"))

    def submit(self) -> None:
        name, source, version = self._value("reg-name"), self._value("reg-source"), self._value("reg-version")
        if not name:
            self._error("name: required")
            self.query_one("#reg-name", Input).focus()
            return
        if not source:
            self._error("source: required (e.g. zoo:tiny-mlp)")
            self.query_one("#reg-source", Input).focus()
            return
        try:
            options = fmt.parse_options(self._value("reg-options"))
        except ValueError as e:
            self._error(str(e))
            self.query_one("#reg-options", Input).focus()
            return
        self.dismiss({"name": name, "source": source, "version": version or None, "options": options})

    def on_input_submitted(self, event: Input.Submitted) -> None:
        event.stop()
        self.submit()

    def on_button_pressed(self, event: Button.Pressed) -> None:
        event.stop()
        if event.button.id == "register-ok":
            self.submit()
        else:
            self.dismiss(None)

    def action_cancel(self) -> None:
        self.dismiss(None)


class HelpScreen(ModalScreen[None]):
    """Every key: what it does, and the binding id to remap it by."""

    BINDINGS = [Binding("escape,q,question_mark,f1", "close", "Close", show=False)]

    def __init__(self, rows: list[tuple[str, str, str, bool]], notes: list[str], **kw: Any) -> None:
        super().__init__(**kw)
        self.rows = rows  # (keys, description, id, enabled)
        self.notes = notes

    def compose(self) -> ComposeResult:
        t = Text()
        t.append(f"{'key':<14}{'action':<34}binding id\n", style="bold")
        for keys, desc, bid, enabled in self.rows:
            style = "" if enabled else "dim strike"
            t.append(f"{keys:<14}{desc:<34}{bid}\n", style=style)
        if self.notes:
            t.append("\n")
            for n in self.notes:
                t.append(n + "\n", style="dim")
        with Vertical(id="help", classes="dialog"):
            yield Label("Keys", id="dialog-title")
            with VerticalScroll():
                yield Static(t, id="help-text")
            yield Label("esc closes", classes="hint")

    def action_close(self) -> None:
        self.dismiss(None)
