"""What every signed document of the protocol shares (receipts, statements, capacity records,
disputes): a version field checked the same way, canonical msgpack as the only accepted form,
a size limit checked before parsing, and signature slots that are empty or whole."""

from __future__ import annotations

from typing import Any, Protocol, TypeVar

from ._fields import check_bytes, fields_of
from .codec import unpack
from .errors import InvalidMessage, MalformedFrame, UnsupportedVersion
from .identity import SIGNATURE_BYTES
from .ids import PROTOCOL_VERSION


class _Document(Protocol):
    @classmethod
    def from_wire(cls, obj: Any) -> Any: ...

    def to_bytes(self) -> bytes: ...


D = TypeVar("D", bound=_Document)


def versioned_fields(obj: Any, what: str, names: tuple[str, ...]) -> dict[str, Any]:
    """The fields ``names`` of a document's wire map, after checking its "v" (then dropped)."""
    got = fields_of(obj, what, ("v", *names))
    version = got.pop("v")
    if type(version) is not int:
        raise InvalidMessage(f"{what} version 'v' must be an integer")
    if version != PROTOCOL_VERSION:
        raise UnsupportedVersion(f"{what} version {version} is not supported")
    return got


def parse_canonical(cls: type[D], data: bytes, what: str, max_bytes: int) -> D:
    """``cls.from_wire`` of ``data`` if it is at most ``max_bytes`` and exactly the canonical
    encoding of what it decodes to (so that the signed bytes are the stored bytes)."""
    if len(data) > max_bytes:
        raise InvalidMessage(f"{what} of {len(data)} bytes, the limit is {max_bytes}")
    doc = cls.from_wire(unpack(data))
    if doc.to_bytes() != bytes(data):
        raise MalformedFrame(f"{what} is not in canonical msgpack form")
    return doc


def check_signature_slot(name: str, value: Any) -> bytes:
    """A signature field that is either empty (not signed yet) or one whole signature."""
    sig = check_bytes(name, value, SIGNATURE_BYTES)
    if len(sig) not in (0, SIGNATURE_BYTES):
        raise InvalidMessage(f"{name} must be empty or {SIGNATURE_BYTES} bytes")
    return sig
