"""Pure formatting for the console: numbers to short strings, snapshot rows, option parsing.

No Textual and no engine here, so it is cheap to import and easy to test.
"""

from __future__ import annotations

import json
import time
from typing import Any

KiB = 1024
MiB = 1024**2
GiB = 1024**3

BARS = "▁▂▃▄▅▆▇█"

# the models table: (column key, label, width)
COLUMNS: tuple[tuple[str, str, int], ...] = (
    ("name", "model", 18),
    ("version", "ver", 4),
    ("state", "state", 9),
    ("device", "device", 7),
    ("memory", "memory", 9),
    ("queue", "queue", 5),
    ("in_flight", "infl", 4),
    ("rate", "req/s", 7),
    ("latency", "p50/p95 ms", 11),
    ("cache", "cache", 5),
    ("priority", "urg/base", 9),
    ("health", "health", 8),
)
COLUMN_KEYS = tuple(c[0] for c in COLUMNS)
COLUMN_LABELS = {c[0]: c[1] for c in COLUMNS}

STATE_ORDER = {"READY": 0, "WARMING": 1, "LOADING": 2, "UNLOADING": 3, "FAILED": 4, "UNLOADED": 5}
HEALTH_ORDER = {"failed": 0, "errors": 1, "slow": 2, "ok": 3, "idle": 4, "—": 5}


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


def health(m: dict[str, Any], recent_failures: bool) -> str:
    """failed (load failed), errors (requests failed lately), slow (p95 over the target), ok, idle."""
    state = m.get("state")
    if state == "FAILED":
        return "failed"
    if recent_failures:
        return "errors"
    lat = (m.get("stats") or {}).get("latency_ms") or {}
    target = m.get("latency_target_ms")
    if state == "READY" and target and lat.get("p95") is not None and lat["p95"] > target:
        return "slow"
    if state == "READY":
        return "ok" if m.get("request_rate") or m.get("in_flight") or m.get("queue") else "idle"
    return "—"


def device_label(m: dict[str, Any]) -> str:
    """A budgeted GPU by its index (a simulated one's torch device reads "cpu"), else the device string."""
    return f"gpu{m['device_index']}" if m.get("device_index") is not None else str(m.get("device") or "—")


def model_cells(m: dict[str, Any], recent_failures: bool = False) -> dict[str, tuple[str, Any]]:
    """One row of the models table: column key -> (text, sort value)."""
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
    return {
        "name": (name + (" [pin]" if m.get("pinned") else ""), name.lower()),
        "version": (version + ("*" if m.get("active") else ""), _version_sort(version)),
        "state": (state, STATE_ORDER.get(state, 9)),
        "device": (device, device),
        "memory": (size(fp) if fp else "—", fp),
        "queue": (str(m.get("queue") or 0), m.get("queue") or 0),
        "in_flight": (str(m.get("in_flight") or 0), m.get("in_flight") or 0),
        "rate": (rate(m.get("request_rate")), m.get("request_rate") or 0.0),
        "latency": (f"{ms(lat.get('p50'))}/{ms(lat.get('p95'))}",
                    lat.get("p95") if lat.get("p95") is not None else -1.0),
        "cache": (pct(hit), hit if hit is not None else -1.0),
        "priority": (f"{urgency:.1f}/P{base if base is not None else '?'}", (-(urgency or 0.0), base or 0)),
        "health": (h, HEALTH_ORDER.get(h, 9)),
    }


def traffic_flowing(snapshot: dict[str, Any] | None) -> bool:
    """Any model with requests arriving, queued or running."""
    if not snapshot:
        return False
    return any((m.get("request_rate") or 0) > 0 or (m.get("queue") or 0) > 0 or (m.get("in_flight") or 0) > 0
               for m in snapshot.get("models") or ())


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
    resident, idle = ev.get("resident_s", 0), ev.get("idle_s", 0)
    used = f"idle {idle:.0f} s" if idle < resident else "unused since loaded"
    lines.append(f"  resident {resident:.0f} s · {used}"
                 + (" · busy (not evictable now)" if ev.get("busy") else ""))
    return lines


def batch_sizes(stats: dict[str, Any], limit: int = 8) -> str:
    sizes = stats.get("batch_sizes") or {}
    if not sizes:
        return "—"
    items = sorted(sizes.items(), key=lambda kv: -kv[1])[:limit]
    return "  ".join(f"{k}×{v}" for k, v in sorted(items, key=lambda kv: int(kv[0]) if str(kv[0]).isdigit() else 0))
