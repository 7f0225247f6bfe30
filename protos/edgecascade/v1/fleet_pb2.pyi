from protos.edgecascade.v1 import mesh_pb2 as _mesh_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class NodeFacts(_message.Message):
    __slots__ = ("node_id", "tier", "hardware_class", "memory_budget_bytes", "onnxruntime_version", "free_disk_bytes")
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    TIER_FIELD_NUMBER: _ClassVar[int]
    HARDWARE_CLASS_FIELD_NUMBER: _ClassVar[int]
    MEMORY_BUDGET_BYTES_FIELD_NUMBER: _ClassVar[int]
    ONNXRUNTIME_VERSION_FIELD_NUMBER: _ClassVar[int]
    FREE_DISK_BYTES_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    tier: _mesh_pb2.Tier
    hardware_class: str
    memory_budget_bytes: int
    onnxruntime_version: str
    free_disk_bytes: int
    def __init__(self, node_id: _Optional[str] = ..., tier: _Optional[_Union[_mesh_pb2.Tier, str]] = ..., hardware_class: _Optional[str] = ..., memory_budget_bytes: _Optional[int] = ..., onnxruntime_version: _Optional[str] = ..., free_disk_bytes: _Optional[int] = ...) -> None: ...

class EnrollRequest(_message.Message):
    __slots__ = ("token", "facts", "identity_public_key", "agreement_public_key")
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    FACTS_FIELD_NUMBER: _ClassVar[int]
    IDENTITY_PUBLIC_KEY_FIELD_NUMBER: _ClassVar[int]
    AGREEMENT_PUBLIC_KEY_FIELD_NUMBER: _ClassVar[int]
    token: str
    facts: NodeFacts
    identity_public_key: bytes
    agreement_public_key: bytes
    def __init__(self, token: _Optional[str] = ..., facts: _Optional[_Union[NodeFacts, _Mapping]] = ..., identity_public_key: _Optional[bytes] = ..., agreement_public_key: _Optional[bytes] = ...) -> None: ...

class EnrollResponse(_message.Message):
    __slots__ = ("node_id", "check_interval_s")
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    CHECK_INTERVAL_S_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    check_interval_s: int
    def __init__(self, node_id: _Optional[str] = ..., check_interval_s: _Optional[int] = ...) -> None: ...

class CheckInReport(_message.Message):
    __slots__ = ("facts", "timestamp_unix_ms", "nonce", "installed")
    FACTS_FIELD_NUMBER: _ClassVar[int]
    TIMESTAMP_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    NONCE_FIELD_NUMBER: _ClassVar[int]
    INSTALLED_FIELD_NUMBER: _ClassVar[int]
    facts: NodeFacts
    timestamp_unix_ms: int
    nonce: bytes
    installed: _containers.RepeatedCompositeFieldContainer[_mesh_pb2.InstalledModel]
    def __init__(self, facts: _Optional[_Union[NodeFacts, _Mapping]] = ..., timestamp_unix_ms: _Optional[int] = ..., nonce: _Optional[bytes] = ..., installed: _Optional[_Iterable[_Union[_mesh_pb2.InstalledModel, _Mapping]]] = ...) -> None: ...

class CheckInRequest(_message.Message):
    __slots__ = ("report", "signature")
    REPORT_FIELD_NUMBER: _ClassVar[int]
    SIGNATURE_FIELD_NUMBER: _ClassVar[int]
    report: bytes
    signature: bytes
    def __init__(self, report: _Optional[bytes] = ..., signature: _Optional[bytes] = ...) -> None: ...

class KeyGrant(_message.Message):
    __slots__ = ("key_id", "ephemeral_public_key", "salt", "nonce", "wrapped_key")
    KEY_ID_FIELD_NUMBER: _ClassVar[int]
    EPHEMERAL_PUBLIC_KEY_FIELD_NUMBER: _ClassVar[int]
    SALT_FIELD_NUMBER: _ClassVar[int]
    NONCE_FIELD_NUMBER: _ClassVar[int]
    WRAPPED_KEY_FIELD_NUMBER: _ClassVar[int]
    key_id: str
    ephemeral_public_key: bytes
    salt: bytes
    nonce: bytes
    wrapped_key: bytes
    def __init__(self, key_id: _Optional[str] = ..., ephemeral_public_key: _Optional[bytes] = ..., salt: _Optional[bytes] = ..., nonce: _Optional[bytes] = ..., wrapped_key: _Optional[bytes] = ...) -> None: ...

class Assignment(_message.Message):
    __slots__ = ("name", "version", "variant", "target_path", "grant", "shadow", "shadow_share")
    NAME_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    VARIANT_FIELD_NUMBER: _ClassVar[int]
    TARGET_PATH_FIELD_NUMBER: _ClassVar[int]
    GRANT_FIELD_NUMBER: _ClassVar[int]
    SHADOW_FIELD_NUMBER: _ClassVar[int]
    SHADOW_SHARE_FIELD_NUMBER: _ClassVar[int]
    name: str
    version: str
    variant: str
    target_path: str
    grant: KeyGrant
    shadow: bool
    shadow_share: float
    def __init__(self, name: _Optional[str] = ..., version: _Optional[str] = ..., variant: _Optional[str] = ..., target_path: _Optional[str] = ..., grant: _Optional[_Union[KeyGrant, _Mapping]] = ..., shadow: _Optional[bool] = ..., shadow_share: _Optional[float] = ...) -> None: ...

class Unassigned(_message.Message):
    __slots__ = ("name", "version", "reason")
    NAME_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    name: str
    version: str
    reason: str
    def __init__(self, name: _Optional[str] = ..., version: _Optional[str] = ..., reason: _Optional[str] = ...) -> None: ...

class CheckInResponse(_message.Message):
    __slots__ = ("assignments", "unassigned", "check_interval_s")
    ASSIGNMENTS_FIELD_NUMBER: _ClassVar[int]
    UNASSIGNED_FIELD_NUMBER: _ClassVar[int]
    CHECK_INTERVAL_S_FIELD_NUMBER: _ClassVar[int]
    assignments: _containers.RepeatedCompositeFieldContainer[Assignment]
    unassigned: _containers.RepeatedCompositeFieldContainer[Unassigned]
    check_interval_s: int
    def __init__(self, assignments: _Optional[_Iterable[_Union[Assignment, _Mapping]]] = ..., unassigned: _Optional[_Iterable[_Union[Unassigned, _Mapping]]] = ..., check_interval_s: _Optional[int] = ...) -> None: ...
