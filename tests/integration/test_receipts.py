"""Receipts from real nodes and a real client on loopback, through to settlement and verify."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from node.client.swarm import SwarmClient
from node.engine.registry import resolve_model
from node.ledger.store import Ledger
from node.devtools.localswarm import start_chain, stop_all
from protocol.identity import Identity
from protocol.receipts import Receipt, latest_per_session, verify_receipt

PROMPT = [1, 504, 3458, 282, 4649, 314]
EVERY = 4


def shiza(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "node", *args], capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def swarm(tiny_model, tmp_path_factory):
    nodes = start_chain(tmp_path_factory.mktemp("rswarm"), [(0, 2), (2, 4), (4, 6)], model=str(tiny_model),
                        extra_args=["--receipt-every", str(EVERY)], timeout_s=120)
    yield nodes
    stop_all(nodes)


def ledger_receipts(data_dir: Path) -> list[tuple[Receipt, str]]:
    with Ledger.open(data_dir / "ledger.sqlite", Identity.load_or_create(data_dir)) as ledger:
        return [(Receipt.from_bytes(e.receipt), e.status) for e in ledger.entries()]


async def test_dual_signed_receipts_count_what_was_generated(swarm, tiny_model, tmp_path):
    model_id = resolve_model(str(tiny_model)).model_id
    new_tokens = 10
    async with SwarmClient.open([swarm[0].addr], data_dir=tmp_path / "agent") as client:
        result = await client.generate(model_id, [PROMPT], max_new_tokens=new_tokens)
        me = client.identity.peer_id
    assert len(result.token_ids[0]) == new_tokens

    mine = ledger_receipts(tmp_path / "agent")
    assert mine and all(status == "countersigned" for _, status in mine)
    finals = latest_per_session([r for r, _ in mine])
    assert sorted((r.start, r.end) for r in finals) == [(0, 2), (2, 4), (4, 6)]
    for r in finals:
        verify_receipt(r, require_countersigned=True)
        assert r.final and r.client == me
        # Step 0 carries the prompt; each later step one token; the last token is not fed back.
        assert (r.prefill_tokens, r.decode_tokens) == (len(PROMPT), new_tokens - 1)
        assert r.work_units == (len(PROMPT) + new_tokens - 1) * (r.end - r.start)
    # Checkpoints every EVERY tokens: more than one receipt per session, seq strictly rising.
    for node in swarm:
        per_node = sorted(r.seq for r, _ in mine if r.server == node.peer_id)
        assert len(per_node) >= 2 and per_node == sorted(set(per_node))

    # The servers hold the same receipts, countersigned.
    for node in swarm:
        theirs = {r.receipt_id: (r, s) for r, s in ledger_receipts(node.data_dir) if r.client == me}
        for r, _ in mine:
            if r.server == node.peer_id:
                assert theirs[r.receipt_id] == (r, "countersigned")


async def test_settle_cosign_verify_and_tamper(swarm, tiny_model, tmp_path):
    model_id = resolve_model(str(tiny_model)).model_id
    agent_dir = tmp_path / "agent"
    async with SwarmClient.open([swarm[1].addr], data_dir=agent_dir) as client:
        await client.generate(model_id, [PROMPT], max_new_tokens=6)
        await client.generate(model_id, [PROMPT[:3]], max_new_tokens=5)
        me = client.identity.peer_id
    node = swarm[1]
    stmt = tmp_path / "statement.json"
    out = shiza("receipts", "settle", "--data-dir", str(node.data_dir), "--counterparty", me, "--out", str(stmt))
    assert out.returncode == 0, out.stderr
    doc = json.loads(stmt.read_text())
    assert doc["statement"]["count"] == 2
    cos = shiza("receipts", "cosign", "--data-dir", str(agent_dir), str(stmt))
    assert cos.returncode == 0, cos.stderr
    export = tmp_path / "export.msgpack"
    assert shiza("receipts", "export", "--data-dir", str(agent_dir), "--out", str(export)).returncode == 0
    ok = shiza("receipts", "verify", str(stmt), str(export))
    assert ok.returncode == 0, ok.stderr
    # The next period starts where this one ended: nothing is billed again, and the two verify.
    nxt = tmp_path / "next.json"
    since = repr(doc["statement"]["period_end"])
    out = shiza("receipts", "settle", "--data-dir", str(node.data_dir), "--counterparty", me,
                "--since", since, "--out", str(nxt))
    assert out.returncode == 0, out.stderr
    assert json.loads(nxt.read_text())["statement"]["count"] == 0
    both = shiza("receipts", "verify", str(stmt), str(nxt))
    assert both.returncode == 0, both.stderr

    # Inflate the tokens of one receipt in the statement: verify names the problem.
    bad = json.loads(stmt.read_text())
    bad["receipts"][0]["decode_tokens"] += 1
    tampered = tmp_path / "tampered.json"
    tampered.write_text(json.dumps(bad))
    res = shiza("receipts", "verify", str(tampered))
    assert res.returncode != 0 and "error" in res.stderr
    # A receipt replayed inside one export (counted twice) is refused.
    from protocol.documents import decode_document, encode_document

    doc = decode_document(export.read_bytes())
    doc["receipts"] = list(doc["receipts"]) + [doc["receipts"][0]]
    replayed = tmp_path / "replayed.msgpack"
    replayed.write_bytes(encode_document(doc, "msgpack"))
    dup = shiza("receipts", "verify", str(replayed))
    assert dup.returncode != 0 and "Duplicate" in dup.stderr

    listing = shiza("receipts", "list", "--data-dir", str(agent_dir), "--json")
    assert listing.returncode == 0
    assert {e["status"] for e in json.loads(listing.stdout)} == {"countersigned"}


def test_verify_refuses_overlapping_statements(tmp_path):
    """Attack: two statements of one pair whose periods overlap, over disjoint receipts, given
    to `shiza receipts verify` as real files: refused, exit 1, one line naming the overlap."""
    from protocol.documents import encode_document
    from protocol.settlement import build_statement, settleable
    from tests.protocol.receipt_helpers import CLIENT, SERVER, T0, make_history

    receipts = make_history(5)  # the latest checkpoint of session s ends at T0 + 100 s + 1
    files = []
    for name, since, until in (("early", T0, T0 + 250), ("late", T0 + 240, T0 + 1000)):
        statement = build_statement(SERVER, CLIENT.peer_id, receipts, period_start=since, period_end=until)
        covered = settleable(receipts, party_a=SERVER.peer_id, party_b=CLIENT.peer_id, since=since, until=until)
        assert covered and statement.count == len(covered)
        path = tmp_path / f"{name}.json"
        path.write_bytes(encode_document({"v": 0, "kind": "statement", "statement": statement, "receipts": covered}))
        files.append(str(path))
    assert shiza("receipts", "verify", files[0]).returncode == 0
    res = shiza("receipts", "verify", *files)
    assert res.returncode == 1, res.stdout
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and "overlaps" in lines[0] and "document 1" in lines[0], res.stderr


def test_client_killed_mid_generation_leaves_server_receipt(tiny_model, tmp_path):
    """SIGKILL the client while it streams: each server keeps a server-only receipt of the work."""
    nodes = start_chain(tmp_path / "k", [(0, 3), (3, 6)], model=str(tiny_model),
                        extra_args=["--receipt-every", "1000"], timeout_s=120)
    try:
        agent = Identity.load_or_create(tmp_path / "agent")
        gen = subprocess.Popen(
            [sys.executable, "-m", "node", "generate", "--raw", "--model", str(tiny_model),
             "--data-dir", str(tmp_path / "agent"), "--max-new-tokens", "2000",
             "--bootstrap", nodes[0].addr, "once upon a time"],
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
        )
        got = b""
        while len(got) < 40:  # tokens are streaming: the sessions are open and working
            chunk = gen.stdout.read1(64)  # type: ignore[union-attr]
            assert chunk, "generate ended before streaming"
            got += chunk
        gen.send_signal(signal.SIGKILL)
        gen.wait(10)
    finally:
        stop_all(nodes)
    for node in nodes:
        receipts = [(r, s) for r, s in ledger_receipts(node.data_dir) if r.client == agent.peer_id]
        assert len(receipts) == 1
        r, status = receipts[0]
        assert status == "server_only" and r.final
        verify_receipt(r)
        assert r.decode_tokens >= 5
