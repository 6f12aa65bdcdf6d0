"""The ``shiza`` command behaves like the tools operators know (issue 21): a version, logging flags
on every subcommand, help with defaults and an example, and one line with a documented exit code
for every mistake, never a traceback. Through the real entry point (``.venv/bin/shiza``) where
the behaviour is the process's: its stderr and exit code."""

from __future__ import annotations

import errno
import json
import socket
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from node.cli.errors import EXIT_ADDRESS_IN_USE, EXIT_STORAGE, EXIT_USAGE, explain
from node.cli.main import build_parser
from node.engine.errors import EngineError

ROOT = Path(__file__).resolve().parents[3]
SHIZA = str(Path(sys.executable).with_name("shiza"))


def shiza(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([SHIZA, *args], capture_output=True, text=True, timeout=timeout)


def test_version_is_the_one_in_pyproject() -> None:
    declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    done = shiza("--version")
    assert done.returncode == 0 and done.stdout.strip() == f"shiza {declared}"


def test_logging_flags_go_before_or_after_the_subcommand() -> None:
    p = build_parser()
    assert p.parse_args(["-vv", "receipts", "list"]).verbose == 2
    assert p.parse_args(["receipts", "list", "-vv"]).verbose == 2  # on the nested subcommand too
    assert p.parse_args(["node", "run", "-v"]).verbose == 1
    after = p.parse_args(["--log-format", "json", "node", "run", "--log-level", "error"])
    assert (after.log_format, after.log_level, after.verbose) == ("json", "error", 0)
    assert p.parse_args(["demo"]).log_format == "text"


@pytest.mark.proc
def test_help_shows_defaults_and_an_example() -> None:
    done = shiza("node", "run", "--help")
    assert done.returncode == 0
    assert "(default: 8)" in done.stdout  # --peer-max-sessions
    assert "example:\n  shiza node run" in done.stdout
    top = shiza("--help").stdout
    assert "exit codes:" in top and "address or port is already in use" in top


def test_an_unknown_model_is_one_line_with_the_usage_code(tmp_path: Path) -> None:
    # Before: a 47-line exception-group traceback, exit code 1.
    done = shiza("node", "run", "--model", str(tmp_path / "no-such-model"), "--data-dir", str(tmp_path))
    assert done.returncode == EXIT_USAGE, done.stderr
    assert done.stderr.startswith("error: unknown model") and done.stderr.count("\n") == 1
    assert "Traceback" not in done.stderr


def test_vv_shows_the_traceback(tmp_path: Path) -> None:
    done = shiza("node", "run", "-vv", "--model", str(tmp_path / "no-such-model"), "--data-dir", str(tmp_path))
    assert done.returncode == EXIT_USAGE
    assert "Traceback" in done.stderr and done.stderr.rstrip().splitlines()[-1].startswith("error: unknown model")


def test_a_port_in_use_is_one_line_and_json_logs_are_json(tiny_llama, tmp_path: Path) -> None:
    # Before: py-libp2p logged the failed listener and the node served with no address at all.
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = shiza("node", "run", "--model", str(tiny_llama.path), "--data-dir", str(tmp_path),
                     "--listen", f"/ip4/127.0.0.1/tcp/{port}", "--no-direct", "--log-format", "json", "-v")
    assert done.returncode == EXIT_ADDRESS_IN_USE, done.stderr
    *logs, last = done.stderr.rstrip().splitlines()
    assert last.startswith("error: address already in use") and f"tcp/{port}" in last
    records = [json.loads(line) for line in logs]  # every log line is one JSON object
    assert records and all({"timestamp", "level", "logger", "message"} <= r.keys() for r in records)
    assert any(r["logger"] == "node.serve.daemon" and r["level"] == "INFO" for r in records)


def test_failures_are_explained_through_exception_groups() -> None:
    nested = ExceptionGroup("outer", [ExceptionGroup("inner", [EngineError("unknown model 'x'")])])
    assert explain(nested) == (EXIT_USAGE, "unknown model 'x'")
    code, text = explain(OSError(errno.ENOSPC, "No space left on device", "/data/model.safetensors"))
    assert code == EXIT_STORAGE and text.startswith("disk full (/data/model.safetensors)")
    assert explain(OSError(errno.EADDRINUSE, "Address already in use"))[0] == EXIT_ADDRESS_IN_USE
    code, text = explain(RuntimeError("boom"))
    assert code == 1 and "internal error: RuntimeError: boom" in text and "-vv" in text


@pytest.mark.parametrize("argv", [["node", "run", "--layers", "5:2"], ["node", "run", "--bogus"],
                                  ["generate", "--speculate", "medusa", "hi"],
                                  ["gateway", "--speculate", "medusa"]])
def test_a_bad_flag_is_a_usage_error(argv: list[str]) -> None:
    done = shiza(*argv)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    last = done.stderr.rstrip().splitlines()[-1]
    assert last.startswith(("shiza node run: error:", "shiza generate: error:", "shiza gateway: error:",
                            "shiza: error:")), last


@pytest.mark.proc
def test_swarm_key_new_writes_a_private_key_once(tmp_path: Path) -> None:
    from node.net.admission import SwarmKey

    path = tmp_path / "swarm.key"
    done = shiza("swarm-key", "new", str(path))
    assert done.returncode == 0, done.stderr
    assert path.stat().st_mode & 0o777 == 0o600
    assert f"swarm id {SwarmKey.load(path).swarm_id}" in done.stdout
    before = path.read_bytes()
    again = shiza("swarm-key", "new", str(path))
    assert again.returncode == 2 and again.stderr.startswith("error: ") and "refusing to overwrite" in again.stderr
    assert path.read_bytes() == before


@pytest.mark.proc
def test_a_missing_or_corrupt_ledger_is_one_line(tmp_path: Path) -> None:
    missing = shiza("receipts", "list", "--data-dir", str(tmp_path))
    assert missing.returncode == EXIT_USAGE and missing.stderr.startswith("error: no ledger at")
    (tmp_path / "ledger.sqlite").write_bytes(b"not a database" * 100)
    corrupt = shiza("receipts", "list", "--data-dir", str(tmp_path))
    assert corrupt.returncode == EXIT_STORAGE, corrupt.stderr
    assert corrupt.stderr.startswith("error: ") and corrupt.stderr.count("\n") == 1
    assert (tmp_path / "ledger.sqlite").read_bytes() == b"not a database" * 100  # reported, not touched


@pytest.mark.proc
def test_an_unreachable_bootstrap_peer_is_a_network_error(tmp_path: Path, tiny_llama) -> None:
    with socket.socket() as closed:  # a port nothing listens on
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
    peer = "12D3KooWDpJ7As7BWAwRMfu1VU2WCqNjvq387JEYKDBj4kx6nXTN"
    done = shiza("generate", "--model", str(tiny_llama.path), "--data-dir", str(tmp_path), "--log-level", "error",
                 "--bootstrap", f"/ip4/127.0.0.1/tcp/{port}/p2p/{peer}", "hello")
    assert done.returncode == 3, done.stderr
    assert done.stderr.startswith("error: cannot connect: none of the 1 bootstrap peer(s) answered")
    assert done.stderr.count("\n") == 1  # py-libp2p's dial errors no longer flood stderr


def test_a_corrupt_checkpoint_is_one_line(tmp_path: Path, tiny_llama) -> None:
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(tiny_llama.path, broken)
    for cached in broken.glob(".shiza-model-id*"):
        cached.unlink()  # as a fresh cache would be
    weights = next(broken.glob("*.safetensors"))
    with open(weights, "r+b") as f:
        f.truncate(weights.stat().st_size // 2)
    done = shiza("model", "prepare", str(broken))
    assert done.returncode == EXIT_USAGE and done.stderr.count("\n") == 1, done.stderr
    assert done.stderr.startswith(f"error: {weights}") and "truncated" in done.stderr
