import pytest

from node.routing import Candidate, NoRoute, find_chain, missing_layers


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
