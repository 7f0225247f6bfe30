"""The artifact client checks every chunk's offset against what it has received, over a real loopback gRPC server."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest

from protos.edgecascade.v1 import artifacts_pb2 as pb
from protos.edgecascade.v1 import artifacts_pb2_grpc as pb_grpc
from services.errors import IntegrityError
from services.rpc.artifact_client import GrpcArtifactSource
from services.updates.tuf_client import TufClient, hashed_target_path
from tests.support.registry import RegistryKit, new_registry, publish_lm

CHUNK = 200
# Given the requested offset and the file's length: the (offset label, start byte) of each chunk sent.
Plan = Callable[[int, int], list[tuple[int, int]]]


def honest(offset: int, total: int) -> list[tuple[int, int]]:
    return [(start, start) for start in range(offset, total, CHUNK)]


def restarts_from_zero(offset: int, total: int) -> list[tuple[int, int]]:
    """A server that ignores the requested offset and says so truthfully in every chunk."""
    return honest(0, total)


def skips_a_chunk(offset: int, total: int) -> list[tuple[int, int]]:
    """Labels are right for the bytes sent, but one chunk is missing from the stream."""
    chunks = honest(offset, total)
    return chunks[:1] + chunks[2:]


def mislabels(offset: int, total: int) -> list[tuple[int, int]]:
    """Sends the right bytes but claims the second chunk sits elsewhere in the file."""
    chunks = honest(offset, total)
    return [chunks[0], (chunks[1][0] + 1, chunks[1][1]), *chunks[2:]]


class ScriptedArtifacts(pb_grpc.ArtifactServiceServicer):
    """Serves a repository directory with chunk offsets chosen by a plan."""

    def __init__(self, root: Path, plan: Plan) -> None:
        self.root = root
        self.plan = plan

    def Fetch(self, request: pb.FetchRequest, context: grpc.ServicerContext) -> Iterator[pb.FetchResponse]:
        file = self.root / request.path
        if not file.is_file():
            context.abort(grpc.StatusCode.NOT_FOUND, f"no artifact at {request.path}")
        data = file.read_bytes()
        plan = self.plan if request.path.startswith("targets/") else honest
        for label, start in plan(request.offset, len(data)):
            yield pb.FetchResponse(data=data[start : start + CHUNK], offset=label, total_length=len(data))


@pytest.fixture
def kit(tmp_path: Path) -> RegistryKit:
    kit = new_registry(tmp_path)
    publish_lm(kit)
    return kit


@pytest.fixture
def serve(kit: RegistryKit) -> Iterator[Callable[[Plan], GrpcArtifactSource]]:
    servers: list[grpc.Server] = []
    sources: list[GrpcArtifactSource] = []

    def start(plan: Plan) -> GrpcArtifactSource:
        server = grpc.server(ThreadPoolExecutor(2))
        pb_grpc.add_ArtifactServiceServicer_to_server(ScriptedArtifacts(kit.registry.repository_dir, plan), server)
        port = server.add_insecure_port("127.0.0.1:0")
        server.start()
        servers.append(server)
        sources.append(GrpcArtifactSource(f"127.0.0.1:{port}", timeout_s=30.0))
        return sources[-1]

    yield start
    for source in sources:
        source.close()
    for server in servers:
        server.stop(None)


def _blob_path(kit: RegistryKit, variant: str = "fp32") -> str:
    return "targets/" + hashed_target_path(kit.registry.target("lm", "1", variant))


def test_chunks_at_their_announced_offsets_are_accepted(
    kit: RegistryKit, serve: Callable[[Plan], GrpcArtifactSource]
) -> None:
    source = serve(honest)
    whole = (kit.registry.repository_dir / _blob_path(kit)).read_bytes()
    assert b"".join(source.fetch(_blob_path(kit), 0)) == whole
    assert b"".join(source.fetch(_blob_path(kit), 1500)) == whole[1500:]


@pytest.mark.parametrize("plan", [restarts_from_zero, skips_a_chunk, mislabels])
def test_a_chunk_at_an_unexpected_offset_fails_the_fetch(
    kit: RegistryKit, serve: Callable[[Plan], GrpcArtifactSource], plan: Plan
) -> None:
    source = serve(plan)
    with pytest.raises(IntegrityError, match=r"at offset \d+, expected \d+"):
        b"".join(source.fetch(_blob_path(kit), 1500))


@pytest.mark.parametrize("plan", [restarts_from_zero, skips_a_chunk])
def test_a_resumed_download_with_a_wrong_offset_is_refused_and_leaves_no_corrupt_file(
    kit: RegistryKit, tmp_path: Path, serve: Callable[[Plan], GrpcArtifactSource], plan: Plan
) -> None:
    client = TufClient(serve(plan), tmp_path / "device" / "metadata", kit.registry.repository.trusted_root(), "test")
    info = client.target_info("models/lm/1/fp32")
    staging = tmp_path / "device" / "staging"
    staging.mkdir(parents=True)
    blob = (kit.registry.repository_dir / _blob_path(kit)).read_bytes()
    (staging / f"{info.hashes['sha256']}.part").write_bytes(blob[:1500])
    with pytest.raises(IntegrityError, match=r"at offset \d+, expected \d+"):
        client.download(info, staging)
    assert list(staging.iterdir()) == []
