"""node.memtune: encoding large frames stops faulting in fresh pages (glibc)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

# A fresh process encodes a prefill-sized Step (4 MB of hidden states) 20 times after one
# warm-up, and reports the minor page faults per encode: each fault is fresh memory the kernel
# maps and zeroes (4 KiB, or 2 MiB with transparent huge pages, as on this VM: ~50 a frame).
PROBE = r"""
import resource, sys
from node.util.memtune import tune_malloc
from protocol.codec import Tensor
from protocol.messages import Step, encode_message

tuned = tune_malloc() if sys.argv[1] == "tune" else False
hidden = Tensor("float32", (1, 1820, 576), bytes(1820 * 576 * 4))
positions = Tensor("int64", (1, 1820), bytes(1820 * 8))
encode_message(Step(1, hidden, positions))
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(20):
    frame = encode_message(Step(1, hidden, positions))
    del frame
print(tuned, (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 20)
"""
FRAME = 1820 * 576 * 4


def _probe(mode: str, env: dict[str, str] | None = None) -> tuple[str, float]:
    out = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True,
                         check=True, env=env).stdout.split()
    return out[0], float(out[1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc mallopt")
def test_encoding_large_frames_stops_faulting_in_pages_once_tuned() -> None:
    tuned, faults = _probe("tune")
    untuned, faults_default = _probe("plain")
    print(f"minor page faults per 4 MB encode: {faults:.0f} tuned, {faults_default:.0f} default")
    assert tuned == "True" and untuned == "False"
    assert faults_default >= FRAME / (2 << 20)  # glibc's default: fresh memory every frame
    assert faults < 1  # tuned: the heap's pages are reused
    off, faults_off = _probe("tune", {**os.environ, "SHIZA_NO_MALLOC_TUNING": "1"})
    assert off == "False" and faults_off >= FRAME / (2 << 20)
