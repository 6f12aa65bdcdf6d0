"""Ground truth for tests: greedy generation with the whole model in plain transformers."""

from __future__ import annotations

from typing import Any

from node.models import ModelSource


def reference_greedy(source: ModelSource, prompt_ids: list[int] | list[list[int]],
                     max_new_tokens: int) -> Any:
    """Exactly ``max_new_tokens`` greedy tokens after each prompt (no stop at EOS).

    ``prompt_ids`` is one prompt (``list[int]``, returns ``list[int]``) or several
    (``list[list[int]]``, returns ``list[list[int]]``); each prompt runs alone, unpadded.
    """
    import torch
    from transformers import AutoModelForCausalLM, DynamicCache

    single = bool(prompt_ids) and isinstance(prompt_ids[0], int)
    prompts: list[list[int]] = (
        [prompt_ids] if single else list(prompt_ids))  # type: ignore[list-item]
    model = AutoModelForCausalLM.from_pretrained(
        str(source.path), dtype=torch.float32, attn_implementation="sdpa")
    model.eval()
    results: list[list[int]] = []
    with torch.inference_mode():
        for prompt in prompts:
            cache = DynamicCache(config=model.config)
            ids = torch.tensor([prompt], dtype=torch.int64)  # (1, T)
            out: list[int] = []
            for _ in range(max_new_tokens):
                logits = model(input_ids=ids, past_key_values=cache, use_cache=True).logits
                nxt = int(logits[0, -1].argmax())
                out.append(nxt)
                ids = torch.tensor([[nxt]], dtype=torch.int64)
            results.append(out)
    return results[0] if single else results
