"""Transport adapters: everything that speaks gRPC or protobuf.

Servicers here convert protobuf to the domain types of ``services`` and
delegate; the status table maps the domain error tree to gRPC status codes in
one place, for servers and clients alike.
"""
