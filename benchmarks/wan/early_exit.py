"""Would a self-draft pay? An early exit's agreement with the whole model (issue 18).

    python -m benchmarks.wan.early_exit --results bench-out/speculate/results.json
        [--model M] [--layers 6,10,15,20,25] [--out DIR]

A self-draft runs a model's first layers and then its head (an early exit) to propose the next
tokens. It can only pay if those exits choose what the whole model chooses. This runs, for each
layer count, the model cut after that many layers (its final norm and head kept) teacher-forced
over every prompt and plain greedy output of a speculate run (benchmarks/wan/speculate.py, its
plain generations at the first delay), and reports, per kind of prompt, the share of positions
where the exit's argmax is the token greedy decoding chose: the chance that a one-token
self-draft is kept. Needs torch (the node extra). results.json and results.md go to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Sequence


Cases = Sequence[tuple[Sequence[int], Sequence[int]]]  # (prompt, plain greedy output)


def exit_model(model_dir: Path, layers: int) -> Any:
    """The model cut after its first ``layers`` layers, its final norm and head kept."""
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()  # the cut layers' weights are "unexpected": that is the point
    return AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32,
                                                num_hidden_layers=layers).eval()


def agreement(model_dir: Path, cases: Cases, layers: int) -> float | None:
    """Share of the output positions (after the first) where the first ``layers`` layers and
    the head choose the output's token, teacher-forced; None without any such position."""
    return agreement_of(exit_model(model_dir, layers), cases)


def agreement_of(model: Any, cases: Cases) -> float | None:
    """``agreement`` with the cut model loaded already."""
    import torch

    same = total = 0
    with torch.no_grad():
        for prompt, output in cases:
            if len(output) < 2:
                continue
            ids = [*prompt, *output]
            logits = model(torch.tensor([ids])).logits[0]
            chosen = logits[len(prompt):len(ids) - 1].argmax(-1).tolist()  # the token after each output position
            same += sum(int(c == t) for c, t in zip(chosen, output[1:]))
            total += len(output) - 1
    return same / total if total else None


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.wan.early_exit", description=__doc__.split("\n")[0])
    ap.add_argument("--results", type=Path, required=True, help="a benchmarks.wan.speculate results.json")
    ap.add_argument("--model", default=None, help="default: the run's model")
    ap.add_argument("--layers", default="6,10,15,20,25")
    ap.add_argument("--out", type=Path, default=Path("bench-out/early-exit"))
    args = ap.parse_args(argv)
    try:
        data = json.loads(args.results.read_text())
        layer_counts = [int(x) for x in args.layers.split(",") if x.strip()]
    except (OSError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    from benchmarks.wan.prompts import by_name
    from node.cli.model import load_text_model, prepare

    spec = args.model or data.get("model") or "smollm2-135m"
    text_model, source = load_text_model(spec), prepare(spec)
    plain = [r for r in data["runs"] if r.get("error") is None and r["mode"] == "off"]
    first = min(r["delay_ms"] for r in plain)
    kinds: dict[str, list[tuple[list[int], list[int]]]] = {}
    for r in plain:
        if r["delay_ms"] == first:
            kinds.setdefault(r["kind"], []).append((text_model.encode(by_name(r["prompt"]).text), r["token_ids"]))
    rows = []
    for n in layer_counts:
        if not 1 <= n <= source.num_layers:
            print(f"error: --layers {n}: the model has {source.num_layers} layers", file=sys.stderr)
            return 2
        model = exit_model(source.path, n)
        for kind, cases in sorted(kinds.items()):
            share = agreement_of(model, cases)
            rows.append({"layers": n, "of": source.num_layers, "kind": kind, "prompts": len(cases),
                         "agreement": None if share is None else round(share, 3)})
            print(f"{n}/{source.num_layers} layers, {kind}: {rows[-1]['agreement']}", file=sys.stderr, flush=True)
    lines = ["| layers | prompts | agreement with the whole model |", "| --- | --- | --- |"]
    lines += [f"| {r['layers']} of {r['of']} | {r['kind']} ({r['prompts']}) | {r['agreement']} |" for r in rows]
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps({"source": str(args.results), "model": spec, "rows": rows}, indent=2))
    (args.out / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
