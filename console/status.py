"""The console's header line, as a pure function of the snapshot and what the operator set.

The order matters on a narrow terminal, which cuts the end: the counts, the rate, the sort and
the filter first (k9s keeps its filter in the breadcrumb), then where it runs (from 100
columns, or when something is wrong), marks, the fleet, swaps and canaries, the demo, and
READ-ONLY.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from . import __version__
from . import format as fmt
from .picture import Picture


@dataclass(frozen=True)
class View:
    """What the header shows beside the snapshot and the picture."""

    where: str  # "attached to URL", "embedded · URL", "in-process"
    width: int  # the terminal's columns
    trouble: bool = False  # the server did not start, or the link is down: where it runs stays in view
    shown_rows: int = 0  # rows the filter lets through
    target_node: str | None = None  # a fleet: the node actions act on (None: all)
    swapping: dict[str, str] = field(default_factory=dict)  # swaps this console started, not yet answered
    demo_rate: float | None = None  # req/s of the demo traffic (None: no demo)
    read_only: bool = False


def status_text(snap: dict[str, Any], picture: Picture, view: View) -> str:
    models = snap.get("models") or []
    ready = sum(1 for m in models if m.get("state") == "READY")
    total_rate = sum(fmt.throughput(m) for m in models)
    total_err = sum((m.get("stats") or {}).get("error_rps") or 0.0 for m in models)
    parts = [f"{len(models)} models ({ready} ready)",
             f"{fmt.rate(total_rate)} req/s" + (f" ({fmt.rate(total_err)} err/s)" if total_err else ""),
             f"sort {fmt.COLUMN_LABELS[picture.sort_col].strip()}{'↓' if picture.sort_reverse else '↑'}"]
    if picture.filter_text:
        bad = " (not a regex: as text)" if picture.filter_error else ""
        parts.append(f"filter /{picture.filter_text}/ {view.shown_rows} of {len(models)}{bad}")
    if view.width >= 100 or view.trouble:
        parts.insert(0, view.where)
    if view.width >= 140:
        parts.insert(0, f"modelconsole {__version__}")
    if picture.marked:
        parts.append(f"{len(picture.marked)} marked (u, e, p act on them; esc clears)")
    nodes = snap.get("nodes") or []
    if nodes:
        live = sum(1 for n in nodes if n.get("health") in ("ok", "degraded"))
        degraded = sum(1 for n in nodes if n.get("health") == "degraded")
        target = f"node {view.target_node[:8]}" if view.target_node else "all nodes"
        parts.append(f"fleet {live} nodes" + (f" ({degraded} degraded)" if degraded else "")
                     + f" · actions on {target} (n)")
    for name in sorted(set(picture.routing) | set(view.swapping)):
        routing = picture.routing.get(name)
        line = fmt.swap_line(name, routing)
        if line is None and name in view.swapping:
            line = f"swap {name} →{view.swapping[name]}: starting"
        if line is None and fmt.canary_running(routing):
            c = (routing or {}).get("canary") or {}
            line = f"canary {name} →{c.get('version', '?')} {fmt._num(c.get('share') or 0)}%"
        if line:
            parts.append(line)
    if view.demo_rate is not None:
        parts.append(f"demo {fmt.rate(view.demo_rate)} req/s")
    if view.read_only:
        parts.append("READ-ONLY")
    return " " + " · ".join(parts)
