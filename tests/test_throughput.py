"""Figures an operator can act on (issue 15, item 1): ``throughput_rps`` and ``error_rps`` are
answers per second over the last 10 s, from the counters — checked against the counters' own
deltas under steady real traffic, with the window's clock driven by the test (no sleeps)."""

from __future__ import annotations

import time

import pytest
import torch

from modelconsole.scheduler.engine import Engine
from modelconsole.scheduler.errors import EngineError
from modelconsole.scheduler.stats import AnswerRates
from modelconsole.scheduler.store import Store


def test_the_window_is_the_counters_growth_over_the_last_10_s():
    r = AnswerRates()
    assert r.rates(100.0, 0, 0) == (0.0, 0.0)  # no span yet
    answered = failed = 0
    for t in range(1, 31):  # 30 s of 10 answers a second, one of them failed
        answered, failed = answered + 10, failed + 1
        r.sample(100.0 + t, answered, failed)
    assert r.rates(130.0, answered, failed) == pytest.approx((10.0, 1.0))
    # a burst after the last sample: the figure holds still until the next sample (half a second
    # on), so two reads a moment apart agree, then counts it
    assert r.rates(130.4, answered + 40, failed) == pytest.approx((10.0, 1.0))
    assert r.rates(130.5, answered + 40, failed) == pytest.approx((140 / 10.5, 10 / 10.5))
    # traffic stops (the ticks go on sampling): the rate falls to 0 once the window has passed
    for t in range(131, 142):
        r.sample(float(t), answered + 40, failed)
    assert r.rates(141.0, answered + 40, failed) == (0.0, 0.0)
    # a counter that went back (a restarted engine's new stats) is never a negative rate
    assert r.rates(200.0, 0, 0) == (0.0, 0.0)


async def test_throughput_equals_counter_deltas_under_steady_traffic(tmp_path):
    # the janitor's tick samples on the real clock: an hour's tick keeps it out of this test's clock
    engine = Engine(Store(tmp_path / "s.db"), base_dir=str(tmp_path), default_device="cpu", tick_s=3600.0)
    await engine.start()
    try:
        await _steady_traffic(engine)
    finally:
        await engine.close()


async def _steady_traffic(engine: Engine) -> None:
    await engine.register({"name": "m", "source": "zoo:tiny-mlp", "warmup": 0, "device": "cpu"})
    await engine.load("m")
    stats = engine.instance("m").stats
    t0 = time.monotonic() + 1000.0  # after every sample the load's snapshots took on the real clock
    stats.sample_rates(t0)
    base_ok, base_fail = stats.success, sum(stats.failures.values())
    x = {"input": torch.randn(1, 64)}
    for second in range(1, 21):  # 20 "seconds" of 6 answers each: 5 served, 1 refused as bad input
        for _ in range(5):
            await engine.infer("m", x)
        with pytest.raises(EngineError):
            await engine.infer("m", {"input": torch.randn(1, 3)})
        stats.sample_rates(t0 + second)
    ok, fail = stats.success - base_ok, sum(stats.failures.values()) - base_fail
    assert (ok, fail) == (100, 20)  # the counters the window reads
    throughput, errors = stats.sample_rates(t0 + 20)
    assert throughput == pytest.approx(6.0) and errors == pytest.approx(1.0)  # the last 10 s: 60 and 10
    snap = engine.snapshot_models("m")[0]["stats"]
    assert snap["throughput_rps"] >= 0 and snap["error_rps"] >= 0  # on the real clock, in every snapshot


# ------------------------------------------------------------------ latency histograms (a fleet's merged percentiles)


def test_percentiles_from_merged_histograms_match_the_union_within_a_bucket():
    import numpy as np

    from modelconsole.scheduler import stats

    rng = np.random.default_rng(7)
    fast = rng.lognormal(np.log(0.002), 0.5, 2000)  # one node: ~2 ms
    slow = rng.lognormal(np.log(0.020), 0.3, 700)  # another: ~20 ms
    # the keys cross Ray and JSON as strings too
    merged = stats.merge_hists([stats.latency_hist(fast), {str(k): v for k, v in stats.latency_hist(slow).items()}])
    assert sum(merged.values()) == 2700
    got = stats.hist_percentiles(merged)
    exact = np.percentile(np.concatenate([fast, slow]), [50, 95, 99]) * 1000
    for key, want in zip(("p50", "p95", "p99"), exact):
        assert got[key] == pytest.approx(want, rel=0.10), key  # half a bucket is 4.5 %; sampling adds the rest
    assert stats.hist_percentiles({}) == {"p50": None, "p95": None, "p99": None}
    # out of range latencies land in the end buckets instead of failing
    assert set(stats.latency_hist(np.array([0.0, 1e-9, 1e9]))) == {0, stats.LAT_BUCKETS - 1}


def test_a_models_histogram_follows_its_recent_latencies():
    from modelconsole.scheduler.stats import ModelStats, hist_percentiles

    s = ModelStats()
    assert s.latency_hist() == {}
    for _ in range(10):
        s.record_latency(0.004)
    assert sum(s.latency_hist().values()) == 10
    assert hist_percentiles(s.latency_hist())["p50"] == pytest.approx(s.latency_ms()["p50"], rel=0.05)
