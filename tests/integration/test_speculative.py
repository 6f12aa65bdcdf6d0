"""Speculative decoding across real node processes (SPEC 9.7): a window of drafts per pass,
rolled back on every hop where the model disagrees, with the plain greedy text token for token."""

from __future__ import annotations

import os
import signal

import pytest

from node.client.swarm import SwarmClient
from node.engine.reference import reference_greedy
from node.engine.registry import resolve_model
from tests.integration.test_push import _route_through, _statuses, chain3  # noqa: F401 - the fixture

pytestmark = pytest.mark.integration

PROMPT = [1, 504, 3458, 282, 4649, 314, 5140]
NEW = 24


class Oracle:
    """Drafts the expected text, with every fifth token of it wrong: windows are accepted up
    to a wrong draft, so every hop rolls back. ``on_pass(n)`` runs before the n-th proposal."""

    name = "oracle"

    def __init__(self, prompt, expected, on_pass=None):
        self.prompt, self.expected, self.on_pass = list(prompt), list(expected), on_pass
        self.tokens: list[int] = []
        self.passes = 0

    def extend(self, tokens):
        self.tokens.extend(tokens)

    def propose(self, k):
        self.passes += 1
        if self.on_pass is not None:
            self.on_pass(self.passes)
        at = len(self.tokens) - len(self.prompt)
        return [t + 1 if (at + j) % 5 == 4 else t for j, t in enumerate(self.expected[at:at + k])]


async def test_windows_give_the_plain_greedy_text_in_both_modes(chain3, tiny_model, tmp_path):
    source = resolve_model(str(tiny_model))
    expected = reference_greedy(source, PROMPT, NEW)
    for push in (False, True):
        agent = tmp_path / f"agent-{push}"
        async with SwarmClient.open([chain3[0].addr], data_dir=agent, push=push) as client:
            route = _route_through(await client.wait_for_route(source.model_id, 60), {(2, 4): chain3[1]})
            result = await client.generate(source.model_id, [PROMPT], max_new_tokens=NEW, route=route,
                                           speculate=Oracle(PROMPT, expected))
            assert result.token_ids[0] == expected
            # Several tokens per pass, and windows rejected part way (every hop rolled back).
            assert result.speculate == "oracle"
            assert result.passes < result.steps == NEW
            assert 0 < result.accepted < result.drafted
            assert result.pushed_steps == (2 * result.passes if push else 0)
            plain = await client.generate(source.model_id, [PROMPT], max_new_tokens=NEW, route=route,
                                          speculate="ngram")
            assert plain.token_ids[0] == expected
        # The hops counted what the client counted, window steps and their cuts included.
        receipts = _statuses(agent)
        assert {r.server for r, _ in receipts} == {h.peer_id for h in route}
        assert all(status == "countersigned" for _, status in receipts), receipts


@pytest.mark.parametrize("push", [True, False], ids=["push", "client"])
async def test_a_hop_killed_mid_generation_is_replaced_with_accepted_tokens_only(chain3, tiny_model, tmp_path, push):
    source = resolve_model(str(tiny_model))
    expected = reference_greedy(source, PROMPT, NEW)
    middle = chain3[1]

    def kill(n):
        if n == 3:  # windows were rolled back before: the replay holds the kept positions only
            os.kill(middle.proc.pid, signal.SIGKILL)

    async with SwarmClient.open([chain3[0].addr], data_dir=tmp_path / "agent", push=push,
                                step_timeout_s=20) as client:
        route = _route_through(await client.wait_for_route(source.model_id, 60), {(2, 4): middle})
        result = await client.generate(source.model_id, [PROMPT], max_new_tokens=NEW, route=route,
                                       speculate=Oracle(PROMPT, expected, kill))
    assert result.token_ids[0] == expected
    assert result.failovers == 1
    assert middle.peer_id not in {h.peer_id for h in result.route}
    assert result.accepted < result.drafted



async def test_a_draft_model_run_by_the_client_drafts_what_the_swarm_keeps(chain3, tiny_model, tmp_path):
    """The target model as its own draft (node/engine/draft.py): every greedy draft is kept."""
    from node.engine.draft import model_drafters

    source = resolve_model(str(tiny_model))
    expected = reference_greedy(source, PROMPT, NEW)
    async with SwarmClient.open([chain3[0].addr], data_dir=tmp_path / "agent",
                                speculate=model_drafters(str(tiny_model))) as client:
        route = await client.wait_for_route(source.model_id, 60)
        result = await client.generate(source.model_id, [PROMPT], max_new_tokens=NEW, route=route)
        again = await client.generate(source.model_id, [PROMPT], max_new_tokens=NEW, route=route)
    assert result.token_ids[0] == again.token_ids[0] == expected
    assert result.speculate == "model"
    assert result.drafted > 0 and result.accepted == result.drafted
    assert result.passes < NEW // 2
