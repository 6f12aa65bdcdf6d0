"""The swarm map, rendered by a real headless Chromium against real node processes.

Chromium comes from Debian's packages (``make`` installs it when run as root); without it the
browser tests skip and say why. The JSON API is tested either way.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

from tests.polling import eventually_sync

from node.http.asgi import free_port
from node.devtools.localswarm import start_chain, stop_all

SPANS = [(0, 2), (2, 4), (4, 6)]


def find_chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome", "chrome"):
        path = shutil.which(name)
        if path:
            return path
    return None


def chromium(url: str, tmp: Path, *extra: str) -> str:
    exe = find_chromium()
    if exe is None:
        pytest.skip("chromium not found: apt-get install -y chromium (make does it as root)")
    cmd = [exe, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
           "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-dev-shm-usage",
           f"--user-data-dir={tmp / 'chromium-profile'}", "--virtual-time-budget=8000", *extra, url]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=90)
    return out.stdout


def api(port: int) -> dict:
    """The snapshot, or {} while the server is not up yet."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/swarm", timeout=10) as r:
            return json.loads(r.read())
    except OSError:
        return {}


def peers_in(snapshot: dict) -> dict[str, str]:
    return {p["peer_id"]: f"{p['start']}:{p['end']}" for m in snapshot.get("models", []) for p in m["peers"]}


def rendered_peers(dom: str) -> dict[str, str]:
    rows = re.findall(r'<tr class="peer" data-peer="([^"]+)" data-span="([^"]+)"', dom)
    return dict(rows)


@pytest.fixture(scope="module")
def mapped_swarm(tiny_model, tmp_path_factory):
    port = free_port()
    nodes = start_chain(tmp_path_factory.mktemp("mswarm"), SPANS, model=str(tiny_model), timeout_s=120,
                        extra_args=["--record-ttl", "30"])
    # The standalone ``shiza monitor``: its own host and DHT, bootstrapped from the first node.
    mon = subprocess.Popen([sys.executable, "-m", "node", "monitor", "--port", str(port), "--interval", "1",
                            "--bootstrap", nodes[0].addr], stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        yield nodes, port
    finally:
        mon.terminate()
        try:
            mon.wait(15)
        except subprocess.TimeoutExpired:
            mon.kill()
        stop_all(nodes)


def test_map_shows_peers_and_spans_then_a_stopped_node_leaves(mapped_swarm, tmp_path):
    nodes, port = mapped_swarm
    expected = {n.peer_id: f"{a}:{b}" for n, (a, b) in zip(nodes, SPANS)}
    # The monitor learns the model id from the peers' NodeInfo, then reads the DHT.
    snap = eventually_sync(lambda: (s := api(port)) and peers_in(s) == expected and s, timeout_s=60,
                           what="all three peers in /api/swarm")
    model = snap["models"][0]
    assert model["num_layers"] == 6 and model["coverage"] == [1] * 6 and model["uncovered"] == []
    assert snap["total_throughput"] > 0

    dom = chromium(f"http://127.0.0.1:{port}/", tmp_path, "--dump-dom")
    assert rendered_peers(dom) == expected, dom[-2000:]
    assert 'data-coverage="1"' in dom and 'data-coverage="0"' not in dom
    chromium(f"http://127.0.0.1:{port}/", tmp_path, "--window-size=1280,800",
             f"--screenshot={tmp_path / 'swarm-map.png'}")
    shot = tmp_path / "swarm-map.png"
    assert shot.exists() and shot.stat().st_size > 10_000
    if os.environ.get("SHIZA_SCREENSHOT_DIR"):  # to look at the page by eye
        shutil.copy(shot, Path(os.environ["SHIZA_SCREENSHOT_DIR"]) / "swarm-map.png")

    gone = nodes[2]
    assert gone.stop() == 0  # SIGTERM: drains, withdraws its record (expires within seconds)
    eventually_sync(lambda: (s := api(port)) and gone.peer_id not in peers_in(s), timeout_s=60,
                    what="the stopped node to leave /api/swarm")
    dom = chromium(f"http://127.0.0.1:{port}/", tmp_path, "--dump-dom")
    shown = rendered_peers(dom)
    assert gone.peer_id not in shown and shown == {k: v for k, v in expected.items() if k != gone.peer_id}
    assert re.search(r'data-uncovered="4,5"', dom), "layers 4 and 5 are now uncovered and highlighted"


async def test_map_inside_a_node(tiny_model, tmp_path):
    """``--monitor-port``: the same page and API, served by a node about its own swarm."""
    from node.devtools.localswarm import start_node

    port = free_port()
    node = start_node(tmp_path / "n", model=str(tiny_model), layers=(0, 6), extra_args=["--monitor-port", str(port)])
    try:
        node.wait_ready(120)
        snap = eventually_sync(lambda: (s := api(port)) and peers_in(s) and s, timeout_s=30,
                               what="the node's own record")
        assert peers_in(snap) == {node.peer_id: "0:6"}
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=10) as r:
            page = r.read().decode()
        assert "/api/swarm" in page and "http://" not in page.replace("http://127.0.0.1", "")
    finally:
        node.stop()
