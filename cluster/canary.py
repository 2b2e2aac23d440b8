"""A fleet's canaries, run by the controller: one ramp for every node.

On one host ``scheduler/versions.py`` runs a canary on that engine's traffic.
In a fleet each engine core sees only its share, so the controller runs it:
it puts each step's split in force on every node at once (through
``Fleet.set_split``: stored, then applied everywhere), judges the bounds on
the arms' answers summed over the nodes (``routing.canary_verdict``, the
same pure rules as one host), steps (``routing.next_step``), rolls back the
moment a bound is broken, and promotes with a cluster-wide swap.  The record
lives in the store on the head (``fleet_canaries``) and a restarted controller
picks a live canary up where it was (the current step starts again).

Arm counts are taken as deltas from the step's start; the p95 is each node's
latency window, the worst node's.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from modelconsole.scheduler import routing
from modelconsole.scheduler.errors import Conflict
from modelconsole.scheduler.routing import ABORTED, PROMOTED, PROMOTING, ROLLED_BACK, RUNNING, Canary

log = logging.getLogger("modelconsole.cluster.canary")


def merged_arms(reports: list[dict[str, Any]], name: str) -> dict[str, dict[str, Any]]:
    """Each version's arm over the nodes: requests and errors summed, the worst p95."""
    out: dict[str, dict[str, Any]] = {}
    for report in reports:
        route = report.get("snapshot", {}).get("routing", {}).get(name) or {}
        for v, a in (route.get("arms") or {}).items():
            m = out.setdefault(v, {"requests": 0, "errors": 0, "p95_ms": None})
            m["requests"] += a["requests"]
            m["errors"] += a["errors"]
            if a.get("p95_ms") is not None:
                m["p95_ms"] = max(m["p95_ms"] or 0.0, a["p95_ms"])
    for m in out.values():
        m["error_rate"] = m["errors"] / m["requests"] if m["requests"] else 0.0
    return out


def since(now: dict[str, Any], start: dict[str, Any]) -> dict[str, Any]:
    """An arm's answers since the step began (counts as deltas; the p95 as it stands)."""
    n = now["requests"] - start.get("requests", 0)
    e = now["errors"] - start.get("errors", 0)
    return {"requests": n, "errors": e, "error_rate": e / n if n else 0.0, "p95_ms": now.get("p95_ms")}


class FleetCanaries:
    def __init__(self, fleet: Any):
        self.fleet = fleet
        self.canaries: dict[str, Canary] = {}
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._base: dict[str, dict[str, dict[str, Any]]] = {}  # name -> arms when the step began

    def arms(self, name: str) -> dict[str, dict[str, Any]]:
        return merged_arms([n.report for n in self.fleet.live()], name)

    async def start(self, name: str, version: str | int, *, steps: Any = routing.DEFAULT_STEPS,
                    interval_s: Any = 60.0, max_error_rate: Any = 0.05, max_p95_ratio: Any = 2.0,
                    min_requests: Any = 20, actor: str = "api") -> dict[str, Any]:
        fleet = self.fleet
        v = routing.version_arg(version)
        base = fleet.registry.instance(name, None)
        fleet.registry.instance(name, v)
        if v == base.version:
            raise Conflict(f"version: model '{name}' version {v} is already active")
        current = self.canaries.get(name)
        if current is not None and current.live:
            raise Conflict(f"model '{name}' has a canary running (v{current.version}); stop it first")
        plan = routing.validate_canary(steps, interval_s, max_error_rate, max_p95_ratio, min_requests)
        # the canary loads where the baseline serves (or where placement puts it)
        holders = [n for n in fleet.live() if base.key in n.report.get("holds", ())]
        if not holders:
            holders = [fleet.nodes[n] for n in fleet.place(name, v, [])]
        answers = await fleet.call_nodes(holders, "load", {"name": name, "version": v, "actor": actor})
        if all("error" in a for _, a in answers):
            fleet.raise_first(answers)
        now = time.time()
        c = Canary(version=v, baseline=base.version, steps=plan["steps"], interval_s=plan["interval_s"],
                   bounds=plan["bounds"], step=0, share=plan["steps"][0], state=RUNNING, started=now,
                   step_started=now)
        await self._apply(name, c, actor, "canary_start")
        fleet.events.publish("canary_started", f"{name}: canary v{v} at {c.share:g}% on every node (baseline "
                             f"v{c.baseline})", model=name, version=v, data={"actor": actor, "share": c.share})
        self._spawn(name, c)
        return self.routing(name)

    async def stop(self, name: str, actor: str = "api") -> dict[str, Any]:
        c = self.canaries.get(name)
        if c is None or not c.live:
            raise Conflict(f"model '{name}' has no canary running")
        task = self._tasks.pop(name, None)
        if task is not None:
            task.cancel()
        c.state, c.reason = ABORTED, f"stopped by {actor}"
        await self.fleet.set_split(name, {}, actor=actor)
        await self.fleet.registry.store.save_fleet_canary(name, c.to_dict(), actor, "canary_stop", c.version)
        self.fleet.events.publish("canary_stopped", f"{name}: canary v{c.version} stopped; v{c.baseline} takes all "
                                  "traffic", model=name, version=c.version, data={"actor": actor})
        return self.routing(name)

    def routing(self, name: str) -> dict[str, Any]:
        out = self.fleet.registry.routing(name)
        c = self.canaries.get(name)
        if c is not None:
            out["canary"] = c.to_dict()
        out["arms"] = self.arms(name)
        return out

    async def resume(self) -> None:
        """At the controller's start: live canaries go on from the step they were at."""
        for name, record in (await self.fleet.registry.store.fleet_canaries()).items():
            c = Canary.from_dict(record)
            self.canaries[name] = c
            if c.live and c.state != PROMOTING:
                c.step_mono = time.monotonic()
                self._base[name] = self.arms(name)
                self._spawn(name, c)

    async def close(self) -> None:
        for task in self._tasks.values():
            task.cancel()

    # ------------------------------------------------------------ the ramp

    async def _apply(self, name: str, c: Canary, actor: str, action: str) -> None:
        await self.fleet.set_split(name, c.weights(), actor=actor)
        await self.fleet.registry.store.save_fleet_canary(name, c.to_dict(), actor, action, c.version)
        self.canaries[name] = c
        c.step_mono = time.monotonic()
        self._base[name] = self.arms(name)

    def _spawn(self, name: str, c: Canary) -> None:
        self._tasks[name] = asyncio.get_running_loop().create_task(self._run(name, c))

    async def _run(self, name: str, c: Canary) -> None:
        fleet = self.fleet
        try:
            while c.live:
                await asyncio.sleep(routing.check_interval(c.interval_s))
                now, start = self.arms(name), self._base.get(name, {})
                arm = since(now.get(c.version, {"requests": 0, "errors": 0}), start.get(c.version, {}))
                base = since(now.get(c.baseline, {"requests": 0, "errors": 0}), start.get(c.baseline, {}))
                verdict, why = routing.canary_verdict(arm, base, c.bounds)
                if verdict == "rollback":
                    c.state, c.reason = ROLLED_BACK, why
                    await fleet.set_split(name, {}, actor="canary")
                    await fleet.registry.store.save_fleet_canary(name, c.to_dict(), "canary", "canary_rollback",
                                                                c.version, why)
                    fleet.events.publish("canary_rolled_back", f"{name}: canary v{c.version} rolled back: {why}",
                                         model=name, version=c.version, level="error")
                    return
                enough = routing.enough_evidence(arm, base, c.bounds)
                step = routing.next_step(c.steps, c.step, time.monotonic() - (c.step_mono or 0.0),
                                         c.interval_s, enough)
                if step == c.step:
                    continue
                c.step, c.share, c.step_started = step, c.steps[step], time.time()
                if c.share >= 100:
                    c.state = PROMOTING
                    await fleet.swap(name, c.version, actor="canary")
                    c.state, c.reason = PROMOTED, f"promoted: version {c.version} took all traffic"
                    await fleet.registry.store.save_fleet_canary(name, c.to_dict(), "canary", "canary_promote",
                                                                c.version)
                    fleet.events.publish("canary_promoted", f"{name}: canary v{c.version} promoted on every node",
                                         model=name, version=c.version)
                    return
                await self._apply(name, c, "canary", "canary_step")
                fleet.events.publish("canary_step", f"{name}: canary v{c.version} at {c.share:g}% ({why})",
                                     model=name, version=c.version, data={"share": c.share})
        except asyncio.CancelledError:
            raise
        except Exception as e:  # noqa: BLE001 - a failed step leaves the canary where it was, said loudly
            log.exception("canary of %s failed", name)
            c.state, c.reason = ABORTED, f"{type(e).__name__}: {e}"
            fleet.events.publish("canary_failed", f"{name}: canary v{c.version} stopped: {c.reason}", model=name,
                                 version=c.version, level="error")
