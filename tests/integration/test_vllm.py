"""A real vLLM node (the CPU build from .venv-vllm) on SmolLM2, alone and in a mixed swarm.

One vLLM node serves the whole model (0:30); three span nodes serve 0:10, 10:20, 20:30. Each
route is forced in turn and must give transformers' greedy tokens; receipts from the vLLM node
count tokens x 30 layers and verify; a SIGKILLed vLLM server makes the node drain, restart
vLLM and come back online. vLLM takes about 40 s to start, so the tests share one swarm.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest

from tests.polling import eventually
from tests.vllm_marks import VLLM_MARKS, VLLM_PYTHON

from node.net.records import fetch_records
from node.client.swarm import SwarmClient, candidates_from
from node.engine.reference import reference_greedy
from node.engine.registry import resolve_model
from node.ledger.store import Ledger
from protocol.identity import Identity
from node.devtools.localswarm import NodeProcess, start_node, stop_all
from node.client.routing import find_chain
from node.client.textgen import TextModel
from protocol.receipts import Receipt, latest_per_session, verify_receipt

pytestmark = VLLM_MARKS

NEW_TOKENS = 12


def _children(pid: int) -> list[int]:
    out = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        if int(stat.rpartition(")")[2].split()[1]) == pid:
            out.append(int(entry))
    return out


def _alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rpartition(")")[2].split()[0] != "Z"


def _vllm_pids(node: NodeProcess) -> tuple[int, int]:
    """(supervisor, api_server) process ids under a vLLM node process."""
    (supervisor,) = [p for p in _children(node.proc.pid)
                     if "node/engine/vllm/worker.py" in Path(f"/proc/{p}/cmdline").read_text(errors="replace")]
    servers = [p for p in _children(supervisor)
               if "api_server" in Path(f"/proc/{p}/cmdline").read_text(errors="replace")]
    return supervisor, servers[0]


@pytest.fixture(scope="module")
def mixed_swarm(tmp_path_factory):
    resolve_model("smollm2-135m")
    root = tmp_path_factory.mktemp("vllm")
    t0 = time.monotonic()
    vnode = start_node(root / "vllm", extra_args=["--engine", "vllm", "--vllm-python", str(VLLM_PYTHON),
                                                   "--receipt-every", "8"])
    try:
        vnode.wait_ready(600)
    except BaseException:
        vnode.kill()
        raise
    print(f"vLLM node ready after {time.monotonic() - t0:.1f} s")
    nodes = [vnode]
    try:  # the span nodes join the vLLM node's swarm
        for i, span in enumerate([(0, 10), (10, 20), (20, 30)]):
            nodes.append(start_node(root / f"span{i}", layers=span, bootstrap=[vnode.addr]))
        for n in nodes[1:]:
            n.wait_ready(300)
    except BaseException:
        for n in nodes:
            n.kill()
        raise
    yield nodes
    supervisor, _ = _vllm_pids(vnode)
    codes = stop_all(nodes)
    # The span nodes' codes are not checked here: stop_all's second SIGTERM can land after a
    # span node logged "node stopped" but before its process exited (seen as -15).
    assert codes[0] == 0, f"vLLM node exit codes {codes}"
    assert not _alive(supervisor), "the vLLM supervisor outlived its node"


async def _four(client: SwarmClient, model_id: str) -> list:
    records = await client.records(model_id)
    return records if len(records) == 4 else []


async def _routes(client: SwarmClient, model_id: str, vllm_peer: str, n: int):
    records = await eventually(lambda: _four(client, model_id), timeout_s=120, interval_s=0.5,
                               what="the records of all four nodes")
    cands = candidates_from(records, model_id)
    whole = find_chain(n, [c for c in cands if c.peer_id == vllm_peer])
    spans = find_chain(n, [c for c in cands if c.peer_id != vllm_peer])
    assert [(h.start, h.end) for h in whole] == [(0, n)]
    assert [(h.start, h.end) for h in spans] == [(0, 10), (10, 20), (20, 30)]
    return whole, spans


async def test_both_routes_give_transformers_greedy_tokens_and_receipts_verify(mixed_swarm, tmp_path):
    vnode = mixed_swarm[0]
    model = TextModel.load("smollm2-135m")
    source = resolve_model("smollm2-135m")
    prompts = [model.encode("What is the capital of France?"), model.encode("Name a colour.")]
    async with SwarmClient.open([vnode.addr], data_dir=tmp_path / "agent") as client:
        whole, spans = await _routes(client, model.model_id, vnode.peer_id, model.num_layers)
        via_vllm = await client.generate(model.model_id, [prompts[0]], max_new_tokens=NEW_TOKENS, route=whole)
        via_spans = await client.generate(model.model_id, [prompts[0]], max_new_tokens=NEW_TOKENS, route=spans)
        # A left-padded batch: one vLLM request per row.
        batch = await client.generate(model.model_id, prompts, max_new_tokens=6, route=whole)
        me = client.identity.peer_id
    expected = reference_greedy(source, prompts[0], NEW_TOKENS)
    assert via_vllm.token_ids[0] == expected
    assert via_spans.token_ids[0] == expected
    assert batch.token_ids == reference_greedy(source, prompts, 6)

    with Ledger.open(tmp_path / "agent" / "ledger.sqlite", Identity.load_or_create(tmp_path / "agent")) as ledger:
        mine = [(Receipt.from_bytes(e.receipt), e.status) for e in ledger.entries()]
    from_vllm = [(r, s) for r, s in mine if r.server == vnode.peer_id]
    assert from_vllm and all(s == "countersigned" for _, s in from_vllm)
    finals = sorted(latest_per_session([r for r, _ in from_vllm]), key=lambda r: r.prefill_tokens)
    assert len(finals) == 2
    single = finals[0]
    verify_receipt(single, require_countersigned=True)
    assert (single.start, single.end, single.client) == (0, model.num_layers, me)
    assert (single.prefill_tokens, single.decode_tokens) == (len(prompts[0]), NEW_TOKENS - 1)
    assert single.work_units == (len(prompts[0]) + NEW_TOKENS - 1) * model.num_layers


async def test_killed_vllm_server_drains_restarts_and_serves_again(mixed_swarm):
    vnode = mixed_swarm[0]
    model = TextModel.load("smollm2-135m")
    prompt = model.encode("What is the capital of France?")
    supervisor, server = _vllm_pids(vnode)
    os.kill(server, signal.SIGKILL)
    seen: list[str] = []
    async with SwarmClient.open([mixed_swarm[1].addr]) as client:
        async def drained_and_back() -> bool:
            records = await fetch_records(client.dht, model.model_id, include_draining=True)
            state = next((r.state for r in records if r.peer_id == vnode.peer_id), None)
            if state and (not seen or seen[-1] != state):
                seen.append(state)
            return bool(seen) and seen[-1] == "online" and "draining" in seen

        await eventually(drained_and_back, timeout_s=300, interval_s=0.5,
                         what="the vLLM node to publish draining, then online again")
        assert vnode.proc.poll() is None, "the node must survive its vLLM server"
        assert not _alive(supervisor), "the dead server's supervisor (and group) must be gone"
        whole, _ = await _routes(client, model.model_id, vnode.peer_id, model.num_layers)
        again = await client.generate(model.model_id, [prompt], max_new_tokens=NEW_TOKENS, route=whole)
    assert "draining" in seen and seen[-1] == "online"
    assert again.token_ids[0] == reference_greedy(resolve_model("smollm2-135m"), prompt, NEW_TOKENS)
