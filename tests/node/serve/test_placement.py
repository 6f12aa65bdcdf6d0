import pytest

from node.serve.placement import (choose_span, estimate_layer_bytes, layer_throughputs,
                            layers_that_fit, should_move)


def test_empty_swarm_starts_at_zero():
    assert choose_span(30, [], max_layers=10, peer_id="a") == (0, 10)
    assert choose_span(30, [], max_layers=50, peer_id="a") == (0, 30)


def test_one_gap_is_filled():
    swarm = [(0, 10, 5.0), (20, 30, 5.0)]
    assert choose_span(30, swarm, max_layers=10, peer_id="a") == (10, 20)


def test_gap_smaller_than_the_window_is_covered():
    swarm = [(0, 14, 5.0), (16, 30, 5.0)]
    start, end = choose_span(30, swarm, max_layers=10, peer_id="a")
    assert start <= 14 and end >= 16


def test_least_throughput_layers_are_filled():
    # Layers 20:30 carry 3 tokens/s, the rest 10 or more: the new node goes there.
    swarm = [(0, 20, 10.0), (0, 10, 4.0), (20, 30, 3.0)]
    assert choose_span(30, swarm, max_layers=10, peer_id="a") == (20, 30)


def test_same_min_prefers_the_lower_sum():
    # per layer: 0..16 -> 5, 17..19 -> 1. Windows 13:18, 14:19 and 15:20 all hold a 1;
    # 15:20 holds three of them (the lowest sum).
    swarm = [(0, 20, 1.0), (0, 17, 4.0)]
    assert choose_span(20, swarm, max_layers=5, peer_id="a") == (15, 20)


def test_a_big_gap_is_filled_from_its_edge():
    # Every window inside 10:30 ties on min and sum; 10:20 or 20:30 leave no slivers.
    picks = {choose_span(30, [(0, 10, 5.0)], max_layers=10, peer_id=f"p{i}") for i in range(20)}
    assert picks == {(10, 20), (20, 30)}


def test_ties_are_deterministic():
    swarm = [(0, 30, 5.0)]
    first = choose_span(30, swarm, max_layers=10, peer_id="peer-x")
    for _ in range(3):
        assert choose_span(30, list(swarm), max_layers=10, peer_id="peer-x") == first


def test_peers_with_the_same_view_can_differ():
    swarm = [(0, 30, 5.0)]
    picks = {choose_span(30, swarm, max_layers=10, peer_id=f"peer-{i}") for i in range(20)}
    assert len(picks) > 1
    assert all(end - start == 10 and 0 <= start <= 20 for start, end in picks)


def test_layer_throughputs_clip_and_sum():
    assert layer_throughputs(4, [(0, 2, 1.0), (1, 9, 2.0), (-3, 1, -5.0)]) == [1.0, 3.0, 2.0, 2.0]


def test_bad_arguments():
    with pytest.raises(ValueError):
        choose_span(0, [], max_layers=1, peer_id="a")
    with pytest.raises(ValueError):
        choose_span(10, [], max_layers=0, peer_id="a")


def test_sizing_by_memory():
    gib = 1 << 30
    assert layers_that_fit(10 * gib, gib, 0, num_layers=30) == 10
    assert layers_that_fit(10 * gib, gib, gib, num_layers=30) == 5
    assert layers_that_fit(10 * gib, gib, gib, extra_bytes=2 * gib, num_layers=30) == 4
    assert layers_that_fit(100 * gib, gib, 0, num_layers=30) == 30
    assert layers_that_fit(gib // 2, gib, 0, num_layers=30) == 1  # never below one layer
    with pytest.raises(ValueError):
        layers_that_fit(gib, 0, 0, num_layers=30)


def test_estimate_layer_bytes_smollm2_shape():
    # SmolLM2-135M: hidden 576, intermediate 1536, 9 heads of 64, 3 KV heads.
    cfg = {"hidden_size": 576, "intermediate_size": 1536, "num_attention_heads": 9,
           "num_key_value_heads": 3, "model_type": "llama"}
    weights, kv = estimate_layer_bytes(cfg, 2, 1000)
    params = 576 * 576 * 2 + 2 * 576 * 192 + 3 * 576 * 1536 + 2 * 576
    assert weights == params * 2
    assert kv == 2 * 192 * 1000 * 2
    assert estimate_layer_bytes({**cfg, "head_dim": 64}, 2, 1000) == (weights, kv)
    biased, _ = estimate_layer_bytes({**cfg, "model_type": "qwen2"}, 2, 1000)
    assert biased == weights + (576 + 2 * 192) * 2


def test_should_move_ignores_small_gains():
    # Layers 10:20 have 9 tokens/s, the rest 10 with me on 0:10: moving would gain little.
    others = [(0, 30, 9.0), (20, 30, 1.0)]
    assert should_move(30, others, (0, 10), 1.0, peer_id="me") is None


def test_should_move_fills_a_gap():
    others = [(0, 10, 5.0), (0, 10, 5.0), (20, 30, 5.0)]
    assert should_move(30, others, (0, 10), 5.0, peer_id="me") == (10, 20)


def test_should_move_for_a_big_gain():
    # With me on 0:10 the weakest layers (10:20) have 1 token/s; on 10:20 they would have 11.
    others = [(0, 10, 10.0), (10, 20, 1.0), (20, 30, 10.0)]
    assert should_move(30, others, (0, 10), 10.0, peer_id="me") == (10, 20)


def test_no_oscillation():
    others = [(0, 10, 10.0), (10, 20, 1.0), (20, 30, 10.0)]
    target = should_move(30, others, (0, 10), 10.0, peer_id="me")
    assert target is not None
    assert should_move(30, others, target, 10.0, peer_id="me") is None


def test_two_nodes_on_one_span_do_not_swap_forever():
    # A joins a swarm where B already serves 0:10 of 0:20 and the other half is empty.
    a = choose_span(20, [(0, 10, 5.0)], max_layers=10, peer_id="a")
    assert a == (10, 20)
    assert should_move(20, [(0, 10, 5.0)], a, 5.0, peer_id="a") is None
    assert should_move(20, [(10, 20, 5.0)], (0, 10), 5.0, peer_id="b") is None


def test_should_move_gaps_both_ways_counts_uncovered_layers():
    # 0:30 with nodes only on 0:10: moving from 0:10 (shared) to 10:20 still leaves 20:30
    # empty, but covers ten more layers.
    others = [(0, 10, 5.0)]
    assert should_move(30, others, (0, 10), 5.0, peer_id="me") in {(10, 20), (20, 30)}
    assert should_move(30, others, (10, 20), 5.0, peer_id="me") is None


def test_min_gain_must_be_at_least_one():
    with pytest.raises(ValueError):
        should_move(10, [], (0, 5), 1.0, min_gain=0.5)
