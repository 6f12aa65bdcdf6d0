"""The error tree of the shiza protocol. Every error that crosses the wire has a stable code.

    ShizaError                    base; code 0 only for codes this version does not know
    ├── WireError                 the bytes or the message are wrong: answer Error, close the stream
    │   ├── MalformedFrame        1   not msgpack, truncated, trailing bytes, ext types, bad UTF-8
    │   ├── FrameTooLarge         2   frame header announces more than MAX_FRAME_BYTES
    │   ├── UnsupportedVersion    3   "v" is not PROTOCOL_VERSION
    │   ├── UnknownMessageType    4   "t" names no message of this version
    │   ├── LimitExceeded         5   nesting, string, list, map or tensor size over its limit
    │   └── InvalidMessage        6   field missing, unknown, wrongly typed or out of range
    ├── TrustError                signatures and records
    │   ├── InvalidSignature      10
    │   ├── KeyMismatch           11  signed by, or stored under, another key than the peer id names
    │   ├── RecordExpired         12
    │   ├── StaleSequence         13
    │   ├── ReceiptMismatch       14  a receipt disagrees with what was observed, or its arithmetic
    │   ├── DuplicateReceipt      15  a receipt id or (server, client, seq) seen twice
    │   └── BadProof              16  Merkle root or proof mismatch; statement totals wrong
    ├── ServiceError              the request was well formed but cannot be served
    │   ├── UnknownModel          20
    │   ├── SpanNotServed         21
    │   ├── BadShape              22  tensor shapes or byte lengths do not fit together
    │   ├── SessionNotFound       23
    │   ├── SessionClosed         24
    │   ├── Busy                  25  no room now (KV cache, sessions, the peer's share); retry later
    │   │                             (after ``retry_after_s`` when the Error carries it) or elsewhere
    │   ├── Timeout               26
    │   ├── RateLimited           27  this peer exceeded its per-peer limits, or is banned for a while
    │   └── NotAllowed            28  this peer is not admitted to the swarm or not on the allow list
    └── Internal                  99  a bug or an unexpected failure on the sender's side

Errors raised by msgpack or pynacl are converted inside this package: callers see only these.
Any error may carry ``retry_after_s`` (seconds, or None): the sender's hint of when asking again
may succeed. Nodes set it on Busy and RateLimited; it travels in the Error frame (SPEC 7.10).
"""

from __future__ import annotations

from typing import ClassVar


class ShizaError(Exception):
    """Base of every protocol error. ``code`` is the wire code, ``name`` a stable short name."""

    code: int = 0
    name: ClassVar[str] = "error"

    def __init__(self, message: str = "", *, code: int | None = None, retry_after_s: float | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.retry_after_s = retry_after_s
        if code is not None:
            self.code = code

    def __str__(self) -> str:
        return self.message

    def __repr__(self) -> str:
        return f"{type(self).__name__}(code={self.code}, message={self.message!r})"


class WireError(ShizaError):
    """The peer sent bytes or a message that this version does not accept."""

    name = "wire_error"


class TrustError(ShizaError):
    """A signature, key binding, expiry or sequence check failed."""

    name = "trust_error"


class ServiceError(ShizaError):
    """A well-formed request that the node cannot serve."""

    name = "service_error"


class MalformedFrame(WireError):
    code = 1
    name = "malformed_frame"


class FrameTooLarge(WireError):
    code = 2
    name = "frame_too_large"


class UnsupportedVersion(WireError):
    code = 3
    name = "unsupported_version"


class UnknownMessageType(WireError):
    code = 4
    name = "unknown_message_type"


class LimitExceeded(WireError):
    code = 5
    name = "limit_exceeded"


class InvalidMessage(WireError):
    code = 6
    name = "invalid_message"


class InvalidSignature(TrustError):
    code = 10
    name = "invalid_signature"


class KeyMismatch(TrustError):
    code = 11
    name = "key_mismatch"


class RecordExpired(TrustError):
    code = 12
    name = "record_expired"


class StaleSequence(TrustError):
    code = 13
    name = "stale_sequence"


class ReceiptMismatch(TrustError):
    code = 14
    name = "receipt_mismatch"


class DuplicateReceipt(TrustError):
    code = 15
    name = "duplicate_receipt"


class BadProof(TrustError):
    code = 16
    name = "bad_proof"


class UnknownModel(ServiceError):
    code = 20
    name = "unknown_model"


class SpanNotServed(ServiceError):
    code = 21
    name = "span_not_served"


class BadShape(ServiceError):
    code = 22
    name = "bad_shape"


class SessionNotFound(ServiceError):
    code = 23
    name = "session_not_found"


class SessionClosed(ServiceError):
    code = 24
    name = "session_closed"


class Busy(ServiceError):
    code = 25
    name = "busy"


class Timeout(ServiceError):
    code = 26
    name = "timeout"


class RateLimited(ServiceError):
    code = 27
    name = "rate_limited"


class NotAllowed(ServiceError):
    code = 28
    name = "not_allowed"


class Internal(ShizaError):
    code = 99
    name = "internal"


ERROR_CLASSES: dict[int, type[ShizaError]] = {
    cls.code: cls
    for cls in (
        MalformedFrame,
        FrameTooLarge,
        UnsupportedVersion,
        UnknownMessageType,
        LimitExceeded,
        InvalidMessage,
        InvalidSignature,
        KeyMismatch,
        RecordExpired,
        StaleSequence,
        ReceiptMismatch,
        DuplicateReceipt,
        BadProof,
        UnknownModel,
        SpanNotServed,
        BadShape,
        SessionNotFound,
        SessionClosed,
        Busy,
        Timeout,
        RateLimited,
        NotAllowed,
        Internal,
    )
}


def error_from_code(code: int, message: str, retry_after_s: float | None = None) -> ShizaError:
    """The exception for a wire error code; a code this version does not know gives a plain
    ShizaError carrying that code, so it can still be reported and relayed."""
    cls = ERROR_CLASSES.get(code)
    if cls is None:
        return ShizaError(message, code=code, retry_after_s=retry_after_s)
    return cls(message, retry_after_s=retry_after_s)
