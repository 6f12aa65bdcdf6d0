"""Replay drafting policies against a speculate run's greedy outputs (issue 18), in seconds.

    python -m benchmarks.wan.replay --results bench-out/speculate/results.json [--model M]
        [--window-step-ms 35] [--per-position-ms 3] [--out DIR]

A speculate run (benchmarks/wan/speculate.py) records each prompt's plain greedy output. Greedy
verification keeps a draft exactly when it is the token plain decoding chose there, so how any
window policy would have fared on those prompts can be counted without a swarm: which drafts
prompt lookup proposes, how many are kept, how many passes it takes. Time comes from a cost
model per delay: a plain pass costs what the run measured (the median over its plain
generations of decode s / decode passes), a window pass that plus ``--window-step-ms`` and
``--per-position-ms`` per position past two (this CPU: the bundled model whole, one thread, 150
positions cached, takes 62 ms for one position, 99 for two, 140 for 17 and 195 for 33).

Policies:

    window     node/client/drafts.py's Window, as the client runs it (k_max 16)
    window32   the same with k_max 32
    inflight   two windows in flight: with window n (k drafts from Window) the client also
               sends window n+1, the next k drafts, built on window n being kept whole (its
               first position the draft after window n, standing for the last hop's token
               there); it counts when window n is kept whole and that draft was right. Window
               n+1 trails window n by one hop's engine time for its positions; a discarded one
               costs nothing here (its compute is free, as it would be on an idle node), so
               this is the most it could give
    fixed16    16 drafts whenever prompt lookup has them

Each row: the replayed speedup over plain decoding (same prompts, same cost model), tokens per
pass, and acceptance; for ``window`` also the replayed time over the measured one (the run's
ngram generations), which says how far to trust the cost model. results.json, results.md and
results.png go to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Sequence

from node.client.drafts import PromptLookup, Window

POLICIES = ("window", "window32", "inflight", "fixed16")


@dataclass(frozen=True)
class PassCost:
    """Seconds of one pass through the pipeline, client to client."""

    plain_s: float
    window_step_s: float = 0.035
    per_position_s: float = 0.003
    legs_s: float = 0.0  # of plain_s, the links' delay (legs x one-way delay)
    hops: int = 3

    def __call__(self, positions: int) -> float:
        if positions <= 1:
            return self.plain_s
        return self.plain_s + self.window_step_s + self.per_position_s * (positions - 2)

    def hop_engine_s(self, positions: int) -> float:
        """One hop's share of the engine time of a pass of ``positions``."""
        return max(0.0, self(positions) - self.legs_s) / self.hops


@dataclass
class Replayed:
    tokens: int = 0  # decode tokens (after the prefill's first token)
    seconds: float = 0.0
    passes: int = 0
    drafted: int = 0
    accepted: int = 0


class _Fixed:
    def __init__(self, k: int) -> None:
        self.k = k

    def size(self) -> int:
        return self.k

    def update(self, drafted: int, accepted: int, seconds: float | None = None) -> None:
        pass


def _kept(drafts: Sequence[int], truth: Sequence[int], at: int) -> int:
    """How many of ``drafts`` greedy verification keeps, the plain output from ``at`` on."""
    a = 0
    while a < len(drafts) and at + a < len(truth) and drafts[a] == truth[at + a]:
        a += 1
    return a


def replay(prompt: Sequence[int], output: Sequence[int], policy: str, cost: PassCost) -> Replayed:
    """One generation of ``output`` (the plain greedy tokens after ``prompt``) under ``policy``:
    as node/client/swarm.py's ``_speculate`` runs it, the prefill's first token given."""
    if policy not in POLICIES:
        raise ValueError(f"unknown policy {policy!r}; choose one of {', '.join(POLICIES)}")
    window: Window | _Fixed = (_Fixed(16) if policy == "fixed16"
                               else Window(k_max=32) if policy == "window32" else Window())
    drafter = PromptLookup()
    drafter.extend(prompt)
    out = Replayed()
    if not output:
        return out
    drafter.extend(output[:1])
    at = 1  # output[at] is the next token to emit
    while at < len(output):
        room = len(output) - at
        k = min(window.size(), room - 1)
        if policy == "inflight" and k > 0:
            ahead = drafter.propose(2 * k + 1)
            drafts, second = ahead[:k], ahead[k:]
        else:
            drafts, second = (drafter.propose(k) if k > 0 else []), []
        a = _kept(drafts, output, at)
        seconds = cost(len(drafts) + 1)
        window.update(len(drafts), a, seconds)
        got = a + 1
        out.passes += 1
        out.drafted += len(drafts)
        out.accepted += a
        if a == len(drafts) == k and len(second) >= 2 and second[0] == output[at + a]:  # a <= k < room
            # window n kept whole and window n+1 built on the right token: it counts
            b = _kept(second[1:], output, at + got)
            seconds += cost.hop_engine_s(len(second))
            window.update(len(second) - 1, b, cost(len(second)))
            got += b + 1
            out.passes += 1
            out.drafted += len(second) - 1
            out.accepted += b
        got = min(got, room)
        drafter.extend(output[at:at + got])
        at += got
        out.tokens += got
        out.seconds += seconds
    return out


@dataclass
class Row:
    delay_ms: float
    kind: str
    policy: str
    prompts: int
    speedup: float | None  # replayed plain time / replayed policy time, over the prompts
    tokens_per_pass: float | None
    acceptance: float | None
    replayed_over_measured: float | None = None  # window only: replayed s / the run's ngram decode s


def _ratio(a: float, b: float) -> float | None:
    return round(a / b, 3) if b > 0 else None


def replay_run(data: dict, encode: Callable[[str], list[int]], window_step_s: float = 0.035,
               per_position_s: float = 0.003) -> list[Row]:
    """Every policy on every (delay, kind) of a speculate results.json."""
    from benchmarks.wan.prompts import by_name

    legs = int(data.get("legs_per_pass", 4))
    hops = int(data.get("hops", 3))
    runs = [r for r in data["runs"] if r.get("error") is None]
    rows: list[Row] = []
    for delay in sorted({r["delay_ms"] for r in runs}):
        plain = [r for r in runs if r["delay_ms"] == delay and r["mode"] == "off" and r["passes"] > 1]
        if not plain:
            continue
        cost = PassCost(statistics.median(r["decode_s"] / (r["passes"] - 1) for r in plain),
                        window_step_s, per_position_s, legs * delay / 1000.0, hops)
        measured = {r["prompt"]: r for r in runs if r["delay_ms"] == delay and r["mode"] == "ngram"}
        for kind in sorted({r["kind"] for r in plain}):
            mine = [r for r in plain if r["kind"] == kind]
            cases = [(encode(by_name(r["prompt"]).text), r["token_ids"], r["prompt"]) for r in mine]
            base = sum(cost(1) * max(0, len(out) - 1) for _, out, _ in cases)
            for policy in POLICIES:
                got = [(replay(p, out, policy, cost), name) for p, out, name in cases]
                secs = sum(g.seconds for g, _ in got)
                passes = sum(g.passes for g, _ in got)
                drafted = sum(g.drafted for g, _ in got)
                row = Row(delay, kind, policy, len(got), _ratio(base, secs),
                          _ratio(sum(g.tokens for g, _ in got), passes), _ratio(sum(g.accepted for g, _ in got), drafted))
                if policy == "window":
                    real = [(g.seconds, measured[n]["decode_s"]) for g, n in got if n in measured]
                    row.replayed_over_measured = _ratio(sum(a for a, _ in real), sum(b for _, b in real))
                rows.append(row)
    return rows


def markdown(rows: Sequence[Row], source: str) -> str:
    head = ["one-way delay", "prompts", "policy", "replayed speedup", "tokens / pass", "acceptance",
            "replayed / measured time"]
    lines = [f"Replayed from {source}", "", "| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for r in rows:
        cells = [f"{r.delay_ms:g} ms", r.kind, r.policy, None if r.speedup is None else f"{r.speedup:.2f}x",
                 r.tokens_per_pass, r.acceptance, r.replayed_over_measured]
        lines.append("| " + " | ".join("" if c is None else str(c) for c in cells) + " |")
    return "\n".join(lines)


def plot(rows: Sequence[Row], path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    groups = sorted({(r.delay_ms, r.kind) for r in rows})
    fig, ax = plt.subplots(figsize=(8, 4))
    width = 0.8 / len(POLICIES)
    for i, policy in enumerate(POLICIES):
        vals = [next((r.speedup or 0 for r in rows if (r.delay_ms, r.kind) == g and r.policy == policy), 0)
                for g in groups]
        ax.bar([j + i * width for j in range(len(groups))], vals, width, label=policy)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(groups))], [f"{d:g} ms {k}" for d, k in groups])
    ax.axhline(1.0, color="grey", lw=0.8)
    ax.set_ylabel("replayed speedup over plain")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.wan.replay", description=__doc__.split("\n")[0])
    ap.add_argument("--results", type=Path, required=True, help="a benchmarks.wan.speculate results.json")
    ap.add_argument("--model", default=None, help="the model whose tokenizer encodes the prompts (default: the run's)")
    ap.add_argument("--window-step-ms", type=float, default=35.0)
    ap.add_argument("--per-position-ms", type=float, default=3.0)
    ap.add_argument("--out", type=Path, default=Path("bench-out/replay"))
    args = ap.parse_args(argv)
    try:
        data = json.loads(args.results.read_text())
    except (OSError, ValueError) as exc:
        print(f"error: cannot read {args.results}: {exc}", file=sys.stderr)
        return 2
    from node.cli.model import load_text_model

    text_model = load_text_model(args.model or data.get("model") or "smollm2-135m")
    rows = replay_run(data, text_model.encode, args.window_step_ms / 1000.0, args.per_position_ms / 1000.0)
    table = markdown(rows, str(args.results))
    print(table)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps({"source": str(args.results), "window_step_ms": args.window_step_ms,
                                                       "per_position_ms": args.per_position_ms,
                                                       "rows": [asdict(r) for r in rows]}, indent=2))
    (args.out / "results.md").write_text(table + "\n")
    plotted = plot(rows, args.out / "results.png")
    print(f"wrote {args.out}/results.json, results.md" + (", results.png" if plotted else ""), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
