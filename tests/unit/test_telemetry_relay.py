"""The edge's telemetry buffer and the [telemetry] settings of devices and edges."""

from __future__ import annotations

import asyncio

import pytest

from services.config import load_config
from services.errors import ConfigError
from services.rpc.node import Node
from tier0_device.app import SPEC as DEVICE
from tier0_device.config import DeviceConfig
from tier1_edge.config import EdgeConfig
from tier1_edge.telemetry_buffer import TelemetryBuffer


async def test_the_buffer_hands_out_the_oldest_first_and_waits_when_empty() -> None:
    buffer = TelemetryBuffer(max_requests=10, max_bytes=1000)
    waiting = asyncio.create_task(buffer.take())
    await asyncio.sleep(0)
    assert not waiting.done()
    buffer.put(b"a")
    buffer.put(b"b")
    assert await asyncio.wait_for(waiting, 5) == b"a"
    assert await buffer.take() == b"b"
    assert len(buffer) == 0 and buffer.held_bytes == 0 and buffer.stats.accepted == 2


def test_a_full_buffer_drops_the_oldest_by_count_and_by_bytes() -> None:
    buffer = TelemetryBuffer(max_requests=3, max_bytes=10)
    for item in (b"1", b"2", b"3", b"4"):
        buffer.put(item)
    assert list(buffer._items) == [b"2", b"3", b"4"]
    assert (buffer.stats.dropped, buffer.stats.dropped_bytes) == (1, 1)
    buffer.put(b"x" * 9)  # four requests: "2" goes; then 11 bytes: "3" goes too
    assert list(buffer._items) == [b"4", b"x" * 9] and buffer.held_bytes == 10
    assert (buffer.stats.dropped, buffer.stats.dropped_bytes) == (3, 3)
    assert not buffer.put(b"y" * 11)  # larger than the whole buffer: refused, nothing else dropped
    assert buffer.stats.refused == 1 and list(buffer._items) == [b"4", b"x" * 9]


async def test_an_undelivered_request_goes_back_in_front_and_is_dropped_first_when_full() -> None:
    buffer = TelemetryBuffer(max_requests=2, max_bytes=1000)
    buffer.put(b"old")
    sending = await buffer.take()
    buffer.put(b"new1")
    buffer.put_back(sending)
    assert list(buffer._items) == [b"old", b"new1"]
    assert await buffer.take() == b"old"
    buffer.put(b"new2")  # while "old" is out again
    buffer.put_back(b"old")
    assert list(buffer._items) == [b"new1", b"new2"]
    assert buffer.stats.dropped == 1 and buffer.stats.accepted == 3


def test_telemetry_settings_default_off_and_are_validated() -> None:
    device = load_config(DeviceConfig, env={})
    assert not device.telemetry.export and device.telemetry.target("edge:8002") == "edge:8002"
    edge = load_config(EdgeConfig, env={"EDGECASCADE_TELEMETRY__RELAY_MAX_REQUESTS": "5"})
    assert edge.telemetry.relay_max_requests == 5
    assert load_config(DeviceConfig, env={}, overrides={"telemetry": {"endpoint": "c:4317"}}).telemetry.target(
        "e:1"
    ) == ("c:4317")
    for section, value in (("interval_s", 0), ("timeout_s", 0), ("endpoint", "nohost")):
        with pytest.raises(ConfigError, match=f"\\[telemetry\\] {section}"):
            load_config(DeviceConfig, env={}, overrides={"telemetry": {section: value}})
    with pytest.raises(ConfigError, match="relay_max_bytes"):
        load_config(EdgeConfig, env={}, overrides={"telemetry": {"relay_max_bytes": 10}})
    with pytest.raises(ConfigError, match="relay_max_requests"):
        load_config(DeviceConfig, env={}, overrides={"telemetry": {"relay_max_requests": 10}})  # an edge's setting


def test_export_with_nowhere_to_send_stops_start_up() -> None:
    config = load_config(DeviceConfig, env={}, overrides={"telemetry": {"export": True}})
    with pytest.raises(ConfigError, match="no \\[telemetry\\] endpoint or \\[upstream\\] address"):
        Node(DEVICE, config)
