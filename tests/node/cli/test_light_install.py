"""The client commands on the light install (no torch, no transformers): their modules import
without the engine's libraries, a prepared model needs none, and a missing one is one line."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from node.cli import model as model_cmd
from node.models import DEFAULT_MODEL, ModelNotPrepared, ModelSource
from tests.light_env import BLOCKED, light_env, read_report

ROOT = Path(__file__).resolve().parents[3]
CLIENT_MODULES = ("node.models", "node.client", "node.client.textgen", "node.http.gateway",
                  "node.cli.generate", "node.cli.gateway", "node.cli.model")
# A peer that is never dialled: these commands stop before opening the swarm client.
NOWHERE = "/ip4/127.0.0.1/tcp/9/p2p/12D3KooWDpJ7As7BWAwRMfu1VU2WCqNjvq387JEYKDBj4kx6nXTN"


def _shiza(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "node", *args], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=120)


def test_client_modules_leave_torch_and_transformers_out() -> None:
    """In the full environment: importing the client side loads none of the engine's libraries."""
    code = (f"import importlib, json, sys\nfor m in {CLIENT_MODULES!r}: importlib.import_module(m)\n"
            f"print(json.dumps(sorted(m for m in sys.modules if m.partition('.')[0] in {BLOCKED!r})))")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == []


def test_the_blocker_takes_effect(tmp_path: Path) -> None:
    done = subprocess.run([sys.executable, "-c", "import torch"], env=light_env(tmp_path),
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode != 0 and "light install" in done.stderr
    assert read_report(tmp_path) == {"tried": ["torch"], "loaded": []}


def test_model_prepare_reads_a_checkpoint_without_torch(tiny_llama: ModelSource, tmp_path: Path) -> None:
    done = _shiza(["model", "prepare", str(tiny_llama.path)], light_env(tmp_path))
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == {"model_id": tiny_llama.model_id, "path": str(tiny_llama.path),
                                       "num_layers": 6}
    assert read_report(tmp_path)["loaded"] == []


@pytest.mark.parametrize("command", [
    ["model", "prepare"],
    ["generate", "--bootstrap", NOWHERE, "hello"],
    ["gateway", "--port", "0", "--bootstrap", NOWHERE],
], ids=["model-prepare", "generate", "gateway"])
def test_unprepared_default_model_is_one_line_saying_what_to_do(tmp_path: Path, command: list[str]) -> None:
    env = {**light_env(tmp_path), "SHIZA_CACHE": str(tmp_path / "empty-cache"),
           "SHIZA_HOME": str(tmp_path / "home")}
    done = _shiza(command, env)
    assert done.returncode == 2
    assert "Traceback" not in done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ")
    assert f"{DEFAULT_MODEL} is not prepared" in lines[0]
    assert "shiza model prepare" in lines[0] and ".[node]" in lines[0]
    assert read_report(tmp_path)["loaded"] == []


# --- prepare(): convert where the node extra is installed, else the same one-line error ------

def test_prepare_converts_where_the_engine_can(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                               tiny_llama: ModelSource) -> None:
    from node.engine import registry

    monkeypatch.setenv("SHIZA_CACHE", str(tmp_path))
    calls: list[str] = []
    monkeypatch.setattr(registry, "can_convert", lambda: True)
    monkeypatch.setattr(registry, "resolve_model",
                        lambda spec, progress=True: calls.append(spec) or tiny_llama)
    assert model_cmd.prepare(DEFAULT_MODEL) is tiny_llama
    assert calls == [DEFAULT_MODEL]
    monkeypatch.setattr(registry, "can_convert", lambda: False)
    with pytest.raises(ModelNotPrepared):
        model_cmd.prepare(DEFAULT_MODEL)
    assert calls == [DEFAULT_MODEL]
    # An existing checkpoint never goes near the engine.
    assert model_cmd.prepare(str(tiny_llama.path)) == tiny_llama and calls == [DEFAULT_MODEL]
