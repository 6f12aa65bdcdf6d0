"""benchmarks/wan/early_exit.py: an early exit's agreement with the whole model, on a seeded
random model (torch)."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")


def test_the_whole_depth_agrees_with_greedy_decoding_and_an_early_exit_does_not(tmp_path):
    from transformers import AutoModelForCausalLM

    from benchmarks.wan.early_exit import agreement
    from node.engine.testing import make_tiny_model

    path = make_tiny_model(tmp_path / "m", seed=0, num_layers=4, vocab_size=512)
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
    cases = []
    for seed in range(3):
        prompt = torch.randint(0, 512, (1, 12), generator=torch.Generator().manual_seed(seed))
        out = model.generate(prompt, max_new_tokens=10, do_sample=False, pad_token_id=0)
        cases.append((prompt[0].tolist(), out[0, 12:].tolist()))
    assert agreement(path, cases, 4) == 1.0  # the whole model chose those tokens
    assert agreement(path, cases, 1) < 0.5  # one random layer and the head mostly do not
    assert agreement(path, [([1, 2], [3])], 4) is None  # no position after the first
