"""The Open Inference Protocol servicer every tier serves.

Thin by design: each method converts protobuf to domain types, asks the data
plane, and converts back. Where the answer comes from — this node's model or
the next tier up — is the data plane's decision; an answer relayed from
upstream comes back as the upstream's own message, already marked with
``edgecascade.fallback_reason`` and ``edgecascade.route`` by the gRPC
:class:`~services.rpc.upstream.GrpcUpstream` adapter.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable
from time import perf_counter
from typing import Any

from grpc import aio

from protos.inference import grpc_service_pb2 as pb
from protos.inference import grpc_service_pb2_grpc as pb_grpc
from services import __version__
from services.dataplane import Dataplane, InferCall, ModelQuery, Relayed
from services.errors import (
    EdgecascadeError,
    ForwardingLoopError,
    InvalidArgumentError,
    ModelNotFoundError,
    NotFoundError,
    RequestCancelledError,
)
from services.inference import CONFIDENCE, DEGRADED
from services.rpc import converters
from services.rpc.fleet_metrics import CallRoute, FleetMetrics
from services.rpc.inference_client import route_from_metadata
from services.rpc.status_table import current_trace_id
from services.rpc.telemetry import annotate_span
from services.telemetry_names import ERROR, FORWARDED, OK, REJECTED

SERVER_NAME = "edgecascade"
EXTENSIONS = ["model_repository", "statistics", "edgecascade"]

Context = aio.ServicerContext[Any, Any]

log = logging.getLogger("edgecascade.rpc")


# Failures that are the caller's doing, not the serving version's: they must not fail a rollout's error gate.
_CALLER_ERRORS = (InvalidArgumentError, NotFoundError, RequestCancelledError, ForwardingLoopError)


def outcome_of(exc: BaseException) -> str:
    """The metrics outcome of a request that failed: ``rejected`` for the caller's mistakes, else ``error``."""
    return REJECTED if isinstance(exc, _CALLER_ERRORS) else ERROR


class InferenceServicer(pb_grpc.GRPCInferenceServiceServicer):
    """Serves ``inference.GRPCInferenceService`` for one node.

    Args:
        dataplane: The node's data plane.
        is_ready: Whether the node has finished starting (ServerReady).
        metrics: Where each inference's outcome, latency and confidence are recorded (None: nowhere).
    """

    def __init__(self, dataplane: Dataplane, is_ready: Callable[[], bool], metrics: FleetMetrics | None = None) -> None:
        self._dp = dataplane
        self._is_ready = is_ready
        self._metrics = metrics

    def _call(
        self, request: pb.ModelInferRequest, context: Context, route: tuple[str, ...], seen: CallRoute
    ) -> InferCall:
        annotate_span(self._dp.identity, request.model_name, request.model_version)
        parameters = converters.params_from_proto(request.parameters)
        return InferCall(
            model_name=request.model_name,
            model_version=request.model_version,
            parameters=parameters,
            decode=lambda: converters.request_from_proto(request, parameters),
            wire=request,
            grpc_remaining=context.time_remaining(),
            route=route,
            routed=seen.routed,
        )

    def _route(self, context: Context) -> tuple[str, ...]:
        """The route a call arrived with; a loop is refused before anything else is read."""
        route = route_from_metadata(context.invocation_metadata())
        self._dp.check_route(route)
        return route

    async def ServerLive(self, request: pb.ServerLiveRequest, context: Context) -> pb.ServerLiveResponse:
        return pb.ServerLiveResponse(live=True)

    async def ServerReady(self, request: pb.ServerReadyRequest, context: Context) -> pb.ServerReadyResponse:
        return pb.ServerReadyResponse(ready=self._is_ready())

    async def ServerMetadata(self, request: pb.ServerMetadataRequest, context: Context) -> pb.ServerMetadataResponse:
        return pb.ServerMetadataResponse(name=SERVER_NAME, version=__version__, extensions=EXTENSIONS)

    async def ModelReady(self, request: pb.ModelReadyRequest, context: Context) -> pb.ModelReadyResponse:
        annotate_span(self._dp.identity, request.name, request.version)
        route = route_from_metadata(context.invocation_metadata())
        ready = await self._dp.ready(request.name, request.version, request, context.time_remaining(), route)
        if isinstance(ready, Relayed):
            return ready.message  # type: ignore[no-any-return]
        return pb.ModelReadyResponse(ready=ready)

    async def ModelMetadata(self, request: pb.ModelMetadataRequest, context: Context) -> pb.ModelMetadataResponse:
        annotate_span(self._dp.identity, request.name, request.version)
        route = route_from_metadata(context.invocation_metadata())
        served = await self._dp.describe(
            ModelQuery.METADATA, request.name, request.version, request, context.time_remaining(), route
        )
        if isinstance(served, Relayed):
            return served.message  # type: ignore[no-any-return]
        versions = [e.version for e in self._dp.cache.repository.versions(request.name)]
        return converters.metadata_to_proto(served, versions)

    async def ModelConfig(self, request: pb.ModelConfigRequest, context: Context) -> pb.ModelConfigResponse:
        annotate_span(self._dp.identity, request.name, request.version)
        route = route_from_metadata(context.invocation_metadata())
        served = await self._dp.describe(
            ModelQuery.CONFIG, request.name, request.version, request, context.time_remaining(), route
        )
        if isinstance(served, Relayed):
            return served.message  # type: ignore[no-any-return]
        return pb.ModelConfigResponse(config=converters.config_to_proto(served))

    async def ModelInfer(self, request: pb.ModelInferRequest, context: Context) -> pb.ModelInferResponse:
        started = perf_counter()
        seen = CallRoute(self._dp.identity, request.model_name, request.model_version)
        try:
            answer = await self._dp.infer(self._call(request, context, self._route(context), seen))
        except Exception as exc:
            if self._metrics is not None:
                self._metrics.record(seen, outcome_of(exc), perf_counter() - started, error=exc)
            raise
        if isinstance(answer, Relayed):
            if self._metrics is not None:
                self._metrics.record(seen, FORWARDED, perf_counter() - started)
            return answer.message  # type: ignore[no-any-return]
        if self._metrics is not None:
            self._metrics.record(seen, OK, perf_counter() - started, answer.parameters.get(CONFIDENCE))
            self._metrics.degraded(seen, answer.parameters.get(DEGRADED))
        return converters.response_to_proto(answer)

    async def ModelStreamInfer(
        self, request_iterator: AsyncIterator[pb.ModelInferRequest], context: Context
    ) -> AsyncIterator[pb.ModelStreamInferResponse]:
        # A forwarding loop fails the whole call (its metadata is the stream's).
        # A bad request ends only its own answer, as an error message on the
        # stream (Triton's behaviour); the stream stays open for the next one.
        route = self._route(context)
        async for request in request_iterator:
            # Each request of the stream is one request to the metrics: outcome, time to its last answer.
            started = perf_counter()
            seen = CallRoute(self._dp.identity, request.model_name, request.model_version)
            outcome, confidence, degraded = OK, None, None
            error: Exception | None = None
            try:
                async for answer in self._dp.stream(self._call(request, context, route, seen)):
                    if isinstance(answer, Relayed):
                        outcome = FORWARDED
                        message = answer.message
                        if isinstance(message, pb.ModelInferResponse):  # the cascade asked upward with ModelInfer
                            message = pb.ModelStreamInferResponse(infer_response=message)
                        yield message
                    else:
                        confidence = answer.parameters.get(CONFIDENCE, confidence)
                        degraded = answer.parameters.get(DEGRADED, degraded)
                        yield pb.ModelStreamInferResponse(infer_response=converters.response_to_proto(answer))
            except EdgecascadeError as exc:
                outcome, error = outcome_of(exc), exc
                yield pb.ModelStreamInferResponse(error_message=exc.message)
            except Exception as exc:
                outcome, error = ERROR, exc
                # A bug met by one request must not end the stream for the ones after it.
                trace_id = current_trace_id()
                log.exception("unexpected error in a ModelStreamInfer request (trace id %s)", trace_id)
                yield pb.ModelStreamInferResponse(error_message=f"internal error; reported with trace id {trace_id}")
            if self._metrics is not None:
                self._metrics.record(seen, outcome, perf_counter() - started, confidence, error)
                self._metrics.degraded(seen, degraded)

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
