from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Tier(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    TIER_UNSPECIFIED: _ClassVar[Tier]
    TIER_DEVICE: _ClassVar[Tier]
    TIER_EDGE: _ClassVar[Tier]
    TIER_REGION: _ClassVar[Tier]
TIER_UNSPECIFIED: Tier
TIER_DEVICE: Tier
TIER_EDGE: Tier
TIER_REGION: Tier

class GetTierInfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class HeldModel(_message.Message):
    __slots__ = ("name", "version", "state")
    NAME_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    name: str
    version: str
    state: str
    def __init__(self, name: _Optional[str] = ..., version: _Optional[str] = ..., state: _Optional[str] = ...) -> None: ...

class GetTierInfoResponse(_message.Message):
    __slots__ = ("tier", "tier_name", "node_id", "version", "upstream", "models")
    TIER_FIELD_NUMBER: _ClassVar[int]
    TIER_NAME_FIELD_NUMBER: _ClassVar[int]
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    UPSTREAM_FIELD_NUMBER: _ClassVar[int]
    MODELS_FIELD_NUMBER: _ClassVar[int]
    tier: Tier
    tier_name: str
    node_id: str
    version: str
    upstream: str
    models: _containers.RepeatedCompositeFieldContainer[HeldModel]
    def __init__(self, tier: _Optional[_Union[Tier, str]] = ..., tier_name: _Optional[str] = ..., node_id: _Optional[str] = ..., version: _Optional[str] = ..., upstream: _Optional[str] = ..., models: _Optional[_Iterable[_Union[HeldModel, _Mapping]]] = ...) -> None: ...
