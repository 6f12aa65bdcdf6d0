"""On a GPU machine: the hardware a node would advertise (issue 21). Prints the record's hardware
map (run with -s to see it) and checks it against torch's view of the devices."""

from __future__ import annotations

import json

import pytest

torch = pytest.importorskip("torch")

from node.engine.hardware import detect_hardware  # noqa: E402
from protocol.records import Gpu, Hardware  # noqa: E402

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (torch.cuda.is_available() is False)"),
]


def test_every_gpu_is_in_the_record_a_node_would_publish() -> None:
    hw = detect_hardware("cuda")
    record = Hardware(hw.device_kind, hw.device_name, hw.memory_total, hw.memory_free,
                      tuple(Gpu(g.name, g.memory_total, g.memory_free, g.compute_capability, g.bf16) for g in hw.gpus))
    print(json.dumps(record.to_wire(), indent=2))
    assert record.device_kind == "cuda" and len(record.gpus) == torch.cuda.device_count()
    major, minor = torch.cuda.get_device_capability(0)
    assert record.gpus[0].compute_capability == f"{major}.{minor}"
    assert record.gpus[0].bf16 == torch.cuda.is_bf16_supported()
    assert 0 < record.memory_free <= record.memory_total == record.gpus[0].memory_total
