"""SamplingParams' grammar fields (SPEC 7.1, 9.8): left out of the wire when unset, checked when set."""

from __future__ import annotations

import pytest

from protocol.codec import unpack
from protocol.errors import InvalidMessage, LimitExceeded
from protocol.ids import MAX_CONTROL_FRAME_BYTES, MAX_GRAMMAR_BYTES
from protocol.messages import OpenSession, SamplingParams, decode_message, encode_message

GRAMMAR = '{"grammars": [{"json_schema": {"type": "object"}}]}'


def test_unset_grammar_keeps_the_old_wire_form():
    assert SamplingParams(0.5, 0.9, 7).to_wire() == {"temperature": 0.5, "top_p": 0.9, "seed": 7}


def test_grammar_fields_round_trip_in_an_open():
    sp = SamplingParams(grammar=GRAMMAR, grammar_start=12, grammar_prefix=((5, 6, 7), (8,)))
    msg = OpenSession("m", 0, 6, 64, 2, sp)
    back = decode_message(unpack(encode_message(msg)[4:]))
    assert back.sampling == sp and back.sampling.grammar_prefix == ((5, 6, 7), (8,))
    assert len(encode_message(OpenSession("m", 0, 6, 64, 1, SamplingParams(
        grammar="x" * (MAX_GRAMMAR_BYTES - 64), grammar_start=1)))) < MAX_CONTROL_FRAME_BYTES


@pytest.mark.parametrize("kwargs,error", [
    ({"grammar_start": 3}, InvalidMessage),  # no grammar
    ({"grammar": GRAMMAR}, InvalidMessage),  # no start
    ({"grammar": GRAMMAR, "grammar_start": 0}, InvalidMessage),
    ({"grammar": "", "grammar_start": 1}, InvalidMessage),
    ({"grammar": "x" * (MAX_GRAMMAR_BYTES + 1), "grammar_start": 1}, LimitExceeded),
    ({"grammar": GRAMMAR, "grammar_start": 1, "grammar_prefix": ((-1,),)}, InvalidMessage),
    ({"grammar": GRAMMAR, "grammar_start": 1, "grammar_prefix": (("a",),)}, InvalidMessage),
    ({"grammar": GRAMMAR, "grammar_start": 1, "grammar_prefix": 5}, InvalidMessage),
])
def test_bad_grammar_fields_are_refused(kwargs, error):
    with pytest.raises(error):
        SamplingParams(**kwargs)


def test_logprobs_fields_round_trip_and_must_fit_the_output():
    from protocol.codec import Tensor
    from protocol.errors import BadShape
    from protocol.messages import StepResult

    def t(dtype, shape, n):
        return Tensor(dtype, shape, bytes(n * (4 if dtype == "float32" else 8)))

    out = t("int64", (2,), 2)
    plain = StepResult(3, out)
    assert "logprobs" not in plain.to_wire() and "top_ids" not in plain.to_wire()
    msg = StepResult(3, out, None, t("float32", (2, 4), 8), t("int64", (2, 3), 6))
    back = decode_message(unpack(encode_message(msg)[4:]))
    assert back.logprobs.shape == (2, 4) and back.top_ids.shape == (2, 3)
    for lp, ids, error in [(t("float32", (2, 4), 8), None, InvalidMessage),
                           (t("float32", (2, 3), 6), t("int64", (2, 3), 6), BadShape),
                           (t("float32", (3, 4), 12), t("int64", (3, 3), 9), BadShape),
                           (t("float32", (2, 22), 44), t("int64", (2, 21), 42), BadShape)]:
        with pytest.raises(error):
            StepResult(3, out, None, lp, ids)
    assert SamplingParams(logprobs=5).to_wire()["logprobs"] == 5
    with pytest.raises(InvalidMessage):
        SamplingParams(logprobs=21)


def test_logit_bias_round_trips_and_is_bounded():
    sp = SamplingParams(logit_bias=((5, 100), (7, -3.5)))
    assert SamplingParams.from_wire(sp.to_wire()) == sp and sp.logit_bias == ((5, 100.0), (7, -3.5))
    assert "logit_bias" not in SamplingParams().to_wire()
    for bad in [((5,),), ((5, 101),), (("a", 1),), 5, tuple((i, 1) for i in range(301))]:
        with pytest.raises((InvalidMessage, LimitExceeded)):
            SamplingParams(logit_bias=bad)


def test_penalties_round_trip_and_carry_the_generated_texts_start():
    sp = SamplingParams(presence_penalty=0.5, frequency_penalty=-1.0, grammar_start=9, grammar_prefix=((4, 4),))
    wire = sp.to_wire()
    assert wire["presence_penalty"] == 0.5 and wire["grammar_start"] == 9 and "grammar" not in wire
    back = decode_message(unpack(encode_message(OpenSession("m", 0, 6, 64, 1, sp))[4:]))
    assert back.sampling == sp and back.sampling.penalized
    assert "presence_penalty" not in SamplingParams().to_wire()
    # The client sets the start (SwarmClient.generate); an engine refuses penalties without one.
    assert "grammar_start" not in SamplingParams(presence_penalty=1.0).to_wire()


@pytest.mark.parametrize("kwargs", [
    {"frequency_penalty": 2.5, "grammar_start": 3},
    {"presence_penalty": float("nan"), "grammar_start": 3},
    {"presence_penalty": "1", "grammar_start": 3},
])
def test_bad_penalties_are_refused(kwargs):
    with pytest.raises(InvalidMessage):
        SamplingParams(**kwargs)
