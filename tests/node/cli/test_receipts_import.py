"""``shiza receipts import``: the countersignatures a killed server missed (issue 15's chaos run:
the server stored a receipt ``server_only`` and sent it, the client countersigned it, the server
died before reading the Countersign; their statements then differed and the client could not
cosign the server's). Real ledgers on disk, the real ``shiza`` entry point."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest

from protocol.identity import Identity
from protocol.receipts import Receipt, countersign_receipt

from node.ledger.accounting import store
from node.ledger.store import AWAITING_VERDICT, Ledger

from tests.protocol.receipt_helpers import make_receipt

SHIZA = str(Path(sys.executable).with_name("shiza"))


def shiza(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([SHIZA, *args], capture_output=True, text=True, timeout=120)


@pytest.mark.proc
def test_a_missed_countersignature_is_imported_and_the_statements_agree(tmp_path: Path) -> None:
    server_dir, client_dir = tmp_path / "server", tmp_path / "client"
    server_dir.mkdir()
    client_dir.mkdir()
    server, client = Identity.load_or_create(server_dir), Identity.load_or_create(client_dir)
    done = make_receipt(server, client, seq=1, session_id="s1", final=True)  # settled normally
    missed = make_receipt(server, client, seq=2, session_id="s2", final=True)  # the one in flight
    forged = make_receipt(server, client, seq=3, session_id="s3", final=True, cosign=False)
    with Ledger.open(server_dir / "ledger.sqlite", server) as ledger:
        store(ledger, done, "countersigned")
        for r in (missed, forged):
            store(ledger, dataclasses.replace(r, client_sig=b""), "server_only", AWAITING_VERDICT)
    with Ledger.open(client_dir / "ledger.sqlite", client) as ledger:
        for r in (done, missed):
            store(ledger, r, "countersigned")
    # Before: the server's statement leaves session s2 out, and the client refuses to cosign it.
    statement = tmp_path / "statement.json"
    args = ["--counterparty", client.peer_id, "--since", "0", "--until", "2000000000", "--out", str(statement)]
    assert shiza("receipts", "settle", "--data-dir", str(server_dir), *args).returncode == 0
    refused = shiza("receipts", "cosign", "--data-dir", str(client_dir), str(statement))
    assert refused.returncode != 0 and refused.stderr.startswith("error: ")

    export = tmp_path / "client-receipts.json"
    assert shiza("receipts", "export", "--data-dir", str(client_dir), "--out", str(export)).returncode == 0
    imported = shiza("receipts", "import", "--data-dir", str(server_dir), str(export))
    assert imported.returncode == 0, imported.stderr
    assert "imported 1 countersignatures" in imported.stdout
    with Ledger.open(server_dir / "ledger.sqlite", server) as ledger:
        assert ledger.get(missed.receipt_id).status == "countersigned"
        assert ledger.get(forged.receipt_id).status == "server_only"  # nothing came for it

    assert shiza("receipts", "settle", "--data-dir", str(server_dir), *args).returncode == 0
    cosigned = shiza("receipts", "cosign", "--data-dir", str(client_dir), str(statement))
    assert cosigned.returncode == 0, cosigned.stderr
    assert "over 2 receipts" in cosigned.stdout


def test_an_import_cannot_forge_or_change_a_receipt(tmp_path: Path) -> None:
    server_dir = tmp_path / "server"
    server_dir.mkdir()
    server, client, other = Identity.load_or_create(server_dir), Identity.generate(), Identity.generate()
    issued = make_receipt(server, client, seq=1, session_id="s1", final=True, cosign=False)
    with Ledger.open(server_dir / "ledger.sqlite", server) as ledger:
        store(ledger, issued, "server_only", AWAITING_VERDICT)
    from protocol.documents import encode_document
    from protocol.receipts import sign_receipt

    more_work = countersign_receipt(client, sign_receipt(server, dataclasses.replace(
        issued, decode_tokens=issued.decode_tokens + 1, work_units=issued.work_units + issued.end - issued.start)))
    wrong_signer = dataclasses.replace(issued, client_sig=other.sign(b"shiza/receipt/v0\x00", b"x"))
    for lie in (more_work, wrong_signer):
        path = tmp_path / "export.json"
        path.write_bytes(encode_document({"v": 0, "kind": "receipts", "owner": client.peer_id,
                                          "exported_at": 0.0, "receipts": [lie.to_wire()]}, "json"))
        done = shiza("receipts", "import", "--data-dir", str(server_dir), str(path))
        assert done.returncode == 1 and "refused" in done.stderr, (done.stdout, done.stderr)
    with Ledger.open(server_dir / "ledger.sqlite", server) as ledger:
        assert ledger.get(issued.receipt_id).status == "server_only"
        assert Receipt.from_bytes(ledger.get(issued.receipt_id).receipt) == issued
