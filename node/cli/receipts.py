"""``shiza receipts``: list, export, settle, cosign and verify receipts.

Verification uses only the ``protocol`` package: anyone can check a file offline.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from protocol.errors import ShizaError
from protocol.identity import Identity
from protocol.documents import decode_document, encode_document, verify_documents
from protocol.receipts import Receipt, verify_receipt
from protocol.settlement import Statement, build_statement, cosign_statement, settleable

from node.util.atomic import write_atomic



def add_parser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    rec = sub.add_parser("receipts", help="receipts, the ledger and settlement")
    cmds = rec.add_subparsers(dest="receipts_command", required=True)

    def data_dir(p: argparse.ArgumentParser) -> None:
        p.add_argument("--data-dir", type=Path, default=None, help="the node's or agent's data directory")

    p = cmds.add_parser("list", help="the receipts in this ledger")
    data_dir(p)
    p.add_argument("--json", action="store_true")
    p = cmds.add_parser("export", help="write every receipt to a portable file")
    data_dir(p)
    p.add_argument("--out", type=Path, required=True, help="FILE.json or FILE.msgpack")
    p = cmds.add_parser("settle", help="a signed settlement statement with one counterparty")
    data_dir(p)
    p.add_argument("--counterparty", required=True, help="peer id")
    p.add_argument("--since", type=float, default=0.0,
                   help="unix time the period starts (inclusive); pass the previous statement's "
                   "--until so that no session is billed twice; default 0")
    p.add_argument("--until", type=float, default=None, help="unix time the period ends (exclusive); default now")
    p.add_argument("--out", type=Path, required=True)
    p = cmds.add_parser("cosign", help="countersign a statement after recomputing it from this ledger")
    data_dir(p)
    p.add_argument("file", type=Path)
    p.add_argument("--out", type=Path, default=None, help="default: overwrite FILE")
    p = cmds.add_parser("import", help="take countersignatures this node missed from a client's export")
    data_dir(p)
    p.add_argument("file", type=Path, help="the counterparty's `shiza receipts export` file")
    p = cmds.add_parser("verify", help="verify receipts, exports and statements offline")
    p.add_argument("files", type=Path, nargs="+")


def run(args: argparse.Namespace) -> int:
    try:
        return _COMMANDS[args.receipts_command](args)
    except ShizaError as exc:
        print(f"error: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1


def _data_dir(args: argparse.Namespace) -> Path:
    from node.util.dirs import default_data_dir

    return Path(args.data_dir) if args.data_dir else default_data_dir()


def _ledger(args: argparse.Namespace, identity: Identity | None = None):  # type: ignore[no-untyped-def]
    """The data directory's ledger, checked against its owner's key (the identity there)."""
    from node.ledger.store import LEDGER_FILE, Ledger, LedgerError

    path = _data_dir(args) / LEDGER_FILE
    if not path.exists():  # a usage error (exit 2, node/cli/errors.py)
        raise ValueError(f"no ledger at {path}: give the node's or agent's --data-dir (or set SHIZA_HOME)")
    return Ledger.open(path, identity or Identity.load_or_create(_data_dir(args)))  # LedgerError: exit 5


def _fmt(path: Path) -> str:
    return "msgpack" if path.suffix in (".msgpack", ".mp", ".bin") else "json"


def _list(args: argparse.Namespace) -> int:
    with _ledger(args) as ledger:
        entries = ledger.entries()
    if args.json:
        print(json.dumps([
            {"index": e.index, "receipt_id": e.receipt_id, "server": e.server, "client": e.client,
             "seq": e.seq, "session_id": e.session_id, "checkpoint": e.checkpoint, "final": e.final,
             "status": e.status, "reason": e.reason, "prefill_tokens": e.prefill_tokens,
             "decode_tokens": e.decode_tokens, "work_units": e.work_units, "ended_at": e.ended_at}
            for e in entries
        ], indent=1))
        return 0
    print(f"{'#':>4} {'status':<14} {'seq':>5} {'ckpt':>4} {'tokens':>7} {'work':>8}  server -> client")
    for e in entries:
        print(f"{e.index:>4} {e.status:<14} {e.seq:>5} {e.checkpoint:>4} "
              f"{e.prefill_tokens + e.decode_tokens:>7} {e.work_units:>8}  {e.server[-8:]} -> {e.client[-8:]}"
              + (f"  ({e.reason})" if e.reason else ""))
    print(f"{len(entries)} receipts")
    return 0


def _receipts(ledger) -> list[Receipt]:  # type: ignore[no-untyped-def]
    return [Receipt.from_bytes(e.receipt) for e in ledger.entries()]


def _export(args: argparse.Namespace) -> int:
    identity = Identity.load_or_create(_data_dir(args))
    with _ledger(args, identity) as ledger:
        receipts = _receipts(ledger)
    doc = {"v": 0, "kind": "receipts", "owner": identity.peer_id, "exported_at": time.time(),
           "receipts": [r.to_wire() for r in receipts]}
    write_atomic(args.out, encode_document(doc, _fmt(args.out)))
    print(f"exported {len(receipts)} receipts to {args.out}")
    return 0


def _settle(args: argparse.Namespace) -> int:
    identity = Identity.load_or_create(_data_dir(args))
    until = args.until if args.until is not None else time.time()
    with _ledger(args, identity) as ledger:
        receipts = _receipts(ledger)
    if not 0.0 <= args.since <= until:
        raise ValueError(f"--since {args.since} must be in 0..--until ({until})")
    covered = settleable(receipts, party_a=identity.peer_id, party_b=args.counterparty, since=args.since, until=until)
    statement = build_statement(identity, args.counterparty, receipts, period_start=args.since, period_end=until)
    doc = {"v": 0, "kind": "statement", "statement": statement.to_wire(),
           "receipts": [r.to_wire() for r in covered]}
    write_atomic(args.out, encode_document(doc, _fmt(args.out)))
    print(f"statement over {statement.count} receipts, {statement.work_units} work units, "
          f"root {statement.merkle_root.hex()[:16]}..., written to {args.out}")
    return 0


def _cosign(args: argparse.Namespace) -> int:
    identity = Identity.load_or_create(_data_dir(args))
    doc = decode_document(args.file.read_bytes())
    if doc.get("kind") != "statement":
        raise ValueError(f"{args.file} is not a statement")
    statement = doc["statement"]
    if not isinstance(statement, Statement):
        statement = Statement.from_wire(statement)
    with _ledger(args, identity) as ledger:
        mine = _receipts(ledger)
    signed = cosign_statement(identity, statement, mine)
    doc["statement"] = signed.to_wire()
    out = args.out or args.file
    write_atomic(out, encode_document(doc, _fmt(out)))
    print(f"countersigned statement over {signed.count} receipts, written to {out}")
    return 0


def _verify(args: argparse.Namespace) -> int:
    docs = []
    for path in args.files:
        try:
            docs.append(decode_document(path.read_bytes()))
        except ShizaError as exc:
            print(f"error: {path}: {type(exc).__name__}: {exc}", file=sys.stderr)
            return 1
    report = verify_documents(docs)
    print(f"ok: {report}")
    return 0


def _import(args: argparse.Namespace) -> int:
    """A server killed between sending a receipt and reading its countersignature keeps it as
    ``server_only``, while the client holds it countersigned: their statements then differ. The
    client's export carries the countersigned bytes; each one whose signatures verify, that this
    node issued (same body, byte for byte) and holds as ``server_only``, gets its verdict."""
    identity = Identity.load_or_create(_data_dir(args))
    doc = decode_document(args.file.read_bytes())
    if doc.get("kind") != "receipts":
        raise ValueError(f"{args.file} is not a receipts export (`shiza receipts export`)")
    taken = skipped = 0
    refused: list[str] = []
    with _ledger(args, identity) as ledger:
        for item in doc["receipts"]:
            theirs = item if isinstance(item, Receipt) else Receipt.from_wire(item)
            if theirs.server != identity.peer_id:
                skipped += 1  # another node's receipt (the client's export holds them all)
                continue
            mine = ledger.get(theirs.receipt_id)
            try:
                verify_receipt(theirs, require_countersigned=True)
            except ShizaError as exc:
                refused.append(f"{theirs.receipt_id}: {exc}")
                continue
            if mine is None or mine.status != "server_only":
                skipped += 1  # unknown here, or already settled either way
                continue
            stored = Receipt.from_bytes(mine.receipt)
            if stored.body_wire() != theirs.body_wire() or stored.server_sig != theirs.server_sig:
                refused.append(f"{theirs.receipt_id}: not the receipt this node issued")
                continue
            ledger.record_verdict(theirs.receipt_id, status="countersigned",
                                  reason=f"countersignature imported from {args.file.name}", receipt=theirs.to_bytes())
            taken += 1
    for why in refused[:20]:
        print(f"refused {why}", file=sys.stderr)
    print(f"imported {taken} countersignatures; {skipped} receipts skipped, {len(refused)} refused")
    return 0 if not refused else 1


_COMMANDS = {"list": _list, "export": _export, "settle": _settle, "cosign": _cosign, "import": _import,
             "verify": _verify}
