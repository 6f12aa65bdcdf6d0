"""What constrained decoding (SPEC 9.8) costs the node that samples, per token.

One engine holding the whole model (a transformers span, or with ``--engine vllm`` the
whole-model vLLM engine, whose grammar runs in vLLM's engine core: plugin/shiza_logits.py)
decodes the same prompts greedily, plainly and under grammars (a nested JSON schema, and tool
calls), interleaved in one run; the ratio of milliseconds per token is the grammar's overhead
(the llguidance mask and its application).

    python -m benchmarks.constrained --model smollm2-135m --out /tmp/constrained
    python -m benchmarks.constrained --model PATH --repeats 3 --tokens 48
    python -m benchmarks.constrained --engine vllm --out /tmp/constrained-vllm   # needs .venv-vllm

Writes results.json, results.md and constrained.png to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any

from node.client.grammars import json_schema_grammar, tool_call_grammar

PROMPTS = ["Describe a person as JSON.", "Call the weather tool for Paris.", "List three fruits.",
           "Write a short record of a book."]
PERSON = {"type": "object", "properties": {
    "name": {"type": "string"}, "age": {"type": "integer"},
    "address": {"type": "object", "properties": {"city": {"type": "string"}, "zip": {"type": "string"}},
                "required": ["city", "zip"]},
    "tags": {"type": "array", "items": {"type": "string"}}},
    "required": ["name", "age", "address", "tags"]}
TOOLS = [{"name": "get_weather", "parameters": {"type": "object", "properties": {
    "city": {"type": "string"}, "unit": {"enum": ["celsius", "fahrenheit"]}}, "required": ["city", "unit"]}},
    {"name": "search", "parameters": {"type": "object", "properties": {"query": {"type": "string"}},
                                      "required": ["query"]}}]
MODES = {"plain": None, "json_schema": json_schema_grammar(PERSON),
         "tool_calls": tool_call_grammar(TOOLS, required=True)}


def _decode(engine: Any, tok: Any, prompt: str, tokens: int, grammar: str | None, sid: str) -> tuple[int, float]:
    """(tokens decoded, seconds of their decode steps), the prefill excluded."""
    import torch

    ids = tok.encode(prompt).ids
    sampling = {"grammar": grammar, "grammar_start": len(ids)} if grammar else None
    engine.open_session(sid, 1, len(ids) + tokens + 1, sampling=sampling)
    try:
        x = engine.step(sid, torch.tensor([ids]), torch.arange(len(ids))[None])
        n, spent = 0, 0.0
        for i in range(tokens):
            if int(x[0]) in (0, 2):
                break
            t0 = time.perf_counter()
            x = engine.step(sid, x[:, None], torch.tensor([[len(ids) + i]]))
            spent += time.perf_counter() - t0
            n += 1
        return n, spent
    finally:
        engine.close_session(sid)


def _engine(source: Any, kind: str, out: Path) -> Any:
    if kind == "vllm":
        from node.engine.vllm.engine import VllmEngine

        out.mkdir(parents=True, exist_ok=True)
        print("starting vLLM (a minute or two on a CPU) ...", flush=True)
        return VllmEngine.load(source, max_model_len=512, log_path=out / "vllm.log")
    from node.engine.span import SpanEngine

    return SpanEngine.load(source, 0, source.num_layers)


def run(model: str, tokens: int, repeats: int, out: Path, engine_kind: str = "span") -> dict[str, Any]:
    from node.engine.registry import resolve_model

    source = resolve_model(model, progress=False)
    engine = _engine(source, engine_kind, out)
    try:
        return _run(engine, source, tokens, repeats, out, engine_kind)
    finally:
        engine.close()


def _run(engine: Any, source: Any, tokens: int, repeats: int, out: Path, engine_kind: str) -> dict[str, Any]:
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(source.path / "tokenizer.json"))
    per_token: dict[str, list[float]] = {m: [] for m in MODES}
    counted: dict[str, int] = {m: 0 for m in MODES}
    _decode(engine, tok, PROMPTS[0], 4, MODES["json_schema"], "warm")  # the tokenizer and first compile
    total = repeats * len(PROMPTS) * len(MODES)
    done = 0
    for r in range(repeats):
        for p, prompt in enumerate(PROMPTS):
            for mode, grammar in MODES.items():  # interleaved: drift hits every mode alike
                n, spent = _decode(engine, tok, prompt, tokens, grammar, f"{mode}-{r}-{p}")
                if n:
                    per_token[mode].append(spent * 1000 / n)
                    counted[mode] += n
                done += 1
                print(f"\r[{done}/{total}] {mode:<12} {spent * 1000 / max(n, 1):7.2f} ms/token", end="", flush=True)
    print()
    plain = statistics.median(per_token["plain"])
    rows = {m: {"ms_per_token": statistics.median(v), "tokens": counted[m],
                "overhead_ms_per_token": statistics.median(v) - plain,
                "ratio_to_plain": statistics.median(v) / plain} for m, v in per_token.items() if v}
    results = {"model": source.model_id, "engine": engine_kind, "tokens_per_request": tokens,
               "repeats": repeats, "modes": rows}
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=2))
    lines = [f"# Constrained decoding on {source.model_id} ({engine_kind} engine)", "",
             "| mode | ms/token (median) | overhead ms/token | x plain | tokens |", "| --- | --- | --- | --- | --- |"]
    lines += [f"| {m} | {r['ms_per_token']:.2f} | {r['overhead_ms_per_token']:+.2f} | {r['ratio_to_plain']:.2f} | "
              f"{r['tokens']} |" for m, r in rows.items()]
    (out / "results.md").write_text("\n".join(lines) + "\n")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3))
    ax.bar(list(rows), [r["ms_per_token"] for r in rows.values()], color=["#888", "#3a7", "#37a"][:len(rows)])
    ax.set_ylabel("ms per token (median)")
    ax.set_title(f"Constrained decoding, {source.model_id.split('@')[0]} ({engine_kind})")
    fig.tight_layout()
    fig.savefig(out / "constrained.png", dpi=120)
    plt.close(fig)
    print("\n".join(lines))
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--tokens", type=int, default=64, help="new tokens per request at most")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path("bench-constrained"))
    parser.add_argument("--engine", choices=("span", "vllm"), default="span",
                        help="a transformers span of the whole model, or the whole-model vLLM engine")
    args = parser.parse_args()
    run(args.model, args.tokens, args.repeats, args.out, args.engine)


if __name__ == "__main__":
    main()
