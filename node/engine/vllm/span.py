"""The vLLM span engine: layers [start, end) of a model on vLLM's engine, in a process of its own.

vLLM runs under its own python and torch (``.venv-vllm``), so the node starts ``span_worker.py``
there and talks to it over a Unix socket pair (frames.py): a step's inputs go as raw bytes
(token ids on the first span, hidden states on the others), its hidden states come back, or on
the last span the float32 logits of the positions that choose a token. The worker loads only
the span's layers and runs them through vLLM's model runner with vLLM's paged KV cache, its
attention kernels and its batching (span_worker.py says how, and what it patches).

What stays here, in the node: the sessions (each row is one vLLM request, its KV blocks
reserved from vLLM's real cache when the session opens, so ``max_cache_tokens`` is the size
vLLM allocated), the checks of every step (the same ``validate_step`` as the transformers span),
and the choice of tokens (node/engine/sampling.py, the transformers span's own code: greedy,
seeded sampling, logit_bias, grammars, log-probabilities and speculative windows all behave
the same on both engines). Several sessions' steps (``step_batch``) are one request to the
worker and one forward in vLLM.

Not served: a session on a sub-range that drops the span's first layer when the span starts
the model, or its last when it ends it (the worker's model embeds, or applies the final norm,
or not, for the whole span); positions that are not each row's next ones.

Health: ``watch`` reports the worker down when its process exits; ``restart`` drops every
session and starts a fresh worker. The worker ends when the node does (EOF on its socket).
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, AsyncGenerator, Mapping, Sequence

import torch

from node.engine.base import EngineHealth, Sampling, check_session_size, parse_sampling
from node.engine.errors import BadInput, CapacityExceeded, EngineError
from node.engine.grammar import GrammarTokenizer
from node.engine.sampling import Chooser, check_next, choose_window, pick, rollback
from node.engine.torch_engine import (SpanFigures, TorchEngine, TorchStep, check_room, step_extras,
                                      take_last_logprobs, validate_step)
from node.engine.vllm import frames
from node.engine.vllm.engine import cpu_env, default_vllm_python
from node.models import ModelSource

log = logging.getLogger(__name__)

__all__ = ["VllmSpanEngine"]

_WORKER = Path(__file__).with_name("span_worker.py")
START_TIMEOUT_S = 600.0
STEP_TIMEOUT_S = 300.0
HEALTH_INTERVAL_S = 2.0
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class _Session:
    batch_size: int
    max_length: int
    layers: tuple[int, int]
    is_first: bool
    is_last: bool
    rids: list[str]  # the vLLM request of each row
    blocks: list[list[int]]  # each row's KV blocks, reserved at open
    chooser: Chooser
    mask: torch.Tensor  # (B, L) int64, one column per step column so far (0: left padding)
    started: list[bool] = field(default_factory=list)  # the worker knows the row's request

    @property
    def length(self) -> int:
        return int(self.mask.shape[1])

    def computed(self, row: int) -> int:
        """Tokens row ``row`` holds in vLLM's cache: its real columns."""
        return int(self.mask[row].sum())


class _Worker:
    """The worker process and our end of its socket; one request in flight at a time."""

    def __init__(self, args: list[str], vllm_python: str, device: str, log_path: Path | None) -> None:
        ours, theirs = socket.socketpair()
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        if device == "cpu":
            env.update(cpu_env(vllm_python))
            env["CUDA_VISIBLE_DEVICES"] = ""
        out = open(log_path, "ab") if log_path else subprocess.DEVNULL  # noqa: SIM115
        try:
            self.proc = subprocess.Popen(
                [vllm_python, str(_WORKER), "--fd", str(theirs.fileno()), *args],
                pass_fds=[theirs.fileno()], stdin=subprocess.DEVNULL, stdout=out,
                stderr=subprocess.STDOUT, env=env, start_new_session=True)
        finally:
            theirs.close()
            if out is not subprocess.DEVNULL:
                out.close()
        self.sock = ours
        self.lock = threading.Lock()
        self.log_path = log_path
        t0 = time.monotonic()
        self.sock.settimeout(START_TIMEOUT_S)
        try:
            header, _ = frames.recv(self.sock)
        except (frames.FrameError, OSError) as e:
            self.stop()
            raise EngineError(f"the vLLM span worker did not start ({vllm_python}): {e}{self._tail()}") from None
        if header.get("op") != "ready":
            self.stop()
            raise EngineError(f"the vLLM span worker did not start: {header.get('message')}"
                              f"{self._tail()}")
        self.info = header
        self.start_seconds = time.monotonic() - t0
        self.sock.settimeout(STEP_TIMEOUT_S)

    def alive(self) -> bool:
        return self.proc.poll() is None

    def call(self, header: dict[str, Any], tensors: list[tuple[str, str, tuple[int, ...], Any]]
             ) -> tuple[dict[str, Any], dict[str, Any]]:
        with self.lock:
            try:
                frames.send(self.sock, header, tensors)
                reply, out = frames.recv(self.sock)
            except (frames.FrameError, OSError) as e:
                raise EngineError(f"the vLLM span worker is gone: {e}") from e
        if reply.get("op") == "error":
            raise EngineError(f"vLLM span worker: {reply.get('message')}")
        return reply, out

    def tell(self, header: dict[str, Any]) -> None:
        with self.lock:
            try:
                frames.send(self.sock, header)
            except (frames.FrameError, OSError):
                pass  # a dead worker frees everything anyway

    def stop(self) -> None:
        try:
            self.sock.close()  # EOF: the worker ends on its own
        except OSError:
            pass
        if self.proc.poll() is None:
            try:
                self.proc.wait(5.0)
            except subprocess.TimeoutExpired:
                try:
                    os.killpg(self.proc.pid, signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    pass
                self.proc.wait(10.0)

    def _tail(self) -> str:
        if not self.log_path or not self.log_path.exists():
            return ""
        lines = [ln for ln in self.log_path.read_text(errors="replace").splitlines() if ln.strip()]
        return "\n" + "\n".join(lines[-15:])


def _tensor(t: torch.Tensor) -> tuple[str, tuple[int, ...], memoryview]:
    t = t.detach().contiguous().cpu()
    data = memoryview(t.view(torch.uint8).reshape(-1).numpy()) if t.numel() else memoryview(b"")
    return str(t.dtype).removeprefix("torch."), tuple(t.shape), data


def _from(entry: tuple[str, tuple[int, ...], memoryview]) -> torch.Tensor:
    dtype, shape, buf = entry
    if not len(buf):
        return torch.empty(shape, dtype=_DTYPES.get(dtype, torch.float32))
    return torch.frombuffer(buf, dtype=getattr(torch, dtype)).reshape(shape)


class VllmSpanEngine(SpanFigures, TorchEngine[_Session]):
    """Layers [start, end) on vLLM; construct with ``VllmSpanEngine.load``."""

    inline_decode = False
    windows = True  # window steps (keep, draft): speculative decoding, SPEC.md 9.7

    def __init__(self, source: ModelSource, start: int, end: int, worker_args: list[str], *,
                 vllm_python: str, device: str, dtype: str, log_path: Path | None) -> None:
        self.source = source
        self._start, self._end = start, end
        self._args, self._python, self._device_name = worker_args, vllm_python, device
        self._dtype_name, self._log_path = dtype, log_path
        self._grammar_tokenizer = GrammarTokenizer(source.path, int(source.config["vocab_size"]),
                                                   source.config.get("eos_token_id"))
        self._ids = 0
        self._closed = False
        self.worker = _Worker(worker_args, vllm_python, device, log_path)
        self._init_blocks()
        super().__init__((len(self._free)) * self.block_size)

    def _init_blocks(self) -> None:
        info = self.worker.info
        self.block_size = int(info["block_size"])
        self.max_model_len = int(info["max_model_len"])
        self.vllm_version = str(info["version"])
        # Block 0 is vLLM's null block (padding in block tables): never a request's.
        self._free = list(range(int(info["num_blocks"]) - 1, 0, -1))

    @classmethod
    def load(cls, source: ModelSource, start: int, end: int, *, vllm_python: str | None = None,
             device: str = "cpu", dtype: str = "float32", max_model_len: int = 2048,
             max_num_seqs: int = 64, log_path: Path | None = None) -> VllmSpanEngine:
        """Start a worker serving layers [start, end) of ``source``; blocks until it is ready
        (tens of seconds: vLLM's imports, the weights, the KV cache)."""
        if not (0 <= start < end <= source.num_layers):
            raise BadInput(f"span {start}:{end} is not inside 0:{source.num_layers} of {source.name}")
        if dtype not in _DTYPES:
            raise BadInput(f"dtype {dtype!r} not supported; use one of {sorted(_DTYPES)}")
        args = ["--model", str(source.path), "--start", str(start), "--end", str(end),
                "--num-layers", str(source.num_layers), "--dtype", dtype,
                "--max-model-len", str(max_model_len), "--max-num-seqs", str(max_num_seqs),
                "--max-batched-tokens", str(max(max_model_len, 2048))]
        return cls(source, start, end, args, vllm_python=vllm_python or default_vllm_python(),
                   device=device, dtype=dtype, log_path=log_path)

    # --- the interface's figures ----------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        return int(self.source.config["vocab_size"])

    @property
    def device(self) -> str:
        return self._device_name

    @property
    def dtype(self) -> str:
        return self._dtype_name

    # --- sessions ---------------------------------------------------------------------------

    def open_session(self, session_id: str, batch_size: int, max_length: int,
                     sampling: Mapping[str, object] | Sampling | None = None,
                     layers: tuple[int, int] | None = None) -> None:
        """As ``SpanEngine.open_session``; each row's KV blocks are reserved here, so a session
        that opens never runs out of cache."""
        check_session_size(batch_size, max_length)
        params = parse_sampling(sampling)
        a, b = self._check_layers(layers)
        if max_length > self.max_model_len:
            raise CapacityExceeded(f"max_length {max_length} exceeds this vLLM span's "
                                   f"max_model_len {self.max_model_len}")
        is_last = b == self.source.num_layers
        chooser = Chooser.of(params, batch_size, self.vocab_size, "cpu", self._grammar_tokenizer) \
            if is_last else Chooser()
        need = -(-max_length // self.block_size)
        with self._lock:
            if len(self._free) < need * batch_size:
                raise CapacityExceeded(f"vLLM's KV cache has {len(self._free)} free blocks of "
                                       f"{self.block_size}; this session needs {need * batch_size}")
            blocks = [[self._free.pop() for _ in range(need)] for _ in range(batch_size)]
            self._ids += 1
            n = self._ids
        session = _Session(batch_size, max_length, (a, b), a == 0, is_last,
                           [f"s{n}r{r}" for r in range(batch_size)], blocks, chooser,
                           torch.zeros((batch_size, 0), dtype=torch.int64), [False] * batch_size)
        try:
            self._add(session_id, session)
        except BaseException:
            self._release(session)
            raise

    def _check_layers(self, layers: Any) -> tuple[int, int]:
        a, b = self._sub_range(layers)
        if (self.is_first and a != 0) or (self.is_last and b != self.source.num_layers):
            raise BadInput(f"a vLLM span serves sub-ranges that keep its first layer when it starts "
                           f"the model and its last when it ends it; not {a}:{b} of "
                           f"{self._start}:{self._end}")
        return a, b

    def _release(self, session: _Session) -> None:
        started = [rid for rid, s in zip(session.rids, session.started) if s]
        with self._lock:
            for row in session.blocks:
                self._free.extend(row)
            session.blocks = []
        if started:
            self.worker.tell({"op": "free", "ids": started})

    def _pop(self, session_id: str) -> _Session:  # type: ignore[override]
        session = super()._pop(session_id)
        self._release(session)
        return session

    def session_layers(self, session_id: str) -> tuple[int, int]:
        return self._get(session_id).layers

    def take_logprobs(self, session_id: str) -> tuple[Any, Any] | None:
        """As ``SpanEngine.take_logprobs``."""
        return take_last_logprobs(self._get(session_id).chooser)

    def close_session(self, session_id: str) -> None:
        self._pop(session_id)

    def close(self) -> None:
        with self._lock:
            self._closed = True
            sessions, self._sessions = list(self._sessions.values()), {}
        for s in sessions:
            self._release(s)
        self.worker.stop()

    # --- health -----------------------------------------------------------------------------

    async def watch(self, interval_s: float = HEALTH_INTERVAL_S) -> AsyncGenerator[EngineHealth, None]:
        """Every ``interval_s``: up with the share of KV blocks reserved while the worker
        lives; ``up=False`` once its process exited."""
        import trio

        while True:
            await trio.sleep(interval_s)
            if self.worker.alive():
                yield EngineHealth(True, 1.0 - len(self._free) / max(1, self.max_cache_tokens // self.block_size))
            else:
                yield EngineHealth(False, detail=f"vLLM span worker exited ({self.worker.proc.returncode})")

    def restart(self) -> None:
        """Drop every session (their caches died with the worker) and start a fresh worker."""
        with self._lock:
            if self._closed:
                raise EngineError("the vLLM span engine is closed")
            self._sessions = {}
        self.worker.stop()
        self.worker = _Worker(self._args, self._python, self._device_name, self._log_path)
        with self._lock:
            self._init_blocks()

    # --- steps ------------------------------------------------------------------------------

    def step(self, session_id: str, inputs: torch.Tensor, positions: torch.Tensor,
             mask: torch.Tensor | None = None, *, keep: int | None = None,
             draft: torch.Tensor | None = None) -> torch.Tensor:
        """As ``SpanEngine.step``: hidden states (B, T, H), or on the last span the next token
        of each row (B,), or with a draft a token per position (B, T)."""
        out = self.step_batch([(session_id, inputs, positions, mask, keep, draft)])[0]
        if isinstance(out, Exception):
            raise out
        return out

    def step_batch(self, items: Sequence[TorchStep]) -> list[torch.Tensor | Exception]:  # type: ignore[override]
        """Every step that passes its checks goes to the worker in one request (one forward in
        vLLM, per layer range); one session's bad input fails that session alone."""
        results: list[torch.Tensor | Exception | None] = [None] * len(items)
        ready: list[tuple[int, _Session, tuple[Any, ...], list[dict[str, Any]], list[torch.Tensor]]] = []
        sessions_seen: set[int] = set()
        for i, item in enumerate(items):
            try:
                session = self._get(item[0])
                if id(session) in sessions_seen:
                    raise BadInput("two steps of one session in one batch")
                sessions_seen.add(id(session))
                prepared = self._prepare(session, item)
                reqs, rows = self._requests(session, prepared)
                ready.append((i, session, prepared, reqs, rows))
            except Exception as e:  # noqa: BLE001 - reported to that session only
                results[i] = e
        if ready:
            try:
                outs = self._call(ready)
            except EngineError as e:
                for i, session, *_ in ready:  # their caches may hold part of this step
                    self._drop(session)
                    results[i] = EngineError(f"{e}; session closed")
            else:
                for (i, session, prepared, _, _), out in zip(ready, outs):
                    try:
                        results[i] = self._finish(session, prepared, out)
                    except Exception as e:  # noqa: BLE001
                        results[i] = e
        return results  # type: ignore[return-value]

    def _drop(self, session: _Session) -> None:
        with self._lock:
            for sid, live in list(self._sessions.items()):
                if live is session:
                    self._sessions.pop(sid)
        self._release(session)

    def _prepare(self, session: _Session, item: TorchStep) -> tuple[Any, ...]:
        sid, inputs, positions, mask = item[:4]
        keep, draft = step_extras(item)
        if keep is not None:
            if not isinstance(keep, int) or isinstance(keep, bool) or not 0 <= keep <= session.length:
                raise BadInput(f"keep must be an int in [0, {session.length}] (the tokens the session "
                               f"holds), got {keep!r}")
            session.mask = session.mask[:, :keep]
            rollback(session.chooser, keep)
        a, b = session.layers
        inputs, positions, mask = validate_step(
            inputs, positions, mask, batch_size=session.batch_size, max_length=session.max_length,
            length=session.length, takes_tokens=session.is_first, vocab=self.vocab_size,
            hidden_size=self.hidden_size, what="the first span" if session.is_first else f"layers {a}:{b}")
        t = int(inputs.shape[1])
        check_room(session.length, t, session.max_length)
        if draft is not None:
            if (not isinstance(draft, torch.Tensor) or draft.dtype != torch.int64
                    or tuple(draft.shape) != (session.batch_size, t - 1) or t < 2):
                raise BadInput(f"draft must be int64 ({session.batch_size}, {t - 1}): the drafts in "
                               f"the step's last positions")
            if draft.numel() and (int(draft.min()) < 0 or int(draft.max()) >= self.vocab_size):
                raise BadInput(f"draft token ids must lie in [0, {self.vocab_size})")
            if session.is_last and not bool(mask.all()):
                raise BadInput("a window step on a vLLM span has no padding")
        check_next(session.chooser, positions[:, 0 if draft is not None else -1])  # BadInput on a gap
        if not session.is_first:
            inputs = inputs.to(_DTYPES[self._dtype_name])
        return inputs, positions, mask, draft

    def _requests(self, session: _Session, prepared: tuple[Any, ...]
                  ) -> tuple[list[dict[str, Any]], list[torch.Tensor]]:
        """The worker's request per row that has tokens in this step, and those tokens' inputs."""
        inputs, positions, mask, draft = prepared
        reqs, rows = [], []
        for r in range(session.batch_size):
            real = mask[r].nonzero().flatten()
            n = int(real.numel())
            if n == 0:
                continue
            done = session.computed(r)
            want = torch.arange(done, done + n, dtype=torch.int64)
            if not torch.equal(positions[r, real].cpu(), want):
                raise BadInput(f"row {r}: positions {positions[r, real].tolist()} are not the row's "
                               f"next ones ({done}..{done + n - 1}); a vLLM span computes each row's "
                               f"tokens in order")
            req: dict[str, Any] = {"id": session.rids[r], "start": done, "n": n,
                                   "length": session.max_length, "layers": list(session.layers)}
            if not session.started[r]:
                req["blocks"] = session.blocks[r]
            if session.is_last:
                req["logits"] = list(range(n)) if draft is not None else [n - 1]
            reqs.append(req)
            rows.append(inputs[r, real])
        return reqs, rows

    def _call(self, ready: list[tuple[int, _Session, tuple[Any, ...], list[dict[str, Any]], list[torch.Tensor]]]
              ) -> list[torch.Tensor]:
        """One worker request for every ready step; each step's share of the output back."""
        reqs = [q for _, _, _, rs, _ in ready for q in rs]
        rows = [x for _, _, _, _, xs in ready for x in xs]
        if rows:
            x = torch.cat(rows, dim=0)
        elif ready[0][1].is_first:
            x = torch.empty((0,), dtype=torch.int64)
        else:
            x = torch.empty((0, self.hidden_size), dtype=_DTYPES[self._dtype_name])
        _, out = self.worker.call({"op": "step", "reqs": reqs}, [("inputs", *_tensor(x))])
        for _, session, _, rs, _ in ready:
            for q in rs:
                session.started[session.rids.index(q["id"])] = True
        flat = _from(out["logits"] if "logits" in out else out["out"])
        shares, at = [], 0
        for _, _, _, rs, _ in ready:
            k = sum(len(q["logits"]) if "logits" in q else q["n"] for q in rs)
            shares.append(flat[at:at + k])
            at += k
        return shares

    def _finish(self, session: _Session, prepared: tuple[Any, ...], flat: torch.Tensor) -> torch.Tensor:
        """This step's output from its share of the worker's: hidden states back in their
        columns (zeros in padding), or the tokens chosen from the logits."""
        inputs, positions, mask, draft = prepared
        batch, t = int(inputs.shape[0]), int(inputs.shape[1])
        session.mask = torch.cat([session.mask, mask.to(torch.int64).cpu()], dim=1)
        counts = [int(mask[r].sum()) for r in range(batch)]
        if not session.is_last:
            out = torch.zeros((batch, t, self.hidden_size), dtype=flat.dtype)
            at = 0
            for r, n in enumerate(counts):
                if n:
                    out[r, mask[r].nonzero().flatten()] = flat[at:at + n]
                    at += n
            return out
        vocab = int(flat.shape[-1]) if flat.numel() else self.vocab_size
        if draft is not None:
            logits = flat.reshape(batch, t, vocab).clone()
            return choose_window(logits, draft, session.chooser, positions)
        logits = torch.zeros((batch, vocab), dtype=torch.float32)
        at = 0
        for r, n in enumerate(counts):
            if n:
                logits[r] = flat[at]
                at += 1
        return pick(logits, session.chooser, positions[:, -1])

    def ping(self, tensor: torch.Tensor) -> float:
        """Seconds for ``tensor`` to go to the worker and back (the channel's own cost)."""
        t0 = time.perf_counter()
        self.worker.call({"op": "ping"}, [("x", *_tensor(tensor))])
        return time.perf_counter() - t0
