"""The OpenAI-compatible HTTP API: any agent framework can use the swarm through it.

A plain ASGI app (no framework) served by ``node.http.serve_asgi`` on trio:

    GET  /health, /metrics      liveness and Prometheus metrics, without a key (node/http/gateway_metrics.py)
    GET  /v1/models             the models this gateway can tokenize that the swarm fully covers now
    GET  /v1/models/{id}
    POST /v1/chat/completions   messages -> chat template -> the swarm; streamed as SSE or not
    POST /v1/completions        prompt (string or token ids) as is, no template
    POST /v1/responses          OpenAI's Responses API (node/http/responses.py)

The gateway is an agent of the swarm with its own identity: one ``SwarmClient`` countersigns the
receipts of every generation and keeps them in its ledger. A complete response carries their ids
in the ``x-shiza-receipts`` header (comma-separated). A streamed response has sent its headers
before any receipt exists, so its ids come last, as the SSE comment ``: x-shiza-receipts ID,ID``
just before ``data: [DONE]`` (SSE parsers, the openai package's among them, skip comments).

Cancellation: a client that disconnects stops its generation after the step in flight (a hard
cancel follows if that step stalls); the client's close path (shielded) closes every hop's session
and settles the final receipts, which record the tokens actually computed. Errors use OpenAI's shape ``{"error": {"message", "type", "param", "code"}}``:
401 bad key, 404 unknown model, 400 bad request, 503 (with Retry-After) no coverage or load,
502 a peer failed.

Load is not failure. Requests beyond ``MAX_CONCURRENT`` generations wait in a bounded queue
(``MAX_QUEUED`` requests, ``QUEUE_WAIT_S`` from arrival); each generation first holds one of the
client's slots at every peer of its route (node/client/pacing.py), so the gateway never opens
more sessions at a node than the node allows one peer. A request still waiting past
``QUEUE_WAIT_S``, and a Busy or RateLimited a peer still answers after the client's retries, is
a 503 with Retry-After (the peer's hint when it gave one), never a 502.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import math
import secrets
import time
from contextlib import AsyncExitStack
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Sequence

import trio

from protocol.errors import InvalidMessage, ShizaError
from protocol.ids import MAX_GRAMMAR_BYTES, MAX_LOGIT_BIAS, MAX_SESSION_LENGTH
from protocol.messages import SamplingParams

from node.client.swarm import SwarmClient, TokenLogprob
from node.http.agents import (
    BadField, Tools, answer_calls, answer_kind, output_grammar, parse_tools, render_conversation, tool_call_id,
    tool_calls_json,
)
from node.http.api import (ApiError, Choice, Outcome, Receive, Send, _from_swarm, _unavailable, _with_disconnect,
                           read_json)
from node.http.asgi import http_only, send_bytes, send_json, serve_asgi
from node.http.gateway_metrics import GatewayMetrics, health
from node.client.grammars import ToolCallReader
from node.client.routing import Hop, NoRoute
from node.client.textgen import TextModel, Detokenizer, with_fresh_seed

if TYPE_CHECKING:
    from node.http.metrics import NodeMetrics
    from node.serve.daemon import Node

log = logging.getLogger(__name__)

ROUTE_TIMEOUT_S = 15.0  # bound on the DHT lookup behind one request
MAX_CONCURRENT = 64  # generations at once (each also paced per peer: node/client/pacing.py)
MAX_QUEUED = 256  # requests waiting for a generation slot; more get 503 at once
QUEUE_WAIT_S = 60.0  # from a request's arrival to its generation starting; then 503
ROUTE_REUSE_S = 2.0  # a route found by one request serves those arriving this soon after
DEFAULT_MAX_TOKENS = {"chat": 256, "completion": 16}  # OpenAI's default for completions is 16
MAX_STOP = 4  # stop sequences per request, as OpenAI
MAX_N = 8  # choices per request (n): rows of one batch, so every hop must take n rows
MAX_STOP_CHARS = 256  # characters per stop sequence: bounds the text held back and the scan


@dataclass
class Job:
    kind: str  # "chat" or "completion"
    model: TextModel
    prompt_ids: list[int]
    max_tokens: int
    sampling: SamplingParams
    stop: list[str]
    stream: bool
    include_usage: bool
    grammar: str | None = None  # constrained decoding (SPEC 9.8): response_format or tools
    tools: Tools | None = None
    n: int = 1  # choices: batch rows sharing the prompt
    logprobs: int | None = None  # report log-probabilities with this many top tokens (SPEC 9.9)
    echo: bool = False  # completions: the prompt's text before each choice's
    abandoned: bool = False  # the client went away: stop after the step in flight


def _field(body: dict[str, Any], name: str, types: tuple[type, ...], default: Any = None) -> Any:
    value = body.get(name, default)
    if value is None:
        return default
    if isinstance(value, bool) and bool not in types or not isinstance(value, types):
        raise ApiError(400, f"'{name}' has the wrong type", param=name, code="invalid_type")
    return value


def _text_content(content: Any, where: str) -> str:
    if content is None or isinstance(content, str):
        return content or ""
    if isinstance(content, list):
        parts = []
        for part in content:
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise ApiError(400, f"{where}: only text content parts are supported", param="messages")
            parts.append(part["text"])
        return "".join(parts)
    raise ApiError(400, f"{where}: content must be a string or a list of text parts", param="messages")


def _chat_ids(model: TextModel, messages: Any, tools: Tools | None = None) -> list[int]:
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "'messages' must be a non-empty list", param="messages")
    contents = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise ApiError(400, f"messages[{i}] needs a 'role'", param="messages")
        if m["role"] not in ("system", "developer", "user", "assistant", "tool"):
            raise ApiError(400, f"messages[{i}]: unknown role {m['role']!r}", param="messages")
        contents.append(_text_content(m.get("content"), f"messages[{i}]"))
    tok = model.tokenizer
    template = getattr(tok, "chat_template", None)
    try:
        conv, template_tools = render_conversation(messages, contents, tools,
                                                   bool(template) and "tools" in template)
    except BadField as exc:
        raise ApiError(400, str(exc), param=exc.param) from None
    if not template:  # no template: a plain transcript
        text = "".join(f"{m['role']}: {m['content']}\n" for m in conv) + "assistant:"
        return list(tok.encode(text))
    try:
        # As TextModel.encode does for one user message, so the answer equals `shiza generate`.
        text = tok.apply_chat_template(conv, add_generation_prompt=True, tokenize=False,
                                       **({"tools": template_tools} if template_tools else {}))
    except Exception as exc:  # noqa: BLE001 - a template that rejects this conversation
        raise ApiError(400, f"the chat template rejects these messages: {exc}", param="messages") from None
    return list(tok.encode(text, add_special_tokens=False))


def _completion_ids(model: TextModel, prompt: Any) -> list[int]:
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]  # a batch of one
    if isinstance(prompt, str):
        return list(model.tokenizer.encode(prompt))
    if isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        vocab = len(model.tokenizer)
        if any(not 0 <= t < vocab for t in prompt):
            raise ApiError(400, "a prompt token id is outside the vocabulary", param="prompt")
        return list(prompt)
    raise ApiError(400, "'prompt' must be a string, a list of one string, or a list of token ids", param="prompt")


def _stops(body: dict[str, Any]) -> list[str]:
    stop = body.get("stop")
    if stop is None:
        return []
    stops = [stop] if isinstance(stop, str) else stop
    if (not isinstance(stops, list) or len(stops) > MAX_STOP
            or not all(isinstance(s, str) and s for s in stops)):
        raise ApiError(400, f"'stop' must be a non-empty string or a list of up to {MAX_STOP} of them",
                       param="stop", code="invalid_value")
    if any(len(s) > MAX_STOP_CHARS for s in stops):
        raise ApiError(400, f"a stop sequence may have at most {MAX_STOP_CHARS} characters",
                       param="stop", code="invalid_value")
    return stops


# Every field a request may carry. Those the gateway cannot honour yet are refused by name when
# set to anything but their no-op value, never ignored: a 200 with another meaning misleads.
_COMMON_FIELDS = frozenset({"model", "max_tokens", "temperature", "top_p", "seed", "stop", "stream",
                            "stream_options", "n", "user", "logprobs", "top_logprobs", "presence_penalty",
                            "frequency_penalty", "logit_bias", "metadata", "store"})
_FIELDS = {
    "chat": _COMMON_FIELDS | {"messages", "max_completion_tokens", "response_format", "tools", "tool_choice",
                              "parallel_tool_calls", "functions", "function_call"},
    "completion": _COMMON_FIELDS | {"prompt", "echo", "suffix", "best_of"},
}
_NO_OP = {"best_of": (1,), "suffix": ("",), "store": (False,)}


def _check_fields(body: dict[str, Any], kind: str) -> None:
    """400 naming the first field this gateway does not know, or cannot honour as set."""
    for name, value in body.items():
        if name not in _FIELDS[kind]:
            raise ApiError(400, f"unknown or unsupported field '{name}'", param=name, code="unsupported_field")
        if value is not None and name in _NO_OP and not any(
                value == ok and type(value) is type(ok) or (type(ok) is float and type(value) is int and value == ok)
                for ok in _NO_OP[name]):
            raise ApiError(400, f"'{name}' = {json.dumps(value)[:64]} is not supported by this gateway",
                           param=name, code="unsupported_value")
    if body.get("user") is not None and not isinstance(body["user"], str):
        raise ApiError(400, "'user' must be a string", param="user", code="invalid_type")
    if body.get("metadata") is not None and not isinstance(body["metadata"], dict):
        raise ApiError(400, "'metadata' must be an object", param="metadata", code="invalid_type")


def _logit_bias(body: dict[str, Any], vocab: int) -> tuple[tuple[int, float], ...]:
    """``logit_bias``: {token id (as text): bias in [-100, 100]}, at most MAX_LOGIT_BIAS entries."""
    bias = _field(body, "logit_bias", (dict,), {})
    if len(bias) > MAX_LOGIT_BIAS:
        raise ApiError(400, f"'logit_bias' may hold at most {MAX_LOGIT_BIAS} tokens", param="logit_bias",
                       code="invalid_value")
    out = []
    for key, value in bias.items():
        if not (isinstance(key, str) and key.isdigit() and int(key) < vocab):
            raise ApiError(400, f"'logit_bias' key {key!r} is not a token id of this model", param="logit_bias",
                           code="invalid_value")
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not -100 <= value <= 100:
            raise ApiError(400, "'logit_bias' values must be numbers in [-100, 100]", param="logit_bias",
                           code="invalid_value")
        out.append((int(key), float(value)))
    return tuple(out)


def _logprobs_field(body: dict[str, Any], kind: str) -> int | None:
    """How many top tokens to report with each token's log-probability, or None for none: chat
    takes ``logprobs: true`` and ``top_logprobs`` (0-20), completions ``logprobs`` (0-5)."""
    if kind == "chat":
        on = _field(body, "logprobs", (bool,), False)
        top = _field(body, "top_logprobs", (int,), None)
        if top is not None and not on:
            raise ApiError(400, "'top_logprobs' needs 'logprobs': true", param="top_logprobs", code="invalid_value")
        if top is not None and not 0 <= top <= 20:
            raise ApiError(400, "'top_logprobs' must be between 0 and 20", param="top_logprobs", code="invalid_value")
        return (top or 0) if on else None
    if body.get("top_logprobs") is not None:
        raise ApiError(400, "completions take 'logprobs' (an int), not 'top_logprobs'", param="top_logprobs",
                       code="unsupported_field")
    value = _field(body, "logprobs", (int,), None)
    if value is not None and not 0 <= value <= 5:
        raise ApiError(400, "'logprobs' must be between 0 and 5", param="logprobs", code="invalid_value")
    return value


def _logprobs_json(model: TextModel, got: Sequence[TokenLogprob] | None, kind: str,
                   offset: int = 0) -> dict[str, Any] | None:
    """OpenAI's ``logprobs`` of a choice, or of a streamed chunk of it, from the tokens'
    log-probabilities (end tokens left out); ``offset``: where the first one's text starts."""
    if got is None:
        return None
    got = [g for g in got if g.token not in model.eos_token_ids]

    def text(t: int) -> str:
        return model.tokenizer.decode([t])

    if kind == "chat":
        return {"content": [{"token": text(g.token), "logprob": g.logprob, "bytes": list(text(g.token).encode()),
                             "top_logprobs": [{"token": text(t), "logprob": lp, "bytes": list(text(t).encode())}
                                              for t, lp in g.top]} for g in got], "refusal": None}
    offsets, at = [], offset
    for g in got:
        offsets.append(at)
        at += len(text(g.token))
    return {"tokens": [text(g.token) for g in got], "token_logprobs": [g.logprob for g in got],
            "top_logprobs": [{text(t): lp for t, lp in g.top} for g in got], "text_offset": offsets}


def _number(body: dict[str, Any], name: str, default: float, low: float, high: float) -> float:
    value = _field(body, name, (int, float), default)
    if not (math.isfinite(value) and low <= value <= high):
        raise ApiError(400, f"'{name}' must be between {low} and {high}", param=name, code="invalid_value")
    return float(value)


# ---- text streaming with stop sequences ---------------------------------------------------------
class _StopMatcher:
    """Knuth-Morris-Pratt over one stop sequence: ``state`` is the length of the longest prefix
    of the stop that ends the text fed so far. Feeding a character costs amortised O(1)."""

    __slots__ = ("stop", "border", "state")

    def __init__(self, stop: str) -> None:
        self.stop = stop
        # border[k]: the longest proper prefix of stop[:k + 1] that is also its suffix.
        self.border = [0] * len(stop)
        k = 0
        for i in range(1, len(stop)):
            while k and stop[i] != stop[k]:
                k = self.border[k - 1]
            if stop[i] == stop[k]:
                k += 1
            self.border[i] = k
        self.state = 0


class _StopText:
    """Accumulates generated text; cuts it at the first stop sequence and holds back any tail
    that could still become one, so a stream never shows text that a stop would have cut.

    The first stop is the one completed first (the longest when several end at the same
    character), whatever the pieces' boundaries. Stop sequences come from the caller and this
    runs on the event loop, so the scan is linear: each character costs each stop at most two
    comparisons, amortised (``compared`` counts them), and the text held back is shorter than
    the longest stop.
    """

    def __init__(self, stops: Sequence[str]) -> None:
        self._matchers = [_StopMatcher(s) for s in dict.fromkeys(stops)]
        self._kept: list[str] = []  # text returned by push/flush
        self._held = ""  # text after it that could still begin a stop
        self.stopped = False
        self.compared = 0

    @property
    def text(self) -> str:
        """The text so far: cut before the stop once ``stopped``."""
        return "".join(self._kept) + self._held

    def push(self, piece: str) -> str:
        """Add ``piece``; return the text that is now safe to emit."""
        if self.stopped or not piece:
            return ""
        if not self._matchers:
            return self._keep(piece)
        buf = self._held + piece
        for i in range(len(self._held), len(buf)):
            c = buf[i]
            cut = -1
            for m in self._matchers:
                stop, state = m.stop, m.state
                while state and stop[state] != c:
                    self.compared += 1
                    state = m.border[state - 1]
                self.compared += 1
                if stop[state] == c:
                    state += 1
                if state == len(stop):
                    # The match begins within the held text (its prefix was held back), or
                    # before it only after flush(): what was sent then stays sent.
                    start = max(0, i + 1 - state)
                    cut = start if cut < 0 else min(cut, start)
                    state = m.border[state - 1]
                m.state = state
            if cut >= 0:
                self.stopped, self._held = True, ""
                return self._keep(buf[:cut])
        hold = min(max(m.state for m in self._matchers), len(buf))
        self._held = buf[len(buf) - hold:]
        return self._keep(buf[:len(buf) - hold])

    def flush(self) -> str:
        """Everything held back, now that no more text follows."""
        out, self._held = self._held, ""
        return self._keep(out)

    def _keep(self, out: str) -> str:
        if out:
            self._kept.append(out)
        return out


def _row(outcome: Outcome, i: int) -> list[TokenLogprob] | None:
    got = outcome.result.logprobs
    return None if got is None else got[i]


# ---- the app -------------------------------------------------------------------------------------
class Gateway:
    """The ASGI app. ``client`` is the swarm client it generates with; ``models`` those it can
    tokenize; with ``api_keys`` every request needs ``Authorization: Bearer KEY``."""

    def __init__(self, client: SwarmClient, models: Sequence[TextModel], api_keys: Sequence[str] = ()) -> None:
        self.client = client
        self.models = list(models)
        if any(not k.strip() for k in api_keys):  # "Bearer " with nothing after it would pass
            raise ValueError("an API key must not be empty")
        self.api_keys = set(api_keys)
        self.created = int(time.time())
        self._slots = trio.Semaphore(MAX_CONCURRENT)
        self._queued = 0  # requests waiting for a slot
        self._route_locks: dict[str, trio.Lock] = {}
        self._routes: dict[str, tuple[float, list[Hop]]] = {}  # model id -> (when found, route)
        self.answered_busy = 0  # requests answered 503 for load (queue full or waited too long)
        from node.http.responses import ResponseStore  # it builds on this module

        self.stored = ResponseStore()  # conversations for the Responses API's previous_response_id
        self.metrics = GatewayMetrics(self)
        self._app = http_only(self._answer)

    async def __call__(self, scope: dict[str, Any], receive: Receive, send: Send) -> None:
        await self._app(scope, receive, send)

    @property
    def in_flight(self) -> int:
        """Generations holding a slot now."""
        return MAX_CONCURRENT - self._slots.value

    @property
    def queued(self) -> int:
        return self._queued

    async def _answer(self, scope: dict[str, Any], receive: Receive, send: Send) -> None:
        status = 0

        async def counted(message: dict[str, Any]) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            try:
                await self._handle(scope, receive, counted)
            except ApiError as exc:
                await send_json(counted, exc.status, exc.body(), exc.headers())
        finally:
            self.metrics.request(scope["path"].rstrip("/") or "/", status or 499)  # 499: the client left first

    async def _handle(self, scope: dict[str, Any], receive: Receive, send: Send) -> None:
        method, path = scope["method"], scope["path"].rstrip("/")
        if path == "/health" and method == "GET":
            await send_json(send, 200, health(self))
            return
        if path == "/metrics" and method == "GET":
            await send_bytes(send, 200, self.metrics.exposition(), self.metrics.content_type)
            return
        if self.api_keys:
            auth = dict(scope["headers"]).get(b"authorization", b"").decode("latin-1")
            if not auth.startswith("Bearer ") or auth[7:].strip() not in self.api_keys:
                raise ApiError(401, "invalid or missing API key (Authorization: Bearer KEY)",
                               code="invalid_api_key")
        if path == "/v1/models" and method == "GET":
            await send_json(send, 200, {"object": "list", "data": await self.list_models()})
        elif path.startswith("/v1/models/") and method == "GET":
            model = self.find_model(path[len("/v1/models/"):])
            if not any(m["id"] == model.model_id for m in await self.list_models()):
                raise _unavailable(f"the swarm does not fully cover {model.model_id} now", "no_coverage")
            await send_json(send, 200, self._model_card(model))
        elif path in ("/v1/chat/completions", "/v1/completions"):
            if method != "POST":
                raise ApiError(405, f"{path} takes POST", code="method_not_allowed")
            job = await self.parse(path, receive)
            await self.serve_job(job, receive, send)
        elif path == "/v1/responses":
            if method != "POST":
                raise ApiError(405, f"{path} takes POST", code="method_not_allowed")
            from node.http.responses import serve_responses  # it builds on this module

            await serve_responses(self, receive, send)
        else:
            raise ApiError(404, f"no route {method} {path}", code="not_found")

    # ---- models ------------------------------------------------------------------------------
    def find_model(self, name: str) -> TextModel:
        for m in self.models:
            if name in (m.model_id, m.name, m.model_id.split("@", 1)[0]):
                return m
        known = ", ".join(m.model_id for m in self.models) or "none"
        raise ApiError(404, f"the model {name!r} does not exist here (this gateway knows: {known})",
                       param="model", code="model_not_found")

    def _model_card(self, m: TextModel) -> dict[str, Any]:
        return {"id": m.model_id, "object": "model", "created": self.created, "owned_by": "shiza-swarm"}

    async def covered(self, m: TextModel) -> bool:
        with trio.move_on_after(ROUTE_TIMEOUT_S):
            try:
                await self.client.route(m.model_id, num_layers=m.num_layers)
                return True
            except NoRoute:
                return False
        return False

    async def list_models(self) -> list[dict[str, Any]]:
        ok = [False] * len(self.models)

        async def check(i: int) -> None:
            ok[i] = await self.covered(self.models[i])

        async with trio.open_nursery() as nursery:
            for i in range(len(self.models)):
                nursery.start_soon(check, i)
        return [self._model_card(m) for m, yes in zip(self.models, ok) if yes]

    # ---- requests ----------------------------------------------------------------------------
    async def parse(self, path: str, receive: Receive) -> Job:
        kind = "chat" if path.endswith("chat/completions") else "completion"
        return await self.job(kind, await read_json(receive))

    async def job(self, kind: str, body: dict[str, Any]) -> Job:
        """A generation from a chat or completion request's body, checked."""
        if not isinstance(body.get("model"), str):
            raise ApiError(400, "'model' is required", param="model", code="missing_field")
        _check_fields(body, kind)
        tools, grammar = None, None
        if kind == "chat":
            try:
                tools = parse_tools(body)
                grammar = output_grammar(body, tools)
            except BadField as exc:
                raise ApiError(400, str(exc), param=exc.param, code="invalid_value") from None
        model = self.find_model(body["model"])
        if kind == "chat":
            if "messages" not in body:
                raise ApiError(400, "'messages' is required", param="messages", code="missing_field")
            ids = await trio.to_thread.run_sync(_chat_ids, model, body["messages"], tools)
            max_tokens = _field(body, "max_completion_tokens", (int,), None)
        else:
            if "prompt" not in body:
                raise ApiError(400, "'prompt' is required", param="prompt", code="missing_field")
            ids = await trio.to_thread.run_sync(_completion_ids, model, body["prompt"])
            max_tokens = None
        if not ids:
            raise ApiError(400, "the prompt is empty", param="prompt" if kind == "completion" else "messages")
        max_tokens = _field(body, "max_tokens", (int,), max_tokens)
        room = MAX_SESSION_LENGTH - len(ids)
        if max_tokens is None:
            max_tokens = min(DEFAULT_MAX_TOKENS[kind], room)
        if max_tokens < 1 or max_tokens > room:
            raise ApiError(400, f"'max_tokens' must be between 1 and {room} for this prompt of {len(ids)} "
                                "tokens", param="max_tokens", code="invalid_value")
        try:
            sampling = with_fresh_seed(SamplingParams(  # no seed given: a fresh one per request
                temperature=_number(body, "temperature", 1.0, 0.0, 2.0),
                top_p=_number(body, "top_p", 1.0, 0.0, 1.0),
                seed=_field(body, "seed", (int,), None),
            ))
        except InvalidMessage as exc:
            raise ApiError(400, str(exc), code="invalid_value") from None
        options = _field(body, "stream_options", (dict,), {})
        if grammar is not None and len(grammar.encode()) > MAX_GRAMMAR_BYTES:
            raise ApiError(400, f"the schema or tools make a grammar over {MAX_GRAMMAR_BYTES} bytes",
                           param="tools" if tools is not None else "response_format", code="invalid_value")
        logprobs = _logprobs_field(body, kind)
        if logprobs is not None:
            sampling = dataclasses.replace(sampling, logprobs=logprobs)
        bias = _logit_bias(body, len(model.tokenizer))
        if bias:
            sampling = dataclasses.replace(sampling, logit_bias=bias)
        presence = _number(body, "presence_penalty", 0.0, -2.0, 2.0)
        frequency = _number(body, "frequency_penalty", 0.0, -2.0, 2.0)
        if presence or frequency:  # SPEC 9.10, on the generated tokens
            sampling = dataclasses.replace(sampling, presence_penalty=presence, frequency_penalty=frequency)
        echo = bool(_field(body, "echo", (bool,), False))
        if echo and logprobs is not None:  # they would need the prompt's log-probabilities too
            raise ApiError(400, "'echo' with 'logprobs' is not supported", param="echo", code="unsupported_value")
        n = _field(body, "n", (int,), 1)
        if not 1 <= n <= MAX_N:
            raise ApiError(400, f"'n' must be between 1 and {MAX_N}", param="n", code="invalid_value")
        return Job(kind, model, ids, max_tokens, sampling, _stops(body), bool(_field(body, "stream", (bool,), False)),
                   bool(options.get("include_usage")), grammar, tools, n, logprobs, echo)

    async def generate(self, job: Job, on_text: Callable[[int, str], None],
                       on_logprob: Callable[[int, TokenLogprob], None] | None = None) -> Outcome:
        """Wait (bounded) for a generation slot, route, hold the route's peer slots, generate;
        ``on_text(i, piece)`` gets choice i's text as it becomes safe to show, ``on_logprob(i,
        entry)`` each of its tokens' log-probabilities (with ``logprobs``) before its text."""
        deadline = trio.current_time() + QUEUE_WAIT_S
        if self._slots.value == 0 and self._queued >= MAX_QUEUED:
            self.answered_busy += 1
            raise _unavailable(f"{MAX_QUEUED} requests wait already for one of this gateway's "
                               f"{MAX_CONCURRENT} generations", "busy")
        self._queued += 1
        try:
            with trio.move_on_at(deadline) as waited:
                await self._slots.acquire()
        finally:
            self._queued -= 1
        if waited.cancelled_caught:
            raise self._waited_too_long()
        eos = job.model.eos_token_ids
        texts = [_StopText(job.stop) for _ in range(job.n)]
        ended = [False] * job.n  # a row past its end token: what the batch still gives it is not its text
        detoks = [Detokenizer(job.model, functools.partial(lambda i, piece: on_text(i, texts[i].push(piece)), i))
                  for i in range(job.n)]

        def on_tokens(tokens: list[int]) -> None:
            for i, t in enumerate(tokens):
                if not ended[i]:
                    detoks[i].push(t)
                    ended[i] = t in eos

        try:
            route = await self._route(job)
            async with AsyncExitStack() as held:
                with trio.move_on_at(deadline) as waited:  # this client's slots at the route's peers
                    await held.enter_async_context(self.client.pacing.hold([h.peer_id for h in route]))
                if waited.cancelled_caught:
                    raise self._waited_too_long()
                try:
                    result = await self.client.generate(
                        job.model.model_id, [job.prompt_ids] * job.n, max_new_tokens=job.max_tokens,
                        sampling=job.sampling, eos_token_ids=eos, route=route,
                        vocab_size=job.model.vocab_size, on_tokens=on_tokens, grammar=job.grammar,
                        until=lambda: all(t.stopped or e for t, e in zip(texts, ended)) or job.abandoned,
                        on_logprob=on_logprob,
                    )
                except (ShizaError, NoRoute) as exc:
                    error = _from_swarm(exc)
                    if error.code == "busy":
                        self.answered_busy += 1
                    raise error from None
        finally:
            self._slots.release()
        self.metrics.generation(job.model.model_id, result)
        choices = []
        for i, (text, detok, row) in enumerate(zip(texts, detoks, result.token_ids)):
            # The whole decode may differ from the streamed pieces at the very end (a byte
            # sequence left incomplete): emit what is missing, so the text equals `shiza generate`'s.
            if not text.stopped:
                ids = [t for t in row if t not in eos]
                full = job.model.decode(ids)
                if full.startswith(detok.emitted):
                    on_text(i, text.push(full[len(detok.emitted):]))
            on_text(i, text.flush())
            ended_by_eos = bool(row) and row[-1] in eos
            reason = "stop" if text.stopped or ended_by_eos else "length"
            calls = answer_calls(text.text, job.tools) if reason == "stop" else None
            choices.append(Choice(text.text, "tool_calls" if calls else reason, calls))
        return Outcome(choices, result)

    async def _route(self, job: Job) -> list[Hop]:
        """A chain for ``job``: one DHT lookup at a time per model, its route shared by the
        requests that arrive within ROUTE_REUSE_S while none of its peers is backed off (a burst
        of requests would otherwise run as many lookups at once, and py-libp2p's DHT loses
        some of them under that load)."""
        model = job.model
        lock = self._route_locks.setdefault(model.model_id, trio.Lock())
        with trio.move_on_after(ROUTE_TIMEOUT_S):  # waiting for the lock too
            async with lock:
                cached = self._routes.get(model.model_id)
                if cached is not None:
                    at, route = cached
                    avoided = self.client.health.avoided(time.monotonic())
                    if trio.current_time() - at < ROUTE_REUSE_S and not any(h.peer_id in avoided for h in route):
                        return route
                try:
                    found = await self.client.route(model.model_id, num_layers=model.num_layers,
                                                    need_tokens=job.n * (len(job.prompt_ids) + job.max_tokens))
                except NoRoute as exc:
                    self._routes.pop(model.model_id, None)
                    raise _from_swarm(exc) from None
                self._routes[model.model_id] = (trio.current_time(), found)
                return found
        raise _unavailable("no answer from the DHT in time", "no_coverage")

    def _waited_too_long(self) -> ApiError:
        self.answered_busy += 1
        return _unavailable(f"the swarm is busy: this request waited {QUEUE_WAIT_S:g} s for room", "busy")

    async def serve_job(self, job: Job, receive: Receive, send: Send) -> None:
        """Answer one generation, cancelling it if the client goes away."""
        rid = ("chatcmpl-" if job.kind == "chat" else "cmpl-") + secrets.token_hex(12)
        head = {"id": rid, "object": "chat.completion" if job.kind == "chat" else "text_completion",
                "created": int(time.time()), "model": job.model.model_id}
        if job.stream:
            await self._stream(job, head, receive, send)
            return
        outcome: Outcome | None = None
        failure: ApiError | None = None

        async def work(cancel: trio.CancelScope) -> None:
            nonlocal outcome, failure
            try:
                outcome = await self.generate(job, lambda i, s: None)
            except ApiError as exc:
                failure = exc
            cancel.cancel()

        await _with_disconnect(receive, work, job)
        if failure is not None:
            raise failure
        if outcome is None:
            return  # the client went away
        choices = []
        for i, c in enumerate(outcome.choices):
            if job.kind == "chat":
                message: dict[str, Any] = {"role": "assistant", "content": c.text}
                if c.calls:
                    message = {"role": "assistant", "content": None, "tool_calls": tool_calls_json(c.calls)}
                choices.append({"index": i, "message": message, "finish_reason": c.finish_reason,
                                "logprobs": _logprobs_json(job.model, _row(outcome, i), "chat")})
            else:
                echoed = job.model.decode(job.prompt_ids) if job.echo else ""
                choices.append({"index": i, "text": echoed + c.text, "finish_reason": c.finish_reason,
                                "logprobs": _logprobs_json(job.model, _row(outcome, i), "completion")})
        body = {**head, "choices": choices, "usage": outcome.usage(len(job.prompt_ids))}
        await send_json(send, 200, body, [(b"x-shiza-receipts", ",".join(outcome.result.receipts).encode())])

    async def _stream(self, job: Job, head: dict[str, Any], receive: Receive, send: Send) -> None:
        chat = job.kind == "chat"
        head = {**head, "object": "chat.completion.chunk" if chat else "text_completion"}
        extra = {"usage": None} if job.include_usage else {}
        started = False

        async def event(data: object) -> None:
            nonlocal started
            if not started:
                started = True
                await send({"type": "http.response.start", "status": 200, "headers": [
                    (b"content-type", b"text/event-stream; charset=utf-8"), (b"cache-control", b"no-cache"),
                    (b"x-shiza-receipts", b"trailer")]})
                if chat:
                    for i in range(job.n):
                        await event({**head, "choices": [{"index": i, "delta": {"role": "assistant", "content": ""},
                                                          "logprobs": None, "finish_reason": None}], **extra})
            payload = data if isinstance(data, bytes) else b"data: " + json.dumps(data).encode() + b"\n\n"
            await send({"type": "http.response.body", "body": payload, "more_body": True})

        def chunk(index: int, piece: str, finish: str | None, delta: dict[str, Any] | None = None) -> dict[str, Any]:
            if chat:
                delta = delta or ({"content": piece} if piece else {})
                return {**head, "choices": [{"index": index, "delta": delta, "logprobs": None,
                                             "finish_reason": finish}], **extra}
            return {**head, "choices": [{"index": index, "text": piece, "logprobs": None, "finish_reason": finish}],
                    **extra}

        pieces, out = trio.open_memory_channel[tuple[int, str, list[TokenLogprob]]](math.inf)
        outcome: Outcome | None = None
        failure: ApiError | None = None
        # With logprobs, each chunk carries those of the tokens whose text it completes (a
        # token's text may wait for a stop sequence to be ruled out); the rest come at the end.
        pending: list[list[TokenLogprob]] = [[] for _ in range(job.n)]
        offsets = [0] * job.n  # completions' text_offset: where the next token's text starts

        def taken(i: int) -> list[TokenLogprob]:
            got, pending[i] = pending[i], []
            return got

        async def produce() -> None:
            nonlocal outcome, failure
            async with pieces:
                try:
                    outcome = await self.generate(
                        job, lambda i, s: s and pieces.send_nowait((i, s, taken(i))),  # type: ignore[func-returns-value]
                        on_logprob=lambda i, lp: pending[i].append(lp))
                except ApiError as exc:
                    failure = exc

        def with_logprobs(part: dict[str, Any], i: int, got: list[TokenLogprob]) -> dict[str, Any]:
            lp = _logprobs_json(job.model, got, job.kind, offsets[i]) if got else None
            if lp is not None and (lp.get("content") or lp.get("tokens")):
                part["choices"][0]["logprobs"] = lp
                offsets[i] += sum(len(t) for t in lp.get("tokens", ()))
            return part

        # With tools, an answer of tool calls goes out as OpenAI's tool-call deltas: each call's
        # name once known, then its arguments as they are generated; the first character tells
        # calls from text (node/client/grammars.py). A call's own text is held back until the
        # reader has placed it (what it never placed goes out as text at the end).
        held: list[list[str]] = [[] for _ in range(job.n)]
        readers = [ToolCallReader() for _ in range(job.n)]
        mode = [answer_kind(job.tools)] * job.n

        async def call_deltas(i: int, piece: str) -> None:
            for kind, k, value in readers[i].feed(piece):
                if kind == "call":
                    delta = {"index": k, "id": tool_call_id(), "type": "function",
                             "function": {"name": value, "arguments": ""}}
                else:
                    delta = {"index": k, "function": {"arguments": value}}
                await event(chunk(i, "", None, {"tool_calls": [delta]}))

        async def work(cancel: trio.CancelScope) -> None:
            if job.echo:  # completions: the prompt's text first, in each choice
                echoed = job.model.decode(job.prompt_ids)
                for i in range(job.n):
                    await event(chunk(i, echoed, None))
            async with trio.open_nursery() as nursery:
                nursery.start_soon(produce)
                async with out:
                    async for i, piece, got in out:
                        if mode[i] == "?":
                            mode[i] = "calls" if piece.startswith("<") else "text"
                        if mode[i] == "calls":
                            held[i].append(piece)
                            await call_deltas(i, piece)
                        else:
                            await event(with_logprobs(chunk(i, piece, None), i, got))
            cancel.cancel()

        await _with_disconnect(receive, work, job)
        if failure is not None and not started:  # nothing sent yet: a plain error response
            await send_json(send, failure.status, failure.body(), failure.headers())
            return
        if failure is not None:
            await event(failure.body())
        elif outcome is not None:
            for index, c in enumerate(outcome.choices):
                # calls went out as they came (one cut short by the budget ends unclosed)
                if held[index] and not readers[index].names:
                    await event(with_logprobs(chunk(index, "".join(held[index]), None), index, taken(index)))
                if pending[index] and mode[index] == "text":  # tokens whose text did not show: an end token, text a stop cut
                    part = with_logprobs(chunk(index, "", None), index, taken(index))
                    if part["choices"][0]["logprobs"] is not None:
                        await event(part)
                await event(chunk(index, "", c.finish_reason))
            if job.include_usage:
                await event({**head, "choices": [], "usage": outcome.usage(len(job.prompt_ids))})
            await event(b": x-shiza-receipts " + ",".join(outcome.result.receipts).encode() + b"\n\n")
        else:
            return  # the client went away: nothing more to send
        await event(b"data: [DONE]\n\n")
        await send({"type": "http.response.body", "body": b"", "more_body": False})


# ---- running it --------------------------------------------------------------------------------
async def serve_gateway(
    client: SwarmClient,
    models: Sequence[TextModel],
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    api_keys: Sequence[str] = (),
    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve the gateway until cancelled; ``task_status.started(port)`` once it accepts."""
    await serve_asgi(Gateway(client, models, api_keys), host=host, port=port, task_status=task_status)


async def gateway_service(
    node: Node,
    *,
    port: int,
    api_keys: Sequence[str] = (),
    models: Sequence[str] = (),
    host: str = "127.0.0.1",
    metrics: NodeMetrics | None = None,
    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
) -> None:
    """A node service (NodeConfig.services): the gateway on the node's own host, DHT and ledger.

    Its client belongs to the node's swarm (``node.swarm_id``: a private swarm's receipts are
    countersigned, not disputed as another swarm's). ``models`` default to the node's own. The
    node cannot open a session with itself (libp2p refuses to dial oneself), so its gateway
    routes through other peers for its own layers. ``metrics``: the node's, which then export
    the client's failovers too. Cancellation closes the port; generations in flight settle
    their receipts (see the module docstring).
    """
    specs = list(models) or [node.cfg.model]
    loaded = [await trio.to_thread.run_sync(TextModel.load, spec) for spec in specs]
    client = SwarmClient(node.host, node.dht, node.identity, node.ledger, swarm_id=node.swarm_id)
    client.health.failed(node.identity.peer_id, math.inf)  # avoided forever: never route through ourselves
    if metrics is not None:
        metrics.add_client(client)
    await serve_gateway(client, loaded, host=host, port=port, api_keys=api_keys, task_status=task_status)
