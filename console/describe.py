"""The describe view's text (k9s ``d``): one version's whole picture, from its snapshot, its
name's routing, its audit rows and its events.  Pure: sections of plain lines, no Textual."""

from __future__ import annotations

import json
from typing import Any

from . import format as fmt

Section = tuple[str, list[str]]


def _n(v: Any) -> str:
    return fmt._num(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else "?" if v is None else str(v)


def _tensor(t: dict[str, Any]) -> str:
    return f"{t.get('name', '?')} {t.get('datatype') or t.get('dtype') or '?'} {t.get('shape', '?')}"


def _remote_latency(remote: dict[str, Any]) -> str:
    """The last call split into network (and the proxy's encoding) and the remote's own work,
    when the remote says how long its engine took (a modelconsole does)."""
    total, own = remote.get("last_call_ms"), remote.get("last_remote_ms")
    if total is None:
        return "last call —"
    if own is None:
        return f"last call {fmt.ms(total)} ms round trip (the remote does not report its share)"
    return (f"last call {fmt.ms(total)} ms = network {fmt.ms(max(0.0, total - own))} ms "
            f"+ remote {fmt.ms(own)} ms")


def last_error(m: dict[str, Any], events: list[dict[str, Any]], audit: list[dict[str, Any]]) -> str | None:
    """The most recent error a version had: a failed load's reason, an error event, or a refused
    control call (whichever is newest), as one line an operator can paste into a ticket."""
    found: list[tuple[float, str]] = []
    for ev in events:
        if ev.get("level") == "error":
            found.append((ev.get("ts") or 0.0, f"{fmt.clock(ev.get('ts'))} {ev.get('message')}"))
    for row in audit:
        if row.get("result") == "error":
            found.append((row.get("ts") or 0.0,
                          f"{fmt.clock(row.get('ts'))} {row.get('action')} refused: {row.get('detail')}"))
    if found:
        return max(found)[1]
    return f"{m.get('state')}: {m['reason']}" if m.get("reason") else None


def sections(m: dict[str, Any], routing: dict[str, Any] | None, audit: list[dict[str, Any]],
             events: list[dict[str, Any]]) -> list[Section]:
    cfg = m.get("config") or {}
    stats = m.get("stats") or {}
    lat = stats.get("latency_ms") or {}
    out: list[Section] = []
    ident = [
        f"{m.get('name')} v{m.get('version')}{' (active)' if m.get('active') else ''} · {m.get('state')}"
        + (f" · {m['reason']}" if m.get("reason") else ""),
        f"source {m.get('source') or cfg.get('source')}"
        + (" · trusted root (may be unpickled)" if m.get("trusted") else "")
        + (f" · platform {m['platform']}" if m.get("platform") else ""),
        f"device {fmt.device_label(m)} (configured {cfg.get('device', '?')})"
        + (f" · loaded from {m['load_source']} in {m['load_seconds']:.2f} s" if m.get("load_seconds") else ""),
    ]
    if m.get("pinned"):
        ident.append("pinned: never evicted")
    reps = fmt.replicas_line(m)
    if reps:
        ident.append(reps)
    out.append(("identity", ident))
    estimate = cfg.get("estimate_mib")
    est = f"{fmt.size(estimate * 2**20)} (estimate_mib)" if estimate else \
        f"{fmt.size(m.get('weight_bytes'))} (its weights)" if m.get("weight_bytes") else "— (known after a load)"
    measured = fmt.size(m.get("footprint_bytes")) if m.get("footprint_bytes") else "— (not resident)"
    tier = "in the host tier (reloads as a copy)" if m.get("in_host_tier") else "not in the host tier"
    out.append(("memory", [f"estimate {est}", f"measured {measured}", tier]))
    remote = m.get("remote")
    if remote:
        out.append(("remote", [
            f"{remote.get('url')} · model {remote.get('model')}"
            + (f" v{remote['remote_version']}" if remote.get("remote_version") else ""),
            f"circuit {remote.get('circuit') or '—'} · {remote.get('failures_in_a_row', 0)} failures in a row",
            _remote_latency(remote),
        ]))
    text = m.get("text")
    if text:
        waste = text.get("padding_waste")
        out.append(("text", [
            f"tokenizer {text.get('tokenizer')}"
            + (f" · head {text['head']}" if text.get("head") else "")
            + (" · takes text_pair" if text.get("pairs") else ""),
            f"max_length {text.get('max_length')} tokens · truncation {'on' if text.get('truncation') else 'off'}",
            "buckets " + ", ".join(str(b) for b in text.get("buckets") or ()),
            "padding waste " + (f"{waste:.2f} padded tokens per real token" if waste is not None
                                else "— (no batch yet)"),
            "clients send text (BYTES); the front ends tokenize it into the token inputs below",
        ]))
    out.append(("tensors", [f"in  {_tensor(t)}" for t in m.get("inputs") or ()]
                + [f"out {_tensor(t)}" for t in m.get("outputs") or ()]
                or ["— (known after its first load)"]))
    limit = cfg.get("rate_limit")
    traffic = [
        f"{fmt.rate(fmt.throughput(m))} req/s answered, {fmt.rate(stats.get('error_rps'))} failed/s (10 s window)",
        f"ok {stats.get('success', 0)} · failed {stats.get('fail', 0)}"
        + (f" ({', '.join(f'{k} {v}' for k, v in (stats.get('failures') or {}).items())})"
           if stats.get("failures") else ""),
        f"latency p50 {fmt.ms(lat.get('p50'))} · p95 {fmt.ms(lat.get('p95'))} · p99 {fmt.ms(lat.get('p99'))} ms"
        f" (target {fmt.ms(m.get('latency_target_ms'))} ms)",
        f"queue {m.get('queue', 0)} of {_n(cfg.get('max_queue_size'))} · in flight {m.get('in_flight', 0)}"
        f" · batch ≤{_n(cfg.get('max_batch_size'))} within {_n(cfg.get('max_queue_delay_ms'))} ms"
        f" · timeout {_n(cfg.get('timeout_ms'))} ms",
        "rate limit " + (json.dumps(limit, sort_keys=True) if limit else "none"),
        f"priority P{cfg.get('priority', '?')} of {cfg.get('priority_levels', '?')}"
        f" · urgency {m.get('urgency') or 0:.2f} · cache {'on' if cfg.get('cache') else 'off'}"
        f" ({fmt.pct(fmt.cache_hit_pct(stats))} hits)",
        f"batch sizes {fmt.batch_sizes(stats)}",
    ]
    out.append(("traffic", traffic))
    route = []
    if routing:
        text, _ = fmt.route_text(m, routing)
        route.append(f"{m.get('name')}: active v{routing.get('active')}"
                     + (f" · {fmt.arms_label(routing)}" if fmt.arms_label(routing) else "")
                     + (f" · this version: {text}" if text else ""))
        for line in (fmt.swap_line(str(m.get("name")), routing), fmt.canary_line(str(m.get("name")), routing)):
            if line:
                route.append(line)
        if routing.get("arms"):
            route.append(fmt.ARM_HEADER)
            route += [row for row, _ in fmt.arm_rows(routing)]
    out.append(("routing", route or ["every request to the active version"]))
    out.append(("eviction (keep-value inputs)", fmt.eviction_lines(m.get("eviction"), m)))
    err = last_error(m, events, audit)
    out.append(("last error", [err or "none"]))
    out.append(("config", [f"{k} = {json.dumps(v, sort_keys=True)}" for k, v in sorted(cfg.items())]))
    hist = [f"{fmt.clock(r.get('ts'))} {r.get('actor')} {r.get('action')}"
            + (f" v{r['version']}" if r.get("version") else "")
            + f" → {r.get('result')}" + (f": {r['detail']}" if r.get("detail") else "")
            for r in sorted(audit, key=lambda r: r.get("ts") or 0)]
    out.append(("audit history", hist or ["nothing changed by an operator"]))
    return out


def text(m: dict[str, Any], routing: dict[str, Any] | None, audit: list[dict[str, Any]],
         events: list[dict[str, Any]]) -> str:
    """The sections as one plain text (what the view shows, and what a test reads)."""
    parts = []
    for title, lines in sections(m, routing, audit, events):
        parts.append(f"── {title}")
        parts += [f"  {line}" for line in lines]
    return "\n".join(parts)
