"""What two or more edgecascade tiers share.

Modules directly in this package are domain cores: plain Python over numpy and
onnxruntime, no ``grpc``, no ``protos``. Everything that speaks the wire lives in
``services.rpc``; the ``edgecascade`` command line lives in ``services.cli``.
"""

__version__ = "0.1.0"
