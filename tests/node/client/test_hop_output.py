"""A hop that answers an output its session cannot have is blamed itself (issue 15).

Each case is a hostile node (tests/node/client/inproc.py ``LyingEngine``) that serves and bills
its steps but sends an output of the wrong width, batch, value or range. Without the client's
check the honest hop after it fails on that input and is the one failed over and avoided, while
the liar's work is countersigned. With it the liar is failed over, backed off and not paid, the
honest hops are untouched, and the text is the reference.
"""

from __future__ import annotations

import struct
import time

import pytest

from protocol.codec import Tensor

from node.client.routing import Hop

from tests.node.client.inproc import engine, lying, open_swarm, reference

PROMPT = [1, 504, 3458, 282, 4649, 314]
NEW = 4


def narrower(t: Tensor) -> Tensor:  # hidden states one column short
    b, n, h = t.shape
    rows = [bytes(t.data)[i * h * 4:(i * h + h - 1) * 4] for i in range(b * n)]
    return Tensor(t.dtype, (b, n, h - 1), b"".join(rows))


def wider_batch(t: Tensor) -> Tensor:  # one batch row too many
    return Tensor(t.dtype, (t.shape[0] + 1, *t.shape[1:]), bytes(t.data) * 2 if t.shape[0] == 1 else b"")


def one_nan(t: Tensor) -> Tensor:
    data = bytearray(t.data)
    data[4:8] = struct.pack("<f", float("nan"))
    return Tensor(t.dtype, t.shape, bytes(data))


def all_nan(t: Tensor) -> Tensor:
    n = len(t.data) // 4
    return Tensor(t.dtype, t.shape, struct.pack(f"<{n}f", *([float("nan")] * n)))


def infinite(t: Tensor) -> Tensor:
    data = bytearray(t.data)
    data[0:4] = struct.pack("<f", float("inf"))
    return Tensor(t.dtype, t.shape, bytes(data))


def out_of_range_token(t: Tensor) -> Tensor:  # the last span: a token id nobody's vocabulary has
    return Tensor("int64", t.shape, struct.pack(f"<{t.shape[0]}q", *([1 << 40] * t.shape[0])))


def negative_token(t: Tensor) -> Tensor:
    return Tensor("int64", t.shape, struct.pack(f"<{t.shape[0]}q", *([-3] * t.shape[0])))


FIRST_SPAN_LIES = [narrower, wider_batch, one_nan, all_nan, infinite]
LAST_SPAN_LIES = [out_of_range_token, negative_token]  # (B, 1) ids: StepResult refuses them


@pytest.mark.parametrize("lie", FIRST_SPAN_LIES + LAST_SPAN_LIES, ids=lambda f: f.__name__)
async def test_a_hop_with_an_impossible_output_is_blamed_not_the_honest_next_hop(tiny_llama, lie):
    last = lie in LAST_SPAN_LIES
    liar_span, other_span = ((3, 6), (0, 3)) if last else ((0, 3), (3, 6))
    async with open_swarm(tiny_llama, []) as swarm:
        # A receipt with every step: the client must dispute the one that came with the lie.
        liar = await swarm.add_node("liar", engine(tiny_llama, *liar_span, wrap=lying(lie)), receipt_every=1)
        standby = await swarm.add_node("standby", engine(tiny_llama, *liar_span))
        honest = await swarm.add_node("honest", engine(tiny_llama, *other_span))
        client = swarm.client()
        await client.records(swarm.model_id)  # failover finds the standby in the known records
        hops = {liar.peer_id: Hop(liar.peer_id, *liar_span), honest.peer_id: Hop(honest.peer_id, *other_span)}
        route = [hops[honest.peer_id], hops[liar.peer_id]] if last else [hops[liar.peer_id], hops[honest.peer_id]]
        result = await client.generate(swarm.model_id, [PROMPT], max_new_tokens=NEW, route=route)
        assert result.token_ids[0] == reference(tiny_llama, PROMPT, NEW)
        assert result.failovers == 1 and liar.peer_id not in {h.peer_id for h in result.route}
        assert standby.peer_id in {h.peer_id for h in result.route}
        assert client.health.failures(liar.peer_id) == 1 and client.health.failures(honest.peer_id) == 0
        assert liar.peer_id in client.health.avoided(time.monotonic())
        await swarm.settle()
        assert "countersigned" not in liar.server.stats.receipts  # its work was never countersigned
        assert honest.server.stats.receipts == {"countersigned": 1}


async def test_a_known_vocabulary_bounds_the_token_ids(tiny_llama):
    """A caller that knows the vocabulary (a tokenizer) makes any id outside it the last hop's fault."""
    def just_outside(t: Tensor) -> Tensor:
        return Tensor("int64", t.shape, struct.pack(f"<{t.shape[0]}q", *([49152] * t.shape[0])))

    async with open_swarm(tiny_llama, [(0, 3)]) as swarm:
        liar = await swarm.add_node("liar", engine(tiny_llama, 3, 6, wrap=lying(just_outside)))
        await swarm.add_node("standby", engine(tiny_llama, 3, 6))
        client = swarm.client()
        await client.records(swarm.model_id)
        route = [Hop(swarm.nodes[0].peer_id, 0, 3), Hop(liar.peer_id, 3, 6)]
        result = await client.generate(swarm.model_id, [PROMPT], max_new_tokens=NEW, route=route,
                                       vocab_size=49152)
    assert result.token_ids[0] == reference(tiny_llama, PROMPT, NEW)
    assert liar.peer_id not in {h.peer_id for h in result.route}
    assert client.health.failures(swarm.nodes[0].peer_id) == 0


async def test_the_last_hops_own_vocabulary_bounds_its_token_ids(tiny_llama):
    """Without a caller's vocabulary, the last hop's SessionOpened says its own: an id at or past
    it is that hop's fault. Before, anything below 2**31 was taken and went into the text."""
    vocab = engine(tiny_llama, 3, 6).vocab_size

    def just_outside(t: Tensor) -> Tensor:
        return Tensor("int64", t.shape, struct.pack(f"<{t.shape[0]}q", *([vocab] * t.shape[0])))

    async with open_swarm(tiny_llama, [(0, 3)]) as swarm:
        liar = await swarm.add_node("liar", engine(tiny_llama, 3, 6, wrap=lying(just_outside)))
        await swarm.add_node("standby", engine(tiny_llama, 3, 6))
        client = swarm.client()
        await client.records(swarm.model_id)
        route = [Hop(swarm.nodes[0].peer_id, 0, 3), Hop(liar.peer_id, 3, 6)]
        result = await client.generate(swarm.model_id, [PROMPT], max_new_tokens=NEW, route=route)
    assert result.token_ids[0] == reference(tiny_llama, PROMPT, NEW)
    assert liar.peer_id not in {h.peer_id for h in result.route}


async def test_hidden_states_in_another_dtype_than_the_session_said_are_the_hops_fault(tiny_llama):
    """The first span's SessionOpened says float32; answering float16 from the first step on
    (which the next hop would have taken, the text drifting) is that hop's fault."""
    def half(t: Tensor) -> Tensor:
        values = struct.unpack(f"<{len(t.data) // 4}f", bytes(t.data))
        return Tensor("float16", t.shape, struct.pack(f"<{len(values)}e", *values))

    async with open_swarm(tiny_llama, [(3, 6)]) as swarm:
        liar = await swarm.add_node("liar", engine(tiny_llama, 0, 3, wrap=lying(half)))
        standby = await swarm.add_node("standby", engine(tiny_llama, 0, 3))
        client = swarm.client()
        await client.records(swarm.model_id)
        route = [Hop(liar.peer_id, 0, 3), Hop(swarm.nodes[0].peer_id, 3, 6)]
        result = await client.generate(swarm.model_id, [PROMPT], max_new_tokens=NEW, route=route)
    assert result.token_ids[0] == reference(tiny_llama, PROMPT, NEW)
    assert [h.peer_id for h in result.route][0] == standby.peer_id
    assert client.health.failures(swarm.nodes[0].peer_id) == 0
