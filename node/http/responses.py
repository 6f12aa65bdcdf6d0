"""``POST /v1/responses``: OpenAI's Responses API (what the OpenAI Agents SDK uses by default).

A request becomes a chat completion's (node/http/gateway.py): ``input`` (text, or message,
``function_call`` and ``function_call_output`` items) and ``instructions`` become messages,
function tools and ``text.format`` become tools and a response format, generated under a grammar
on the last node like any other (SPEC 9.8). The answer is a ``response`` object whose output is
one message, or the function calls the model made; streamed, it is OpenAI's event sequence
(``response.created`` ... ``response.output_text.delta`` ... ``response.completed``).

``previous_response_id`` continues a conversation this gateway answered: it keeps the last
``MAX_STORED`` conversations in memory (not across restarts), and an id it no longer holds is a
404. ``instructions`` apply to the one response, as in OpenAI's API.
"""

from __future__ import annotations

import json
import secrets
import time
from collections import OrderedDict
from typing import Any

import trio

from node.client.grammars import ToolCallReader
from node.http.agents import answer_kind, tool_call_id, tool_calls_json
from node.http.api import ApiError, Outcome, Receive, Send, _with_disconnect, read_json
from node.http.asgi import send_json

# The gateway (node/http/gateway.py) calls in here with itself: ``gw.job``, ``gw.generate``,
# ``gw.stored``; typed loosely, as this module must not import it (no cycle).
Gateway = Any
Job = Any

MAX_STORED = 256  # conversations kept for previous_response_id

# Every field a request may carry; those set to a value the gateway cannot honour are a 400.
_FIELDS = frozenset({
    "model", "input", "instructions", "max_output_tokens", "temperature", "top_p", "tools", "tool_choice",
    "parallel_tool_calls", "text", "stream", "store", "metadata", "user", "include", "truncation",
    "previous_response_id", "reasoning", "service_tier", "prompt_cache_key", "safety_identifier",
    "top_logprobs", "background", "max_tool_calls", "stream_options", "conversation", "prompt",
})
_NO_OP: dict[str, tuple[Any, ...]] = {"include": ([],), "truncation": ("disabled",), "background": (False,),
                                      "top_logprobs": (0,), "reasoning": ({},), "service_tier": ("auto", "default")}


class ResponseStore:
    """The conversations of the last ``limit`` responses: their messages, output included."""

    def __init__(self, limit: int = MAX_STORED) -> None:
        self.limit = limit
        self._kept: OrderedDict[str, list[dict[str, Any]]] = OrderedDict()

    def get(self, response_id: str) -> list[dict[str, Any]]:
        if response_id not in self._kept:
            raise ApiError(404, f"no response {response_id!r} here (this gateway keeps the last {self.limit})",
                           param="previous_response_id", code="not_found")
        self._kept.move_to_end(response_id)
        return list(self._kept[response_id])

    def put(self, response_id: str, messages: list[dict[str, Any]]) -> None:
        self._kept[response_id] = messages
        while len(self._kept) > self.limit:
            self._kept.popitem(last=False)


def _bad(param: str, message: str) -> ApiError:
    return ApiError(400, message, param=param, code="invalid_value")


def _check_fields(body: dict[str, Any]) -> None:
    for name, value in body.items():
        if name not in _FIELDS:
            raise ApiError(400, f"unknown or unsupported field '{name}'", param=name, code="unsupported_field")
        if name in ("conversation", "prompt", "max_tool_calls") and value is not None:
            raise ApiError(400, f"'{name}' is not supported by this gateway", param=name, code="unsupported_value")
        if value is not None and name in _NO_OP and value not in _NO_OP[name]:
            raise ApiError(400, f"'{name}' = {json.dumps(value)[:64]} is not supported by this gateway",
                           param=name, code="unsupported_value")


def _text(content: Any, where: str) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for part in content:
            if not isinstance(part, dict) or part.get("type") not in ("input_text", "output_text", "text"):
                raise _bad("input", f"{where}: only text content is supported")
            parts.append(str(part.get("text", "")))
        return "".join(parts)
    raise _bad("input", f"{where}: content must be text or a list of text parts")


def input_messages(items: Any) -> list[dict[str, Any]]:
    """``input`` as chat messages: function calls join the assistant's message, their outputs
    become ``tool`` messages."""
    if isinstance(items, str):
        return [{"role": "user", "content": items}]
    if not isinstance(items, list):
        raise _bad("input", "'input' must be text or a list of items")
    out: list[dict[str, Any]] = []
    for i, item in enumerate(items):
        where = f"input[{i}]"
        if not isinstance(item, dict):
            raise _bad("input", f"{where} must be an object")
        kind = item.get("type", "message")
        if kind == "message":
            role = item.get("role")
            if role not in ("user", "assistant", "system", "developer"):
                raise _bad("input", f"{where}: unknown role {role!r}")
            out.append({"role": role, "content": _text(item.get("content"), where)})
        elif kind == "function_call":
            if not isinstance(item.get("name"), str) or not isinstance(item.get("call_id"), str):
                raise _bad("input", f"{where}: a function_call needs 'name' and 'call_id'")
            call = {"id": item["call_id"], "type": "function",
                    "function": {"name": item["name"], "arguments": item.get("arguments") or "{}"}}
            if out and out[-1]["role"] == "assistant" and out[-1].get("tool_calls") is not None:
                out[-1]["tool_calls"].append(call)
            else:
                out.append({"role": "assistant", "content": None, "tool_calls": [call]})
        elif kind == "function_call_output":
            if not isinstance(item.get("call_id"), str):
                raise _bad("input", f"{where}: a function_call_output needs 'call_id'")
            output = item.get("output")
            out.append({"role": "tool", "tool_call_id": item["call_id"],
                        "content": output if isinstance(output, str) else _text(output, where)})
        else:
            raise _bad("input", f"{where}: items of type {kind!r} are not supported")
    return out


def _tools(body: dict[str, Any]) -> dict[str, Any]:
    """The chat request's tools, tool_choice and parallel_tool_calls."""
    out: dict[str, Any] = {}
    tools = body.get("tools")
    if tools:
        if not isinstance(tools, list):
            raise _bad("tools", "'tools' must be a list")
        chat_tools = []
        for i, t in enumerate(tools):
            if not isinstance(t, dict) or t.get("type") != "function":
                raise _bad("tools", f"tools[{i}]: only function tools are supported")
            fn = {k: t[k] for k in ("name", "description", "parameters") if t.get(k) is not None}
            chat_tools.append({"type": "function", "function": fn})
        out["tools"] = chat_tools
    choice = body.get("tool_choice")
    if isinstance(choice, dict):
        if choice.get("type") != "function" or not isinstance(choice.get("name"), str):
            raise _bad("tool_choice", "'tool_choice' must be 'auto', 'none', 'required' or "
                                      "{'type': 'function', 'name': ...}")
        choice = {"type": "function", "function": {"name": choice["name"]}}
    if choice is not None:
        out["tool_choice"] = choice
    if body.get("parallel_tool_calls") is not None:
        out["parallel_tool_calls"] = body["parallel_tool_calls"]
    return out


def _format(body: dict[str, Any]) -> dict[str, Any] | None:
    text = body.get("text")
    if text is None:
        return None
    fmt = text.get("format") if isinstance(text, dict) else None
    if fmt is None:
        return None
    if not isinstance(fmt, dict) or fmt.get("type") not in ("text", "json_object", "json_schema"):
        raise _bad("text", "'text.format.type' must be 'text', 'json_object' or 'json_schema'")
    if fmt["type"] == "json_schema":
        return {"type": "json_schema", "json_schema": {"name": fmt.get("name"), "schema": fmt.get("schema"),
                                                       "strict": fmt.get("strict")}}
    return {"type": fmt["type"]}


def chat_request(body: dict[str, Any], previous: list[dict[str, Any]]) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """(the chat completion request, the conversation to store once answered, output excluded)."""
    _check_fields(body)
    if "input" not in body:
        raise ApiError(400, "'input' is required", param="input", code="missing_field")
    conversation = previous + input_messages(body["input"])
    messages = list(conversation)
    instructions = body.get("instructions")
    if instructions is not None:
        if not isinstance(instructions, str):
            raise _bad("instructions", "'instructions' must be text")
        messages.insert(0, {"role": "system", "content": instructions})
    chat: dict[str, Any] = {"model": body.get("model"), "messages": messages, **_tools(body)}
    for src, dst in (("max_output_tokens", "max_tokens"), ("temperature", "temperature"), ("top_p", "top_p"),
                     ("user", "user"), ("metadata", "metadata")):
        if body.get(src) is not None:
            chat[dst] = body[src]
    fmt = _format(body)
    if fmt is not None:
        chat["response_format"] = fmt
    return chat, conversation


def _item_id(call_id: str) -> str:
    """A function_call item's id, from its call's (``call_...`` -> ``fc_...``)."""
    return "fc_" + call_id[5:]


class _Answer:
    """The response object of one request, as it is built."""

    def __init__(self, body: dict[str, Any], job: Job) -> None:
        self.id = "resp_" + secrets.token_hex(12)
        self.created = int(time.time())
        self.body, self.job = body, job
        self.message_id = "msg_" + secrets.token_hex(12)

    def items(self, outcome: Outcome | None, calls: list[dict[str, Any]] | None) -> list[dict[str, Any]]:
        if outcome is None:
            return []
        if calls:
            return [self.call_item(c["id"], c["function"]["name"], c["function"]["arguments"], "completed")
                    for c in calls]
        return [self.message(outcome.text, "completed")]

    @staticmethod
    def call_item(call_id: str, name: str, arguments: str, status: str) -> dict[str, Any]:
        return {"type": "function_call", "id": _item_id(call_id), "call_id": call_id, "name": name,
                "arguments": arguments, "status": status}

    def message(self, text: str, status: str) -> dict[str, Any]:
        """The assistant's message item; its one output_text part once there is text or it ended."""
        parts = []
        if status == "completed" or text:
            parts.append({"type": "output_text", "text": text, "annotations": [], "logprobs": []})
        return {"type": "message", "id": self.message_id, "role": "assistant", "status": status, "content": parts}

    def obj(self, outcome: Outcome | None, calls: list[dict[str, Any]] | None) -> dict[str, Any]:
        b, job = self.body, self.job
        status = "in_progress" if outcome is None else (
            "incomplete" if outcome.finish_reason == "length" else "completed")
        usage = None
        if outcome is not None:
            done = len(outcome.result.token_ids[0])
            usage = {"input_tokens": len(job.prompt_ids), "input_tokens_details": {"cached_tokens": 0, "cache_write_tokens": 0},
                     "output_tokens": done, "output_tokens_details": {"reasoning_tokens": 0},
                     "total_tokens": len(job.prompt_ids) + done}
        fmt = (b.get("text") or {}).get("format") or {"type": "text"}
        return {
            "id": self.id, "object": "response", "created_at": self.created, "model": job.model.model_id,
            "status": status, "output": self.items(outcome, calls), "error": None,
            "incomplete_details": {"reason": "max_output_tokens"} if status == "incomplete" else None,
            "instructions": b.get("instructions"), "max_output_tokens": b.get("max_output_tokens"),
            "metadata": b.get("metadata") or {}, "parallel_tool_calls": b.get("parallel_tool_calls", True),
            "previous_response_id": b.get("previous_response_id"),
            "temperature": job.sampling.temperature, "top_p": job.sampling.top_p,
            "tool_choice": b.get("tool_choice") or "auto", "tools": b.get("tools") or [],
            "text": {"format": fmt}, "truncation": "disabled", "usage": usage, "user": b.get("user"),
            "store": b.get("store", True),
        }


async def serve_responses(gw: Gateway, receive: Receive, send: Send) -> None:
    body = await read_json(receive)
    previous = gw.stored.get(body["previous_response_id"]) if body.get("previous_response_id") else []
    chat, conversation = chat_request(body, previous)
    job = await gw.job("chat", chat)
    answer = _Answer(body, job)
    stream = bool(body.get("stream"))
    outcome: Outcome | None = None
    failure: ApiError | None = None
    pieces, out = trio.open_memory_channel[str](float("inf"))
    seq = 0
    started = False

    async def event(kind: str, **fields: Any) -> None:
        nonlocal seq, started
        if not started:
            started = True
            await send({"type": "http.response.start", "status": 200, "headers": [
                (b"content-type", b"text/event-stream; charset=utf-8"), (b"cache-control", b"no-cache")]})
        data = {"type": kind, "sequence_number": seq, **fields}
        seq += 1
        await send({"type": "http.response.body", "more_body": True,
                    "body": f"event: {kind}\ndata: {json.dumps(data)}\n\n".encode()})

    where = {"item_id": answer.message_id, "output_index": 0, "content_index": 0}
    # As in chat completions (gateway.py): text streams as it comes; so do tool calls, each
    # call's item once its name is known, then its arguments, which the first character tells
    # apart from text.
    mode = answer_kind(job.tools)
    reader = ToolCallReader()
    call_ids: list[str] = []
    text_streamed = False

    async def produce() -> None:
        nonlocal outcome, failure
        async with pieces:
            try:
                outcome = await gw.generate(job, lambda i, s: s and stream and pieces.send_nowait(s))  # type: ignore[func-returns-value]
            except ApiError as exc:
                failure = exc

    async def work(cancel: trio.CancelScope) -> None:
        nonlocal mode, text_streamed
        async with trio.open_nursery() as nursery:
            nursery.start_soon(produce)
            async with out:
                async for piece in out:
                    if mode == "?":
                        mode = "calls" if piece.startswith("<") else "text"
                    if mode == "calls":
                        for kind, k, value in reader.feed(piece):
                            if kind == "call":
                                call_ids.append(tool_call_id())
                                item = answer.call_item(call_ids[-1], value, "", "in_progress")
                                await event("response.output_item.added", output_index=k, item=item)
                            else:
                                await event("response.function_call_arguments.delta", item_id=_item_id(call_ids[k]),
                                            output_index=k, delta=value)
                        continue
                    if not text_streamed:
                        text_streamed = True
                        await event("response.output_item.added", output_index=0,
                                    item=answer.message("", "in_progress"))
                        await event("response.content_part.added", **where,
                                    part={"type": "output_text", "text": "", "annotations": []})
                    await event("response.output_text.delta", **where, delta=piece, logprobs=[])
        cancel.cancel()

    if stream:
        await event("response.created", response=answer.obj(None, None))
        await event("response.in_progress", response=answer.obj(None, None))
    await _with_disconnect(receive, work, job)
    if failure is not None:
        if not started:
            raise failure
        await event("error", code=failure.code, message=failure.message, param=failure.param)
        await send({"type": "http.response.body", "body": b"", "more_body": False})
        return
    if outcome is None:
        return  # the client went away
    calls = tool_calls_json(outcome.calls) if outcome.calls else None
    if calls and call_ids:  # the ids the stream already gave them
        for c, call_id in zip(calls, call_ids):
            c["id"] = call_id
    final = answer.obj(outcome, calls)
    gw.stored.put(answer.id, conversation + [
        {"role": "assistant", "content": None, "tool_calls": calls} if calls else
        {"role": "assistant", "content": outcome.text}])
    if not stream:
        await send_json(send, 200, final, [(b"x-shiza-receipts", ",".join(outcome.result.receipts).encode())])
        return
    for index, item in enumerate(final["output"]):
        if item["type"] == "message":
            if not text_streamed or not outcome.text:
                await event("response.output_item.added", output_index=0, item=answer.message("", "in_progress"))
                await event("response.content_part.added", **where,
                            part={"type": "output_text", "text": "", "annotations": []})
                if outcome.text:
                    await event("response.output_text.delta", **where, delta=outcome.text, logprobs=[])
            await event("response.output_text.done", **where, text=outcome.text, logprobs=[])
            await event("response.content_part.done", **where, part=item["content"][0])
        else:
            if index >= len(call_ids):  # not streamed as it came
                await event("response.output_item.added", output_index=index,
                            item={**item, "arguments": "", "status": "in_progress"})
                await event("response.function_call_arguments.delta", item_id=item["id"], output_index=index,
                            delta=item["arguments"])
            await event("response.function_call_arguments.done", item_id=item["id"], output_index=index,
                        arguments=item["arguments"], name=item["name"])
        await event("response.output_item.done", output_index=index, item=item)
    await event("response.completed" if final["status"] == "completed" else "response.incomplete", response=final)
    await send({"type": "http.response.body", "body": b"", "more_body": False})
