"""The transformers span engine: layers [start, end) of a decoder model, a KV cache per session.

The span is built from the model's own transformers class (so each architecture keeps its own
decoder layers, rotary embedding and mask functions) with ``num_hidden_layers = end - start``,
instantiated on the meta device, and filled with just the tensors it needs, read one by one
from the safetensors files and renumbered 0..n-1. The first span keeps the embeddings, the last
the final norm and the head (the embedding matrix when they are tied); a middle span has
neither, and its final norm is an identity so hidden states pass through unnormalised.

A session may run only a sub-range ``[a, b)`` of the span (``open_session(layers=...)``), so a
client can cross from one node to another where their spans overlap. Such a session runs the
model's own forward with the layers outside ``[a, b)`` swapped for pass-throughs (and the final
norm for an identity unless ``b`` is the model's last layer), under the forward lock, and
restores them after. Why this rather than a loop of our own over the decoder layers: the
model's forward keeps each architecture's choice of masks (full, sliding, per-layer types) and
rotary embedding, which a hand-written loop would have to copy per architecture. The session's
cache keeps the span's layer numbering (the attention modules index it by their own
``layer_idx``); the slots of the layers it does not run alias a slot it does run, of the same
kind (sliding or not), because the mask functions size the mask from slot 0 or the first
full-attention slot, which such a session never fills.

It implements ``node.engine.base.Engine`` (wire tensors, ``run_steps``) through the shared torch
edge (node/engine/torch_engine.py); ``step`` and ``step_batch`` are its torch-level API for
in-process callers.

Cancellation / threads: ``step`` is synchronous and CPU/GPU bound; the node runs every
forward in one engine thread (node/serve/scheduler.py, EngineThread: ``inline_decode`` is false). It cannot be
interrupted once started. A lock serialises forwards, so distinct sessions may be stepped from
several threads. A step that fails inside the forward leaves its cache half-updated: that
session is closed.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from protocol.codec import Tensor

from node.engine.base import Sampling, check_session_size, parse_sampling
from node.engine.grammar import Constraint, GrammarTokenizer
from node.engine.sampling import Chooser, Penalties, check_next, choose_window, pick, rollback
from node.engine.errors import BadInput, CapacityExceeded, EngineError, SessionUnknown
from node.models import ModelSource
from node.engine.throughput import measure_throughput
from node.engine.torch_engine import (SpanFigures, TorchEngine, check_room, step_extras, take_last_logprobs,
                                      validate_step)

__all__ = ["PREFILL_BATCH_TOKENS", "SpanEngine", "measure_throughput"]

if TYPE_CHECKING:
    from transformers import DynamicCache

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
#: On the CPU a step of fewer rows x new positions than this runs on one intra-op thread, a
#: larger one (a prefill, a long window, a big batch) on every thread the process has. Measured
#: on 2 cores, 10 SmolLM2 layers, 150 positions cached: 1-4 positions take as long on one thread
#: as on two (29.7 against 30.6 ms for one), 8 or more are faster on two (17: 48.9 against 68.4
#: ms); and a node that waited for its input (over a WAN, about 150 ms between its steps) pays
#: to wake a second core at every operation: one position then took 40.6 ms on two threads and
#: 32.2 ms on one.
SMALL_STEP_TOKENS = 8
_LAYER_KEY = re.compile(r"^(?P<prefix>(?:.*\.)?layers\.)(?P<idx>\d+)\.(?P<rest>.+)$")


@dataclass
class _Session:
    batch_size: int
    max_length: int
    temperature: float
    top_p: float
    seed: int
    cache: DynamicCache
    mask: torch.Tensor  # (B, L) int64: 1 for a real token, 0 for padding, one column per cache slot
    generator: torch.Generator | None
    layers: tuple[int, int]  # global [a, b) this session runs, inside the span
    is_first: bool  # a == 0: takes token ids and embeds them
    is_last: bool  # b == num_layers: applies the final norm, the head and sampling
    view: nn.ModuleList | None  # the span's layers with those outside [a, b) skipped; None: all
    constraint: Constraint | None = None  # a grammar on the tokens it chooses (SPEC 9.8)
    logprobs: int | None = None  # report log-probabilities with this many top tokens (SPEC 9.9)
    bias: tuple[torch.Tensor, torch.Tensor] | None = None  # logit_bias: (token ids, values) added first
    last_logprobs: tuple[torch.Tensor, torch.Tensor] | None = None  # of its last step, until taken
    penalties: Penalties | None = None  # presence / frequency penalties (SPEC 9.10)

    @property
    def length(self) -> int:
        return int(self.mask.shape[1])


class SpanEngine(SpanFigures, TorchEngine[_Session]):
    """Layers [start, end) of one model; construct with ``SpanEngine.load``."""

    #: Every forward runs in the scheduler's one engine thread, decodes too: forwards split
    #: between two threads ran on one core (node/serve/scheduler.py, EngineThread).
    inline_decode = False
    windows = True  # window steps (keep, draft): speculative decoding, SPEC.md 9.7

    def __init__(self, source: ModelSource, start: int, end: int, model: nn.Module,
                 config: Any, device: torch.device, dtype: torch.dtype,
                 max_cache_tokens: int | None) -> None:
        self.source = source
        self._start, self._end = start, end
        self._model = model
        self._base = model.base_model
        # The real decoder layers and final norm; a sub-range session swaps them for the
        # length of its forward, so read them from here, never from self._base, outside one.
        self._layers: nn.ModuleList = self._base.layers
        self._norm: nn.Module | None = getattr(self._base, "norm", None)
        self._config = config
        self._grammar_tokenizer = GrammarTokenizer(source.path, int(config.vocab_size),
                                                   source.config.get("eos_token_id"))
        self._device = device
        self._dtype = dtype
        self._cpu_threads = torch.get_num_threads()  # the process's own setting, for large steps
        # The table's lock is held around every forward and every session-table change.
        super().__init__(max_cache_tokens)

    # --- construction -----------------------------------------------------------------------

    @classmethod
    def load(cls, source: ModelSource, start: int, end: int, device: str = "cpu",
             dtype: str = "float32", max_cache_tokens: int | None = None) -> SpanEngine:
        """Load layers [start, end) of ``source``; never materialises the rest of the model.

        ``max_cache_tokens`` bounds the sum of ``batch_size * max_length`` over open sessions
        (``None``: unbounded); ``open_session`` raises ``CapacityExceeded`` beyond it.
        """
        if not (0 <= start < end <= source.num_layers):
            raise BadInput(f"span {start}:{end} is not inside 0:{source.num_layers} "
                           f"of {source.name}")
        if dtype not in _DTYPES:
            raise BadInput(f"dtype {dtype!r} not supported; use one of {sorted(_DTYPES)}")
        torch_dtype, dev = _DTYPES[dtype], torch.device(device)
        config = _span_config(source, start, end)
        model = _build_on_meta(config, torch_dtype)
        is_first, is_last = start == 0, end == source.num_layers

        emb_name = _param_name(model, model.get_input_embeddings())
        head = model.get_output_embeddings()
        head_name = _param_name(model, head) if head is not None else None
        if not is_first:
            _replace(model, emb_name.rsplit(".", 1)[0], nn.Identity())
        if not is_last:
            norm = getattr(model.base_model, "norm", None)
            if not isinstance(norm, nn.Module):
                raise EngineError(f"{source.architecture}: no final norm named 'norm'; "
                                  "this architecture is not supported for partial spans")
            model.base_model.norm = nn.Identity()
            if head_name is not None:
                _replace(model, head_name.rsplit(".", 1)[0], nn.Identity())

        wanted = set(model.state_dict().keys())
        tensors = _read_tensors(source, start, end, wanted, emb_name,
                                head_name if is_last else None, dev, torch_dtype)
        missing = wanted - tensors.keys()
        if missing:
            raise EngineError(f"{source.path}: checkpoint lacks {sorted(missing)[:5]} "
                              f"(and {max(0, len(missing) - 5)} more) for span {start}:{end}")
        model.load_state_dict(tensors, strict=True, assign=True)
        if head_name is not None and tensors.get(head_name, 0) is tensors.get(emb_name, 1):
            # assign=True made two Parameters over one storage; keep one, as the model ties them.
            model.get_output_embeddings().weight = model.get_input_embeddings().weight
        _rebuild_meta_buffers(model, dev)
        leftovers = [n for n, t in [*model.named_parameters(), *model.named_buffers()]
                     if t.device.type == "meta"]
        if leftovers:
            raise EngineError(f"{source.architecture}: could not materialise {leftovers[:5]}")
        model.eval()
        return cls(source, start, end, model, config, dev, torch_dtype, max_cache_tokens)

    # --- properties -------------------------------------------------------------------------

    @property
    def device(self) -> str:
        return str(self._device)

    @property
    def dtype(self) -> str:
        return str(self._dtype).removeprefix("torch.")

    @property
    def vocab_size(self) -> int:
        return int(self._config.vocab_size)

    @property
    def module(self) -> nn.Module:
        """The underlying (partial) transformers model; for tests and introspection."""
        return self._model

    # --- sessions ---------------------------------------------------------------------------

    def open_session(self, session_id: str, batch_size: int, max_length: int,
                     sampling: dict[str, Any] | Sampling | None = None,
                     layers: tuple[int, int] | None = None) -> None:
        """Reserve a cache for ``batch_size`` rows of up to ``max_length`` tokens.

        ``sampling``: ``temperature`` (0 = greedy, the default), ``top_p`` (default 1.0),
        ``seed`` (default 0); used only by a session that ends at the model's last layer.
        ``layers``: the global layers ``[a, b)`` this session runs, inside ``[start, end)``;
        None (the default) runs the whole span. The session embeds tokens only if ``a == 0``
        and applies the final norm, the head and sampling only if ``b == num_layers``.
        The cache budget counts ``batch_size * max_length`` whatever the sub-range.
        """
        check_session_size(batch_size, max_length)
        params = parse_sampling(sampling)
        temperature, top_p, seed = params.temperature, params.top_p, params.seed
        a, b = self._check_layers(layers)
        is_first, is_last = a == 0, b == self.source.num_layers
        from transformers import DynamicCache

        cache = DynamicCache(config=self._config)
        view = None
        if (a, b) != (self._start, self._end):
            lo, hi = a - self._start, b - self._start  # span-local indices
            _alias_unused_slots(cache, lo, hi)
            skip = _Skip()
            view = nn.ModuleList([layer if lo <= i < hi else skip
                                  for i, layer in enumerate(self._layers)])
        chooser = Chooser.of(params, batch_size, self.vocab_size, self._device,
                             self._grammar_tokenizer) if is_last else Chooser()
        self._add(session_id, _Session(
            batch_size=batch_size, max_length=max_length, temperature=temperature,
            top_p=top_p, seed=seed, cache=cache,
            mask=torch.zeros((batch_size, 0), dtype=torch.int64, device=self._device),
            generator=chooser.generator, layers=(a, b), is_first=is_first, is_last=is_last,
            view=view, constraint=chooser.constraint, logprobs=chooser.logprobs, bias=chooser.bias,
            penalties=chooser.penalties,
        ))

    def _check_layers(self, layers: Any) -> tuple[int, int]:
        a, b = self._sub_range(layers)
        if b != self.source.num_layers and self.is_last and self._norm is None:
            raise BadInput(f"{self.source.architecture}: no final norm named 'norm' to skip; "
                           f"this span serves only sessions that end at layer {self._end}")
        return a, b

    def session_layers(self, session_id: str) -> tuple[int, int]:
        """The global layers ``[a, b)`` an open session runs (for receipts: tokens x layers)."""
        return self._get(session_id).layers

    def take_logprobs(self, session_id: str) -> tuple[Tensor, Tensor] | None:
        """The log-probabilities of the session's last step (SPEC 9.9), once: float32 (..., 1 + k),
        the chosen token's then the top k's, and their ids int64 (..., k); None when the session
        does not report them."""
        return take_last_logprobs(self._get(session_id))

    def close_session(self, session_id: str) -> None:
        """Free the session's cache. Raises ``SessionUnknown`` if it is not open."""
        self._pop(session_id)

    def close(self) -> None:
        """Drop every session (the weights go with the engine object)."""
        with self._lock:
            self._sessions.clear()

    # --- the step ---------------------------------------------------------------------------

    def step(self, session_id: str, inputs: torch.Tensor, positions: torch.Tensor,
             mask: torch.Tensor | None = None, *, keep: int | None = None,
             draft: torch.Tensor | None = None) -> torch.Tensor:
        """Run T new tokens of every row through the span.

        inputs: int64 token ids (B, T) on the first span, else hidden states (B, T, H).
        positions: int64 (B, T), each row's position of each new token (padding excluded).
        mask: int64 (B, T) of 0/1 for the new tokens (0 = left padding); None means all ones.
        Returns hidden states (B, T, H) in the engine's dtype, or on the last span the next
        token of each row, int64 (B,).

        A window step (speculative decoding): ``keep`` first cuts the cache to its first
        ``keep`` positions (drafts the client did not accept; the cut stands even if the step
        then fails); ``draft``, int64 (B, T - 1), the draft tokens in the last T - 1 positions.
        With a draft the last span answers a token per position, int64 (B, T) (``choose_window``).
        """
        session = self._get(session_id)
        inputs, positions, mask, draft = self._prepare(session, inputs, positions, mask, keep, draft)
        full_mask = torch.cat([session.mask, mask], dim=1)  # (B, L + T)
        with self._lock:
            if self._sessions.get(session_id) is not session:
                raise SessionUnknown(f"session {session_id!r} was closed during the step")
            try:
                with torch.inference_mode():
                    out = self._forward(session, inputs, positions, full_mask, draft=draft)
            except Exception as e:
                # The cache may hold some layers' keys for these tokens and not others.
                self._sessions.pop(session_id, None)
                raise EngineError(f"forward failed, session {session_id!r} closed: {e}") from e
            session.mask = full_mask
        return out

    def _prepare(self, session: _Session, inputs: Any, positions: Any, mask: Any, keep: int | None,
                 draft: Any) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """A step's cut applied, then its tensors checked against the session (``_validate``,
        ``_check_draft``); BadInput when they do not fit."""
        if keep is not None:
            self._rollback(session, keep)
        inputs, positions, mask = self._validate(session, inputs, positions, mask)
        if draft is not None:
            draft = self._check_draft(session, draft, inputs)
        # Before the forward, which other sessions may share: BadInput on a gap.
        check_next(session, positions[:, 0 if draft is not None else -1])
        return inputs, positions, mask, draft

    def _rollback(self, session: _Session, keep: int) -> None:
        """Cut the session's cache (every layer slot) and mask to the first ``keep`` positions."""
        if not isinstance(keep, int) or isinstance(keep, bool) or not 0 <= keep <= session.length:
            raise BadInput(f"keep must be an int in [0, {session.length}] (the tokens the session "
                           f"holds), got {keep!r}")
        if keep == session.length:
            return
        with self._lock:
            try:
                drop = session.length - keep
                for slot in {id(x): x for x in session.cache.layers}.values():  # aliases once
                    if getattr(slot, "keys", None) is not None and slot.keys.numel():
                        slot.crop(-drop)  # a negative count: drop that many from the end
            except Exception as e:  # noqa: BLE001 - e.g. a sliding window that wrapped
                raise BadInput(f"this session's cache cannot be cut to {keep} positions: {e}") from e
            session.mask = session.mask[:, :keep]
        rollback(session, keep)

    def _check_draft(self, session: _Session, draft: Any, inputs: torch.Tensor) -> torch.Tensor:
        batch, length = int(inputs.shape[0]), int(inputs.shape[1])
        if (not isinstance(draft, torch.Tensor) or draft.dtype != torch.int64
                or tuple(draft.shape) != (batch, length - 1) or length < 2):
            raise BadInput(f"draft must be int64 ({batch}, {length - 1}): the drafts in the step's "
                           f"last positions")
        if draft.numel() and (int(draft.min()) < 0 or int(draft.max()) >= self.vocab_size):
            raise BadInput(f"draft token ids must lie in [0, {self.vocab_size})")
        return draft.to(self._device)

    def _forward(self, session: _Session, inputs: torch.Tensor, positions: torch.Tensor,
                 full_mask: torch.Tensor, sample: bool = True,
                 draft: torch.Tensor | None = None) -> torch.Tensor:
        if self._device.type == "cpu":  # the calling thread's intra-op threads (SMALL_STEP_TOKENS)
            want = 1 if inputs.shape[0] * inputs.shape[1] < SMALL_STEP_TOKENS else self._cpu_threads
            if torch.get_num_threads() != want:
                torch.set_num_threads(want)
        kwargs: dict[str, Any] = dict(
            attention_mask=full_mask, position_ids=positions,
            past_key_values=session.cache,  # 5.19's keyword; `cache=` would be swallowed
            use_cache=True,
        )
        if session.is_first:
            kwargs["input_ids"] = inputs
        else:
            kwargs["inputs_embeds"] = inputs
        if session.view is None:
            out = self._base(**kwargs)
        else:
            # Caller holds self._lock: no other forward sees the swapped modules.
            base = self._base
            base.layers = session.view
            if not session.is_last and self._norm is not None:
                base.norm = nn.Identity()
            try:
                out = base(**kwargs)
            finally:
                base.layers = self._layers
                if self._norm is not None:
                    base.norm = self._norm
        hidden = out.last_hidden_state  # (B, T, H)
        if not session.is_last or not sample:
            return hidden
        head = self._model.get_output_embeddings()
        if draft is not None:
            return choose_window(head(hidden).float(), draft, session, positions)
        logits = head(hidden[:, -1, :]).float()  # (B, V)
        return pick(logits, session, positions[:, -1])

    # --- batched decode -----------------------------------------------------------------------

    def step_batch(self, items: list[tuple[str, torch.Tensor, torch.Tensor, torch.Tensor | None]]
                   ) -> list[torch.Tensor | Exception]:
        """Run the steps of several sessions; decode steps share one forward where they can.

        ``items``: ``(session_id, inputs, positions, mask)`` as for ``step``. Returns one entry
        per item, in order: what ``step`` would have returned, or the exception it would have
        raised (one session's bad input fails that session only).

        Steps of one token (T == 1) of sessions with a non-empty cache and the same layers
        ``[a, b)`` run as one forward: each session's cached keys and values are left-padded
        to the longest, the 2-D mask hides the padding, and the new key/value column is split
        back into each session's own cache. The first steps (prefills) of fresh sessions with the
        same layers also share one forward (``_prefill_group``: left-padded, at most
        PREFILL_BATCH_TOKENS rows x tokens each). Every other step (a later chunk of a long
        prompt, a lone session) runs alone through ``step``. Each session samples its own rows
        with its own settings and generator, so a batched session gets exactly the tokens it
        would get alone (up to float rounding of batched matrix products; greedy tests compare
        them).
        """
        results: list[torch.Tensor | Exception | None] = [None] * len(items)
        groups: dict[tuple[int, int], list[tuple[int, _Session, tuple]]] = {}
        alone: list[int] = []
        for i, item in enumerate(items):
            sid, inputs, positions, mask = item[:4]
            keep, draft = step_extras(item)
            with self._lock:
                session = self._sessions.get(sid)
            if session is None:
                alone.append(i)  # step() raises SessionUnknown for it
                continue
            try:
                x, pos, m, draft = self._prepare(session, inputs, positions, mask, keep, draft)
                prepared = (x, pos, m)
            except Exception as e:  # noqa: BLE001 - reported to that session only
                results[i] = e
                continue
            t = int(prepared[1].shape[1])
            if (draft is None and session.length == 0 and t <= PREFILL_BATCH_TOKENS
                    and self._window_ok(session, t)):
                groups.setdefault(("prefill", *session.layers), []).append((i, session, prepared))
            elif (t == 1 or draft is not None) and t <= MAX_GROUP_WINDOW and session.length > 0 \
                    and self._window_ok(session, t):
                groups.setdefault(("decode", *session.layers), []).append((i, session, (*prepared, draft)))
            else:
                alone.append(i)  # its cut is done: step() finds keep == length
        for key, members in _split_prefills(groups):
            if len(members) == 1:
                alone.append(members[0][0])
                continue
            try:
                group = self._step_group if key[0] == "decode" else self._prefill_group
                outs = group([(s, p) for _, s, p in members])
            except Exception as e:  # noqa: BLE001 - every member shares the failure
                for i, _, _ in members:
                    results[i] = e
                continue
            for (i, _, _), out in zip(members, outs):
                results[i] = out
        for i in sorted(alone):
            try:
                results[i] = self._step_item(items[i])
            except Exception as e:  # noqa: BLE001 - reported to that session only
                results[i] = e
        return results  # type: ignore[return-value]

    def _window_ok(self, session: _Session, new: int = 1) -> bool:
        """Left-padding a sliding-window cache is exact only while it has not wrapped."""
        window = getattr(self._config, "sliding_window", None)
        return not window or session.length + new < int(window)

    def _prefill_group(self, members: list[tuple[_Session, tuple[torch.Tensor, ...]]]
                       ) -> list[torch.Tensor]:
        """One forward for the first steps (empty caches) of sessions on the same layers.

        Each session's tokens are left-padded to the longest (mask 0, position 0), so every
        real token sees exactly its own session's tokens; afterwards each session keeps only
        its own columns of keys and values, and its own mask.
        """
        from transformers import DynamicCache

        width = max(int(p[1].shape[1]) for _, p in members)
        for s, p in members:
            if int(p[1].shape[1]) > s.max_length:
                raise CapacityExceeded(f"{int(p[1].shape[1])} tokens exceed the session's "
                                       f"max_length {s.max_length}")

        def pad(x: torch.Tensor) -> torch.Tensor:  # (B, T[, H]) -> (B, width[, H]), on the left
            extra = width - int(x.shape[1])
            return nn.functional.pad(x, (0, 0, extra, 0) if x.dim() == 3 else (extra, 0))

        inputs = torch.cat([pad(p[0]) for _, p in members], dim=0)
        positions = torch.cat([pad(p[1]) for _, p in members], dim=0)
        full_mask = torch.cat([pad(p[2]) for _, p in members], dim=0)  # (R, width)
        return self._forward_group(members, inputs, positions, full_mask,
                                   DynamicCache(config=self._config))

    def _step_group(self, members: list[tuple[_Session, tuple[Any, ...]]]
                    ) -> list[torch.Tensor]:
        """One forward for decode steps of sessions running the same layers: one token each, or
        a window (a token and its drafts, SPEC 9.7) of any length up to MAX_GROUP_WINDOW.

        Each session's new tokens are left-padded to the longest window (mask 0, position 0)
        after its past, itself left-padded to the longest past; each session then takes back
        its own last T columns."""
        from transformers import DynamicCache

        sessions = [s for s, _ in members]
        width = max(int(p[1].shape[1]) for _, p in members)
        for s, p in members:
            check_room(s.length, int(p[1].shape[1]), s.max_length)
        longest = max(s.length for s in sessions)

        def pad(x: torch.Tensor) -> torch.Tensor:  # (B, T[, H]) -> (B, width[, H]), on the left
            extra = width - int(x.shape[1])
            return nn.functional.pad(x, (0, 0, extra, 0) if x.dim() == 3 else (extra, 0)) if extra else x

        inputs = torch.cat([pad(p[0]) for _, p in members], dim=0)  # (R, W) or (R, W, H)
        positions = torch.cat([pad(p[1]) for _, p in members], dim=0)  # (R, W)
        # Each session's past, left-padded to the longest, then its new columns: (R, longest + W)
        full_mask = torch.cat([
            torch.cat([nn.functional.pad(s.mask, (longest - s.length, 0)), pad(p[2])], dim=1)
            for s, p in members], dim=0)
        a, b = sessions[0].layers
        cache = DynamicCache(config=self._config)
        for j in range(a - self._start, b - self._start):
            slots = [s.cache.layers[j] for s in sessions]
            # (R, kv_heads, longest, head_dim), zeros where a session is shorter
            keys = torch.cat([nn.functional.pad(x.keys, (0, 0, longest - x.keys.shape[-2], 0))
                              for x in slots], dim=0)
            values = torch.cat([nn.functional.pad(x.values, (0, 0, longest - x.values.shape[-2], 0))
                                for x in slots], dim=0)
            layer = cache.layers[j]
            layer.lazy_initialization(keys, values)
            layer.keys, layer.values = keys, values
            if hasattr(layer, "cumulative_length"):
                layer.cumulative_length = longest
        return self._forward_group(members, inputs, positions, full_mask, cache)

    def _forward_group(self, members: list[tuple[_Session, tuple[torch.Tensor, ...]]],
                       inputs: torch.Tensor, positions: torch.Tensor, full_mask: torch.Tensor,
                       cache: Any) -> list[torch.Tensor]:
        """One forward of the sessions' rows stacked (``full_mask`` hides each one's padding;
        ``cache`` holds their pasts, left-padded), then each session takes back its own rows:
        the new columns of keys and values, its mask, and its hidden states or sampled tokens."""
        sessions = [s for s, _ in members]
        a, b = sessions[0].layers
        lo, hi = a - self._start, b - self._start  # span-local slots this group fills
        if sessions[0].view is not None:
            _alias_unused_slots(cache, lo, hi)
        batch = _Session(
            batch_size=int(inputs.shape[0]), max_length=int(full_mask.shape[1]), temperature=0.0,
            top_p=1.0, seed=0, cache=cache, mask=full_mask, generator=None, layers=(a, b),
            is_first=sessions[0].is_first, is_last=sessions[0].is_last, view=sessions[0].view)
        with self._lock:
            for s in sessions:
                if all(s is not live for live in self._sessions.values()):
                    raise SessionUnknown("a session was closed during the step")
            try:
                with torch.inference_mode():
                    hidden = self._forward(batch, inputs, positions, full_mask, sample=False)  # (R, T, H)
                    head = self._model.get_output_embeddings()
                    if batch.is_last:  # one product for every row: the head's weights are read once
                        logits = head(hidden[:, -1, :]).float()  # (R, V)
                    outs: list[torch.Tensor] = []
                    row = 0
                    for s, p in members:
                        m, draft = p[2], (p[3] if len(p) > 3 else None)
                        rows = slice(row, row + s.batch_size)
                        row += s.batch_size
                        t = int(m.shape[1])  # this session's new tokens: the last t columns
                        for j in range(lo, hi):
                            new = cache.layers[j]
                            s.cache.layers[j].update(new.keys[rows, :, -t:, :], new.values[rows, :, -t:, :])
                        s.mask = torch.cat([s.mask, m], dim=1)
                        if s.is_last and draft is not None:
                            outs.append(choose_window(head(hidden[rows, -t:, :]).float(), draft,
                                                       s, p[1]))
                        elif s.is_last:
                            outs.append(pick(logits[rows], s, p[1][:, -1]))
                        else:
                            outs.append(hidden[rows, -t:, :])
            except Exception as e:
                for s in sessions:  # caches may be half-updated
                    for sid, live in list(self._sessions.items()):
                        if live is s:
                            self._sessions.pop(sid)
                raise EngineError(f"batched forward failed, {len(sessions)} sessions closed: "
                                  f"{e}") from e
        return outs

    def _validate(self, session: _Session, inputs: Any, positions: Any,
                  mask: Any) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        a, b = session.layers
        inputs, positions, mask = validate_step(
            inputs, positions, mask, batch_size=session.batch_size, max_length=session.max_length,
            length=session.length, takes_tokens=session.is_first, vocab=self.vocab_size,
            hidden_size=self.hidden_size, what="the first span" if session.is_first else f"layers {a}:{b}")
        if not session.is_first:
            inputs = inputs.to(self._dtype)
        dev = self._device
        return inputs.to(dev), positions.to(dev), mask.to(dev)


#: Most rows x tokens (after padding) one batched prefill forward holds; more make several.
PREFILL_BATCH_TOKENS = 2048
#: The longest window step (a token and its drafts, SPEC 9.7) that shares a decode forward.
MAX_GROUP_WINDOW = 64


def _split_prefills(groups: dict[tuple[Any, ...], list[Any]]) -> list[tuple[tuple[Any, ...], list[Any]]]:
    """Decode groups as they are; prefill groups cut (shortest first) so that each padded
    forward holds at most PREFILL_BATCH_TOKENS rows x tokens."""
    out: list[tuple[tuple[Any, ...], list[Any]]] = []
    for key, members in groups.items():
        if key[0] != "prefill":
            out.append((key, members))
            continue
        part: list[Any] = []
        rows = width = 0
        for m in sorted(members, key=lambda m: int(m[2][1].shape[1])):
            r, t = m[1].batch_size, int(m[2][1].shape[1])
            if part and (rows + r) * max(width, t) > PREFILL_BATCH_TOKENS:
                out.append((key, part))
                part, rows, width = [], 0, 0
            part.append(m)
            rows, width = rows + r, max(width, t)
        if part:
            out.append((key, part))
    return out


class _Skip(nn.Module):
    """Stands in for a decoder layer a sub-range session does not run: hidden states pass."""

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        return hidden_states


def _alias_unused_slots(cache: DynamicCache, lo: int, hi: int) -> None:
    """Point the cache slots outside ``[lo, hi)`` at a used slot of the same kind.

    The mask functions read the cached length from slot 0 (or the first full-attention slot);
    a session running local layers ``lo..hi-1`` fills only those slots, so without this the
    mask would ignore every cached token. The aliased slots are never written: their decoder
    layers are skipped.
    """
    slots = cache.layers
    if len(slots) <= hi - 1:
        raise EngineError(f"cache has {len(slots)} layer slots; expected one per span layer")
    used = slots[lo:hi]
    for j in range(len(slots)):
        if lo <= j < hi:
            continue
        kind = getattr(slots[j], "is_sliding", False)
        same = [s for s in used if getattr(s, "is_sliding", False) == kind]
        slots[j] = (same or used)[0]


# --- loading helpers ------------------------------------------------------------------------

def _span_config(source: ModelSource, start: int, end: int) -> Any:
    from transformers import AutoConfig

    cfg = {k: v for k, v in source.config.items() if k != "transformers_version"}
    model_type = cfg.pop("model_type", None)
    if not model_type:
        raise EngineError(f"{source.path}/config.json has no model_type")
    cfg["num_hidden_layers"] = end - start
    # Per-layer lists are indexed by global layer number: keep the span's slice only.
    if isinstance(cfg.get("layer_types"), list) and len(cfg["layer_types"]) == source.num_layers:
        cfg["layer_types"] = cfg["layer_types"][start:end]
    config = AutoConfig.for_model(model_type, **cfg)
    config._attn_implementation = "sdpa"
    return config


def _build_on_meta(config: Any, dtype: torch.dtype) -> nn.Module:
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config, dtype=dtype)


def _param_name(model: nn.Module, module: nn.Module) -> str:
    for name, mod in model.named_modules():
        if mod is module:
            return f"{name}.weight"
    raise EngineError("embedding module not found in the model")


def _replace(model: nn.Module, dotted: str, new: nn.Module) -> None:
    owner_name, _, attr = dotted.rpartition(".")
    owner = model.get_submodule(owner_name) if owner_name else model
    setattr(owner, attr, new)


def _read_tensors(source: ModelSource, start: int, end: int, wanted: set[str], emb_name: str,
                  head_name: str | None, device: torch.device,
                  dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Read only the tensors of ``wanted`` (local names) from the checkpoint, one at a time."""
    from safetensors import safe_open

    from node.models.weights import weight_files as _weight_files

    out: dict[str, torch.Tensor] = {}
    emb_tensor: torch.Tensor | None = None
    for file in _weight_files(source.path):
        with safe_open(str(file), framework="pt", device=str(device)) as f:
            for key in f.keys():
                local = _local_name(key, start, end)
                need_emb_for_head = (head_name is not None and key == emb_name
                                     and head_name in wanted)
                if local is None or (local not in wanted and not need_emb_for_head):
                    continue
                t = f.get_tensor(key).to(dtype)
                if local in wanted:
                    out[local] = t
                if key == emb_name:
                    emb_tensor = t
    if head_name is not None and head_name in wanted and head_name not in out:
        if emb_tensor is None:
            raise EngineError(f"{source.path}: no {head_name} and no {emb_name} to tie it to")
        out[head_name] = emb_tensor  # tied embeddings: the head is the embedding matrix
    return out


def _local_name(key: str, start: int, end: int) -> str | None:
    """Checkpoint name -> span-local name (layers renumbered from 0), None if outside."""
    m = _LAYER_KEY.match(key)
    if m is None:
        return key
    idx = int(m["idx"])
    if not start <= idx < end:
        return None
    return f"{m['prefix']}{idx - start}.{m['rest']}"


def _rebuild_meta_buffers(model: nn.Module, device: torch.device) -> None:
    """Re-create modules whose non-persistent buffers (rotary inv_freq) are still on meta."""
    for name, module in list(model.named_modules()):
        if not any(b.device.type == "meta" for b in module.buffers(recurse=False)):
            continue
        config = getattr(module, "config", None)
        if config is None:
            raise EngineError(f"cannot rebuild buffers of {name} ({type(module).__name__})")
        with torch.device(device):
            fresh = type(module)(config=config)
        _replace(model, name, fresh)
