"""`benchmarks/fuzz.py` in its smallest mode: a few hundred mutated frames to a live node, which
must still be alive, answer its health probe and serve a correct generation afterwards."""

from __future__ import annotations

import trio

from benchmarks.fuzz import fuzz_node, generation_after, start_fuzz_target, _model_id, vm_kib


async def test_fuzzed_node_stays_alive_and_serves(tmp_path):
    node, model = await trio.to_thread.run_sync(start_fuzz_target, tmp_path)
    try:
        r = await fuzz_node(node, _model_id(model), frames=300, seed=3, identities=2, workers=4,
                            max_s=240.0, progress=False)
        assert r["frames"] >= 300
        assert r["crashes"] == 0, r["crash"]
        assert node.proc.poll() is None, node.log_tail()
        assert r["probes"] >= 1
        # Bad frames got error codes back (the node answered, it did not just drop streams).
        assert any(k.startswith("error ") for k in r["replies"]), r["replies"]
        assert len(r["mutations"]) >= 8, r["mutations"]  # the mutators really varied
        assert r["node_peak_rss_kib"] == vm_kib(node.proc.pid, "VmHWM") > 0
        assert await generation_after(node, model)
    finally:
        await trio.to_thread.run_sync(node.stop, 60.0)
