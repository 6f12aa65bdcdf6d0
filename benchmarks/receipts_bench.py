"""Receipt and statement throughput on one core (pynacl Ed25519, canonical msgpack).

    python -m benchmarks.receipts_bench            # 100,000 receipts in the statement
    python -m benchmarks.receipts_bench --n 10000
"""

from __future__ import annotations

import argparse
import os
import time

from protocol import (
    Identity,
    Receipt,
    build_statement,
    countersign_receipt,
    receipt_id_for,
    settleable,
    sign_receipt,
    verify_receipt,
    verify_statement,
)

T0 = 1_700_000_000.0


def _receipts(server: Identity, client: Identity, n: int) -> list[Receipt]:
    out = []
    for seq in range(1, n + 1):
        out.append(
            Receipt(
                receipt_id=receipt_id_for("public", server.peer_id, client.peer_id, seq), swarm_id="public",
                model_id="SmolLM2-135M-Instruct@0123456789abcdef", start=0, end=10, server=server.peer_id,
                client=client.peer_id, session_id=f"s{seq}", seq=seq, checkpoint=0, final=True,
                prefill_tokens=20, decode_tokens=44, work_units=640, started_at=T0, ended_at=T0 + seq,
                unit_price=None, io_digest=bytes(32),
            )
        )
    return out


def _rate(label: str, count: int, seconds: float) -> None:
    print(f"{label:<44} {count / seconds:>10,.0f} /s  ({seconds * 1e6 / count:,.1f} us each)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=100_000, help="receipts in the statement")
    parser.add_argument("--sample", type=int, default=5_000, help="receipts for the per-receipt rates")
    args = parser.parse_args()
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})  # one core
    server, client = Identity.generate(), Identity.generate()
    unsigned = _receipts(server, client, args.n)

    t = time.perf_counter()
    signed = [sign_receipt(server, r) for r in unsigned[: args.sample]]
    _rate("sign_receipt (server)", len(signed), time.perf_counter() - t)
    t = time.perf_counter()
    for r in signed:
        verify_receipt(r)
    _rate("verify_receipt (server signature)", len(signed), time.perf_counter() - t)
    t = time.perf_counter()
    cosigned = [countersign_receipt(client, r) for r in signed]
    _rate("countersign_receipt (verifies, then signs)", len(cosigned), time.perf_counter() - t)
    t = time.perf_counter()
    for r in cosigned:
        verify_receipt(r, require_countersigned=True)
    _rate("verify_receipt (both signatures)", len(cosigned), time.perf_counter() - t)

    t = time.perf_counter()
    receipts = cosigned + [countersign_receipt(client, sign_receipt(server, r)) for r in unsigned[args.sample :]]
    print(f"signed and countersigned {len(receipts):,} receipts in {time.perf_counter() - t:.1f} s")
    t = time.perf_counter()
    statement = build_statement(server, client.peer_id, receipts, period_start=T0, period_end=T0 + args.n)
    print(f"build_statement over {statement.count:,} receipts: {time.perf_counter() - t:.2f} s")
    chosen = settleable(receipts, party_a=server.peer_id, party_b=client.peer_id, until=None)
    t = time.perf_counter()
    verify_statement(statement, chosen, require_countersigned=False)
    print(f"verify_statement over {len(chosen):,} receipts: {time.perf_counter() - t:.2f} s")


if __name__ == "__main__":
    main()
