"""node.client.spotcheck: comparing outputs, and the checker's verdicts through a fake
CheckContext (no network: the context's replay answers with the tensors a test chose)."""

from __future__ import annotations

import hashlib
import random
import struct
import time
from collections.abc import Sequence

import pytest

from node.client.routing import Hop
from node.client.spotcheck import CheckedStep, SpotChecker, max_abs_diff, outputs_agree
from protocol.codec import Tensor
from protocol.disputes import verify_dispute
from protocol.identity import Identity
from protocol.messages import ServedSpan
from protocol.records import CapacityRecord, Hardware, sign_record


def f32(values: list[float], shape: tuple[int, ...] | None = None) -> Tensor:
    return Tensor("float32", shape or (1, 1, len(values)), struct.pack(f"<{len(values)}f", *values))


def test_hidden_states_agree_within_relative_tolerance() -> None:
    a = f32([100.0, -50.0, 1.0])
    assert outputs_agree(a, a, 1e-2) == (True, 0.0)
    assert outputs_agree(f32([100.5, -50.0, 1.0]), a, 1e-2)[0]  # 0.5 <= 1e-2 * 100
    ok, diff = outputs_agree(f32([102.0, -50.0, 1.0]), a, 1e-2)
    assert not ok and diff == 2.0
    # Small magnitudes are compared against 1, not against a tiny maximum.
    assert outputs_agree(f32([0.001, 0.0]), f32([0.005, 0.0]), 1e-2)[0]


def test_shape_or_dtype_mismatch_never_agrees() -> None:
    assert max_abs_diff(f32([1.0, 2.0]), f32([1.0, 2.0], (1, 2, 1))) == float("inf")
    ids = Tensor("int64", (2,), struct.pack("<2q", 5, 6))
    assert outputs_agree(ids, ids, 1.0)[0]
    assert not outputs_agree(ids, Tensor("int64", (2,), struct.pack("<2q", 5, 7)), 1.0)[0]


def test_half_precision_decoding() -> None:
    bf = Tensor("bfloat16", (2,), struct.pack("<2H", 0x3F80, 0x4000))  # 1.0, 2.0
    assert max_abs_diff(bf, Tensor("bfloat16", (2,), struct.pack("<2H", 0x3F80, 0x4040))) == 1.0  # 2 vs 3
    h = Tensor("float16", (1,), struct.pack("<e", 1.5))
    assert max_abs_diff(h, Tensor("float16", (1,), struct.pack("<e", 1.0))) == 0.5


# ---- verdicts ----------------------------------------------------------------------------------
def _id(name: str) -> Identity:
    return Identity.from_seed(hashlib.sha256(name.encode()).digest())


MODEL = "tiny@" + "0" * 16
REPORTER, ACCUSED = _id("reporter"), _id("accused")
WITNESSES = [_id(f"witness-{i}") for i in range(3)]


def _record(ident: Identity, start: int = 0, end: int = 6, state: str = "online") -> CapacityRecord:
    now = time.time()
    return sign_record(ident, CapacityRecord(
        ident.peer_id, (), (ServedSpan(MODEL, start, end, 6),), Hardware("cpu", "x", 0, 0), 10.0, 1000,
        state, 1, now, now + 60))


class FakeContext:
    """A CheckContext whose witnesses answer from ``answers`` (None: the witness failed)."""

    def __init__(self, answers: dict[str, Tensor | None], records: list[CapacityRecord],
                 avoided: frozenset[str] = frozenset(), history: dict[str, int] | None = None) -> None:
        self.answers = answers
        self._history = history or {}
        self.records = records
        self._avoided = avoided
        self.replayed: list[tuple[Hop, int]] = []

    @property
    def identity(self) -> Identity:
        return REPORTER

    @property
    def swarm_id(self) -> str:
        return "public"

    def known_records(self, model_id: str) -> Sequence[CapacityRecord]:
        assert model_id == MODEL
        return self.records

    def avoided(self) -> frozenset[str]:
        return self._avoided

    def history(self, peer_id: str) -> int:
        return self._history.get(peer_id, 0)

    async def replay(self, witness: Hop, history: Sequence[tuple[Tensor, Tensor, Tensor]]) -> Tensor | None:
        self.replayed.append((witness, len(history)))
        return self.answers.get(witness.peer_id)


def _step(output: Tensor, start: int = 0, end: int = 3, need_tokens: int = 0) -> CheckedStep:
    ids = Tensor("int64", (1, 2), struct.pack("<2q", 1, 2))
    history = [(ids, ids, ids), (ids, ids, ids)]
    return CheckedStep(MODEL, Hop(ACCUSED.peer_id, start, end, (), (0, 6)), "session-1", 1, history, output,
                       need_tokens=need_tokens)


GOOD, BAD = f32([1.0, 2.0, 3.0]), f32([1.5, 2.0, 3.0])


async def test_an_unsampled_step_is_skipped_without_asking_anyone() -> None:
    ctx = FakeContext({}, [_record(w) for w in WITNESSES])
    verdict = await SpotChecker(rate=0.0).check(ctx, _step(GOOD))
    assert verdict.outcome == "skipped" and verdict.output is GOOD and not ctx.replayed


async def test_agreeing_witnesses_replay_the_whole_history_and_agree() -> None:
    ctx = FakeContext({w.peer_id: GOOD for w in WITNESSES}, [_record(w) for w in WITNESSES] + [_record(ACCUSED)])
    checker = SpotChecker(rate=1.0, rng=random.Random(1))
    verdict = await checker.check(ctx, _step(GOOD))
    assert verdict.outcome == "agree" and verdict.dispute is None and verdict.accused is None
    assert len(ctx.replayed) == 2 and all(n == 2 for _, n in ctx.replayed)  # two witnesses, every step
    # Witnesses run exactly the checked layers, as sub-ranges of their spans; never the accused.
    assert {(h.start, h.end, h.span) for h, _ in ctx.replayed} == {(0, 3, (0, 6))}
    assert ACCUSED.peer_id not in {h.peer_id for h, _ in ctx.replayed}
    assert checker.checks == 1 and checker.agreeing_diffs == [0.0]


async def test_two_agreeing_witnesses_convict_with_a_signed_dispute_and_their_output() -> None:
    ctx = FakeContext({w.peer_id: GOOD for w in WITNESSES}, [_record(w) for w in WITNESSES])
    checker = SpotChecker(rate=1.0, rng=random.Random(2))
    verdict = await checker.check(ctx, _step(BAD))
    assert verdict.outcome == "disagree" and verdict.output is GOOD and verdict.accused == ACCUSED.peer_id
    record = verdict.dispute
    assert record is not None and checker.disputes == [record]
    verify_dispute(record)
    assert record.reporter == REPORTER.peer_id and record.step == 1 and record.session_id == "session-1"
    assert set(record.witnesses) == set(verdict.witnesses) and len(record.witnesses) == 2
    assert record.max_abs_diff == pytest.approx(0.5) and (record.start, record.end) == (0, 3)


async def test_one_witness_or_witnesses_that_disagree_prove_nothing() -> None:
    lone = FakeContext({WITNESSES[0].peer_id: GOOD}, [_record(WITNESSES[0])])
    checker = SpotChecker(rate=1.0)
    assert (await checker.check(lone, _step(BAD))).outcome == "inconclusive"
    split = FakeContext({WITNESSES[0].peer_id: GOOD, WITNESSES[1].peer_id: f32([9.0, 9.0, 9.0])},
                        [_record(WITNESSES[0]), _record(WITNESSES[1])])
    verdict = await checker.check(split, _step(BAD))
    assert verdict.outcome == "inconclusive" and verdict.output is BAD and verdict.dispute is None
    assert checker.inconclusive == 2 and not checker.disputes


async def test_avoided_draining_and_narrow_peers_are_no_witnesses() -> None:
    avoided, draining, narrow = WITNESSES
    ctx = FakeContext({}, [_record(avoided), _record(draining, state="draining"), _record(narrow, 0, 2)],
                      avoided=frozenset({avoided.peer_id}))
    checker = SpotChecker(rate=1.0)
    verdict = await checker.check(ctx, _step(BAD))
    assert verdict.outcome == "skipped" and not ctx.replayed and checker.checks == 0


async def test_witnesses_that_fail_leave_the_step_unjudged() -> None:
    ctx = FakeContext({w.peer_id: None for w in WITNESSES}, [_record(w) for w in WITNESSES])
    checker = SpotChecker(rate=1.0)
    verdict = await checker.check(ctx, _step(BAD))
    assert verdict.outcome == "skipped" and verdict.output is BAD and checker.checks == 1


# ---- issue 15: non-finite outputs, and witnesses routing would not use ---------------------------
NAN, INF = float("nan"), float("inf")


@pytest.mark.parametrize("values", [[1.0, NAN, 3.0], [NAN, NAN, NAN], [1.0, 2.0, INF], [-INF, 2.0, 3.0]])
def test_any_non_finite_value_is_disagreement(values: list[float]) -> None:
    odd = f32(values)
    assert not outputs_agree(odd, GOOD, 1e-2)[0]
    assert not outputs_agree(GOOD, odd, 1e-2)[0]
    assert not outputs_agree(odd, odd, 1e-2)[0]  # two NaN answers do not confirm each other


async def test_a_nan_output_is_disputed_by_agreeing_witnesses() -> None:
    ctx = FakeContext({w.peer_id: GOOD for w in WITNESSES}, [_record(w) for w in WITNESSES])
    verdict = await SpotChecker(rate=1.0, rng=random.Random(3)).check(ctx, _step(f32([1.0, NAN, 3.0])))
    assert verdict.outcome == "disagree" and verdict.accused == ACCUSED.peer_id and verdict.output is GOOD


async def test_witnesses_answering_nan_accuse_nobody() -> None:
    nan = f32([9.0, NAN, 3.0])  # wrong, and the NaN would hide that the two differ from each other
    ctx = FakeContext({w.peer_id: nan for w in WITNESSES}, [_record(w) for w in WITNESSES])
    checker = SpotChecker(rate=1.0, rng=random.Random(4))
    verdict = await checker.check(ctx, _step(GOOD))
    assert verdict.dispute is None and verdict.output is GOOD and not checker.disputes


def _roomless(ident: Identity, room: int) -> CapacityRecord:
    now = time.time()
    return sign_record(ident, CapacityRecord(
        ident.peer_id, (), (ServedSpan(MODEL, 0, 6, 6),), Hardware("cpu", "x", 0, 0), 10.0, room,
        "online", 1, now, now + 60))


async def test_witnesses_without_room_for_the_session_are_not_asked() -> None:
    """Two fakes that advertise no cache room (routing never picks them) answer zeros and agree:
    they must not get the honest node accused."""
    fakes = WITNESSES[:2]
    zeros = f32([0.0, 0.0, 0.0])
    ctx = FakeContext({w.peer_id: zeros for w in fakes}, [_roomless(w, 0) for w in fakes])
    checker = SpotChecker(rate=1.0, rng=random.Random(5))
    verdict = await checker.check(ctx, _step(GOOD, need_tokens=64))
    assert verdict.outcome == "skipped" and verdict.dispute is None and not ctx.replayed


async def test_witnesses_sharing_an_address_count_once() -> None:
    """Two identities behind one listening address are one operator: not two independent witnesses."""
    def at(ident: Identity, addr: str) -> CapacityRecord:
        now = time.time()
        return sign_record(ident, CapacityRecord(
            ident.peer_id, (addr,), (ServedSpan(MODEL, 0, 6, 6),), Hardware("cpu", "x", 0, 0), 10.0, 1000,
            "online", 1, now, now + 60))

    shared = "/ip4/10.0.0.7/tcp/4001"
    ctx = FakeContext({w.peer_id: GOOD for w in WITNESSES[:2]}, [at(w, shared) for w in WITNESSES[:2]])
    verdict = await SpotChecker(rate=1.0, rng=random.Random(6)).check(ctx, _step(BAD))
    assert len(ctx.replayed) == 1 and verdict.outcome == "inconclusive" and verdict.dispute is None


async def test_witnesses_are_drawn_towards_peers_with_history() -> None:
    """Peers the client holds countersigned receipts with are preferred as witnesses."""
    known, fresh = WITNESSES[0], WITNESSES[1:]
    picked = {w.peer_id: 0 for w in WITNESSES}
    checker = SpotChecker(rate=1.0, witnesses=1, rng=random.Random(7))
    for _ in range(200):
        ctx = FakeContext({w.peer_id: GOOD for w in WITNESSES}, [_record(w) for w in WITNESSES],
                          history={known.peer_id: 50})
        await checker.check(ctx, _step(GOOD))
        [(hop, _)] = ctx.replayed
        picked[hop.peer_id] += 1
    assert picked[known.peer_id] > 150 and all(picked[w.peer_id] > 0 for w in fresh)
