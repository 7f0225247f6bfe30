"""Client channels to other tiers, with tracing and the node's message-size limits."""

from __future__ import annotations

from grpc import aio
from opentelemetry.instrumentation.grpc import aio_client_interceptors
from opentelemetry.sdk.trace import TracerProvider

# First and longest wait before reconnecting to a peer that went away (milliseconds).
RECONNECT_BACKOFF_MS = (250, 2000)


def open_channel(address: str, tracer_provider: TracerProvider | None, max_message_bytes: int) -> aio.Channel:
    """Opens an insecure channel whose calls carry W3C trace context in their metadata.

    Args:
        address: ``host:port`` of the peer.
        tracer_provider: The calling node's provider; None for an untraced channel.
        max_message_bytes: Largest message sent or received.
    """
    options = [
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.enable_retries", 0),
        # An upstream that restarts on its port (the launcher, systemd, Kubernetes) is reached
        # again within seconds, not after gRPC's default backoff of up to two minutes.
        ("grpc.initial_reconnect_backoff_ms", RECONNECT_BACKOFF_MS[0]),
        ("grpc.max_reconnect_backoff_ms", RECONNECT_BACKOFF_MS[1]),
    ]
    interceptors = list(aio_client_interceptors(tracer_provider=tracer_provider)) if tracer_provider else []
    return aio.insecure_channel(address, options=options, interceptors=interceptors)
