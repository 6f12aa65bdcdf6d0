"""Receipt sequence numbers: read from the ledger off the trio thread, then counted in memory,
continuing across restarts."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
import trio

from node.ledger.accounting import SeqAllocator, ServerAccount, store
from node.ledger.store import LEDGER_FILE, Ledger
from protocol.identity import Identity

SERVER = Identity.generate()
CLIENT = Identity.generate().peer_id


def account(seqs: SeqAllocator, session_id: str) -> ServerAccount:
    return ServerAccount(SERVER, seqs, "m@1", 0, 2, CLIENT, session_id, every_tokens=1)


async def test_prepare_reads_the_ledger_in_a_worker_thread(tmp_path: Path) -> None:
    with Ledger.open(tmp_path / LEDGER_FILE, SERVER) as ledger:
        reads: list[int] = []
        real = ledger.next_seq

        def recording(server: str, client: str) -> int:
            reads.append(threading.get_ident())
            return real(server, client)

        ledger.next_seq = recording  # type: ignore[method-assign]
        seqs = SeqAllocator(ledger)
        await seqs.prepare(SERVER.peer_id, CLIENT)
        await seqs.prepare(SERVER.peer_id, CLIENT)  # once per pair
        assert reads and reads[0] != threading.get_ident() and len(reads) == 1
        assert [seqs.allocate(SERVER.peer_id, CLIENT) for _ in range(3)] == [1, 2, 3]


def test_allocate_without_prepare_refuses_to_block() -> None:
    with pytest.raises(RuntimeError, match="prepare"):
        SeqAllocator(None).allocate(SERVER.peer_id, CLIENT)


async def test_numbers_continue_from_the_ledger_after_a_restart(tmp_path: Path) -> None:
    path = tmp_path / LEDGER_FILE
    with Ledger.open(path, SERVER) as ledger:
        seqs = SeqAllocator(ledger)
        await seqs.prepare(SERVER.peer_id, CLIENT)
        for sid in ("s1", "s2"):
            receipt = account(seqs, sid).issue(final=True)
            await trio.to_thread.run_sync(store, ledger, receipt, "server_only", "")
    with Ledger.open(path, SERVER) as ledger:  # a new process: a fresh allocator over the same file
        seqs = SeqAllocator(ledger)
        await seqs.prepare(SERVER.peer_id, CLIENT)
        assert account(seqs, "s3").issue(final=True).seq == 3
        await seqs.prepare(SERVER.peer_id, "another client")
        assert seqs.allocate(SERVER.peer_id, "another client") == 1


async def test_concurrent_prepares_of_one_pair_never_reuse_a_number(tmp_path: Path) -> None:
    with Ledger.open(tmp_path / LEDGER_FILE, SERVER) as ledger:
        seqs = SeqAllocator(ledger)
        got: list[int] = []

        async def session() -> None:
            await seqs.prepare(SERVER.peer_id, CLIENT)
            got.append(seqs.allocate(SERVER.peer_id, CLIENT))

        async with trio.open_nursery() as nursery:
            for _ in range(4):
                nursery.start_soon(session)
        assert sorted(got) == [1, 2, 3, 4]
