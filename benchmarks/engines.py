"""The engine as a dimension: one span of layers on transformers and on vLLM, side by side.

The same span (default 10:20 of SmolLM2: hidden states in, hidden states out, what most nodes of
a pipeline do) decodes on both engines, interleaved in one run: ``batch`` sessions of one row
each, every decode step of all of them in one ``step_batch`` (the way the node's scheduler hands
an engine the steps that are ready together; vLLM runs them as one forward). Tokens per second
per engine and batch size, and the cost of the vLLM worker's channel itself: the round trip of
a decode step's hidden states to the worker and back with no compute (``ping``), beside the
step it rides on.

    python -m benchmarks.engines --model smollm2-135m --span 10:20 --out /tmp/engines
    shiza bench --engines --out /tmp/engines

Writes results.json, results.md and engines.png to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any


def _decode(engine: Any, batch: int, prompt: int, steps: int, tag: str) -> float:
    """Tokens per second of ``batch`` one-row sessions decoding together (prefill excluded)."""
    import torch

    gen = torch.Generator().manual_seed(0)
    sids = [f"{tag}-{i}" for i in range(batch)]

    def x(t: int) -> torch.Tensor:
        if engine.start == 0:
            return torch.randint(1, engine.vocab_size, (1, t), generator=gen)
        return torch.randn((1, t, engine.hidden_size), generator=gen)

    for sid in sids:
        engine.open_session(sid, 1, prompt + steps + 1)
    try:
        outs = engine.step_batch([(sid, x(prompt), torch.arange(prompt)[None], None) for sid in sids])
        assert not any(isinstance(o, Exception) for o in outs), outs
        t0 = time.perf_counter()
        for i in range(steps):
            pos = torch.tensor([[prompt + i]])
            outs = engine.step_batch([(sid, x(1), pos, None) for sid in sids])
            assert not any(isinstance(o, Exception) for o in outs), outs
        return batch * steps / (time.perf_counter() - t0)
    finally:
        for sid in sids:
            engine.close_session(sid)


def run(model: str, span: tuple[int, int], batches: list[int], steps: int, repeats: int,
        out: Path, vllm_python: str | None = None, device: str = "cpu", dtype: str = "float32") -> dict[str, Any]:
    import torch
    from tqdm import tqdm

    from node.engine.registry import resolve_model
    from node.engine.span import SpanEngine
    from node.engine.vllm.span import VllmSpanEngine

    out.mkdir(parents=True, exist_ok=True)
    source = resolve_model(model, progress=False)
    a, b = span
    t0 = time.monotonic()
    engines = {"transformers": SpanEngine.load(source, a, b, device=device, dtype=dtype)}
    vllm = VllmSpanEngine.load(source, a, b, vllm_python=vllm_python, device=device, dtype=dtype, max_model_len=512,
                               max_num_seqs=max(64, max(batches)), log_path=out / "vllm-span.log")
    engines["vllm"] = vllm
    r: dict[str, Any] = {"model": source.model_id, "span": [a, b], "steps": steps, "repeats": repeats,
                         "device": device, "dtype": dtype,
                         "vllm_version": vllm.vllm_version, "vllm_start_s": round(time.monotonic() - t0, 1),
                         "tok_s": {}, "ipc_us": {}, "step_ms": {}}
    try:
        work = [(bs, name) for bs in batches for _ in range(repeats) for name in engines]
        got: dict[str, dict[int, list[float]]] = {n: {bs: [] for bs in batches} for n in engines}
        for i, (bs, name) in enumerate(tqdm(work, desc="engines", file=sys.stderr, unit="run")):
            got[name][bs].append(_decode(engines[name], bs, 16, steps, f"{name}{i}"))
        for name in engines:
            r["tok_s"][name] = {str(bs): round(statistics.median(v), 1) for bs, v in got[name].items()}
            r["step_ms"][name] = {str(bs): round(1000 * bs / statistics.median(v), 3) for bs, v in got[name].items()}
        r["agreement"] = _agreement(source, engines, a, device, dtype)
        for bs in batches:
            h = torch.zeros((bs, 1, vllm.hidden_size))
            vllm.ping(h)
            r["ipc_us"][str(bs)] = round(statistics.median(vllm.ping(h) for _ in range(200)) * 1e6, 1)
    finally:
        for e in engines.values():
            e.close()
    r["ratio_vllm_over_transformers"] = {
        str(bs): round(r["tok_s"]["vllm"][str(bs)] / r["tok_s"]["transformers"][str(bs)], 2) for bs in batches}
    r["ipc_share_of_vllm_step"] = {
        str(bs): round(r["ipc_us"][str(bs)] / 1000 / r["step_ms"]["vllm"][str(bs)], 3) for bs in batches}
    (out / "results.json").write_text(json.dumps(r, indent=2))
    (out / "results.md").write_text(_markdown(r))
    _plot(r, out / "engines.png")
    return r


def _agreement(source: Any, engines: dict[str, Any], a: int, device: str, dtype: str) -> dict[str, float]:
    """The two engines' outputs for a real prompt's activations (layers 0:a on transformers
    first), in the spot checker's measure: max|vllm - transformers| / max(1, max|transformers|)."""
    import torch

    from node.engine.span import SpanEngine
    from node.models.tokenizer import Tokenizer

    ids = torch.tensor([Tokenizer.from_dir(source.path).encode("The quick brown fox jumps over the lazy dog")])
    pos = torch.arange(ids.shape[1])[None]
    x = ids
    if a > 0:
        front = SpanEngine.load(source, 0, a, device=device, dtype=dtype)
        front.open_session("agree", 1, 64)
        x = front.step("agree", ids, pos)
        front.close()
    outs = {}
    for name, e in engines.items():
        e.open_session("agree", 1, 64)
        try:
            outs[name] = e.step("agree", x, pos)
        finally:
            e.close_session("agree")
    if outs["vllm"].dtype == torch.int64:  # a last span: tokens
        return {"tokens_equal": float(torch.equal(outs["vllm"], outs["transformers"]))}
    ref = outs["transformers"].float()
    diff = float((outs["vllm"].float() - ref).abs().max())
    return {"max_abs_diff": diff, "relative": diff / max(1.0, float(ref.abs().max())),
            "max_abs": float(ref.abs().max())}


def _markdown(r: dict[str, Any]) -> str:
    a, b = r["span"]
    lines = [f"# Span {a}:{b} of {r['model']}: transformers vs vLLM {r['vllm_version']}", "",
             f"Decode, {r['steps']} steps, median of {r['repeats']} interleaved runs; vLLM worker "
             f"start {r['vllm_start_s']} s.", "",
             "| batch | transformers tok/s | vLLM tok/s | vLLM / transformers | vLLM step ms | channel round trip us | share of the step |",
             "|---:|---:|---:|---:|---:|---:|---:|"]
    for bs in r["tok_s"]["vllm"]:
        lines.append(f"| {bs} | {r['tok_s']['transformers'][bs]} | {r['tok_s']['vllm'][bs]} | "
                     f"{r['ratio_vllm_over_transformers'][bs]}x | {r['step_ms']['vllm'][bs]} | "
                     f"{r['ipc_us'][bs]} | {100 * r['ipc_share_of_vllm_step'][bs]:.1f}% |")
    g = r.get("agreement", {})
    if "relative" in g:
        lines += ["", f"Outputs for a real prompt's activations: max abs difference {g['max_abs_diff']:.2e} "
                      f"(largest magnitude {g['max_abs']:.1f}), {g['relative']:.2e} in the spot checker's "
                      f"measure (its default tolerance is 1e-2)."]
    return "\n".join(lines) + "\n"


def _plot(r: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    batches = list(r["tok_s"]["vllm"])
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(10, 4))
    width = 0.38
    for k, name in enumerate(("transformers", "vllm")):
        ax.bar([i + (k - 0.5) * width for i in range(len(batches))],
               [r["tok_s"][name][bs] for bs in batches], width, label=name)
    ax.set_xticks(range(len(batches)), [f"batch {bs}" for bs in batches])
    ax.set_ylabel("decode tokens / s")
    ax.set_title(f"span {r['span'][0]}:{r['span'][1]} of {r['model']}")
    ax.legend()
    bx.bar(range(len(batches)), [r["ipc_us"][bs] for bs in batches], color="tab:gray")
    bx.set_xticks(range(len(batches)), [f"batch {bs}" for bs in batches])
    bx.set_ylabel("us per round trip")
    bx.set_title("vLLM worker channel, no compute")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--span", default="10:20", help="layers S:E on both engines")
    p.add_argument("--batches", default="1,16")
    p.add_argument("--steps", type=int, default=32)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--vllm-python", default=None)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--out", type=Path, default=Path("bench-out/engines"))
    args = p.parse_args(argv)
    a, _, b = args.span.partition(":")
    r = run(args.model, (int(a), int(b)), [int(x) for x in args.batches.split(",")], args.steps,
            args.repeats, args.out, args.vllm_python, args.device, args.dtype)
    print(_markdown(r))
    return 0


if __name__ == "__main__":
    sys.exit(main())
