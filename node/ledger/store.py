"""The durable receipt ledger: an append-only, hash-chained SQLite file.

Every receipt this node issues or countersigns is appended here as one entry: the receipt's
canonical bytes (opaque to the ledger) plus the columns settlement queries by, which the caller
passes explicitly. A server stores each receipt before it sends it, as ``server_only`` (reason
``AWAITING_VERDICT``); the client's answer is then appended as a second, *verdict* entry of the
same receipt (:meth:`Ledger.record_verdict`: countersigned, disputed or server_only, with the
countersigned bytes or the reason). Nothing is ever updated in place: a receipt has at most two
entries, and readers (:meth:`Ledger.entries`, :meth:`Ledger.get`) see each receipt once, as its
verdict entry when there is one (:meth:`Ledger.history` gives both). Each entry's ``entry_hash`` covers the previous entry's hash and every field
of the entry, and a one-row ``head`` table holds the count and hash of the last entry, updated in
the same transaction as the append. Together they make any edit, any deleted row and a cut-off
tail detectable by :meth:`Ledger.verify_chain`.

Keyed to its owner: the head row also holds an Ed25519 signature by the ledger owner's identity
over (count, head hash), so someone who can write the file but lacks the key cannot edit an entry
and recompute the chain (the head signature no longer verifies). :meth:`Ledger.open` takes the
owner's Identity (read-write) or its public key / peer id (read-only, still verified).

The head file (``<ledger>.head``, :func:`head_file_of`): after each commit the signed head is
also written, atomically and fsynced, to a small file beside the database. Committed entries
can live only in the ``-wal`` file until SQLite checkpoints them, so a database copied (or
restored) without its WAL opens as a shorter, self-consistent chain; the head file records how
long the chain was and reports it. A head file behind the database by some entries is normal
(killed between the commit and the write) and is brought up to date at open; one ahead of the
database, one whose hash is not the database's entry at its count, or a missing one while the
database has entries, is LedgerCorrupt. A complete earlier copy of both (a whole-directory
rollback) cannot be told from a shorter ledger locally: a counterparty's countersigned receipts
are what show it. One process writes a ledger at a time (the node or the agent owning it).

Errors::

    LedgerError          anything the ledger refuses or cannot do (closed, I/O, bad argument
     |                   values raise ValueError / TypeError instead)
     +-- LedgerCorrupt   the file is not a ledger we can trust: not SQLite, unknown schema
     |                   version, a chain that is broken, edited or truncated (says which entry),
     |                   a head not signed by the owner, or a missing or mismatched WAL / head file
     +-- DuplicateEntry  the receipt_id, (server, client, seq) or (server, client, session_id,
                         checkpoint) is already recorded, or the receipt already has a verdict

Durability and interruption: the file is in WAL mode with ``synchronous=FULL`` and each append is
one ``BEGIN IMMEDIATE ... COMMIT``, so when :meth:`Ledger.append` returns the entry is on disk.
If the process is killed (SIGKILL, power loss) mid-append, the entry is simply absent and the
file opens as it was; a KeyboardInterrupt inside append lands either before the commit (rolled
back) or after it (recorded; check with :meth:`Ledger.get`), and the ledger stays usable.
The methods block on disk I/O: call them from a worker thread (``trio.to_thread.run_sync``);
cancelling the waiting task lets the thread finish, so an append either completes or never
started. One connection is shared by all threads behind a lock.
"""

from __future__ import annotations

import hashlib
import logging
import math
import sqlite3
import struct
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from types import TracebackType
from typing import Any

from protocol.identity import Identity

from node.ledger.errors import DuplicateEntry, LedgerCorrupt, LedgerError
from node.ledger.head import (
    GENESIS_HASH,
    Owner,
    check_head_file,
    head_file_of,
    head_signed_by,
    owner_key,
    read_head_file,
    sign_head,
    write_head_file,
)

__all__ = [
    "GENESIS_HASH",
    "DuplicateEntry",
    "Ledger",
    "LedgerCorrupt",
    "LedgerEntry",
    "LedgerError",
    "AWAITING_VERDICT",
    "SCHEMA_VERSION",
    "STATUSES",
    "entry_hash_of",
    "head_file_of",
]

log = logging.getLogger(__name__)

# 2: signed head, head file, index by session checkpoint; 3: verdict entries (1 and 2 are upgraded)
SCHEMA_VERSION = 3
STATUSES = frozenset({"countersigned", "server_only", "disputed"})
# The reason of a receipt a server stored before sending it, until its verdict entry says more.
AWAITING_VERDICT = "awaiting countersignature"

# Domain separation: an entry hash can never be mistaken for a hash of anything else we sign,
# and a verdict entry's never for a receipt entry's.
_HASH_DOMAIN = b"shiza-ledger-entry/v1\x00"
_VERDICT_HASH_DOMAIN = b"shiza-ledger-verdict/v1\x00"
_MAX_INT = 2**63 - 1  # SQLite INTEGER is a signed 64-bit value

_SCHEMA = """
CREATE TABLE entries (
    idx            INTEGER PRIMARY KEY,
    receipt_id     TEXT    NOT NULL,
    server         TEXT    NOT NULL,
    client         TEXT    NOT NULL,
    seq            INTEGER NOT NULL,
    session_id     TEXT    NOT NULL,
    checkpoint     INTEGER NOT NULL,
    final          INTEGER NOT NULL,
    status         TEXT    NOT NULL,
    reason         TEXT    NOT NULL,
    prefill_tokens INTEGER NOT NULL,
    decode_tokens  INTEGER NOT NULL,
    work_units     INTEGER NOT NULL,
    ended_at       REAL    NOT NULL,
    receipt        BLOB    NOT NULL,
    recorded_at    REAL    NOT NULL,
    prev_hash      BLOB    NOT NULL,
    entry_hash     BLOB    NOT NULL,
    verdict        INTEGER NOT NULL DEFAULT 0 CHECK (verdict IN (0, 1))
) STRICT;
CREATE UNIQUE INDEX entries_receipt ON entries (receipt_id) WHERE verdict = 0;
CREATE UNIQUE INDEX entries_seq ON entries (server, client, seq) WHERE verdict = 0;
CREATE UNIQUE INDEX entries_verdict ON entries (receipt_id) WHERE verdict = 1;
CREATE INDEX entries_by_receipt ON entries (receipt_id);
CREATE INDEX entries_by_client ON entries (client);
CREATE INDEX entries_by_session ON entries (server, client, session_id, checkpoint);
CREATE TABLE head (
    one   INTEGER PRIMARY KEY CHECK (one = 1),
    count INTEGER NOT NULL,
    hash  BLOB    NOT NULL,
    sig   BLOB    NOT NULL DEFAULT x''
) STRICT;
INSERT INTO head (one, count, hash) VALUES (1, 0, zeroblob(32));
"""
# Version 1 had no head signature and no session index; the chain itself is unchanged.
_UPGRADE_FROM_1 = (
    "ALTER TABLE head ADD COLUMN sig BLOB NOT NULL DEFAULT x''",
    "CREATE INDEX IF NOT EXISTS entries_by_session ON entries (server, client, session_id, checkpoint)",
)

# Version 2 kept one entry per receipt with UNIQUE table constraints; version 3 allows one
# verdict entry more per receipt, so the table is rebuilt (same rows, hashes and head; each an
# original entry), its uniqueness moved to partial indexes.
_UPGRADE_FROM_2 = (
    "ALTER TABLE entries RENAME TO entries_v2",
    *[stmt for stmt in _SCHEMA.split(";") if "entries" in stmt and "head" not in stmt],
)

_COLUMNS = (
    "idx, receipt_id, server, client, seq, session_id, checkpoint, final, status, reason, "
    "prefill_tokens, decode_tokens, work_units, ended_at, receipt, recorded_at, prev_hash, "
    "entry_hash, verdict"
)
_V2_COLUMNS = _COLUMNS.removesuffix(", verdict")
# The entry each receipt reads as: its verdict entry, else its only one.
_CURRENT = ("(verdict = 1 OR NOT EXISTS (SELECT 1 FROM entries AS v "
            "WHERE v.receipt_id = entries.receipt_id AND v.verdict = 1))")


LEDGER_FILE = "ledger.sqlite"  # in a node's or an agent's data directory


@dataclass(frozen=True)
class LedgerEntry:
    index: int  # 1-based position in the chain
    receipt_id: str
    server: str
    client: str
    seq: int
    session_id: str
    checkpoint: int
    final: bool
    status: str  # one of STATUSES
    reason: str  # why disputed ("" otherwise)
    prefill_tokens: int
    decode_tokens: int
    work_units: int
    ended_at: float
    receipt: bytes  # the receipt's canonical bytes, signatures included
    recorded_at: float
    prev_hash: bytes  # entry_hash of the previous entry (32 zero bytes for the first)
    entry_hash: bytes  # entry_hash_of(...) over prev_hash and every other field
    verdict: bool = False  # the client's answer to a receipt recorded before (record_verdict)


def entry_hash_of(e: LedgerEntry) -> bytes:
    """sha256(domain || prev_hash || every other field in declaration order), each field encoded
    unambiguously: ints as 8-byte big-endian signed, floats as 8-byte big-endian IEEE 754,
    bools as one byte, text (UTF-8) and bytes with a 4-byte big-endian length prefix. A verdict
    entry hashes the same fields under another domain (so the flag is covered too)."""
    h = hashlib.sha256(_VERDICT_HASH_DOMAIN if e.verdict else _HASH_DOMAIN)
    h.update(e.prev_hash)
    h.update(struct.pack(">q", e.index))
    for text in (e.receipt_id, e.server, e.client):
        _update_bytes(h, text.encode())
    h.update(struct.pack(">q", e.seq))
    _update_bytes(h, e.session_id.encode())
    h.update(struct.pack(">q?", e.checkpoint, e.final))
    _update_bytes(h, e.status.encode())
    _update_bytes(h, e.reason.encode())
    h.update(struct.pack(">qqqd", e.prefill_tokens, e.decode_tokens, e.work_units, e.ended_at))
    _update_bytes(h, e.receipt)
    h.update(struct.pack(">d", e.recorded_at))
    return h.digest()


def _update_bytes(h: Any, b: bytes) -> None:
    h.update(struct.pack(">I", len(b)))
    h.update(b)


class Ledger:
    """An open ledger file. Use :meth:`open`; close it (or use ``with``) when done."""

    def __init__(self, conn: sqlite3.Connection, path: Path, owner: Owner) -> None:
        self._conn: sqlite3.Connection | None = conn
        self._path = path
        self._lock = threading.Lock()
        self._identity, self._public_key = owner_key(owner)

    @property
    def path(self) -> Path:
        return self._path

    # -- lifecycle -------------------------------------------------------------------------

    @classmethod
    def open(cls, path: str | Path, owner: Owner, *, verify: bool = True) -> Ledger:
        """Open the ledger of ``owner`` at ``path``, creating it (and its directory) if missing.

        ``owner`` is the owner's Identity (to append: each new head is signed with it), or its
        public key or peer id (read-only: the head is checked, append raises LedgerError).
        Raises LedgerCorrupt if the file is not SQLite, holds another schema or version, or
        (with ``verify``) its chain, its head signature or its head file does not check out
        (see the module's doc); the file is never modified in that case. ``verify=False`` is
        for inspecting a damaged file; do not append to one opened so.
        """
        path = Path(path)
        identity, public_key = owner_key(owner)
        if identity is None and not path.exists():
            raise LedgerError(f"no ledger at {path} (creating one needs the owner's identity)")
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        except sqlite3.Error as e:
            raise LedgerError(f"cannot open ledger {path}: {e}") from e
        try:
            _prepare(conn, path, identity, public_key if verify else None)
            ledger = cls(conn, path, owner)
            if verify:
                ledger._verify(update_head_file=True)
            return ledger
        except BaseException:
            conn.close()
            raise

    def close(self) -> None:
        """Close the file (checkpointing the WAL). Idempotent."""
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None

    def __enter__(self) -> Ledger:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # -- writing ---------------------------------------------------------------------------

    def append(
        self,
        *,
        receipt_id: str,
        server: str,
        client: str,
        seq: int,
        session_id: str,
        checkpoint: int,
        final: bool,
        status: str,
        reason: str,
        prefill_tokens: int,
        decode_tokens: int,
        work_units: int,
        ended_at: float,
        receipt: bytes,
    ) -> LedgerEntry:
        """Append one entry in one transaction; it is durable when this returns.

        Raises DuplicateEntry (nothing written) if ``receipt_id`` or ``(server, client, seq)``
        is already recorded. ``reason`` says why a disputed entry is disputed ("" otherwise; not
        enforced). Raises ValueError/TypeError (nothing written) for a status outside STATUSES,
        empty ids, or integers outside 0..2**63-1 (SQLite's INTEGER is signed 64-bit, so the
        top half of a receipt's uint64 range cannot be stored).
        ``next_seq`` followed by ``append`` is not atomic: concurrent writers for one pair may
        see DuplicateEntry and should take a fresh ``next_seq``.
        """
        for name, text in (("receipt_id", receipt_id), ("server", server), ("client", client),
                           ("session_id", session_id)):
            _check_text(name, text, nonempty=True)
        _check_text("status", status)
        _check_text("reason", reason)
        if status not in STATUSES:
            raise ValueError(f"status must be one of {sorted(STATUSES)}, not {status!r}")
        for name, n in (("seq", seq), ("checkpoint", checkpoint),
                        ("prefill_tokens", prefill_tokens),
                        ("decode_tokens", decode_tokens), ("work_units", work_units)):
            _check_int(name, n, minimum=0)
        if not isinstance(final, bool):
            raise TypeError(f"final must be a bool, not {type(final).__name__}")
        if not isinstance(receipt, (bytes, bytearray, memoryview)):
            raise TypeError(f"receipt must be bytes, not {type(receipt).__name__}")
        # + 0.0 turns -0.0 into 0.0: SQLite stores integral REALs as integers, losing the sign,
        # which would make the stored entry hash differently from the one we computed.
        ended = _finite("ended_at", ended_at) + 0.0
        self._check_writable()

        with self._lock:
            conn = self._open_conn()
            try:
                conn.execute("BEGIN IMMEDIATE")
                clash = conn.execute(
                    # verdict = 0 in each term: the partial unique indexes answer it.
                    "SELECT idx, receipt_id, seq FROM entries WHERE (receipt_id = ? AND verdict = 0) "
                    "OR (server = ? AND client = ? AND seq = ? AND verdict = 0) "
                    "OR (server = ? AND client = ? AND session_id = ? AND checkpoint = ?) LIMIT 1",
                    (receipt_id, server, client, seq, server, client, session_id, checkpoint),
                ).fetchone()
                if clash is not None:
                    if clash[1] == receipt_id:
                        what = f"receipt_id {receipt_id!r}"
                    elif clash[2] == seq:
                        what = f"seq {seq} for server {server!r} and client {client!r}"
                    else:
                        what = (f"checkpoint {checkpoint} of session {session_id!r} for server "
                                f"{server!r} and client {client!r}")
                    raise DuplicateEntry(f"{what} is already recorded as entry {clash[0]}")
                entry = LedgerEntry(
                    index=0, receipt_id=receipt_id, server=server, client=client,
                    seq=seq, session_id=session_id, checkpoint=checkpoint, final=final,
                    status=status, reason=reason, prefill_tokens=prefill_tokens,
                    decode_tokens=decode_tokens, work_units=work_units, ended_at=ended,
                    receipt=bytes(receipt), recorded_at=0.0, prev_hash=b"", entry_hash=b"",
                )
                return self._insert(conn, entry)
            except BaseException as e:
                err = self._rolled_back(conn, e, "append to")
                if err is e:
                    raise
                raise err from e

    def record_verdict(self, receipt_id: str, *, status: str, reason: str,
                       receipt: bytes) -> LedgerEntry:
        """Append the verdict of a receipt stored before (its client's answer), in one
        transaction; durable when this returns. From then on the receipt reads as ``status``,
        ``reason`` and ``receipt`` (e.g. the countersigned bytes); every other column is the
        original entry's. Only a receipt whose one entry is ``server_only`` takes a verdict,
        once: LedgerError if ``receipt_id`` is not recorded, DuplicateEntry (nothing written) if
        it already has a verdict or was recorded with another status. The ledger does not look
        inside ``receipt``: the caller passes the same receipt (differing at most in signatures).
        """
        _check_text("receipt_id", receipt_id, nonempty=True)
        _check_text("reason", reason)
        if status not in STATUSES:
            raise ValueError(f"status must be one of {sorted(STATUSES)}, not {status!r}")
        if not isinstance(receipt, (bytes, bytearray, memoryview)):
            raise TypeError(f"receipt must be bytes, not {type(receipt).__name__}")
        self._check_writable()
        with self._lock:
            conn = self._open_conn()
            try:
                conn.execute("BEGIN IMMEDIATE")
                rows = conn.execute(f"SELECT {_COLUMNS} FROM entries WHERE receipt_id = ? ORDER BY idx",
                                    (receipt_id,)).fetchall()
                if not rows:
                    raise LedgerError(f"receipt {receipt_id!r} is not recorded: no verdict to add")
                first = _from_row(rows[0], self._path)
                if len(rows) > 1:
                    raise DuplicateEntry(f"receipt {receipt_id!r} already has a verdict "
                                         f"(entry {rows[-1][0]})")
                if first.status != "server_only":
                    raise DuplicateEntry(f"receipt {receipt_id!r} was recorded {first.status} "
                                         f"(entry {first.index}): it takes no verdict")
                entry = replace(first, index=0, status=status, reason=reason, receipt=bytes(receipt),
                                recorded_at=0.0, prev_hash=b"", entry_hash=b"", verdict=True)
                return self._insert(conn, entry)
            except BaseException as e:
                err = self._rolled_back(conn, e, "record a verdict in")
                if err is e:
                    raise
                raise err from e

    def _check_writable(self) -> None:
        if self._identity is None:
            raise LedgerError(f"ledger {self._path} is opened read-only (with the owner's public "
                              "key, not its identity): cannot sign a new head")

    def _insert(self, conn: sqlite3.Connection, entry: LedgerEntry) -> LedgerEntry:
        """Chain ``entry`` after the head, insert it, sign the new head, commit (inside the
        caller's BEGIN IMMEDIATE and lock), then write the head file."""
        assert self._identity is not None
        row = conn.execute("SELECT count, hash FROM head WHERE one = 1").fetchone()
        if row is None:
            raise LedgerCorrupt("the head row is missing")
        count, prev = row
        entry = _replace_hash(replace(entry, index=count + 1, prev_hash=prev,
                                      recorded_at=time.time() + 0.0))
        conn.execute(f"INSERT INTO entries ({_COLUMNS}) VALUES ({', '.join('?' * 19)})", _to_row(entry))
        sig = sign_head(self._identity, entry.index, entry.entry_hash)
        conn.execute("UPDATE head SET count = ?, hash = ?, sig = ? WHERE one = 1",
                     (entry.index, entry.entry_hash, sig))
        conn.execute("COMMIT")
        # After the commit, never before: a head file ahead of the database would read as
        # lost entries. A kill here leaves it one entry behind, which open() repairs.
        self._write_head_file(entry.index, entry.entry_hash, sig)
        return entry

    def _rolled_back(self, conn: sqlite3.Connection, e: BaseException, doing: str) -> BaseException:
        # Also on KeyboardInterrupt: a transaction left open would wedge every later write on
        # this connection.
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        if isinstance(e, sqlite3.IntegrityError):
            return DuplicateEntry(str(e))
        if isinstance(e, sqlite3.Error):
            return _convert(e, f"cannot {doing} {self._path}")
        return e

    # -- reading ---------------------------------------------------------------------------

    def entries(
        self,
        *,
        counterparty: str | None = None,
        until: float | None = None,
        status: str | None = None,
    ) -> list[LedgerEntry]:
        """Each receipt once, as it now stands (its verdict entry if it has one, else its only
        entry), in the order the receipts were first recorded; optionally only those whose
        server or client is ``counterparty``, that ended at or before ``until``
        (``ended_at <= until``), or whose status now is ``status``. Each returned entry's hash
        is checked against its contents."""
        where: list[str] = [_CURRENT]
        args: list[Any] = []
        if counterparty is not None:
            where.append("(server = ? OR client = ?)")
            args += [counterparty, counterparty]
        if until is not None:
            where.append("ended_at <= ?")
            args.append(float(until))
        if status is not None:
            if status not in STATUSES:
                raise ValueError(f"status must be one of {sorted(STATUSES)}, not {status!r}")
            where.append("status = ?")
            args.append(status)
        sql = f"SELECT {_COLUMNS} FROM entries WHERE " + " AND ".join(where)
        first = ("(SELECT MIN(f.idx) FROM entries AS f WHERE f.receipt_id = entries.receipt_id "
                 "AND f.verdict = 0)")
        return self._query(sql + f" ORDER BY {first}", args)

    def get(self, receipt_id: str) -> LedgerEntry | None:
        """The receipt ``receipt_id`` as it now stands (its verdict entry if any), or None."""
        found = self.history(receipt_id)
        return found[-1] if found else None

    def history(self, receipt_id: str) -> list[LedgerEntry]:
        """Every entry of ``receipt_id`` in chain order: the receipt, then its verdict if any."""
        return self._query(f"SELECT {_COLUMNS} FROM entries WHERE receipt_id = ? ORDER BY idx",
                           [receipt_id])

    def next_seq(self, server: str, client: str) -> int:
        """One more than the highest seq recorded for (server, client); 1 if there is none."""
        with self._lock:
            conn = self._open_conn()
            try:
                (n,) = conn.execute(
                    "SELECT COALESCE(MAX(seq), 0) + 1 FROM entries "
                    "WHERE server = ? AND client = ? AND verdict = 0",
                    (server, client),
                ).fetchone()
            except sqlite3.Error as e:
                raise _convert(e, f"cannot read {self._path}") from e
        return int(n)

    def head(self) -> tuple[int, bytes]:
        """(number of entries, hash of the last entry); (0, 32 zero bytes) when empty."""
        with self._lock:
            conn = self._open_conn()
            try:
                row = conn.execute("SELECT count, hash FROM head WHERE one = 1").fetchone()
            except sqlite3.Error as e:
                raise _convert(e, f"cannot read {self._path}") from e
        if row is None:
            raise LedgerCorrupt(f"{self._path}: the head row is missing")
        return int(row[0]), bytes(row[1])

    def verify_chain(self) -> int:
        """Check every entry's hash and link, that the chain ends where the head row says, that
        the owner signed that head, and that the head file agrees (module doc).

        Returns the number of entries; raises LedgerCorrupt naming the first problem.
        """
        return self._verify(update_head_file=False)

    def _verify(self, *, update_head_file: bool) -> int:
        # The head file first: it is written after each commit, so the database read next
        # (in its own snapshot) is at least as long as it, even with a writer running.
        recorded = read_head_file(self._path, self._public_key)
        with self._lock:
            conn = self._open_conn()
            try:
                # One read transaction, so a concurrent writer (another process) cannot make
                # the chain and the head disagree under us.
                conn.execute("BEGIN")
                try:
                    count, last = _verify_rows(
                        conn.execute(f"SELECT {_COLUMNS} FROM entries ORDER BY idx"), self._path)
                    head = conn.execute("SELECT count, hash, sig FROM head").fetchall()
                    at_recorded = None
                    if recorded is not None and 0 < recorded[0] <= count:
                        at_recorded = conn.execute("SELECT entry_hash FROM entries WHERE idx = ?",
                                                   (recorded[0],)).fetchone()[0]
                finally:
                    conn.execute("COMMIT")
            except sqlite3.Error as e:
                raise _convert(e, f"cannot read {self._path}") from e
        where = self._path
        if (len(head) != 1 or not isinstance(head[0][0], int)
                or not isinstance(head[0][1], bytes) or not isinstance(head[0][2], bytes)):
            raise LedgerCorrupt(f"{where}: the head row is missing or malformed")
        head_count, head_hash, head_sig = head[0]
        if head_count > count:
            raise LedgerCorrupt(
                f"{where}: truncated: entries {count + 1}..{head_count} are missing "
                f"(the head records {head_count} entries, the chain has {count})")
        if head_count < count:
            raise LedgerCorrupt(
                f"{where}: entry {head_count + 1} onward is not covered by the head "
                f"(the head records {head_count} entries, the chain has {count})")
        if head_hash != last:
            raise LedgerCorrupt(f"{where}: entry {count} does not match the head hash")
        if count and not head_signed_by(self._public_key, count, last, head_sig):
            raise LedgerCorrupt(
                f"{where}: the head signature does not verify with the owner's key: edited "
                "without the owner's key, or not this identity's ledger")
        check_head_file(where, recorded, count, at_recorded)
        if update_head_file and self._identity is not None and (
                recorded is None or recorded[0] < count):
            self._write_head_file(count, last, sign_head(self._identity, count, last))
        return count

    def _write_head_file(self, count: int, head_hash: bytes, sig: bytes) -> None:
        try:
            write_head_file(self._path, count, head_hash, sig)
        except OSError as e:
            # The entry is committed; the head file only lags, which the next open repairs.
            log.warning("cannot write the head file of %s: %s", self._path, e)

    # -- internals -------------------------------------------------------------------------

    def _open_conn(self) -> sqlite3.Connection:
        if self._conn is None:
            raise LedgerError(f"ledger {self._path} is closed")
        return self._conn

    def _query(self, sql: str, args: Iterable[Any]) -> list[LedgerEntry]:
        with self._lock:
            conn = self._open_conn()
            try:
                rows = conn.execute(sql, tuple(args)).fetchall()
            except sqlite3.Error as e:
                raise _convert(e, f"cannot read {self._path}") from e
        out = []
        for row in rows:
            entry = _from_row(row, self._path)
            if entry_hash_of(entry) != entry.entry_hash:
                raise LedgerCorrupt(f"{self._path}: entry {entry.index} does not match its hash")
            out.append(entry)
        return out


def _prepare(conn: sqlite3.Connection, path: Path, identity: Identity | None,
             check_key: bytes | None) -> None:
    """Check the file is our schema (creating it in an empty file, upgrading version 1 with
    ``identity``, version 2 after checking its chain and head against ``check_key`` unless
    None), then switch to WAL. Nothing is written to a file that turns out not to be ours."""
    try:
        conn.execute("PRAGMA busy_timeout = 10000")
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        tables = conn.execute("SELECT count(*) FROM sqlite_master").fetchone()[0]
        if version == 0 and tables == 0:
            # A fresh file. The schema and its version are one transaction, so a kill here
            # leaves an empty (valid) file. It is created in the default rollback-journal mode,
            # so it lands in the database file itself, never only in a -wal: a copy of the
            # file taken at any later moment holds the schema and so is known to be a ledger
            # whose head file must be there (WAL mode is switched on after).
            conn.execute("BEGIN IMMEDIATE")
            try:
                # Another process may have created it while we waited for the write lock.
                if conn.execute("SELECT count(*) FROM sqlite_master").fetchone()[0] == 0:
                    if identity is None:
                        raise LedgerError(f"{path} is empty; creating a ledger needs the owner's "
                                          "identity")
                    recorded = read_head_file(path, identity.public_key)
                    if recorded is not None and recorded[0]:
                        raise LedgerCorrupt(
                            f"{path}: the database is empty but its head file records "
                            f"{recorded[0]} entries: entries 1..{recorded[0]} are missing")
                    for stmt in _SCHEMA.split(";"):
                        if stmt.strip():
                            conn.execute(stmt)
                    conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
                    # Before the commit: from its first moment, a ledger without its head file
                    # is one whose entries may be elsewhere (in a -wal left behind). A kill
                    # before the commit leaves an empty file and an empty head: both fine.
                    write_head_file(path, 0, GENESIS_HASH, sign_head(identity, 0, GENESIS_HASH))
                conn.execute("COMMIT")
            except BaseException:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise
            version = conn.execute("PRAGMA user_version").fetchone()[0]
        if version == 1:
            _upgrade_from_1(conn, path, identity)
            version = conn.execute("PRAGMA user_version").fetchone()[0]
        if version == 2:
            _upgrade_from_2(conn, path, check_key)
            version = conn.execute("PRAGMA user_version").fetchone()[0]
        if version != SCHEMA_VERSION:
            what = "not a ledger" if version == 0 else f"ledger schema version {version}"
            raise LedgerCorrupt(
                f"{path}: {what}; this node reads version {SCHEMA_VERSION} only")
        _set_wal(conn, path)
        conn.execute("PRAGMA synchronous = FULL")
    except sqlite3.Error as e:
        raise _convert(e, f"cannot open ledger {path}") from e


def _upgrade_from_1(conn: sqlite3.Connection, path: Path, identity: Identity | None) -> None:
    """Sign the head of a version 1 ledger (whose chain must check out: trusted on this first
    use), write its head file, add the session index, and mark it version 2, in one
    transaction. The head file is written before the commit: a kill in between leaves a
    version 1 file and a head file that the retried upgrade overwrites."""
    if identity is None:
        raise LedgerError(f"{path}: a version 1 ledger is upgraded on first open, which needs "
                          "the owner's identity (not only its public key)")
    _set_wal(conn, path)
    conn.execute("BEGIN IMMEDIATE")
    try:
        if conn.execute("PRAGMA user_version").fetchone()[0] == 1:
            count, last = _verify_rows(
                (row + (0,) for row in conn.execute(f"SELECT {_V2_COLUMNS} FROM entries ORDER BY idx")),
                path)
            if conn.execute("SELECT count, hash FROM head").fetchall() != [(count, last)]:
                raise LedgerCorrupt(f"{path}: version 1 ledger whose head does not match its chain")
            for stmt in _UPGRADE_FROM_1:
                conn.execute(stmt)
            sig = sign_head(identity, count, last)
            conn.execute("UPDATE head SET sig = ?", (sig,))
            conn.execute("PRAGMA user_version = 2")
            write_head_file(path, count, last, sig)
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise


def _upgrade_from_2(conn: sqlite3.Connection, path: Path, check_key: bytes | None) -> None:
    """Rebuild the entries table of a version 2 ledger as version 3's (module doc), in one
    transaction: the same rows, hashes and signed head, so no signing is needed and a reader
    opening it with the owner's public key upgrades it too. With ``check_key`` the chain and the
    head signature are checked first (LedgerCorrupt, the file untouched). A kill leaves
    version 2."""
    _set_wal(conn, path)
    conn.execute("BEGIN IMMEDIATE")
    try:
        if conn.execute("PRAGMA user_version").fetchone()[0] == 2:
            if check_key is not None:
                count, last = _verify_rows(
                    (row + (0,) for row in conn.execute(f"SELECT {_V2_COLUMNS} FROM entries ORDER BY idx")),
                    path)
                head = conn.execute("SELECT count, hash, sig FROM head").fetchall()
                if (len(head) != 1 or head[0][:2] != (count, last)
                        or (count and not head_signed_by(check_key, count, last, head[0][2]))):
                    raise LedgerCorrupt(f"{path}: version 2 ledger whose head does not match its "
                                        "chain or is not signed by its owner (left as it is)")
            for (name,) in conn.execute("SELECT name FROM sqlite_master WHERE type = 'index' AND "
                                        "tbl_name = 'entries' AND sql IS NOT NULL").fetchall():
                conn.execute(f'DROP INDEX "{name}"')  # its names are taken by version 3's
            for stmt in _UPGRADE_FROM_2:
                conn.execute(stmt)
            conn.execute(f"INSERT INTO entries ({_COLUMNS}) SELECT {_V2_COLUMNS}, 0 FROM entries_v2")
            conn.execute("DROP TABLE entries_v2")
            conn.execute("PRAGMA user_version = 3")
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise


def _set_wal(conn: sqlite3.Connection, path: Path) -> None:
    mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
    if str(mode).lower() != "wal":
        raise LedgerError(f"{path}: cannot switch to WAL mode (got {mode!r})")


def _convert(e: sqlite3.Error, context: str) -> LedgerError:
    code = getattr(e, "sqlite_errorcode", None)
    if code in (sqlite3.SQLITE_CORRUPT, sqlite3.SQLITE_NOTADB):
        return LedgerCorrupt(f"{context}: {e}")
    return LedgerError(f"{context}: {e}")


def _verify_rows(rows: Iterator[tuple[Any, ...]], where: Path) -> tuple[int, bytes]:
    expected, prev = 1, GENESIS_HASH
    for row in rows:
        index = row[0]
        if index != expected:
            if isinstance(index, int) and index > expected:
                raise LedgerCorrupt(
                    f"{where}: entry {expected} is missing (the next stored entry is {index})")
            raise LedgerCorrupt(f"{where}: entry {expected}: unexpected index {index!r}")
        entry = _from_row(row, where)
        if entry.prev_hash != prev:
            raise LedgerCorrupt(
                f"{where}: entry {index}: prev_hash does not link to entry {index - 1}")
        if entry_hash_of(entry) != entry.entry_hash:
            raise LedgerCorrupt(f"{where}: entry {index}: contents do not match its hash (edited)")
        expected, prev = expected + 1, entry.entry_hash
    return expected - 1, prev


def _from_row(row: tuple[Any, ...], where: Path) -> LedgerEntry:
    (index, receipt_id, server, client, seq, session_id, checkpoint, final, status, reason,
     prefill, decode, work, ended_at, receipt, recorded_at, prev_hash, entry_hash, verdict) = row
    typed = (
        (index, int), (receipt_id, str), (server, str), (client, str), (seq, int),
        (session_id, str), (checkpoint, int), (final, int), (status, str), (reason, str),
        (prefill, int), (decode, int), (work, int), (ended_at, float), (receipt, bytes),
        (recorded_at, float), (prev_hash, bytes), (entry_hash, bytes),
    )
    if any(type(v) is not t for v, t in typed) or final not in (0, 1) or verdict not in (0, 1):
        raise LedgerCorrupt(f"{where}: entry {index!r}: a column holds a value of the wrong type")
    return LedgerEntry(
        index=index, receipt_id=receipt_id, server=server, client=client, seq=seq,
        session_id=session_id, checkpoint=checkpoint, final=bool(final), status=status,
        reason=reason, prefill_tokens=prefill, decode_tokens=decode, work_units=work,
        ended_at=ended_at, receipt=receipt, recorded_at=recorded_at, prev_hash=prev_hash,
        entry_hash=entry_hash, verdict=bool(verdict),
    )


def _to_row(e: LedgerEntry) -> tuple[Any, ...]:
    return (e.index, e.receipt_id, e.server, e.client, e.seq, e.session_id, e.checkpoint,
            int(e.final), e.status, e.reason, e.prefill_tokens, e.decode_tokens, e.work_units,
            e.ended_at, e.receipt, e.recorded_at, e.prev_hash, e.entry_hash, int(e.verdict))


def _replace_hash(e: LedgerEntry) -> LedgerEntry:
    return replace(e, entry_hash=entry_hash_of(e))


def _check_text(name: str, value: object, *, nonempty: bool = False) -> None:
    if not isinstance(value, str):
        raise TypeError(f"{name} must be a str, not {type(value).__name__}")
    if nonempty and not value:
        raise ValueError(f"{name} must not be empty")


def _check_int(name: str, value: object, *, minimum: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool):
        raise TypeError(f"{name} must be an int, not {type(value).__name__}")
    if not minimum <= value <= _MAX_INT:
        raise ValueError(f"{name} must be in {minimum}..{_MAX_INT}, not {value}")


def _finite(name: str, value: object) -> float:
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise TypeError(f"{name} must be a number, not {type(value).__name__}")
    f = float(value)
    if not math.isfinite(f):
        raise ValueError(f"{name} must be finite, not {value}")
    return f
