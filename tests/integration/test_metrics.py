"""Prometheus metrics, liveness and readiness of a real node process (``--metrics-port``)."""

from __future__ import annotations

import urllib.error
import urllib.request

import pytest

from tests.polling import eventually
from prometheus_client.parser import text_string_to_metric_families

from node.client.swarm import SwarmClient
from node.engine.registry import resolve_model
from node.http.asgi import free_port
from node.devtools.localswarm import start_node

PROMPT = [1, 504, 3458, 282, 4649, 314]
NEW_TOKENS = 10


def http_get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=10) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    status, text = http_get(f"http://127.0.0.1:{port}/metrics")
    assert status == 200
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for fam in text_string_to_metric_families(text) for s in fam.samples}


def value(samples: dict, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


@pytest.fixture(scope="module")
def metered_node(tiny_model, tmp_path_factory):
    port = free_port()
    node = start_node(tmp_path_factory.mktemp("metered"), model=str(tiny_model), layers=(0, 6),
                      extra_args=["--metrics-port", str(port)])
    try:
        node.wait_ready(120)
        yield node, port
    finally:
        node.stop()


async def test_counters_move_by_what_a_generation_did(metered_node, tiny_model, tmp_path):
    node, port = metered_node
    assert http_get(f"http://127.0.0.1:{port}/healthz")[0] == 200
    status, reason = http_get(f"http://127.0.0.1:{port}/readyz")
    assert status == 200, reason
    before = scrape(port)

    model_id = resolve_model(str(tiny_model)).model_id
    async with SwarmClient.open([node.addr], data_dir=tmp_path / "agent") as client:
        result = await client.generate(model_id, [PROMPT], max_new_tokens=NEW_TOKENS)
    assert len(result.token_ids[0]) == NEW_TOKENS

    # The final receipt is stored once the client's verdict is in.
    def countersigned() -> dict | None:
        now = scrape(port)
        done = value(now, "shiza_receipts_total", status="countersigned") > \
            value(before, "shiza_receipts_total", status="countersigned")
        return now if done else None

    after = await eventually(countersigned, timeout_s=10, what="the countersigned receipt in /metrics")

    def moved(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    assert moved("shiza_sessions_total") == 1
    assert value(after, "shiza_sessions_open") == 0
    assert moved("shiza_tokens_served_total", phase="prefill") == len(PROMPT)
    assert moved("shiza_tokens_served_total", phase="decode") == NEW_TOKENS - 1
    assert moved("shiza_work_units_total") == (len(PROMPT) + NEW_TOKENS - 1) * 6
    assert moved("shiza_receipts_total", status="countersigned") == 1  # one final receipt (every 64)
    assert moved("shiza_receipts_issued_total") == 1
    assert moved("shiza_steps_total") == NEW_TOKENS
    assert moved("shiza_step_duration_seconds_count", span="0:6", phase="prefill") == 1
    assert moved("shiza_step_duration_seconds_count", span="0:6", phase="decode") == NEW_TOKENS - 1
    assert moved("shiza_step_batch_size_sum", span="0:6") == NEW_TOKENS  # batch of one per step
    assert value(after, "shiza_kv_cache_free_tokens") == value(after, "shiza_kv_cache_capacity_tokens") > 0
    assert value(after, "shiza_node_state", state="online") == 1
    assert value(after, "shiza_connected_peers") >= 0


def test_metric_names_follow_prometheus_conventions(metered_node):
    _, port = metered_node
    status, text = http_get(f"http://127.0.0.1:{port}/metrics")
    assert status == 200
    families = list(text_string_to_metric_families(text))
    assert families
    names = {fam.name for fam in families}
    # The process and platform collectors every exporter has, and the build's version.
    assert {"process_resident_memory_bytes", "process_cpu_seconds", "python_info", "shiza_build_info"} <= names
    [build] = [s for fam in families if fam.name == "shiza_build_info" for s in fam.samples]
    assert build.labels["version"] and build.labels["protocol_version"] == "0"
    for fam in families:
        assert fam.name.startswith(("shiza_", "process_", "python_")), fam.name
        if fam.type == "counter":
            assert all(s.name.endswith(("_total", "_created")) for s in fam.samples), fam.name
        if fam.type == "histogram":
            assert fam.name.endswith(("_seconds", "_size")), fam.name
        for s in fam.samples:
            bad = {k for k in s.labels if "session" in k or "peer" in k}
            assert not bad, f"{s.name} has high-cardinality labels {bad}"


def test_registry_walk_names():
    """The same rules, walking the registry of a node object (no process needed)."""
    from types import SimpleNamespace

    from node.http.metrics import NodeMetrics, metric_names

    fake = SimpleNamespace(server=None, engine=None, state=None, announcer=None,
                           cfg=SimpleNamespace(device="cpu"), source=SimpleNamespace(model_id="m"),
                           host=SimpleNamespace(connected_peers=lambda: []),
                           dht=SimpleNamespace(routing_table_peers=lambda: []))
    metrics = NodeMetrics(fake)
    for fam in metrics.registry.collect():
        if fam.type == "counter":
            assert all(s.name.endswith(("_total", "_created")) for s in fam.samples)
        for s in fam.samples:
            assert not {k for k in s.labels if k in ("session", "session_id", "peer", "peer_id")}
    assert "shiza_dht_operations_total" in metric_names(metrics.registry)


def test_unknown_path_is_404(metered_node):
    _, port = metered_node
    assert http_get(f"http://127.0.0.1:{port}/nope")[0] == 404
