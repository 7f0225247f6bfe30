"""The Open Inference Protocol servicer every tier serves.

Thin by design: each method converts protobuf to domain types, asks the data
plane, and converts back. A request the data plane routes upward is forwarded
as the same protobuf message, untouched, with the remaining deadline; the
answer comes back marked with ``edgecascade.fallback_reason`` and
``edgecascade.route``.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from typing import Any

from grpc import aio

from protos.inference import grpc_service_pb2 as pb
from protos.inference import grpc_service_pb2_grpc as pb_grpc
from services import __version__
from services.dataplane import Dataplane, Forward
from services.errors import DeadlineExceededError, EdgecascadeError, ModelNotFoundError
from services.generation import TEXT_INPUT
from services.rpc import converters
from services.rpc.inference_client import InferenceClient, route_from_metadata
from services.rpc.status_table import current_trace_id
from services.rpc.telemetry import annotate_span

SERVER_NAME = "edgecascade"
EXTENSIONS = ["model_repository", "statistics", "edgecascade"]

Context = aio.ServicerContext[Any, Any]

log = logging.getLogger("edgecascade.rpc")


class InferenceServicer(pb_grpc.GRPCInferenceServiceServicer):
    """Serves ``inference.GRPCInferenceService`` for one node.

    Args:
        dataplane: The node's data plane.
        upstream: Client of the next tier, or None at the top of the chain.
        is_ready: Whether the node has finished starting (ServerReady).
    """

    def __init__(self, dataplane: Dataplane, upstream: InferenceClient | None, is_ready: Callable[[], bool]) -> None:
        self._dp = dataplane
        self._upstream = upstream
        self._is_ready = is_ready

    def _forward_to(self) -> InferenceClient:
        assert self._upstream is not None, "the data plane forwards only when an upstream exists"
        return self._upstream

    def _remaining(self, deadline: float) -> float:
        remaining = deadline - asyncio.get_running_loop().time()
        if remaining <= 0:
            raise DeadlineExceededError("deadline passed before the request could be forwarded")
        return remaining

    def _route(self, context: Context) -> tuple[str, ...]:
        """The route to send upward, after refusing a request that already came through here."""
        return self._dp.check_route(route_from_metadata(context.invocation_metadata()))

    def _control_deadline(self, context: Context) -> float:
        return self._dp.deadline(self._dp.budget({}, context.time_remaining()))

    async def ServerLive(self, request: pb.ServerLiveRequest, context: Context) -> pb.ServerLiveResponse:
        return pb.ServerLiveResponse(live=True)

    async def ServerReady(self, request: pb.ServerReadyRequest, context: Context) -> pb.ServerReadyResponse:
        return pb.ServerReadyResponse(ready=self._is_ready())

    async def ServerMetadata(self, request: pb.ServerMetadataRequest, context: Context) -> pb.ServerMetadataResponse:
        return pb.ServerMetadataResponse(name=SERVER_NAME, version=__version__, extensions=EXTENSIONS)

    async def ModelReady(self, request: pb.ModelReadyRequest, context: Context) -> pb.ModelReadyResponse:
        annotate_span(self._dp.identity, request.name, request.version)
        route = self._route(context)
        if self._dp.cache.holds(request.name):
            return pb.ModelReadyResponse(ready=self._dp.cache.ready(request.name, request.version))
        if self._upstream is None:
            return pb.ModelReadyResponse(ready=False)
        deadline = self._control_deadline(context)
        return await self._upstream.model_ready(request, self._remaining(deadline), route)

    async def ModelMetadata(self, request: pb.ModelMetadataRequest, context: Context) -> pb.ModelMetadataResponse:
        annotate_span(self._dp.identity, request.name, request.version)
        route = self._route(context)
        served = await self._dp.route(request.name, request.version)
        if isinstance(served, Forward):
            deadline = self._control_deadline(context)
            return await self._forward_to().model_metadata(request, self._remaining(deadline), route)
        versions = [e.version for e in self._dp.cache.repository.versions(request.name)]
        return converters.metadata_to_proto(served, versions)

    async def ModelConfig(self, request: pb.ModelConfigRequest, context: Context) -> pb.ModelConfigResponse:
        annotate_span(self._dp.identity, request.name, request.version)
        route = self._route(context)
        served = await self._dp.route(request.name, request.version)
        if isinstance(served, Forward):
            deadline = self._control_deadline(context)
            return await self._forward_to().model_config(request, self._remaining(deadline), route)
        return pb.ModelConfigResponse(config=converters.config_to_proto(served))

    async def ModelInfer(self, request: pb.ModelInferRequest, context: Context) -> pb.ModelInferResponse:
        route = self._route(context)
        params = converters.params_from_proto(request.parameters)
        budget = self._dp.budget(params, context.time_remaining())
        served = await self._dp.route(request.model_name, request.model_version)
        if isinstance(served, Forward):
            return await self._forward(request, served, self._dp.deadline(budget), route)
        annotate_span(self._dp.identity, served.name, served.version)
        deadline = self._dp.deadline(budget, served)
        result = await self._dp.infer(served, converters.request_from_proto(request), deadline)
        if isinstance(result, Forward):
            return await self._forward(request, result, deadline, route)
        return converters.response_to_proto(result)

    async def _forward(
        self, request: pb.ModelInferRequest, forward: Forward, deadline: float, route: tuple[str, ...]
    ) -> pb.ModelInferResponse:
        annotate_span(self._dp.identity, request.model_name, request.model_version, forward.reason)
        response = await self._forward_to().model_infer(request, self._remaining(deadline), route)
        converters.mark_forwarded(response, forward.reason, self._dp.identity)
        return response

    async def ModelStreamInfer(
        self, request_iterator: AsyncIterator[pb.ModelInferRequest], context: Context
    ) -> AsyncIterator[pb.ModelStreamInferResponse]:
        # A bad request ends only its own answer, as an error message on the
        # stream (Triton's behaviour); the stream stays open for the next one.
        route = self._route(context)
        async for request in request_iterator:
            try:
                async for response in self._stream_one(request, context, route):
                    yield response
            except EdgecascadeError as exc:
                yield pb.ModelStreamInferResponse(error_message=exc.message)
            except Exception:
                # A bug met by one request must not end the stream for the ones after it.
                trace_id = current_trace_id()
                log.exception("unexpected error in a ModelStreamInfer request (trace id %s)", trace_id)
                yield pb.ModelStreamInferResponse(error_message=f"internal error; reported with trace id {trace_id}")

    async def _stream_one(
        self, request: pb.ModelInferRequest, context: Context, route: tuple[str, ...]
    ) -> AsyncIterator[pb.ModelStreamInferResponse]:
        params = converters.params_from_proto(request.parameters)
        budget = self._dp.budget(params, context.time_remaining())
        served = await self._dp.route(request.model_name, request.model_version)
        if isinstance(served, Forward):
            annotate_span(self._dp.identity, request.model_name, request.model_version, served.reason)
            remaining = self._remaining(self._dp.deadline(budget))
            async for response in self._forward_to().model_stream_infer(request, remaining, route):
                if response.HasField("infer_response"):
                    converters.mark_forwarded(response.infer_response, served.reason, self._dp.identity)
                yield response
            return
        annotate_span(self._dp.identity, served.name, served.version)
        deadline = self._dp.deadline(budget, served)
        decoded = converters.request_from_proto(request)
        if served.tokenizer is not None and TEXT_INPUT in decoded.inputs:
            async for token in self._dp.generate(served, decoded, deadline):
                yield pb.ModelStreamInferResponse(infer_response=converters.response_to_proto(token))
            return
        result = await self._dp.infer(served, decoded, deadline)
        if isinstance(result, Forward):
            answer = await self._forward(request, result, deadline, route)
        else:
            answer = converters.response_to_proto(result)
        yield pb.ModelStreamInferResponse(infer_response=answer)

    async def ModelStatistics(self, request: pb.ModelStatisticsRequest, context: Context) -> pb.ModelStatisticsResponse:
        models = self._dp.cache.loaded()
        if request.name:
            if not self._dp.cache.holds(request.name):
                raise ModelNotFoundError(f"model '{request.name}' is not in this node's repository")
            models = [m for m in models if m.name == request.name and request.version in ("", m.version)]
        return pb.ModelStatisticsResponse(model_stats=[converters.statistics_to_proto(m) for m in models])

    async def RepositoryIndex(self, request: pb.RepositoryIndexRequest, context: Context) -> pb.RepositoryIndexResponse:
        return converters.index_to_proto(self._dp.cache.index(), request.ready)

    async def RepositoryModelLoad(
        self, request: pb.RepositoryModelLoadRequest, context: Context
    ) -> pb.RepositoryModelLoadResponse:
        annotate_span(self._dp.identity, request.model_name)
        await self._dp.cache.load(request.model_name)
        return pb.RepositoryModelLoadResponse()

    async def RepositoryModelUnload(
        self, request: pb.RepositoryModelUnloadRequest, context: Context
    ) -> pb.RepositoryModelUnloadResponse:
        annotate_span(self._dp.identity, request.model_name)
        self._dp.cache.unload(request.model_name)
        return pb.RepositoryModelUnloadResponse()
