"""The serving path (node/serve) imports no torch: engines convert at their interface."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import node.serve

SERVE = Path(node.serve.__file__).parent


def test_importing_the_serving_path_loads_no_torch() -> None:
    code = ("import sys, node.serve.daemon, node.serve.server, node.serve.scheduler, "
            "node.serve.capacity, node.engine, node.engine.base, node.engine.faults; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'transformers')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_no_serving_module_reaches_for_torch_later() -> None:
    """Lazy imports inside functions do not show at import time: read the sources."""
    for path in SERVE.glob("*.py"):
        text = path.read_text()
        for needle in ("import torch", "node.engine.tensors", "node.engine.span import",
                       "node.engine.vllm"):
            if needle in text and path.name != "daemon.py":
                raise AssertionError(f"{path.name} uses {needle!r}")
    # The daemon only loads engines (inside the engine package, which may import torch).
    daemon = (SERVE / "daemon.py").read_text()
    assert "import torch" not in daemon and "node.engine.tensors" not in daemon
