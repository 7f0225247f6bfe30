"""The gRPC server every tier runs on.

One builder for all tiers: ``grpc.aio``, the standard health service (every
registered service and the overall ``""`` status), server reflection,
message-size limits, and each handler of the node's services wrapped once with
the status table and OpenTelemetry server spans (:mod:`services.rpc.served_methods`).
Shutdown is graceful: health turns NOT_SERVING first so load balancers stop
sending, then calls in flight get ``grace_seconds`` to finish.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from grpc import aio
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from services.errors import ConfigError
from services.rpc.served_methods import Tracing, WrappingServer, wrap_handler


@dataclass(frozen=True)
class ServiceBinding:
    """A service to serve: its full name and how to add it to a server."""

    name: str
    register: Callable[[aio.Server], None]


class GrpcServer:
    """A started-on-demand gRPC server with health and reflection.

    Args:
        host: Address to bind.
        port: Port to bind; 0 picks a free one (see :attr:`port` after :meth:`start`).
        bindings: The services to serve.
        max_message_bytes: Largest message received or sent.
        grace_seconds: Time calls in flight get to finish on :meth:`stop`.
        tracing: How calls are traced (None: no server spans).
    """

    def __init__(
        self,
        host: str,
        port: int,
        bindings: Sequence[ServiceBinding],
        max_message_bytes: int,
        grace_seconds: float,
        tracing: Tracing | None,
    ) -> None:
        self._address = f"{host}:{port}"
        self._bindings = bindings
        self._grace = grace_seconds
        # No interceptors: gRPC would run them in Python on every call. Each handler of the
        # node's services is wrapped once instead, at registration (see served_methods).
        self._wrap = wrap_handler(tracing or Tracing(None, every_call=False))
        self._server = aio.server(
            options=[
                ("grpc.max_receive_message_length", max_message_bytes),
                ("grpc.max_send_message_length", max_message_bytes),
                ("grpc.so_reuseport", 0),
            ],
        )
        self._health = health.aio.HealthServicer()
        self.port = 0

    async def start(self) -> int:
        """Binds and starts serving with health NOT_SERVING; returns the bound port.

        The node reports SERVING with :meth:`set_serving` once it is ready, so
        liveness answers while models are still loading.

        Raises:
            ConfigError: The address cannot be bound.
        """
        for binding in self._bindings:
            binding.register(WrappingServer(self._server, self._wrap))  # type: ignore[arg-type]
        health_pb2_grpc.add_HealthServicer_to_server(self._health, self._server)
        names = [b.name for b in self._bindings]
        reflection.enable_server_reflection(
            (*names, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME),
            self._server,
        )
        try:
            self.port = self._server.add_insecure_port(self._address)
        except RuntimeError as exc:
            raise ConfigError(f"cannot listen on {self._address}: {exc}") from None
        if self.port == 0:
            raise ConfigError(f"cannot listen on {self._address}: address in use or not available")
        await self._server.start()
        await self.set_serving(False)
        return self.port

    async def set_serving(self, serving: bool) -> None:
        """Reports every service (and the overall status) SERVING or NOT_SERVING."""
        status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        for name in ("", *(b.name for b in self._bindings)):
            await self._health.set(name, status)

    async def stop(self) -> None:
        """Reports NOT_SERVING, then stops after the grace period."""
        await self._health.enter_graceful_shutdown()
        await self._server.stop(self._grace)

    async def wait(self) -> None:
        """Returns when the server has terminated."""
        await self._server.wait_for_termination()
