"""A small CPU step runs on one intra-op thread, a large one on every thread (SMALL_STEP_TOKENS)."""

from __future__ import annotations

import threading

import pytest

torch = pytest.importorskip("torch")

from node.engine import SpanEngine  # noqa: E402
from node.engine.span import SMALL_STEP_TOKENS  # noqa: E402
from node.models import ModelSource  # noqa: E402


def test_decode_steps_run_on_one_thread_and_prefills_on_all(tiny_llama: ModelSource) -> None:
    seen: list[int] = []
    result: dict[str, object] = {}

    def run() -> None:  # in a thread of its own, as the scheduler's engine thread
        torch.set_num_threads(2)
        engine = SpanEngine.load(tiny_llama, 0, 6)
        engine.module.model.layers[0].register_forward_pre_hook(lambda *_: seen.append(torch.get_num_threads()))
        engine.open_session("s", 1, 64)
        prompt = torch.tensor([[1, *range(100, 100 + SMALL_STEP_TOKENS + 3)]])
        first = engine.step("s", prompt, torch.arange(prompt.shape[1])[None])
        n = prompt.shape[1]
        nxt = engine.step("s", first[:, None], torch.tensor([[n]]))
        result["tokens"] = [int(first[0]), int(nxt[0])]

    t = threading.Thread(target=run)
    t.start()
    t.join(120)
    assert not t.is_alive() and "tokens" in result
    assert seen == [2, 1]  # the prefill on both threads, the one-token decode on one
