"""Builders for receipt and settlement tests."""

from __future__ import annotations

import hashlib

from protocol import Identity, Receipt, countersign_receipt, receipt_id_for, sign_receipt

MODEL = "SmolLM2-135M-Instruct@0123456789abcdef"
T0 = 1_700_000_000.0
SERVER = Identity.from_seed(b"s" * 32)
CLIENT = Identity.from_seed(b"c" * 32)
OTHER = Identity.from_seed(b"o" * 32)


def make_receipt(
    server: Identity = SERVER,
    client: Identity = CLIENT,
    *,
    seq: int = 1,
    session_id: str = "sess-1",
    checkpoint: int = 0,
    prefill: int = 10,
    decode: int = 5,
    start: int = 0,
    end: int = 10,
    ended_at: float = T0 + 10,
    swarm_id: str = "public",
    final: bool = False,
    sign: bool = True,
    cosign: bool = True,
) -> Receipt:
    receipt = Receipt(
        receipt_id=receipt_id_for(swarm_id, server.peer_id, client.peer_id, seq),
        swarm_id=swarm_id,
        model_id=MODEL,
        start=start,
        end=end,
        server=server.peer_id,
        client=client.peer_id,
        session_id=session_id,
        seq=seq,
        checkpoint=checkpoint,
        final=final,
        prefill_tokens=prefill,
        decode_tokens=decode,
        work_units=(prefill + decode) * (end - start),
        started_at=T0,
        ended_at=ended_at,
        unit_price=0.5,
        io_digest=hashlib.sha256(session_id.encode() + bytes([checkpoint % 256])).digest(),
    )
    if sign:
        receipt = sign_receipt(server, receipt)
        if cosign:
            receipt = countersign_receipt(client, receipt)
    return receipt


def make_history(n_sessions: int = 5, server: Identity = SERVER, client: Identity = CLIENT, seq0: int = 1) -> list[Receipt]:
    """Each session has checkpoints 0 and 1 (final); seqs increase across the whole history."""
    out = []
    seq = seq0
    for s in range(n_sessions):
        for cp in range(2):
            out.append(
                make_receipt(
                    server, client, seq=seq, session_id=f"sess-{s}", checkpoint=cp, prefill=10 + s,
                    decode=cp * 7 + s, ended_at=T0 + 100 * s + cp, final=cp == 1,
                )
            )
            seq += 1
    return out
