"""[server] event_loop: uvloop where installed, the standard loop on request, a clear error otherwise."""

from __future__ import annotations

import asyncio
import sys

import pytest

from services.errors import ConfigError
from services.event_loops import loop_factory, loop_name
from services.tier_config import ServerSection


def test_auto_and_uvloop_run_uvloop_where_it_is_installed() -> None:
    pytest.importorskip("uvloop")
    for choice in ("auto", "uvloop"):
        loop = loop_factory(choice)()
        try:
            assert loop_name(loop) == "uvloop"
        finally:
            loop.close()


def test_asyncio_runs_the_standard_loop() -> None:
    loop = loop_factory("asyncio")()
    try:
        assert loop_name(loop) == "asyncio" and isinstance(loop, asyncio.BaseEventLoop)
    finally:
        loop.close()


def test_without_uvloop_auto_falls_back_and_uvloop_is_a_configuration_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "uvloop", None)  # what an import of a missing module sees
    assert loop_factory("auto") is asyncio.new_event_loop
    with pytest.raises(ConfigError, match="uvloop is not installed"):
        loop_factory("uvloop")


def test_an_unknown_event_loop_is_refused() -> None:
    with pytest.raises(ConfigError, match="event_loop must be one of auto, uvloop, asyncio"):
        ServerSection(event_loop="trio")
