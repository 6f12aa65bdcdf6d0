"""Peak resident memory of serving a span versus the whole model.

Each measurement runs in a fresh Python process: the baseline is the peak resident set size
(``VmHWM``, the same figure as ``ru_maxrss`` but not inherited across exec) right after
``import torch, transformers``; the figure is the peak after loading the span and running one
forward step (a prefill of ``tokens`` tokens), minus that baseline.

    python -m benchmarks.memory                 # SmolLM2: span 10:20 vs 0:30
    python -m benchmarks.memory --model PATH --span 2:4 --whole 0:6
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

_CHILD = r"""
import json, resource, sys

def peak_kib():
    # VmHWM belongs to this process image; ru_maxrss survives exec and so can report the
    # peak of the parent that forked us (pytest after it ran a whole model, for instance).
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss

import torch, transformers
base = peak_kib()
from node.engine import SpanEngine, resolve_model
spec, start, end, tokens = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
source = resolve_model(spec, progress=False)
span = SpanEngine.load(source, start, end)
loaded = peak_kib()
span.open_session("m", batch_size=1, max_length=tokens + 1)
if span.is_first:
    x = torch.randint(0, int(source.config["vocab_size"]), (1, tokens))
else:
    x = torch.randn(1, tokens, source.hidden_size)
span.step("m", x, torch.arange(tokens)[None])
peak = peak_kib()
params = sum(p.numel() for p in span.module.parameters())
print(json.dumps({"baseline_kib": base, "loaded_kib": loaded, "peak_kib": peak,
                  "added_kib": peak - base, "params": params}))
"""


@dataclass(frozen=True)
class MemoryResult:
    start: int
    end: int
    params: int
    baseline_mib: float  # after import torch, transformers
    added_mib: float  # peak after load + one step, minus the baseline
    load_added_mib: float  # peak right after the load, minus the baseline


def measure(spec: str, start: int, end: int, tokens: int = 16) -> MemoryResult:
    """Peak memory added by loading layers [start, end) of ``spec`` and one step, fresh process."""
    root = Path(__file__).resolve().parents[1]
    out = subprocess.run(
        [sys.executable, "-c", _CHILD, spec, str(start), str(end), str(tokens)],
        cwd=root, check=True, capture_output=True, text=True,
    ).stdout
    r = json.loads(out.strip().splitlines()[-1])
    return MemoryResult(start=start, end=end, params=r["params"],
                        baseline_mib=r["baseline_kib"] / 1024, added_mib=r["added_kib"] / 1024,
                        load_added_mib=(r["loaded_kib"] - r["baseline_kib"]) / 1024)


def compare(spec: str = "smollm2-135m", span: tuple[int, int] = (10, 20),
            whole: tuple[int, int] | None = None) -> tuple[MemoryResult, MemoryResult]:
    """(span result, whole-model result); ``whole`` defaults to 0:num_layers."""
    from node.engine import resolve_model

    if whole is None:
        whole = (0, resolve_model(spec).num_layers)  # also converts the model once, outside
    return measure(spec, *span), measure(spec, *whole)


def _parse_span(text: str) -> tuple[int, int]:
    a, _, b = text.partition(":")
    return int(a), int(b)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--span", type=_parse_span, default=(10, 20))
    ap.add_argument("--whole", type=_parse_span, default=None)
    args = ap.parse_args(argv)
    span, whole = compare(args.model, args.span, args.whole)
    for r in (span, whole):
        print(f"layers {r.start}:{r.end}: {r.params / 1e6:.1f}M params, "
              f"+{r.load_added_mib:.0f} MiB after load, +{r.added_mib:.0f} MiB peak after one step "
              f"(baseline {r.baseline_mib:.0f} MiB)")
    print(f"span / whole = {span.added_mib / whole.added_mib:.2f}")


if __name__ == "__main__":
    main()
