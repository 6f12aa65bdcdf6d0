"""vLLM serving layer spans in a real swarm: node processes with ``--engine vllm --layers S:E``.

Three vLLM span nodes serve SmolLM2 as 0:10, 10:20, 20:30 and a transformers node serves 10:20
too. The vLLM route gives transformers' greedy tokens, with receipts that verify; a route through
the transformers node in the middle does as well; concurrent sessions (batched inside vLLM)
each equal their solo output; a vLLM span node SIGKILLed mid-generation fails over to the
transformers node, the text unchanged, and its vLLM worker dies with it. The nodes start once
for the module (each vLLM worker takes tens of seconds).
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest
import trio

from tests.polling import eventually
from tests.vllm_marks import VLLM_MARKS, VLLM_PYTHON

from node.client.swarm import SwarmClient, candidates_from
from node.client.textgen import TextModel
from node.devtools.localswarm import start_node, stop_all
from node.engine.reference import reference_greedy
from node.engine.registry import resolve_model
from node.ledger.store import Ledger
from protocol.identity import Identity
from protocol.receipts import Receipt, latest_per_session, verify_receipt

pytestmark = VLLM_MARKS

SPANS = ((0, 10), (10, 20), (20, 30))
NEW = 12


def _worker_pid(node) -> int:
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
            cmd = Path(f"/proc/{entry}/cmdline").read_text(errors="replace")
        except OSError:
            continue
        if int(stat.rpartition(")")[2].split()[1]) == node.proc.pid and "span_worker.py" in cmd:
            return int(entry)
    raise AssertionError(f"no vLLM span worker under node {node.proc.pid}")


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0] != "Z"
    except OSError:
        return False


@pytest.fixture(scope="module")
def swarm(tmp_path_factory):
    resolve_model("smollm2-135m")
    root = tmp_path_factory.mktemp("vllm-spans")
    vllm = ["--engine", "vllm", "--vllm-python", str(VLLM_PYTHON), "--receipt-every", "4"]
    t0 = time.monotonic()
    first = start_node(root / "v0", layers=SPANS[0], extra_args=vllm)
    nodes = [first]
    try:
        first.wait_ready(600)
        nodes += [start_node(root / f"v{i}", layers=span, bootstrap=[first.addr], extra_args=vllm)
                  for i, span in enumerate(SPANS[1:], 1)]
        nodes.append(start_node(root / "t1", layers=SPANS[1], bootstrap=[first.addr],
                                extra_args=["--receipt-every", "4"]))
        for n in nodes[1:]:
            n.wait_ready(600)
    except BaseException:
        for n in nodes:
            n.kill()
        raise
    print(f"three vLLM span nodes and a transformers node ready after {time.monotonic() - t0:.1f} s")
    yield nodes
    stop_all(nodes)


async def _route(client: SwarmClient, model_id: str, peers: list[str]):
    async def all_four():
        records = await client.records(model_id)
        return records if len(records) == 4 else []

    records = await eventually(all_four, timeout_s=120, interval_s=0.5, what="the records of all four nodes")
    cands = candidates_from(records, model_id)
    return [next(c for c in cands if c.peer_id == peer) for peer in peers]


async def test_vllm_span_route_gives_transformers_greedy_tokens_and_receipts_verify(swarm, tmp_path):
    model = TextModel.load("smollm2-135m")
    source = resolve_model("smollm2-135m")
    prompts = [model.encode("What is the capital of France?"), model.encode("Name a colour.")]
    vllm_peers = [n.peer_id for n in swarm[:3]]
    async with SwarmClient.open([swarm[0].addr], data_dir=tmp_path / "agent") as client:
        route = await _route(client, model.model_id, vllm_peers)
        assert [(h.start, h.end) for h in route] == list(SPANS)
        one = await client.generate(model.model_id, [prompts[0]], max_new_tokens=NEW, route=route)
        batch = await client.generate(model.model_id, prompts, max_new_tokens=6, route=route)  # padded rows
        me = client.identity.peer_id
    assert one.token_ids[0] == reference_greedy(source, prompts[0], NEW)
    assert batch.token_ids == reference_greedy(source, prompts, 6)
    with Ledger.open(tmp_path / "agent" / "ledger.sqlite", Identity.load_or_create(tmp_path / "agent")) as ledger:
        receipts = [Receipt.from_bytes(e.receipt) for e in ledger.entries() if e.status == "countersigned"]
    middle = [r for r in receipts if r.server == vllm_peers[1]]
    final = min(latest_per_session(middle), key=lambda r: r.prefill_tokens)
    verify_receipt(final, require_countersigned=True)
    assert (final.start, final.end, final.client) == (10, 20, me)
    assert final.work_units == (len(prompts[0]) + NEW - 1) * 10


async def test_route_mixing_vllm_and_transformers_spans(swarm, tmp_path):
    model = TextModel.load("smollm2-135m")
    prompt = model.encode("Write a haiku about the sea.")
    peers = [swarm[0].peer_id, swarm[3].peer_id, swarm[2].peer_id]  # vLLM, transformers, vLLM
    async with SwarmClient.open([swarm[0].addr]) as client:
        route = await _route(client, model.model_id, peers)
        result = await client.generate(model.model_id, [prompt], max_new_tokens=NEW, route=route)
    assert result.token_ids[0] == reference_greedy(resolve_model("smollm2-135m"), prompt, NEW)


async def test_concurrent_sessions_on_vllm_spans_equal_their_solo_output(swarm):
    model = TextModel.load("smollm2-135m")
    source = resolve_model("smollm2-135m")
    prompts = [model.encode(p) for p in ("One, two, three,", "The sky is", "import numpy as np",
                                          "Paris is the capital of")]
    got: dict[int, list[int]] = {}
    async with SwarmClient.open([swarm[0].addr]) as client:
        route = await _route(client, model.model_id, [n.peer_id for n in swarm[:3]])

        async def one(i: int) -> None:
            r = await client.generate(model.model_id, [prompts[i]], max_new_tokens=NEW, route=route)
            got[i] = r.token_ids[0]

        async with trio.open_nursery() as nursery:
            for i in range(len(prompts)):
                nursery.start_soon(one, i)
    assert [got[i] for i in range(len(prompts))] == reference_greedy(source, prompts, NEW)


async def test_sigkilled_vllm_span_node_fails_over_and_its_worker_dies(swarm, tmp_path):
    """Last in the module: it kills the middle vLLM node."""
    model = TextModel.load("smollm2-135m")
    prompt = model.encode("What is the capital of France?")
    victim = swarm[1]
    worker = _worker_pid(victim)
    count = {"n": 0}
    async with SwarmClient.open([swarm[0].addr], data_dir=tmp_path / "agent", step_timeout_s=5) as client:
        route = await _route(client, model.model_id, [n.peer_id for n in swarm[:3]])

        def on_tokens(tokens):
            count["n"] += 1
            if count["n"] == 6:
                os.kill(victim.proc.pid, signal.SIGKILL)

        result = await client.generate(model.model_id, [prompt], max_new_tokens=NEW, route=route,
                                       on_tokens=on_tokens)
    assert result.token_ids[0] == reference_greedy(resolve_model("smollm2-135m"), prompt, NEW)
    assert result.failovers == 1
    assert [h.peer_id for h in result.route][1] == swarm[3].peer_id  # the transformers 10:20
    await eventually(lambda: not _alive(worker), timeout_s=60, interval_s=0.2,
                     what="the killed node's vLLM worker to end (EOF on its socket)")
