"""Node processes on this machine: the demo, the integration tests and the benchmarks use them.

Each node is a real ``shiza node run`` process with its own data directory; it is ready when
it has written ``node.json`` and stops gracefully on SIGTERM.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence


class NodeFailed(RuntimeError):
    pass


@dataclass
class NodeProcess:
    data_dir: Path
    proc: subprocess.Popen[bytes]
    log_path: Path
    info: dict[str, object] = field(default_factory=dict)
    terminated: bool = False

    @property
    def peer_id(self) -> str:
        return str(self.info["peer_id"])

    @property
    def addr(self) -> str:
        return str(self.info["addrs"][0])  # type: ignore[index]

    def log_tail(self, n: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    def wait_ready(self, timeout_s: float = 300.0) -> dict[str, object]:
        """Block until node.json exists (the node is serving), bounded by ``timeout_s``."""
        path = self.data_dir / "node.json"
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise NodeFailed(f"node exited with {self.proc.returncode}:\n{self.log_tail()}")
            if path.exists():
                self.info = json.loads(path.read_text())
                return self.info
            time.sleep(0.1)
        raise NodeFailed(f"node not ready after {timeout_s:.0f} s:\n{self.log_tail()}")

    def stop(self, timeout_s: float = 60.0) -> int:
        """SIGTERM (once), wait for the graceful exit; SIGKILL only past ``timeout_s``."""
        if self.proc.poll() is None:
            self.terminate()
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        return int(self.proc.returncode)

    def terminate(self) -> None:
        # A second SIGTERM could land after the node restored the default handler on its way out.
        if self.proc.poll() is None and not self.terminated:
            self.proc.send_signal(signal.SIGTERM)
            self.terminated = True

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


def start_node(
    data_dir: Path,
    *,
    model: str = "smollm2-135m",
    layers: tuple[int, int] | None = None,
    bootstrap: Sequence[str] = (),
    extra_args: Sequence[str] = (),
    env: dict[str, str] | None = None,
) -> NodeProcess:
    data_dir.mkdir(parents=True, exist_ok=True)
    stale = data_dir / "node.json"
    if stale.exists():
        stale.unlink()
    cmd = [sys.executable, "-m", "node", "-v", "node", "run", "--model", model, "--data-dir", str(data_dir)]
    if layers is not None:
        cmd += ["--layers", f"{layers[0]}:{layers[1]}"]
    for addr in bootstrap:
        cmd += ["--bootstrap", addr]
    cmd += list(extra_args)
    log_path = data_dir / "node.log"
    log_file = open(log_path, "wb")  # noqa: SIM115 - owned by the child for its lifetime
    full_env = {**os.environ, **(env or {})}
    # Several nodes share this machine's cores and take turns in a pipeline. OpenMP threads that
    # spin long after a step (libgomp's default) steal the next node's cores; threads that never
    # spin (OMP_WAIT_POLICY=PASSIVE) pay a wake-up at every operation of a forward. A short spin
    # keeps a forward's threads awake and lets them sleep right after it. Measured, one session
    # through 3 SmolLM2 nodes on 2 cores, one sitting: 15.7-16.0 tok/s with GOMP_SPINCOUNT of
    # 5,000-50,000, 13.1-14.5 PASSIVE, 13.3-15.4 default.
    if "OMP_WAIT_POLICY" not in full_env:
        full_env.setdefault("GOMP_SPINCOUNT", "20000")
    proc = subprocess.Popen(cmd, stdout=log_file, stderr=subprocess.STDOUT, env=full_env)
    log_file.close()
    return NodeProcess(data_dir, proc, log_path)


def start_chain(
    root: Path,
    spans: Sequence[tuple[int, int]],
    *,
    model: str = "smollm2-135m",
    extra_args: Sequence[str] = (),
    timeout_s: float = 300.0,
    metrics_ports: Sequence[int] | None = None,
    node_args: Sequence[Sequence[str]] | None = None,
) -> list[NodeProcess]:
    """Start one node per span; the first is the bootstrap of the others. Ready on return.
    With ``metrics_ports`` (one per span) node i serves its Prometheus metrics on port i;
    ``node_args`` (one list per span) are node i's own flags, after ``extra_args``."""
    if metrics_ports is not None and len(metrics_ports) != len(spans):
        raise ValueError("metrics_ports needs one port per span")

    def args_of(i: int) -> list[str]:
        own = ["--metrics-port", str(metrics_ports[i])] if metrics_ports is not None else []
        if node_args is not None:
            own += list(node_args[i])
        return [*extra_args, *own]

    nodes: list[NodeProcess] = []
    try:
        first = start_node(root / "node0", model=model, layers=spans[0], extra_args=args_of(0))
        nodes.append(first)
        first.wait_ready(timeout_s)
        for i, span in enumerate(spans[1:], start=1):
            nodes.append(start_node(root / f"node{i}", model=model, layers=span,
                                    bootstrap=[first.addr], extra_args=args_of(i)))
        for n in nodes[1:]:
            n.wait_ready(timeout_s)
    except BaseException:
        for n in nodes:
            n.kill()
        raise
    return nodes


def stop_all(nodes: Sequence[NodeProcess], timeout_s: float = 60.0) -> list[int]:
    """SIGTERM every node at once, then wait for each: shutdowns overlap."""
    for n in nodes:
        n.terminate()
    return [n.stop(timeout_s) for n in nodes]
