"""Adaptive logging's decisions (token bucket, detail level, slow outliers) and its [telemetry] settings."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest
from opentelemetry.sdk.resources import Resource

from services import telemetry_names
from services.adaptive_logging import DetailLevel, SlowOutliers, TokenBucket
from services.config import load_config
from services.errors import ConfigError
from services.rpc import anomaly_log
from services.rpc.anomaly_log import ROUTINE, AnomalyLog
from services.tier_config import TelemetrySection
from tier0_device.config import DeviceConfig
from tier1_edge.config import EdgeConfig
from tier2_region.telemetry import admission


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_the_bucket_sends_a_burst_then_the_rate_and_never_holds_more_than_the_burst() -> None:
    bucket = TokenBucket(rate_per_s=2.0, burst=3, now=0.0)
    assert [bucket.take(0.0) for _ in range(5)] == [True, True, True, False, False]
    assert not bucket.take(0.4)  # 0.8 of a token
    assert bucket.take(0.5) and not bucket.take(0.5)
    # A long quiet spell refills to the burst, not beyond.
    assert sum(bucket.take(100.0) for _ in range(10)) == 3


def test_the_bucket_ignores_a_clock_that_steps_back() -> None:
    bucket = TokenBucket(rate_per_s=1.0, burst=1, now=10.0)
    assert bucket.take(10.0)
    assert not bucket.take(5.0)  # no negative refill, no refill either
    assert not bucket.take(10.5) and bucket.take(11.0)


def test_the_bucket_refuses_a_rate_or_burst_that_admits_nothing() -> None:
    with pytest.raises(ValueError, match="positive rate"):
        TokenBucket(0.0, 1, 0.0)
    with pytest.raises(ValueError, match="burst of at least 1"):
        TokenBucket(1.0, 0, 0.0)


def test_an_anomaly_raises_the_detail_for_a_while_and_later_anomalies_extend_it_once() -> None:
    detail = DetailLevel(routine_rate=0.01, elevated_rate=1.0, elevated_s=30.0)
    assert detail.rate == 0.01 and not detail.elevated
    assert detail.settle(0.0) == 0.0  # nothing to lower

    assert detail.anomaly(100.0) is True
    assert detail.rate == 1.0 and detail.elevated and detail.raised == 1
    assert detail.anomaly(110.0) is False  # extends, no second transition
    assert detail.raised == 1
    assert detail.settle(130.0) == pytest.approx(10.0)  # 30 s after the latest anomaly, not the first
    assert detail.elevated and detail.rate == 1.0

    assert detail.settle(140.0) == 0.0
    assert not detail.elevated and detail.rate == 0.01 and detail.lowered == 1
    assert detail.settle(200.0) == 0.0 and detail.lowered == 1  # lowered once

    assert detail.anomaly(300.0) is True and detail.raised == 2


def test_a_latency_far_above_the_running_p99_is_an_outlier_once_enough_were_seen() -> None:
    slow = SlowOutliers(factor=3.0, size=100, refresh_every=10, min_samples=50)
    # Before min_samples, nothing is judged, however slow.
    assert not any(slow.observe(500.0 if i == 10 else 2.0 + (i % 10) * 0.1) for i in range(49))
    assert slow.observe(2.5) is False  # the 50th: the p99 is computed now
    assert 2.0 < slow.p99_ms <= 500.0
    for i in range(100):  # the early 500 ms ages out of the ring
        slow.observe(2.0 + (i % 10) * 0.1)
    assert slow.p99_ms == pytest.approx(2.9)
    assert slow.threshold_ms == pytest.approx(8.7)
    assert slow.observe(8.0) is False  # slow-ish, not over 3 x p99
    assert slow.observe(9.0) is True


def test_an_outlier_is_judged_against_the_p99_before_it_and_sub_millisecond_jitter_is_ignored() -> None:
    slow = SlowOutliers(factor=2.0, size=64, refresh_every=8, min_samples=8, floor_ms=1.0)
    for _ in range(8):
        slow.observe(0.1)
    assert slow.p99_ms == pytest.approx(0.1)
    assert slow.observe(0.9) is False  # 9 x p99, but below the floor
    assert slow.observe(1.5) is True
    with pytest.raises(ValueError, match="factor >= 1"):
        SlowOutliers(factor=0.5)


def test_log_settings_have_defaults_and_are_validated() -> None:
    device = load_config(DeviceConfig, env={}).telemetry
    assert device.logs and not device.sends_logs  # logs follow export, which is off by default
    assert (device.anomalies_per_s, device.anomaly_burst, device.slow_factor) == (1.0, 20, 3.0)
    assert (device.routine_sample_rate, device.elevated_sample_rate, device.elevated_s) == (0.0, 0.1, 60.0)
    edge = load_config(
        EdgeConfig, env={"EDGECASCADE_TELEMETRY__EXPORT": "true", "EDGECASCADE_TELEMETRY__ANOMALIES_PER_S": "5"}
    )
    assert edge.telemetry.sends_logs and edge.telemetry.anomalies_per_s == 5.0
    assert not load_config(
        DeviceConfig, env={}, overrides={"telemetry": {"export": True, "logs": False}}
    ).telemetry.sends_logs
    assert load_config(DeviceConfig, env={}, overrides={"telemetry": {"slow_factor": 0}}).telemetry.slow_factor == 0
    bad = (
        ("anomalies_per_s", 0),
        ("anomaly_burst", 0),
        ("slow_factor", 0.5),
        ("routine_sample_rate", 1.5),
        ("elevated_sample_rate", -0.1),
        ("elevated_s", 0),
    )
    for key, value in bad:
        with pytest.raises(ConfigError, match=f"\\[telemetry\\] {key} must be"):
            load_config(DeviceConfig, env={}, overrides={"telemetry": {key: value}})
    with pytest.raises(ConfigError, match=r"elevated_sample_rate \(0.1\) must be at least routine_sample_rate"):
        load_config(
            DeviceConfig, env={}, overrides={"telemetry": {"routine_sample_rate": 0.5, "elevated_sample_rate": 0.1}}
        )
    with pytest.raises(ConfigError, match="logs"):
        load_config(DeviceConfig, env={}, overrides={"telemetry": {"logs": "maybe"}})


def test_the_anomaly_attribute_is_the_one_the_region_keeps_records_by() -> None:
    assert telemetry_names.ANOMALY == admission.ANOMALY


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def log_of(clock: FakeClock) -> Iterator[Callable[..., AnomalyLog]]:
    """Builds AnomalyLogs whose exports go nowhere (a closed port), shut down after the test."""
    built: list[AnomalyLog] = []

    def build(max_queue: int = anomaly_log.MAX_QUEUE, **settings: Any) -> AnomalyLog:
        section = TelemetrySection(export=True, timeout_s=0.2, **settings)
        made = AnomalyLog(section, "127.0.0.1:9", Resource.create({}), clock=clock, max_queue=max_queue)
        built.append(made)
        return made

    yield build
    for made in built:
        made.provider.shutdown()


MODEL = {telemetry_names.MODEL_NAME: "lin", telemetry_names.MODEL_VERSION: "1", telemetry_names.MODEL_VARIANT: ""}


async def test_anomalies_over_the_rate_are_dropped_and_counted(
    log_of: Callable[..., AnomalyLog], clock: FakeClock
) -> None:
    log = log_of(anomalies_per_s=1.0, anomaly_burst=2)
    for _ in range(5):
        log.request("lin", "1", MODEL, "error", "", 0.001, "InvalidArgumentError")
    assert log.stats.emitted == {"error": 2} and log.stats.rate_limited == 3
    clock.now += 1.0
    log.request("big", "(unresolved)", MODEL, "forwarded", "model_not_held", 0.004, "")
    assert log.stats.emitted == {"error": 2, "fallback": 1} and log.stats.dropped == 3


async def test_routine_records_follow_the_detail_level(log_of: Callable[..., AnomalyLog], clock: FakeClock) -> None:
    log = log_of(routine_sample_rate=0.0, elevated_sample_rate=1.0, elevated_s=10.0, slow_factor=0)
    for _ in range(50):
        log.request("lin", "1", MODEL, "ok", "", 0.001, "")
    assert ROUTINE not in log.stats.emitted  # rate 0: nothing, not even a coin toss that could come up

    log.request("lin", "1", MODEL, "error", "", 0.001, "InternalError")
    assert log.detail.elevated
    for _ in range(5):
        log.request("lin", "1", MODEL, "ok", "", 0.001, "")
    assert log.stats.emitted[ROUTINE] == 5

    clock.now += 10.0
    log.settle()  # what the loop's timer does when elevated_s has passed
    assert not log.detail.elevated and log.detail.lowered == 1
    log.request("lin", "1", MODEL, "ok", "", 0.001, "")
    assert log.stats.emitted[ROUTINE] == 5


async def test_routine_records_may_fill_only_part_of_the_queue(
    log_of: Callable[..., AnomalyLog], monkeypatch: pytest.MonkeyPatch
) -> None:
    log = log_of(routine_sample_rate=1.0, elevated_sample_rate=1.0, slow_factor=0, anomaly_burst=10, max_queue=4)
    held = [2]  # what the processor's queue holds (its thread does not drain it here)
    monkeypatch.setattr(log, "_queued", lambda: held[0])
    log.request("lin", "1", MODEL, "ok", "", 0.001, "")
    assert log.stats.queue_full == 1 and ROUTINE not in log.stats.emitted  # half full: no room for routine ones
    log.request("lin", "1", MODEL, "error", "", 0.001, "InternalError")  # an anomaly still fits
    held[0] = 4
    log.request("lin", "1", MODEL, "error", "", 0.001, "InternalError")
    assert log.stats.emitted == {"error": 1} and log.stats.queue_full == 2


async def test_a_slow_outlier_is_an_anomaly_and_is_not_also_sampled(log_of: Callable[..., AnomalyLog]) -> None:
    log = log_of(slow_factor=3.0, routine_sample_rate=1.0, elevated_sample_rate=1.0)
    for _ in range(64):
        log.request("lin", "1", MODEL, "ok", "", 0.002, "")
    assert log.stats.emitted[ROUTINE] == 64
    log.request("lin", "1", MODEL, "ok", "", 0.050, "")
    assert log.stats.emitted == {ROUTINE: 64, "slow": 1}
    log.request("lin", "2", MODEL, "ok", "", 0.050, "")  # another version: its own p99, none yet
    assert log.stats.emitted["slow"] == 1
