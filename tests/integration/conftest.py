"""A real three-tier chain in this process: device → edge → region on 127.0.0.1:0.

Models held (all built by the tests):

* device: ``lin`` (linear, seed 0), ``lm`` (tiny char-LM), ``flaky`` (a file
  onnxruntime cannot load)
* edge: ``edge-only`` (linear, seed 1), ``flaky`` (a good linear model), ``edge-lm``
  (tiny char-LM, seed 4)
* region: ``region-only`` (linear, seed 2)
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest

from protos.inference import grpc_service_pb2_grpc as pb_grpc
from services.config import load_config
from services.engine.model_repository import ModelRepository
from services.rpc.node import Node, TierSpec
from tests.support.onnx_models import linear_model, tiny_char_lm
from tier0_device.app import SPEC as DEVICE
from tier1_edge.app import SPEC as EDGE
from tier2_region.app import SPEC as REGION


@dataclass
class Chain:
    """Three running nodes and the files behind them."""

    device: Node
    edge: Node
    region: Node
    models: Path


SECTIONS = frozenset(
    {"batching", "cache", "runtime", "requests", "updates", "artifacts", "registry", "cascade", "token_cascade"}
)


async def start_node(spec: TierSpec, repository: Path, node_id: str, upstream: str = "", **settings: Any) -> Node:
    """Starts one node on a free loopback port.

    A keyword naming a section (``batching={...}``) overrides that section; any
    other keyword is a ``[server]`` setting.
    """
    server = {k: v for k, v in settings.items() if k not in SECTIONS}
    overrides: dict[str, Mapping[str, Any]] = {
        "server": {"node_id": node_id, "grace_seconds": 0.5, **server},
        "repository": {"path": str(repository)},
        "upstream": {"address": upstream},
        **{k: v for k, v in settings.items() if k in SECTIONS},
    }
    node = Node(spec, load_config(spec.config_type, env={}, overrides=overrides))
    await node.start()
    return node


def populate(root: Path) -> Path:
    """Builds the test models into per-tier repositories under ``root``."""
    files = root / "files"
    device = ModelRepository(root / "device")
    device.add("lin", linear_model(files / "lin.onnx", seed=0))
    device.add("lm", tiny_char_lm(files / "lm.onnx"))
    broken = files / "broken.onnx"
    broken.write_bytes(b"\x08\x07garbage that is not a model")
    # Bypass add()'s validation: this is what a corrupted install looks like on disk.
    (root / "device" / "flaky" / "1").mkdir(parents=True)
    (root / "device" / "flaky" / "1" / "model.onnx").write_bytes(broken.read_bytes())
    (root / "device" / "flaky" / "1" / "metadata.json").write_text('{"task": ""}')
    edge = ModelRepository(root / "edge")
    edge.add("edge-only", linear_model(files / "edge.onnx", seed=1))
    edge.add("flaky", linear_model(files / "flaky.onnx", seed=3))
    edge.add("edge-lm", tiny_char_lm(files / "edge-lm.onnx", seed=4))
    ModelRepository(root / "region").add("region-only", linear_model(files / "region.onnx", seed=2))
    return files


@pytest.fixture
async def chain(tmp_path: Path) -> AsyncIterator[Chain]:
    files = populate(tmp_path)
    region = await start_node(REGION, tmp_path / "region", "region-1")
    edge = await start_node(EDGE, tmp_path / "edge", "edge-1", upstream=region.address)
    device = await start_node(DEVICE, tmp_path / "device", "device-1", upstream=edge.address)
    try:
        yield Chain(device, edge, region, files)
    finally:
        for node in (device, edge, region):
            await node.stop()


@pytest.fixture
async def device_stub(chain: Chain) -> AsyncIterator[pb_grpc.GRPCInferenceServiceStub]:
    async with grpc.aio.insecure_channel(chain.device.address) as channel:
        yield pb_grpc.GRPCInferenceServiceStub(channel)
