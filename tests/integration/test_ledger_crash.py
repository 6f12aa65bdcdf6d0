"""SIGKILL a process that is appending to the ledger, again and again, on one file.

The child appends as fast as it can and prints each receipt_id once ``append`` has returned.
Whatever it printed was durable, so after each kill the ledger must open, verify, and hold every
printed id, in the order printed. The same file carries over from kill to kill, so each child
also recovers the previous child's WAL.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
from pathlib import Path

from node.ledger.store import Ledger
from protocol.identity import Identity
from protocol.receipts import Receipt

OWNER = Identity.from_seed(b"o" * 32)  # the children's too
ROOT = Path(__file__).resolve().parents[2]
ROUNDS = 20

# argv: ledger path, round number. Prints "open" once the ledger is open, then one id a line.
CHILD = """
import sys
from node.ledger.store import Ledger
from protocol.identity import Identity
led = Ledger.open(sys.argv[1], Identity.from_seed(b"o" * 32))
print("open", flush=True)
i = 0
while True:
    i += 1
    rid = f"{sys.argv[2]}-{i}"
    led.append(receipt_id=rid, server="S", client="C", seq=led.next_seq("S", "C"),
               session_id=rid, checkpoint=i, final=i % 2 == 0, status="countersigned",
               reason="", prefill_tokens=i, decode_tokens=i, work_units=2 * i,
               ended_at=float(i), receipt=b"receipt " + rid.encode() * 8)
    print(rid, flush=True)
"""


def test_sigkill_never_loses_a_committed_entry(tmp_path: Path) -> None:
    rng = random.Random(os.environ.get("LEDGER_CRASH_SEED", "0"))
    path = tmp_path / "ledger.db"
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    reported: list[str] = []
    for rnd in range(ROUNDS):
        # Some rounds kill before the child has even opened the file (mid-create or mid-recovery).
        wait_lines = 0 if rnd % 5 == 0 else rng.randint(1, 300)
        child = subprocess.Popen(
            [sys.executable, "-c", CHILD, str(path), str(rnd)],
            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        assert child.stdout is not None
        seen = 0
        try:
            while seen < wait_lines:
                line = child.stdout.readline()
                assert line, f"child exited early: {child.stderr.read() if child.stderr else ''}"
                seen += 1
                if line.strip() != "open":
                    reported.append(line.strip())
        finally:
            child.send_signal(signal.SIGKILL)
            out, err = child.communicate(timeout=30)
        assert child.returncode == -signal.SIGKILL, err
        # Lines already in the pipe were printed after their append returned: durable too.
        reported += [ln for ln in out.split() if ln != "open"]

        with Ledger.open(path, OWNER) as led:  # verifies the chain, the signed head, the head file
            ids = [e.receipt_id for e in led.entries()]
            assert led.verify_chain() == len(ids)
        # Every reported id is present, in order; at most one more may have committed unreported
        # (killed between the commit and the print).
        assert ids[: len(reported)] == reported
        assert len(ids) - len(reported) <= 1
        if len(ids) > len(reported):
            reported.append(ids[-1])
    assert len(reported) > ROUNDS


# ---- a serving node killed right after it sent a receipt -------------------------------------

SERVER_EVERY = 4  # receipt every 4 tokens: the 5-token prefill carries one


async def _receipt_of_one_session(host, node, model_id: str) -> Receipt:
    """Open a session on ``node``, send one prefill, return the receipt its result carries
    (the test never answers it: no countersignature, no dispute)."""
    from node.net.wire import int64_tensor, recv_message, send_message
    from protocol.ids import INFERENCE_PROTOCOL
    from protocol.messages import OpenSession, SessionOpened, Step, StepResult

    await host.connect(node.addr)
    stream = await host.open_stream(node.peer_id, INFERENCE_PROTOCOL)
    await send_message(stream, OpenSession(model_id, 0, 6, 64))
    assert isinstance(await recv_message(stream, 30), SessionOpened)
    prompt = [1, 504, 3458, 282, 4649]
    await send_message(stream, Step(0, int64_tensor([prompt]), int64_tensor([list(range(5))])))
    result = await recv_message(stream, 30)
    assert isinstance(result, StepResult) and result.receipt is not None, result
    return Receipt.from_bytes(result.receipt)


async def test_server_killed_after_sending_a_receipt_never_reuses_its_seq(tiny_model, tmp_path: Path) -> None:
    """The server stores a receipt before it sends it: SIGKILLed the moment the client holds
    one, the restarted node still has it and numbers the next receipt for that client higher
    (the old code stored only after the client's answer, so it reissued the same seq, and so
    the same receipt id, with other content)."""
    from node.devtools.localswarm import start_node, stop_all
    from node.engine.registry import resolve_model
    from node.net.host import open_host

    model_id = resolve_model(str(tiny_model)).model_id
    data_dir = tmp_path / "node"
    args = ["--receipt-every", str(SERVER_EVERY)]
    node = start_node(data_dir, model=str(tiny_model), layers=(0, 6), extra_args=args)
    try:
        node.wait_ready(120)
        async with open_host(b"k" * 32) as host:
            sent = await _receipt_of_one_session(host, node, model_id)
            node.proc.send_signal(signal.SIGKILL)  # the client holds the receipt: kill now
            node.proc.wait(30)
    finally:
        stop_all([node])
    assert node.proc.returncode == -signal.SIGKILL

    node = start_node(data_dir, model=str(tiny_model), layers=(0, 6), extra_args=args)
    try:
        node.wait_ready(120)
        async with open_host(b"k" * 32) as host:
            after = await _receipt_of_one_session(host, node, model_id)
    finally:
        stop_all([node])
    assert after.client == sent.client and after.server == sent.server
    assert after.seq > sent.seq and after.receipt_id != sent.receipt_id
    identity = Identity.load_or_create(data_dir)
    with Ledger.open(data_dir / "ledger.sqlite", identity.peer_id) as led:
        kept = led.get(sent.receipt_id)
    assert kept is not None, "the receipt sent before the kill is not in the server's ledger"
    assert Receipt.from_bytes(kept.receipt) == sent and kept.status == "server_only"
