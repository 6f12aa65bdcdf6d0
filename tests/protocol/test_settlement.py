from __future__ import annotations

import dataclasses
import hashlib
import json

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from protocol import (
    PURPOSE_RECEIPT,
    PURPOSE_STATEMENT,
    PURPOSE_STATEMENT_COUNTERSIGN,
    BadProof,
    DuplicateReceipt,
    InvalidMessage,
    InvalidSignature,
    KeyMismatch,
    LimitExceeded,
    MalformedFrame,
    ReceiptMismatch,
    ShizaError,
    Statement,
    UnsupportedVersion,
    build_statement,
    canonical_pack,
    cosign_statement,
    decode_document,
    encode_document,
    merkle_proof,
    merkle_root,
    receipt_leaf,
    settleable,
    verify,
    verify_documents,
    verify_proof,
    verify_statement,
)
from protocol.settlement import merkle_proofs

from .receipt_helpers import CLIENT, OTHER, SERVER, T0, make_history, make_receipt


def h(data: bytes) -> bytes:
    return hashlib.sha256(data).digest()


def reference_root(leaves: list[bytes]) -> bytes:
    """RFC 6962 MTH, written as the RFC states it."""
    if not leaves:
        return h(b"")
    if len(leaves) == 1:
        return leaves[0]
    k = 1
    while k * 2 < len(leaves):
        k *= 2
    return h(b"\x01" + reference_root(leaves[:k]) + reference_root(leaves[k:]))


LEAVES = [h(b"\x00" + bytes([i])) for i in range(17)]


def test_merkle_root_matches_rfc_6962() -> None:
    assert merkle_root([]) == h(b"")
    for n in range(1, 18):
        assert merkle_root(LEAVES[:n]) == reference_root(LEAVES[:n])
    assert merkle_root(LEAVES[:2]) == h(b"\x01" + LEAVES[0] + LEAVES[1])


def test_every_proof_of_trees_up_to_17_verifies_and_no_byte_can_change() -> None:
    for n in range(1, 18):
        leaves = LEAVES[:n]
        root = merkle_root(leaves)
        all_proofs = merkle_proofs(leaves)
        for index in range(n):
            proof = merkle_proof(leaves, index)
            assert proof == all_proofs[index]
            verify_proof(leaves[index], index, n, proof, root)
            for other in (index + 1, n + 1):
                with pytest.raises(BadProof):
                    verify_proof(leaves[index], other, n, proof, root)
            with pytest.raises(BadProof):
                verify_proof(leaves[index], index, n, proof + [LEAVES[0]], root)
            if proof:
                with pytest.raises(BadProof):
                    verify_proof(leaves[index], index, n, proof[:-1], root)
            for target in range(len(proof) + 2):  # leaf, each path element, root
                for byte in (0, 31):
                    leaf, path, top = bytearray(leaves[index]), [bytearray(p) for p in proof], bytearray(root)
                    victim = leaf if target == 0 else top if target == len(proof) + 1 else path[target - 1]
                    victim[byte] ^= 0x01
                    with pytest.raises(BadProof):
                        verify_proof(bytes(leaf), index, n, [bytes(p) for p in path], bytes(top))


def test_settleable_picks_latest_countersigned_checkpoint_per_session() -> None:
    history = make_history(3)
    # sess-2's final checkpoint was disputed: only its checkpoint 0 is settleable.
    history[5] = dataclasses.replace(history[5], client_sig=b"")
    chosen = settleable(history, party_a=CLIENT.peer_id, party_b=SERVER.peer_id, until=None)
    assert chosen == [history[1], history[3], history[4]]
    # A session whose latest checkpoint ends after `until` waits for a later statement.
    assert settleable(history, party_a=SERVER.peer_id, party_b=CLIENT.peer_id, until=T0 + 100.5) == [history[1]]
    third = make_receipt(SERVER, OTHER, seq=1)
    assert settleable(history + [third], party_a=SERVER.peer_id, party_b=CLIENT.peer_id, until=None) == chosen
    with pytest.raises(DuplicateReceipt):
        settleable(history + [history[0]], party_a=SERVER.peer_id, party_b=CLIENT.peer_id, until=None)
    reused_seq = make_receipt(seq=1, session_id="x", swarm_id="elsewhere")
    with pytest.raises(DuplicateReceipt):
        settleable(history + [reused_seq], party_a=SERVER.peer_id, party_b=CLIENT.peer_id, until=None)


def both_directions() -> list:
    # CLIENT also served SERVER: statements cover both directions.
    return make_history(4) + make_history(2, server=CLIENT, client=SERVER, seq0=1)


def test_statement_build_cosign_verify_round_trip() -> None:
    receipts = both_directions()
    statement = build_statement(SERVER, CLIENT.peer_id, receipts, period_start=T0, period_end=T0 + 1000)
    chosen = settleable(receipts, party_a=SERVER.peer_id, party_b=CLIENT.peer_id, until=T0 + 1000)
    assert statement.count == 6 == len(chosen)
    assert statement.work_units == sum(r.work_units for r in chosen)
    assert statement.merkle_root == merkle_root([receipt_leaf(r) for r in chosen])
    verify_statement(statement, chosen)
    verify_statement(statement, list(reversed(chosen)))  # order of the argument does not matter
    with pytest.raises(InvalidSignature):
        verify_statement(statement, chosen, require_countersigned=True)
    cosigned = cosign_statement(CLIENT, statement, list(reversed(receipts)))
    verify_statement(cosigned, chosen, require_countersigned=True)
    assert Statement.from_bytes(cosigned.to_bytes()) == cosigned
    assert cosigned.signed_bytes() == PURPOSE_STATEMENT + canonical_pack(cosigned.body_wire())
    assert cosigned.countersigned_bytes() == (
        PURPOSE_STATEMENT_COUNTERSIGN + canonical_pack(cosigned.body_wire()) + cosigned.issuer_sig
    )
    with pytest.raises(KeyMismatch):
        cosign_statement(OTHER, statement, receipts)


def test_cosign_refuses_when_receipts_differ() -> None:
    receipts = make_history(4)
    statement = build_statement(SERVER, CLIENT.peer_id, receipts, period_start=T0, period_end=T0 + 1000)
    with pytest.raises(BadProof, match="count 4 != 3"):
        cosign_statement(CLIENT, statement, receipts[:-2])
    inflated = build_statement(
        SERVER, CLIENT.peer_id, receipts[:-1] + [make_receipt(seq=8, session_id="sess-3", checkpoint=1, decode=99)],
        period_start=T0, period_end=T0 + 1000,
    )
    with pytest.raises(BadProof, match="tokens"):
        cosign_statement(CLIENT, inflated, receipts)
    forged = dataclasses.replace(statement, work_units=statement.work_units + 1)
    with pytest.raises(InvalidSignature):
        cosign_statement(CLIENT, forged, receipts)


def test_verify_statement_rejects_tampering() -> None:
    receipts = make_history(4)
    statement = cosign_statement(
        CLIENT, build_statement(SERVER, CLIENT.peer_id, receipts, period_start=T0, period_end=T0 + 1000), receipts
    )
    chosen = settleable(receipts, party_a=SERVER.peer_id, party_b=CLIENT.peer_id, until=None)
    for change in (dict(count=5), dict(work_units=1), dict(merkle_root=bytes(32)), dict(period_end=T0 + 2000)):
        with pytest.raises(InvalidSignature):
            verify_statement(dataclasses.replace(statement, **change), chosen)  # type: ignore[arg-type]
    with pytest.raises(BadProof):
        verify_statement(statement, chosen[:-1])
    with pytest.raises(DuplicateReceipt):
        verify_statement(statement, chosen + [chosen[0]])
    with pytest.raises(DuplicateReceipt):  # two checkpoints of one session
        verify_statement(statement, chosen[:-1] + [receipts[6], receipts[7]])
    with pytest.raises(BadProof):
        verify_statement(statement, chosen[:-1] + [make_receipt(SERVER, OTHER, seq=50)])
    with pytest.raises(InvalidSignature):
        verify_statement(statement, chosen[:-1] + [dataclasses.replace(chosen[-1], client_sig=b"")])
    # The signatures do not cross purposes.
    body = canonical_pack(statement.body_wire())
    with pytest.raises(InvalidSignature):
        verify(SERVER.public_key, PURPOSE_RECEIPT, body, statement.issuer_sig)
    with pytest.raises(InvalidSignature):
        verify_statement(dataclasses.replace(statement, issuer_sig=SERVER.sign(PURPOSE_RECEIPT, body)), chosen)
    with pytest.raises(InvalidSignature):
        verify_statement(
            dataclasses.replace(statement, counterparty_sig=CLIENT.sign(PURPOSE_STATEMENT, body + statement.issuer_sig)),
            chosen,
        )
    with pytest.raises(MalformedFrame):
        Statement.from_bytes(msgpack.packb(dict(reversed(list(statement.to_wire().items()))), use_bin_type=True))


def test_consecutive_periods_over_the_same_receipts_do_not_rebill() -> None:
    """Attack: settle [T0, T0 + 250), then [T0 + 250, T0 + 1000) over the same ledger: the
    second statement must not bill the sessions the first one already settled."""
    receipts = make_history(5)  # session s's latest checkpoint ends at T0 + 100 s + 1
    first = build_statement(SERVER, CLIENT.peer_id, receipts, period_start=T0, period_end=T0 + 250)
    second = build_statement(SERVER, CLIENT.peer_id, receipts, period_start=T0 + 250, period_end=T0 + 1000)
    everything = settleable(receipts, party_a=SERVER.peer_id, party_b=CLIENT.peer_id, until=None)
    assert (first.count, second.count) == (3, 2)
    assert first.work_units + second.work_units == sum(r.work_units for r in everything)
    # The window is [since, until): a receipt ending exactly at a boundary is in the later one.
    assert settleable(receipts, party_a=SERVER.peer_id, party_b=CLIENT.peer_id,
                      since=T0 + 101, until=T0 + 201) == [receipts[3]]
    # Each side of the boundary verifies only with its own receipts; the counterparty agrees.
    cosign_statement(CLIENT, second, receipts)
    verify_statement(second, everything[3:])
    with pytest.raises(BadProof, match="before the statement's period"):
        verify_statement(second, everything[2:])


def test_a_session_checkpointed_again_after_its_period_is_refused_in_the_next() -> None:
    """Receipts are cumulative: a session whose later checkpoint ends in the next period would
    bill its earlier work again. Each statement is right on its own; verified together, the
    session is refused as settled twice."""
    early = make_receipt(seq=1, checkpoint=0, ended_at=T0 + 10)
    later = make_receipt(seq=2, checkpoint=1, decode=9, ended_at=T0 + 300)
    docs = []
    for since, until, receipts in ((T0, T0 + 250, [early]), (T0 + 250, T0 + 1000, [early, later])):
        statement = build_statement(SERVER, CLIENT.peer_id, receipts, period_start=since, period_end=until)
        covered = settleable(receipts, party_a=SERVER.peer_id, party_b=CLIENT.peer_id, since=since, until=until)
        docs.append({"v": 0, "kind": "statement", "statement": statement, "receipts": covered})
    assert [d["receipts"] for d in docs] == [[early], [later]]
    with pytest.raises(DuplicateReceipt, match="document 1, receipt .* already settled"):
        verify_documents(docs)


def test_verify_refuses_overlapping_statements_for_one_pair() -> None:
    """Attack: two statements whose periods overlap, over disjoint receipts, both verified."""
    receipts = make_history(5)
    chosen = settleable(receipts, party_a=SERVER.peer_id, party_b=CLIENT.peer_id, until=None)

    def doc(since: float, until: float, issuer=SERVER, counterparty=CLIENT) -> dict:
        statement = build_statement(issuer, counterparty.peer_id, receipts, period_start=since, period_end=until)
        covered = [r for r in chosen if since <= r.ended_at < until]
        return {"v": 0, "kind": "statement", "statement": statement, "receipts": covered}

    early, late = doc(T0, T0 + 250), doc(T0 + 240, T0 + 1000)  # sessions 0-2 and 3-4, no receipt shared
    with pytest.raises(DuplicateReceipt, match=r"document 1: .*overlaps .*document 0"):
        verify_documents([early, late])
    # Issued by the other party, or empty, it is the same pair and the same overlap.
    with pytest.raises(DuplicateReceipt, match="overlaps"):
        verify_documents([early, doc(T0 + 240, T0 + 1000, issuer=CLIENT, counterparty=SERVER)])
    # Adjacent periods are fine, as are periods of another pair.
    assert verify_documents([early, doc(T0 + 250, T0 + 1000)]).statements == 2
    other = build_statement(SERVER, OTHER.peer_id, [], period_start=T0, period_end=T0 + 1000)
    assert verify_documents([early, {"v": 0, "kind": "statement", "statement": other, "receipts": []}]).statements == 2


def statement_doc() -> dict:
    receipts = make_history(3)
    statement = build_statement(SERVER, CLIENT.peer_id, receipts, period_start=T0, period_end=T0 + 1000)
    chosen = settleable(receipts, party_a=SERVER.peer_id, party_b=CLIENT.peer_id, until=None)
    return {"v": 0, "kind": "statement", "statement": cosign_statement(CLIENT, statement, receipts), "receipts": chosen}


@pytest.mark.parametrize("fmt", ["json", "msgpack"])
def test_documents_round_trip(fmt: str) -> None:
    history = make_history(3) + [make_receipt(seq=99, session_id="open", cosign=False)]
    docs = [
        {"v": 0, "kind": "receipt", "receipt": history[0]},
        {"v": 0, "kind": "receipts", "owner": SERVER.peer_id, "exported_at": T0 + 5000, "receipts": history},
        statement_doc(),
    ]
    for doc in docs:
        data = encode_document(doc, fmt)
        assert (data[:1] == b"{") == (fmt == "json")
        assert decode_document(data) == doc
        assert decode_document(encode_document(decode_document(data), fmt)) == doc
    if fmt == "json":
        wire = json.loads(encode_document(docs[0], "json"))
        assert set(wire["receipt"]["io_digest"]) == {"$b64"}
    report = verify_documents([decode_document(encode_document(d, fmt)) for d in docs])
    assert (report.documents, report.receipts, report.countersigned, report.sessions, report.statements) == (3, 7, 6, 4, 1)
    assert report.work_units == sum(r.work_units for r in (history[1], history[3], history[5], history[6]))


@pytest.mark.parametrize("fmt", ["json", "msgpack"])
def test_every_byte_flip_of_a_signed_document_is_rejected(fmt: str) -> None:
    for doc in ({"v": 0, "kind": "receipt", "receipt": make_receipt()}, statement_doc()):
        data = encode_document(doc, fmt)
        for i in range(len(data)):
            for mask in (0x01, 0x80):
                tampered = bytearray(data)
                tampered[i] ^= mask
                with pytest.raises(ShizaError):
                    verify_documents([decode_document(bytes(tampered))])


def test_duplicates_and_replays_across_documents() -> None:
    history = make_history(3)
    export = {"v": 0, "kind": "receipts", "owner": SERVER.peer_id, "exported_at": T0, "receipts": history}
    # The same receipt in an export and a statement, or server-only and countersigned, is fine.
    server_only = {"v": 0, "kind": "receipt", "receipt": dataclasses.replace(history[0], client_sig=b"")}
    assert verify_documents([export, statement_doc(), server_only]).receipts == 6
    replayed = dict(export, receipts=history + [history[2]])
    with pytest.raises(DuplicateReceipt, match=f"document 0, receipt {history[2].receipt_id}"):
        verify_documents([replayed])
    # One seq, two receipts (another swarm gives another id).
    reuse = make_receipt(seq=history[1].seq, session_id="new", swarm_id="elsewhere")
    with pytest.raises(DuplicateReceipt, match=f"document 1, receipt {reuse.receipt_id}"):
        verify_documents([export, {"v": 0, "kind": "receipt", "receipt": reuse}])
    # One checkpoint of a session signed twice under two seqs.
    twice = make_receipt(seq=50, session_id="sess-0", checkpoint=0)
    with pytest.raises(DuplicateReceipt, match="session checkpoint"):
        verify_documents([export, {"v": 0, "kind": "receipt", "receipt": twice}])
    # The same sessions settled by two statements.
    with pytest.raises(DuplicateReceipt, match="document 1, receipt .* already settled"):
        verify_documents([statement_doc(), statement_doc()])


def test_verify_documents_names_the_document_and_receipt() -> None:
    history = make_history(2)
    bad = dataclasses.replace(history[3], decode_tokens=history[3].decode_tokens + 1)
    export = {"v": 0, "kind": "receipts", "owner": SERVER.peer_id, "exported_at": T0, "receipts": history[:3] + [bad]}
    with pytest.raises(ReceiptMismatch, match=f"^document 1, receipt {bad.receipt_id}: work_units"):
        verify_documents([{"v": 0, "kind": "receipt", "receipt": history[0]}, export])
    forged = dataclasses.replace(history[3], client_sig=OTHER.sign(PURPOSE_RECEIPT, b"x"))
    with pytest.raises(InvalidSignature, match=f"document 0, receipt {forged.receipt_id}"):
        verify_documents([dict(export, receipts=[forged])])


def test_document_parsing_is_strict() -> None:
    doc = {"v": 0, "kind": "receipt", "receipt": make_receipt()}
    wire = json.loads(encode_document(doc, "json"))
    cases = [
        (dict(wire, v=1), UnsupportedVersion),
        (dict(wire, kind="other"), InvalidMessage),
        (dict(wire, extra=1), InvalidMessage),
        ({"v": 0, "kind": "receipt"}, InvalidMessage),
    ]
    for obj, error in cases:
        with pytest.raises(error):
            decode_document(json.dumps(obj).encode())
    sig = wire["receipt"]["server_sig"]["$b64"]
    for text in (sig[:-3] + chr(ord(sig[-3]) ^ 1) + "==", "!!", sig + "A"):  # non-canonical, invalid
        bad = json.loads(json.dumps(wire))
        bad["receipt"]["server_sig"]["$b64"] = text
        with pytest.raises(ShizaError):
            verify_documents([decode_document(json.dumps(bad).encode())])
    for data in (b"{" * 100_000, b"{", b"\xc1", json.dumps(dict(wire, exported_at=float("nan"))).encode(),
                 b"[" + b"[" * 50 + b"]" * 51):
        with pytest.raises(ShizaError):
            decode_document(data)
    with pytest.raises(LimitExceeded):
        decode_document(json.dumps({"v": 0, "kind": "receipts", "x": [[[[[[[[[[[[[[[[[[[1]]]]]]]]]]]]]]]]]]]}).encode())


@settings(max_examples=25, deadline=None)
@given(st.lists(st.binary(min_size=32, max_size=32), min_size=1, max_size=40), st.data())
def test_any_tree_proves_any_leaf(leaves: list[bytes], data: st.DataObject) -> None:
    index = data.draw(st.integers(0, len(leaves) - 1))
    root = merkle_root(leaves)
    assert root == reference_root(leaves)
    verify_proof(leaves[index], index, len(leaves), merkle_proof(leaves, index), root)
