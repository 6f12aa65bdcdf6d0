"""Receipt and statement documents: what ``shiza receipts export/settle/verify`` read and
write (SPEC.md, 16.9). Bytes in, bytes out; JSON or msgpack, told apart by the first byte.

    {"v": 0, "kind": "receipt",   "receipt": R}
    {"v": 0, "kind": "receipts",  "owner": peer id, "exported_at": float, "receipts": [R, ...]}
    {"v": 0, "kind": "statement", "statement": S, "receipts": [R, ...]}

R and S are the wire maps of Receipt and Statement. In JSON, a bin value is written
{"$b64": standard base64 with padding}. A decoded document holds Receipt and Statement
objects in place of their maps; encode_document takes either.
"""

from __future__ import annotations

import base64
import binascii
import json
from dataclasses import dataclass
from typing import Any

import msgpack

from ._fields import check_float, check_seq, check_str, fields_of
from .errors import (
    DuplicateReceipt,
    InvalidMessage,
    LimitExceeded,
    MalformedFrame,
    ShizaError,
    UnsupportedVersion,
)
from .ids import (
    MAX_DOCUMENT_BYTES,
    MAX_ID_LEN,
    MAX_MAP_LEN,
    MAX_NESTING,
    MAX_RECEIPTS_PER_DOCUMENT,
    MAX_STR_LEN,
    PROTOCOL_VERSION,
)
from .receipts import Receipt, verify_receipt
from .settlement import Statement, merkle_proofs, receipt_leaf, verify_proof, verify_statement

DOCUMENT_KINDS = ("receipt", "receipts", "statement")
_KIND_FIELDS = {
    "receipt": ("receipt",),
    "receipts": ("owner", "exported_at", "receipts"),
    "statement": ("statement", "receipts"),
}
_B64 = "$b64"


def _receipt(value: Any) -> Receipt:
    return value if isinstance(value, Receipt) else Receipt.from_wire(value)


def normalize_document(doc: Any) -> dict[str, Any]:
    """Validate a document (objects or wire maps) and return it with Receipt and Statement
    objects; InvalidMessage, LimitExceeded or UnsupportedVersion if it is not one."""
    if not isinstance(doc, dict):
        raise InvalidMessage(f"a document must be a map, got {type(doc).__name__}")
    version, kind = doc.get("v"), doc.get("kind")
    if type(version) is not int:
        raise InvalidMessage("document version 'v' must be an integer")
    if version != PROTOCOL_VERSION:
        raise UnsupportedVersion(f"document version {version} is not supported")
    if kind not in DOCUMENT_KINDS:
        raise InvalidMessage(f"document kind must be one of {', '.join(DOCUMENT_KINDS)}; got {kind!r:.64}")
    got = fields_of(doc, f"{kind} document", ("v", "kind", *_KIND_FIELDS[kind]))
    if kind == "receipt":
        got["receipt"] = _receipt(got["receipt"])
        return got
    if kind == "receipts":
        check_str("owner", got["owner"], MAX_ID_LEN, nonempty=True)
        got["exported_at"] = check_float("exported_at", got["exported_at"], 0.0)
    else:
        statement = got["statement"]
        got["statement"] = statement if isinstance(statement, Statement) else Statement.from_wire(statement)
    got["receipts"] = [_receipt(r) for r in check_seq("receipts", got["receipts"], MAX_RECEIPTS_PER_DOCUMENT)]
    return got


def _document_wire(doc: dict[str, Any]) -> dict[str, Any]:
    out = dict(doc)
    for key in ("receipt", "statement"):
        if key in out:
            out[key] = out[key].to_wire()
    if "receipts" in out:
        out["receipts"] = [r.to_wire() for r in out["receipts"]]
    return out


def _to_json(obj: Any) -> Any:
    if isinstance(obj, bytes):
        return {_B64: base64.b64encode(obj).decode("ascii")}
    if isinstance(obj, dict):
        return {key: _to_json(value) for key, value in obj.items()}
    if isinstance(obj, list):
        return [_to_json(item) for item in obj]
    return obj


def _from_json(obj: Any, depth: int = 0) -> Any:
    if depth > MAX_NESTING:
        raise LimitExceeded(f"document nested deeper than MAX_NESTING ({MAX_NESTING})")
    if isinstance(obj, dict):
        if _B64 in obj:
            text = obj[_B64]
            if len(obj) != 1 or type(text) is not str or len(text) > MAX_STR_LEN:
                raise InvalidMessage(f'a {{"{_B64}": ...}} value must have that one key and a string')
            try:
                data = base64.b64decode(text, validate=True)
            except (binascii.Error, ValueError):
                raise MalformedFrame("invalid base64 in a $b64 value") from None
            if base64.b64encode(data).decode("ascii") != text:  # one text per byte string
                raise MalformedFrame("base64 of a $b64 value is not in canonical form")
            return data
        if len(obj) > MAX_MAP_LEN:
            raise LimitExceeded(f"map longer than MAX_MAP_LEN ({MAX_MAP_LEN})")
        return {key: _from_json(value, depth + 1) for key, value in obj.items()}
    if isinstance(obj, list):
        return [_from_json(item, depth + 1) for item in obj]
    return obj


def _reject_constant(name: str) -> Any:
    raise MalformedFrame(f"{name} is not a number a document may hold")


def _ext_rejected(code: int, data: bytes) -> Any:
    raise MalformedFrame(f"msgpack extension types are not allowed (ext type {code})")


def encode_document(doc: dict[str, Any], fmt: str = "json") -> bytes:
    """The bytes of a document in ``fmt``: "json" (UTF-8, keys sorted) or "msgpack"."""
    wire = _document_wire(normalize_document(doc))
    if fmt == "json":
        data = json.dumps(_to_json(wire), sort_keys=True, separators=(",", ":"), allow_nan=False).encode()
    elif fmt == "msgpack":
        data = msgpack.packb(wire, use_bin_type=True)
    else:
        raise ValueError(f"document format must be json or msgpack, got {fmt!r}")
    if len(data) > MAX_DOCUMENT_BYTES:
        raise LimitExceeded(f"document of {len(data)} bytes, MAX_DOCUMENT_BYTES is {MAX_DOCUMENT_BYTES}")
    return data


def decode_document(data: bytes) -> dict[str, Any]:
    """Parse and validate a document, JSON if its first non-blank byte is "{", else msgpack.
    Checks the fields, not the signatures (verify_documents)."""
    if len(data) > MAX_DOCUMENT_BYTES:
        raise LimitExceeded(f"document of {len(data)} bytes, MAX_DOCUMENT_BYTES is {MAX_DOCUMENT_BYTES}")
    try:
        if bytes(data[:64]).lstrip()[:1] == b"{":
            obj = _from_json(json.loads(bytes(data).decode("utf-8"), parse_constant=_reject_constant))
        else:
            obj = msgpack.unpackb(
                data, raw=False, strict_map_key=True, ext_hook=_ext_rejected, timestamp=0,
                max_str_len=MAX_STR_LEN, max_bin_len=MAX_STR_LEN, max_array_len=MAX_RECEIPTS_PER_DOCUMENT,
                max_map_len=MAX_MAP_LEN, max_ext_len=0,
            )
    except ShizaError:
        raise
    except RecursionError:
        raise LimitExceeded("document nested too deep") from None
    except (ValueError, UnicodeDecodeError) as exc:  # json errors and msgpack's are ValueErrors
        raise MalformedFrame(f"not a valid document: {str(exc)[:200]}") from None
    except Exception as exc:  # msgpack may raise others on hostile input
        raise MalformedFrame(f"not a valid document ({type(exc).__name__})") from None
    return normalize_document(obj)


@dataclass(frozen=True)
class VerifyReport:
    """What verify_documents found. Totals are over the latest receipt of each session."""

    documents: int
    receipts: int  # distinct receipt ids
    countersigned: int
    sessions: int
    statements: int  # statements verified, with a proof of every receipt
    prefill_tokens: int
    decode_tokens: int
    work_units: int


def _at(index: int, receipt_id: str | None, exc: ShizaError) -> ShizaError:
    """``exc`` with "document i, receipt r: " in front (statement checks name the receipt
    themselves, as "receipt r: ...")."""
    if receipt_id:
        message = f"document {index}, receipt {receipt_id}: {exc.message}"
    elif exc.message.startswith("receipt "):
        message = f"document {index}, {exc.message}"
    else:
        message = f"document {index}: {exc.message}"
    return type(exc)(message, code=exc.code)


def verify_documents(docs: list[dict[str, Any]]) -> VerifyReport:
    """Verify decoded documents together; the first problem is raised as the ShizaError it is,
    its message naming the document index and the receipt id:

    1. every receipt verifies (verify_receipt; its countersignature when present);
    2. no document holds a receipt twice, and across documents one receipt id has one content
       (a countersigned copy and a server-only copy of one receipt agree), a (server, client,
       seq) one receipt, and a session checkpoint one receipt (DuplicateReceipt);
    3. every statement verifies with its receipts (verify_statement), each receipt is proved
       against the root, no receipt or session is settled by two statements, and no two
       statements of one pair (same swarm, same two parties, either the issuer) have
       overlapping periods (DuplicateReceipt): they could bill one session twice.
    """
    by_id: dict[str, tuple[Receipt, int]] = {}
    owners: dict[tuple[str, str, int] | tuple[str, str, str, int], tuple[str, int]] = {}
    settled: dict[str | tuple[str, str, str], int] = {}
    periods: dict[tuple[str, frozenset[str]], list[tuple[float, float, int]]] = {}
    statements = 0
    for index, raw in enumerate(docs):
        rid: str | None = None
        try:
            doc = normalize_document(raw)
            receipts = [doc["receipt"]] if doc["kind"] == "receipt" else doc["receipts"]
            in_doc: set[str] = set()
            for receipt in receipts:
                rid = receipt.receipt_id
                if rid in in_doc:
                    raise DuplicateReceipt("occurs twice in this document")
                in_doc.add(rid)
                _merge(by_id, owners, receipt, index)
            rid = None
            if doc["kind"] == "statement":
                _check_statement(doc["statement"], receipts, settled, index)
                _check_period(doc["statement"], periods, index)
                statements += 1
        except ShizaError as exc:
            raise _at(index, rid, exc) from None
    latest: dict[tuple[str, str, str], Receipt] = {}
    for receipt, _ in by_id.values():
        key = (receipt.server, receipt.client, receipt.session_id)
        if key not in latest or receipt.checkpoint > latest[key].checkpoint:
            latest[key] = receipt
    return VerifyReport(
        documents=len(docs),
        receipts=len(by_id),
        countersigned=sum(1 for r, _ in by_id.values() if r.is_countersigned),
        sessions=len(latest),
        statements=statements,
        prefill_tokens=sum(r.prefill_tokens for r in latest.values()),
        decode_tokens=sum(r.decode_tokens for r in latest.values()),
        work_units=sum(r.work_units for r in latest.values()),
    )


def _merge(by_id: dict[str, tuple[Receipt, int]], owners: dict[Any, tuple[str, int]], receipt: Receipt, index: int) -> None:
    held = by_id.get(receipt.receipt_id)
    if held is not None:
        other, where = held
        same_body = other.body_wire() == receipt.body_wire() and other.server_sig == receipt.server_sig
        if not same_body or (other.client_sig and receipt.client_sig and other.client_sig != receipt.client_sig):
            raise DuplicateReceipt(f"differs from the receipt with this id in document {where}")
        if receipt.is_countersigned and not other.is_countersigned:
            verify_receipt(receipt)
            by_id[receipt.receipt_id] = (receipt, index)
        return
    verify_receipt(receipt)
    for key in ((receipt.server, receipt.client, receipt.seq), (receipt.server, receipt.client, receipt.session_id, receipt.checkpoint)):
        other_id, where = owners.setdefault(key, (receipt.receipt_id, index))
        if other_id != receipt.receipt_id:
            what = "seq" if len(key) == 3 else "session checkpoint"
            raise DuplicateReceipt(f"reuses the {what} of receipt {other_id} (document {where})")
    by_id[receipt.receipt_id] = (receipt, index)


def _check_statement(statement: Statement, receipts: list[Receipt], settled: dict[Any, int], index: int) -> None:
    verify_statement(statement, receipts)
    ordered = sorted(receipts, key=lambda r: (r.server, r.client, r.seq))
    leaves = [receipt_leaf(r) for r in ordered]
    for position, (receipt, proof) in enumerate(zip(ordered, merkle_proofs(leaves))):
        try:
            verify_proof(leaves[position], position, len(leaves), proof, statement.merkle_root)
        except ShizaError as exc:
            raise type(exc)(f"receipt {receipt.receipt_id}: {exc.message}", code=exc.code) from None
    for receipt in ordered:
        for key in (receipt.receipt_id, (receipt.server, receipt.client, receipt.session_id)):
            where = settled.setdefault(key, index)
            if where != index:
                raise DuplicateReceipt(f"receipt {receipt.receipt_id}: already settled by the statement in document {where}")


def _check_period(statement: Statement, periods: dict[Any, list[tuple[float, float, int]]], index: int) -> None:
    """Refuse a statement whose period [start, end) overlaps that of an earlier statement of
    the same swarm and pair (either party the issuer). Empty periods overlap nothing."""
    start, end = statement.period_start, statement.period_end
    held = periods.setdefault((statement.swarm_id, frozenset((statement.issuer, statement.counterparty))), [])
    for other_start, other_end, where in held:
        if start < other_end and other_start < end:
            raise DuplicateReceipt(
                f"statement period [{start!r}, {end!r}) overlaps the period [{other_start!r}, {other_end!r}) "
                f"of the statement in document {where} for the same parties"
            )
    held.append((start, end, index))
