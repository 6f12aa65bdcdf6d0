"""What a hop may answer to a step, checked before anything else sees it (issue 15).

The protocol (``StepResult``) only says an output is hidden states ``[B, T, H]`` in a float dtype
or token ids ``int64 [B]``. A hostile hop can send an output of the wrong width or batch, with
NaN or infinite values, or token ids no vocabulary has: the honest hop it is passed to then fails
on it and is the one blamed, while the liar's work is countersigned. So the client checks every
output against the session it belongs to (``check_output``), and a hop whose output fails is
failed over, backed off and its receipts refused (node/client/hops.py raises it as that hop's
PeerError).

What a session fixes:
  * a hop that ends before the model's last layer answers hidden states of the step's batch and
    length, ``(B, T, H)``, where H is the ``hidden_size`` its ``SessionOpened`` announced, in a
    float dtype that stays the same for the whole session (the one its ``SessionOpened`` said;
    from a node that does not say, the first output's);
  * the last hop answers ``int64 (B,)`` (a window step: ``(B, T)``, SPEC 9.7) token ids in
    ``[0, vocab_size)``, the smaller of the caller's (``SwarmClient.generate(vocab_size=...)``)
    and its ``SessionOpened``'s, else in ``[0, 2**31)``: records carry no vocabulary size, and
    no tokenizer has 2**31 entries;
  * every value of hidden states is finite.

Pure functions of ``protocol.codec.Tensor`` with the standard library only (the client has no
torch): a float32 output is scanned as an ``array``, half precisions are widened first.
"""

from __future__ import annotations

import math
import struct
from array import array

from protocol.codec import FLOAT_DTYPES, Tensor
from protocol.errors import BadShape, InvalidMessage

__all__ = ["MAX_TOKEN_ID", "all_finite", "check_output", "float_values"]

MAX_TOKEN_ID = 1 << 31  # token ids lie below this whatever the model, when its vocabulary is unknown


def float_values(t: Tensor) -> array:
    """The values of a float tensor as an ``array('f')`` (bfloat16 and float16 widened; both
    are exact in float32). TypeError for another dtype."""
    data = bytes(t.data)
    out = array("f")
    if t.dtype == "float32":
        out.frombytes(data)
    elif t.dtype == "bfloat16":  # the upper half of a float32: put two zero bytes below each
        wide = bytearray(2 * len(data))
        wide[2::4] = data[0::2]
        wide[3::4] = data[1::2]
        out.frombytes(bytes(wide))
    elif t.dtype == "float16":
        out.fromlist(list(struct.unpack(f"<{len(data) // 2}e", data)))
    else:
        raise TypeError(f"not a float dtype: {t.dtype}")
    return out


def all_finite(t: Tensor) -> bool:
    """No NaN and no infinity among the values (always True for integer tensors)."""
    if t.dtype not in FLOAT_DTYPES:
        return True
    # A sum in double precision is finite exactly when every float32 term is: NaN and
    # infinities propagate (inf - inf is NaN or, in fsum, a ValueError), and 2**24 terms of at
    # most 3.4e38 stay far below the double range.
    try:
        return math.isfinite(math.fsum(float_values(t)))
    except (ValueError, OverflowError):
        return False


def check_output(out: Tensor, *, batch: int, length: int, hidden_size: int, last: bool | None,
                 dtype: str | None = None, vocab_size: int | None = None, window: bool = False) -> None:
    """Raise BadShape or InvalidMessage when ``out`` cannot be the answer to a step of ``batch``
    rows of ``length`` new tokens on this session. ``last``: whether the hop ends at the model's
    last layer (None: unknown, either form is accepted); ``dtype``: the float dtype the
    session's earlier outputs had (None: this is its first); ``window``: a window step (SPEC
    9.7), whose last hop answers a token per position, int64 [B, T]."""
    tokens = out.dtype == "int64"
    if last is not None and tokens != last:
        want = "token ids int64 [B]" if last else "hidden states [B, T, H]"
        raise BadShape(f"a hop {'ending' if last else 'not ending'} at the last layer answers {want}, "
                       f"got {out.dtype} {list(out.shape)}")
    if tokens:
        want = (batch, length) if window else (batch,)
        if tuple(out.shape) != want:
            raise BadShape(f"token ids must be int64 {list(want)}, got {list(out.shape)}")
        bound = vocab_size if vocab_size is not None else MAX_TOKEN_ID
        ids = struct.unpack(f"<{math.prod(want)}q", bytes(out.data))
        if any(not 0 <= t < bound for t in ids):
            raise InvalidMessage(f"token ids must lie in [0, {bound}), got {list(ids)[:8]}")
        return
    if out.dtype not in FLOAT_DTYPES:
        raise BadShape(f"hidden states must be in a float dtype, got {out.dtype}")
    if tuple(out.shape) != (batch, length, hidden_size):
        raise BadShape(f"hidden states must be [{batch}, {length}, {hidden_size}] "
                       f"(the session's batch, the step's length, its hidden size), got {list(out.shape)}")
    if dtype is not None and out.dtype != dtype:
        raise BadShape(f"hidden states changed dtype within the session: {dtype}, then {out.dtype}")
    if not all_finite(out):
        raise InvalidMessage("hidden states contain NaN or infinite values")
