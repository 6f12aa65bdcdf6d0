"""Window steps on the wire (SPEC 9.7): Step.keep and Step.draft, carried by Push, counted by receipts."""

from __future__ import annotations

import array

import pytest

from protocol.codec import Tensor
from protocol.errors import BadShape, InvalidMessage
from protocol.messages import Step, StepResult, decode_message, message_to_wire
from protocol.push import Push, push_digest
from protocol.receipts import count_step_tokens


def ids(*shape: int, start: int = 0) -> Tensor:
    n = 1
    for d in shape:
        n *= d
    return Tensor("int64", shape, array.array("q", range(start, start + n)).tobytes())


def test_a_plain_step_keeps_its_old_wire_form():
    wire = message_to_wire(Step(3, ids(1, 1), ids(1, 1)))
    assert "keep" not in wire and "draft" not in wire


def test_a_window_step_round_trips():
    step = Step(4, ids(1, 5), ids(1, 5, start=10), keep=10, draft=ids(1, 4, start=1))
    back = decode_message(message_to_wire(step))
    assert back == step and back.window
    assert back.keep == 10 and back.draft.shape == (1, 4)


@pytest.mark.parametrize("build,error", [
    (lambda: Step(1, ids(1, 1), ids(1, 1), draft=ids(1, 0)), BadShape),  # a window holds >= 2 positions
    (lambda: Step(1, ids(1, 3), ids(1, 3), draft=ids(1, 3)), BadShape),  # one draft per position after the first
    (lambda: Step(1, ids(1, 3), ids(1, 3), keep=-1), InvalidMessage),
    (lambda: Step(1, ids(1, 3), ids(1, 3), keep=True), InvalidMessage),
])
def test_malformed_windows_are_rejected(build, error):
    with pytest.raises(error):
        build()


def test_the_last_span_answers_a_token_per_position():
    assert StepResult(0, ids(1, 5)).output.shape == (1, 5)


def test_a_push_carries_the_window_and_its_digest_covers_it():
    kw = dict(step=2, input=ids(1, 3), positions=ids(1, 3), sig=bytes(64))
    push = Push("s", "12D3KooWclient", keep=7, draft=ids(1, 2), **kw)
    assert decode_message(message_to_wire(push)) == push
    step = push.as_step()
    assert step.keep == 7 and step.draft == ids(1, 2)
    other = Step(step.step, step.input, step.positions, step.mask, step.keep, ids(1, 2, start=5))
    assert push_digest("s", step) != push_digest("s", other)  # a changed draft is a different push
    assert "keep" not in message_to_wire(Push("s", "12D3KooWclient", **kw))


def test_receipts_count_a_window_as_decode_work():
    assert count_step_tokens(Step(5, ids(1, 4), ids(1, 4), draft=ids(1, 3))) == (0, 4)
    assert count_step_tokens(Step(5, ids(1, 4), ids(1, 4))) == (4, 0)
