"""The vLLM span worker's channel (node/engine/vllm/frames.py) on a real socket pair, how the
node finds vLLM's python, and the server command line it gives it."""

from __future__ import annotations

import socket
import stat
import struct

import pytest
import torch

from node.engine.vllm import frames
from node.engine.errors import EngineError
from node.engine.vllm.engine import VllmServer, default_vllm_python


def test_tensors_cross_as_their_bytes():
    a, b = socket.socketpair()
    with a, b:
        h = torch.randn(3, 5).to(torch.bfloat16)
        raw = h.view(torch.uint8).reshape(-1).numpy()
        ids = torch.arange(7)
        frames.send(a, {"op": "step", "reqs": [{"id": "r"}]},
                    [("h", "bfloat16", (3, 5), raw), ("ids", "int64", (7,), ids.numpy()), ("none", "float32", (0,), b"")])
        header, tensors = frames.recv(b)
    assert header == {"op": "step", "reqs": [{"id": "r"}]}
    dtype, shape, buf = tensors["h"]
    assert (dtype, shape) == ("bfloat16", (3, 5))
    assert torch.equal(torch.frombuffer(buf, dtype=torch.bfloat16).reshape(shape), h)
    assert torch.equal(torch.frombuffer(tensors["ids"][2], dtype=torch.int64), ids)
    assert tensors["none"] == ("float32", (0,), b"")


@pytest.mark.parametrize("raw, why", [
    (struct.pack("<II", frames.MAX_FRAME, 1), "exceeds"),
    (struct.pack("<II", 3, 0) + b"{x}", "does not parse"),
    (struct.pack("<II", 42, 0) + b'{"tensors":[["t","int64",[2],0,16]],"o":1}', "outside the frame body"),
    (struct.pack("<II", 10, 0) + b"{}", "closed"),  # a short read: the peer went away
])
def test_broken_frames_raise_frame_error(raw, why):
    a, b = socket.socketpair()
    with b:
        a.sendall(raw)
        a.close()
        with pytest.raises(frames.FrameError, match=why):
            frames.recv(b)


def test_vllm_python_from_the_environment(monkeypatch):
    monkeypatch.setenv("SHIZA_VLLM_PYTHON", "/opt/vllm/bin/python")
    assert default_vllm_python() == "/opt/vllm/bin/python"
    monkeypatch.delenv("SHIZA_VLLM_PYTHON")
    assert default_vllm_python() != "/opt/vllm/bin/python"


@pytest.mark.parametrize("eager", [False, True])
def test_eager_asks_vllm_to_skip_compiling(tmp_path, eager):
    """``--vllm-eager`` reaches vLLM's command line as --enforce-eager (and only then). A stand-in
    for vLLM's python writes the arguments it was given and exits, so the start fails."""
    argv_file = tmp_path / "argv.txt"
    fake = tmp_path / "python"
    fake.write_text("#!/bin/sh\n"
                    f"printf '%s\\n' \"$@\" > {argv_file}\n"
                    "echo '{\"server_pid\": 1}'\n")
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    server = VllmServer(tmp_path, vllm_python=str(fake), device="cuda", dtype="float32",
                        tensor_parallel=1, max_model_len=64, log_path=None, eager=eager)
    with pytest.raises(EngineError, match="exited"):
        server.start(timeout_s=30)
    args = argv_file.read_text().split()
    assert args[args.index("--") + 1:args.index("--") + 3] == ["--model", str(tmp_path)]
    assert ("--enforce-eager" in args) is eager


def test_a_vllm_of_another_version_is_refused_saying_which(tiny_llama, tmp_path, monkeypatch):
    """The span adapter patches vLLM's internals, so it starts only on the versions it was written
    for. A stand-in package ``vllm`` 0.31.0 (on the worker's path, under this python) must make
    the load fail with a message that names both versions."""
    import sys

    from node.engine.vllm.span import VllmSpanEngine

    stub = tmp_path / "stub" / "vllm"
    stub.mkdir(parents=True)
    (stub / "__init__.py").write_text('__version__ = "0.31.0"\n')
    monkeypatch.setenv("PYTHONPATH", str(stub.parent))
    with pytest.raises(EngineError, match=r"vLLM 0\.31\.0 is installed; .* 0\.32\.0, 0\.33\.0 only"):
        VllmSpanEngine.load(tiny_llama, 0, 2, vllm_python=sys.executable, log_path=None)
