"""What the console knows of the engine between two snapshots: the table's data model.

The app paints; this owns the picture it paints from: every version's latest
snapshot and routing, the short histories the detail pane draws, which models
failed lately, each model's events, the marks, the filter and the sort order.
No Textual here, so a test can drive it with plain dicts.
"""

from __future__ import annotations

import re
from collections import deque
from typing import Any

from . import format as fmt
from .widgets import HISTORY

FAILURE_MEMORY_S = 30.0  # a model that failed a request this recently shows health "errors"
Cells = dict[str, tuple[str, Any]]  # column key -> (text shown, sort value)


class Picture:
    """The console's model of the engine.  ``observe`` takes a snapshot's models and answers
    the rows to show (filtered, with their cells); the rest answer questions the actions ask."""

    def __init__(self) -> None:
        self.models: dict[str, dict[str, Any]] = {}  # row key -> the version's latest snapshot
        self.routing: dict[str, dict[str, Any]] = {}  # model name -> its routing (split, canary, swap)
        self.marked: set[str] = set()  # row keys marked with space: u, e and p act on them all
        self.sort_col = "name"
        self.sort_reverse = False
        self.filter_text = ""
        self.filter_error: str | None = None  # the filter is not a regular expression: why
        self._filter_re: re.Pattern[str] | None = None
        self._lat_hist: dict[str, deque[float]] = {}
        self._rate_hist: dict[str, deque[float]] = {}
        self._fail_seen: dict[str, tuple[int, float]] = {}  # row key -> (failures, when they last rose)
        self._model_events: dict[str, deque[dict[str, Any]]] = {}  # row key (or name) -> its last events
        self._name_events: dict[str, deque[dict[str, Any]]] = {}  # a model's events, every version (logs)
        self.max_seq = 0  # the newest event seen: the snapshot's recent events overlap the stream

    # -- snapshots

    def observe(self, models: list[dict[str, Any]], now: float) -> list[tuple[str, Cells]]:
        """Take a snapshot's models (``now``: a monotonic clock); answer the rows the filter
        shows, in the snapshot's order, with their cells."""
        current: dict[str, dict[str, Any]] = {}
        shown: list[tuple[str, Cells]] = []
        for m in models:
            key = fmt.row_key(m)
            current[key] = m
            stats = m.get("stats") or {}
            lat = self._lat_hist.get(key)  # one sample per refresh, for the detail pane
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
            if not self.matches(m):
                continue
            recent = now - self._fail_seen[key][1] < FAILURE_MEMORY_S
            cells = fmt.model_cells(m, recent, self.routing.get(str(m.get("name"))))
            if key in self.marked:
                cells["name"] = ("✓" + cells["name"][0], cells["name"][1])
            shown.append((key, cells))
        self.marked &= set(current)  # a deleted version is no longer marked
        for gone in [k for k in self._lat_hist if k not in current]:
            self._lat_hist.pop(gone, None)
            self._rate_hist.pop(gone, None)
            self._fail_seen.pop(gone, None)
        self.models = current
        return shown

    def histories(self, key: str) -> tuple[deque[float], deque[float]]:
        """The p95 latency and throughput samples of ``key``, one per refresh."""
        return self._lat_hist.get(key, deque()), self._rate_hist.get(key, deque())

    # -- the filter and the sort order

    def matches(self, m: dict[str, Any]) -> bool:
        if self._filter_re is None:
            return True
        hay = f"{m.get('name')}:{m.get('version')} {m.get('state')} {m.get('device') or ''}"
        return self._filter_re.search(hay) is not None

    def set_filter(self, text: str) -> str | None:
        """Filter by a regular expression (case-insensitive); one that does not compile matches as
        plain text.  Answers why it did not compile, when that is news (to say it once)."""
        self.filter_text = text
        news = None
        if not text:
            self._filter_re = None
            self.filter_error = None
            return None
        try:
            self._filter_re = re.compile(text, re.IGNORECASE)
            self.filter_error = None
        except re.error as e:
            self._filter_re = re.compile(re.escape(text), re.IGNORECASE)
            news = str(e) if self.filter_error != str(e) else None
            self.filter_error = str(e)
        return news

    def sort_to(self, col: str, reverse: bool | None = None) -> None:
        """Sort by ``col``; ``reverse`` None: a newly picked column starts in its natural order
        (numbers largest first), the same column keeps its order."""
        if col not in fmt.COLUMN_LABELS:
            raise ValueError(f"no column '{col}'")
        if reverse is None and col != self.sort_col:
            reverse = col in fmt.DESCENDING_FIRST
        self.sort_col = col
        if reverse is not None:
            self.sort_reverse = reverse

    def sort_step(self, step: int) -> str:
        """The column ``step`` places right (or left) of the sorted one, wrapping."""
        keys = fmt.COLUMN_KEYS
        return keys[(keys.index(self.sort_col) + step) % len(keys)]

    # -- events

    def add_event(self, ev: dict[str, Any]) -> bool:
        """Record one event under its model; False when it was seen already."""
        seq = ev.get("seq")
        if ev.get("kind") == "connection" and (ev.get("data") or {}).get("restarted"):
            self.max_seq = 0  # a new server numbers its events from 1 again
        if seq is not None:
            if seq <= self.max_seq:
                return False
            self.max_seq = seq
        name = ev.get("model")
        if name:
            key = f"{name}:{ev['version']}" if ev.get("version") is not None else name
            self._model_events.setdefault(key, deque(maxlen=20)).append(ev)
            self._name_events.setdefault(name, deque(maxlen=1000)).append(ev)
        return True

    def recent_events(self, key: str, name: str) -> list[dict[str, Any]]:
        """The last events of version ``key`` and of its model ``name`` as a whole, oldest first."""
        found = list(self._model_events.get(key, ())) + list(self._model_events.get(name, ()))
        return sorted(found, key=lambda e: e.get("ts") or 0)

    def events_of(self, name: str) -> list[dict[str, Any]]:
        """Every event kept of model ``name``, all versions (the logs view)."""
        return list(self._name_events.get(name, ()))

    def error_logged_since(self, name: str, seq: int) -> bool:
        """Whether the engine logged an error event of ``name`` after event ``seq``."""
        return any((ev.get("seq") or 0) > seq and ev.get("level") == "error"
                   for ev in self._name_events.get(name, ()))

    # -- versions and marks

    def versions(self, name: str) -> list[dict[str, Any]]:
        """The name's registered versions (their latest snapshots), in version order."""
        found = [m for m in self.models.values() if m.get("name") == name]
        return sorted(found, key=lambda m: fmt._version_sort(m.get("version")))

    def active_version(self, name: str) -> str | None:
        routing = self.routing.get(name) or {}
        if routing.get("active") is not None:
            return str(routing["active"])
        return next((str(m["version"]) for m in self.versions(name) if m.get("active")), None)

    def versions_by_name(self) -> dict[str, list[str]]:
        out: dict[str, list[str]] = {}
        for m in self.models.values():
            out.setdefault(str(m["name"]), []).append(str(m["version"]))
        return {n: sorted(v, key=fmt._version_sort) for n, v in out.items()}

    def marked_models(self, shown: set[str] | dict[str, Any]) -> tuple[list[dict[str, Any]], int]:
        """The marked versions, and how many of them the filter hides (not in ``shown``)."""
        found = [self.models[k] for k in sorted(self.marked) if k in self.models]
        return found, sum(1 for k in self.marked if k in self.models and k not in shown)
