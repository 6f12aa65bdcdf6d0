"""``--config node.toml``, ``SHIZA_*`` and ``--print-config`` (issue 21), through the real parser
and, for what the process prints, the real ``shiza`` entry point."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from node.cli.main import _parse, build_parser

SHIZA = str(Path(sys.executable).with_name("shiza"))
PEER = "/ip4/10.0.0.1/tcp/4100/p2p/12D3KooWDpJ7As7BWAwRMfu1VU2WCqNjvq387JEYKDBj4kx6nXTN"
OTHER = "/ip4/10.0.0.2/tcp/4100/p2p/12D3KooWDpJ7As7BWAwRMfu1VU2WCqNjvq387JEYKDBj4kx6nXTN"


def parse(argv: list[str], monkeypatch: pytest.MonkeyPatch, env: dict[str, str] | None = None):
    for name in ("SHIZA_HOME", "SHIZA_BOOTSTRAP", "SHIZA_MODEL", "SHIZA_LISTEN", "SHIZA_SWARM_KEY",
                 "SHIZA_LOG_LEVEL", "SHIZA_LOG_FORMAT"):
        monkeypatch.delenv(name, raising=False)
    for name, value in (env or {}).items():
        monkeypatch.setenv(name, value)
    return _parse(build_parser(), argv)


def test_file_then_environment_then_flags(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = tmp_path / "node.toml"
    config.write_text(f'peer-max-sessions = 16\nbootstrap = ["{PEER}"]\nno_direct = true\n'
                      'layers = "0:10"\nlisten = "/ip4/0.0.0.0/tcp/4100"\n')
    args = parse(["node", "run", "--config", str(config)], monkeypatch)
    assert (args.peer_max_sessions, args.bootstrap, args.no_direct, args.layers) == (16, [PEER], True, (0, 10))
    args = parse(["node", "run", "--config", str(config)], monkeypatch,
                 {"SHIZA_LISTEN": "/ip4/0.0.0.0/tcp/4200", "SHIZA_HOME": str(tmp_path / "home")})
    assert args.listen == "/ip4/0.0.0.0/tcp/4200" and args.data_dir == tmp_path / "home"
    args = parse(["node", "run", "--config", str(config), "--peer-max-sessions", "4", "--bootstrap", OTHER,
                  "--listen", "/ip4/127.0.0.1/tcp/0"], monkeypatch, {"SHIZA_LISTEN": "/ip4/0.0.0.0/tcp/4200"})
    assert (args.peer_max_sessions, args.bootstrap, args.listen) == (4, [OTHER], "/ip4/127.0.0.1/tcp/0")


def test_bootstrap_peers_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    args = parse(["gateway"], monkeypatch, {"SHIZA_BOOTSTRAP": f"{PEER}, {OTHER}"})
    assert args.bootstrap == [PEER, OTHER]


@pytest.mark.parametrize("text, says", [
    ("bogus = 1\n", "unknown key 'bogus'"),
    ('layers = "9:2"\n', "layers: need 0 <= START < END"),
    ('peer-max-sessions = "many"\n', "peer-max-sessions: invalid int value"),
    ("no-direct = 3\n", "no-direct: must be true or false"),
    ('device = "tpu"\n', "device: must be one of cpu, cuda"),
    ("listen = [\n", "not valid TOML"),
])
def test_a_bad_file_is_one_line_naming_the_key(tmp_path: Path, text: str, says: str) -> None:
    config = tmp_path / "node.toml"
    config.write_text(text)
    done = subprocess.run([SHIZA, "node", "run", "--config", str(config)], capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 2 and done.stderr.startswith(f"error: {config}") and says in done.stderr, done.stderr
    assert done.stderr.count("\n") == 1


def test_an_unreadable_file_is_a_usage_error(tmp_path: Path) -> None:
    done = subprocess.run([SHIZA, "gateway", "--config", str(tmp_path / "missing.toml")],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and done.stderr.startswith("error: cannot read config file")


def test_print_config_round_trips_and_hides_keys(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    argv = ["node", "run", "--layers", "3:9", "--bootstrap", PEER, "--peer-max-sessions", "12",
            "--no-direct", "--data-dir", str(tmp_path), "--gateway-api-key", "sk-secret-value"]
    done = subprocess.run([SHIZA, *argv, "--print-config"], capture_output=True, text=True, timeout=60,
                          env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)})
    assert done.returncode == 0, done.stderr
    assert "sk-secret-value" not in done.stdout and "# gateway-api-key = (1 given; not shown)" in done.stdout
    printed = tmp_path / "printed.toml"
    printed.write_text(done.stdout)
    direct, again = parse(argv, monkeypatch), parse(["node", "run", "--config", str(printed)], monkeypatch)
    for key, value in vars(direct).items():
        if key not in ("config", "gateway_api_key"):
            assert getattr(again, key) == value, key


def test_the_example_config_in_deploy_is_valid(monkeypatch: pytest.MonkeyPatch) -> None:
    example = Path(__file__).resolve().parents[3] / "deploy" / "node.example.toml"
    args = parse(["node", "run", "--config", str(example)], monkeypatch)
    # The ports the Dockerfiles, compose, k8s and the systemd unit open.
    assert (args.listen, args.direct_port, args.device) == ("/ip4/0.0.0.0/tcp/4001", 4002, "cuda")
    assert args.data_dir == Path("/var/lib/shiza-node") and args.log_format == "json"


def test_node_wide_limit_flags_reach_the_server_limits(monkeypatch: pytest.MonkeyPatch) -> None:
    from node.cli.node_run import apply_limit_args
    from node.serve.daemon import NodeConfig
    from node.serve.server import ServerLimits

    assert parse(["node", "run"], monkeypatch).max_sessions == ServerLimits().max_sessions
    args = parse(["node", "run", "--max-sessions", "12", "--open-queue-s", "0.5", "--new-peers-per-s", "4"],
                 monkeypatch)
    cfg = NodeConfig()
    apply_limit_args(cfg, args)
    assert cfg.limits.max_sessions == 12
    assert (cfg.limits.shares.queue_wait_s, cfg.limits.shares.new_peers_per_s) == (0.5, 4.0)
