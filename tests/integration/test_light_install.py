"""The light install (no torch, no transformers) runs ``shiza generate`` and ``shiza gateway``
against a real node, and they give the ids and text of the transformers path.

A node process (full environment) serves the tiny model, whose tokenizer and chat template are
SmolLM2's. The commands run in subprocesses where the node extra is unimportable
(tests/light_env.py); each one's exit report proves the blocker ran in it and that none of those
libraries was loaded. What they print is compared with the same command in the full
environment and with transformers itself: its tokenizer and chat template for the prompt ids,
one-process greedy decoding for the tokens, its decoder for the text.
"""

from __future__ import annotations

import json
import selectors
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from node.devtools.localswarm import NodeProcess, start_node
from node.engine.reference import reference_greedy
from node.engine.registry import load_tokenizer, resolve_model
from tests.light_env import light_env, read_report
from tests.polling import eventually_sync

ROOT = Path(__file__).resolve().parents[2]
PROMPT = "What is the capital of France?"
NEW_TOKENS = 8
EOS = 2  # SmolLM2's <|im_end|>


@dataclass(frozen=True)
class Expected:
    prompt_ids: list[int]
    token_ids: list[int]  # greedy, up to and including the first EOS
    text: str


def _expected(model_dir: Path, prompt_ids: list[int]) -> Expected:
    source = resolve_model(str(model_dir))
    greedy = reference_greedy(source, prompt_ids, NEW_TOKENS)
    tokens = greedy[: greedy.index(EOS) + 1] if EOS in greedy else greedy
    text = load_tokenizer(source).decode([t for t in tokens if t != EOS], skip_special_tokens=True)
    return Expected(prompt_ids, tokens, text)


@pytest.fixture(scope="module")
def transformers_chat(tiny_model: Path) -> Expected:
    tok = load_tokenizer(resolve_model(str(tiny_model)))
    text = tok.apply_chat_template([{"role": "user", "content": PROMPT}], add_generation_prompt=True,
                                   tokenize=False)
    return _expected(tiny_model, list(tok.encode(text, add_special_tokens=False)))


@pytest.fixture(scope="module")
def transformers_raw(tiny_model: Path) -> Expected:
    tok = load_tokenizer(resolve_model(str(tiny_model)))
    return _expected(tiny_model, list(tok.encode(PROMPT)))


@pytest.fixture(scope="module")
def node(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> NodeProcess:
    """One node process serving all six layers of the tiny model."""
    proc = start_node(tmp_path_factory.mktemp("light-node"), model=str(tiny_model), layers=(0, 6))
    try:
        proc.wait_ready(120)
    except BaseException:
        proc.kill()
        raise
    yield proc
    assert proc.stop() == 0


def _generate(node: NodeProcess, model_dir: Path, data_dir: Path, env: dict[str, str] | None,
              *extra: str) -> dict[str, object]:
    done = subprocess.run(
        [sys.executable, "-m", "node", "generate", "--json", "--model", str(model_dir),
         "--max-new-tokens", str(NEW_TOKENS), "--data-dir", str(data_dir),
         "--bootstrap", node.addr, *extra, PROMPT],
        env=env, cwd=ROOT, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_generate_on_the_light_install(node, tiny_model, tmp_path, transformers_chat, transformers_raw):
    full = _generate(node, tiny_model, tmp_path / "full", None)
    light = _generate(node, tiny_model, tmp_path / "light", light_env(tmp_path))
    assert read_report(tmp_path)["loaded"] == []
    for key in ("text", "prompt_token_ids", "token_ids", "model_id"):
        assert light[key] == full[key], key
    assert light["prompt_token_ids"] == transformers_chat.prompt_ids
    assert light["token_ids"] == transformers_chat.token_ids
    assert light["text"] == transformers_chat.text

    raw = _generate(node, tiny_model, tmp_path / "light", light_env(tmp_path), "--raw")
    assert read_report(tmp_path)["loaded"] == []
    assert raw["prompt_token_ids"] == transformers_raw.prompt_ids
    assert (raw["token_ids"], raw["text"]) == (transformers_raw.token_ids, transformers_raw.text)


def _ready_line(proc: subprocess.Popen[str], timeout_s: float) -> str:
    """The gateway's "gateway ready: URL ..." line, bounded in time."""
    assert proc.stdout is not None
    sel = selectors.DefaultSelector()
    sel.register(proc.stdout, selectors.EVENT_READ)
    deadline = time.monotonic() + timeout_s
    seen: list[str] = []
    while time.monotonic() < deadline:
        if sel.select(timeout=max(0.0, deadline - time.monotonic())):
            line = proc.stdout.readline()
            if not line:
                break  # the gateway exited
            seen.append(line)
            if line.startswith("gateway ready"):
                return line
    raise AssertionError(f"no 'gateway ready' line (exit {proc.poll()}):\n{''.join(seen)}")


def test_gateway_on_the_light_install(node, tiny_model, tmp_path, transformers_chat, transformers_raw):
    model_id = resolve_model(str(tiny_model)).model_id
    proc = subprocess.Popen(
        [sys.executable, "-m", "node", "gateway", "--port", "0", "--model", str(tiny_model),
         "--data-dir", str(tmp_path / "gw"), "--bootstrap", node.addr],
        env=light_env(tmp_path), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        base = _ready_line(proc, 120).split()[2]
        with httpx.Client(base_url=base, timeout=120) as http:
            eventually_sync(lambda: [m["id"] for m in http.get("/models").json()["data"]] == [model_id],
                            what="the gateway to see the model covered", timeout_s=60, interval_s=0.5)
            chat = http.post("/chat/completions", json={
                "model": model_id, "messages": [{"role": "user", "content": PROMPT}],
                "max_tokens": NEW_TOKENS, "temperature": 0})
            assert chat.status_code == 200, chat.text
            completion = http.post("/completions", json={
                "model": model_id, "prompt": PROMPT, "max_tokens": NEW_TOKENS, "temperature": 0})
            assert completion.status_code == 200, completion.text
    finally:
        proc.terminate()
        proc.wait(60)
    assert proc.returncode == 0
    assert read_report(tmp_path)["loaded"] == []

    body = chat.json()
    assert body["choices"][0]["message"]["content"] == transformers_chat.text
    assert (body["usage"]["prompt_tokens"], body["usage"]["completion_tokens"]) == (
        len(transformers_chat.prompt_ids), len(transformers_chat.token_ids))
    body = completion.json()
    assert body["choices"][0]["text"] == transformers_raw.text
    assert (body["usage"]["prompt_tokens"], body["usage"]["completion_tokens"]) == (
        len(transformers_raw.prompt_ids), len(transformers_raw.token_ids))
