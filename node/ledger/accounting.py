"""Receipts for the work of inference sessions, on both sides of a stream.

The server side (``ServerAccount``) counts what one session computed and issues cumulative,
server-signed receipts: at least every ``every_tokens`` tokens, at close, and for whatever was
done when the stream broke. The client side (``ClientAccount``) counts what it sent and
received, checks each receipt against that and countersigns, or disputes with the reason.
Both keep what they end with in their ledger (node/ledger.py). The formats and signed bytes are
in SPEC.md, section 16.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field

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

from node.ledger.store import DuplicateEntry, Ledger

log = logging.getLogger(__name__)

DEFAULT_RECEIPT_EVERY = 64  # tokens between two cumulative receipts of one session


def store(ledger: Ledger | None, receipt: Receipt, status: str, reason: str = "") -> None:
    """Append a receipt to the ledger (blocking: call from a worker thread)."""
    if ledger is None:
        return
    try:
        ledger.append(
            receipt_id=receipt.receipt_id, server=receipt.server, client=receipt.client,
            seq=receipt.seq, session_id=receipt.session_id, checkpoint=receipt.checkpoint,
            final=receipt.final, status=status, reason=reason,
            prefill_tokens=receipt.prefill_tokens, decode_tokens=receipt.decode_tokens,
            work_units=receipt.work_units, ended_at=receipt.ended_at, receipt=receipt.to_bytes(),
        )
    except DuplicateEntry as exc:
        log.warning("ledger refused receipt %s: %s", receipt.receipt_id, exc)


class SeqAllocator:
    """Per-(server, client) receipt sequence numbers, continuing from the ledger.

    A pair's first number is one more than the highest the ledger holds: ``prepare`` reads it
    in a worker thread (SQLite blocks), once per pair; ``allocate`` then only counts in memory,
    so issuing a receipt never blocks the event loop. Numbers of receipts issued but never
    stored (the process died first) are reused after a restart, as the ledger never saw them.
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
class ClientAccount:
    """The client's view of one hop's session: checks and countersigns its receipts."""

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

    def __post_init__(self) -> None:
        self.counts = _Counts(IoDigest(self.session_id))

    def record(self, step: Step, output: Tensor) -> None:
        self.counts.add(step, output)

    def judge(self, data: bytes) -> tuple[Receipt | None, bytes | None, str]:
        """(receipt, countersignature or None, dispute reason) for a receipt the server sent."""
        try:
            receipt = verify_receipt(Receipt.from_bytes(data))
        except ShizaError as exc:
            return None, None, f"invalid receipt: {exc}"
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
        except ShizaError as exc:
            self.receipts.append((receipt, "disputed", str(exc)))
            return receipt, None, str(exc)
        signed = countersign_receipt(self.identity, receipt)
        self.receipts.append((signed, "countersigned", ""))
        return signed, signed.client_sig, ""
