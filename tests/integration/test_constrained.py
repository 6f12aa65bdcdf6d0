"""Constrained decoding across real node processes (SPEC 9.8): the grammar travels with the
session to the last span, and survives the SIGKILL of that span mid-text (its replacement
resumes the grammar where the text stands), with windows and without, in both modes."""

from __future__ import annotations

import json
import os
import signal

import jsonschema
import pytest
from tokenizers import Tokenizer

from node.client.grammars import json_schema_grammar
from node.client.swarm import SwarmClient
from node.devtools.localswarm import start_chain, stop_all
from node.engine.registry import resolve_model
from tests.integration.test_push import _route_through
from tests.integration.test_speculative import Oracle

pytestmark = pytest.mark.integration

SCHEMA = {"type": "object", "properties": {
    "name": {"type": "string", "maxLength": 20},
    "scores": {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 99}, "maxItems": 4},
    "ok": {"type": "boolean"}}, "required": ["name", "scores", "ok"], "additionalProperties": False}
EOS = [0, 2]


@pytest.fixture
def spare_last(tiny_model, tmp_path):
    """0:3, then 3:6 twice: the last span has a spare."""
    nodes = start_chain(tmp_path, [(0, 3), (3, 6), (3, 6)], model=str(tiny_model), timeout_s=120)
    yield nodes
    stop_all(nodes)


@pytest.mark.parametrize("push,speculate", [(False, "oracle"), (True, "off")], ids=["client-windows", "push-plain"])
async def test_the_last_span_killed_mid_text_resumes_the_grammar(spare_last, tiny_model, tmp_path, push, speculate):
    source = resolve_model(str(tiny_model))
    tok = Tokenizer.from_file(str(source.path / "tokenizer.json"))
    prompt = tok.encode("Return a record:").ids
    grammar = json_schema_grammar(SCHEMA)
    victim = spare_last[1]
    async with SwarmClient.open([spare_last[0].addr], data_dir=tmp_path / "agent", push=push,
                                step_timeout_s=20) as client:
        route = _route_through(await client.wait_for_route(source.model_id, 60), {(3, 6): victim})
        unconstrained = await client.generate(source.model_id, [prompt], max_new_tokens=40, route=route,
                                              eos_token_ids=EOS, speculate="off")
        with pytest.raises(ValueError):
            json.loads(tok.decode(unconstrained.token_ids[0]))
        expected = await client.generate(source.model_id, [prompt], max_new_tokens=150, route=route,
                                         eos_token_ids=EOS, speculate="off", grammar=grammar)
        assert expected.token_ids[0][-1] in EOS
        text = tok.decode(expected.token_ids[0][:-1])
        jsonschema.validate(json.loads(text), SCHEMA)
        assert len(expected.token_ids[0]) > 12

        seen = []

        def kill_after_ten(tokens):
            seen.extend(tokens)
            if len(seen) >= 10 and victim.proc.poll() is None:
                os.kill(victim.proc.pid, signal.SIGKILL)

        # Windows drafting the expected text with every fifth token wrong: some are cut short
        # before the kill, so the replacement's replay ends past tokens it never chose itself.
        drafts = Oracle(prompt, expected.token_ids[0]) if speculate == "oracle" else speculate
        result = await client.generate(source.model_id, [prompt], max_new_tokens=150, route=route,
                                       eos_token_ids=EOS, speculate=drafts, grammar=grammar,
                                       on_tokens=kill_after_ten)
    assert victim.proc.poll() is not None
    assert result.failovers == 1 and victim.peer_id not in {h.peer_id for h in result.route}
    assert result.token_ids[0] == expected.token_ids[0]
    if speculate == "oracle":
        assert 0 < result.accepted < result.drafted
