"""The ``edgecascade.v1.ArtifactService`` servicer: streams a provider's file from an offset.

The provider decides what a path means (the region's repository directory, or
the edge's verifying cache) and raises domain errors; this adapter only checks
the offset, reads the file in chunks off the event loop and converts.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor

from grpc import aio

from protos.edgecascade.v1 import artifacts_pb2 as pb
from protos.edgecascade.v1 import artifacts_pb2_grpc as pb_grpc
from services.errors import InvalidArgumentError
from services.rpc.server import ServiceBinding
from services.updates.artifact_store import ArtifactProvider

DEFAULT_CHUNK_BYTES = 256 * 1024


class ArtifactServicer(pb_grpc.ArtifactServiceServicer):
    """Serves artifacts from one provider.

    Args:
        provider: Resolves a path to a complete local file.
        chunk_bytes: Bytes per streamed message.
    """

    def __init__(self, provider: ArtifactProvider, chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> None:
        self._provider = provider
        self._chunk = chunk_bytes
        # Disk reads get threads of their own: the loop's default executor may be busy with other work.
        self._executor = ThreadPoolExecutor(2, thread_name_prefix="artifact-read")

    def close(self) -> None:
        """Releases the reader threads."""
        self._executor.shutdown(wait=False, cancel_futures=True)

    async def Fetch(
        self, request: pb.FetchRequest, context: aio.ServicerContext[object, object]
    ) -> AsyncIterator[pb.FetchResponse]:
        path = await self._provider.open(request.path)
        # Files are immutable once served (new versions get new names), except
        # timestamp.json, which is replaced atomically: the size read here and
        # the chunks read below come from one open file, so they always agree.
        with path.open("rb") as fh:
            total = os.fstat(fh.fileno()).st_size
            if request.offset > total:
                raise InvalidArgumentError(f"offset {request.offset} is past the end of {request.path} ({total} bytes)")
            offset = request.offset
            loop = asyncio.get_running_loop()
            while offset < total:
                fh.seek(offset)
                data = await loop.run_in_executor(self._executor, fh.read, min(self._chunk, total - offset))
                if not data:
                    break
                yield pb.FetchResponse(data=data, offset=offset, total_length=total)
                offset += len(data)


ARTIFACT_SERVICE = pb.DESCRIPTOR.services_by_name["ArtifactService"].full_name


def artifact_bindings(servicer: ArtifactServicer | None) -> list[ServiceBinding]:
    """The artifact service's binding for a node's server, or none when the node serves no artifacts."""
    if servicer is None:
        return []
    return [ServiceBinding(ARTIFACT_SERVICE, lambda s: pb_grpc.add_ArtifactServiceServicer_to_server(servicer, s))]
