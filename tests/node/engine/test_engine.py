"""The span engine against whole-model transformers on tiny seeded models."""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence

import pytest

torch = pytest.importorskip("torch")

from node.engine import SpanEngine  # noqa: E402
from node.engine.reference import reference_greedy  # noqa: E402
from tests.node.engine.chain import decode_through  # noqa: E402
from node.models import ModelSource  # noqa: E402

SPANS = [(0, 2), (2, 4), (4, 6)]


def load_chain(source: ModelSource, spans: Sequence[tuple[int, int]] = SPANS) -> list[SpanEngine]:
    return [SpanEngine.load(source, a, b) for a, b in spans]


def generate(chain: list[SpanEngine], prompts: list[list[int]], new_tokens: int,
             sampling: dict | None = None, session: str = "s") -> list[list[int]]:
    """Left-pad the prompts into one batch and decode greedily (or sample) through the chain."""
    return decode_through([(span, None) for span in chain], prompts, new_tokens, sampling, session)


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2"])
def test_three_spans_match_whole_model(arch: str,
                                       tiny_source_factory: Callable[..., ModelSource]) -> None:
    source = tiny_source_factory(arch)
    prompt = [1, 504, 3045, 1200, 77, 9021, 88]
    expected = reference_greedy(source, prompt, 10)
    assert generate(load_chain(source), [prompt], 10) == [expected]


def test_single_span_whole_model_matches(tiny_llama: ModelSource) -> None:
    prompt = [1, 42, 4242, 31000]
    expected = reference_greedy(tiny_llama, prompt, 6)
    assert generate(load_chain(tiny_llama, [(0, 6)]), [prompt], 6) == [expected]


def test_hidden_states_match_whole_model(tiny_llama: ModelSource) -> None:
    """Within a stated tolerance: the split run's last hidden state equals the whole model's."""
    from transformers import AutoModelForCausalLM

    whole = AutoModelForCausalLM.from_pretrained(str(tiny_llama.path), dtype=torch.float32)
    ids = torch.tensor([[1, 5, 6, 7, 8, 9]])
    pos = torch.arange(6)[None]
    first, middle = SpanEngine.load(tiny_llama, 0, 2), SpanEngine.load(tiny_llama, 2, 6)
    for s in (first, middle):
        s.open_session("h", 1, 16)
    # The 0:6 base model ends with the final norm; 2:6 is the last span here (norm applied
    # inside, then the head), so compare the first span's output against layer 2's input.
    with torch.inference_mode():
        ref = whole(input_ids=ids, output_hidden_states=True).hidden_states  # 7 x (1, 6, H)
    h = first.step("h", ids, pos)
    assert h.shape == (1, 6, tiny_llama.hidden_size) and h.dtype == torch.float32
    assert torch.allclose(h, ref[2], atol=1e-5, rtol=0)


def test_padded_batch_equals_each_prompt_alone(tiny_llama: ModelSource) -> None:
    prompts = [[1, 300, 301, 302, 303, 304, 305], [1, 9000, 9001]]
    expected = reference_greedy(tiny_llama, prompts, 8)
    assert generate(load_chain(tiny_llama), prompts, 8) == expected


def test_padded_batch_qwen2(tiny_source_factory: Callable[..., ModelSource]) -> None:
    source = tiny_source_factory("qwen2")
    prompts = [[1, 17, 18], [1, 20000, 20001, 20002, 20003, 20004]]
    assert generate(load_chain(source), prompts, 6) == reference_greedy(source, prompts, 6)


def test_sampling_reproducible_per_seed(tiny_llama: ModelSource) -> None:
    chain = load_chain(tiny_llama)
    prompt = [[1, 11, 12, 13]]
    hot = {"temperature": 5.0, "top_p": 0.95}
    a = generate(chain, prompt, 12, {**hot, "seed": 1})
    b = generate(chain, prompt, 12, {**hot, "seed": 1})
    c = generate(chain, prompt, 12, {**hot, "seed": 2})
    assert a == b
    assert a != c


def test_top_p_tiny_keeps_only_greedy(tiny_llama: ModelSource) -> None:
    chain = load_chain(tiny_llama)
    prompt = [[1, 11, 12, 13]]
    greedy = generate(chain, prompt, 6)
    assert generate(chain, prompt, 6, {"temperature": 1.0, "top_p": 1e-6, "seed": 3}) == greedy


def test_close_frees_session(tiny_llama: ModelSource) -> None:
    span = SpanEngine.load(tiny_llama, 0, 2)
    span.open_session("a", batch_size=2, max_length=32)
    span.open_session("b", batch_size=1, max_length=32)
    assert sorted(span.sessions()) == ["a", "b"]
    assert span.cache_tokens_used() == 0
    assert span.cache_tokens_reserved() == 96
    span.step("a", torch.tensor([[1, 2, 3], [4, 5, 6]]), torch.arange(3).expand(2, 3).contiguous())
    assert span.cache_tokens_used() == 6
    span.close_session("a")
    assert span.sessions() == ["b"]
    assert span.cache_tokens_used() == 0
    from node.engine import SessionUnknown

    with pytest.raises(SessionUnknown):
        span.step("a", torch.tensor([[1]]), torch.tensor([[0]]))
    with pytest.raises(SessionUnknown):
        span.close_session("a")


def test_middle_span_holds_only_its_layers(tiny_llama: ModelSource, monkeypatch) -> None:
    import safetensors

    read: list[str] = []
    real_open = safetensors.safe_open

    class Spy:
        def __init__(self, *args, **kwargs):
            self._f = real_open(*args, **kwargs)

        def __enter__(self):
            self._f.__enter__()
            return self

        def __exit__(self, *exc):
            return self._f.__exit__(*exc)

        def keys(self):
            return self._f.keys()

        def get_tensor(self, name):
            read.append(name)
            return self._f.get_tensor(name)

    monkeypatch.setattr(safetensors, "safe_open", Spy)
    middle = SpanEngine.load(tiny_llama, 2, 4)
    assert read and all(".layers.2." in n or ".layers.3." in n for n in read), read
    names = list(middle.module.state_dict())
    assert not any("embed" in n or "lm_head" in n for n in names), names
    assert not any(".layers.2." in n for n in names)  # renumbered 0..1
    whole = SpanEngine.load(tiny_llama, 0, 6)
    per_layer = sum(p.numel() for p in whole.module.base_model.layers.parameters()) // 6
    assert sum(p.numel() for p in middle.module.parameters()) == 2 * per_layer
    assert middle.is_first is False and middle.is_last is False
    assert (middle.start, middle.end, middle.num_layers) == (2, 4, 2)
    assert middle.model_id == tiny_llama.model_id
    assert middle.device == "cpu" and middle.dtype == "float32"


def test_last_span_ties_head_to_embeddings(tiny_llama: ModelSource) -> None:
    last = SpanEngine.load(tiny_llama, 4, 6)
    assert last.is_last and not last.is_first
    head = last.module.get_output_embeddings().weight
    assert head.shape == (tiny_llama.config["vocab_size"], tiny_llama.hidden_size)
    assert head.device.type == "cpu"


def test_distinct_sessions_from_threads(tiny_llama: ModelSource) -> None:
    chain = load_chain(tiny_llama)
    prompts = {f"t{i}": [[1, 100 + i, 200 + i, 300 + i]] for i in range(3)}
    expected = {sid: generate(chain, p, 5, session=sid) for sid, p in prompts.items()}
    got: dict[str, list[list[int]]] = {}
    errors: list[BaseException] = []

    def run(sid: str) -> None:
        try:
            got[sid] = generate(chain, prompts[sid], 5, session=sid)
        except BaseException as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=run, args=(sid,)) for sid in prompts]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert got == expected


def test_measure_throughput(tiny_llama: ModelSource) -> None:
    from node.engine import measure_throughput

    for a, b in SPANS:
        span = SpanEngine.load(tiny_llama, a, b)
        assert measure_throughput(span, steps=4) > 0
        assert span.sessions() == []
