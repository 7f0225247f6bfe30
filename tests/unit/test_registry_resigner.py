"""The region's re-signer survives any failure of one round (issue 7 review #7): a full disk is not the end."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import Any

import pytest
from opentelemetry.sdk.trace import TracerProvider

from services.config import load_config
from services.inference import NodeIdentity
from services.rpc.components import NodeContext
from tests.support.registry import new_registry
from tier2_region.config import RegionConfig
from tier2_region.origin_service import ArtifactOrigin
from tier2_region.registry.registry import ModelRegistry
from tier2_region.registry.signing_keys import SigningKeys


def _origin(settings: dict[str, Any]) -> ArtifactOrigin:
    config = load_config(RegionConfig, env={}, overrides={"registry": settings})
    return ArtifactOrigin(NodeContext(config, NodeIdentity("tier2", "r"), TracerProvider()))


async def test_an_os_error_in_one_round_is_logged_and_the_next_round_runs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    kit = new_registry(tmp_path)
    kit.registry.close()
    settings = {"path": str(kit.registry.directory), "key_dir": str(kit.key_dir), "resign_check_s": 0.02}
    host = _origin(settings)
    calls: list[str] = []
    real = ModelRegistry.refresh_online

    def full_disk_once(self: ModelRegistry, keys: SigningKeys) -> Any:
        calls.append("call")
        if len(calls) == 1:
            raise OSError(28, "No space left on device")
        return real(self, keys)

    monkeypatch.setattr(ModelRegistry, "refresh_online", full_disk_once)
    with caplog.at_level(logging.ERROR):
        await host.start()
        try:
            for _ in range(200):
                if len(calls) >= 3:
                    break
                await asyncio.sleep(0.01)
        finally:
            await host.stop()
    assert len(calls) >= 3, "the re-signer stopped after the OSError"
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1 and errors[0].exc_info is not None  # logged once, with its traceback
    assert "No space left on device" in caplog.text


async def test_stopping_cancels_the_re_signer_even_while_it_waits(tmp_path: Path) -> None:
    kit = new_registry(tmp_path)
    kit.registry.close()
    settings = {"path": str(kit.registry.directory), "key_dir": str(kit.key_dir), "resign_check_s": 30}
    host = _origin(settings)
    await host.start()
    await asyncio.sleep(0.05)
    assert host._resigner is not None
    task = host._resigner._task
    await asyncio.wait_for(host.stop(), 2)
    assert task is not None and task.cancelled()
