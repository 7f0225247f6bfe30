"""The [registry] and [artifacts] sections: every knob validated, each on its own tier only."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import grpc
import pytest
from opentelemetry.sdk.trace import TracerProvider

from services import errors
from services.config import load_config
from services.errors import ConfigError
from services.inference import NodeIdentity
from services.rpc.components import NodeContext
from services.rpc.status_table import status_for
from services.tier_config import TierConfig
from tier1_edge.cache_service import ArtifactCacheService
from tier1_edge.config import EdgeConfig
from tier2_region.config import RegionConfig
from tier2_region.origin_service import ArtifactOrigin


def _config(**sections: dict[str, Any]) -> TierConfig:
    kind = RegionConfig if "registry" in sections else EdgeConfig
    return load_config(kind, env={}, overrides=sections)


def _context(config: TierConfig) -> NodeContext:
    return NodeContext(config, NodeIdentity("tier1", "e"), TracerProvider())


@pytest.mark.parametrize(
    ("sections", "message"),
    [
        ({"artifacts": {"cache_dir": "c"}}, r"\[artifacts\] trusted_root must name the registry's root metadata file"),
        ({"artifacts": {"refresh_interval_s": -1}}, r"\[artifacts\] refresh_interval_s must not be negative"),
        ({"artifacts": {"chunk_bytes": 10}}, r"\[artifacts\] chunk_bytes must be between 1024"),
        ({"registry": {"timestamp_expiry_s": 0}}, r"\[registry\] timestamp_expiry_s must be a positive number"),
        (
            {"registry": {"resign_margin_s": 86400}},
            r"\[registry\] resign_margin_s \(86400 s\) must be shorter than timestamp_expiry_s",
        ),
        ({"registry": {"resign_check_s": 90000}}, r"\[registry\] resign_check_s must be positive and shorter"),
        ({"registry": {"key_dir": "k"}}, r"\[registry\] key_dir is set but path is empty"),
        (
            {"registry": {"path": "r"}, "server": {"max_message_bytes": 4096}},
            r"\[registry\] chunk_bytes \(262144\) must be at least 1 KiB below \[server\] max_message_bytes",
        ),
    ],
)
def test_bad_settings_stop_start_up_with_a_message(sections: dict[str, dict[str, Any]], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        _config(**sections)


def test_environment_sets_the_sections() -> None:
    config = load_config(
        RegionConfig,
        env={
            "EDGECASCADE_REGISTRY__PATH": "/r",
            "EDGECASCADE_REGISTRY__TIMESTAMP_EXPIRY_S": "7200",
            "EDGECASCADE_REGISTRY__RESIGN_MARGIN_S": "1800",
        },
    )
    assert config.registry.path == "/r" and config.registry.expiry.timestamp.total_seconds() == 7200


def test_each_section_belongs_to_one_tier(tmp_path: Path) -> None:
    registry = {"path": str(tmp_path / "r")}
    trusted = {"cache_dir": str(tmp_path / "c"), "trusted_root": str(tmp_path / "root.json")}
    for kind, section, values in (
        (EdgeConfig, "registry", registry),
        (TierConfig, "registry", registry),
        (RegionConfig, "artifacts", trusted),
        (TierConfig, "artifacts", trusted),
    ):
        with pytest.raises(ConfigError, match=rf"unknown section \[{section}\]"):
            load_config(kind, env={}, overrides={section: values})
    with pytest.raises(ConfigError, match=r"needs an \[upstream\] address"):
        ArtifactCacheService(_context(_config(artifacts=trusted)))
    with pytest.raises(ConfigError, match="cannot be read"):
        ArtifactCacheService(_context(_config(artifacts=trusted, upstream={"address": "127.0.0.1:1"})))
    (tmp_path / "root.json").write_text("{}")
    with pytest.raises(ConfigError, match="not valid TUF root metadata"):
        ArtifactCacheService(_context(_config(artifacts=trusted, upstream={"address": "127.0.0.1:1"})))
    assert ArtifactCacheService(_context(_config())).bindings == []
    assert ArtifactOrigin(_context(load_config(RegionConfig, env={}))).bindings == []


def test_registry_errors_have_their_status_codes() -> None:
    assert status_for(errors.DuplicateVariantError("x")) == grpc.StatusCode.ALREADY_EXISTS
    assert status_for(errors.ArtifactNotFoundError("x")) == grpc.StatusCode.NOT_FOUND
    assert status_for(errors.DigestMismatchError("x")) == grpc.StatusCode.DATA_LOSS
    assert status_for(errors.MetadataSignatureError("x")) == grpc.StatusCode.DATA_LOSS
    assert status_for(errors.MetadataExpiredError("x")) == grpc.StatusCode.FAILED_PRECONDITION
    assert status_for(errors.QuantizationGateError("x")) == grpc.StatusCode.FAILED_PRECONDITION
    assert status_for(errors.InvalidModelError("x")) == grpc.StatusCode.INVALID_ARGUMENT
    assert status_for(errors.SignatureMismatchError("x")) == grpc.StatusCode.INVALID_ARGUMENT
