"""The OpenAI-compatible gateway as an ASGI app (httpx's ASGITransport) in front of an in-process
swarm (tests/node/client/inproc.py): responses, streaming, receipts and the error mapping, with
no HTTP server, no node process and no libp2p."""

from __future__ import annotations

import json
from contextlib import asynccontextmanager
from typing import AsyncIterator

import httpx
import pytest

from node.client.textgen import TextModel
from node.http.gateway import Gateway
from node.serve.limits import PeerLimits
from node.serve.server import ServerLimits

from tests.node.client.inproc import open_swarm, reference

PROMPT_IDS = [1, 504, 3458, 282, 4649, 314]


@pytest.fixture(scope="module")
def text_model(tiny_llama) -> TextModel:
    return TextModel.load(str(tiny_llama.path))


@asynccontextmanager
async def gateway(swarm, model: TextModel, api_keys=()) -> AsyncIterator[tuple[httpx.AsyncClient, object]]:
    client = swarm.client("gateway")
    transport = httpx.ASGITransport(app=Gateway(client, [model], api_keys))
    async with httpx.AsyncClient(transport=transport, base_url="http://gateway", timeout=60) as http:
        yield http, client


def _completion(model: TextModel, **extra) -> dict:
    return {"model": model.model_id, "prompt": PROMPT_IDS, "max_tokens": 6, "temperature": 0, **extra}


def _expected_text(tiny_llama, model: TextModel, n: int) -> str:
    ids = reference(tiny_llama, PROMPT_IDS, n)
    return model.decode([t for t in ids if t not in model.eos_token_ids])


async def test_models_are_listed_while_the_swarm_covers_them(tiny_llama, text_model):
    async with open_swarm(tiny_llama, [(0, 3), (3, 6)]) as swarm:
        async with gateway(swarm, text_model) as (http, _):
            listed = (await http.get("/v1/models")).json()
            assert [m["id"] for m in listed["data"]] == [text_model.model_id]
            short = text_model.model_id.split("@")[0]
            card = await http.get(f"/v1/models/{short}")
            assert card.status_code == 200 and card.json()["id"] == text_model.model_id
    async with open_swarm(tiny_llama, [(0, 3)]) as swarm:  # layers 3:6 missing
        async with gateway(swarm, text_model) as (http, _):
            assert (await http.get("/v1/models")).json()["data"] == []


async def test_a_completion_is_the_reference_text_with_its_receipts(tiny_llama, text_model):
    async with open_swarm(tiny_llama, [(0, 3), (3, 6)]) as swarm:
        async with gateway(swarm, text_model) as (http, client):
            resp = await http.post("/v1/completions", json=_completion(text_model))
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert body["object"] == "text_completion" and body["model"] == text_model.model_id
    assert body["choices"][0]["text"] == _expected_text(tiny_llama, text_model, 6)
    assert body["usage"] == {"prompt_tokens": len(PROMPT_IDS), "completion_tokens": 6,
                             "total_tokens": len(PROMPT_IDS) + 6}
    receipts = resp.headers["x-shiza-receipts"].split(",")
    assert len(receipts) == 2 and all(len(r) == 32 for r in receipts)  # one final receipt per hop


async def test_a_streamed_completion_says_the_same_and_ends_with_receipts_and_done(tiny_llama, text_model):
    async with open_swarm(tiny_llama, [(0, 6)]) as swarm:
        async with gateway(swarm, text_model) as (http, _):
            resp = await http.post("/v1/completions", json=_completion(text_model, stream=True))
    assert resp.status_code == 200 and resp.headers["content-type"].startswith("text/event-stream")
    events = [e for e in resp.text.split("\n\n") if e]
    assert events[-1] == "data: [DONE]" and events[-2].startswith(": x-shiza-receipts ")
    chunks = [json.loads(e[len("data: "):]) for e in events[:-2]]
    assert "".join(c["choices"][0]["text"] for c in chunks) == _expected_text(tiny_llama, text_model, 6)
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"


async def _post_status(swarm, model: TextModel) -> tuple[int, dict, httpx.Headers]:
    async with gateway(swarm, model) as (http, _):
        resp = await http.post("/v1/completions", json=_completion(model))
    return resp.status_code, resp.json()["error"], resp.headers


async def test_no_coverage_is_503_with_retry_after(tiny_llama, text_model):
    async with open_swarm(tiny_llama, [(0, 3)]) as swarm:
        status, error, headers = await _post_status(swarm, text_model)
    assert (status, error["code"]) == (503, "no_coverage") and "3:6" in error["message"]
    assert headers["retry-after"].isdigit()


@pytest.mark.proc
async def test_a_busy_peer_is_503_busy(tiny_llama, text_model):
    async with open_swarm(tiny_llama, [(0, 6)], limits=ServerLimits(max_sessions=0)) as swarm:
        status, error, _ = await _post_status(swarm, text_model)
    assert (status, error["code"], error["type"]) == (503, "busy", "service_unavailable")


async def test_many_concurrent_requests_beyond_a_peers_share_all_complete_and_nobody_is_banned(
        tiny_llama, text_model):
    # Before: every open past a peer's 2 sessions was a strike; three earned the gateway a ban and
    # most requests failed (503 or 502). Now they wait their turn (the node's queue, the client's
    # Busy retries and per-peer pacing) and all complete.
    import trio

    limits = ServerLimits(peer=PeerLimits(max_sessions=2, strikes_to_ban=3))
    async with open_swarm(tiny_llama, [(0, 3), (3, 6)], limits=limits) as swarm:
        async with gateway(swarm, text_model) as (http, _):
            statuses: list[int] = []

            async def one() -> None:
                statuses.append((await http.post("/v1/completions", json=_completion(text_model))).status_code)

            async with trio.open_nursery() as nursery:
                for _ in range(8):
                    nursery.start_soon(one)
        for node in swarm.nodes:
            assert (node.server.peers.strikes_total, node.server.peers.bans_total) == (0, 0)
    assert statuses == [200] * 8


async def test_a_peer_that_refuses_otherwise_is_502(tiny_llama, text_model):
    async with open_swarm(tiny_llama, [(0, 6)], limits=ServerLimits(allow_peers=frozenset())) as swarm:
        status, error, _ = await _post_status(swarm, text_model)
    assert (status, error["code"], error["type"]) == (502, "peer_error", "api_error")
    assert "allow list" in error["message"]


async def test_requests_the_gateway_itself_refuses(tiny_llama, text_model):
    async with open_swarm(tiny_llama, [(0, 6)]) as swarm:
        async with gateway(swarm, text_model, api_keys=["sesame"]) as (http, _):
            assert (await http.get("/v1/models")).status_code == 401
            auth = {"Authorization": "Bearer sesame"}
            unknown = await http.post("/v1/completions", headers=auth, json={"model": "nope", "prompt": "x"})
            assert (unknown.status_code, unknown.json()["error"]["code"]) == (404, "model_not_found")
            bad = await http.post("/v1/completions", headers=auth, content=b"{not json")
            assert (bad.status_code, bad.json()["error"]["code"]) == (400, "invalid_json")
        assert swarm.net.streams_opened == 0  # none of these reached a peer


async def test_a_stop_beyond_the_bounds_is_400_before_any_peer(tiny_llama, text_model):
    async with open_swarm(tiny_llama, [(0, 6)]) as swarm:
        async with gateway(swarm, text_model) as (http, _):
            long = await http.post("/v1/completions", json=_completion(text_model, stop="x" * 257))
            many = await http.post("/v1/completions", json=_completion(text_model, stop=list("abcde")))
        assert swarm.net.streams_opened == 0  # refused while parsing
    for resp in (long, many):
        assert resp.status_code == 400, resp.text
        error = resp.json()["error"]
        assert set(error) == {"message", "type", "param", "code"} and error["param"] == "stop"


async def test_an_empty_api_key_is_refused_not_accepted(tiny_llama, text_model):
    async with open_swarm(tiny_llama, [(0, 6)]) as swarm:
        with pytest.raises(ValueError, match="empty"):
            Gateway(swarm.client("gateway"), [text_model], ["k1", " "])
