"""MessagePack and JSON codecs for the protocol's messages."""

from __future__ import annotations

from typing import Any, TypeVar

import msgspec

MSGPACK = "application/msgpack"
JSON = "application/json"

T = TypeVar("T")

_msgpack_encoder = msgspec.msgpack.Encoder()
_json_encoder = msgspec.json.Encoder()


def encode(message: Any, media_type: str = MSGPACK) -> bytes:
    """Encode a message (or plain data) as ``media_type``."""
    if media_type == MSGPACK:
        return _msgpack_encoder.encode(message)
    if media_type == JSON:
        return _json_encoder.encode(message)
    raise ValueError(f"unsupported media type {media_type!r}")


def decode(data: bytes, type_: type[T], media_type: str = MSGPACK) -> T:
    """Decode and validate ``data``; raises ``msgspec.DecodeError``/``ValidationError``."""
    if media_type == MSGPACK:
        return msgspec.msgpack.decode(data, type=type_)
    if media_type == JSON:
        return msgspec.json.decode(data, type=type_)
    raise ValueError(f"unsupported media type {media_type!r}")
