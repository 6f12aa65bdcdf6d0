"""What every OpenAI-style endpoint of the gateway shares: errors in OpenAI's shape, the request
body, an answer's choices, and stopping a generation when its client goes away."""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Awaitable, Callable, Protocol

import trio

from protocol.errors import Busy, LimitExceeded, RateLimited

from node.client.routing import NoRoute
from node.http.asgi import read_body

if TYPE_CHECKING:
    from node.client.grammars import ToolCall
    from node.client.swarm import GenerationResult

log = logging.getLogger(__name__)

RETRY_AFTER_S = 5  # what a 503 tells the caller to wait when nobody gave a better hint
DISCONNECT_GRACE_S = 5.0  # after a disconnect, how long the step in flight may take before a hard cancel

Send = Callable[[dict[str, Any]], Awaitable[None]]
Receive = Callable[[], Awaitable[dict[str, Any]]]


class Abandonable(Protocol):
    abandoned: bool  # the client went away: stop after the step in flight


class ApiError(Exception):
    """An error answered in OpenAI's format with an HTTP status."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None, retry_after_s: float | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.retry_after_s = retry_after_s

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def headers(self) -> list[tuple[bytes, bytes]]:
        if self.status != 503:
            return []
        after = RETRY_AFTER_S if self.retry_after_s is None else max(1, math.ceil(self.retry_after_s))
        return [(b"retry-after", str(after).encode())]


def _unavailable(message: str, code: str, retry_after_s: float | None = None) -> ApiError:
    return ApiError(503, message, type="service_unavailable", code=code, retry_after_s=retry_after_s)


def _from_swarm(exc: Exception) -> ApiError:
    """A swarm failure as an HTTP answer."""
    if isinstance(exc, NoRoute):
        return _unavailable(f"the swarm cannot serve this model now: {exc}", "no_coverage")
    if isinstance(exc, (Busy, RateLimited)):  # load: the peer's hint becomes Retry-After
        return _unavailable(f"the swarm is busy: {exc}", "busy", getattr(exc, "retry_after_s", None))
    if isinstance(exc, LimitExceeded):
        return ApiError(400, f"a peer refused the request: {exc}", code="limit_exceeded")
    return ApiError(502, f"a peer failed: {exc}", type="api_error", code="peer_error")


async def read_json(receive: Receive) -> dict[str, Any]:
    """The request's body as a JSON object, else a 400."""
    try:
        body = json.loads(await read_body(receive))
    except ValueError as exc:  # JSONDecodeError and "body too large" alike
        raise ApiError(400, f"the body is not valid JSON: {exc}", code="invalid_json") from None
    if not isinstance(body, dict):
        raise ApiError(400, "the body must be a JSON object", code="invalid_json")
    return body


@dataclass
class Choice:
    text: str
    finish_reason: str
    calls: list[ToolCall] | None = None  # the answer is these tool calls


@dataclass
class Outcome:
    choices: list[Choice]  # one per row (n)
    result: GenerationResult

    @property
    def text(self) -> str:
        return self.choices[0].text

    @property
    def finish_reason(self) -> str:
        return self.choices[0].finish_reason

    @property
    def calls(self) -> list[ToolCall] | None:
        return self.choices[0].calls

    def usage(self, prompt_tokens: int) -> dict[str, int]:
        completion = sum(len(row) for row in self.result.token_ids)
        return {"prompt_tokens": prompt_tokens, "completion_tokens": completion,
                "total_tokens": prompt_tokens + completion}


async def _with_disconnect(receive: Receive, work: Callable[[trio.CancelScope], Awaitable[None]], job: Abandonable) -> None:
    """Run ``work`` until it cancels the given scope (done) or the client disconnects.

    On a disconnect the generation stops after the step in flight (``job.abandoned``): the
    sessions then close normally and the final receipts match the work done. Cancelling in the
    middle of a step would leave that step's answer unread ahead of the session's ``Closed``, so
    a hard cancel comes only after DISCONNECT_GRACE_S. ``work`` must catch its own errors (a
    nursery would wrap them in an exception group).
    """
    async with trio.open_nursery() as nursery:

        async def watch() -> None:
            while (await receive())["type"] != "http.disconnect":
                pass
            log.info("client disconnected: stopping its generation")
            job.abandoned = True
            await trio.sleep(DISCONNECT_GRACE_S)
            nursery.cancel_scope.cancel()

        nursery.start_soon(watch)
        await work(nursery.cancel_scope)
