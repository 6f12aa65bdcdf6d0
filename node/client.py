"""Inference across a chain of peers: discovery, routing, and pipelined generation.

The client drives the pipeline (SPEC.md, "Inference session"): it opens one session per hop,
sends token ids to the first hop, passes each hop's hidden states on to the next unchanged, and
reads the sampled token from the last. Hidden states are opaque bytes here: the client needs no
torch.

    async with SwarmClient.open(bootstrap=[addr]) as client:
        result = await client.generate(model_id, [prompt_ids], max_new_tokens=32)
"""

from __future__ import annotations

import logging
import math
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import AsyncIterator, Callable, Sequence

import trio

from protocol.codec import Tensor
from protocol.errors import InvalidMessage, ShizaError
from protocol.identity import Identity
from protocol.messages import (
    CloseSession,
    Closed,
    Error,
    OpenSession,
    SamplingParams,
    SessionOpened,
    Step,
    StepResult,
)
from protocol.records import CapacityRecord
from protocol.ids import INFERENCE_PROTOCOL

from ._util import unwrap_single_groups
from .announce import DHT_SELECTORS, DHT_VALIDATORS, fetch_records
from .dht import SwarmDHT, open_dht
from .host import Host, Stream, open_host
from .routing import Candidate, Hop, NoRoute, find_chain
from .wire import int64_tensor, int64_values, recv_message, send_message

log = logging.getLogger(__name__)

STEP_TIMEOUT_S = 120.0


@dataclass
class GenerationResult:
    token_ids: list[list[int]]  # per batch row, new tokens only (EOS included when reached)
    route: list[Hop]
    ttft_s: float
    decode_s: float
    steps: int

    @property
    def tokens_per_s(self) -> float:
        """Decode tokens per second (after the first token), per row."""
        return (self.steps - 1) / self.decode_s if self.steps > 1 and self.decode_s > 0 else 0.0


@dataclass
class _HopSession:
    hop: Hop
    stream: Stream
    session_id: str
    steps: int = 0


def candidates_from(records: Sequence[CapacityRecord], model_id: str) -> list[Candidate]:
    out = []
    for r in records:
        for span in r.spans:
            if span.model_id == model_id:
                out.append(Candidate(r.peer_id, span.start, span.end, r.throughput, tuple(r.addrs)))
    return out


def num_layers_of(records: Sequence[CapacityRecord], model_id: str) -> int | None:
    for r in records:
        for span in r.spans:
            if span.model_id == model_id:
                return span.num_layers
    return None


class SwarmClient:
    """A libp2p peer that finds spans through the DHT and drives generation across them."""

    def __init__(self, host: Host, dht: SwarmDHT) -> None:
        self.host = host
        self.dht = dht

    @classmethod
    @asynccontextmanager
    async def open(
        cls,
        bootstrap: Sequence[str],
        *,
        identity: Identity | None = None,
        listen: str = "/ip4/127.0.0.1/tcp/0",
    ) -> AsyncIterator["SwarmClient"]:
        identity = identity or Identity.generate()
        with unwrap_single_groups():
            async with open_host(identity.seed, listen) as host:
                async with open_dht(host, DHT_VALIDATORS, DHT_SELECTORS, list(bootstrap)) as dht:
                    yield cls(host, dht)

    # ---- discovery ----------------------------------------------------------------------
    async def records(self, model_id: str) -> list[CapacityRecord]:
        return await fetch_records(self.dht, model_id)

    async def route(
        self, model_id: str, *, num_layers: int | None = None, avoid: frozenset[str] = frozenset()
    ) -> list[Hop]:
        """The fastest chain covering the model, from the records in the DHT now."""
        records = await self.records(model_id)
        num_layers = num_layers or num_layers_of(records, model_id)
        if num_layers is None:
            raise NoRoute(0, [], [], detail=f"no peer advertises model {model_id}")
        return find_chain(num_layers, candidates_from(records, model_id), avoid=avoid)

    async def wait_for_route(
        self, model_id: str, timeout_s: float = 120.0, *, num_layers: int | None = None
    ) -> list[Hop]:
        """Poll the DHT (bounded in time) until the model is fully covered."""
        last: Exception | None = None
        with trio.move_on_after(timeout_s):
            while True:
                try:
                    return await self.route(model_id, num_layers=num_layers)
                except NoRoute as exc:
                    last = exc
                await trio.sleep(0.5)
        raise last or NoRoute(0, [], [])

    # ---- generation ---------------------------------------------------------------------
    async def generate(
        self,
        model_id: str,
        prompts: Sequence[Sequence[int]],
        *,
        max_new_tokens: int = 32,
        sampling: SamplingParams = SamplingParams(),
        eos_token_ids: Sequence[int] = (),
        route: list[Hop] | None = None,
        on_tokens: Callable[[list[int]], None] | None = None,
    ) -> GenerationResult:
        """Generate for a batch of prompts (left-padded), streaming each step to ``on_tokens``."""
        if not prompts or any(len(p) == 0 for p in prompts):
            raise ValueError("every prompt needs at least one token")
        if max_new_tokens < 1:
            raise ValueError("max_new_tokens must be at least 1")
        route = route or await self.route(model_id)
        batch = len(prompts)
        width = max(len(p) for p in prompts)
        ids = [[0] * (width - len(p)) + list(p) for p in prompts]
        mask = [[0] * (width - len(p)) + [1] * len(p) for p in prompts]
        positions = [[max(0, i - (width - len(p))) for i in range(width)] for p in prompts]
        max_length = width + max_new_tokens
        eos = set(eos_token_ids)
        out: list[list[int]] = [[] for _ in range(batch)]
        done = [False] * batch
        t0 = time.perf_counter()
        ttft = 0.0
        steps = 0
        async with self._open_chain(model_id, route, batch, max_length, sampling) as hops:
            step_ids, step_pos, step_mask = ids, positions, mask
            for _ in range(max_new_tokens):
                tokens = await self._step(hops, step_ids, step_pos, step_mask)
                steps += 1
                if steps == 1:
                    ttft = time.perf_counter() - t0
                for row, tok in enumerate(tokens):
                    if not done[row]:
                        out[row].append(tok)
                        done[row] = tok in eos
                if on_tokens is not None:
                    on_tokens(tokens)
                if all(done):
                    break
                step_ids = [[t] for t in tokens]
                step_pos = [[p[-1] + 1] for p in step_pos]
                step_mask = [[1] for _ in range(batch)]
        decode_s = time.perf_counter() - t0 - ttft
        return GenerationResult(out, route, ttft, decode_s, steps)

    async def stream(
        self,
        model_id: str,
        prompt: Sequence[int],
        **kwargs: object,
    ) -> AsyncIterator[int]:
        """Yield the new token ids of one prompt as they arrive."""
        send, recv = trio.open_memory_channel[int](math.inf)

        async def run() -> None:
            async with send:
                await self.generate(
                    model_id, [prompt], on_tokens=lambda toks: send.send_nowait(toks[0]), **kwargs  # type: ignore[arg-type]
                )

        async with trio.open_nursery() as nursery:
            nursery.start_soon(run)
            async with recv:
                async for tok in recv:
                    yield tok

    @asynccontextmanager
    async def _open_chain(
        self, model_id: str, route: list[Hop], batch: int, max_length: int, sampling: SamplingParams
    ) -> AsyncIterator[list[_HopSession]]:
        hops: list[_HopSession] = []
        try:
            for hop in route:
                for addr in hop.addrs:
                    try:
                        await self.host.connect(addr)
                        break
                    except Exception as exc:  # noqa: BLE001 - try the next address
                        log.debug("dial %s failed: %s", addr, exc)
                stream = await self.host.open_stream(hop.peer_id, INFERENCE_PROTOCOL)
                await send_message(
                    stream,
                    OpenSession(model_id, hop.start, hop.end, max_length, batch, sampling),
                )
                reply = await recv_message(stream, STEP_TIMEOUT_S)
                opened = _expect(reply, SessionOpened, hop)
                hops.append(_HopSession(hop, stream, opened.session_id))
            yield hops
        finally:
            with trio.CancelScope(shield=True), trio.move_on_after(5):
                for h in hops:
                    try:
                        await send_message(h.stream, CloseSession())
                        await recv_message(h.stream, 5)
                        await h.stream.close()
                    except Exception:  # noqa: BLE001 - closing is best effort
                        await h.stream.reset()

    async def _step(
        self,
        hops: list[_HopSession],
        ids: list[list[int]],
        positions: list[list[int]],
        mask: list[list[int]],
    ) -> list[int]:
        pos_t = int64_tensor(positions)
        mask_t = int64_tensor(mask)
        payload: Tensor = int64_tensor(ids)
        for h in hops:
            await send_message(h.stream, Step(h.steps, payload, pos_t, mask_t))
            reply = await recv_message(h.stream, STEP_TIMEOUT_S)
            result = _expect(reply, StepResult, h.hop)
            if result.step != h.steps:
                raise InvalidMessage(f"{h.hop.peer_id} answered step {result.step}, expected {h.steps}")
            h.steps += 1
            payload = result.output
        return int64_values(payload)


def _expect(reply: object, cls: type, hop: Hop):  # type: ignore[no-untyped-def]
    if isinstance(reply, cls):
        return reply
    if isinstance(reply, Error):
        exc = reply.to_exception()
        raise type(exc)(f"peer {hop.peer_id} (layers {hop.start}:{hop.end}): {exc}")
    if reply is None:
        raise ShizaError(f"peer {hop.peer_id} closed the stream")
    raise InvalidMessage(f"peer {hop.peer_id} sent {type(reply).__name__}, expected {cls.__name__}")
