"""Real vLLM nodes (the CPU build from .venv-vllm) on SmolLM2, in one mixed swarm.

One vLLM node serves the whole model (0:30); three transformers span nodes serve 0:10, 10:20,
20:30; three vLLM span nodes (``--engine vllm --layers S:E``) serve 0:10, 10:20, 20:30 too. Each
route is forced in turn (whole vLLM; transformers spans; vLLM spans; vLLM and transformers spans
mixed) and must give transformers' greedy tokens; receipts from the vLLM nodes count tokens x
their layers and verify; concurrent sessions on the vLLM spans (batched inside vLLM) each equal
their solo output; a SIGKILLed vLLM server makes the node drain, restart vLLM and come back
online; a SIGKILLed vLLM span node fails over mid-generation to the transformers node of its
span, the text unchanged, and its vLLM worker dies with it. vLLM takes tens of seconds to
start, so the tests share one swarm.
"""

from __future__ import annotations

import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path

import trio

import pytest

from tests.polling import eventually
from tests.vllm_marks import VLLM_MARKS, VLLM_PYTHON

from node.net.records import fetch_records
from node.client.swarm import SwarmClient, candidates_from
from node.engine.reference import reference_greedy
from node.engine.registry import resolve_model
from node.ledger.store import Ledger
from protocol.identity import Identity
from protocol.messages import SamplingParams
from node.devtools.localswarm import NodeProcess, start_node, stop_all
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


@dataclass
class Mixed:
    whole: NodeProcess  # --engine vllm: the whole model through a vLLM server
    spans: list[NodeProcess]  # transformers 0:10, 10:20, 20:30
    vspans: list[NodeProcess]  # --engine vllm --layers: 0:10, 10:20, 20:30 on vLLM

    @property
    def nodes(self) -> list[NodeProcess]:
        return [self.whole, *self.spans, *self.vspans]


SPANS = [(0, 10), (10, 20), (20, 30)]


@pytest.fixture(scope="module")
def mixed_swarm(tmp_path_factory):
    resolve_model("smollm2-135m")
    root = tmp_path_factory.mktemp("vllm")
    t0 = time.monotonic()
    vllm = ["--engine", "vllm", "--vllm-python", str(VLLM_PYTHON)]
    # A transformers span node first (ready in seconds), then the six others at once, bootstrapped
    # on it: the vLLM nodes' tens of seconds of start overlap.
    first = start_node(root / "span0", layers=SPANS[0])
    try:
        first.wait_ready(600)
    except BaseException:
        first.kill()
        raise
    started = [first]
    try:
        # --vllm-eager: its server starts (here, and again in the restart test) without a minute
        # of torch.compile each time.
        vnode = start_node(root / "vllm", bootstrap=[first.addr],
                           extra_args=[*vllm, "--vllm-eager", "--receipt-every", "8"])
        started.append(vnode)
        for i, span in enumerate(SPANS[1:], start=1):
            started.append(start_node(root / f"span{i}", layers=span, bootstrap=[first.addr]))
        for i, span in enumerate(SPANS):
            started.append(start_node(root / f"vspan{i}", layers=span, bootstrap=[first.addr],
                                      extra_args=[*vllm, "--receipt-every", "4"]))
        for n in started[1:]:
            n.wait_ready(600)
    except BaseException:
        for n in started:
            n.kill()
        raise
    nodes = [vnode, first, *started[2:]]  # the whole-model node, the transformers spans, the vLLM spans
    print(f"all seven nodes ready after {time.monotonic() - t0:.1f} s")
    yield Mixed(vnode, nodes[1:4], nodes[4:])
    supervisor, _ = _vllm_pids(vnode)
    codes = stop_all(nodes)
    # The span nodes' codes are not checked here: stop_all's second SIGTERM can land after a
    # span node logged "node stopped" but before its process exited (seen as -15).
    assert codes[0] == 0, f"vLLM node exit codes {codes}"
    assert not _alive(supervisor), "the vLLM supervisor outlived its node"


async def _all(client: SwarmClient, model_id: str) -> list:
    records = await client.records(model_id)
    return records if len(records) == 7 else []


async def _chain(client: SwarmClient, model_id: str, nodes: list[NodeProcess]):
    """The hops of ``nodes``, in order (each serves one span), once all seven are announced."""
    records = await eventually(lambda: _all(client, model_id), timeout_s=120, interval_s=0.5,
                               what="the records of all seven nodes")
    cands = candidates_from(records, model_id)
    return [next(c for c in cands if c.peer_id == n.peer_id) for n in nodes]


async def _routes(client: SwarmClient, model_id: str, swarm: Mixed, n: int):
    whole = await _chain(client, model_id, [swarm.whole])
    spans = await _chain(client, model_id, swarm.spans)
    assert [(h.start, h.end) for h in whole] == [(0, n)]
    assert [(h.start, h.end) for h in spans] == SPANS
    return whole, spans


async def test_both_routes_give_transformers_greedy_tokens_and_receipts_verify(mixed_swarm, tmp_path):
    vnode = mixed_swarm.whole
    model = TextModel.load("smollm2-135m")
    source = resolve_model("smollm2-135m")
    prompts = [model.encode("What is the capital of France?"), model.encode("Name a colour.")]
    async with SwarmClient.open([vnode.addr], data_dir=tmp_path / "agent") as client:
        whole, spans = await _routes(client, model.model_id, mixed_swarm, model.num_layers)
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
    vnode = mixed_swarm.whole
    model = TextModel.load("smollm2-135m")
    prompt = model.encode("What is the capital of France?")
    supervisor, server = _vllm_pids(vnode)
    os.kill(server, signal.SIGKILL)
    seen: list[str] = []
    async with SwarmClient.open([mixed_swarm.spans[0].addr]) as client:
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
        whole, spans = await _routes(client, model.model_id, mixed_swarm, model.num_layers)
        again = await client.generate(model.model_id, [prompt], max_new_tokens=NEW_TOKENS, route=whole)
        # logit_bias through vLLM's own: +100 all but forces a token, -100 bans the greedy first
        # one; the transformers spans, given the same bias, choose the same tokens.
        expected = reference_greedy(resolve_model("smollm2-135m"), prompt, NEW_TOKENS)
        forced = model.tokenizer.encode(" Paris", add_special_tokens=False)[-1]
        biased = {}
        for name, route in (("whole", whole), ("spans", spans)):
            for bias in (((forced, 100.0),), ((expected[0], -100.0),)):
                got = await client.generate(model.model_id, [prompt], max_new_tokens=4, route=route,
                                            sampling=SamplingParams(logit_bias=bias))
                biased[name, bias] = got.token_ids[0]
    assert "draining" in seen and seen[-1] == "online"
    assert again.token_ids[0] == expected
    assert biased["whole", ((forced, 100.0),)] == [forced] * 4
    assert biased["whole", ((expected[0], -100.0),)][0] != expected[0]
    assert {k[1]: v for k, v in biased.items() if k[0] == "whole"} == {k[1]: v for k, v in biased.items() if k[0] == "spans"}


def _worker_pid(node: NodeProcess) -> int:
    (pid,) = [p for p in _children(node.proc.pid)
              if "span_worker.py" in Path(f"/proc/{p}/cmdline").read_text(errors="replace")]
    return pid


async def test_vllm_span_route_gives_transformers_greedy_tokens_and_receipts_verify(mixed_swarm, tmp_path):
    model = TextModel.load("smollm2-135m")
    source = resolve_model("smollm2-135m")
    prompts = [model.encode("What is the capital of France?"), model.encode("Name a colour.")]
    vllm_peers = [n.peer_id for n in mixed_swarm.vspans]
    async with SwarmClient.open([mixed_swarm.vspans[0].addr], data_dir=tmp_path / "agent") as client:
        route = await _chain(client, model.model_id, mixed_swarm.vspans)
        assert [(h.start, h.end) for h in route] == SPANS
        one = await client.generate(model.model_id, [prompts[0]], max_new_tokens=NEW_TOKENS, route=route)
        batch = await client.generate(model.model_id, prompts, max_new_tokens=6, route=route)  # padded rows
        me = client.identity.peer_id
    assert one.token_ids[0] == reference_greedy(source, prompts[0], NEW_TOKENS)
    assert batch.token_ids == reference_greedy(source, prompts, 6)
    with Ledger.open(tmp_path / "agent" / "ledger.sqlite", Identity.load_or_create(tmp_path / "agent")) as ledger:
        receipts = [Receipt.from_bytes(e.receipt) for e in ledger.entries() if e.status == "countersigned"]
    middle = [r for r in receipts if r.server == vllm_peers[1]]
    final = min(latest_per_session(middle), key=lambda r: r.prefill_tokens)
    verify_receipt(final, require_countersigned=True)
    assert (final.start, final.end, final.client) == (10, 20, me)
    assert final.work_units == (len(prompts[0]) + NEW_TOKENS - 1) * 10


async def test_route_mixing_vllm_and_transformers_spans(mixed_swarm, tmp_path):
    model = TextModel.load("smollm2-135m")
    prompt = model.encode("Write a haiku about the sea.")
    async with SwarmClient.open([mixed_swarm.vspans[0].addr]) as client:
        route = await _chain(client, model.model_id,  # vLLM, transformers, vLLM
                             [mixed_swarm.vspans[0], mixed_swarm.spans[1], mixed_swarm.vspans[2]])
        result = await client.generate(model.model_id, [prompt], max_new_tokens=NEW_TOKENS, route=route)
    assert result.token_ids[0] == reference_greedy(resolve_model("smollm2-135m"), prompt, NEW_TOKENS)


async def test_concurrent_sessions_on_vllm_spans_equal_their_solo_output(mixed_swarm):
    model = TextModel.load("smollm2-135m")
    source = resolve_model("smollm2-135m")
    prompts = [model.encode(p) for p in ("One, two, three,", "The sky is", "import numpy as np",
                                          "Paris is the capital of")]
    got: dict[int, list[int]] = {}
    async with SwarmClient.open([mixed_swarm.vspans[0].addr]) as client:
        route = await _chain(client, model.model_id, mixed_swarm.vspans)

        async def one(i: int) -> None:
            r = await client.generate(model.model_id, [prompts[i]], max_new_tokens=NEW_TOKENS, route=route)
            got[i] = r.token_ids[0]

        async with trio.open_nursery() as nursery:
            for i in range(len(prompts)):
                nursery.start_soon(one, i)
    assert [got[i] for i in range(len(prompts))] == reference_greedy(source, prompts, NEW_TOKENS)


async def test_sigkilled_vllm_span_node_fails_over_and_its_worker_dies(mixed_swarm, tmp_path):
    """Last in the module: it kills the middle vLLM node."""
    model = TextModel.load("smollm2-135m")
    prompt = model.encode("What is the capital of France?")
    victim = mixed_swarm.vspans[1]
    worker = _worker_pid(victim)
    count = {"n": 0}
    async with SwarmClient.open([mixed_swarm.vspans[0].addr], data_dir=tmp_path / "agent", step_timeout_s=5) as client:
        route = await _chain(client, model.model_id, mixed_swarm.vspans)

        def on_tokens(tokens):
            count["n"] += 1
            if count["n"] == 6:
                os.kill(victim.proc.pid, signal.SIGKILL)

        result = await client.generate(model.model_id, [prompt], max_new_tokens=NEW_TOKENS, route=route,
                                       on_tokens=on_tokens)
    assert result.token_ids[0] == reference_greedy(resolve_model("smollm2-135m"), prompt, NEW_TOKENS)
    assert result.failovers == 1
    assert [h.peer_id for h in result.route][1] == mixed_swarm.spans[1].peer_id  # the transformers 10:20
    await eventually(lambda: not _alive(worker), timeout_s=60, interval_s=0.2,
                     what="the killed node's vLLM worker to end (EOF on its socket)")


async def test_grammar_penalties_and_logprobs_through_the_whole_vllm_node(mixed_swarm, tmp_path):
    """A json_schema answer with penalties and log-probabilities from the whole-model vLLM node
    (its grammar and penalties run inside vLLM, plugin/shiza_logits.py) validates and equals the
    transformers spans' answer, log-probabilities within 1e-4."""
    import json

    import jsonschema

    from node.client.grammars import json_schema_grammar

    schema = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 12},
                                               "rank": {"type": "integer", "minimum": 1}},
              "required": ["city", "rank"], "additionalProperties": False}
    model = TextModel.load("smollm2-135m")
    prompt = model.encode("Name a city and its rank as JSON.")
    sampling = SamplingParams(logprobs=2, presence_penalty=0.3, frequency_penalty=0.3)
    async with SwarmClient.open([mixed_swarm.whole.addr], data_dir=tmp_path / "agent") as client:
        whole, spans = await _routes(client, model.model_id, mixed_swarm, model.num_layers)
        got = [await client.generate(model.model_id, [prompt], max_new_tokens=40, route=route,
                                     sampling=sampling, grammar=json_schema_grammar(schema),
                                     eos_token_ids=model.eos_token_ids)
               for route in (whole, spans)]
    assert got[0].route[0].peer_id == mixed_swarm.whole.peer_id
    assert got[0].token_ids == got[1].token_ids
    tokens = got[0].token_ids[0]
    assert tokens[-1] in model.eos_token_ids
    jsonschema.validate(json.loads(model.decode(tokens[:-1])), schema)
    for a, b in zip(got[0].logprobs[0], got[1].logprobs[0], strict=True):
        assert a.token == b.token and abs(a.logprob - b.logprob) < 1e-4
        assert [t for t, _ in a.top] == [t for t, _ in b.top]
        assert all(abs(x - y) < 1e-4 for (_, x), (_, y) in zip(a.top, b.top))
