"""The swarm map's data (node/http/monitor.py ``snapshot_of``) shows each peer's GPUs (issue 21)."""

from __future__ import annotations

import time

from protocol.identity import Identity
from protocol.messages import ServedSpan
from protocol.records import CapacityRecord, Gpu, Hardware, sign_record

from node.http.monitor import snapshot_of

MODEL = "tiny@0123456789abcdef"


def _record(ident: Identity, hardware: Hardware, start: int, end: int) -> CapacityRecord:
    now = time.time()
    return sign_record(ident, CapacityRecord(
        peer_id=ident.peer_id, addrs=(), spans=(ServedSpan(MODEL, start, end, 6),), hardware=hardware,
        throughput=10.0, cache_tokens_left=1024, state="online", seq=1, issued_at=now, expires_at=now + 60))


def test_the_map_lists_every_gpu_of_a_peer() -> None:
    gpu_node, cpu_node = Identity.generate(), Identity.generate()
    gpus = (Gpu("NVIDIA A100-SXM4-80GB", 80 << 30, 40 << 30, "8.0", True), Gpu("Tesla V100", 16 << 30, 16 << 30, "7.0", False))
    records = [_record(gpu_node, Hardware("cuda", "NVIDIA A100-SXM4-80GB (1 of 2 GPUs)", 80 << 30, 40 << 30, gpus), 0, 3),
               _record(cpu_node, Hardware("cpu", "x86 x8", 1 << 34, 1 << 33), 3, 6)]
    snap = snapshot_of({MODEL: records}, {MODEL: 6}, time.time())
    peers = {p["peer_id"]: p for m in snap["models"] for p in m["peers"]}
    assert peers[gpu_node.peer_id]["device"] == "cuda: NVIDIA A100-SXM4-80GB (1 of 2 GPUs)"
    assert peers[gpu_node.peer_id]["gpus"] == [
        "NVIDIA A100-SXM4-80GB, 40.0 of 80.0 GiB free, compute 8.0, bf16",
        "Tesla V100, 16.0 of 16.0 GiB free, compute 7.0"]
    assert peers[cpu_node.peer_id]["gpus"] == []
