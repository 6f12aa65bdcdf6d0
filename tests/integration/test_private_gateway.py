"""A node of a private swarm that also serves the gateway (``--swarm-key`` with
``--gateway-port``): its gateway is an agent of the same private swarm, so it countersigns the
receipts of the swarm's nodes instead of disputing them as receipts of another swarm."""

from __future__ import annotations

import json
import urllib.error
import urllib.request

import pytest

from node.engine.registry import resolve_model
from node.devtools.localswarm import start_node, stop_all
from node.http.asgi import free_port
from node.ledger.store import LEDGER_FILE, Ledger
from protocol.identity import Identity
from node.net.admission import SwarmKey, write_swarm_key
from protocol.receipts import Receipt
from tests.polling import eventually_sync

MAX_TOKENS = 4

pytestmark = pytest.mark.integration


def _complete(port: int, model: str) -> dict | None:
    """POST /v1/completions: the answer, or None while the gateway's client has no route yet
    (503: the serving node's record is not found yet)."""
    body = json.dumps({"model": model, "prompt": "The capital of France is",
                       "max_tokens": MAX_TOKENS, "temperature": 0}).encode()
    req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/completions", data=body,
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=120) as resp:
            return {"body": json.loads(resp.read()),
                    "receipts": resp.headers["x-shiza-receipts"].split(",")}
    except urllib.error.HTTPError as exc:
        if exc.code == 503:
            return None
        raise AssertionError(f"gateway answered {exc.code}: {exc.read()[:500]!r}") from None


def _entries(data_dir) -> list:
    with Ledger.open(data_dir / LEDGER_FILE, Identity.load_or_create(data_dir)) as ledger:
        return list(ledger.entries())


def test_gateway_of_a_private_swarm_node_countersigns_the_swarms_receipts(tiny_model, tmp_path):
    key_path = tmp_path / "swarm.key"
    write_swarm_key(key_path)
    swarm_id = SwarmKey.load(key_path).swarm_id
    port = free_port()
    server = start_node(tmp_path / "server", model=str(tiny_model), layers=(0, 6),
                        extra_args=["--swarm-key", str(key_path)])
    nodes = [server]
    try:
        server.wait_ready(120)
        # The gateway never routes through its own node: the generation runs on ``server``.
        gateway = start_node(tmp_path / "gateway", model=str(tiny_model), layers=(0, 6),
                             bootstrap=[server.addr],
                             extra_args=["--swarm-key", str(key_path), "--gateway-port", str(port)])
        nodes.append(gateway)
        gateway.wait_ready(120)
        model_id = resolve_model(str(tiny_model)).model_id
        answer = eventually_sync(lambda: _complete(port, model_id), what="a route through the gateway",
                                 timeout_s=60, interval_s=0.5)
        assert answer["body"]["usage"]["completion_tokens"] == MAX_TOKENS
    finally:
        codes = stop_all(nodes)
    assert codes == [0] * len(nodes), [n.log_tail() for n in nodes]

    # The gateway's own ledger: the serving node's receipts, judged as the swarm's and signed.
    judged = [e for e in _entries(gateway.data_dir) if e.server == server.peer_id]
    assert judged, "the gateway stored no receipt of the serving node"
    assert {e.receipt_id for e in judged} == set(answer["receipts"])
    assert [(e.status, e.reason) for e in judged] == [("countersigned", "")] * len(judged)
    # The serving node holds the same receipts, countersigned (not disputed) by the gateway.
    served = [e for e in _entries(server.data_dir) if e.client == gateway.peer_id]
    assert [e.status for e in served] == ["countersigned"] * len(judged)
    assert {Receipt.from_bytes(e.receipt).swarm_id for e in served} == {swarm_id}

