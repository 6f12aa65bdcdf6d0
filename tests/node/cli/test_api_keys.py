"""API keys of the gateway (``shiza gateway`` and ``shiza node run --gateway-port``): besides the
command line (visible to every user in ``ps``) they come from a file that only the owner may
read, or from SHIZA_API_KEYS; an empty or unusable key is a usage error (one line, exit 2)
instead of a gateway that lets ``Authorization: Bearer `` in."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from node.cli.gateway import API_KEYS_ENV, ApiKeyError, read_api_keys
from node.cli.main import main

# A peer that is never dialled: the commands stop before opening the swarm client.
NOWHERE = "/ip4/127.0.0.1/tcp/9/p2p/12D3KooWDpJ7As7BWAwRMfu1VU2WCqNjvq387JEYKDBj4kx6nXTN"


def _key_file(path: Path, text: str, mode: int = 0o600) -> Path:
    path.write_text(text)
    os.chmod(path, mode)
    return path


def test_keys_from_flags_file_and_environment(tmp_path: Path) -> None:
    f = _key_file(tmp_path / "keys", "# the agents' keys\nk-file-1\n\n  k-file-2  \n")
    assert read_api_keys(["k-flag"], f, {API_KEYS_ENV: "k-env-1, k-env-2"}) == [
        "k-flag", "k-file-1", "k-file-2", "k-env-1", "k-env-2"]
    assert read_api_keys([], None, {}) == []  # no keys at all: an open gateway, as before
    assert read_api_keys(["same"], None, {API_KEYS_ENV: "same"}) == ["same"]


@pytest.mark.parametrize("flags, text, env, says", [
    ([""], None, {}, "empty"),
    (["  "], None, {}, "empty"),
    (["has space"], None, {}, "printable"),
    ([], "", {}, "no key"),
    ([], "# only a comment\n", {}, "no key"),
    ([], None, {API_KEYS_ENV: ""}, API_KEYS_ENV),
    ([], None, {API_KEYS_ENV: "a,,b"}, "empty"),
])
def test_unusable_keys_are_refused(tmp_path: Path, flags, text, env, says) -> None:
    f = _key_file(tmp_path / "keys", text) if text is not None else None
    with pytest.raises(ApiKeyError, match=says):
        read_api_keys(flags, f, env)


def test_a_key_file_readable_by_others_is_refused(tmp_path: Path) -> None:
    f = _key_file(tmp_path / "keys", "k1\n", 0o644)
    with pytest.raises(ApiKeyError, match="chmod 600"):
        read_api_keys([], f, {})
    with pytest.raises(ApiKeyError, match="cannot read"):
        read_api_keys([], tmp_path / "missing", {})


def _usage_error(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err  # one line
    return err


def test_gateway_with_an_empty_key_is_a_usage_error(tmp_path: Path, capsys, monkeypatch) -> None:
    monkeypatch.delenv(API_KEYS_ENV, raising=False)
    base = ["gateway", "--bootstrap", NOWHERE, "--model", str(tmp_path / "no-model")]
    assert "API key" in _usage_error([*base, "--api-key", ""], capsys)
    f = _key_file(tmp_path / "keys", "k1\n", 0o640)
    assert "chmod 600" in _usage_error([*base, "--api-key-file", str(f)], capsys)
    monkeypatch.setenv(API_KEYS_ENV, "")
    assert API_KEYS_ENV in _usage_error(base, capsys)


def test_node_run_with_an_empty_gateway_key_is_a_usage_error(tmp_path: Path, capsys, monkeypatch) -> None:
    monkeypatch.delenv(API_KEYS_ENV, raising=False)
    base = ["node", "run", "--model", str(tmp_path / "no-model"), "--data-dir", str(tmp_path / "d"),
            "--gateway-port", "0"]
    assert "API key" in _usage_error([*base, "--gateway-api-key", ""], capsys)
    f = _key_file(tmp_path / "keys", "k1\n", 0o604)
    assert "chmod 600" in _usage_error([*base, "--gateway-api-key-file", str(f)], capsys)
