"""Batching the steps of many sessions, and admission by KV-cache budget.

``StepScheduler`` turns the steps that wait at one moment into one ``engine.run_steps`` call
(continuous batching: a session joins the next batch when its step arrives and leaves when it
stops sending). The engine decides what shares a forward (decode steps of sessions on the
same layers; the first steps of fresh sessions on the same layers, left-padded); any other step
runs alone inside the same call.

How it runs without a task of its own: the first step to arrive when nothing computes becomes
the *leader*. It takes every pending step of its engine (up to ``max_rows`` rows), runs them in
one worker thread, hands each result back, and passes the leadership to the oldest step that
arrived meanwhile. So every task that runs a batch is a session handler that wanted a step
anyway: nothing runs in the background that the server's handlers do not own, and a server
used without a nursery (tests) batches just the same. One batch computes at a time: the engine
uses every core for each forward.

Merging groups (``_gather``): sessions that started at different moments drift through a
pipeline in separate groups, each costing a whole forward at every node. A decode batch first
gathers its own group, then, if a larger group is due soon, waits for it (at most the leader's
own interval between steps): the groups merge within a round. Measured, 16 sessions x 16 tokens
through 3 SmolLM2 nodes on 2 cores, A/B in one sitting: 62-67 tok/s with it, 41-48 without.

Where it computes: every engine call that leaves the event loop runs in one thread of its
own, ``ENGINE_THREAD`` (the node loads and measures its engine there too), so the node keeps
reading its streams during a forward. One thread, always the same: torch's OpenMP team belongs
to the thread that started it, and while another thread's team sat idle (the event loop's, or a
trio worker's) forwards ran on one core. Measured on the 2-core CI machine, SmolLM2-135M: one
node served 17.7 tok/s with prefills in trio workers and decodes in the event loop, 27.5 tok/s
with every forward in the engine thread (3 nodes: 16 and 22.7; one process: 30). An engine
whose ``inline_decode`` is true still has its decode batches run in the event loop's thread
(none of this project's engines asks for it now).

Cancellation: a step cancelled while it waits is dropped from the queue (it never reached the
engine). Once its batch has started, the forward runs to its end (shielded: the other sessions
of the batch need their results) and the cancelled session's result is discarded; its cache has
advanced, which is fine because a cancelled step ends its session. A leader cancelled before it
starts its batch hands the leadership on.

``CacheAdmission`` reserves a session's KV-cache room (``batch_size * max_length`` tokens) at
open time against the engine's ``max_cache_tokens``. When the budget is full an open waits,
bounded by ``wait_s``, for room to be freed, then fails with ``Busy`` (wire code 25) and a hint
of when to retry: a full node never runs out of memory, it says no.

Both speak to the engine only through ``node.engine.base.Engine`` (wire tensors; no torch here).
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TypeVar

import trio

from protocol.codec import Tensor
from protocol.errors import Busy

from node.engine.base import Engine, StepInput
from node.engine.errors import CapacityExceeded

T = TypeVar("T")

DEFAULT_MAX_ROWS = 64
GROUP_GAP_S = 0.003  # steps of one group arrive closer together than this
GROUP_MAX_S = 0.02  # gathering one's own group takes at most this
GATHER_MAX_S = 0.5  # waiting for another group takes at most this (and the leader's interval)
GATHER_RECENT_S = 2.0  # a session with no decode step for this long is not waited for
DEFAULT_ADMISSION_WAIT_S = 10.0


@dataclass
class SchedulerStats:
    batches: int = 0  # engine calls
    steps: int = 0  # session steps run
    max_steps_per_batch: int = 0
    compute_s: float = 0.0  # wall time inside engine calls
    by_size: dict[int, int] = field(default_factory=dict)  # steps per batch -> batches


@dataclass(eq=False)
class _Request:
    engine: Engine
    item: StepInput
    rows: int
    done: trio.Event = field(default_factory=trio.Event)
    result: Tensor | Exception | None = None
    engine_s: float = 0.0  # seconds of the engine call this step ran in (measured in the worker)
    batch_rows: int = 0  # rows of every step in that engine call
    lead: bool = False  # woken to lead the next batch, not with a result
    taken: bool = False  # in a batch that has started


class EngineThread:
    """One OS thread that runs every engine call the scheduler moves off the event loop.

    Why one, always the same: the OpenMP team that torch's CPU kernels use belongs to the
    thread that started it. While one thread's team sits idle (trio's worker threads live on
    for seconds after their last call), forwards started in another thread ran on one core.
    Measured on this project's 2-core CI machine, SmolLM2-135M: decode 31 ms/token when every
    forward ran in one thread, 53-56 ms when the prefill ran in a trio worker and the decodes
    elsewhere (a node served 17-18 tok/s where one process decoded 30). The thread is a daemon
    that idles on its queue; a call waits for its result shielded (a forward runs to its end:
    the scheduler's rule), and one whose caller was cancelled meanwhile is discarded."""

    def __init__(self) -> None:
        self._jobs: queue.SimpleQueue[Callable[[], None] | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None

    async def run(self, fn: Callable[..., T], *args: object) -> T:
        if self._thread is None or not self._thread.is_alive():
            self._thread = threading.Thread(target=self._serve, name="shiza-engine", daemon=True)
            self._thread.start()
        token = trio.lowlevel.current_trio_token()
        done = trio.Event()
        box: dict[str, object] = {}

        def job() -> None:
            try:
                box["value"] = fn(*args)
            except BaseException as exc:  # noqa: BLE001 - handed back to the caller
                box["error"] = exc
            try:
                token.run_sync_soon(done.set)
            except trio.RunFinishedError:  # the caller's run ended meanwhile
                pass

        self._jobs.put(job)
        with trio.CancelScope(shield=True):
            await done.wait()
        if "error" in box:
            raise box["error"]  # type: ignore[misc]
        return box["value"]  # type: ignore[return-value]

    def _serve(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                return
            job()


#: The process's one engine thread: the node loads and measures its engine there too.
ENGINE_THREAD = EngineThread()


class StepScheduler:
    """Runs the steps of concurrent sessions as batched engine calls (see the module doc)."""

    def __init__(self, max_rows: int = DEFAULT_MAX_ROWS) -> None:
        self.max_rows = max_rows
        self.stats = SchedulerStats()
        self._pending: list[_Request] = []
        self._busy = False  # a leader exists (computing, or woken to compute)
        # For merging decode groups (_gather): each session's last decode step and its usual
        # interval between decode steps, and an event set on every arrival.
        self._last: dict[str, float] = {}
        self._period: dict[str, float] = {}
        self._arrival = trio.Event()
        self.gather = True  # False: batch only what is pending at once (tests, comparisons)
        self.thread = ENGINE_THREAD  # every forward that leaves the event loop runs there

    @property
    def pending(self) -> int:
        return len(self._pending)

    async def step(self, engine: Engine, session_id: str, inputs: Tensor, positions: Tensor,
                   mask: Tensor | None, *, keep: int | None = None, draft: Tensor | None = None) -> Tensor:
        """The engine's output for this step, or the engine's exception raised here."""
        return (await self.step_timed(engine, session_id, inputs, positions, mask, keep=keep, draft=draft))[0]

    async def step_timed(self, engine: Engine, session_id: str, inputs: Tensor, positions: Tensor,
                         mask: Tensor | None, *, keep: int | None = None,
                         draft: Tensor | None = None) -> tuple[Tensor, float, int]:
        """``(output, seconds, rows)``: seconds is the engine call's own time (no queueing, no
        thread hand-off), shared by every step of its batch; rows is that batch's rows.
        Cancellation: see the module docstring (dropped while queued; once computing, the
        batch finishes, shielded, and this step's result is discarded)."""
        req = _Request(engine, StepInput(session_id, inputs, positions, mask, keep, draft), int(inputs.shape[0]))
        self._pending.append(req)
        self._arrived(session_id, _is_decode(req.item))
        if self._busy:
            try:
                await req.done.wait()
            except BaseException:
                if req.lead:
                    self._hand_off()
                elif not req.taken and req in self._pending:
                    self._pending.remove(req)
                raise
            if not req.lead:
                return self._outcome(req), req.engine_s, req.batch_rows
        self._busy = True
        try:
            await trio.sleep(0)  # steps that arrive in this same tick join the batch
            if self.gather and _is_decode(req.item):
                await self._gather(req.item.session_id)
            batch = self._take(req.engine)
            with trio.CancelScope(shield=True):
                await self._run(req.engine, batch)
        finally:
            self._hand_off()
        return self._outcome(req), req.engine_s, req.batch_rows

    def forget(self, session_id: str) -> None:
        """The session ended: no batch waits for it any more."""
        self._last.pop(session_id, None)
        self._period.pop(session_id, None)

    def _arrived(self, session_id: str, decode: bool) -> None:
        now = trio.current_time()
        if decode:
            last = self._last.get(session_id)
            if last is not None:
                gap, prev = now - last, self._period.get(session_id)
                self._period[session_id] = gap if prev is None else 0.7 * prev + 0.3 * gap
            self._last[session_id] = now
        self._arrival.set()
        self._arrival = trio.Event()

    async def _wait_arrival(self, until: float) -> bool:
        """Wait for the next step to arrive, until ``until``; False if none came."""
        with trio.move_on_at(until):
            await self._arrival.wait()
            return True
        return False

    async def _gather(self, leader: str) -> None:
        """Merge decode groups: wait for the sessions whose steps are due soon, when they
        outnumber the ones waiting here.

        In a pipeline, sessions that started at different moments move through the chain in
        separate groups, and every group costs a whole forward at every node (a batch of 16
        costs little more than a batch of 4). So, first, the leader's own group gathers: steps
        that arrive within GROUP_GAP_S of each other (a client forwards a group's steps one
        after another). Then, if more sessions are due (their last decode step here plus their
        usual interval falls before the leader's own next step would) than wait here, or as
        many with a smaller first session id, the batch waits for them, at most the leader's own
        interval (so one step is at most twice as slow) and GATHER_MAX_S. A smaller group waits
        for a larger one, never the other way round, so two groups never wait for each other,
        and the groups merge within one round. A lone session never waits.
        """
        start = trio.current_time()
        period = self._period.get(leader)
        if period is None or not any(sid not in self._pending_ids() for sid in self._recent(start)):
            return
        until = start + min(GROUP_MAX_S, period)
        while await self._wait_arrival(min(until, trio.current_time() + GROUP_GAP_S)):
            pass  # the rest of this group
        now = trio.current_time()
        deadline = start + min(GATHER_MAX_S, period)
        while now < deadline:
            here = self._pending_ids()
            due = [sid for sid in self._recent(now) if sid not in here
                   and self._last[sid] + self._period.get(sid, period) <= deadline]
            if not due or (len(due), min(here)) < (len(here), min(due)):
                return  # nobody due, or a group no larger than this one (ties: by id)
            if not await self._wait_arrival(deadline):
                return
            while await self._wait_arrival(min(deadline, trio.current_time() + GROUP_GAP_S)):
                pass  # that group's other steps
            now = trio.current_time()

    def _pending_ids(self) -> set[str]:
        return {r.item.session_id for r in self._pending}

    def _recent(self, now: float) -> list[str]:
        return [sid for sid, t in self._last.items() if now - t < GATHER_RECENT_S]

    def _take(self, engine: Engine) -> list[_Request]:
        batch: list[_Request] = []
        rows = 0
        for r in list(self._pending):
            if r.engine is not engine or (batch and rows + r.rows > self.max_rows):
                continue
            batch.append(r)
            rows += r.rows
            r.taken = True
            self._pending.remove(r)
        return batch

    async def _run(self, engine: Engine, batch: list[_Request]) -> None:
        t0 = time.perf_counter()

        def timed(items: Sequence[StepInput]) -> tuple[list[Tensor | Exception], float]:
            t = time.perf_counter()
            out = engine.run_steps(items)
            return out, time.perf_counter() - t

        engine_s = 0.0
        items = [r.item for r in batch]
        results: list[Tensor | Exception]
        try:
            if engine.inline_decode and all(_is_decode(i) for i in items):
                results, engine_s = timed(items)  # in this thread: see the module doc
            else:
                results, engine_s = await self.thread.run(timed, items)
        except Exception as exc:  # noqa: BLE001 - a bug fails this batch, not the node
            results = [exc] * len(batch)
        st = self.stats
        st.batches += 1
        st.steps += len(batch)
        st.max_steps_per_batch = max(st.max_steps_per_batch, len(batch))
        st.by_size[len(batch)] = st.by_size.get(len(batch), 0) + 1
        st.compute_s += time.perf_counter() - t0
        for r, res in zip(batch, results):
            r.result = res
            r.engine_s = engine_s
            r.batch_rows = sum(b.rows for b in batch)
            r.done.set()

    def _hand_off(self) -> None:
        """Wake the oldest waiting step to lead the next batch, or mark the scheduler idle."""
        self._busy = False
        for r in self._pending:
            if not r.done.is_set():
                r.lead = True
                self._busy = True
                r.done.set()
                return

    @staticmethod
    def _outcome(req: _Request) -> Tensor:
        if isinstance(req.result, BaseException):
            raise req.result
        assert req.result is not None  # set with done, before any outcome is read
        return req.result


def _is_decode(item: StepInput) -> bool:
    shape = item.inputs.shape
    return len(shape) >= 2 and int(shape[1]) == 1


class CacheAdmission:
    """Opens sessions against the engine's KV-cache budget, waiting (bounded) for room.

    ``on_change(tokens_left)`` is called after every open and close (the node puts it in its
    capacity record). ``tokens_left`` is None for an engine without a budget.
    """

    def __init__(self, wait_s: float = DEFAULT_ADMISSION_WAIT_S,
                 on_change: Callable[[int | None], None] | None = None) -> None:
        self.wait_s = wait_s
        self.on_change = on_change
        self._freed = trio.Event()
        self.refused = 0  # opens answered Busy

    @staticmethod
    def tokens_left(engine: Engine) -> int | None:
        budget = engine.max_cache_tokens
        if budget is None:
            return None
        return max(0, int(budget) - int(engine.cache_tokens_reserved()))

    async def open(self, engine: Engine, open_session: Callable[[], None], tokens: int) -> None:
        """Run ``open_session`` (which raises CapacityExceeded when the budget is full),
        retrying as room is freed for up to ``wait_s``; then ``Busy`` with a retry hint.
        Cancellation while waiting for room: nothing was opened."""
        budget = engine.max_cache_tokens
        if budget is not None and tokens > budget:
            self.refused += 1
            raise Busy(f"session asks {tokens} cache tokens, this node holds at most {budget}; "
                       "use a node with more room or a shorter max_length")
        deadline = trio.current_time() + self.wait_s
        while True:
            try:
                open_session()
                break
            except CapacityExceeded as exc:
                left = deadline - trio.current_time()
                if left <= 0:
                    self.refused += 1
                    raise Busy(f"KV-cache budget full ({exc}); waited {self.wait_s:g} s; "
                               f"retry in {max(1.0, self.wait_s):g} s or use another node") from None
                with trio.move_on_after(left):
                    await self._freed.wait()
        self._changed(engine)

    def released(self, engine: Engine) -> None:
        """A session closed: wake every open that waits for room."""
        self._freed.set()
        self._freed = trio.Event()
        self._changed(engine)

    def _changed(self, engine: Engine) -> None:
        if self.on_change is not None:
            self.on_change(self.tokens_left(engine))
