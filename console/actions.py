"""What the console's keys and ``:`` commands do to the engine: load, unload, evict, pin,
priority, register, delete, and the versions' swap, split and canary.

Each action reads the selection and the picture, asks (a confirmation, a form) where it
changes what serves, then runs the client's control call as a worker: the screen keeps
updating while a model loads, and the outcome is one notification (and one log line
when the engine logged none).  The app binds keys to these; ``run_command`` reaches the
same methods, so a typed command and a key cannot differ.
"""

from __future__ import annotations

from functools import partial
from typing import TYPE_CHECKING, Any

from . import commands as cmds
from . import format as fmt
from .client import ClientError
from .keys import MUTATING
from .screens import CanaryScreen, ConfirmScreen, RegisterScreen, SplitScreen, VersionPickerScreen

if TYPE_CHECKING:
    from .app import ModelConsoleApp


def label_of(m: dict[str, Any]) -> str:
    return f"{m['name']} v{m['version']}"


def evict_refusal(m: dict[str, Any] | None) -> str | None:
    """Why evicting ``m`` would fail (the engine refuses pinned and unloaded versions)."""
    if m is None:
        return None
    if m.get("pinned"):
        return "is pinned: unpin it (p) before evicting it"
    if m.get("state") in ("UNLOADED", "FAILED", None):
        return "is not loaded: there is nothing to evict"
    return None


class ModelActions:
    """The console's actions on the engine, for one app (``app.ops``)."""

    def __init__(self, app: ModelConsoleApp) -> None:
        self.app = app
        self.picture = app.picture
        self.swapping: dict[str, str] = {}  # name -> version: swaps this console started, until answered

    def _run(self, label: str, call: Any, done: Any = None, model: str | None = None) -> None:
        """Run a client call as a worker; its outcome goes to a notification.  The event log gets
        one line per action: the engine's own event when it succeeds (loaded, unloaded, pinned...),
        or one ``✗`` line when it was refused or failed without an error event of the engine's
        (a failed load has its ``load_failed`` event already).  ``model``: the name it acts on."""
        since = self.picture.max_seq

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
            self.app.notify(message, title="done")
            self.app.refresh_soon()

        self.app.run_worker(job(), name=label, group="actions", exit_on_error=False)

    def _failed(self, label: str, message: str, model: str | None = None, since: int = 0) -> None:
        logged = model is not None and self.picture.error_logged_since(model, since)
        if not logged:
            self.app.log_line(f"✗ {label} failed: {message}", "error")
        self.app.notify(message, title=f"{label} failed", severity="error", timeout=8)
        self.app.refresh_soon()

    def _started(self, message: str) -> None:
        self.app.notify(message, timeout=3)

    # -- the actions

    def _where(self) -> dict[str, str]:
        """``node=`` for the control calls while one node is the target (``n``)."""
        return {"node": self.app.target_node} if self.app.target_node else {}

    def cycle_node(self) -> None:
        """The whole fleet, then each live node in turn: what l, u, e and p act on."""
        nodes = self.app.fleet_nodes()
        order = [None, *nodes]
        i = order.index(self.app.target_node) if self.app.target_node in order else 0
        self.app.target_node = order[(i + 1) % len(order)]
        where = f"node {self.app.target_node[:8]} only" if self.app.target_node else "the whole fleet"
        self.app.notify(f"load, unload, evict and pin now act on {where}.", timeout=3)
        snap = self.app.client.snapshot()
        if snap:
            self.app.show_status(snap)  # the status line says so at once, not at the next refresh

    def load(self) -> None:
        m = self.app.need_selection()
        if m is None:
            return
        label = label_of(m)
        if m.get("state") == "READY":
            self.app.notify(f"{label} is already loaded.")
            return
        self._started(f"loading {label}…")
        self._run(f"load {label}", partial(self.app.client.load, m["name"], m["version"], **self._where()),
                  lambda r: f"{label} is {r.get('state', 'READY')} on {fmt.device_label(r)}"
                  + (f" ({r['load_seconds']:.1f} s)" if r.get("load_seconds") else ""), model=m["name"])

    def confirm(self, title: str, message: str, confirm_label: str, then: Any, after: Any = None) -> None:
        def answered(ok: bool | None) -> None:
            if after is not None:
                after()
            if ok:
                then()
            else:
                self.app.notify(f"{confirm_label}: cancelled.", timeout=2)
            self.app.refresh_soon()

        self.app.push_screen(ConfirmScreen(title, message, confirm_label), answered)

    def _bulk(self, verb: str, call: Any, confirm: bool) -> bool:
        """``verb`` every marked version (space): one confirmation that says how many, and how
        many of them the filter hides; one worker per version.  False when nothing is marked."""
        found, hidden = self.picture.marked_models(self.app.shown_keys())
        if not found:
            return False
        labels = ", ".join(label_of(m) for m in found)
        hide = f" ({hidden} of them hidden by the filter)" if hidden else ""

        def go() -> None:
            for m in found:
                self._run(f"{verb} {label_of(m)}", partial(call, m), model=m["name"])
            self.picture.marked.clear()
            self.app.refresh_view(force=True)
            self.app.refresh_bindings()

        if confirm:
            self.confirm(f"{verb.capitalize()} {len(found)} marked versions?", f"{labels}{hide}.",
                          verb.capitalize(), go)
        else:
            self._started(f"{verb} {len(found)} marked versions{hide}")
            go()
        return True

    def unload(self) -> None:
        if self._bulk("unload", lambda m: self.app.client.unload(m["name"], m["version"], **self._where()), True):
            return
        m = self.app.need_selection()
        if m is None:
            return
        label = label_of(m)
        busy = f" Its {m.get('queue', 0)} queued and {m.get('in_flight', 0)} running requests finish first." \
            if m.get("queue") or m.get("in_flight") else ""
        pinned = " It is pinned." if m.get("pinned") else ""

        def go() -> None:
            self._started(f"unloading {label}…")
            self._run(f"unload {label}", partial(self.app.client.unload, m["name"], m["version"], **self._where()),
                      lambda r: f"{label} is UNLOADED" if r.get("state", "UNLOADED") == "UNLOADED"
                      else f"{label} was unloaded; a request is loading it again ({r['state']})")

        self.confirm(f"Unload {label}?",
                      f"{label} stops serving until it is loaded again and its memory is freed.{busy}{pinned}",
                      "Unload", go)

    def evict(self) -> None:
        found, _ = self.picture.marked_models(self.app.shown_keys())
        if found:
            why = {fmt.row_key(m): evict_refusal(m) for m in found}
            refused = [f"{label_of(m)} {why[fmt.row_key(m)]}" for m in found if why[fmt.row_key(m)]]
            if refused:
                self.app.notify("; ".join(refused[:4]) + (" …" if len(refused) > 4 else "") + " — left out.",
                            severity="warning", timeout=6)
            keep = {key for key, refusal in why.items() if not refusal}
            if not keep:
                return
            self.picture.marked &= keep
            self._bulk("evict", lambda m: self.app.client.evict(m["name"], m["version"], **self._where()), True)
            return
        m = self.app.need_selection()
        if m is None:
            return
        label = label_of(m)
        refusal = evict_refusal(m)
        if refusal:
            self.app.notify(f"{label} {refusal}.", severity="warning", timeout=4)
            return
        value = "\n".join(fmt.eviction_lines(m.get("eviction"), m))

        def go() -> None:
            self._started(f"evicting {label}…")
            self._run(f"evict {label}", partial(self.app.client.evict, m["name"], m["version"], **self._where()),
                      lambda r: f"{label} evicted ({r.get('state', '?')})")

        self.confirm(f"Evict {label}?",
                      f"Free {label}'s device memory now; its next request reloads it "
                      f"(from the host tier when there is one).\n{value}", "Evict", go)

    def delete(self) -> None:
        m = self.app.need_selection()
        if m is None:
            return
        label = label_of(m)
        versions = [x for x in (self.app.client.snapshot() or {}).get("models") or () if x.get("name") == m["name"]]
        whole = len(versions) <= 1  # its only version: the model goes with it
        what = f"model {m['name']} (its only version, v{m['version']})" if whole else label

        def go() -> None:
            self._started(f"deleting {what}…")
            self._run(f"delete {what}", partial(self.app.client.delete, m["name"], None if whole else m["version"]),
                      lambda r: f"deleted {r.get('name')} " + ", ".join(f"v{v}" for v in r.get("deleted", [])))

        self.confirm(f"Delete {what}?",
                      f"{what} is removed for good: its registration, pin and priority, here and after a "
                      "restart (the audit log keeps the record). Refused while it is loaded, active with "
                      "other versions, or in a split, swap or canary.", "Delete", go)

    def pin(self) -> None:
        found, _ = self.picture.marked_models(self.app.shown_keys())
        pin_all = not all(m.get("pinned") for m in found)  # all pinned already: unpin them
        if self._bulk("pin" if pin_all else "unpin",
                      lambda m: self.app.client.pin(m["name"], m["version"], pin_all, **self._where()), False):
            return
        m = self.app.need_selection()
        if m is None:
            return
        label = label_of(m)
        pinned = not m.get("pinned")
        verb = "pin" if pinned else "unpin"
        self._started(f"{verb}ning {label}…")
        self._run(f"{verb} {label}", partial(self.app.client.pin, m["name"], m["version"], pinned, **self._where()),
                  lambda r: f"{label} {'pinned: never evicted' if r.get('pinned') else 'unpinned'}")

    def _priority(self, step: int) -> None:
        m = self.app.need_selection()
        if m is None:
            return
        cfg = m.get("config") or {}
        base = int(cfg.get("priority") or 1)
        levels = int(cfg.get("priority_levels") or base)
        new = base + step
        label = label_of(m)
        if not 1 <= new <= levels:
            self.app.notify(f"{label} is already at P{base} "
                        f"({'the most urgent' if new < 1 else 'the least urgent'} of {levels} levels).",
                        severity="warning")
            return
        # later presses build on this one, before the snapshot says so
        m["config"] = dict(cfg, priority=new)
        self._started(f"{label}: base priority P{base} → P{new}")

        def done(r: dict[str, Any]) -> str:
            return f"{label} base priority is P{(r.get('config') or {}).get('priority', new)}"

        self._run(f"priority {label}", partial(self.app.client.set_priority, m["name"], m["version"], new), done)

    def priority_up(self) -> None:
        self._priority(-1)  # P1 is the most urgent

    def priority_down(self) -> None:
        self._priority(+1)

    def register(self) -> None:
        """The register form stays open until the registration succeeds: a refusal shows under
        the field it names, with everything typed still there."""

        async def register(form: dict[str, Any]) -> dict[str, Any]:
            return await self.app.client.register(form["name"], form["source"], form["version"], form["options"])

        def answered(result: dict[str, Any] | None) -> None:
            if not result:
                return
            self.app.notify(f"{result.get('name', '?')} v{result.get('version', '?')} registered "
                        f"({result.get('state', 'UNLOADED')}); l loads it", title="done")
            self.app.refresh_soon()

        self.app.push_screen(RegisterScreen(register), answered)

    # -- versions: swap, split, canary

    @staticmethod
    def _version_desc(m: dict[str, Any]) -> str:
        cfg = m.get("config") or {}
        return f"{m.get('state', '?')} · {m.get('source') or cfg.get('source', '?')}"

    def _swap_busy(self, name: str) -> bool:
        swap = (self.picture.routing.get(name) or {}).get("swap")
        if swap or name in self.swapping:
            to = (swap or {}).get("to") or self.swapping.get(name)
            self.app.notify(f"a swap of {name} is under way (→ v{to}): wait for it to finish.", severity="warning")
            return True
        return False

    def _name_free_of_swaps(self) -> str | None:
        """The selected model's name for a version action; None (having said why) when nothing
        is selected or a swap of that name is under way."""
        m = self.app.need_selection()
        if m is None or self._swap_busy(m["name"]):
            return None
        return m["name"]

    def swap(self) -> None:
        name = self._name_free_of_swaps()
        if name is None:
            return
        active = self.picture.active_version(name)
        choices = [(str(v["version"]), self._version_desc(v)) for v in self.picture.versions(name)
                   if str(v["version"]) != active]
        if not choices:
            self.app.notify(f"{name} has only v{active}: register another version (r) to swap to.", severity="warning")
            return

        def picked(version: str | None) -> None:
            if version is None:
                self.app.notify("swap: cancelled.", timeout=2)
                return

            def go() -> None:
                self._swap(name, active, version)

            self.confirm(f"Swap {name} v{active} → v{version}?",
                          f"v{version} is loaded and warmed beside v{active} (others may be evicted to make "
                          f"room), then routing switches at once; v{active} finishes everything queued and "
                          f"running, then unloads. If v{version} fails to load or warm, v{active} keeps serving.",
                          "Swap", go)

        self.app.push_screen(VersionPickerScreen(f"Swap {name} (active v{active}) to…", choices,
                                             "enter picks · esc cancels"), picked)

    def _swap(self, name: str, active: str | None, version: str) -> None:
        self.swapping[name] = version
        self._started(f"swapping {name} v{active} → v{version}…")

        async def call() -> dict[str, Any]:
            try:
                return await self.app.client.swap(name, version)
            finally:
                self.swapping.pop(name, None)

        def done(r: dict[str, Any]) -> str:
            secs = r.get("seconds")
            return (f"{name} swapped v{r.get('from', active)} → v{r.get('to', version)}"
                    + (f" in {secs:.1f} s" if isinstance(secs, (int, float)) else ""))

        self._run(f"swap {name}", call, done, model=name)
        self.app.refresh_soon()

    def split(self) -> None:
        name = self._name_free_of_swaps()
        if name is None:
            return
        versions = [str(v["version"]) for v in self.picture.versions(name)]
        active = self.picture.active_version(name)
        if len(versions) < 2:
            self.app.notify(f"{name} has only v{active}: register another version (r) to split between.",
                        severity="warning")
            return
        routing = self.picture.routing.get(name) or {}
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
                      partial(self.app.client.set_split, name, form["weights"], form["shadow"] or None,
                              form["metric_output"]),
                      lambda r: f"{name} routes {fmt.arms_label(r) or 'everything to v' + str(r.get('active'))}",
                      model=name)

        self.app.push_screen(SplitScreen(name, versions, weights, [str(v) for v in routing.get("shadow") or ()],
                                     routing.get("metric_output")), answered)

    def canary(self) -> None:
        m = self.app.need_selection()
        if m is None:
            return
        name = m["name"]
        routing = self.picture.routing.get(name) or {}
        if fmt.canary_running(routing):
            c = routing.get("canary") or {}
            base = c.get("baseline") or self.picture.active_version(name)

            def stop() -> None:
                self._started(f"aborting the canary on {name}…")
                self._run(f"abort canary {name}", partial(self.app.client.stop_canary, name),
                          lambda r: f"canary on {name} aborted: v{r.get('active', base)} serves everything")

            self.confirm(f"Abort the canary on {name}?",
                          f"v{c.get('version', '?')} is at {fmt._num(c.get('share') or 0)}% of {name}'s traffic. "
                          f"Aborting sends its share back to 0: v{base} serves everything.", "Abort canary", stop)
            return
        if self._swap_busy(name):
            return
        active = self.picture.active_version(name) or "?"
        candidates = [str(v["version"]) for v in self.picture.versions(name) if str(v["version"]) != active]
        if not candidates:
            self.app.notify(f"{name} has only v{active}: register another version (r) to canary.", severity="warning")
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

            self._run(f"canary {name}", partial(self.app.client.start_canary, name, version, **form), done, model=name)

        self.app.push_screen(CanaryScreen(name, active, candidates), answered)


    def run_command(self, text: str) -> bool:
        """Run a ``:`` command line; a mistake is a notification saying what was expected."""
        try:
            c = cmds.parse(text, self.picture.versions_by_name())
        except ValueError as e:
            self.app.notify(str(e), title="command", severity="error", timeout=6)
            return False
        if c.action in MUTATING | {"unpin"} and self.app.read_only:
            self.app.notify(f"read-only: :{c.action} changes the engine, and this console was started "
                            "with --read-only.", severity="warning", timeout=4)
            return False
        if c.name is not None and c.action not in ("logs", "split"):
            if not self.app.select(c.name, c.version):
                return False
        act = c.action
        if act == "model":
            return self.app.jump(c.args[0])
        if act in ("load", "unload", "evict", "delete", "canary"):
            getattr(self, act)()
        elif act in ("pin", "unpin"):
            m = self.app.selected()
            if m is not None and bool(m.get("pinned")) != (act == "pin"):
                self.pin()
            elif m is not None:
                self.app.notify(f"{label_of(m)} is already {'pinned' if act == 'pin' else 'unpinned'}.", timeout=3)
        elif act == "swap":
            active = self.picture.active_version(str(c.name))
            if c.version == active:
                self.app.notify(f"{c.name} v{c.version} is already active.", severity="warning")
            elif not self._swap_busy(str(c.name)):
                self._swap(str(c.name), active, str(c.version))
        elif act == "split":
            name = str(c.name)
            if self._swap_busy(name):
                return False
            active = self.picture.active_version(name)
            weights = {} if set(c.weights) == {active} else c.weights
            self._run(f"split {name}", partial(self.app.client.set_split, name, weights, None, None),
                      lambda r: f"{name} routes {fmt.arms_label(r) or 'everything to v' + str(r.get('active'))}",
                      model=name)
        elif act == "describe":
            key = self.app.selected_key()
            if key is not None:
                self.app.describe(key)
        elif act == "logs":
            self.app.logs(str(c.name) if c.name else (self.app.selected() or {}).get("name", ""))
        elif act == "sort":
            return self._sort_command(c.args)
        elif act == "filter":
            self.app.set_filter(c.args[0] if c.args else "")
        elif act == "interval":
            self.app.set_refresh(float(c.args[0]))
            self.app.notify(f"refreshing every {fmt._num(self.app.refresh_s)} s", timeout=2)
        elif act == "theme":
            if c.args and c.args[0] not in self.app.available_themes:
                self.app.notify(f"no theme '{c.args[0]}' (themes: {', '.join(sorted(self.app.available_themes))})",
                            severity="error")
                return False
            if c.args:
                self.app.theme = c.args[0]
            else:
                self.app.action_cycle_theme()
        elif act == "help":
            self.app.action_help()
        elif act == "quit":
            self.app.action_request_quit()
        return True

    def _sort_command(self, args: tuple[str, ...]) -> bool:
        want = args[0].lower()
        col = next((k for k, label, _ in fmt.COLUMNS if want in (k.lower(), label.strip().lower())), None)
        if col is None:
            col = next((k for k, label, _ in fmt.COLUMNS if label.strip().lower().startswith(want)), None)
        if col is None:
            self.app.notify(f":sort: no column '{args[0]}' (columns: "
                        f"{', '.join(fmt.COLUMN_LABELS[k] for k in fmt.COLUMN_KEYS)})", severity="error")
            return False
        self.app.sort_by(col, None if len(args) < 2 else args[1].lower() == "desc")
        return True
