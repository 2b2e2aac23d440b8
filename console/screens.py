"""The console's dialogs: confirmation (Cancel by default), the register form, the versions
dialogs (swap's version picker, the split's weights editor, the canary form), and help."""

from __future__ import annotations

import re
from typing import Any

from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.screen import ModalScreen
from textual.widgets import Button, Input, Label, OptionList, Select, Static
from textual.widgets.option_list import Option

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


# Tab and shift+tab as priority bindings: checked as each key arrives, before the key goes on to
# the focused field.  Keys that arrive in one read (over SSH, or a paste: ``abc<Tab>def``) are
# handed out one by one in order, so ``def`` lands in the next field; as ordinary bindings, Tab
# would move the focus only after every key of the read had been queued to the first field.
FIELD_KEYS = [
    Binding("tab", "app.focus_next", "Next field", show=False, priority=True),
    Binding("shift+tab", "app.focus_previous", "Previous field", show=False, priority=True),
]


class RegisterScreen(ModalScreen["dict[str, Any] | None"]):
    """Register a model (or a new version): name, source, version, options (JSON or key=value).

    One line per field, so the whole form and its buttons fit 80x24.  With ``register`` (an async
    call taking ``{"name", "source", "version", "options"}``) the form stays open while the call
    runs and after it fails: the error shows under the field it names (the server's messages
    start with the field), and nothing typed is lost.  It answers the call's result once it
    succeeds, or None when cancelled.  Without ``register`` it answers the form itself."""

    BINDINGS = [Binding("escape", "cancel", "Cancel", show=False), *FIELD_KEYS]
    FIELDS = (("name", "reg-name"), ("source", "reg-source"), ("version", "reg-version"),
              ("options", "reg-options"))

    def __init__(self, register: Any = None, **kw: Any) -> None:
        super().__init__(**kw)
        self.register_call = register
        self.busy = False

    def compose(self) -> ComposeResult:
        placeholders = {
            "reg-name": "e.g. resnet",
            "reg-source": "zoo:tiny-mlp · hf:DIR · state_dict:w.pt · remote:http://host:8000",
            "reg-version": "blank: the next number",
            "reg-options": 'device=cpu max_batch_size=16  or  {"warmup": 2}',
        }
        with Vertical(id="register", classes="dialog"):
            yield Label("Register a model", id="dialog-title")
            for field, wid in self.FIELDS:
                with Horizontal(classes="field"):
                    yield Label(field, classes="field-label")
                    yield Input(placeholder=placeholders[wid], compact=True, id=wid)
                yield Static("", id=f"{wid}-error", classes="field-error")
            yield Static("", id="reg-error")
            with Horizontal(classes="buttons"):
                yield Button("Cancel", id="cancel")
                yield Button("Register", id="register-ok", variant="primary")

    def on_mount(self) -> None:
        self.query_one("#reg-name", Input).focus()

    def _value(self, wid: str) -> str:
        return self.query_one(f"#{wid}", Input).value.strip()

    def _clear_errors(self) -> None:
        for _, wid in self.FIELDS:
            box = self.query_one(f"#{wid}-error", Static)
            box.update("")
            box.remove_class("-shown")
        self.query_one("#reg-error", Static).update("")

    def show_error(self, message: str) -> None:
        """``message`` under the field it names (``source: ...``, ``options.device: ...``), else
        below the form; the field it names gets the focus."""
        self._clear_errors()
        wid = self.field_of(message)
        if wid is None:
            self.query_one("#reg-error", Static).update(Text(message, style="bold red"))
            return
        box = self.query_one(f"#{wid}-error", Static)
        box.update(Text(message, style="bold red"))
        box.add_class("-shown")
        self.query_one(f"#{wid}", Input).focus()

    SOURCE_KINDS = ("zoo", "torchscript", "export", "safetensors", "state_dict", "hf", "remote")

    @classmethod
    def field_of(cls, message: str) -> str | None:
        """The input a refusal is about: the engine's messages name the field first, after
        ``model 'NAME' version V: `` (a source's own errors start with the source)."""
        text = re.sub(r"^model '[^']*'(?: version \S+)?: ", "", message)
        head = text.split(":", 1)[0].strip().split(".", 1)[0].lower()
        wid = dict(cls.FIELDS).get(head)
        if wid is not None:
            return wid
        if head in cls.SOURCE_KINDS or head in ("source", "factory", "path"):
            return "reg-source"
        if re.fullmatch(r"[a-z_]+", head):
            return "reg-options"  # any other key named first is one of the options
        return None

    def submit(self) -> None:
        if self.busy:
            return
        name, source, version = self._value("reg-name"), self._value("reg-source"), self._value("reg-version")
        if not name:
            self.show_error("name: required")
            return
        if not source:
            self.show_error("source: required (e.g. zoo:tiny-mlp)")
            return
        try:
            options = fmt.parse_options(self._value("reg-options"))
        except ValueError as e:
            self.show_error(f"options: {e}" if not str(e).startswith("options") else str(e))
            return
        form = {"name": name, "source": source, "version": version or None, "options": options}
        if self.register_call is None:
            self.dismiss(form)
            return
        self._clear_errors()
        self.query_one("#reg-error", Static).update(Text(f"registering {name} from {source}…", style="italic"))
        self.busy = True
        self.run_worker(self._register(form), group="register", exit_on_error=False)

    async def _register(self, form: dict[str, Any]) -> None:
        try:
            result = await self.register_call(form)
        except Exception as e:  # noqa: BLE001 - a ClientError names the field; anything else says what it was
            self.busy = False
            self.show_error(getattr(e, "message", None) or f"{type(e).__name__}: {e}")
            return
        self.busy = False
        self.dismiss(result if result is not None else form)

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


class VersionPickerScreen(ModalScreen["str | None"]):
    """Pick one of a model name's versions: ``choices`` is [(version, description)].
    Enter (or a click) picks the highlighted one; Esc cancels.  Answers the version or None."""

    BINDINGS = [Binding("escape", "cancel", "Cancel", show=False)]

    def __init__(self, title: str, choices: list[tuple[str, str]], hint: str = "", **kw: Any) -> None:
        super().__init__(**kw)
        self.title_text = title
        self.choices = choices
        self.hint = hint

    def compose(self) -> ComposeResult:
        with Vertical(id="picker", classes="dialog"):
            yield Label(self.title_text, id="dialog-title")
            yield OptionList(*[Option(Text.assemble((f"v{v}", "bold"), f"  {desc}"), id=f"v-{i}")
                               for i, (v, desc) in enumerate(self.choices)], id="pick-list")
            if self.hint:
                yield Static(self.hint, classes="hint")
            with Horizontal(classes="buttons"):
                yield Button("Cancel", id="cancel")
                yield Button("Next", id="pick-ok", variant="primary")

    def on_mount(self) -> None:
        options = self.query_one("#pick-list", OptionList)
        options.highlighted = 0
        options.focus()

    def pick(self, index: int | None) -> None:
        if index is None or not 0 <= index < len(self.choices):
            return
        self.dismiss(self.choices[index][0])

    def on_option_list_option_selected(self, event: OptionList.OptionSelected) -> None:
        event.stop()
        self.pick(event.option_index)

    def on_button_pressed(self, event: Button.Pressed) -> None:
        event.stop()
        if event.button.id == "pick-ok":
            self.pick(self.query_one("#pick-list", OptionList).highlighted)
        else:
            self.dismiss(None)

    def action_cancel(self) -> None:
        self.dismiss(None)


class _Form(ModalScreen["dict[str, Any] | None"]):
    """A dialog of inputs with one inline error line (``#form-error``); Enter in any input submits."""

    BINDINGS = [Binding("escape", "cancel", "Cancel", show=False), *FIELD_KEYS]
    OK_ID = "form-ok"

    def _value(self, wid: str) -> str:
        return self.query_one(f"#{wid}", Input).value.strip()

    def error(self, message: str, focus: str | None = None) -> None:
        self.query_one("#form-error", Static).update(Text(message, style="bold red"))
        if focus:
            self.query_one(f"#{focus}").focus()

    @property
    def error_text(self) -> str:
        return str(self.query_one("#form-error", Static).render())

    def submit(self) -> None:  # pragma: no cover - each form has its own
        raise NotImplementedError

    def on_input_submitted(self, event: Input.Submitted) -> None:
        event.stop()
        self.submit()

    def on_button_pressed(self, event: Button.Pressed) -> None:
        event.stop()
        if event.button.id == self.OK_ID:
            self.submit()
        else:
            self.dismiss(None)

    def action_cancel(self) -> None:
        self.dismiss(None)


class SplitScreen(_Form):
    """The A/B weights editor for one model name: a weight per version (blank is 0), shadow
    versions (a copy of traffic, answers recorded, never returned) and the numeric output whose
    mean is compared per arm.  Answers ``{"weights", "shadow", "metric_output"}`` or None."""

    OK_ID = "split-ok"

    def __init__(self, name: str, versions: list[str], weights: dict[str, float], shadow: list[str],
                 metric_output: str | None, **kw: Any) -> None:
        super().__init__(**kw)
        self.model_name = name
        self.versions = versions
        self.weights = weights
        self.shadow = shadow
        self.metric_output = metric_output

    def compose(self) -> ComposeResult:
        with Vertical(id="split", classes="dialog"):
            yield Label(f"A/B split of {self.model_name}", id="dialog-title")
            yield Static("Requests without a version go to each version in proportion to its weight "
                         "(blank or 0: none).", classes="hint")
            for i, v in enumerate(self.versions):
                with Horizontal(classes="field"):
                    yield Label(f"v{v} weight", classes="field-label")
                    w = self.weights.get(v)
                    yield Input(value=fmt._num(w) if w else "", placeholder="0", id=f"w-{i}", classes="weight",
                                compact=True)
            with Horizontal(classes="field"):
                yield Label("shadow", classes="field-label")
                yield Input(value=", ".join(self.shadow), placeholder="versions that get a copy (e.g. 3)",
                            id="split-shadow", compact=True)
            with Horizontal(classes="field"):
                yield Label("metric output", classes="field-label")
                yield Input(value=self.metric_output or "", placeholder="an output's name (its mean per arm)",
                            id="split-metric", compact=True)
            yield Static("", id="form-error")
            with Horizontal(classes="buttons"):
                yield Button("Cancel", id="cancel")
                yield Button("Apply", id="split-ok", variant="primary")

    def on_mount(self) -> None:
        if self.versions:
            self.query_one("#w-0", Input).focus()

    def weight_input(self, version: str) -> Input:
        return self.query_one(f"#w-{self.versions.index(version)}", Input)

    def submit(self) -> None:
        fields = {v: self._value(f"w-{i}") for i, v in enumerate(self.versions)}
        for i, (v, text) in enumerate(fields.items()):
            if text:
                try:
                    fmt.parse_number(text, f"weight of v{v}", lo=0.0)
                except ValueError as e:
                    self.error(str(e), f"w-{i}")
                    return
        try:
            weights = fmt.parse_weights(fields)
        except ValueError as e:
            self.error(str(e), "w-0")
            return
        try:
            shadow = fmt.parse_versions(self._value("split-shadow"), self.versions)
        except ValueError as e:
            self.error(str(e), "split-shadow")
            return
        both = [v for v in shadow if v in weights]
        if both:
            self.error(f"shadow: v{both[0]} has a weight; a shadow arm only gets copies (set its weight to 0)",
                       "split-shadow")
            return
        self.dismiss({"weights": weights, "shadow": shadow, "metric_output": self._value("split-metric") or None})


class CanaryScreen(_Form):
    """Start a canary: the new version, its steps (percent, rising to 100), the interval between
    steps, and the bounds that roll it back.  Answers ``{"version", "steps", "interval_s",
    "max_error_rate", "max_p95_ratio", "min_requests"}`` or None."""

    OK_ID = "canary-ok"
    DEFAULTS = {"steps": "5, 25, 50, 100", "interval_s": "60", "max_error_rate": "5%", "max_p95_ratio": "2.0",
                "min_requests": "20"}

    def __init__(self, name: str, active: str, candidates: list[str], **kw: Any) -> None:
        super().__init__(**kw)
        self.model_name = name
        self.active = active
        self.candidates = candidates

    def compose(self) -> ComposeResult:
        d = self.DEFAULTS
        with Vertical(id="canary", classes="dialog"):
            yield Label(f"Canary on {self.model_name} (active v{self.active})", id="dialog-title")
            with Horizontal(classes="field"):
                yield Label("new version", classes="field-label")
                yield Select([(f"v{v}", v) for v in self.candidates], value=self.candidates[-1],
                             allow_blank=False, compact=True, id="can-version")
            with Horizontal(classes="field"):
                yield Label("steps %", classes="field-label")
                yield Input(compact=True, value=d["steps"], id="can-steps")
            with Horizontal(classes="field"):
                yield Label("interval s", classes="field-label")
                yield Input(compact=True, value=d["interval_s"], id="can-interval")
            with Horizontal(classes="field"):
                yield Label("max error rate", classes="field-label")
                yield Input(compact=True, value=d["max_error_rate"], placeholder="0.05 or 5%", id="can-errors")
            with Horizontal(classes="field"):
                yield Label("max p95 ratio", classes="field-label")
                yield Input(compact=True, value=d["max_p95_ratio"], placeholder="× the baseline's p95",
                            id="can-p95")
            with Horizontal(classes="field"):
                yield Label("min requests", classes="field-label")
                yield Input(compact=True, value=d["min_requests"], placeholder="per step, before judging", id="can-min")
            yield Static("Steps up while within bounds; a broken bound rolls back; 100 ends in a swap.",
                         classes="hint")
            yield Static("", id="form-error")
            with Horizontal(classes="buttons"):
                yield Button("Cancel", id="cancel")
                yield Button("Start canary", id="canary-ok", variant="primary")

    def on_mount(self) -> None:
        self.query_one("#can-steps", Input).focus()

    def submit(self) -> None:
        version = self.query_one("#can-version", Select).value
        if not isinstance(version, str) or version not in self.candidates:
            self.error("new version: pick one", "can-version")
            return
        checks = (
            ("can-steps", lambda: fmt.parse_steps(self._value("can-steps"))),
            ("can-interval", lambda: fmt.parse_number(self._value("can-interval"), "interval", lo=0.0,
                                                      lo_open=True)),
            ("can-errors", lambda: fmt.parse_rate(self._value("can-errors"))),
            ("can-p95", lambda: fmt.parse_number(self._value("can-p95"), "max p95 ratio (canary p95 / baseline p95)",
                                                 lo=1.0)),
            ("can-min", lambda: fmt.parse_number(self._value("can-min"), "min requests", lo=1.0, integer=True)
             if self._value("can-min") else None),
        )
        values = []
        for wid, parse in checks:
            try:
                values.append(parse())
            except ValueError as e:
                self.error(str(e), wid)
                return
        steps, interval, errors, p95, min_requests = values
        self.dismiss({"version": version, "steps": steps, "interval_s": interval, "max_error_rate": errors,
                      "max_p95_ratio": p95, "min_requests": min_requests})


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
            with VerticalScroll(id="help-scroll"):
                yield Static(t, id="help-text")
            yield Label("↑/↓/pgup/pgdn/home/end scroll · esc closes", classes="hint")

    def on_mount(self) -> None:
        self.query_one("#help-scroll", VerticalScroll).focus()  # the arrows scroll it at once (80x24)

    def action_close(self) -> None:
        self.dismiss(None)
