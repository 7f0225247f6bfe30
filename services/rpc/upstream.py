"""The gRPC adapter of the data plane's :class:`~services.dataplane.Upstream` port.

It forwards the caller's own protobuf message, untouched, to the next tier with
the remaining deadline and the forwarding route, and marks what comes back with
this node's ``edgecascade.fallback_reason`` and ``edgecascade.route``.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Sequence
from typing import Any

import numpy as np

from protos.inference import grpc_service_pb2 as pb
from services.cascade_generation import UpstreamGenerator
from services.dataplane import InferCall, ModelQuery, Relayed
from services.engine.generation import INPUT_IDS, PROBS
from services.errors import InvalidArgumentError
from services.inference import CASCADE, CASCADE_OFF, FallbackReason, NodeIdentity
from services.rpc import converters
from services.rpc.inference_client import InferenceClient
from services.tensors import decode_raw, encode_raw


class GrpcUpstream:
    """Forwards calls to the next tier over one :class:`InferenceClient`.

    Args:
        client: The channel to the next tier.
        identity: This node, named on every answer it relays.
    """

    def __init__(self, client: InferenceClient, identity: NodeIdentity) -> None:
        self._client = client
        self._identity = identity

    def available(self) -> bool:
        """Always True: there is a next tier (whether it answers is for the call to find out)."""
        return True

    async def infer(self, call: InferCall, reason: FallbackReason, timeout: float, route: Sequence[str]) -> Relayed:
        """Forwards ModelInfer and marks the answer as forwarded here."""
        response = await self._client.model_infer(call.wire, timeout, route)
        converters.mark_forwarded(response, reason, self._identity)
        return Relayed(response, reason)

    async def stream(
        self, call: InferCall, reason: FallbackReason, timeout: float, route: Sequence[str]
    ) -> AsyncIterator[Relayed]:
        """Forwards one request over ModelStreamInfer; every answer on it is marked as forwarded here."""
        async for response in self._client.model_stream_infer(call.wire, timeout, route):
            if response.HasField("infer_response"):
                converters.mark_forwarded(response.infer_response, reason, self._identity)
            yield Relayed(response, reason)

    async def query(self, query: ModelQuery, wire: Any, timeout: float, route: Sequence[str]) -> Any:
        """Forwards ModelReady, ModelMetadata or ModelConfig and returns the answer as it came."""
        if query is ModelQuery.READY:
            return await self._client.model_ready(wire, timeout, route)
        if query is ModelQuery.METADATA:
            return await self._client.model_metadata(wire, timeout, route)
        return await self._client.model_config(wire, timeout, route)

    async def generator(self, model: str, timeout: float, route: Sequence[str]) -> UpstreamGenerator:
        """Reads a generator's vocabulary, context length and max_batch_size from the upstream's ModelConfig.

        Raises:
            InvalidArgumentError: The model's configuration names no vocabulary or context length.
        """
        response = await self._client.model_config(pb.ModelConfigRequest(name=model), timeout, route)
        config = response.config
        try:
            vocab = json.loads(config.parameters["edgecascade.vocab"].string_value)
            context_length = int(config.parameters["edgecascade.context_length"].string_value)
        except (KeyError, ValueError) as exc:
            raise InvalidArgumentError(f"upstream model '{model}' is not a generator (no vocabulary)") from exc
        if not isinstance(vocab, list) or not all(isinstance(v, str) for v in vocab) or context_length < 1:
            raise InvalidArgumentError(f"upstream model '{model}' has a malformed vocabulary or context length")
        return UpstreamGenerator(model, tuple(vocab), context_length, max(int(config.max_batch_size), 1))

    async def distribution(
        self, model: str, version: str, input_ids: np.ndarray[Any, Any], timeout: float, route: Sequence[str]
    ) -> np.ndarray[Any, Any]:
        """One ModelInfer of ``model`` on ``input_ids`` (its own cascade off: the answer is that model's alone).

        Raises:
            InvalidArgumentError: The answer has no ``probs`` output.
        """
        ids = np.ascontiguousarray(input_ids, dtype=np.int64)
        request = pb.ModelInferRequest(model_name=model, model_version=version)
        request.inputs.add(name=INPUT_IDS, datatype="INT64", shape=list(ids.shape))
        request.raw_input_contents.append(encode_raw(ids))
        request.outputs.add(name=PROBS)
        request.parameters[CASCADE].string_param = CASCADE_OFF
        response = await self._client.model_infer(request, timeout, route)
        for i, output in enumerate(response.outputs):
            if output.name == PROBS and i < len(response.raw_output_contents):
                return decode_raw(PROBS, output.datatype, list(output.shape), response.raw_output_contents[i])
        raise InvalidArgumentError(f"upstream model '{model}' answered without a raw '{PROBS}' output")

    async def close(self) -> None:
        """Closes the channel; calls in flight are cancelled."""
        await self._client.close()
