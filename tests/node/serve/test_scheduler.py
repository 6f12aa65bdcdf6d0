"""Batched decode steps equal each session run alone; admission by KV-cache budget.

The scheduler speaks wire tensors (the engine interface); the engine's own ``step`` and
``step_batch`` take torch tensors, so the reference runs use those directly."""

from __future__ import annotations

import pytest
import trio

torch = pytest.importorskip("torch")

from node.engine import SpanEngine  # noqa: E402
from node.models import ModelSource  # noqa: E402
from node.engine.tensors import from_torch, to_torch  # noqa: E402
from node.serve.scheduler import CacheAdmission, StepScheduler  # noqa: E402
from protocol.codec import Tensor  # noqa: E402
from protocol.errors import Busy  # noqa: E402

PAD = 2
# Different lengths, a padded two-row session, greedy and sampled sessions side by side.
SESSIONS = [
    ([[1, 5, 7, 9, 11]], {}),
    ([[1, 300]], {"temperature": 0.8, "top_p": 0.9, "seed": 3}),
    ([[1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12], [1, 900, 901]], {}),
    ([[44]], {"temperature": 1.0, "seed": 7}),
]


async def sched_step(sched: StepScheduler, engine, sid: str, x: torch.Tensor, pos: torch.Tensor,
                     mask: torch.Tensor | None) -> torch.Tensor:  # type: ignore[no-untyped-def]
    """One step through the scheduler, torch tensors converted at its wire interface."""
    out = await sched.step(engine, sid, from_torch(x), from_torch(pos),
                           from_torch(mask) if mask is not None else None)
    return to_torch(out)


def _prefill(prompts: list[list[int]]) -> tuple[torch.Tensor, ...]:
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[PAD] * (width - len(p)) + p for p in prompts])  # (B, W)
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])  # (B, W)
    return ids, (mask.cumsum(dim=1) - 1).clamp(min=0), mask


class _Run:
    """One session through a chain of (engine, layers), stepped by hand."""

    def __init__(self, name: str, chain: list[tuple[SpanEngine, tuple[int, int] | None]],
                 prompts: list[list[int]], sampling: dict) -> None:
        self.name, self.chain = name, chain
        for engine, layers in chain:
            engine.open_session(name, len(prompts), 64, sampling, layers=layers)
        self.x, self.pos, self.mask = _prefill(prompts)
        self.out: list[list[int]] = [[] for _ in prompts]

    def advance(self, tokens: torch.Tensor) -> None:
        for row, tok in zip(self.out, tokens.tolist()):
            row.append(tok)
        self.x = tokens[:, None]  # (B, 1)
        self.pos = self.pos[:, -1:] + 1  # (B, 1)
        self.mask = torch.ones_like(self.x)

    def close(self) -> None:
        for engine, _ in self.chain:
            engine.close_session(self.name)


def solo(chain, prompts, sampling, n) -> list[list[int]]:  # type: ignore[no-untyped-def]
    run = _Run("solo", chain, prompts, sampling)
    for _ in range(n):
        h = run.x
        for engine, _ in chain:
            h = engine.step("solo", h, run.pos, run.mask)
        run.advance(h)
    run.close()
    return run.out


@pytest.fixture(scope="module")
def engines(tiny_llama: ModelSource) -> dict[str, SpanEngine]:
    return {"front": SpanEngine.load(tiny_llama, 0, 3), "back": SpanEngine.load(tiny_llama, 3, 6),
            "wide_front": SpanEngine.load(tiny_llama, 0, 4), "wide_back": SpanEngine.load(tiny_llama, 2, 6)}


@pytest.mark.parametrize("subrange", [False, True])
def test_step_batch_equals_alone_with_joins_and_leaves(engines: dict[str, SpanEngine],
                                                       subrange: bool) -> None:
    check_step_batch_equals_alone(engines, subrange)


def check_step_batch_equals_alone(engines: dict[str, SpanEngine], subrange: bool) -> None:
    """Four sessions join and leave a batch; each gets the tokens it gets alone (also run on
    CUDA by tests/gpu)."""
    chain = ([(engines["wide_front"], (0, 3)), (engines["wide_back"], (3, 6))] if subrange
             else [(engines["front"], None), (engines["back"], None)])
    plain = [(engines["front"], None), (engines["back"], None)]
    lengths = [10, 6, 8, 7]  # sessions leave after different numbers of tokens
    joins = [0, 0, 3, 5]  # and join at different steps
    expected = [solo(plain, p, s, n) for (p, s), n in zip(SESSIONS, lengths)]
    runs: dict[int, _Run] = {}
    biggest = 0
    for t in range(max(j + n for j, n in zip(joins, lengths))):
        for i, j in enumerate(joins):
            if t == j:  # joins with a prefill, which runs alone inside step_batch
                runs[i] = _Run(f"s{i}", chain, *SESSIONS[i])
        live = [i for i in runs if len(runs[i].out[0]) < lengths[i]]
        hs = {i: runs[i].x for i in live}
        for engine, _ in chain:
            outs = engine.step_batch([(f"s{i}", hs[i], runs[i].pos, runs[i].mask) for i in live])
            for i, o in zip(live, outs):
                assert isinstance(o, torch.Tensor), o
                hs[i] = o
        biggest = max(biggest, len(live))
        for i in live:
            runs[i].advance(hs[i])
            if len(runs[i].out[0]) == lengths[i]:
                runs[i].close()  # leaves: the others go on batched without it
    assert biggest == 4
    assert [runs[i].out for i in range(len(SESSIONS))] == expected


def test_step_batch_reports_one_bad_session_alone(engines: dict[str, SpanEngine]) -> None:
    front = engines["front"]
    a, b = _Run("a", [(front, None)], [[1, 2, 3]], {}), _Run("b", [(front, None)], [[4, 5]], {})
    try:
        for r in (a, b):
            front.step(r.name, r.x, r.pos, r.mask)
        bad_pos = torch.tensor([[999]])  # outside max_length
        outs = front.step_batch([("a", torch.tensor([[7]]), torch.tensor([[3]]), None),
                                 ("b", torch.tensor([[8]]), bad_pos, None),
                                 ("nope", torch.tensor([[8]]), torch.tensor([[2]]), None)])
        assert isinstance(outs[0], torch.Tensor) and outs[0].shape == (1, 1, 64)
        assert isinstance(outs[1], ValueError) and isinstance(outs[2], ValueError)
    finally:
        a.close()
        b.close()


async def test_scheduler_batches_concurrent_sessions(engines: dict[str, SpanEngine]) -> None:
    chain = [(engines["front"], None), (engines["back"], None)]
    lengths = [9, 5, 7, 6]
    expected = [solo(chain, p, s, n) for (p, s), n in zip(SESSIONS, lengths)]
    scheds = [StepScheduler(), StepScheduler()]  # one per node, as each server owns one
    got: dict[int, list[list[int]]] = {}

    async def session(i: int) -> None:
        await trio.sleep(0.01 * i)  # staggered joins
        run = _Run(f"c{i}", chain, *SESSIONS[i])
        for _ in range(lengths[i]):
            h = run.x
            for (engine, _), sched in zip(chain, scheds):
                h = await sched_step(sched, engine, run.name, h, run.pos, run.mask)
            run.advance(h)
        run.close()
        got[i] = run.out

    async with trio.open_nursery() as nursery:
        for i in range(len(SESSIONS)):
            nursery.start_soon(session, i)
    assert [got[i] for i in range(len(SESSIONS))] == expected
    assert scheds[0].stats.max_steps_per_batch > 1  # the steps really shared forwards
    assert scheds[0].pending == 0


async def test_admission_busy_after_bounded_wait_and_room_freed_on_close(
        tiny_llama: ModelSource) -> None:
    engine = SpanEngine.load(tiny_llama, 0, 2, max_cache_tokens=100)
    seen: list[int | None] = []
    adm = CacheAdmission(wait_s=0.3, on_change=seen.append)
    await adm.open(engine, lambda: engine.open_session("a", 1, 80), 80)
    assert seen[-1] == 20
    t0 = trio.current_time()
    with pytest.raises(Busy, match="retry"):
        await adm.open(engine, lambda: engine.open_session("b", 1, 50), 50)
    assert trio.current_time() - t0 >= 0.3
    with pytest.raises(Busy):  # can never fit: refused at once
        await adm.open(engine, lambda: engine.open_session("c", 1, 500), 500)
    adm.wait_s = 5.0
    async with trio.open_nursery() as nursery:
        nursery.start_soon(adm.open, engine, lambda: engine.open_session("b", 1, 50), 50)
        await trio.sleep(0.1)
        assert engine.sessions() == ["a"]  # still waiting for room
        engine.close_session("a")
        adm.released(engine)
    assert engine.sessions() == ["b"]
    assert seen[-1] == 50
    engine.close_session("b")


async def test_every_forward_of_a_span_engine_runs_in_the_one_engine_thread(
        engines: dict[str, SpanEngine]) -> None:
    import threading

    engine = engines["front"]
    threads: list[tuple[int, int]] = []  # (tokens per row, thread) of each engine call

    class Recording:
        inline_decode = engine.inline_decode

        def run_steps(self, steps):  # type: ignore[no-untyped-def]
            threads.append((int(steps[0].inputs.shape[1]), threading.get_ident()))
            return engine.run_steps(steps)

    sched, rec = StepScheduler(), Recording()
    engine.open_session("t", 1, 16)
    try:
        await sched.step(rec, "t", from_torch(torch.tensor([[1, 5, 7, 9]])), from_torch(torch.arange(4)[None]), None)
        out, seconds, rows = await sched.step_timed(
            rec, "t", from_torch(torch.tensor([[11]])), from_torch(torch.tensor([[4]])), None)
    finally:
        engine.close_session("t")
    assert isinstance(out, Tensor) and out.dtype == "float32"  # a wire tensor: hidden states
    assert out.shape == (1, 1, 64) and seconds > 0 and rows == 1
    main = threading.get_ident()
    assert threads[0][0] == 4 and threads[0][1] != main  # the prefill: off the event loop
    # The decode too, and in the same thread: torch's OpenMP team belongs to one thread, and
    # forwards split between two ran on one core (scheduler.py, EngineThread).
    assert threads[1] == (1, threads[0][1])


async def test_an_engine_that_asks_for_it_decodes_in_the_event_loops_thread(
        engines: dict[str, SpanEngine]) -> None:
    import threading

    engine = engines["front"]
    threads: list[int] = []

    class Inline:
        inline_decode = True

        def run_steps(self, steps):  # type: ignore[no-untyped-def]
            threads.append(threading.get_ident())
            return engine.run_steps(steps)

    sched = StepScheduler()
    engine.open_session("u", 1, 16)
    try:
        await sched.step(Inline(), "u", from_torch(torch.tensor([[1, 5]])), from_torch(torch.arange(2)[None]), None)
        await sched.step(Inline(), "u", from_torch(torch.tensor([[11]])), from_torch(torch.tensor([[2]])), None)
    finally:
        engine.close_session("u")
    assert threads[0] != threading.get_ident() and threads[1] == threading.get_ident()


def test_prefills_of_fresh_sessions_share_one_forward_and_equal_alone(
        engines: dict[str, SpanEngine], monkeypatch: pytest.MonkeyPatch) -> None:
    front, back = engines["front"], engines["back"]
    prompts = [p for p, _ in SESSIONS[:3]]  # lengths 5, 2 and a padded two-row 12/3
    alone = []
    for k, p in enumerate(prompts):
        front.open_session(f"a{k}", len(p), 32)
        back.open_session(f"a{k}", len(p), 32)
        x, pos, mask = _prefill(p)
        h = front.step(f"a{k}", x, pos, mask)
        alone.append((h, back.step(f"a{k}", h, pos, mask)))
        front.close_session(f"a{k}")
        back.close_session(f"a{k}")
    calls = []
    monkeypatch.setattr(SpanEngine, "step", lambda *a, **k: calls.append(a) or pytest.fail("ran alone"))
    for k, p in enumerate(prompts):
        front.open_session(f"b{k}", len(p), 32)
        back.open_session(f"b{k}", len(p), 32)
    try:
        items = [(f"b{k}", *_prefill(p)) for k, p in enumerate(prompts)]
        hidden = front.step_batch(items)
        tokens = back.step_batch([(sid, h, pos, mask) for (sid, _, pos, mask), h in zip(items, hidden)])
    finally:
        for k in range(len(prompts)):
            front.close_session(f"b{k}")
            back.close_session(f"b{k}")
    for (h_alone, tok_alone), h, tok in zip(alone, hidden, tokens):
        torch.testing.assert_close(h, h_alone, atol=1e-5, rtol=1e-4)
        assert torch.equal(tok, tok_alone)
    assert not calls


@pytest.mark.parametrize("gather", [True, False])
async def test_decode_groups_that_drift_apart_merge_within_a_round(autojump_clock, gather: bool) -> None:
    """Two groups of sessions step at this node half a round apart (a pipeline's phases):
    the smaller group waits for the larger, once, and from then on they share each forward."""
    batches: list[int] = []

    class Instant:  # the layer above the engine is under test: a forward costs no time
        inline_decode = True

        def run_steps(self, steps):  # type: ignore[no-untyped-def]
            batches.append(len(steps))
            return [s.inputs for s in steps]

    sched, engine = StepScheduler(), Instant()
    sched.gather = gather
    rounds, period = 12, 0.1

    async def session(name: str, offset: float) -> None:
        await trio.sleep(offset)
        for _ in range(rounds):
            await sched.step(engine, name, Tensor("float32", (1, 1, 4), bytes(16)),
                             Tensor("int64", (1, 1), bytes(8)), None)
            await trio.sleep(period)  # at the other nodes of the chain, and at the client
        sched.forget(name)

    async with trio.open_nursery() as nursery:
        for i in range(2):
            nursery.start_soon(session, f"a{i}", 0.0)
        for i in range(4):
            nursery.start_soon(session, f"b{i}", period / 2)
    assert sum(batches) == 6 * rounds
    if gather:
        # One round apart, then the smaller group waits for the larger: one forward a round.
        assert batches == [2, 4] + [6] * (rounds - 1)
    else:
        assert 6 not in batches and len(batches) == 2 * rounds  # two forwards per round
