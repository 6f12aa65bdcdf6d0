"""Typed messages of /shiza/info and /shiza/inference, version 0.

Wire form: a msgpack map {"v": 0, "t": TYPE, ...fields}. Every field is checked when a message
is built, locally or from the wire, so a message object that exists is a valid one. Receivers
reject unknown fields (InvalidMessage): a new field needs a new protocol version, unless it is
optional and left out of the wire map when unset (Error.retry_after_s, Step.keep, Step.draft,
StepResult.logprobs and top_ids, SessionOpened.windows, dtype and vocab_size), so every message
without it keeps its old form.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any, ClassVar, Union, get_args

from ._fields import check_bytes, check_choice, check_float, check_hex, check_int, check_seq, check_str, set_field
from ._message import _check_bt, _check_logprobs, _Message, omit_unset
from ._values import SamplingParams, ServedSpan, span_bounds
from .codec import FLOAT_DTYPES, Tensor, encode_frame
from .direct import KEY_BYTES as DIRECT_KEY_BYTES
from .errors import BadShape, Internal, InvalidMessage, ShizaError, UnknownMessageType, UnsupportedVersion, error_from_code
from .ids import (
    MAX_ADDR_LEN, MAX_ADDRS, MAX_BATCH_SIZE, MAX_ERROR_MESSAGE_LEN, MAX_ID_LEN, MAX_RECEIPT_BYTES, MAX_RECORD_BYTES,
    MAX_RETRY_AFTER_S, MAX_SESSION_LENGTH, MAX_SPANS, MAX_STR_LEN, PROTOCOL_VERSION, RECEIPT_ID_LEN,
)

#: What a node says about itself (NodeInfo.state, CapacityRecord.state).
NODE_STATES = ("joining", "online", "draining")
_MAX_STEP = 2**63 - 1


class SessionState(enum.Enum):
    """Server-side state of an inference session; SPEC.md 9.4 has the transition table."""

    OPENING = "opening"  # stream accepted, waiting for OpenSession
    OPEN = "open"  # SessionOpened sent; Step frames are served
    CLOSED = "closed"  # CloseSession answered with Closed
    FAILED = "failed"  # an Error frame was sent, or the stream ended or broke; cache freed


# Messages ------------------------------------------------------------------------------

@dataclass(frozen=True)
class InfoRequest(_Message):
    TYPE: ClassVar[str] = "info_req"


@dataclass(frozen=True)
class NodeInfo(_Message):
    """Answer to InfoRequest. ``record`` is the node's current signed capacity record bytes."""

    TYPE: ClassVar[str] = "info"
    _OPTIONAL: ClassVar[dict[str, Any]] = {"record": None}
    peer_id: str
    addrs: tuple[str, ...]
    version: str
    state: str
    spans: tuple[ServedSpan, ...]
    record: bytes | None = None

    def __post_init__(self) -> None:
        check_str("peer_id", self.peer_id, MAX_ID_LEN, nonempty=True)
        addrs = check_seq("addrs", self.addrs, MAX_ADDRS)
        for addr in addrs:
            check_str("addrs[]", addr, MAX_ADDR_LEN, nonempty=True)
        set_field(self, "addrs", addrs)
        check_str("version", self.version, MAX_ID_LEN)
        check_choice("state", self.state, NODE_STATES)
        spans = check_seq("spans", self.spans, MAX_SPANS)
        for span in spans:
            if not isinstance(span, ServedSpan):
                raise InvalidMessage("spans[] must be ServedSpan values")
        set_field(self, "spans", spans)
        if self.record is not None:
            check_bytes("record", self.record, MAX_RECORD_BYTES)

    @classmethod
    def from_wire(cls, obj: Any) -> NodeInfo:
        got = cls._wire_fields(obj)
        got["spans"] = tuple(ServedSpan.from_wire(s) for s in check_seq("spans", got["spans"], MAX_SPANS))
        return cls(**got)


@dataclass(frozen=True)
class OpenSession(_Message):
    """First frame of an inference stream: serve layers [start, end) of model_id for one
    session of at most ``max_length`` tokens per sequence. An empty session_id lets the
    server choose one."""

    TYPE: ClassVar[str] = "open"
    _OPTIONAL: ClassVar[dict[str, Any]] = {"batch_size": 1, "sampling": None, "session_id": "",
                                           "direct_key": None}
    model_id: str
    start: int
    end: int
    max_length: int
    batch_size: int = 1
    sampling: SamplingParams = field(default_factory=SamplingParams)
    session_id: str = ""
    direct_key: bytes | None = None  # the client's X25519 key: asks for a direct channel (9.5)

    def __post_init__(self) -> None:
        check_str("model_id", self.model_id, MAX_ID_LEN, nonempty=True)
        span_bounds(self.start, self.end)
        check_int("max_length", self.max_length, 1, MAX_SESSION_LENGTH)
        check_int("batch_size", self.batch_size, 1, MAX_BATCH_SIZE)
        if self.sampling is None:
            set_field(self, "sampling", SamplingParams())
        elif not isinstance(self.sampling, SamplingParams):
            raise InvalidMessage("sampling must be SamplingParams")
        check_str("session_id", self.session_id, MAX_ID_LEN)
        if self.direct_key is not None:
            check_bytes("direct_key", self.direct_key, DIRECT_KEY_BYTES, exact=True)

    @classmethod
    def from_wire(cls, obj: Any) -> OpenSession:
        got = cls._wire_fields(obj)
        if got["sampling"] is not None:
            got["sampling"] = SamplingParams.from_wire(got["sampling"])
        return cls(**got)


@dataclass(frozen=True)
class SessionOpened(_Message):
    """``direct_port`` and ``direct_key`` (both or neither): the node's offer of a direct
    channel for this session's later frames (SPEC.md 9.5). ``windows``: the node runs window
    steps (9.7). ``dtype``: the float dtype of the hidden states the span returns;
    ``vocab_size``: the rows of the model's output head (token ids lie below it)."""

    TYPE: ClassVar[str] = "opened"
    _OPTIONAL: ClassVar[dict[str, Any]] = {"direct_port": None, "direct_key": None, "windows": False,
                                           "dtype": None, "vocab_size": None}
    session_id: str
    start: int
    end: int
    hidden_size: int
    direct_port: int | None = None
    direct_key: bytes | None = None
    windows: bool = False
    dtype: str | None = None
    vocab_size: int | None = None

    def to_wire(self) -> dict[str, Any]:
        return omit_unset(super().to_wire(), windows=False, dtype=None, vocab_size=None)

    def __post_init__(self) -> None:
        check_str("session_id", self.session_id, MAX_ID_LEN, nonempty=True)
        span_bounds(self.start, self.end)
        check_int("hidden_size", self.hidden_size, 1, 2**20)
        if (self.direct_port is None) != (self.direct_key is None):
            raise InvalidMessage("direct_port and direct_key come together")
        if self.direct_port is not None:
            check_int("direct_port", self.direct_port, 1, 65535)
            check_bytes("direct_key", self.direct_key, DIRECT_KEY_BYTES, exact=True)
        if type(self.windows) is not bool:
            raise InvalidMessage("windows must be a boolean")
        if self.dtype is not None:
            check_choice("dtype", self.dtype, FLOAT_DTYPES)
        if self.vocab_size is not None:
            check_int("vocab_size", self.vocab_size, 1, 2**31)


@dataclass(frozen=True)
class Step(_Message):
    """One forward step. input: int64 token ids [B, T] (first span) or hidden states
    [B, T, H] in a float dtype; positions: int64 [B, T]; mask: int64 [B, T] of 0/1 for the
    new tokens, None meaning all ones.

    A window step (speculative decoding, SPEC.md 9.7): ``keep`` first cuts the session's cache
    to its first ``keep`` positions (the rest were drafts the client did not accept);
    ``draft``, int64 [B, T - 1], names the draft tokens the step's last T - 1 positions hold,
    and the last span then answers its choice at every position, int64 [B, T]. Both are left
    out of the wire map when None, so a plain step has the form it always had."""

    TYPE: ClassVar[str] = "step"
    _OPTIONAL: ClassVar[dict[str, Any]] = {"mask": None, "keep": None, "draft": None}
    step: int
    input: Tensor
    positions: Tensor
    mask: Tensor | None = None
    keep: int | None = None
    draft: Tensor | None = None

    def __post_init__(self) -> None:
        check_int("step", self.step, 0, _MAX_STEP)
        for name in ("input", "positions", "mask", "draft"):
            value = getattr(self, name)
            if not isinstance(value, Tensor) and not (name in ("mask", "draft") and value is None):
                raise InvalidMessage(f"{name} must be a tensor")
        inp = self.input
        if inp.dtype == "int64":
            if len(inp.shape) != 2:
                raise BadShape(f"token ids must be [B, T], got {list(inp.shape)}")
        elif inp.dtype in FLOAT_DTYPES:
            if len(inp.shape) != 3:
                raise BadShape(f"hidden states must be [B, T, H], got {list(inp.shape)}")
        else:
            raise InvalidMessage(f"input dtype must be int64 or a float dtype, got {inp.dtype}")
        batch, length = inp.shape[0], inp.shape[1]
        _check_bt("positions", self.positions, batch, length)
        if self.mask is not None:
            _check_bt("mask", self.mask, batch, length)
        if self.keep is not None:
            check_int("keep", self.keep, 0, MAX_SESSION_LENGTH)
        if self.draft is not None:
            if length < 2:
                raise BadShape("a window step (with draft) holds at least 2 positions per row")
            _check_bt("draft", self.draft, batch, length - 1)

    def to_wire(self) -> dict[str, Any]:
        return omit_unset(super().to_wire(), keep=None, draft=None)

    @property
    def window(self) -> bool:
        """A window step: the last span answers a token per position."""
        return self.draft is not None

    @classmethod
    def from_wire(cls, obj: Any) -> Step:
        return cls(**step_tensors(cls._wire_fields(obj)))


def step_tensors(got: dict[str, Any]) -> dict[str, Any]:
    """A Step's (or Push's) wire fields with ``input``, ``positions`` and ``mask`` as Tensors."""
    for name in ("input", "positions", "mask", "draft"):
        if got.get(name) is not None:
            got[name] = Tensor.from_wire(got[name])
    return got


@dataclass(frozen=True)
class StepResult(_Message):
    """Answer to Step with the same step number. output: hidden states [B, T, H] in a float
    dtype, or for the last span the sampled token ids, int64 [B] ([B, T] for a window step). ``receipt``: at a checkpoint,
    the bytes of a server-signed cumulative receipt (protocol.receipts) to countersign."""

    TYPE: ClassVar[str] = "result"
    _OPTIONAL: ClassVar[dict[str, Any]] = {"receipt": None, "logprobs": None, "top_ids": None}
    step: int
    output: Tensor
    receipt: bytes | None = None
    # SamplingParams.logprobs = k (9.9): float32 [B, 1 + k] (window: [B, T, 1 + k]), the chosen
    # token's log-probability then the k most likely tokens'; top_ids int64 [B, k] ([B, T, k]).
    logprobs: Tensor | None = None
    top_ids: Tensor | None = None

    def __post_init__(self) -> None:
        check_int("step", self.step, 0, _MAX_STEP)
        if self.receipt is not None:
            check_bytes("receipt", self.receipt, MAX_RECEIPT_BYTES)
        _check_logprobs(self.output, self.logprobs, self.top_ids)
        out = self.output
        if not isinstance(out, Tensor):
            raise InvalidMessage("output must be a tensor")
        if out.dtype == "int64":
            if len(out.shape) not in (1, 2):
                raise BadShape(f"sampled token ids must be [B] or [B, T], got {list(out.shape)}")
        elif out.dtype in FLOAT_DTYPES:
            if len(out.shape) != 3:
                raise BadShape(f"hidden states must be [B, T, H], got {list(out.shape)}")
        else:
            raise InvalidMessage(f"output dtype must be int64 or a float dtype, got {out.dtype}")

    def to_wire(self) -> dict[str, Any]:
        return omit_unset(super().to_wire(), logprobs=None, top_ids=None)

    @classmethod
    def from_wire(cls, obj: Any) -> StepResult:
        got = cls._wire_fields(obj)
        got["output"] = Tensor.from_wire(got["output"])
        for name in ("logprobs", "top_ids"):
            if got[name] is not None:
                got[name] = Tensor.from_wire(got[name])
        return cls(**got)


@dataclass(frozen=True)
class CloseSession(_Message):
    TYPE: ClassVar[str] = "close"


@dataclass(frozen=True)
class Closed(_Message):
    """Answer to CloseSession; ``receipt`` is the session's final server-signed receipt."""

    TYPE: ClassVar[str] = "closed"
    _OPTIONAL: ClassVar[dict[str, Any]] = {"receipt": None}
    receipt: bytes | None = None

    def __post_init__(self) -> None:
        if self.receipt is not None:
            check_bytes("receipt", self.receipt, MAX_RECEIPT_BYTES)


@dataclass(frozen=True)
class Countersign(_Message):
    """Client to server: it accepts receipt ``receipt_id``; client_sig is its countersignature."""

    TYPE: ClassVar[str] = "cosign"
    receipt_id: str
    client_sig: bytes

    def __post_init__(self) -> None:
        check_hex("receipt_id", self.receipt_id, RECEIPT_ID_LEN)
        check_bytes("client_sig", self.client_sig, 64, exact=True)


@dataclass(frozen=True)
class Dispute(_Message):
    """Client to server: it refuses receipt ``receipt_id`` and says why (<= 4,096 bytes)."""

    TYPE: ClassVar[str] = "dispute"
    receipt_id: str
    reason: str

    def __post_init__(self) -> None:
        check_hex("receipt_id", self.receipt_id, RECEIPT_ID_LEN)
        check_str("reason", self.reason, MAX_ERROR_MESSAGE_LEN)


@dataclass(frozen=True)
class Error(_Message):
    """A failure, sent instead of the expected answer; the sender then closes the stream.

    ``retry_after_s``: the sender's hint of when the same request may succeed (Busy,
    RateLimited); left out of the wire map when None (SPEC 7.10)."""

    TYPE: ClassVar[str] = "error"
    _OPTIONAL: ClassVar[dict[str, Any]] = {"retry_after_s": None}
    code: int
    message: str
    retry_after_s: float | None = None

    def __post_init__(self) -> None:
        check_int("code", self.code, 0, 65535)
        check_str("message", self.message, MAX_STR_LEN)
        if self.retry_after_s is not None:
            set_field(self, "retry_after_s", check_float("retry_after_s", self.retry_after_s, 0.0, MAX_RETRY_AFTER_S))

    def to_wire(self) -> dict[str, Any]:
        return omit_unset(super().to_wire(), retry_after_s=None)

    @classmethod
    def from_exception(cls, exc: BaseException) -> Error:
        """The Error frame for ``exc``. Anything but a ShizaError is reported as Internal
        without its text, so local details do not leak to peers."""
        if not isinstance(exc, ShizaError):
            exc = Internal(f"internal error ({type(exc).__name__})")
        hint = getattr(exc, "retry_after_s", None)
        if hint is not None:
            hint = min(max(0.0, float(hint)), MAX_RETRY_AFTER_S)
        return cls(code=exc.code, message=exc.message[:MAX_ERROR_MESSAGE_LEN], retry_after_s=hint)

    def to_exception(self) -> ShizaError:
        return error_from_code(self.code, self.message, self.retry_after_s)


Message = Union[InfoRequest, NodeInfo, OpenSession, SessionOpened, Step, StepResult, CloseSession, Closed,
                Countersign, Dispute, Error]
MESSAGE_TYPES: dict[str, type[_Message]] = {cls.TYPE: cls for cls in get_args(Message)}


def message_to_wire(msg: Message) -> dict[str, Any]:
    """The msgpack map of ``msg`` (tensors as memoryviews or bytes, not copied)."""
    if not isinstance(msg, _Message):
        raise TypeError(f"not a protocol message: {type(msg).__name__}")
    return msg.to_wire()


def encode_message(msg: Message) -> bytes:
    """A complete frame (length header + msgpack) carrying ``msg``."""
    return encode_frame(message_to_wire(msg))


def decode_message(obj: Any) -> Message:
    """Validate a decoded msgpack object and build its message.

    Raises UnsupportedVersion, UnknownMessageType, InvalidMessage, LimitExceeded or BadShape.
    """
    if not isinstance(obj, dict):
        raise InvalidMessage(f"a message must be a map, got {type(obj).__name__}")
    if "v" not in obj:
        raise InvalidMessage("message has no version field 'v'")
    version = obj["v"]
    if type(version) is not int:
        raise InvalidMessage("version field 'v' must be an integer")
    if version != PROTOCOL_VERSION:
        raise UnsupportedVersion(f"protocol version {version} is not supported; this node speaks {PROTOCOL_VERSION}")
    kind = obj.get("t")
    if type(kind) is not str:
        raise InvalidMessage("message has no type field 't' (a string)")
    cls = MESSAGE_TYPES.get(kind)
    if cls is None:
        raise UnknownMessageType(f"unknown message type {kind[:64]!r}")
    return cls.from_wire(obj)  # type: ignore[no-any-return]

# The messages of node-to-node flow (SPEC.md 9.6) are protocol/push.py's; it adds them to
# MESSAGE_TYPES when imported, which the package's __init__ does.
