import pytest

from node.client.routing import (DEFAULT_HOP_COST_S, Candidate, NoRoute, find_chain, hop_time,
                          missing_layers, relayed_hop_cost, relayed_only)

RELAYED = ("/ip4/10.77.0.1/tcp/4001/p2p/12D3KooWRelay/p2p-circuit/p2p/12D3KooWNated",)
DIRECT = ("/ip4/10.77.0.2/tcp/4001/p2p/12D3KooWDirect",)


def spans(chain):
    return [(h.peer_id, h.start, h.end) for h in chain]


def test_tiles_the_model_in_order():
    cands = [Candidate("c", 20, 30, 10), Candidate("a", 0, 10, 10), Candidate("b", 10, 20, 10)]
    assert spans(find_chain(30, cands)) == [("a", 0, 10), ("b", 10, 20), ("c", 20, 30)]


def test_prefers_fewer_hops_when_speeds_are_close():
    cands = [Candidate("a", 0, 15, 10), Candidate("b", 15, 30, 10), Candidate("whole", 0, 30, 9.9)]
    assert spans(find_chain(30, cands)) == [("whole", 0, 30)]


def test_prefers_the_faster_peer_for_the_same_span():
    cands = [Candidate("slow", 0, 30, 2), Candidate("fast", 0, 30, 20)]
    assert spans(find_chain(30, cands)) == [("fast", 0, 30)]


def test_avoided_peers_are_not_used():
    cands = [Candidate("a", 0, 30, 20), Candidate("b", 0, 30, 5)]
    assert spans(find_chain(30, cands, avoid=frozenset({"a"}))) == [("b", 0, 30)]


def test_ties_break_deterministically():
    cands = [Candidate("z", 0, 30, 10), Candidate("m", 0, 30, 10)]
    assert spans(find_chain(30, cands)) == spans(find_chain(30, list(reversed(cands))))


def test_missing_layers_are_named_with_the_peers_seen():
    cands = [Candidate("a", 0, 10, 10), Candidate("c", 20, 30, 10)]
    with pytest.raises(NoRoute) as err:
        find_chain(30, cands)
    assert err.value.missing == [(10, 20)]
    assert err.value.peers_seen == ["a", "c"]
    assert "10:20" in str(err.value)


def test_overlapping_spans_that_do_not_chain_have_no_route():
    # 0:10 then 5:30 overlap: whole-span hops cannot join them without running layers twice.
    with pytest.raises(NoRoute):
        find_chain(30, [Candidate("a", 0, 10, 10), Candidate("b", 5, 30, 10)])


def test_missing_layers_helper():
    assert missing_layers(10, []) == [(0, 10)]
    assert missing_layers(10, [(0, 3), (5, 10)]) == [(3, 5)]
    assert missing_layers(10, [(0, 10)]) == []


def hops(chain):
    return [(h.peer_id, h.start, h.end, h.span) for h in chain]


def test_crosses_overlapping_spans_with_a_sub_range():
    # Per layer a costs 1/(10 * 10) s, b 1/(2 * 25) s: a runs the overlap 5:10.
    chain = find_chain(30, [Candidate("a", 0, 10, 10), Candidate("b", 5, 30, 2)],
                       allow_partial=True)
    assert hops(chain) == [("a", 0, 10, None), ("b", 10, 30, (5, 30))]
    assert not chain[0].partial and chain[1].partial


def test_partial_uses_the_faster_peer_for_the_overlap():
    # The crossing sits at an end of the overlap 5:10: a's end when a is faster per layer,
    # b's start when b is.
    fast_a = [Candidate("a", 0, 10, 10), Candidate("b", 5, 30, 2)]
    assert spans(find_chain(30, fast_a, allow_partial=True)) == [("a", 0, 10), ("b", 10, 30)]
    slow_a = [Candidate("a", 0, 10, 0.5), Candidate("b", 5, 30, 20)]
    assert spans(find_chain(30, slow_a, allow_partial=True)) == [("a", 0, 5), ("b", 5, 30)]


def test_partial_can_use_the_middle_of_a_span():
    # mid is the slowest per layer (1/(4 * 20) s), so it runs only what nobody else serves.
    cands = [Candidate("a", 0, 10, 10), Candidate("mid", 5, 25, 4), Candidate("c", 20, 30, 10)]
    assert spans(find_chain(30, cands, allow_partial=True)) == [
        ("a", 0, 10), ("mid", 10, 20), ("c", 20, 30)]


def test_partial_matches_whole_spans_when_spans_tile():
    cands = [Candidate("a", 0, 10, 10), Candidate("b", 10, 20, 10), Candidate("c", 20, 30, 10),
             Candidate("whole", 0, 30, 3)]
    assert find_chain(30, cands, allow_partial=True) == find_chain(30, cands)


def test_partial_prefers_fewer_hops_when_speeds_are_close():
    # A single peer for everything beats slicing two others' spans for the same compute.
    cands = [Candidate("a", 0, 20, 10), Candidate("b", 10, 30, 10), Candidate("w", 0, 30, 6.6)]
    assert spans(find_chain(30, cands, allow_partial=True)) == [("w", 0, 30)]


def test_partial_ties_are_deterministic():
    cands = [Candidate("z", 0, 20, 10), Candidate("m", 0, 20, 10), Candidate("q", 10, 30, 10),
             Candidate("b", 10, 30, 10)]
    first = find_chain(30, cands, allow_partial=True)
    assert first == find_chain(30, list(reversed(cands)), allow_partial=True)
    assert [h.peer_id for h in first] == ["m", "b"]


def test_measured_rtt_replaces_the_default_hop_cost():
    # Same throughput; "near" is 1 ms away, "far" 200 ms: the two-hop chain through near wins
    # over a single far hop, which without measurements would have won.
    cands = [Candidate("n1", 0, 15, 10, rtt_s=0.001), Candidate("n2", 15, 30, 10, rtt_s=0.001),
             Candidate("far", 0, 30, 9.9, rtt_s=0.2)]
    assert spans(find_chain(30, cands)) == [("n1", 0, 15), ("n2", 15, 30)]
    unmeasured = [Candidate(c.peer_id, c.start, c.end, c.throughput) for c in cands]
    assert spans(find_chain(30, unmeasured)) == [("far", 0, 30)]


def test_a_relayed_peer_costs_more_than_a_direct_one_until_measured():
    # Same span, the relayed peer a little faster: the direct one wins on the relay's extra legs.
    cands = [Candidate("direct", 0, 30, 10.0, DIRECT), Candidate("nated", 0, 30, 10.2, RELAYED)]
    assert spans(find_chain(30, cands)) == [("direct", 0, 30)]
    assert hop_time(cands[1]) == pytest.approx(1 / 10.2 + relayed_hop_cost())
    assert relayed_hop_cost() > 2 * DEFAULT_HOP_COST_S
    # much faster compute still pays for the relay
    fast = [cands[0], Candidate("nated", 0, 30, 20.0, RELAYED)]
    assert spans(find_chain(30, fast)) == [("nated", 0, 30)]
    # once measured, the measured round trip (through the relay) is what counts
    measured = [Candidate("direct", 0, 30, 10.0, DIRECT, rtt_s=0.05), Candidate("nated", 0, 30, 10.2, RELAYED, rtt_s=0.01)]
    assert spans(find_chain(30, measured)) == [("nated", 0, 30)]
    # the only peer of its layers is used, relayed or not
    assert spans(find_chain(30, [cands[1]])) == [("nated", 0, 30)]


def test_relayed_only_means_every_address_is_a_circuit():
    assert relayed_only(RELAYED)
    assert not relayed_only(RELAYED + DIRECT)  # one direct address: dialled directly
    assert not relayed_only(())


def test_peers_without_cache_room_are_skipped():
    cands = [Candidate("full", 0, 30, 50, cache_tokens_left=100),
             Candidate("roomy", 0, 30, 5, cache_tokens_left=10_000),
             Candidate("unknown", 0, 30, 1)]
    assert spans(find_chain(30, cands, need_tokens=2048)) == [("roomy", 0, 30)]
    assert spans(find_chain(30, cands, need_tokens=100)) == [("full", 0, 30)]


def test_no_route_names_skipped_peers():
    cands = [Candidate("a", 0, 30, 10, cache_tokens_left=10), Candidate("b", 0, 30, 10)]
    with pytest.raises(NoRoute) as err:
        find_chain(30, cands, need_tokens=64, avoid=frozenset({"b"}))
    assert err.value.missing == [(0, 30)]
    assert err.value.peers_seen == []
    assert "a, b" in str(err.value) and "0:30" in str(err.value)


def test_partial_gap_still_has_no_route():
    with pytest.raises(NoRoute) as err:
        find_chain(30, [Candidate("a", 0, 10, 10), Candidate("b", 12, 30, 10)],
                   allow_partial=True)
    assert err.value.missing == [(10, 12)]


def test_hop_time_is_pro_rata():
    c = Candidate("a", 0, 10, 10, rtt_s=0.01)
    assert hop_time(c) == pytest.approx(0.1 + 0.01)
    assert hop_time(c, layers=(0, 5)) == pytest.approx(0.05 + 0.01)
    assert hop_time(Candidate("b", 0, 10, 10)) == pytest.approx(0.1 + DEFAULT_HOP_COST_S)
