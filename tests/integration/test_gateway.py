"""The OpenAI-compatible gateway, driven by the official ``openai`` package, in front of three
real node processes serving the tiny model (which has SmolLM2's tokenizer and chat template)."""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
import time
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, AsyncIterator, Callable

import httpx
import openai
import trio

from tests.polling import eventually
from node.client.swarm import SwarmClient
from node.engine.testing import make_tiny_model
from node.http.gateway import serve_gateway
from node.client.textgen import TextModel, generate_text

PROMPT = "What is the capital of France?"


@functools.cache
def _model(spec: str) -> TextModel:
    return TextModel.load(spec)


async def _in_thread(fn: Callable[[], Any]) -> Any:
    return await trio.to_thread.run_sync(fn)


@asynccontextmanager
async def open_gateway(swarm, model_dir: Path, data_dir: Path, api_keys=()) -> AsyncIterator[tuple[SwarmClient, str, TextModel]]:
    """A gateway served in this test's nursery: (its swarm client, base_url, model)."""
    model = _model(str(model_dir))
    async with SwarmClient.open([swarm[0].addr], data_dir=data_dir) as client:
        await client.wait_for_route(model.model_id, 60, num_layers=model.num_layers)
        async with trio.open_nursery() as nursery:
            port = await nursery.start(functools.partial(serve_gateway, client, [model], port=0, api_keys=api_keys))
            yield client, f"http://127.0.0.1:{port}/v1", model
            nursery.cancel_scope.cancel()


def _oa(base_url: str, key: str = "none") -> openai.OpenAI:
    return openai.OpenAI(base_url=base_url, api_key=key, max_retries=0, timeout=120)


async def test_models_and_chat_equal_generate_cli(tiny_swarm, tiny_model, tmp_path):
    async with open_gateway(tiny_swarm, tiny_model, tmp_path / "gw") as (client, base, model):
        oa = _oa(base)
        listed = await _in_thread(lambda: oa.models.list())
        assert [m.id for m in listed.data] == [model.model_id]
        assert "@" in model.model_id
        settings = {"max_tokens": 12, "temperature": 0.7, "top_p": 0.9, "seed": 5}
        cli = await _in_thread(lambda: subprocess.run(
            [sys.executable, "-m", "node", "generate", "--json", "--model", str(tiny_model),
             "--max-new-tokens", "12", "--temperature", "0.7", "--top-p", "0.9", "--seed", "5",
             "--data-dir", str(tmp_path / "cli"), "--bootstrap", tiny_swarm[1].addr, PROMPT],
            capture_output=True, text=True, timeout=180))
        assert cli.returncode == 0, cli.stderr
        expected = json.loads(cli.stdout.strip().splitlines()[-1])
        short = model.model_id.split("@")[0]
        messages = [{"role": "user", "content": PROMPT}]

        raw = await _in_thread(lambda: oa.chat.completions.with_raw_response.create(
            model=short, messages=messages, **settings))
        resp = raw.parse()
        assert resp.object == "chat.completion" and resp.model == model.model_id
        assert resp.choices[0].message.role == "assistant"
        assert resp.choices[0].message.content == expected["text"]
        ended = expected["token_ids"][-1] in model.eos_token_ids
        assert resp.choices[0].finish_reason == ("stop" if ended else "length")
        assert (resp.usage.prompt_tokens, resp.usage.completion_tokens) == (
            len(expected["prompt_token_ids"]), len(expected["token_ids"]))
        assert resp.usage.total_tokens == resp.usage.prompt_tokens + resp.usage.completion_tokens
        receipt_ids = raw.headers["x-shiza-receipts"].split(",")
        entries = {e.receipt_id: e for e in client.ledger.entries()}
        assert receipt_ids and set(receipt_ids) <= set(entries)
        finals = [entries[r] for r in receipt_ids if entries[r].final]
        assert {e.server for e in finals} == {n.peer_id for n in tiny_swarm}
        assert all(e.status == "countersigned" for e in finals)

        chunks = await _in_thread(lambda: list(oa.chat.completions.create(
            model=model.model_id, messages=messages, stream=True, stream_options={"include_usage": True},
            **settings)))
        assert all(c.object == "chat.completion.chunk" for c in chunks)
        assert chunks[0].choices[0].delta.role == "assistant"
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == expected["text"]
        assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == resp.choices[0].finish_reason
        assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == len(expected["token_ids"])


async def test_completions_and_stop_sequences(tiny_swarm, tiny_model, tmp_path):
    prompt = "The capital of France is"
    async with open_gateway(tiny_swarm, tiny_model, tmp_path / "gw") as (client, base, model):
        oa = _oa(base)
        reference, prompt_ids, _ = await generate_text(client, model, prompt, raw=True, max_new_tokens=10)
        resp = await _in_thread(lambda: oa.completions.create(model=model.model_id, prompt=prompt,
                                                               max_tokens=10, temperature=0))
        assert resp.object == "text_completion"
        assert resp.choices[0].text == reference and resp.usage.prompt_tokens == len(prompt_ids)
        chunks = await _in_thread(lambda: list(oa.completions.create(
            model=model.model_id, prompt=prompt, max_tokens=10, temperature=0, stream=True)))
        assert "".join(c.choices[0].text for c in chunks) == reference

        assert len(reference) >= 6, reference
        k = len(reference) // 2
        stop = reference[k:k + 2]
        cut = reference[:reference.find(stop)]
        resp = await _in_thread(lambda: oa.completions.create(model=model.model_id, prompt=prompt, max_tokens=10,
                                                               temperature=0, stop=[stop, "\x00never"]))
        assert resp.choices[0].text == cut and resp.choices[0].finish_reason == "stop"
        assert resp.usage.completion_tokens <= 10
        chunks = await _in_thread(lambda: list(oa.completions.create(
            model=model.model_id, prompt=prompt, max_tokens=10, temperature=0, stop=stop, stream=True)))
        assert "".join(c.choices[0].text for c in chunks) == cut
        assert chunks[-1].choices[0].finish_reason == "stop"


async def test_error_statuses(tiny_swarm, tiny_model, tmp_path):
    async with open_gateway(tiny_swarm, tiny_model, tmp_path / "gw", api_keys=["k1"]) as (_, base, model):
        good, bad = _oa(base, "k1"), _oa(base, "wrong")
        chat = functools.partial(good.chat.completions.create, model=model.model_id,
                                 messages=[{"role": "user", "content": "hi"}])

        async def status_of(fn: Callable[[], Any]) -> openai.APIStatusError:
            try:
                await _in_thread(fn)
            except openai.APIStatusError as exc:
                return exc
            raise AssertionError("no error")

        err = await status_of(lambda: bad.models.list())
        assert err.status_code == 401 and err.code == "invalid_api_key"
        err = await status_of(lambda: chat(model="no-such-model"))
        assert err.status_code == 404 and err.code == "model_not_found" and err.param == "model"
        err = await status_of(lambda: chat(n=9))
        assert err.status_code == 400 and err.param == "n"
        err = await status_of(lambda: chat(max_tokens=-1))
        assert err.status_code == 400 and err.param == "max_tokens"
        err = await status_of(lambda: chat(temperature=7))
        assert err.status_code == 400 and err.param == "temperature"
        async with httpx.AsyncClient(base_url=base, headers={"authorization": "Bearer k1"}) as http:
            r = await http.post("/chat/completions", content=b"{not json")
            assert r.status_code == 400
            assert set(r.json()["error"]) == {"message", "type", "param", "code"}
            r = await http.post("/chat/completions", json={"model": model.model_id})
            assert r.status_code == 400 and r.json()["error"]["param"] == "messages"


async def test_cli_gateway_without_coverage_answers_503(tiny_swarm, tmp_path):
    """Also: the CLI takes its API keys from a file and from SHIZA_API_KEYS (not only ``ps``)."""
    other = make_tiny_model(tmp_path / "other", seed=5, num_layers=4)  # a model nobody serves
    keys = tmp_path / "keys"
    keys.write_text("k-file\n")
    keys.chmod(0o600)
    proc = subprocess.Popen(
        [sys.executable, "-m", "node", "gateway", "--port", "0", "--model", str(other),
         "--data-dir", str(tmp_path / "gw"), "--bootstrap", tiny_swarm[0].addr, "--api-key-file", str(keys)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        env={**os.environ, "SHIZA_API_KEYS": "k-env"})
    try:
        line = ""
        with trio.fail_after(120):
            while "gateway ready" not in line:
                line = await _in_thread(proc.stdout.readline)
                assert line or proc.poll() is None, "the gateway exited"
        base = line.split()[2]
        async with httpx.AsyncClient(base_url=base) as http:
            for auth in ("Bearer none", "Bearer", ""):
                assert (await http.get("/models", headers={"authorization": auth})).status_code == 401
        assert (await _in_thread(lambda: _oa(base, "k-env").models.list())).data == []
        oa = _oa(base, "k-file")
        assert (await _in_thread(lambda: oa.models.list())).data == []
        try:
            await _in_thread(lambda: oa.chat.completions.create(
                model=_model(str(other)).model_id, messages=[{"role": "user", "content": "hi"}], max_tokens=4))
            raise AssertionError("no error")
        except openai.APIStatusError as exc:
            assert exc.status_code == 503 and exc.code == "no_coverage"
            assert int(exc.response.headers["retry-after"]) > 0
    finally:
        proc.terminate()
        await _in_thread(lambda: proc.wait(30))
    assert proc.returncode == 0


async def test_disconnect_mid_stream_closes_sessions(tiny_swarm, tiny_model, tmp_path):
    max_tokens = 400
    async with open_gateway(tiny_swarm, tiny_model, tmp_path / "gw") as (client, base, model):

        def read_a_few_then_close() -> list[str]:
            body = {"model": model.model_id, "prompt": "Once upon a time", "max_tokens": max_tokens,
                    "temperature": 0, "stream": True}
            seen: list[str] = []
            with httpx.Client(timeout=60) as http, http.stream("POST", f"{base}/completions", json=body) as r:
                assert r.status_code == 200
                for line in r.iter_lines():
                    if line.startswith("data: "):
                        seen.append(line)
                    if len(seen) == 3:
                        break  # leaving the block closes the connection mid-stream
            return seen

        seen = await _in_thread(read_a_few_then_close)
        assert "data: [DONE]" not in seen
        closed_at = time.monotonic()
        finals = await eventually(lambda: f if len(f := [e for e in client.ledger.entries() if e.final]) >= 3
                                  else None,
                                  timeout_s=20, interval_s=0.05, what="the final receipts of all three hops")
        assert time.monotonic() - closed_at < 20
        assert {e.server for e in finals} == {n.peer_id for n in tiny_swarm}
        # The receipts record the work done: fewer tokens than the request allowed.
        assert all(0 < e.decode_tokens < max_tokens - 1 for e in finals), [e.decode_tokens for e in finals]
        assert len({e.decode_tokens for e in finals}) == 1
