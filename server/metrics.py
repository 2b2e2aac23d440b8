"""Prometheus metrics of a running engine, with Triton's names where Triton has one.

Everything is read at scrape time from ``Engine.snapshot()`` by one custom
collector registered on a private ``CollectorRegistry`` (never the global
one: several engines can live in one process, e.g. in tests)::

    registry = make_registry(engine)
    body, content_type = render(registry, request.headers.get("accept"))

``render`` negotiates the format with ``prometheus_client``'s
``choose_encoder``: the Prometheus text format (``text/plain; version=0.0.4``)
by default, OpenMetrics when the ``Accept`` header asks for
``application/openmetrics-text``.  Call it on the engine's event loop (the
snapshot reads state the loop mutates).

Names and types
---------------
Triton's exporter writes its counters without the ``_total`` suffix
(``# TYPE nv_inference_request_success counter`` /
``nv_inference_request_success{...} 3``), and dashboards query those names.
``prometheus_client`` (0.26) cannot write that: a counter family's text output
gets ``_total`` on its HELP/TYPE lines (and, in OpenMetrics, on its samples),
so a counter named ``nv_inference_request_success`` would be scraped as
``nv_inference_request_success_total``.  The ``nv_*`` counters are therefore
exposed **untyped** (``unknown`` in OpenMetrics) under Triton's exact sample
names, identical in both formats (Prometheus negotiates OpenMetrics first, so
a name that differed between formats would break dashboards); ``rate()`` and
``increase()`` work on them as on any counter.  Our own counters
(``modelconsole_*``) are true counters and carry ``_total`` in the exposition.

Metrics (Type "counter*" = monotonic, exposed untyped for Triton's name)
--------------------------------------------------------------------------
Per model version, labels ``model``, ``version``:

=============================================  ========  ===========================================
nv_inference_request_success                   counter*  requests answered successfully (cache hits
                                                         included)
nv_inference_request_failure                   counter*  failed requests, extra label ``reason``: the
                                                         error kind (invalid_input, unavailable,
                                                         queue_full, rate_limited, deadline,
                                                         model_error, load_failed,
                                                         insufficient_memory, ...; the usual ones are
                                                         always present, at 0 until they happen)
nv_inference_count                             counter*  samples run on the device (batch rows)
nv_inference_exec_count                        counter*  batches run on the device
nv_inference_request_duration_us               counter*  total end-to-end time of successful requests
                                                         (us; cache hits included)
nv_inference_queue_duration_us                 counter*  total time requests waited in the queue (us)
nv_inference_compute_infer_duration_us         counter*  total forward-pass time of batches (us)
nv_inference_pending_request_count             gauge     requests queued + in flight + waiting for memory now
nv_cache_num_hits_per_model                    counter*  result-cache hits
nv_cache_num_misses_per_model                  counter*  result-cache misses
modelconsole_request_latency_ms                gauge     end-to-end latency percentiles over the last
                                                         2048 requests, label ``quantile`` (0.5, 0.95,
                                                         0.99); absent until a request was answered
modelconsole_model_state                       gauge     1 for the current state, 0 for the others,
                                                         label ``state`` (UNLOADED, LOADING, WARMING,
                                                         READY, UNLOADING, FAILED)
modelconsole_model_memory_bytes                gauge     memory the loaded model holds (its measured
                                                         footprint; 0 when not loaded)
modelconsole_model_weight_bytes                gauge     size of its weights (known after a load)
modelconsole_model_load_seconds                gauge     duration of its last load (absent before one)
modelconsole_model_request_rate                gauge     requests per second (decayed average, updated
                                                         every engine tick)
modelconsole_model_pinned                      gauge     1 when pinned (kept resident)
modelconsole_model_active                      gauge     1 for the version that serves requests naming
                                                         no version
=============================================  ========  ===========================================

On a fleet's control plane (``--serve --cluster``) every per-model series has
a third label, ``node``: each engine core's own counters, so
``sum without (node) (...)`` gives the fleet's (the snapshot's merged figures).

Per managed device (GPU, or simulated GPU), labels ``gpu_uuid`` (NVML's UUID;
``simulated-<index>`` on the simulated backend), ``index`` (the CUDA index)
and ``name``.  A sensor the device does not report is left out (the simulated
backend has no power or temperature):

=============================================  ========  ===========================================
nv_gpu_memory_total_bytes                      gauge     device memory (what CUDA can allocate)
nv_gpu_memory_used_bytes                       gauge     device memory in use, every process
nv_gpu_utilization                             gauge     GPU utilisation, 0..1
nv_gpu_power_usage                             gauge     power draw, watts
modelconsole_gpu_temperature_celsius           gauge     GPU temperature
modelconsole_gpu_budget_bytes                  gauge     what models may use here: min(budget,
                                                         total - reserve - other processes)
modelconsole_gpu_memory_reserved_bytes         gauge     sum of our reservations (loads' estimates,
                                                         then measured footprints)
modelconsole_gpu_memory_committed_bytes        gauge     max(reservations, what this process uses)
modelconsole_gpu_memory_available_bytes        gauge     budget - committed: room for the next load
modelconsole_gpu_memory_other_processes_bytes  gauge     memory other processes hold on the device
modelconsole_gpu_models                        gauge     model versions resident on the device
modelconsole_gpu_slots_running                 gauge     batches running on the device (of its slots)
modelconsole_gpu_slots_waiting                 gauge     models waiting for a slot
=============================================  ========  ===========================================

Front ends (labels ``protocol``: http or grpc; ``code``: the HTTP status, or the gRPC
status name), counted where the request is answered: in the process with ``--workers
0``, in every front-end process with ``--workers N`` (summed over them, the processes
that died included, by prometheus-client's multiprocess collector: each front end
writes its counts to a file in the server's private directory).  Requests a front end
refuses before the engine (a malformed body, a bad token) are counted only here:

=============================================  ========  ===========================================
modelconsole_frontend_requests_total           counter   requests answered, by protocol and code
=============================================  ========  ===========================================

On a fleet's control plane the counter has a ``node`` label too: each node's
front end (infer calls included), and ``control`` for the control plane's own.

Result cache and host-memory tier (no labels):

=============================================  ========  ===========================================
modelconsole_cache_bytes                       gauge     bytes the result cache holds
modelconsole_cache_max_bytes                   gauge     its bound
modelconsole_cache_entries                     gauge     entries it holds
modelconsole_cache_hits_total                  counter   lookups answered from it
modelconsole_cache_misses_total                counter   lookups not found in it
modelconsole_cache_evictions_total             counter   entries dropped to stay within the bound
modelconsole_host_tier_bytes                   gauge     bytes of evicted weights kept in host memory
modelconsole_host_tier_max_bytes               gauge     its bound (0: the tier is off)
modelconsole_host_tier_entries                 gauge     models kept there
modelconsole_host_tier_hits_total              counter   loads served from the tier
modelconsole_host_tier_drops_total             counter   entries dropped to stay within the bound
=============================================  ========  ===========================================
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry
from prometheus_client.exposition import choose_encoder
from prometheus_client.metrics_core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    Metric,
)

if TYPE_CHECKING:
    from modelconsole.scheduler.engine import Engine

__all__ = ["EngineCollector", "make_registry", "render"]

MODEL_LABELS = ("model", "version")
GPU_LABELS = ("gpu_uuid", "index", "name")
STATES = ("UNLOADED", "LOADING", "WARMING", "READY", "UNLOADING", "FAILED")
# request-path error kinds that get a 0 sample before they first happen
FAILURE_REASONS = ("invalid_input", "unavailable", "queue_full", "rate_limited", "deadline", "model_error")
QUANTILES = (("0.5", "p50"), ("0.95", "p95"), ("0.99", "p99"))


class _Untyped(Metric):
    """A monotonic counter under Triton's exact name (no ``_total``): exposed untyped."""

    def __init__(self, name: str, documentation: str, labels: tuple[str, ...]):
        super().__init__(name, documentation, "unknown")
        self._labels = labels

    def add(self, values: tuple[str, ...], value: float, **extra: str) -> None:
        self.add_sample(self.name, dict(zip(self._labels, values), **extra), value)


def _nonempty(*families: Metric) -> Iterator[Metric]:
    """The families with at least one sample (an absent sensor leaves no bare HELP/TYPE lines)."""
    return (f for f in families if f.samples)


class EngineCollector:
    """Reads ``engine.snapshot()`` on every collect; holds no state of its own but GPU UUIDs."""

    def __init__(self, engine: Engine):
        self.engine = engine
        self._uuids: dict[int, str] = {}

    # ------------------------------------------------------------ helpers

    def _uuid(self, index: int) -> str:
        uuid = self._uuids.get(index)
        if uuid is None:
            uuid = f"simulated-{index}"
            backend = self.engine.backend
            if getattr(backend, "kind", "") == "nvml":
                try:
                    uuid = backend.uuid(index) or f"gpu-{index}"
                except Exception:  # noqa: BLE001 - a label, not worth failing a scrape for
                    uuid = f"gpu-{index}"
            self._uuids[index] = uuid
        return uuid

    # ------------------------------------------------------------ collect

    def describe(self) -> list[Metric]:
        return []  # families depend on what exists at scrape time; don't collect at register()

    def collect(self) -> Iterator[Metric]:
        snap = self.engine.snapshot()
        per_node = getattr(self.engine, "node_model_snapshots", None)  # a fleet's control plane
        if per_node is not None:
            yield from self._models(per_node(), (*MODEL_LABELS, "node"))
        else:
            yield from self._models(snap["models"])
        yield from self._devices(snap["devices"])
        yield from self._cache(snap["cache"], snap["host_tier"])

    def _models(self, models: list[dict[str, Any]], labels: tuple[str, ...] = MODEL_LABELS) -> Iterator[Metric]:
        """``labels``: the model's labels; with ``node`` each snapshot names its node (a fleet)."""
        def untyped(name: str, doc: str) -> _Untyped:
            return _Untyped(name, doc, labels)

        def gauge(name: str, doc: str, *extra: str) -> GaugeMetricFamily:
            return GaugeMetricFamily(name, doc, labels=(*labels, *extra))

        success = untyped("nv_inference_request_success", "Number of successful inference requests")
        failure = untyped("nv_inference_request_failure", "Number of failed inference requests, by reason")
        count = untyped("nv_inference_count", "Number of inferences performed (samples, batch rows)")
        execs = untyped("nv_inference_exec_count", "Number of model executions performed (batches)")
        request_us = untyped("nv_inference_request_duration_us",
                             "Cumulative end-to-end duration of successful requests (us)")
        queue_us = untyped("nv_inference_queue_duration_us", "Cumulative time requests spent queued (us)")
        compute_us = untyped("nv_inference_compute_infer_duration_us",
                             "Cumulative forward-pass time of executed batches (us)")
        hits = untyped("nv_cache_num_hits_per_model", "Number of result-cache hits")
        misses = untyped("nv_cache_num_misses_per_model", "Number of result-cache misses")
        pending = gauge("nv_inference_pending_request_count", "Requests queued, in flight or waiting for device memory")
        latency = gauge("modelconsole_request_latency_ms",
                        "End-to-end request latency percentiles over the last 2048 requests (ms)", "quantile")
        state = gauge("modelconsole_model_state", "1 for the model version's current state", "state")
        memory = gauge("modelconsole_model_memory_bytes", "Memory the loaded model holds (0: not loaded)")
        weights = gauge("modelconsole_model_weight_bytes", "Size of the model's weights")
        load_s = gauge("modelconsole_model_load_seconds", "Duration of the model's last load (s)")
        rate = gauge("modelconsole_model_request_rate", "Requests per second (decayed average)")
        pinned = gauge("modelconsole_model_pinned", "1 when the model version is pinned resident")
        active = gauge("modelconsole_model_active", "1 for the version serving requests that name none")

        for m in models:
            lv = tuple(str(m[k]) for k in ("name", "version", "node")[:len(labels)])
            s = m["stats"]
            success.add(lv, s["success"])
            kinds = dict.fromkeys(FAILURE_REASONS, 0)
            kinds.update(s["failures"])
            for reason, n in kinds.items():
                failure.add(lv, n, reason=reason)
            count.add(lv, s["inference_count"])
            execs.add(lv, s["execution_count"])
            if s.get("request_ms_total") is not None:
                request_us.add(lv, s["request_ms_total"] * 1000.0)
            queue_us.add(lv, s["queue_ms_total"] * 1000.0)
            compute_us.add(lv, s["compute_ms_total"] * 1000.0)
            hits.add(lv, s["cache_hits"])
            misses.add(lv, s["cache_misses"])
            pending.add_metric(lv, m["queue"] + m["in_flight"] + m.get("waiting_for_room", 0))
            for q, key in QUANTILES:
                v = s["latency_ms"].get(key)
                if v is not None:
                    latency.add_metric((*lv, q), v)
            for st in STATES:
                state.add_metric((*lv, st), 1.0 if m["state"] == st else 0.0)
            memory.add_metric(lv, m["footprint_bytes"] or 0)
            weights.add_metric(lv, m["weight_bytes"] or 0)
            if m["load_seconds"] is not None:
                load_s.add_metric(lv, m["load_seconds"])
            rate.add_metric(lv, m["request_rate"])
            pinned.add_metric(lv, 1.0 if m["pinned"] else 0.0)
            active.add_metric(lv, 1.0 if m.get("active") else 0.0)

        yield from _nonempty(success, failure, count, execs, request_us, queue_us, compute_us, pending, hits,
                             misses, latency, state, memory, weights, load_s, rate, pinned, active)

    def _devices(self, devices: list[dict[str, Any]]) -> Iterator[Metric]:
        def gauge(name: str, doc: str) -> GaugeMetricFamily:
            return GaugeMetricFamily(name, doc, labels=GPU_LABELS)

        total = gauge("nv_gpu_memory_total_bytes", "GPU total memory, in bytes")
        used = gauge("nv_gpu_memory_used_bytes", "GPU used memory (every process), in bytes")
        util = gauge("nv_gpu_utilization", "GPU utilization rate (0.0 - 1.0)")
        power = gauge("nv_gpu_power_usage", "GPU power usage in watts")
        temp = gauge("modelconsole_gpu_temperature_celsius", "GPU temperature, degrees Celsius")
        budget = gauge("modelconsole_gpu_budget_bytes", "Memory models may use on the device")
        reserved = gauge("modelconsole_gpu_memory_reserved_bytes", "Sum of the engine's reservations")
        committed = gauge("modelconsole_gpu_memory_committed_bytes",
                          "max(reservations, memory this process uses)")
        available = gauge("modelconsole_gpu_memory_available_bytes", "Budget left for the next load")
        others = gauge("modelconsole_gpu_memory_other_processes_bytes", "Memory other processes hold")
        models = gauge("modelconsole_gpu_models", "Model versions resident on the device")
        running = gauge("modelconsole_gpu_slots_running", "Batches running on the device")
        waiting = gauge("modelconsole_gpu_slots_waiting", "Models waiting for a device slot")

        for d in devices:
            index = int(d["index"])
            lv = (self._uuid(index), str(index), str(d.get("name") or f"GPU {index}"))

            def put(family: GaugeMetricFamily, value: Any, scale: float = 1.0, lv: tuple[str, ...] = lv) -> None:
                if value is not None:
                    family.add_metric(lv, float(value) * scale)

            put(total, d.get("total_bytes"))
            put(used, d.get("used_bytes"))
            put(util, d.get("utilization_pct"), 0.01)
            put(power, d.get("power_w"))
            put(temp, d.get("temperature_c"))
            b = d.get("budget") or {}
            put(budget, b.get("usable_bytes"))
            put(reserved, b.get("reserved_bytes"))
            put(committed, b.get("committed_bytes"))
            put(available, b.get("available_bytes"))
            put(others, b.get("other_processes_bytes"))
            put(models, len(d.get("models") or ()))
            slots = d.get("slots") or {}
            put(running, slots.get("running"))
            if slots.get("waiting") is not None:
                put(waiting, len(slots["waiting"]))

        yield from _nonempty(total, used, util, power, temp, budget, reserved, committed, available, others,
                             models, running, waiting)

    def _cache(self, cache: dict[str, Any], tier: dict[str, Any]) -> Iterator[Metric]:
        yield GaugeMetricFamily("modelconsole_cache_bytes", "Bytes the result cache holds", value=cache["bytes"])
        yield GaugeMetricFamily("modelconsole_cache_max_bytes", "The result cache's bound in bytes",
                                value=cache["max_bytes"])
        yield GaugeMetricFamily("modelconsole_cache_entries", "Entries in the result cache", value=cache["entries"])
        yield CounterMetricFamily("modelconsole_cache_hits", "Result-cache lookups answered", value=cache["hits"])
        yield CounterMetricFamily("modelconsole_cache_misses", "Result-cache lookups not found", value=cache["misses"])
        yield CounterMetricFamily("modelconsole_cache_evictions", "Result-cache entries evicted",
                                  value=cache["evictions"])
        yield GaugeMetricFamily("modelconsole_host_tier_bytes", "Bytes of weights in the host-memory tier",
                                value=tier["bytes"])
        yield GaugeMetricFamily("modelconsole_host_tier_max_bytes", "The host-memory tier's bound (0: off)",
                                value=tier["max_bytes"])
        yield GaugeMetricFamily("modelconsole_host_tier_entries", "Models kept in the host-memory tier",
                                value=len(tier["entries"]))
        yield CounterMetricFamily("modelconsole_host_tier_hits", "Loads served from the host-memory tier",
                                  value=tier["hits"])
        yield CounterMetricFamily("modelconsole_host_tier_drops", "Entries dropped from the host-memory tier",
                                  value=tier["drops"])


def make_registry(engine: Engine, frontends_dir: str | None = None) -> CollectorRegistry:
    """A private registry holding one collector that reads ``engine`` at every scrape; with
    ``frontends_dir`` (where front-end processes write their counters) also their sum, by
    prometheus-client's multiprocess collector."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(EngineCollector(engine))
    if frontends_dir is not None:
        from prometheus_client.multiprocess import MultiProcessCollector

        MultiProcessCollector(registry, path=frontends_dir)
    return registry


FRONTEND_REQUESTS = "modelconsole_frontend_requests"
FRONTEND_REQUESTS_DOC = "requests answered by a front end, by protocol and code"


def frontend_requests(registry: CollectorRegistry | None, engine: Any = None) -> Any:
    """The ``modelconsole_frontend_requests_total{protocol, code}`` counter (on ``registry``; None:
    a front-end process, whose counts go to its multiprocess file).  On a fleet's control plane
    (``engine`` has ``frontend_request_counts``) the counter this returns stays private and
    ``registry`` gets one family with a ``node`` label: every node's front end and ``control``."""
    from prometheus_client import Counter

    fleet = engine is not None and hasattr(engine, "frontend_request_counts")
    counter = Counter(FRONTEND_REQUESTS, FRONTEND_REQUESTS_DOC, ["protocol", "code"],
                      registry=CollectorRegistry() if fleet else registry)
    if fleet and registry is not None:
        registry.register(_FleetRequests(counter, engine))
    return counter


def counter_values(counter: Any) -> list[tuple[str, str, float]]:
    """(protocol, code, count) of a ``frontend_requests`` counter: what a fleet's node reports."""
    return [(s.labels["protocol"], s.labels["code"], s.value)
            for metric in counter.collect() for s in metric.samples if s.name.endswith("_total")]


class _FleetRequests:
    """``modelconsole_frontend_requests_total{node, protocol, code}`` of a fleet: the nodes' front
    ends as they last reported, and the control plane's own (node ``control``)."""

    def __init__(self, own: Any, fleet: Any) -> None:
        self.own, self.fleet = own, fleet

    def collect(self) -> Iterator[Metric]:
        family = CounterMetricFamily(FRONTEND_REQUESTS, FRONTEND_REQUESTS_DOC, labels=("node", "protocol", "code"))
        for protocol, code, value in counter_values(self.own):
            family.add_metric(("control", protocol, code), value)
        for node, protocol, code, value in self.fleet.frontend_request_counts():
            family.add_metric((node, protocol, code), value)
        yield family


def render(registry: CollectorRegistry, accept_header: str | None = None) -> tuple[bytes, str]:
    """(body, content type): OpenMetrics when ``accept_header`` asks for it, else Prometheus text."""
    encoder, content_type = choose_encoder(accept_header or "")
    return encoder(registry), content_type
