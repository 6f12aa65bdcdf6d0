"""The receipt ledger: round trips, uniqueness, filters, and tamper detection on the raw file."""

from __future__ import annotations

import sqlite3
import threading
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from protocol.identity import Identity

from node.ledger.store import (
    AWAITING_VERDICT,
    GENESIS_HASH,
    DuplicateEntry,
    Ledger,
    LedgerCorrupt,
    LedgerEntry,
    LedgerError,
    entry_hash_of,
    head_file_of,
)

OWNER = Identity.from_seed(b"L" * 32)  # whose ledger it is: signs its head


def fields(n: int, **over: Any) -> dict[str, Any]:
    """Append arguments for the n-th receipt between server "S" and client "C"."""
    f: dict[str, Any] = dict(
        receipt_id=f"r{n}", server="S", client="C", seq=n, session_id=f"sess{n}",
        checkpoint=0, final=True, status="countersigned", reason="", prefill_tokens=10 * n,
        decode_tokens=n, work_units=100 * n, ended_at=1000.0 + n, receipt=b"\x00receipt-%d" % n,
    )
    f.update(over)
    return f


@pytest.fixture
def path(tmp_path: Path) -> Path:
    return tmp_path / "ledger.db"


def filled(path: Path, n: int) -> list[LedgerEntry]:
    with Ledger.open(path, OWNER) as led:
        return [led.append(**fields(i)) for i in range(1, n + 1)]


def raw(path: Path, sql: str, *args: Any) -> None:
    conn = sqlite3.connect(path)
    with conn:
        conn.execute(sql, args)
    conn.close()


def test_append_then_read_round_trip(path: Path) -> None:
    with Ledger.open(path, OWNER) as led:
        assert led.head() == (0, GENESIS_HASH)
        e1 = led.append(**fields(1))
        e2 = led.append(**fields(2, final=False, checkpoint=3, ended_at=-0.0))
        assert (e1.index, e2.index) == (1, 2)
        assert e1.prev_hash == GENESIS_HASH and e2.prev_hash == e1.entry_hash
        assert entry_hash_of(e2) == e2.entry_hash and len(e2.entry_hash) == 32
        assert led.entries() == [e1, e2]
        assert led.get("r2") == e2 and led.get("nope") is None
        assert e2.final is False and e2.checkpoint == 3 and e2.receipt == b"\x00receipt-2"
        assert led.head() == (2, e2.entry_hash)
        assert led.verify_chain() == 2


def test_reopen_after_close_keeps_everything(path: Path) -> None:
    written = filled(path, 5)
    with Ledger.open(path, OWNER) as led:
        assert led.entries() == written
        assert led.head() == (5, written[-1].entry_hash)
        e6 = led.append(**fields(6))
        assert e6.prev_hash == written[-1].entry_hash
    with Ledger.open(path, OWNER) as led:
        assert led.verify_chain() == 6


def test_file_is_wal_and_versioned(path: Path) -> None:
    filled(path, 1)
    conn = sqlite3.connect(path)
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert conn.execute("PRAGMA user_version").fetchone()[0] == 3
    conn.close()


@pytest.mark.parametrize("clash", [
    dict(receipt_id="r1", seq=99),                # same receipt_id
    dict(receipt_id="other"),                     # same (server, client, seq)
    dict(receipt_id="other", seq=99),             # same (server, client, session, checkpoint)
])
def test_duplicates_are_refused_and_change_nothing(path: Path, clash: dict[str, Any]) -> None:
    with Ledger.open(path, OWNER) as led:
        first = led.append(**fields(1))
        with pytest.raises(DuplicateEntry, match="entry 1"):
            led.append(**fields(1, **clash))
        assert led.entries() == [first] and led.head() == (1, first.entry_hash)
        assert led.append(**fields(2)).index == 2  # the ledger is still usable
        assert led.verify_chain() == 2


def test_same_seq_for_another_pair_is_fine(path: Path) -> None:
    with Ledger.open(path, OWNER) as led:
        led.append(**fields(1))
        led.append(**fields(1, receipt_id="x", client="D"))
        led.append(**fields(1, receipt_id="y", server="C", client="S"))
        assert led.verify_chain() == 3


def test_next_seq(path: Path) -> None:
    with Ledger.open(path, OWNER) as led:
        assert led.next_seq("S", "C") == 1
        led.append(**fields(1))
        led.append(**fields(5))
        led.append(**fields(9, client="D"))
        assert led.next_seq("S", "C") == 6
        assert led.next_seq("S", "D") == 10
        assert led.next_seq("C", "S") == 1


def test_filters(path: Path) -> None:
    with Ledger.open(path, OWNER) as led:
        a = led.append(**fields(1, server="S", client="C", ended_at=10.0))
        b = led.append(**fields(2, server="C", client="X", ended_at=20.0, status="server_only"))
        c = led.append(**fields(3, server="S", client="X", ended_at=30.0, status="disputed",
                                reason="decode count too high"))
        assert led.entries(counterparty="C") == [a, b]
        assert led.entries(counterparty="X") == [b, c]
        assert led.entries(counterparty="nobody") == []
        assert led.entries(until=20.0) == [a, b]
        assert led.entries(until=9.9) == []
        assert led.entries(status="disputed") == [c]
        assert c.reason == "decode count too high"
        assert led.entries(counterparty="X", until=25, status="server_only") == [b]
        with pytest.raises(ValueError):
            led.entries(status="bogus")


@pytest.mark.parametrize("bad, err", [
    (dict(status="paid"), ValueError),
    (dict(seq=-1), ValueError),
    (dict(work_units=-1), ValueError),
    (dict(decode_tokens=2**63), ValueError),
    (dict(ended_at=float("nan")), ValueError),
    (dict(receipt_id=""), ValueError),
    (dict(final=1), TypeError),
    (dict(seq=True), TypeError),
    (dict(receipt="text"), TypeError),
])
def test_bad_arguments_are_refused_before_writing(path: Path, bad: dict[str, Any],
                                                  err: type[Exception]) -> None:
    with Ledger.open(path, OWNER) as led:
        with pytest.raises(err):
            led.append(**fields(1, **bad))
        assert led.head()[0] == 0


def test_threads_share_one_ledger(path: Path) -> None:
    with Ledger.open(path, OWNER) as led:
        def work(t: int) -> None:
            for i in range(1, 26):
                led.append(**fields(i, receipt_id=f"t{t}-{i}", client=f"C{t}"))

        threads = [threading.Thread(target=work, args=(t,)) for t in range(4)]
        for th in threads:
            th.start()
        for th in threads:
            th.join()
        assert led.verify_chain() == 100
        assert [e.index for e in led.entries()] == list(range(1, 101))


def test_closed_ledger_refuses_use(path: Path) -> None:
    led = Ledger.open(path, OWNER)
    led.close()
    led.close()
    with pytest.raises(LedgerError, match="closed"):
        led.append(**fields(1))


# -- tampering with the file behind the ledger's back ------------------------------------------

@pytest.mark.parametrize("column, value", [
    ("work_units", 1),
    ("decode_tokens", 0),
    ("status", "disputed"),
    ("client", "someone-else"),
    ("ended_at", 999.5),
    ("receipt", b"forged"),
    ("final", 0),
    ("recorded_at", 0.0),
    ("prev_hash", bytes(32)),
    ("entry_hash", bytes(32)),
])
def test_an_edited_column_is_detected(path: Path, column: str, value: Any) -> None:
    filled(path, 5)
    raw(path, f"UPDATE entries SET {column} = ? WHERE idx = 3", value)
    with pytest.raises(LedgerCorrupt, match="entry 3"):
        Ledger.open(path, OWNER)
    with Ledger.open(path, OWNER, verify=False) as led:
        with pytest.raises(LedgerCorrupt, match="entry 3"):
            led.verify_chain()
        with pytest.raises(LedgerCorrupt, match="entry 3"):
            led.entries()


def test_a_rehashed_edit_still_breaks_the_link(path: Path) -> None:
    """Recomputing the edited entry's own hash is not enough: the next entry points at the old."""
    filled(path, 5)
    with Ledger.open(path, OWNER) as led:
        e3 = led.get("r3")
    assert e3 is not None
    forged = replace(e3, work_units=1)
    raw(path, "UPDATE entries SET work_units = 1, entry_hash = ? WHERE idx = 3",
        entry_hash_of(forged))
    with pytest.raises(LedgerCorrupt, match="entry 4"):
        Ledger.open(path, OWNER)


def test_a_deleted_middle_entry_is_detected(path: Path) -> None:
    filled(path, 5)
    raw(path, "DELETE FROM entries WHERE idx = 3")
    with pytest.raises(LedgerCorrupt, match="entry 3 is missing"):
        Ledger.open(path, OWNER)


def test_a_truncated_tail_is_detected(path: Path) -> None:
    filled(path, 5)
    raw(path, "DELETE FROM entries WHERE idx >= 4")
    with pytest.raises(LedgerCorrupt, match="entries 4..5 are missing"):
        Ledger.open(path, OWNER)


def test_a_head_rolled_back_with_the_tail_is_detected(path: Path) -> None:
    """Truncating rows *and* the head together: the head's signature covers the count."""
    written = filled(path, 5)
    raw(path, "DELETE FROM entries WHERE idx >= 4")
    raw(path, "UPDATE head SET count = 3, hash = ?", written[2].entry_hash)
    with pytest.raises(LedgerCorrupt, match="signature"):
        Ledger.open(path, OWNER)


def test_a_whole_earlier_copy_is_consistent(path: Path, tmp_path: Path) -> None:
    """A complete earlier copy (database and head file, closed cleanly) is indistinguishable
    from a shorter ledger: only a counterparty's countersigned receipts show what is missing."""
    filled(path, 3)
    old = tmp_path / "old"
    old.mkdir()
    for f in (path, head_file_of(path)):
        (old / f.name).write_bytes(f.read_bytes())
    with Ledger.open(path, OWNER) as led:
        led.append(**fields(4))
    for f in (path, head_file_of(path)):
        f.write_bytes((old / f.name).read_bytes())
    with Ledger.open(path, OWNER) as led:
        assert led.head()[0] == 3


def test_rows_not_covered_by_the_head_are_detected(path: Path) -> None:
    filled(path, 5)
    raw(path, "UPDATE head SET count = 4")
    with pytest.raises(LedgerCorrupt, match="entry 5 onward"):
        Ledger.open(path, OWNER)


def test_a_missing_head_row_is_detected(path: Path) -> None:
    filled(path, 2)
    raw(path, "DELETE FROM head")
    with pytest.raises(LedgerCorrupt, match="head"):
        Ledger.open(path, OWNER)


def test_a_garbage_file_is_reported_and_left_alone(path: Path) -> None:
    junk = b"this is not a database, just some bytes\n" * 200
    path.write_bytes(junk)
    with pytest.raises(LedgerCorrupt):
        Ledger.open(path, OWNER)
    assert path.read_bytes() == junk


def test_another_sqlite_database_is_not_taken_over(path: Path) -> None:
    raw(path, "CREATE TABLE notes (x TEXT)")
    before = path.read_bytes()
    with pytest.raises(LedgerCorrupt, match="not a ledger"):
        Ledger.open(path, OWNER)
    assert path.read_bytes() == before


def test_an_unknown_schema_version_is_refused(path: Path) -> None:
    filled(path, 1)
    conn = sqlite3.connect(path)
    conn.execute("PRAGMA user_version = 7")
    conn.close()
    with pytest.raises(LedgerCorrupt, match="version 7"):
        Ledger.open(path, OWNER)


def test_an_empty_file_becomes_a_ledger(path: Path) -> None:
    path.write_bytes(b"")
    with Ledger.open(path, OWNER) as led:
        assert led.append(**fields(1)).index == 1


# -- attacks on the file by someone without the owner's key ------------------------------------

def rechain(path: Path, edit: str, *args: Any) -> None:
    """What a file writer without the key can do: edit an entry with sqlite3, then recompute
    every entry hash and link after it, and the head row, so the chain checks out again."""
    conn = sqlite3.connect(path)
    with conn:
        conn.execute(edit, args)
        rows = conn.execute("SELECT * FROM entries ORDER BY idx").fetchall()
        prev = GENESIS_HASH
        for row in rows:
            entry = replace(LedgerEntry(*row[:17], entry_hash=b""), final=bool(row[7]), prev_hash=prev)
            digest = entry_hash_of(entry)
            conn.execute("UPDATE entries SET prev_hash = ?, entry_hash = ? WHERE idx = ?",
                         (prev, digest, entry.index))
            prev = digest
        conn.execute("UPDATE head SET count = ?, hash = ?", (len(rows), prev))
    conn.close()


def test_an_edit_with_the_chain_recomputed_is_detected(path: Path) -> None:
    filled(path, 5)
    rechain(path, "UPDATE entries SET work_units = 1 WHERE idx = 3")
    with pytest.raises(LedgerCorrupt, match="head signature does not verify"):
        Ledger.open(path, OWNER)
    # Deleting an entry and re-linking the rest is caught the same way.
    rechain(path, "DELETE FROM entries WHERE idx >= 2")
    with pytest.raises(LedgerCorrupt, match="head signature does not verify"):
        Ledger.open(path, OWNER)


def test_another_identity_cannot_open_or_re_sign(path: Path) -> None:
    filled(path, 2)
    with pytest.raises(LedgerCorrupt, match="not signed by the ledger's owner"):
        Ledger.open(path, Identity.from_seed(b"M" * 32))
    with Ledger.open(path, OWNER.peer_id) as led:  # the public key is enough to read and check
        assert led.verify_chain() == 2
        with pytest.raises(LedgerError, match="read-only"):
            led.append(**fields(3))
    head_file_of(path).unlink()  # without the head file, the head row's signature says it
    with pytest.raises(LedgerCorrupt, match="head signature does not verify"):
        Ledger.open(path, Identity.from_seed(b"M" * 32))


def copy_while_open(src: Path, dst_dir: Path, *, with_head_file: bool) -> Path:
    """Copy a ledger's database (and maybe its head file) as ``cp`` would, without -wal."""
    dst_dir.mkdir()
    (dst_dir / src.name).write_bytes(src.read_bytes())
    if with_head_file:
        (dst_dir / head_file_of(src).name).write_bytes(head_file_of(src).read_bytes())
    return dst_dir / src.name


@pytest.mark.parametrize("with_head_file", [True, False])
def test_a_copy_without_its_wal_is_reported(path: Path, tmp_path: Path, with_head_file: bool) -> None:
    """Attack (or accident): copy the database of a running ledger without its -wal file. The
    committed entries still in the WAL are missing from the copy; it must not open silently."""
    with Ledger.open(path, OWNER) as led:
        for i in range(1, 6):
            led.append(**fields(i))
        wal = path.with_name(path.name + "-wal")
        assert wal.exists() and wal.stat().st_size > 0  # the entries are in the WAL, not the file
        copy = copy_while_open(path, tmp_path / "copy", with_head_file=with_head_file)
    assert not copy.with_name(copy.name + "-wal").exists()
    expected = "entries 1..5 are missing" if with_head_file else "head file .* is missing"
    with pytest.raises(LedgerCorrupt, match=expected):
        Ledger.open(copy, OWNER)
    with Ledger.open(path, OWNER) as led:  # the original, closed cleanly, is whole
        assert led.verify_chain() == 5


def test_a_wal_of_another_copy_is_reported(path: Path, tmp_path: Path) -> None:
    """Two copies of one ledger diverge; a database is then put together with its own head file
    but the -wal file of the other copy (as a careless restore might)."""
    filled(path, 2)
    twin = copy_while_open(path, tmp_path / "twin", with_head_file=True)
    with Ledger.open(path, OWNER) as a, Ledger.open(twin, OWNER) as b:
        a.append(**fields(3))
        b.append(**fields(3, receipt_id="elsewhere", work_units=7))
        mixed = copy_while_open(path, tmp_path / "mixed", with_head_file=True)
        mixed.with_name(mixed.name + "-wal").write_bytes(twin.with_name(twin.name + "-wal").read_bytes())
    with pytest.raises(LedgerCorrupt, match="entry 3 does not match the head file"):
        Ledger.open(mixed, OWNER)


def test_a_kill_between_commit_and_head_file_is_recovered(path: Path) -> None:
    """The head file is written after the commit: lagging behind by an entry is normal after a
    crash, and the next open brings it up to date."""
    filled(path, 2)
    stale = head_file_of(path).read_bytes()
    with Ledger.open(path, OWNER) as led:
        led.append(**fields(3))
    head_file_of(path).write_bytes(stale)
    with Ledger.open(path, OWNER) as led:
        assert led.verify_chain() == 3
    assert head_file_of(path).read_bytes() != stale


V2_ENTRIES = """CREATE TABLE entries (
    idx INTEGER PRIMARY KEY, receipt_id TEXT NOT NULL UNIQUE, server TEXT NOT NULL,
    client TEXT NOT NULL, seq INTEGER NOT NULL, session_id TEXT NOT NULL,
    checkpoint INTEGER NOT NULL, final INTEGER NOT NULL, status TEXT NOT NULL,
    reason TEXT NOT NULL, prefill_tokens INTEGER NOT NULL, decode_tokens INTEGER NOT NULL,
    work_units INTEGER NOT NULL, ended_at REAL NOT NULL, receipt BLOB NOT NULL,
    recorded_at REAL NOT NULL, prev_hash BLOB NOT NULL, entry_hash BLOB NOT NULL,
    UNIQUE (server, client, seq)) STRICT"""


def as_version_2(path: Path) -> None:
    """Rewrite a closed ledger's file in the version 2 layout (one entry per receipt, UNIQUE
    table constraints, no verdict column), keeping its rows, hashes and signed head."""
    conn = sqlite3.connect(path)
    cols = ("idx, receipt_id, server, client, seq, session_id, checkpoint, final, status, reason, "
            "prefill_tokens, decode_tokens, work_units, ended_at, receipt, recorded_at, prev_hash, "
            "entry_hash")
    with conn:
        conn.execute("ALTER TABLE entries RENAME TO v3")
        for (name,) in conn.execute("SELECT name FROM sqlite_master WHERE type = 'index' "
                                    "AND tbl_name = 'v3' AND sql IS NOT NULL").fetchall():
            conn.execute(f"DROP INDEX {name}")
        conn.execute(V2_ENTRIES)
        conn.execute(f"INSERT INTO entries ({cols}) SELECT {cols} FROM v3")
        conn.execute("DROP TABLE v3")
        conn.execute("CREATE INDEX entries_by_client ON entries (client)")
        conn.execute("CREATE INDEX entries_by_session ON entries (server, client, session_id, checkpoint)")
    conn.execute("PRAGMA user_version = 2")
    conn.close()


def test_a_version_2_ledger_is_upgraded_in_place_and_takes_verdicts(path: Path) -> None:
    written = filled(path, 2)
    with Ledger.open(path, OWNER) as led:
        issued = led.append(**fields(3, status="server_only", reason=AWAITING_VERDICT))
    as_version_2(path)
    with Ledger.open(path, OWNER.peer_id) as led:  # read-only openers upgrade it too
        assert led.entries() == written + [issued] and led.verify_chain() == 3
    conn = sqlite3.connect(path)
    assert conn.execute("PRAGMA user_version").fetchone()[0] == 3
    conn.close()
    with Ledger.open(path, OWNER) as led:
        verdict = led.record_verdict("r3", status="countersigned", reason="", receipt=b"signed")
        assert led.entries() == written + [verdict] and led.verify_chain() == 4


def test_a_damaged_version_2_ledger_is_reported_and_left_as_it_is(path: Path) -> None:
    filled(path, 2)
    as_version_2(path)
    raw(path, "UPDATE entries SET work_units = 1 WHERE idx = 1")
    before = path.read_bytes()
    with pytest.raises(LedgerCorrupt, match="entry 1"):
        Ledger.open(path, OWNER)
    assert path.read_bytes() == before
    conn = sqlite3.connect(path)
    assert conn.execute("PRAGMA user_version").fetchone()[0] == 2
    conn.close()


def test_a_version_1_ledger_is_upgraded_in_place(path: Path) -> None:
    filled(path, 3)
    as_version_2(path)
    conn = sqlite3.connect(path)
    conn.execute("ALTER TABLE head DROP COLUMN sig")
    conn.execute("PRAGMA user_version = 1")
    conn.close()
    head_file_of(path).unlink()
    with pytest.raises(LedgerError, match="identity"):
        Ledger.open(path, OWNER.peer_id)
    with Ledger.open(path, OWNER) as led:
        assert led.verify_chain() == 3
        led.append(**fields(4))
    with Ledger.open(path, OWNER) as led:
        assert led.verify_chain() == 4


# ---- verdicts: a receipt stored before it was sent, then its client's answer ---------------------

def issued(n: int, **over: Any) -> dict[str, Any]:
    return fields(n, status="server_only", reason=AWAITING_VERDICT, **over)


def test_a_verdict_supersedes_the_issued_entry_and_is_chained(path: Path) -> None:
    with Ledger.open(path, OWNER) as led:
        first = led.append(**issued(1))
        second = led.append(**issued(2))
        verdict = led.record_verdict("r1", status="countersigned", reason="", receipt=b"both sigs")
        assert verdict.verdict and verdict.index == 3 and verdict.prev_hash == second.entry_hash
        assert (verdict.seq, verdict.work_units, verdict.receipt) == (first.seq, first.work_units, b"both sigs")
        # Each receipt once, as it now stands, in the order the receipts were first recorded.
        assert led.entries() == [verdict, second]
        assert led.entries(status="server_only") == [second]
        assert led.entries(status="countersigned") == [verdict]
        assert led.get("r1") == verdict and led.history("r1") == [first, verdict]
        assert led.next_seq("S", "C") == 3
    with Ledger.open(path, OWNER) as led:
        assert led.verify_chain() == 3 and led.entries() == [verdict, second]


def test_a_receipt_takes_one_verdict_only_after_being_issued(path: Path) -> None:
    with Ledger.open(path, OWNER) as led:
        led.append(**issued(1))
        led.append(**fields(2))  # countersigned from the start (a client's entry)
        led.record_verdict("r1", status="disputed", reason="counts differ", receipt=b"x")
        with pytest.raises(DuplicateEntry, match="already has a verdict"):
            led.record_verdict("r1", status="countersigned", reason="", receipt=b"y")
        with pytest.raises(DuplicateEntry, match="takes no verdict"):
            led.record_verdict("r2", status="disputed", reason="", receipt=b"y")
        with pytest.raises(LedgerError, match="not recorded"):
            led.record_verdict("nope", status="disputed", reason="", receipt=b"y")
        with pytest.raises(ValueError):
            led.record_verdict("r1", status="paid", reason="", receipt=b"y")
        # A verdict never makes room for another receipt under the same ids.
        with pytest.raises(DuplicateEntry):
            led.append(**fields(3, receipt_id="r1", seq=3))
        with pytest.raises(DuplicateEntry):
            led.append(**fields(3, seq=1))
        assert led.verify_chain() == 3
        assert [(e.receipt_id, e.status, e.reason) for e in led.entries()] == [
            ("r1", "disputed", "counts differ"), ("r2", "countersigned", "")]


def test_a_forged_verdict_flag_is_detected(path: Path) -> None:
    filled(path, 2)
    raw(path, "UPDATE entries SET verdict = 1 WHERE idx = 2")  # r2 now reads as r2's verdict
    with pytest.raises(LedgerCorrupt, match="entry 2"):
        Ledger.open(path, OWNER)
