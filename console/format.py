"""Pure formatting for the console: numbers to short strings, snapshot rows, option parsing.

No Textual and no engine here, so it is cheap to import and easy to test.
"""

from __future__ import annotations

import itertools
import json
import math
import time
from typing import Any

KiB = 1024
MiB = 1024**2
GiB = 1024**3

BARS = "▁▂▃▄▅▆▇█"

# the models table: (column key, label, width), ranked: what an operator acts on first (name,
# state, health, req/s, err%, p95) fits an 80-column terminal; the rest scrolls sideways, behind
# the pin glyph and the name, which stay frozen (``FROZEN``)
COLUMNS: tuple[tuple[str, str, int], ...] = (
    ("pin", " ", 1),
    ("name", "model", 16),
    ("version", "ver", 4),
    ("state", "state", 9),
    ("health", "health", 7),
    ("rate", "req/s", 6),
    ("errors", "err%", 5),
    ("p95", "p95ms", 6),
    ("route", "route", 10),
    ("device", "device", 7),
    ("memory", "memory", 9),
    ("queue", "queue", 6),
    ("in_flight", "infl", 5),
    ("p50", "p50ms", 6),
    ("cache", "cache", 6),
    ("priority", "urg/P", 7),
)
FROZEN = 2  # pin and name
COLUMN_KEYS = tuple(c[0] for c in COLUMNS)
COLUMN_LABELS = {c[0]: c[1] for c in COLUMNS}
COLUMN_LABELS["pin"] = "pin"
# columns whose natural first sort is largest first (numbers an operator hunts for: the busiest,
# the slowest, the biggest); the rest sort A→Z / best state first
DESCENDING_FIRST = frozenset({"rate", "errors", "p95", "p50", "memory", "queue", "in_flight", "cache", "priority",
                              "pin"})
PIN_GLYPH = "◆"

STATE_ORDER = {"READY": 0, "WARMING": 1, "LOADING": 2, "UNLOADING": 3, "FAILED": 4, "UNLOADED": 5}
HEALTH_ORDER = {"failed": 0, "errors": 1, "degraded": 2, "slow": 3, "ok": 4, "idle": 5, "—": 6}


def size(n: float | None) -> str:
    """Bytes as a short human string: 512 B, 37.5 KiB, 1.2 MiB, 3.40 GiB."""
    if n is None:
        return "—"
    n = float(n)
    if n < KiB:
        return f"{n:.0f} B"
    if n < MiB:
        return f"{n / KiB:.1f} KiB"
    if n < GiB:
        return f"{n / MiB:.1f} MiB"
    return f"{n / GiB:.2f} GiB"


def gib(n: float | None) -> str:
    return "—" if n is None else f"{n / GiB:.1f}"


def rate(r: float | None) -> str:
    if not r:
        return "0"
    if r >= 100:
        return f"{r:.0f}"
    if r >= 10:
        return f"{r:.1f}"
    return f"{r:.2f}"


def ms(v: float | None) -> str:
    if v is None:
        return "—"
    if v >= 100:
        return f"{v:.0f}"
    if v >= 10:
        return f"{v:.1f}"
    return f"{v:.2f}"


def pct(v: float | None) -> str:
    return "—" if v is None else f"{v:.0f}%"


def clock(ts: float | None) -> str:
    return time.strftime("%H:%M:%S", time.localtime(ts if ts else time.time()))


def row_key(m: dict[str, Any]) -> str:
    return f"{m['name']}:{m['version']}"


def _version_sort(v: Any) -> tuple[int, str]:
    s = str(v)
    return (int(s), "") if s.isdigit() else (1 << 30, s)


def cache_hit_pct(stats: dict[str, Any]) -> float | None:
    hits, misses = stats.get("cache_hits") or 0, stats.get("cache_misses") or 0
    return None if hits + misses == 0 else 100.0 * hits / (hits + misses)


def throughput(m: dict[str, Any]) -> float:
    """Answers per second over the last 10 s (the snapshot's ``stats.throughput_rps``)."""
    return float((m.get("stats") or {}).get("throughput_rps") or 0.0)


def error_pct(m: dict[str, Any]) -> float | None:
    """Failed answers as a percentage of all answers over the last 10 s; None without answers."""
    stats = m.get("stats") or {}
    answered = stats.get("throughput_rps") or 0.0
    return None if answered <= 0 else 100.0 * (stats.get("error_rps") or 0.0) / answered


def health(m: dict[str, Any], recent_failures: bool) -> str:
    """failed (load failed), errors (requests failed lately), degraded (a fleet's version short of
    its replicas), slow (p95 over the target), ok, idle."""
    state = m.get("state")
    if state == "FAILED":
        return "failed"
    if recent_failures:
        return "errors"
    if m.get("replicas_short"):
        return "degraded"
    lat = (m.get("stats") or {}).get("latency_ms") or {}
    target = m.get("latency_target_ms")
    if state == "READY" and target and lat.get("p95") is not None and lat["p95"] > target:
        return "slow"
    if state == "READY":
        return "ok" if throughput(m) or m.get("in_flight") or m.get("queue") else "idle"
    return "—"


def device_label(m: dict[str, Any]) -> str:
    """Where a version runs, as the engine spells it (``gpu0``, ``cpu``, ``—``), the same in the
    table, the detail pane and the events; older servers' snapshots lack it: derived the same way."""
    if m.get("device_label"):
        return str(m["device_label"])
    if m.get("device_index") is not None:
        return f"gpu{m['device_index']}"
    return str(m.get("device")) if m.get("state") in ("READY", "WARMING", "UNLOADING") and m.get("device") else "—"


def route_text(m: dict[str, Any], routing: dict[str, Any] | None) -> tuple[str, float]:
    """This version's part in its name's routing: ``80%`` of a split, ``1→2 25%`` on both arms of a
    running canary, ``shadow``, ``→2 …`` / ``swap in`` while a swap runs, else blank.  The sort
    value is its share of traffic (0..100)."""
    if not routing:
        return "", 100.0 if m.get("active") else 0.0
    version = str(m.get("version"))
    active = str(routing.get("active"))
    swap = routing.get("swap")
    if swap:
        if version == active:
            return f"→{swap.get('to', '?')} …", 100.0
        if version == str(swap.get("to")):
            return "swap in", 0.0
    canary = routing.get("canary")
    if canary and canary_running(routing):
        base, cand = str(canary.get("baseline") or active), str(canary.get("version"))
        share = float(canary.get("share") or 0)
        if version in (base, cand):
            return f"{base}→{cand} {_num(share)}%", share if version == cand else 100.0 - share
    if version in {str(v) for v in routing.get("shadow") or ()}:
        return "shadow", 0.0
    weights = shares(routing)
    if len(weights) > 1 or (weights and set(weights) != {active}):
        w = weights.get(version, 0.0)
        return (f"{_num(round(w, 1))}%" if w else "0%"), w
    return "", 100.0 if m.get("active") else 0.0


def model_cells(m: dict[str, Any], recent_failures: bool = False,
                routing: dict[str, Any] | None = None) -> dict[str, tuple[str, Any]]:
    """One row of the models table: column key -> (text, sort value).  ``routing``: the name's
    routing, for the route column."""
    stats = m.get("stats") or {}
    lat = stats.get("latency_ms") or {}
    cfg = m.get("config") or {}
    state = m.get("state") or "?"
    version = str(m.get("version"))
    fp = m.get("footprint_bytes") or 0
    hit = cache_hit_pct(stats)
    urgency = m.get("urgency") or 0.0
    base = cfg.get("priority")
    h = health(m, recent_failures)
    name = m.get("name") or "?"
    device = device_label(m)
    rps = throughput(m)
    err = error_pct(m)
    return {
        "pin": (PIN_GLYPH if m.get("pinned") else " ", 1 if m.get("pinned") else 0),
        "name": (name, name.lower()),
        "version": (version_text(m), _version_sort(version)),
        "state": (state, STATE_ORDER.get(state, 9)),
        "health": (h, HEALTH_ORDER.get(h, 9)),
        "rate": (rate(rps), rps),
        "errors": ("—" if err is None else f"{err:.1f}" if 0 < err < 10 else f"{err:.0f}",
                   -1.0 if err is None else err),
        "p95": (ms(lat.get("p95")), lat.get("p95") if lat.get("p95") is not None else -1.0),
        "route": route_text(m, routing),
        "device": (device, device),
        "memory": (size(fp) if fp else "—", fp),
        "queue": queue_text(m),
        "in_flight": (str(m.get("in_flight") or 0), m.get("in_flight") or 0),
        "p50": (ms(lat.get("p50")), lat.get("p50") if lat.get("p50") is not None else -1.0),
        "cache": (pct(hit), hit if hit is not None else -1.0),
        "priority": (f"{urgency:.1f}/P{base if base is not None else '?'}", (urgency or 0.0, -(base or 0))),
    }


def queue_text(m: dict[str, Any]) -> tuple[str, int]:
    """Queued requests, then ``+N`` waiting for device memory (a lazy load with no room yet)."""
    queued, waiting = m.get("queue") or 0, m.get("waiting_for_room") or 0
    return (f"{queued}+{waiting}" if waiting else str(queued)), queued + waiting


def version_text(m: dict[str, Any], routing: dict[str, Any] | None = None) -> str:
    """The version, always (``1*`` for the active one); its routing has its own column."""
    version = str(m.get("version"))
    return version + "*" if m.get("active") else version


def traffic_flowing(snapshot: dict[str, Any] | None) -> bool:
    """Any model with requests arriving, queued or running."""
    if not snapshot:
        return False
    return any(throughput(m) > 0 or (m.get("queue") or 0) > 0 or (m.get("in_flight") or 0) > 0
               or (m.get("waiting_for_room") or 0) > 0 for m in snapshot.get("models") or ())


def bar(fraction: float, width: int, marker: float | None = None) -> str:
    """A text bar ``█████░░░░`` of ``width`` cells, with ``│`` where ``marker`` (0..1) falls."""
    width = max(1, width)
    fraction = min(max(fraction, 0.0), 1.0)
    full = round(fraction * width)
    cells = ["█"] * full + ["░"] * (width - full)
    if marker is not None and 0.0 <= marker < 1.0:
        i = min(width - 1, int(marker * width))
        cells[i] = "┃" if i < full else "│"
    return "".join(cells)


def spark(values: list[float], width: int, lo: float = 0.0, hi: float | None = None) -> str:
    """A one-line sparkline on a fixed axis ``lo..hi`` (``hi`` None: the data's max, at least lo+1e-9).

    The most recent ``width`` values, right-aligned; missing history is blank."""
    if width <= 0:
        return ""
    vals = values[-width:]
    top = hi if hi is not None else max([lo, *vals]) if vals else lo
    span = top - lo
    out = []
    for v in vals:
        if span <= 0:
            out.append(BARS[0])
            continue
        f = (min(max(v, lo), top) - lo) / span
        out.append(BARS[min(len(BARS) - 1, int(f * (len(BARS) - 1) + 0.5))])
    return " " * (width - len(vals)) + "".join(out)


def parse_options(text: str) -> dict[str, Any]:
    """The register form's options: a JSON object, or ``key=value`` pairs separated by spaces or
    commas (each value read as JSON when it parses — numbers, true/false, lists — else a string)."""
    text = text.strip()
    if not text:
        return {}
    if text.startswith("{"):
        try:
            value = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"options: not valid JSON ({e.msg} at column {e.colno})") from None
        if not isinstance(value, dict):
            raise ValueError("options: expected a JSON object")
        return value
    out: dict[str, Any] = {}
    for part in text.replace(",", " ").split():
        key, eq, raw = part.partition("=")
        if not eq or not key:
            raise ValueError(f"options: expected key=value, got '{part}'")
        try:
            out[key] = json.loads(raw)
        except json.JSONDecodeError:
            out[key] = raw
    return out


def eviction_lines(ev: dict[str, Any] | None, m: dict[str, Any]) -> list[str]:
    """Why a resident model would (not) be evicted, from ``policy.explain``."""
    if m.get("pinned"):
        return ["pinned: never evicted"]
    if not ev:
        return ["not resident on a budgeted device" if m.get("state") == "READY" else "not resident"]
    lines = [f"keep value {ev.get('keep_value', 0):.3g} load-s saved/s/GiB (lowest goes first)"]
    lines.append(f"  rate {rate(ev.get('request_rate'))}/s (floor {ev.get('recency_floor', 0):.2g}, "
                 f"effective {ev.get('effective_rate', 0):.2g})")
    lines.append(f"  reload {ev.get('reload_seconds', 0):.2f} s · {ev.get('gib', 0):.3g} GiB · "
                 f"priority weight {ev.get('priority_weight', 0):.2g} (P{ev.get('base_priority', '?')})")
    resident, idle = ev.get("resident_s") or 0, ev.get("idle_s")
    used = f"idle {idle:.0f} s" if idle is not None and idle < resident else "unused since loaded"
    lines.append(f"  resident {resident:.0f} s · {used}"
                 + (" · busy (not evictable now)" if ev.get("busy") else ""))
    return lines


def batch_sizes(stats: dict[str, Any], limit: int = 8) -> str:
    sizes = stats.get("batch_sizes") or {}
    if not sizes:
        return "—"
    items = sorted(sizes.items(), key=lambda kv: -kv[1])[:limit]
    return "  ".join(f"{k}×{v}" for k, v in sorted(items, key=lambda kv: int(kv[0]) if str(kv[0]).isdigit() else 0))


# --------------------------------------------------------------------------- versions: swap, split, canary


def _num(v: float) -> str:
    """A weight or share without noise: 90, 12.5."""
    return f"{v:.0f}" if float(v).is_integer() else f"{v:.3g}"


def has_routing(routing: dict[str, Any] | None) -> bool:
    """Whether a name's routing is worth showing: a split over several arms, shadows, a canary or a swap."""
    if not routing:
        return False
    weights = {str(v): w for v, w in (routing.get("weights") or {}).items() if w}
    split = len(weights) > 1 or (weights and set(weights) != {str(routing.get("active"))})
    return bool(split or routing.get("shadow") or routing.get("canary") or routing.get("swap"))


CANARY_LIVE = ("starting", "running", "promoting")  # a canary in one of these holds the name


def canary_running(routing: dict[str, Any] | None) -> bool:
    c = (routing or {}).get("canary")
    return c is not None and bool(c) and str(c.get("state") or "running") in CANARY_LIVE


def arms_label(routing: dict[str, Any] | None) -> str | None:
    """The models table's "ver" cell for a name under routing: ``1:90 2:10`` (a split), ``1→2 25%``
    (a running canary), ``1→2 …`` (a swap under way); None when there is nothing but one version."""
    if not routing:
        return None
    active = str(routing.get("active") or "?")
    swap = routing.get("swap")
    if swap:
        return f"{active}→{swap.get('to', '?')} …"
    canary = routing.get("canary")
    if canary and canary_running(routing):
        share = canary.get("share")
        return f"{canary.get('baseline') or active}→{canary.get('version', '?')} {_num(share or 0)}%"
    weights = {str(v): float(w) for v, w in (routing.get("weights") or {}).items() if w}
    parts = []
    if len(weights) > 1 or (weights and set(weights) != {active}):
        total = sum(weights.values()) or 1.0
        ordered = sorted(weights.items(), key=lambda kv: _version_sort(kv[0]))
        parts = [f"{v}:{_num(100.0 * w / total)}" for v, w in ordered]
    shadow = [str(v) for v in routing.get("shadow") or ()]
    if shadow:
        if not parts:
            parts = [active]
        parts += [f"{v}:sh" for v in shadow]
    return " ".join(parts) or None


def shares(routing: dict[str, Any]) -> dict[str, float]:
    """Each arm's share of traffic in percent, from its weights; no weights (no split, or a
    canary just promoted): the active version takes it all."""
    weights = {str(v): float(w) for v, w in (routing.get("weights") or {}).items() if w}
    total = sum(weights.values())
    if total > 0:
        return {v: 100.0 * w / total for v, w in weights.items()}
    return {str(routing["active"]): 100.0} if routing.get("active") is not None else {}


def _dur(s: float | None) -> str:
    if s is None:
        return "—"
    s = max(0.0, float(s))
    return f"{s:.1f} s" if s < 60 else f"{s / 60:.1f} min"


def swap_line(name: str, routing: dict[str, Any] | None, now: float | None = None) -> str | None:
    """``swap tiny 1→2: loading (3.2 s)`` while a swap is under way, else None."""
    swap = (routing or {}).get("swap")
    if not swap:
        return None
    now = time.time() if now is None else now
    started = swap.get("started")
    since = f" ({_dur(now - started)})" if started else ""
    return f"swap {name} {(routing or {}).get('active', '?')}→{swap.get('to', '?')}: {swap.get('phase') or '…'}{since}"


def canary_line(name: str, routing: dict[str, Any] | None, now: float | None = None) -> str | None:
    """``canary tiny 1→2 step 2/4 25% running · next in 42 s · bounds ...`` while there is a canary."""
    c = (routing or {}).get("canary")
    if not c:
        return None
    now = time.time() if now is None else now
    steps = list(c.get("steps") or ())
    step = c.get("step")
    where = f" step {int(step) + 1}/{len(steps)}" if isinstance(step, int) and steps and step >= 0 else ""
    state = str(c.get("state") or "running")
    text = (f"canary {name} {c.get('baseline') or (routing or {}).get('active', '?')}→{c.get('version', '?')}"
            f"{where} {_num(c.get('share') or 0)}% {state}")
    interval = c.get("interval_s")
    if canary_running(routing) and interval and c.get("step_started"):
        text += f" · next step in {_dur(float(interval) - (now - float(c['step_started'])))}"
    bounds = c.get("bounds") or {}
    b = []
    if bounds.get("max_error_rate") is not None:
        b.append(f"errors ≤{100.0 * float(bounds['max_error_rate']):.3g}%")
    if bounds.get("max_p95_ratio") is not None:
        b.append(f"p95 ≤{float(bounds['max_p95_ratio']):.3g}× baseline")
    if b:
        text += " · bounds " + ", ".join(b)
    if c.get("reason"):
        text += f" · {c['reason']}"
    return text


ARM_HEADER = f"{'arm':<5}{'share':>6}{'req':>7}{'err':>5}{'err%':>7}{'p50':>7}{'p95':>7}{'mean out':>9}"  # 53 wide


def arm_rows(routing: dict[str, Any]) -> list[tuple[str, str]]:
    """The per-arm metrics side by side: (row text, kind) with kind active / canary / shadow / arm."""
    arms = routing.get("arms") or {}
    share = shares(routing)
    canary = routing.get("canary") or {}
    active = str(routing.get("active"))
    shadow = {str(v) for v in routing.get("shadow") or ()}
    versions = set(map(str, arms)) | set(share) | shadow
    if canary:
        versions |= {str(canary.get("version")), str(canary.get("baseline") or active)}
    versions.discard("None")
    rows = []
    for v in sorted(versions, key=_version_sort):
        a = arms.get(v) or {}
        if v in shadow:
            sh, kind = "shadow", "shadow"
        else:
            sh, kind = pct(share.get(v, 0.0)), "arm"
        if v == active:
            kind = "active"
        elif canary and v == str(canary.get("version")):
            kind = "canary"
        er = a.get("error_rate")
        mean = a.get("mean_output")
        label = v + ("*" if v == active else "")
        text = (f"{label:<5}{sh:>6}{a.get('requests', 0) or 0:>7}{a.get('errors', 0) or 0:>5}"
                f"{'—' if er is None else f'{100.0 * er:.1f}%':>7}{ms(a.get('p50_ms')):>7}{ms(a.get('p95_ms')):>7}"
                f"{'—' if mean is None else f'{mean:.4g}':>9}")
        rows.append((text, kind))
    return rows


def parse_number(text: str, what: str, *, lo: float | None = None, hi: float | None = None,
                 integer: bool = False, lo_open: bool = False) -> float:
    """A form's number, or a ValueError saying what is wrong with it."""
    raw = text.strip()
    try:
        value = float(raw)
    except ValueError:
        raise ValueError(f"{what}: '{raw}' is not a number") from None
    if not math.isfinite(value):
        raise ValueError(f"{what}: '{raw}' is not a finite number")
    if integer and not value.is_integer():
        raise ValueError(f"{what}: expected a whole number, got '{raw}'")
    if lo is not None and (value < lo or (lo_open and value == lo)):
        raise ValueError(f"{what}: must be {'more than' if lo_open else 'at least'} {_num(lo)}, got '{raw}'")
    if hi is not None and value > hi:
        raise ValueError(f"{what}: must be at most {_num(hi)}, got '{raw}'")
    return int(value) if integer else value


def parse_weights(fields: dict[str, str]) -> dict[str, float]:
    """The weights editor: version -> text (blank is 0).  Answers the positive weights, or a
    ValueError: a weight that is not a number, negative, or weights summing to nothing."""
    out: dict[str, float] = {}
    for version, text in fields.items():
        if not text.strip():
            continue
        w = parse_number(text, f"weight of v{version}", lo=0.0)
        if w > 0:
            out[version] = w
    if not out:
        raise ValueError("weights: give at least one version a weight above 0 (e.g. 90 and 10)")
    return out


def parse_versions(text: str, known: list[str], what: str = "shadow") -> list[str]:
    """A list of versions ("2, 3" or "2 3"), each one registered."""
    out = []
    for part in text.replace(",", " ").split():
        v = part.strip().lstrip("vV")
        if v not in known:
            raise ValueError(f"{what}: no version '{part}' (registered: {', '.join(known)})")
        if v not in out:
            out.append(v)
    return out


def parse_steps(text: str) -> list[float]:
    """Canary steps: percentages rising to 100, e.g. ``5, 25, 50, 100``."""
    parts = text.replace(",", " ").replace("%", " ").split()
    if not parts:
        raise ValueError("steps: give the shares in percent, rising to 100 (e.g. 5, 25, 50, 100)")
    steps = [parse_number(p, "steps", lo=0.0, hi=100.0, lo_open=True) for p in parts]
    if any(b <= a for a, b in itertools.pairwise(steps)):
        raise ValueError(f"steps: each step must be above the one before ({text.strip()})")
    if steps[-1] != 100:
        raise ValueError("steps: the last step must be 100 (the canary ends in a swap)")
    return [int(s) if float(s).is_integer() else s for s in steps]


def parse_rate(text: str, what: str = "max error rate") -> float:
    """A rate as a fraction (0.05) or a percentage (5%)."""
    raw = text.strip()
    if raw.endswith("%"):
        return parse_number(raw[:-1], what, lo=0.0, hi=100.0) / 100.0
    value = parse_number(raw, what, lo=0.0)
    if value > 1:
        raise ValueError(f"{what}: a fraction 0..1 (0.05) or a percentage (5%), got '{raw}'")
    return value


def node_lines(nodes: list[dict[str, Any]]) -> list[str]:
    """The fleet panel (``--serve --cluster``): one line per node, with what it holds."""
    if not nodes:
        return []
    out = [f"{'node':<10} {'health':<9} {'gpus':>4} {'memory':>17} {'req/s':>7}  holds"]
    for n in nodes:
        mem = f"{size(n.get('memory_used_bytes'))}/{size(n.get('memory_total_bytes'))}" if n.get("gpus") else "-"
        holds = ", ".join(n.get("holds") or []) or "-"
        if n.get("health") == "lost" and n.get("held"):
            holds = f"nothing (held {', '.join(n['held'])})"
        elif n.get("frontend_error"):
            holds += f" · {n['frontend_error']}"
        out.append(f"{str(n.get('node', '?'))[:8]:<10} {n.get('health', '?'):<9} {n.get('gpus', 0):>4} "
                   f"{mem:>17} {rate(n.get('rps')):>7}  {holds}")
    return out


def replicas_line(m: dict[str, Any]) -> str | None:
    """A version's replicas in the detail pane, when it has more than one or lives on a fleet's
    nodes: how many are READY, and each one's device (and node), state and answers."""
    reps = m.get("replicas") or []
    if len(reps) <= 1 and not any(r.get("node") for r in reps):
        return None
    ready = sum(1 for r in reps if r.get("state") == "READY")
    parts = []
    for r in reps:
        where = str(r.get("device") or "?") + (f"@{str(r['node'])[:8]}" if r.get("node") else "")
        state = "" if r.get("state") == "READY" else f" {r.get('state')}"
        parts.append(f"#{r.get('replica', '?')} {where}{state} ({r.get('served', 0)})")
    return f"replicas {ready}/{len(reps)} READY: " + " · ".join(parts)
