"""Memory-pressure replay: our eviction policy against LRU by count, LRU by bytes and Belady.

    python bench/pressure.py                 # the default trace, a few seconds
    python bench/pressure.py --quick         # a smaller trace, a second or two
    python bench/pressure.py --seed 3 --seeds 5 --zipf 0.8 --shift-every 2000

No torch, no engine: a trace-driven replay, in virtual time, of the decisions
alone, through the pure functions the engine calls
(``modelconsole.scheduler.policy``).

The models: ``--models`` of them, sizes drawn log-uniform in 0.5–12 GiB;
reload time = LOAD_OVERHEAD_S + bytes / LOAD_BANDWIDTH (0.04 s + 2 GB/s: the
engine's measured fixed cost per load — ``bench/reload.py --gib`` 0.03 … 8 on
the lent H100, fitted; see ``policy``'s docstring — and a safetensors read
from local NVMe).  ``--load-overhead`` changes the fixed part (an earlier
revision assumed 0.5 s).  By default 40 models, ~150 GiB in all,
against a 40 GiB budget (an L40S or an A100-40GB): several times the budget.

The trace: ``--requests`` requests; model popularity is Zipf (``--zipf``
exponent: the k-th most popular model gets weight 1/k^s) over a random order
of the models, reshuffled every ``--shift-every`` requests.  Arrivals are
Poisson at ``--rate`` requests per virtual second (mean inter-arrival
1/rate).  The default, 0.5 req/s (2 s between requests), is chosen so that the
loads the trace forces stay physically possible: with 30–50% of requests
missing and ~4 GiB per load, loading at 2 GB/s keeps the loader busy 45–80%
of the time under LRU by bytes and 35–65% under our policy (the table's
"loader" column); a much higher rate on this trace would mean a server doing
nothing but loading, and a churn guard that must hold loads back.  The 20 000 requests span ~11 virtual hours,
popularity shifts
every ~3 hours.  Virtual time drives the request-rate EWMAs (half-life
``policy.RATE_HALF_LIFE_S``) and the churn guard (``--min-residency``
virtual seconds).  Loads take no virtual time in the replay: the figure of
merit is what each policy loads.

The policies, each keeping the sum of resident bytes within the budget:

* policy      ours: ``policy.plan_eviction`` with ``keep_value``; every model's
              request rate is a ``policy.Ewma`` fed by the trace, reload cost
              as above, all at the same priority, nothing pinned or busy, the
              incoming model passed as ``incoming=`` (the churn guard protects
              young models that came in as returners from a returner), each
              resident model's ``loaded_as_newcomer`` recorded at its load.
              When the guard refuses, the request waits in virtual time
              (retried at each later arrival) and later requests for that
              model join it — a waiting request counts as a use of its model,
              as a refused one does in the engine; the waits are reported —
              the other policies never wait.  ``--admission`` also
              passes ``incoming_value`` as the engine may: a refused request
              waits up to ``--max-wait`` s, then loads without admission.
* oracle      the same plan_eviction fed each phase's TRUE popularity instead
              of the EWMA: what a perfect rate estimate would give (a
              reference row, not in the JSON).
* lru_count   Ray Serve multiplexing: at most budget / mean model size models,
              least recently used out.  A load that would take the bytes over
              the budget is an out-of-memory on a real GPU: counted in its
              ``ooms``, then LRU models go until it fits so the replay goes on.
* lru_bytes   ModelMesh: LRU weighted by bytes.
* belady      Belady's offline rule with a byte budget: evict the resident
              model whose next use is farthest (the classic rule; the
              size-aware optimum is NP-hard, so it is a strong reference, not a
              bound — an online policy cannot know the future at all).

Figures per policy: GiB loaded (the sum of the bytes of every load), loads,
load seconds, the loader's busy share at 2 GB/s, hit rate, evictions, ooms.
The LAST line is one JSON object: policy_load_gib, lru_count_load_gib,
lru_bytes_load_gib, belady_load_gib, policy_vs_belady, policy_vs_lru_bytes,
ooms (our policy's; must be 0) — for ``--seed``; ``--seeds N`` prints the
ratios for N seeds from ``--seed`` on.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

# `python bench/pressure.py` puts bench/ first on sys.path, where bench/http.py would shadow the standard
# library's http package (torch, aiohttp and tritonclient import it): move bench/ to the end.
_HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _HERE] + [str(_HERE)]

import numpy as np

try:
    from modelconsole.scheduler import policy
except ImportError:  # a checkout without the package installed
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from scheduler import policy  # type: ignore[no-redef]

GiB = 2**30
LOAD_BANDWIDTH = 2e9  # bytes per second
LOAD_OVERHEAD_S = policy.RELOAD_OVERHEAD_S  # per load: open, allocate, build the module (measured)
SIZE_MIN_GIB, SIZE_MAX_GIB = 0.5, 12.0


# --------------------------------------------------------------------------- workload


@dataclass(frozen=True)
class Model:
    key: str
    bytes: int
    reload_s: float


@dataclass
class Trace:
    model: np.ndarray  # model index per request
    time: np.ndarray  # arrival per request, virtual seconds
    phase_rate: list[np.ndarray]  # per popularity phase: each model's true request rate (req/s)
    shift_every: int

    def true_rate(self, i: int, now: float) -> float:
        idx = int(np.searchsorted(self.time, now, side="right")) - 1
        phase = max(0, idx) // self.shift_every if self.shift_every > 0 else 0
        return float(self.phase_rate[min(phase, len(self.phase_rate) - 1)][i])


def make_models(rng: np.random.Generator, n: int, overhead_s: float = LOAD_OVERHEAD_S) -> list[Model]:
    gib = np.exp(rng.uniform(math.log(SIZE_MIN_GIB), math.log(SIZE_MAX_GIB), n))
    out = []
    for i, g in enumerate(gib):
        b = int(g * GiB)
        out.append(Model(f"m{i:03d}", b, overhead_s + b / LOAD_BANDWIDTH))
    return out


def make_trace(rng: np.random.Generator, n_models: int, n_requests: int, zipf: float,
               shift_every: int, rate: float) -> Trace:
    weights = 1.0 / np.arange(1, n_models + 1) ** zipf
    weights /= weights.sum()
    models = np.empty(n_requests, dtype=np.int64)
    phase_rate = []
    step = shift_every if shift_every > 0 else n_requests
    for start in range(0, n_requests, step):
        end = min(n_requests, start + step)
        order = rng.permutation(n_models)  # order[k] is the (k+1)-th most popular model
        models[start:end] = order[rng.choice(n_models, size=end - start, p=weights)]
        true = np.empty(n_models)
        true[order] = weights * rate
        phase_rate.append(true)
    times = np.cumsum(rng.exponential(1.0 / rate, n_requests))
    return Trace(models, times, phase_rate, step)


# --------------------------------------------------------------------------- policies


@dataclass
class Result:
    name: str
    loads: int = 0
    loaded_bytes: int = 0
    load_seconds: float = 0.0
    hits: int = 0
    requests: int = 0
    ooms: int = 0
    evictions: int = 0
    waits: list[float] = field(default_factory=list)  # virtual seconds a request waited (ours)
    held_back: int = 0  # loads the policy refused at first (ours)

    @property
    def load_gib(self) -> float:
        return self.loaded_bytes / GiB


class Cache:
    def __init__(self, name: str, models: list[Model], budget: int):
        self.models = models
        self.budget = budget
        self.used = 0
        self.res = Result(name)

    def _load(self, m: Model) -> None:
        self.used += m.bytes
        self.res.loads += 1
        self.res.loaded_bytes += m.bytes
        self.res.load_seconds += m.reload_s
        if self.used > self.budget:
            raise AssertionError(f"{self.res.name}: {self.used} bytes resident > budget {self.budget}")

    def finish(self, t: float) -> None:
        pass


class LruBytes(Cache):
    """ModelMesh: LRU weighted by bytes."""

    def __init__(self, models, budget, name="lru_bytes"):
        super().__init__(name, models, budget)
        self.lru: OrderedDict[int, None] = OrderedDict()

    def _evict_lru(self) -> None:
        k, _ = self.lru.popitem(last=False)
        self.used -= self.models[k].bytes
        self.res.evictions += 1

    def _make_room(self, m) -> None:
        while self.used + m.bytes > self.budget:
            self._evict_lru()

    def request(self, i: int, idx: int, t: float) -> None:
        self.res.requests += 1
        if i in self.lru:
            self.res.hits += 1
            self.lru.move_to_end(i)
            return
        m = self.models[i]
        self._make_room(m)
        self.lru[i] = None
        self._load(m)


class LruCount(LruBytes):
    """Ray Serve multiplexing: LRU by model count; an over-budget load is an OOM."""

    def __init__(self, models, budget):
        super().__init__(models, budget, name="lru_count")
        mean = sum(m.bytes for m in models) / len(models)
        self.max_models = max(1, int(budget // mean))

    def _make_room(self, m) -> None:
        while len(self.lru) >= self.max_models:
            self._evict_lru()
        if self.used + m.bytes > self.budget:
            self.res.ooms += 1  # a real GPU fails this load; evict so the replay goes on
            super()._make_room(m)


class Belady(Cache):
    """Evict the resident model whose next use is farthest (offline: knows the trace)."""

    def __init__(self, models, budget, trace: np.ndarray):
        super().__init__("belady", models, budget)
        n = len(trace)
        self.next_use = np.empty(n, dtype=np.int64)  # index of the next request for the same model
        last: dict[int, int] = {}
        for j in range(n - 1, -1, -1):
            k = int(trace[j])
            self.next_use[j] = last.get(k, n + k)  # never again: past the end (ties broken by model)
            last[k] = j
        self.resident: dict[int, int] = {}  # model -> its next use

    def request(self, i: int, idx: int, t: float) -> None:
        self.res.requests += 1
        nxt = int(self.next_use[idx])
        if i in self.resident:
            self.res.hits += 1
            self.resident[i] = nxt
            return
        m = self.models[i]
        while self.used + m.bytes > self.budget:
            victim = max(self.resident, key=self.resident.__getitem__)
            del self.resident[victim]
            self.used -= self.models[victim].bytes
            self.res.evictions += 1
        self.resident[i] = nxt
        self._load(m)


class Ours(Cache):
    """plan_eviction + keep_value, rates from trace-fed EWMAs (or the truth), in virtual time."""

    def __init__(self, name: str, models, budget, min_residency_s: float,
                 rate_of: Callable[[int, float], float] | None = None,
                 admission: bool = False, max_wait_s: float = 0.0, strict_guard: bool = False):
        super().__init__(name, models, budget)
        self.min_residency_s = min_residency_s
        self.ewma = [policy.Ewma(policy.RATE_HALF_LIFE_S) for _ in models]
        self.rate_of = rate_of or (lambda i, now: self.ewma[i].rate(now))
        self.admission = admission
        self.max_wait_s = max_wait_s
        self.strict_guard = strict_guard
        self.loaded_at: dict[int, float] = {}  # the resident models
        self.last_used: dict[int, float] = {}  # every model served so far
        self.newcomer: dict[int, bool] = {}  # resident models: loaded as a newcomer (see policy.churn_risk)
        self.pending: OrderedDict[int, list[float]] = OrderedDict()  # model -> arrivals waiting

    def residency(self, i: int, now: float, loaded_at: float | None = None) -> policy.Residency:
        m = self.models[i]
        return policy.Residency(
            key=m.key, bytes=m.bytes, request_rate=self.rate_of(i, now), reload_seconds=m.reload_s,
            base_priority=policy.NEUTRAL_PRIORITY, pinned=False, busy=False,
            loaded_at=self.loaded_at[i] if loaded_at is None else loaded_at,
            last_used=self.last_used.get(i, -math.inf),
            loaded_as_newcomer=self.newcomer.get(i, False),
        )

    def _try_load(self, i: int, now: float, waiting_since: float) -> bool:
        m = self.models[i]
        resident = [self.residency(k, now) for k in self.loaded_at]
        me = self.residency(i, now, loaded_at=now)
        if i in self.pending:  # its requests that wait are uses too (all arrived before now)
            me = replace(me, last_used=max(me.last_used, self.pending[i][-1]))
        incoming_value = None
        if self.admission and now - waiting_since < self.max_wait_s:
            incoming_value = policy.keep_value(me, now)
        plan = policy.plan_eviction(resident, m.bytes, self.budget - self.used, now,
                                    min_residency_s=self.min_residency_s, incoming_value=incoming_value,
                                    incoming=None if self.strict_guard else me)
        if plan is None:
            return False
        by_key = {self.models[k].key: k for k in self.loaded_at}
        for key in plan.victims:
            k = by_key[key]
            del self.loaded_at[k]
            self.used -= self.models[k].bytes
            self.res.evictions += 1
        if self.used + m.bytes > self.budget:
            self.res.ooms += 1  # the plan fell short: an OOM on a real GPU
            return False
        self.loaded_at[i] = now
        # without incoming= the caller cannot tell a newcomer: protected like any young model
        self.newcomer[i] = not self.strict_guard and not policy.churn_risk(me, now, self.min_residency_s)
        self.last_used[i] = now
        self._load(m)
        return True

    def _drain(self, now: float) -> None:
        for k in list(self.pending):
            arrivals = self.pending[k]
            if self._try_load(k, now, arrivals[0]):
                del self.pending[k]
                self.res.waits.extend(now - a for a in arrivals)

    def request(self, i: int, idx: int, t: float) -> None:
        self.res.requests += 1
        self.ewma[i].add_event(t)
        if self.pending:
            self._drain(t)
        if i in self.loaded_at:
            self.res.hits += 1
            self.last_used[i] = t
        elif i in self.pending:
            self.pending[i].append(t)
        elif not self._try_load(i, t, t):
            self.res.held_back += 1
            self.pending[i] = [t]

    def finish(self, t: float) -> None:
        """Serve what still waits when the trace ends: virtual time runs on until room comes."""
        while self.pending:
            k, arrivals = next(iter(self.pending.items()))
            resident = [self.residency(j, t) for j in self.loaded_at]
            at = policy.earliest_room(resident, self.models[k].bytes, self.budget - self.used, t,
                                      self.min_residency_s)
            if at is None:
                raise AssertionError("nothing is pinned or busy in the replay: room must come")
            if self.admission:
                at = max(at, arrivals[0] + self.max_wait_s)
            t = max(t, at)
            self._drain(t)


# --------------------------------------------------------------------------- replay


def replay(args: argparse.Namespace, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    models = make_models(rng, args.models, args.load_overhead)
    budget = int(args.budget_gib * GiB)
    if max(m.bytes for m in models) > budget:
        raise SystemExit(f"--budget-gib {args.budget_gib} is smaller than the biggest model")
    trace = make_trace(rng, args.models, args.requests, args.zipf, args.shift_every, args.rate)
    ours = Ours("policy", models, budget, args.min_residency, admission=args.admission,
                max_wait_s=args.max_wait, strict_guard=args.strict_guard)
    oracle = Ours("oracle", models, budget, args.min_residency, rate_of=trace.true_rate,
                  strict_guard=args.strict_guard)
    lru_count = LruCount(models, budget)
    caches = [ours, oracle, lru_count, LruBytes(models, budget), Belady(models, budget, trace.model)]
    for idx in range(len(trace.model)):
        i, t = int(trace.model[idx]), float(trace.time[idx])
        for c in caches:
            c.request(i, idx, t)
    for c in caches:
        c.finish(float(trace.time[-1]))
    return {
        "seed": seed,
        "n_models": len(models),
        "total_gib": sum(m.bytes for m in models) / GiB,
        "budget_gib": args.budget_gib,
        "span_s": float(trace.time[-1]),
        "max_models": lru_count.max_models,
        "results": {c.res.name: c.res for c in caches},
    }


def ratios(run: dict) -> dict:
    r = run["results"]
    return {
        "policy_vs_belady": r["policy"].load_gib / r["belady"].load_gib,
        "policy_vs_lru_bytes": r["policy"].load_gib / r["lru_bytes"].load_gib,
        "oracle_vs_belady": r["oracle"].load_gib / r["belady"].load_gib,
    }


def print_run(run: dict) -> None:
    r = run["results"]
    print(f"seed {run['seed']}: {run['n_models']} models, {run['total_gib']:.0f} GiB in all "
          f"({run['total_gib'] / run['budget_gib']:.1f}x the {run['budget_gib']:g} GiB budget); "
          f"{r['policy'].requests} requests over {run['span_s'] / 3600:.1f} virtual hours; "
          f"lru_count keeps at most {run['max_models']} models")
    print(f"  {'':<10} {'GiB loaded':>10} {'loads':>6} {'load s':>7} {'loader':>7} {'hit rate':>8} "
          f"{'evictions':>9} {'ooms':>5} {'vs belady':>9}")
    bel = r["belady"].load_gib
    for name in ("policy", "oracle", "lru_count", "lru_bytes", "belady"):
        x = r[name]
        print(f"  {name:<10} {x.load_gib:>10.0f} {x.loads:>6d} {x.load_seconds:>7.0f} "
              f"{x.load_seconds / run['span_s']:>6.0%} {x.hits / x.requests:>8.3f} {x.evictions:>9d} "
              f"{x.ooms:>5d} {x.load_gib / bel:>9.3f}")
    w = r["policy"].waits
    if w:
        print(f"  policy: {r['policy'].held_back} loads held back (churn guard or admission); {len(w)} "
              f"requests waited: mean {np.mean(w):.1f} s, p99 {np.percentile(w, 99):.1f} s, "
              f"max {max(w):.1f} s (virtual); "
              f"{len(w) / r['policy'].requests:.2%} of requests")
    else:
        print("  policy: no request waited")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--seeds", type=int, default=1, help="replay seeds seed .. seed+N-1 (the JSON is seed's)")
    ap.add_argument("--models", type=int, default=40)
    ap.add_argument("--budget-gib", type=float, default=40.0)
    ap.add_argument("--zipf", type=float, default=1.0)
    ap.add_argument("--shift-every", type=int, default=5000, help="requests between popularity shuffles")
    ap.add_argument("--requests", type=int, default=20000)
    ap.add_argument("--rate", type=float, default=0.5, help="requests per virtual second (Poisson)")
    ap.add_argument("--load-overhead", type=float, default=LOAD_OVERHEAD_S,
                    help="fixed seconds per load in the cost model (measured on the H100: 0.04)")
    ap.add_argument("--min-residency", type=float, default=30.0, help="churn guard, virtual seconds")
    ap.add_argument("--admission", action="store_true", help="also pass incoming_value (see the docstring)")
    ap.add_argument("--max-wait", type=float, default=5.0, help="with --admission: bounded wait, virtual s")
    ap.add_argument("--strict-guard", action="store_true",
                    help="do not pass incoming=: every young model protected")
    ap.add_argument("--quick", action="store_true", help="5000 requests, popularity shifting every 1250")
    args = ap.parse_args(argv)
    if args.quick:
        args.requests = min(args.requests, 5000)
        args.shift_every = min(args.shift_every, 1250)

    runs = [replay(args, args.seed + k) for k in range(max(1, args.seeds))]
    for run in runs:
        print_run(run)
        print()
    if len(runs) > 1:
        print(f"  {'seed':>4} {'policy/belady':>14} {'policy/lru_bytes':>17} {'oracle/belady':>14} "
              f"{'lru_count ooms':>15} {'policy waits':>13}")
        for run in runs:
            q = ratios(run)
            print(f"  {run['seed']:>4} {q['policy_vs_belady']:>14.3f} {q['policy_vs_lru_bytes']:>17.3f} "
                  f"{q['oracle_vs_belady']:>14.3f} {run['results']['lru_count'].ooms:>15d} "
                  f"{len(run['results']['policy'].waits):>13d}")
        print()

    r = runs[0]["results"]
    q = ratios(runs[0])
    print(json.dumps({
        "policy_load_gib": round(r["policy"].load_gib, 1),
        "lru_count_load_gib": round(r["lru_count"].load_gib, 1),
        "lru_bytes_load_gib": round(r["lru_bytes"].load_gib, 1),
        "belady_load_gib": round(r["belady"].load_gib, 1),
        "policy_vs_belady": round(q["policy_vs_belady"], 3),
        "policy_vs_lru_bytes": round(q["policy_vs_lru_bytes"], 3),
        "ooms": r["policy"].ooms,
    }))
    return 0


if __name__ == "__main__":
    sys.exit(main())
