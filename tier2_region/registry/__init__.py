"""The model registry of the region: a TUF repository of encrypted, profiled model variants.

Domain cores only (stdlib, numpy, onnx, onnxruntime, cryptography, tuf): no
``grpc`` and no ``protos``. The region serves the repository directory through
``services.rpc.artifact_servicer``; ``edgecascade.model_commands`` drives the
publish pipeline (quantize → profile → gate → encrypt → sign → publish).
"""
