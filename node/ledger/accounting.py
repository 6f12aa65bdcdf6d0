"""Receipts for the work of inference sessions, on both sides of a stream.

The server side (``ServerAccount``) counts what one session computed and issues cumulative,
server-signed receipts: at least every ``every_tokens`` tokens, at close, and for whatever was
done when the stream broke. The client side (``ClientAccount``) counts what it sent and
received, checks each receipt against that (and against the receipts before it: seq and
checkpoint rising, price and start time unchanged, times possible) and countersigns, or
disputes with the reason. Both keep what they end with in their ledger (node/ledger/store.py):
the server stores each receipt before sending it (``store_issued``) and the client's answer
after (``store_verdict``); the client stores its verdict before sending it. The formats and
signed bytes are in SPEC.md, section 16.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

import trio

from protocol.codec import Tensor
from protocol.errors import ReceiptMismatch, ShizaError
from protocol.identity import Identity
from protocol.ids import DEFAULT_SWARM_ID
from protocol.messages import Step
from protocol.receipts import (
    IoDigest,
    Receipt,
    check_receipt,
    count_step_tokens,
    countersign_receipt,
    receipt_id_for,
    sign_receipt,
    verify_receipt,
)

from node.ledger.store import AWAITING_VERDICT, DuplicateEntry, Ledger, LedgerError

log = logging.getLogger(__name__)

DEFAULT_RECEIPT_EVERY = 64  # tokens between two cumulative receipts of one session
# How far a server's clock may be from the client's before its receipt times are impossible.
MAX_CLOCK_SKEW_S = 300.0
# A client's unpaid work (UnpaidWork) a server tolerates: 2 M work units is 66,000 tokens of
# a 30-layer model, several times what an honest client leaves behind when it crashes (at most
# its sessions' work since their last countersigned checkpoint).
DEFAULT_MAX_UNPAID_WORK_UNITS = 2_000_000


def record(ledger: Ledger | None, receipt: Receipt, status: str, reason: str = "") -> None:
    """Append ``receipt`` to the ledger as one entry (blocking: call from a worker thread).
    Raises DuplicateEntry when its id, seq or session checkpoint is already recorded, and
    LedgerError when it cannot be written."""
    if ledger is None:
        return
    ledger.append(
        receipt_id=receipt.receipt_id, server=receipt.server, client=receipt.client,
        seq=receipt.seq, session_id=receipt.session_id, checkpoint=receipt.checkpoint,
        final=receipt.final, status=status, reason=reason,
        prefill_tokens=receipt.prefill_tokens, decode_tokens=receipt.decode_tokens,
        work_units=receipt.work_units, ended_at=receipt.ended_at, receipt=receipt.to_bytes(),
    )


def store(ledger: Ledger | None, receipt: Receipt, status: str, reason: str = "") -> None:
    """``record``, logging (not raising) a receipt the ledger already holds."""
    try:
        record(ledger, receipt, status, reason)
    except DuplicateEntry as exc:
        log.warning("ledger refused receipt %s: %s", receipt.receipt_id, exc)


def store_issued(ledger: Ledger | None, receipt: Receipt, reason: str = AWAITING_VERDICT) -> None:
    """The server's entry of a receipt it is about to send (or keeps without sending): server
    only signed, until ``store_verdict``. Raises (``record``): a receipt that could not be
    stored must not be sent, or a restart could reuse its seq, and so its id, for another."""
    record(ledger, receipt, "server_only", reason)


def store_verdict(ledger: Ledger | None, receipt: Receipt, status: str, reason: str = "") -> None:
    """The client's answer to a receipt ``store_issued`` stored: ``receipt`` is the same one
    (countersigned when ``status`` is countersigned). Logged, not raised, when it cannot be
    recorded: the receipt then stays server only in the ledger."""
    if ledger is None:
        return
    try:
        ledger.record_verdict(receipt.receipt_id, status=status, reason=reason, receipt=receipt.to_bytes())
    except LedgerError as exc:
        log.error("cannot record the verdict %s of receipt %s: %s", status, receipt.receipt_id, exc)


async def seq_floor(ledger: Ledger | None, server: str, client: str) -> int:
    """The least seq ``client`` may accept from ``server`` in a session opened now: one more
    than the highest in ``client``'s ``ledger`` (1 without one), read in a worker thread
    (SQLite blocks). Read before the session's first Step, every receipt of that session was
    issued after every one the ledger holds, so it must number above them. Cancellation waits
    for the read in flight (milliseconds)."""
    if ledger is None:
        return 1
    return int(await trio.to_thread.run_sync(ledger.next_seq, server, client))


class SeqAllocator:
    """Per-(server, client) receipt sequence numbers, continuing from the ledger.

    A pair's first number is one more than the highest the ledger holds: ``prepare`` reads it
    in a worker thread (SQLite blocks), once per pair; ``allocate`` then only counts in memory,
    so issuing a receipt never blocks the event loop. The server stores every receipt before
    sending it (``store_issued``), so every number a client ever saw is in the ledger and
    survives a restart; a number allocated for a receipt that was never stored (killed before
    the store returned) was never sent, and its reuse after a restart is harmless.
    """

    def __init__(self, ledger: Ledger | None) -> None:
        self._ledger = ledger
        self._next: dict[tuple[str, str], int] = {}
        self._lock = threading.Lock()

    async def prepare(self, server: str, client: str) -> None:
        """Make ``allocate(server, client)`` ready: read the ledger off the trio thread unless
        this pair was read before. Cancellation waits for a read in flight (milliseconds) and
        then leaves the pair unprepared."""
        key = (server, client)
        with self._lock:
            if key in self._next:
                return
        first = 1
        if self._ledger is not None:
            first = await trio.to_thread.run_sync(self._ledger.next_seq, server, client)
        with self._lock:
            # Another session of the pair may have prepared (and allocated) meanwhile: keep its.
            self._next.setdefault(key, first)

    def allocate(self, server: str, client: str) -> int:
        """The pair's next number (memory only). ``RuntimeError`` if ``prepare`` was not awaited:
        reading the ledger here would block the caller's event loop."""
        with self._lock:
            key = (server, client)
            if key not in self._next:
                raise RuntimeError(f"receipt numbers of ({server}, {client}) not prepared; "
                                   "await SeqAllocator.prepare first")
            seq = self._next[key]
            self._next[key] = seq + 1
            return seq


@dataclass
class _Counts:
    digest: IoDigest
    prefill: int = 0
    decode: int = 0

    def add(self, step: Step, output: Tensor) -> None:
        prefill, decode = count_step_tokens(step)
        self.prefill += prefill
        self.decode += decode
        self.digest.update(step.to_wire(), output.to_wire())

    @property
    def tokens(self) -> int:
        return self.prefill + self.decode


@dataclass
class ServerAccount:
    """The server's view of one session; issues its receipts."""

    identity: Identity
    seqs: SeqAllocator
    model_id: str
    start: int
    end: int
    client: str
    session_id: str
    every_tokens: int = DEFAULT_RECEIPT_EVERY
    unit_price: float | None = None
    swarm_id: str = DEFAULT_SWARM_ID
    started_at: float = field(default_factory=time.time)
    counts: _Counts = field(init=False)
    checkpoint: int = 0
    tokens_receipted: int = 0
    final_issued: bool = False
    judged_work: int = 0  # the most work units of a receipt of this session with a verdict
    paid_work: int = 0  # the most work units of a countersigned receipt of this session

    def __post_init__(self) -> None:
        self.counts = _Counts(IoDigest(self.session_id))

    def record(self, step: Step, output: Tensor) -> None:
        self.counts.add(step, output)

    def checkpoint_due(self) -> bool:
        return self.counts.tokens - self.tokens_receipted >= self.every_tokens

    def unreceipted(self) -> bool:
        return self.counts.tokens > self.tokens_receipted

    def issue(self, *, final: bool) -> Receipt:
        server = self.identity.peer_id
        seq = self.seqs.allocate(server, self.client)
        c = self.counts
        receipt = Receipt(
            receipt_id=receipt_id_for(self.swarm_id, server, self.client, seq),
            swarm_id=self.swarm_id, model_id=self.model_id, start=self.start, end=self.end,
            server=server, client=self.client, session_id=self.session_id, seq=seq,
            checkpoint=self.checkpoint, final=final, prefill_tokens=c.prefill, decode_tokens=c.decode,
            work_units=c.tokens * (self.end - self.start), started_at=self.started_at,
            ended_at=time.time(), unit_price=self.unit_price, io_digest=c.digest.digest,
        )
        self.checkpoint += 1
        self.tokens_receipted = c.tokens
        self.final_issued = final
        return sign_receipt(self.identity, receipt)


@dataclass
class _SessionWork:
    """What ``UnpaidWork.judged`` keeps of a session (as a ServerAccount does)."""

    judged_work: int = 0
    paid_work: int = 0


class UnpaidWork:
    """Per client peer, on a server: work units that no countersigned receipt covers (its
    receipts disputed, or never countersigned: left, crashed, or a bad countersignature),
    less the work the peer has countersigned since. Receipts are cumulative, so a session's
    unpaid work is its largest judged receipt's work less its largest countersigned one's; a
    later countersigned checkpoint pays for the disputed ones before it. A restarted node
    rebuilds it from its ledger (``restored``). Pure bookkeeping: no I/O, no trio."""

    def __init__(self) -> None:
        self._by_peer: dict[str, int] = {}

    @classmethod
    def restored(cls, entries: Iterable[Any], server: str) -> "UnpaidWork":
        """The unpaid work of every client, from ``server``'s ledger entries in the order they
        were recorded (``Ledger.entries()``: each receipt as it stands). A receipt still
        awaiting its verdict (the node stopped before the client answered) counts as never
        countersigned, as it would have once the session ended."""
        work = cls()
        sessions: dict[tuple[str, str], _SessionWork] = {}
        for e in entries:
            if e.server != server:
                continue
            session = sessions.setdefault((e.client, e.session_id), _SessionWork())
            work.judged(e.client, session, e.work_units, paid=e.status == "countersigned")  # type: ignore[arg-type]
        return work

    def of(self, peer: str) -> int:
        return self._by_peer.get(peer, 0)

    def judged(self, peer: str, account: ServerAccount, work_units: int, *, paid: bool) -> int:
        """Account the verdict on a receipt of ``account``'s session with ``work_units``;
        returns ``peer``'s unpaid work after it."""
        unpaid = self.of(peer)
        if paid:
            unpaid = max(0, unpaid - max(0, work_units - account.paid_work))
            account.paid_work = max(account.paid_work, work_units)
        else:
            unpaid += max(0, work_units - max(account.judged_work, account.paid_work))
        account.judged_work = max(account.judged_work, work_units)
        if unpaid:
            self._by_peer[peer] = unpaid
        else:
            self._by_peer.pop(peer, None)  # keep the table to the peers that owe
        return unpaid


@dataclass
class ClientAccount:
    """The client's view of one hop's session: checks and countersigns its receipts.

    Besides the counts (``check_receipt``), each receipt must follow the session's earlier ones
    (``seq`` and ``checkpoint`` rising, nothing after the final one, ``unit_price`` and
    ``started_at`` unchanged, ``ended_at`` not going back), have possible times (``started_at``
    no earlier than ``opened_at`` and ``ended_at`` no later than now, both within
    ``MAX_CLOCK_SKEW_S``), and a ``seq`` of at least ``seq_floor``: one more than the highest
    this client's ledger holds from the server, read (``seq_floor()``) before the session's
    first Step (a server that reused a number after a restart is disputed, even by a later
    process of this client).
    """

    identity: Identity
    server: str
    model_id: str
    start: int
    end: int
    session_id: str
    counts: _Counts = field(init=False)
    receipts: list[tuple[Receipt, str, str]] = field(default_factory=list)  # (receipt, status, reason)
    swarm_id: str = DEFAULT_SWARM_ID  # receipts must name the swarm the client is in
    disputed_reason: str = ""  # set when a spot check caught this hop: its receipts are refused
    opened_at: float = field(default_factory=time.time)  # client clock, when the session opened
    seq_floor: int = 1  # the least seq a receipt of this session may have (``seq_floor()``)
    clock: Callable[[], float] = time.time
    _first: Receipt | None = field(default=None, init=False)  # the session's first verified receipt
    _last: Receipt | None = field(default=None, init=False)  # and its latest

    def __post_init__(self) -> None:
        self.counts = _Counts(IoDigest(self.session_id))

    def record(self, step: Step, output: Tensor) -> None:
        self.counts.add(step, output)

    def refuse(self, receipt: Receipt, reason: str) -> None:
        """Dispute ``receipt`` after ``judge`` countersigned it (its store was refused)."""
        self.receipts = [(r, "disputed", reason) if r.receipt_id == receipt.receipt_id else (r, st, why)
                         for r, st, why in self.receipts]

    def _check_order(self, receipt: Receipt) -> None:
        """ReceiptMismatch when ``receipt`` cannot follow the session's earlier receipts, or
        states impossible times (see the class docstring)."""
        first, last, skew = self._first, self._last, MAX_CLOCK_SKEW_S
        if receipt.seq < self.seq_floor:
            raise ReceiptMismatch(f"seq {receipt.seq} is not above the {self.seq_floor - 1} this "
                                  "client already holds from this server")
        if receipt.started_at > receipt.ended_at:
            raise ReceiptMismatch(f"started_at {receipt.started_at} is after ended_at {receipt.ended_at}")
        if receipt.started_at < self.opened_at - skew:
            raise ReceiptMismatch(f"started_at {receipt.started_at} is before the session opened "
                                  f"({self.opened_at:.3f}, allowing {skew:g} s of clock skew)")
        now = self.clock()
        if receipt.ended_at > now + skew:
            raise ReceiptMismatch(f"ended_at {receipt.ended_at} is in the future (now {now:.3f}, "
                                  f"allowing {skew:g} s of clock skew)")
        if last is None or first is None:
            return
        if last.final:
            raise ReceiptMismatch(f"a receipt after the final one (checkpoint {last.checkpoint})")
        if receipt.seq <= last.seq:
            raise ReceiptMismatch(f"seq {receipt.seq} is not above the session's previous {last.seq}")
        if receipt.checkpoint <= last.checkpoint:
            raise ReceiptMismatch(f"checkpoint {receipt.checkpoint} is not above the session's "
                                  f"previous {last.checkpoint}")
        if receipt.unit_price != first.unit_price:
            raise ReceiptMismatch(f"unit_price {receipt.unit_price} != the session's {first.unit_price}")
        if receipt.started_at != first.started_at:
            raise ReceiptMismatch(f"started_at {receipt.started_at} != the session's {first.started_at}")
        if receipt.ended_at < last.ended_at:
            raise ReceiptMismatch(f"ended_at {receipt.ended_at} is before the previous receipt's "
                                  f"{last.ended_at}")

    def judge(self, data: bytes) -> tuple[Receipt | None, bytes | None, str]:
        """(receipt, countersignature or None, dispute reason) for a receipt the server sent."""
        try:
            receipt = verify_receipt(Receipt.from_bytes(data))
        except ShizaError as exc:
            return None, None, f"invalid receipt: {exc}"
        if receipt.server != self.server or receipt.session_id != self.session_id:
            # Not this session's: it must not become the base the next receipts are held to.
            reason = f"receipt of {receipt.server!r:.60}, session {receipt.session_id!r:.60}: not this one"
            self.receipts.append((receipt, "disputed", reason))
            return receipt, None, reason
        try:
            if self.disputed_reason:
                raise ReceiptMismatch(self.disputed_reason)
            if receipt.swarm_id != self.swarm_id:
                raise ReceiptMismatch(f"receipt of swarm {receipt.swarm_id!r}, this is {self.swarm_id!r}")
            check_receipt(
                receipt, server=self.server, client=self.identity.peer_id, model_id=self.model_id,
                start=self.start, end=self.end, session_id=self.session_id,
                prefill_tokens=self.counts.prefill, decode_tokens=self.counts.decode,
                io_digest=self.counts.digest.digest,
            )
            self._check_order(receipt)
        except ShizaError as exc:
            self.receipts.append((receipt, "disputed", str(exc)))
            return receipt, None, str(exc)
        finally:
            # The server signed it: what later receipts of the session are held to, whatever
            # this one's verdict.
            if self._first is None:
                self._first = receipt
            if self._last is None or receipt.seq > self._last.seq:
                self._last = receipt
        signed = countersign_receipt(self.identity, receipt)
        self.receipts.append((signed, "countersigned", ""))
        return signed, signed.client_sig, ""
