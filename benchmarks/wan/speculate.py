"""Speculative decoding across the swarm (issue 18): prompt-lookup drafts against plain decoding,
3 nodes and a client in their own namespaces, at chosen one-way delays.

    python -m benchmarks.wan.speculate [--model tiny|smollm2-135m|DIR] [--delays 0,25] [--tokens 64]
        [--prompts grounded,chat] [--limit N] [--out DIR]            (root: network namespaces)

Every link gets the same one-way delay (node/devtools/netns.py). At each delay one driver process
(this module with ``--driver``) runs in the client's namespace: one SwarmClient, a route, the
model's tokenizer, a warm-up in each mode, then for every prompt of benchmarks/wan/prompts.py
(``--limit``: the first N of each kind) a greedy generation with ``speculate="off"`` and one with
``speculate="ngram"``, chat template applied, the model's EOS ids, ``--tokens`` new tokens at most.
Greedy output does not depend on drafting: the token ids of the two modes must be identical,
and any difference is reported loudly (stderr, results.json "mismatches", results.md, exit 1).

Definitions (per generation; aggregates add numerators and denominators over prompts):

    decode tok/s      (tokens - 1) / decode_s, as GenerationResult.tokens_per_s (after the first token)
    speedup           ngram decode tok/s / off decode tok/s, same prompt and delay
    acceptance        accepted / drafted
    tokens per pass   (tokens - 1) / (passes - 1): tokens emitted per decode pass (the prefill pass,
                      which gives the first token, left out); 1 for plain decoding
    cost model        predicted tok/s = tokens per pass / (legs x one-way delay + engine s per pass),
                      legs = hops + 1 = 4 (node-to-node flow, SPEC 9.6), engine s per pass from the
                      same prompt and mode at the first delay: decode_s / (passes - 1) - legs x delay

results.json, results.md and results.png (speedup per kind and delay; measured against predicted
tok/s) go to ``--out``. The nodes keep running between delays; only the forwarder restarts.
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

from benchmarks.wan.pipeline import legs, spans_of
from benchmarks.wan.prompts import KINDS, Prompt, select

NODES = ("n1", "n2", "n3")
CLIENT = "c"
MODES = ("off", "ngram")
HOPS = len(NODES)
LEGS = legs("push", HOPS)  # client -> n1 -> n2 -> n3 -> client
WARMUP_TOKENS = 4
GENERATE_TIMEOUT_S = 300.0  # one generation, in the driver
ROUTE_WAIT_S = 120.0
DRIVER_BASE_S = 300.0  # the driver's start, route and warm-up ...
DRIVER_PER_GENERATION_S = 120.0  # ... plus this per generation bounds the whole driver
NODE_READY_S = 600.0
RESULT_FIELDS = ("passes", "drafted", "accepted")


# ---- the arithmetic (pure) ---------------------------------------------------------------------
def tokens_per_pass(tokens: int, passes: int) -> float | None:
    """Tokens emitted per decode pass: (tokens - 1) / (passes - 1); None without a decode pass."""
    return (tokens - 1) / (passes - 1) if passes > 1 and tokens >= 1 else None


def acceptance(accepted: int, drafted: int) -> float | None:
    """Share of the drafted tokens that were accepted; None when nothing was drafted."""
    return accepted / drafted if drafted > 0 else None


def speedup(ngram_tokens_per_s: float, off_tokens_per_s: float) -> float | None:
    return ngram_tokens_per_s / off_tokens_per_s if off_tokens_per_s > 0 else None


def engine_s_per_pass(decode_s: float, passes: int, delay_s: float, n_legs: int = LEGS) -> float | None:
    """What a decode pass costs besides the wire, from one measurement at ``delay_s``."""
    if passes <= 1:
        return None
    return decode_s / (passes - 1) - n_legs * delay_s


def predicted_tokens_per_s(per_pass: float, delay_s: float, engine_s: float, n_legs: int = LEGS) -> float | None:
    """The cost model: tokens per pass / (legs x one-way delay + engine time per pass)."""
    s = n_legs * delay_s + engine_s
    return per_pass / s if s > 0 else None


def first_divergence(a: Sequence[int], b: Sequence[int]) -> int | None:
    """The first index where two token lists differ (the shorter one's length when one is a
    prefix of the other); None when they are equal."""
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


def median_or_none(values: Sequence[float | None]) -> float | None:
    xs = [v for v in values if v is not None]
    return statistics.median(xs) if xs else None


def _r(x: float | None, nd: int = 3) -> float | None:
    return None if x is None else round(x, nd)


@dataclass
class Run:
    """One generation: a prompt in one mode at one delay."""

    delay_ms: float
    kind: str
    prompt: str
    mode: str  # "off" or "ngram"
    tokens: int = 0  # new tokens (EOS included when reached)
    prompt_tokens: int = 0
    tokens_per_s: float = 0.0  # decode, after the first token
    ttft_s: float = 0.0
    decode_s: float = 0.0
    passes: int = 0  # the prefill pass included
    drafted: int = 0
    accepted: int = 0
    pushed_steps: int = 0
    speculate_used: str | None = None  # GenerationResult.speculate: the draft source that ran
    token_ids: list[int] = dataclasses.field(default_factory=list)
    text: str = ""
    error: str | None = None
    identical: bool | None = None  # ngram: token ids equal to off's (same prompt and delay)
    engine_s_per_pass: float | None = None  # from the first delay, same prompt and mode
    predicted_tokens_per_s: float | None = None

    @property
    def ok(self) -> bool:
        return self.error is None

    @property
    def per_pass(self) -> float | None:
        return tokens_per_pass(self.tokens, self.passes)


def run_from(record: dict, delay_ms: float) -> Run:
    """A Run from one of the driver's records."""
    keep = {f.name for f in dataclasses.fields(Run)} - {"delay_ms"}
    return Run(delay_ms=delay_ms, **{k: v for k, v in record.items() if k in keep})


def compare_modes(runs: Sequence[Run]) -> list[str]:
    """Set ``identical`` on each ngram run that has an off run beside it (same delay and prompt);
    return one line per mismatch."""
    off = {(r.delay_ms, r.prompt): r for r in runs if r.mode == "off" and r.ok}
    problems = []
    for r in runs:
        base = off.get((r.delay_ms, r.prompt))
        if r.mode != "ngram" or not r.ok or base is None:
            continue
        at = first_divergence(base.token_ids, r.token_ids)
        r.identical = at is None
        if at is not None:
            problems.append(f"{r.prompt} at {r.delay_ms:g} ms: ngram output differs from off at token {at} "
                            f"(off {base.token_ids[at:at + 4]}, ngram {r.token_ids[at:at + 4]}; "
                            f"{len(base.token_ids)} vs {len(r.token_ids)} tokens)")
    return problems


def check_runs(runs: Sequence[Run]) -> list[str]:
    """Warnings about runs that did not go the way their mode says: a draft source other than
    the one asked, drafts under off, or no drafts at all under ngram at some delay."""
    notes = []
    for r in runs:
        if r.ok and r.speculate_used is not None and r.speculate_used != r.mode:
            notes.append(f"{r.prompt} at {r.delay_ms:g} ms: asked speculate={r.mode}, ran {r.speculate_used}")
        if r.ok and r.mode == "off" and (r.drafted or r.passes != r.tokens):
            notes.append(f"{r.prompt} at {r.delay_ms:g} ms: off drafted {r.drafted} in {r.passes} passes "
                         f"for {r.tokens} tokens")
    for delay in dict.fromkeys(r.delay_ms for r in runs):
        ngram = [r for r in runs if r.delay_ms == delay and r.mode == "ngram" and r.ok]
        if ngram and not any(r.drafted for r in ngram):
            notes.append(f"at {delay:g} ms no ngram generation drafted anything")
    return notes


def apply_model(runs: Sequence[Run], n_legs: int = LEGS) -> None:
    """Each run's predicted tok/s, from the engine time per pass of its prompt and mode at the
    first delay measured, and its own tokens per pass."""
    engine: dict[tuple[str, str], float] = {}
    for r in runs:  # in order: the first delay comes first
        key = (r.prompt, r.mode)
        if r.ok and key not in engine:
            e = engine_s_per_pass(r.decode_s, r.passes, r.delay_ms / 1000, n_legs)
            if e is not None:
                engine[key] = e
    for r in runs:
        e = engine.get((r.prompt, r.mode))
        per = r.per_pass
        if not r.ok or e is None or per is None:
            continue
        r.engine_s_per_pass = round(e, 5)
        r.predicted_tokens_per_s = _r(predicted_tokens_per_s(per, r.delay_ms / 1000, e, n_legs), 2)


@dataclass
class Summary:
    """One delay and one prompt kind, over the prompts that finished in both modes."""

    delay_ms: float
    kind: str
    prompts: int = 0
    identical: int = 0
    off_tokens_per_s: float | None = None  # aggregate: all decode tokens / all decode time
    ngram_tokens_per_s: float | None = None
    speedup: float | None = None  # of the aggregates
    median_speedup: float | None = None  # of the per-prompt speedups
    acceptance: float | None = None  # all accepted / all drafted
    tokens_per_pass: float | None = None  # ngram: all decode tokens / all decode passes
    predicted_off_tokens_per_s: float | None = None
    predicted_ngram_tokens_per_s: float | None = None
    predicted_speedup: float | None = None
    ngram_measured_vs_predicted: float | None = None
    off_engine_ms_per_pass: float | None = None  # measured here, the wire (legs x delay) taken off
    ngram_engine_ms_per_pass: float | None = None
    failed: int = 0  # prompts with a failed generation in either mode


def _aggregate_tokens_per_s(runs: Sequence[Run]) -> float | None:
    time_s = sum(r.decode_s for r in runs)
    return sum(r.tokens - 1 for r in runs) / time_s if time_s > 0 else None


def _aggregate_predicted(runs: Sequence[Run]) -> float | None:
    """All decode tokens / all predicted decode time (predicted decode_s = tokens - 1 over the
    predicted tok/s); None unless every run has a prediction."""
    if not runs or any(not r.predicted_tokens_per_s for r in runs):
        return None
    time_s = sum((r.tokens - 1) / r.predicted_tokens_per_s for r in runs)  # type: ignore[operator]
    return sum(r.tokens - 1 for r in runs) / time_s if time_s > 0 else None


def engine_ms_per_decode_pass(runs: Sequence[Run], n_legs: int = LEGS) -> float | None:
    """All decode time less the wire (legs x delay a pass) over all decode passes, in ms: what a
    pass costs the engines and the protocol, as measured in ``runs``."""
    passes = sum(r.passes - 1 for r in runs if r.passes > 1)
    if passes <= 0:
        return None
    wire = sum((r.passes - 1) * n_legs * r.delay_ms / 1000 for r in runs if r.passes > 1)
    return 1000 * (sum(r.decode_s for r in runs if r.passes > 1) - wire) / passes


def predicted_curve(runs: Sequence[Run], delays_ms: Sequence[float], n_legs: int = LEGS) -> list[float | None]:
    """The cost model's aggregate tok/s of ``runs`` (their passes, tokens and engine time per pass,
    as ``apply_model`` set it) at each of ``delays_ms``: all decode tokens / all predicted decode
    time, where a run's predicted decode time is (passes - 1) x (legs x delay + engine s per pass)."""
    usable = [(r.passes - 1, r.engine_s_per_pass, r.tokens - 1) for r in runs
              if r.ok and r.engine_s_per_pass is not None and r.passes > 1]
    tokens = sum(t for _, _, t in usable)
    out: list[float | None] = []
    for d in delays_ms:
        time_s = sum(n * (n_legs * d / 1000 + e) for n, e, _ in usable)
        out.append(tokens / time_s if usable and time_s > 0 else None)
    return out


def summarize(runs: Sequence[Run]) -> list[Summary]:
    """Per delay and kind, in the order measured."""
    out = []
    for delay in dict.fromkeys(r.delay_ms for r in runs):
        for kind in dict.fromkeys(r.kind for r in runs if r.delay_ms == delay):
            here = [r for r in runs if r.delay_ms == delay and r.kind == kind]
            by = {(r.prompt, r.mode): r for r in here}
            names = list(dict.fromkeys(r.prompt for r in here))
            pairs = [(by[(n, "off")], by[(n, "ngram")]) for n in names
                     if (n, "off") in by and (n, "ngram") in by and by[(n, "off")].ok and by[(n, "ngram")].ok]
            offs, ngrams = [p[0] for p in pairs], [p[1] for p in pairs]
            s = Summary(delay, kind, prompts=len(pairs), identical=sum(1 for n in ngrams if n.identical),
                        failed=len(names) - len(pairs))
            s.off_tokens_per_s = _aggregate_tokens_per_s(offs)
            s.ngram_tokens_per_s = _aggregate_tokens_per_s(ngrams)
            if s.off_tokens_per_s and s.ngram_tokens_per_s:
                s.speedup = speedup(s.ngram_tokens_per_s, s.off_tokens_per_s)
            s.median_speedup = median_or_none([speedup(n.tokens_per_s, o.tokens_per_s) for o, n in pairs])
            s.acceptance = acceptance(sum(n.accepted for n in ngrams), sum(n.drafted for n in ngrams))
            decode_passes = sum(n.passes - 1 for n in ngrams)
            s.tokens_per_pass = sum(n.tokens - 1 for n in ngrams) / decode_passes if decode_passes > 0 else None
            s.predicted_off_tokens_per_s = _aggregate_predicted(offs)
            s.predicted_ngram_tokens_per_s = _aggregate_predicted(ngrams)
            if s.predicted_off_tokens_per_s and s.predicted_ngram_tokens_per_s:
                s.predicted_speedup = s.predicted_ngram_tokens_per_s / s.predicted_off_tokens_per_s
            if s.ngram_tokens_per_s and s.predicted_ngram_tokens_per_s:
                s.ngram_measured_vs_predicted = s.ngram_tokens_per_s / s.predicted_ngram_tokens_per_s
            s.off_engine_ms_per_pass = engine_ms_per_decode_pass(offs)
            s.ngram_engine_ms_per_pass = engine_ms_per_decode_pass(ngrams)
            for f in dataclasses.fields(Summary):
                v = getattr(s, f.name)
                if isinstance(v, float) and f.name != "delay_ms":
                    setattr(s, f.name, round(v, 3))
            out.append(s)
    return out


# ---- reporting ---------------------------------------------------------------------------------
def _cell(v: object) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:g}"
    return str(v)


def _table(head: Sequence[str], rows: Sequence[Sequence[object]]) -> list[str]:
    return (["| " + " | ".join(head) + " |", "| " + " | ".join("---" for _ in head) + " |"]
            + ["| " + " | ".join(_cell(c) for c in row) + " |" for row in rows])


def markdown(summaries: Sequence[Summary], runs: Sequence[Run], mismatches: Sequence[str],
             warnings: Sequence[str] = (), n_legs: int = LEGS) -> str:
    lines: list[str] = []
    if mismatches:
        lines += ["**GREEDY OUTPUT MISMATCH: speculate=ngram must give the tokens of speculate=off.**", ""]
        lines += [f"- {m}" for m in mismatches] + [""]
    lines += _table(
        ["one-way delay (ms)", "kind", "prompts", "identical", "off tok/s", "ngram tok/s", "speedup",
         "median speedup", "acceptance", "tokens / pass", "predicted off tok/s", "predicted ngram tok/s",
         "predicted speedup", "ngram measured/predicted", "engine ms / pass off", "engine ms / pass ngram"],
        [[f"{s.delay_ms:g}", s.kind, s.prompts if not s.failed else f"{s.prompts} ({s.failed} failed)",
          f"{s.identical}/{s.prompts}", s.off_tokens_per_s, s.ngram_tokens_per_s,
          None if s.speedup is None else f"{s.speedup:g}x",
          None if s.median_speedup is None else f"{s.median_speedup:g}x", s.acceptance, s.tokens_per_pass,
          s.predicted_off_tokens_per_s, s.predicted_ngram_tokens_per_s,
          None if s.predicted_speedup is None else f"{s.predicted_speedup:g}x", s.ngram_measured_vs_predicted,
          _r(s.off_engine_ms_per_pass, 1), _r(s.ngram_engine_ms_per_pass, 1)]
         for s in summaries])
    lines += ["", "tok/s: decode tokens / decode time (after the first token), added over the kind's prompts "
              "(aggregate); speedup: ngram over off of those; median speedup: of the per-prompt ratios; "
              "acceptance: accepted / drafted drafts; tokens / pass: decode tokens / decode passes under ngram "
              f"(1 for plain decoding). Cost model: predicted tok/s = tokens per pass / ({n_legs} legs x one-way "
              "delay + engine s per pass), the engine time per pass from the same prompt and mode at the first "
              "delay. Engine ms / pass: decode time less the wire over decode passes, as measured at that "
              "delay (a pass that verifies drafts carries more tokens).", "", "## Per prompt", ""]
    by = {(r.delay_ms, r.prompt, r.mode): r for r in runs}
    rows = []
    for r in runs:
        if r.mode != "ngram":
            continue
        o = by.get((r.delay_ms, r.prompt, "off"))
        if not r.ok or o is None or not o.ok:
            err = r.error or (o.error if o is not None else "no off run")
            rows.append([f"{r.delay_ms:g}", r.kind, r.prompt] + ["-"] * 9 + [f"failed: {err}"])
            continue
        sp = speedup(r.tokens_per_s, o.tokens_per_s)
        rows.append([f"{r.delay_ms:g}", r.kind, r.prompt, r.tokens, round(o.tokens_per_s, 2),
                     round(r.tokens_per_s, 2), None if sp is None else f"{sp:.2f}x", f"{o.passes}/{r.passes}",
                     f"{r.accepted}/{r.drafted}", _r(acceptance(r.accepted, r.drafted), 2), _r(r.per_pass, 2),
                     r.predicted_tokens_per_s,
                     "yes" if r.identical else ("-" if r.identical is None else "**NO**")])
    lines += _table(["one-way delay (ms)", "kind", "prompt", "tokens", "off tok/s", "ngram tok/s", "speedup",
                     "passes off/ngram", "accepted/drafted", "acceptance", "tokens / pass",
                     "predicted ngram tok/s", "identical"], rows)
    if warnings:
        lines += ["", "Warnings: " + "; ".join(warnings)]
    return "\n".join(lines)


def plot(summaries: Sequence[Summary], runs: Sequence[Run], path: Path, title: str) -> bool:
    """Left: speedup per kind and delay (bars: aggregate; diamonds: median per prompt; dots: each
    prompt). Right: aggregate tok/s per kind and mode against delay, measured (markers) and the
    cost model from the first delay (lines). False without matplotlib."""
    try:
        import matplotlib
    except ImportError:
        return False
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = {"grounded": "#27a", "chat": "#c84"}
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.8))
    delays = list(dict.fromkeys(s.delay_ms for s in summaries))
    kinds = list(dict.fromkeys(s.kind for s in summaries))
    width = 0.8 / max(1, len(kinds))
    by = {(r.delay_ms, r.prompt, r.mode): r for r in runs}
    lo, hi = min(delays), max(delays)
    grid = [lo + (hi - lo) * i / 100 for i in range(101)] if hi > lo else [lo]
    first = {}  # (kind, mode) -> the runs of the first delay, whose engine time the model uses
    for r in runs:
        if r.ok and r.delay_ms == delays[0]:
            first.setdefault((r.kind, r.mode), []).append(r)
    for k, kind in enumerate(kinds):
        xs = [i + (k - (len(kinds) - 1) / 2) * width for i in range(len(delays))]
        mine = {s.delay_ms: s for s in summaries if s.kind == kind}
        left.bar(xs, [(mine[d].speedup or 0) if d in mine else 0 for d in delays], width * 0.9,
                 color=colors.get(kind), alpha=0.75, label=f"{kind}: aggregate")
        left.plot(xs, [mine[d].median_speedup if d in mine else float("nan") for d in delays], "D", color="k",
                  markersize=5, label="median per prompt" if k == 0 else None)
        for x, d in zip(xs, delays):
            per = [speedup(r.tokens_per_s, o.tokens_per_s) for r in runs
                   if r.delay_ms == d and r.kind == kind and r.mode == "ngram" and r.ok
                   and (o := by.get((d, r.prompt, "off"))) is not None and o.ok]
            per = [v for v in per if v is not None]
            left.plot([x] * len(per), per, ".", color=colors.get(kind), alpha=0.6, markersize=4,
                      label="each prompt" if k == 0 and x == xs[0] else None)
        for mode, style, size in (("off", "o", 9), ("ngram", "s", 5)):
            measured = [getattr(mine[d], f"{mode}_tokens_per_s") if d in mine else None for d in delays]
            right.plot(delays, [float("nan") if v is None else v for v in measured], style, color=colors.get(kind),
                       markersize=size, markerfacecolor="none" if mode == "off" else colors.get(kind),
                       label=f"{kind}, {mode}: measured")
            curve = predicted_curve(first.get((kind, mode), []), grid)
            right.plot(grid, [float("nan") if v is None else v for v in curve], "--" if mode == "ngram" else ":",
                       color=colors.get(kind), alpha=0.7, label=f"{kind}, {mode}: model")
    left.axhline(1.0, color="#888", linewidth=1)
    left.set_xticks(range(len(delays)), [f"{d:g} ms" for d in delays])
    left.set_xlabel("one-way delay per link")
    left.set_ylabel("ngram tok/s / off tok/s")
    left.set_ylim(bottom=0)
    right.set_xlabel("one-way delay per link (ms)")
    right.set_ylabel("decode tokens / s (log)")
    right.set_yscale("log")
    for ax in (left, right):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


# ---- the driver (inside the client's namespace) ------------------------------------------------
def speculate_unsupported() -> str | None:
    """None when the client can speculate (issue 18); otherwise why not, in one line."""
    from node.client.swarm import GenerationResult, SwarmClient

    if "speculate" not in inspect.signature(SwarmClient.generate).parameters:
        return ("SwarmClient.generate has no `speculate` parameter (issue 18 is not in this tree): "
                "nothing to benchmark")
    missing = [f for f in RESULT_FIELDS if f not in {x.name for x in dataclasses.fields(GenerationResult)}]
    if missing:
        return f"GenerationResult lacks {', '.join(missing)} (issue 18): nothing to benchmark"
    return None


async def drive(model: str, bootstrap: Sequence[str], prompts: Sequence[Prompt], tokens: int,
                data_dir: Path | None, delay_ms: float, wait_s: float = ROUTE_WAIT_S) -> dict:
    """Every prompt in both modes through one client; a failed generation is a record with an
    error, the others go on.

    The prompts run shortest first (in prompt tokens), the warm-up on the shortest: a node's
    push link reads each frame under the limit of the sessions open when it began to wait, so
    a session whose prefill is far longer than the one before it can have its first push
    refused (node/serve/server.py ``_serve_link``). Ascending lengths never make that jump."""
    import trio

    from node.cli.model import load_text_model
    from node.client.swarm import SwarmClient

    text_model = load_text_model(model)
    records: list[dict] = []
    async with SwarmClient.open(list(bootstrap), data_dir=data_dir) as client:
        route = await client.wait_for_route(text_model.model_id, wait_s, num_layers=text_model.num_layers)

        async def generate(ids: list[int], mode: str, n: int):  # noqa: ANN202 - a GenerationResult
            with trio.fail_after(GENERATE_TIMEOUT_S):
                return await client.generate(text_model.model_id, [ids], max_new_tokens=n,
                                             eos_token_ids=text_model.eos_token_ids, route=route,
                                             vocab_size=text_model.vocab_size, speculate=mode)

        encoded = sorted(((p, text_model.encode(p.text)) for p in prompts), key=lambda pi: len(pi[1]))
        warmup_errors = []
        for mode in MODES:  # connections, caches, code paths of both modes
            try:
                await generate(encoded[0][1], mode, WARMUP_TOKENS)
            except Exception as exc:  # noqa: BLE001 - reported; the prompts may still run
                warmup_errors.append(f"warm-up ({mode}): {type(exc).__name__}: {exc}"[:500])
                print(f"{delay_ms:g} ms warm-up {mode}: FAILED {warmup_errors[-1]}", file=sys.stderr, flush=True)
        for i, (p, ids) in enumerate(encoded):
            off_ids: list[int] | None = None
            for mode in MODES:
                rec: dict = {"kind": p.kind, "prompt": p.name, "mode": mode, "prompt_tokens": len(ids)}
                try:
                    res = await generate(ids, mode, tokens)
                except Exception as exc:  # noqa: BLE001 - a failed generation is reported, the rest go on
                    rec["error"] = f"{type(exc).__name__}: {exc}"[:500]
                    records.append(rec)
                    print(f"{delay_ms:g} ms [{i + 1}/{len(prompts)}] {p.kind:8} {p.name:18} {mode:5}: "
                          f"FAILED {rec['error']}", file=sys.stderr, flush=True)
                    continue
                out = res.token_ids[0]
                rec.update(tokens=len(out), tokens_per_s=round(res.tokens_per_s, 3), ttft_s=round(res.ttft_s, 4),
                           decode_s=round(res.decode_s, 4), passes=res.passes, drafted=res.drafted,
                           accepted=res.accepted, pushed_steps=res.pushed_steps,
                           speculate_used=getattr(res, "speculate", None), token_ids=list(out),
                           text=text_model.decode([t for t in out if t not in text_model.eos_token_ids])[:300])
                records.append(rec)
                same = ""
                if mode == "off":
                    off_ids = list(out)
                elif off_ids is not None:
                    at = first_divergence(off_ids, out)
                    same = ", identical" if at is None else f", MISMATCH with off at token {at}"
                print(f"{delay_ms:g} ms [{i + 1}/{len(prompts)}] {p.kind:8} {p.name:18} {mode:5}: "
                      f"{len(out):3} tokens, {res.tokens_per_s:7.2f} tok/s, ttft {res.ttft_s:.3f} s, "
                      f"{res.passes} passes, accepted {res.accepted}/{res.drafted}{same}", file=sys.stderr,
                      flush=True)
    return {"model_id": text_model.model_id, "delay_ms": delay_ms, "tokens": tokens, "runs": records,
            "warmup_errors": warmup_errors}


def driver_main(args: argparse.Namespace) -> int:
    import trio

    reason = speculate_unsupported()
    if reason is not None:
        print(f"error: {reason}", file=sys.stderr, flush=True)
        return 2
    prompts = select(args.kinds, args.limit)
    out = trio.run(drive, args.model, args.bootstrap, prompts, args.tokens, args.data_dir, args.delay_ms,
                   args.wait)
    print(json.dumps(out), flush=True)
    return 0 if any("error" not in r for r in out["runs"]) else 1


# ---- the outer process (root) ------------------------------------------------------------------
def _model(name: str, work: Path) -> tuple[str, int]:
    """A model path or name the nodes and the driver take, and its layer count."""
    from node.engine.registry import resolve_model

    if name == "tiny":
        from node.engine.testing import make_tiny_model

        return str(make_tiny_model(work / "tiny", seed=0, arch="llama", num_layers=6)), 6
    return name, resolve_model(name).num_layers


def driver_timeout_s(n_prompts: int) -> float:
    return DRIVER_BASE_S + DRIVER_PER_GENERATION_S * len(MODES) * n_prompts


def _drive(net: object, model: str, bootstrap: str, args: argparse.Namespace, n_prompts: int, work: Path,
           delay_ms: float) -> dict:
    """The driver in the client's namespace, its progress on our stderr; its JSON summary."""
    cmd = [sys.executable, "-m", "benchmarks.wan.speculate", "--driver", "--model", model, "--bootstrap", bootstrap,
           "--tokens", str(args.tokens), "--prompts", ",".join(args.kinds), "--data-dir", str(work / "client"),
           "--delay-ms", str(delay_ms), "--wait", str(ROUTE_WAIT_S)]
    if args.limit is not None:
        cmd += ["--limit", str(args.limit)]
    proc = net.popen(CLIENT, cmd, stdout=subprocess.PIPE, stderr=None, text=True)  # type: ignore[attr-defined]
    try:
        stdout, _ = proc.communicate(timeout=driver_timeout_s(n_prompts))
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate(timeout=30)
        raise RuntimeError(f"the driver ran past {driver_timeout_s(n_prompts):.0f} s at {delay_ms:g} ms") from None
    try:
        return json.loads(stdout.strip().splitlines()[-1])
    except (IndexError, json.JSONDecodeError):
        raise RuntimeError(f"the driver failed ({proc.returncode}) at {delay_ms:g} ms; its error is above") from None


def measure(args: argparse.Namespace, work: Path, failures: list[str] | None = None) -> list[Run]:
    """The runs at every delay; a driver that fails at one delay is a line in ``failures`` and
    the next delay goes on."""
    from node.devtools.localswarm import stop_all
    from node.devtools.netns import Network, start_node, tcp_round_trips

    prompts = select(args.kinds, args.limit)
    model_path, num_layers = _model(args.model, work)
    runs: list[Run] = []
    with Network([*NODES, CLIENT], delay_ms=args.delays[0], log_dir=work) as net:
        nodes: list = []
        try:
            for host, span in zip(NODES, spans_of(num_layers, HOPS)):
                boot = [nodes[0].addr] if nodes else []
                nodes.append(start_node(net, host, work / host, model=model_path, layers=span, bootstrap=boot))
                if len(nodes) == 1:
                    nodes[0].wait_ready(NODE_READY_S)
            for n in nodes:
                n.wait_ready(NODE_READY_S)
            for delay in args.delays:
                net.reconfigure(delay_ms=delay)
                rtt = statistics.median(tcp_round_trips(net, CLIENT, NODES[0], n=10)) * 1000
                print(f"delay {delay:g} ms: tcp rtt {rtt:.1f} ms; {len(prompts)} prompts x {len(MODES)} modes",
                      file=sys.stderr, flush=True)
                t0 = time.monotonic()
                try:
                    out = _drive(net, model_path, nodes[-1].addr, args, len(prompts), work, delay)
                except RuntimeError as exc:
                    print(f"FAILED: {exc}", file=sys.stderr, flush=True)
                    if failures is not None:
                        failures.append(str(exc))
                    continue
                if failures is not None:
                    failures += [f"at {delay:g} ms: {e}" for e in out.get("warmup_errors", [])]
                here = [run_from(rec, delay) for rec in out["runs"]]
                runs += here
                print(f"delay {delay:g} ms: {sum(r.ok for r in here)}/{len(here)} generations in "
                      f"{time.monotonic() - t0:.0f} s", file=sys.stderr, flush=True)
        finally:
            stop_all(nodes)
    return runs


def parse_delays(spec: str) -> list[float]:
    """``--delays``: non-negative one-way delays in ms, in order, duplicates dropped."""
    try:
        delays = list(dict.fromkeys(float(x) for x in spec.split(",") if x.strip()))
    except ValueError:
        raise ValueError(f"--delays wants comma-separated milliseconds, got {spec!r}") from None
    if not delays or any(d < 0 for d in delays):
        raise ValueError(f"--delays wants non-negative milliseconds, got {spec!r}")
    return delays


def parse_kinds(spec: str) -> list[str]:
    kinds = list(dict.fromkeys(k.strip() for k in spec.split(",") if k.strip()))
    bad = [k for k in kinds if k not in KINDS]
    if bad or not kinds:
        raise ValueError(f"--prompts: unknown {', '.join(bad) or '(none given)'}; choose from {', '.join(KINDS)}")
    return kinds


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The arguments, checked (argparse's exit 2 with a message on a bad one); ``delays`` and
    ``kinds`` parsed into lists."""
    p = argparse.ArgumentParser(prog="python -m benchmarks.wan.speculate", description=__doc__.split("\n")[0])
    p.add_argument("--model", default="tiny", help="tiny (a seeded random 6-layer Llama), smollm2-135m or a DIR")
    p.add_argument("--delays", default="0,25", help="one-way delays per link, ms, comma-separated; the first "
                                                     "gives the cost model's engine time (0 by default)")
    p.add_argument("--tokens", type=int, default=64, help="max new tokens per generation (at least 2)")
    p.add_argument("--prompts", default=",".join(KINDS), help=f"prompt kinds, comma-separated: {', '.join(KINDS)}")
    p.add_argument("--limit", type=int, default=None, help="the first N prompts of each kind")
    p.add_argument("--out", type=Path, default=None,
                   help="where results go (default: bench-speculate, or beside --from-json's file)")
    p.add_argument("--from-json", type=Path, default=None, metavar="RESULTS_JSON",
                   help="no measuring: render results.md and results.png again from a results.json into --out")
    p.add_argument("--driver", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--bootstrap", action="append", default=[], help=argparse.SUPPRESS)
    p.add_argument("--data-dir", type=Path, default=None, help=argparse.SUPPRESS)
    p.add_argument("--delay-ms", type=float, default=0.0, help=argparse.SUPPRESS)
    p.add_argument("--wait", type=float, default=ROUTE_WAIT_S, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    try:
        args.delays = parse_delays(args.delays)
        args.kinds = parse_kinds(args.prompts)
    except ValueError as exc:
        p.error(str(exc))
    if args.tokens < 2:
        p.error(f"--tokens must be at least 2 (one decode pass), got {args.tokens}")
    if args.limit is not None and args.limit < 1:
        p.error(f"--limit must be at least 1, got {args.limit}")
    if args.driver and not args.bootstrap:
        p.error("--driver needs --bootstrap")
    if args.out is None:
        args.out = args.from_json.parent if args.from_json is not None else Path("bench-speculate")
    return args


def report(args: argparse.Namespace, runs: list[Run], wall_s: float, driver_failures: Sequence[str] = ()) -> int:
    """results.json, results.md and results.png in ``args.out``; 1 on any mismatch or failure."""
    mismatches = compare_modes(runs)
    warnings = check_runs(runs)
    apply_model(runs)
    summaries = summarize(runs)
    table = markdown(summaries, runs, mismatches, [f"FAILED {f}" for f in driver_failures] + warnings)
    print(table)
    failures = list(driver_failures) + [f"{r.prompt} ({r.mode}) at {r.delay_ms:g} ms: {r.error}"
                                        for r in runs if not r.ok]
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(
        {"model": args.model, "hops": HOPS, "legs_per_pass": LEGS, "tokens": args.tokens, "delays_ms": args.delays,
         "prompt_kinds": args.kinds, "limit": args.limit, "summaries": [asdict(s) for s in summaries],
         "runs": [asdict(r) for r in runs], "mismatches": mismatches, "failures": failures,
         "warnings": warnings, "driver_failures": list(driver_failures),
         "wall_s": round(wall_s, 1), "pid": os.getpid()}, indent=2))
    (args.out / "results.md").write_text(table + "\n")
    plotted = plot(summaries, runs, args.out / "results.png",
                   f"{args.model}, {HOPS} hops, {args.tokens} tokens: speculate=ngram vs off")
    print(f"wrote {args.out}/results.json, results.md" + (", results.png" if plotted else " (no matplotlib: no PNG)"),
          file=sys.stderr)
    for m in mismatches:
        print(f"MISMATCH: {m}", file=sys.stderr)
    for f in failures:
        print(f"FAILED: {f}", file=sys.stderr)
    for w in warnings:
        print(f"warning: {w}", file=sys.stderr)
    return 1 if mismatches or failures else 0


def runs_from_json(data: dict) -> list[Run]:
    """The runs of a results.json, as measured (the derived fields are computed again)."""
    derived = {"identical", "engine_s_per_pass", "predicted_tokens_per_s"}
    return [run_from({k: v for k, v in r.items() if k not in derived}, r["delay_ms"]) for r in data["runs"]]


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.driver:
        return driver_main(args)
    if args.from_json is not None:
        data = json.loads(args.from_json.read_text())
        for key in ("model", "tokens", "limit"):
            setattr(args, key, data.get(key, getattr(args, key)))
        args.delays, args.kinds = data.get("delays_ms", args.delays), data.get("prompt_kinds", args.kinds)
        return report(args, runs_from_json(data), data.get("wall_s", 0.0), data.get("driver_failures", []))
    from node.devtools.netns import why_unavailable

    reason = why_unavailable() or speculate_unsupported()
    if reason is not None:
        print(f"error: {reason}", file=sys.stderr)
        return 2
    # SIGTERM unwinds like Ctrl-C: the nodes stop and the namespaces go (node/devtools/netns.py)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    t0 = time.monotonic()
    work = Path(tempfile.mkdtemp(prefix="shiza-spec-"))
    print(f"work dir {work} (node logs under it; kept when the run fails)", file=sys.stderr, flush=True)
    failures: list[str] = []
    runs = measure(args, work, failures)  # an exception leaves the work dir, and its logs, behind
    if failures:
        print(f"kept {work} for its logs", file=sys.stderr)
    else:
        shutil.rmtree(work, ignore_errors=True)
    return report(args, runs, time.monotonic() - t0, failures)


if __name__ == "__main__":
    sys.exit(main())
