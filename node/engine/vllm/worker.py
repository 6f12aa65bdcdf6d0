"""Supervisor of one vLLM OpenAI-compatible server: ``python worker.py -- SERVER ARGS``.

Standard library only: it runs under the vLLM venv's python (whose torch differs from the
node's), started by ``VllmEngine`` in a process group of its own. It starts
``python -m vllm.entrypoints.openai.api_server SERVER ARGS`` as its child, in the same group,
prints ``{"server_pid": PID}`` on stdout, and then lives exactly as long as both

* its parent, the node: it holds our stdin open; EOF on stdin (the node exited, however it
  exited, SIGKILL included) ends us, and
* the vLLM server: when it exits (crash, OOM, SIGKILL) we exit with its status.

Either way, and on SIGTERM, it kills the whole process group first (vLLM forks an engine-core
process per server; nothing is left orphaned): SIGTERM, then SIGKILL after a grace period.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading

GRACE_S = 10.0


def _kill_group(server: subprocess.Popen[bytes]) -> None:
    pgid = os.getpgrp()
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # the group signal below reaches us too
    if server.poll() is None:
        server.terminate()
        try:
            server.wait(GRACE_S)
        except subprocess.TimeoutExpired:
            pass
    try:
        os.killpg(pgid, signal.SIGKILL)  # ends us as well, with whatever vLLM left behind
    except ProcessLookupError:
        pass


def main(argv: list[str]) -> int:
    if "--" in argv:
        argv = argv[argv.index("--") + 1:]
    server = subprocess.Popen([sys.executable, "-m", "vllm.entrypoints.openai.api_server", *argv],
                              stdin=subprocess.DEVNULL, stdout=sys.stderr)  # stdout: ours alone
    print(json.dumps({"server_pid": server.pid}), flush=True)
    done = threading.Event()

    def watch_parent() -> None:
        try:
            while sys.stdin.buffer.read(4096):
                pass
        except (OSError, ValueError):
            pass
        done.set()

    def watch_server() -> None:
        server.wait()
        done.set()

    threading.Thread(target=watch_parent, daemon=True).start()
    threading.Thread(target=watch_server, daemon=True).start()
    signal.signal(signal.SIGTERM, lambda *_: done.set())
    signal.signal(signal.SIGINT, lambda *_: done.set())
    while not done.wait(1.0):
        pass
    code = server.poll()
    _kill_group(server)
    return code if code is not None else 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
