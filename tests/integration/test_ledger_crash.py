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
