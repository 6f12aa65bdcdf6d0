"""benchmarks/wan/speculate.py: the summary arithmetic, the cost model, the report and the prompt
set. Pure functions only: no network, no model."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import pytest

from benchmarks.wan.prompts import KINDS, PROMPTS, by_name, select
from benchmarks.wan.speculate import (LEGS, Run, acceptance, apply_model, check_runs, compare_modes, driver_timeout_s,
                                      engine_s_per_pass, first_divergence, main, markdown, parse_args, parse_delays,
                                      plot, predicted_curve, predicted_tokens_per_s, run_from, speedup, summarize,
                                      tokens_per_pass)


def _run(delay: float, prompt: str, mode: str, *, kind: str = "grounded", tokens: int = 17, passes: int = 17,
         decode_s: float = 1.6, drafted: int = 0, accepted: int = 0, ids: list[int] | None = None,
         error: str | None = None) -> Run:
    tok_s = (tokens - 1) / decode_s if tokens > 1 and decode_s > 0 else 0.0
    return Run(delay, kind, prompt, mode, tokens=tokens, tokens_per_s=tok_s, ttft_s=0.2, decode_s=decode_s,
               passes=passes, drafted=drafted, accepted=accepted,
               token_ids=list(range(tokens)) if ids is None else ids, error=error)


def test_tokens_per_pass_leaves_the_prefill_pass_out() -> None:
    assert tokens_per_pass(17, 17) == 1.0  # plain decoding: one token a pass
    assert tokens_per_pass(17, 5) == 4.0  # 16 decode tokens in 4 decode passes
    assert tokens_per_pass(1, 1) is None and tokens_per_pass(5, 0) is None


def test_acceptance_and_speedup_guard_their_denominators() -> None:
    assert acceptance(6, 8) == 0.75
    assert acceptance(0, 0) is None
    assert speedup(30.0, 10.0) == 3.0
    assert speedup(5.0, 0.0) is None


def test_cost_model_counts_four_legs_a_pass() -> None:
    assert LEGS == 4  # client -> n1 -> n2 -> n3 -> client
    # 0 ms: 16 passes in 1.6 s -> 0.1 s of engine a pass
    assert engine_s_per_pass(1.6, 17, 0.0) == pytest.approx(0.1)
    # measured at 25 ms, the wire is taken off: 0.2 s a pass - 4 x 25 ms
    assert engine_s_per_pass(3.2, 17, 0.025) == pytest.approx(0.1)
    assert engine_s_per_pass(1.0, 1, 0.0) is None
    # 3 tokens a pass at 25 ms with 0.1 s of engine: 3 / (0.1 + 0.1)
    assert predicted_tokens_per_s(3.0, 0.025, 0.1) == pytest.approx(15.0)
    assert predicted_tokens_per_s(1.0, 0.0, 0.1) == pytest.approx(10.0)
    assert predicted_tokens_per_s(1.0, 0.0, 0.1, n_legs=6) == pytest.approx(10.0)
    assert predicted_tokens_per_s(1.0, 0.025, 0.1, n_legs=6) == pytest.approx(1 / 0.25)
    assert predicted_tokens_per_s(2.0, 0.0, 0.0) is None


def test_first_divergence_finds_the_first_differing_token() -> None:
    assert first_divergence([1, 2, 3], [1, 2, 3]) is None
    assert first_divergence([1, 2, 3], [1, 9, 3]) == 1
    assert first_divergence([1, 2, 3], [1, 2]) == 2
    assert first_divergence([], []) is None


def test_modes_are_compared_per_delay_and_prompt_and_mismatches_reported() -> None:
    runs = [_run(0, "a", "off", ids=[1, 2, 3, 4]), _run(0, "a", "ngram", ids=[1, 2, 3, 4]),
            _run(0, "b", "off", ids=[5, 6, 7]), _run(0, "b", "ngram", ids=[5, 8, 7]),
            _run(25, "a", "off", ids=[1, 2, 3, 4]), _run(25, "a", "ngram", error="Stalled: x"),
            _run(25, "b", "ngram", ids=[5, 6, 7])]  # no off beside it
    problems = compare_modes(runs)
    assert [r.identical for r in runs] == [None, True, None, False, None, None, None]
    assert len(problems) == 1 and problems[0].startswith("b at 0 ms") and "token 1" in problems[0]


def _measured() -> list[Run]:
    """Two grounded prompts and one chat prompt at 0 and 25 ms, 17 tokens each: 16 decode tokens.

    At 0 ms, off: 16 passes in 1.6 s (0.1 s a pass); ngram: 4 decode passes of 0.15 s (0.6 s) for
    "a", 8 of 0.125 s (1.0 s) for "b"; chat "c": ngram as slow as off, nothing accepted. At 25 ms
    each pass costs 4 x 25 ms more."""
    def at(d: float) -> list[Run]:
        w = 4 * d / 1000
        return [_run(d, "a", "off", decode_s=16 * (0.1 + w)),
                _run(d, "a", "ngram", passes=5, decode_s=4 * (0.15 + w), drafted=16, accepted=12),
                _run(d, "b", "off", decode_s=16 * (0.1 + w)),
                _run(d, "b", "ngram", passes=9, decode_s=8 * (0.125 + w), drafted=16, accepted=8),
                _run(d, "c", "off", kind="chat", decode_s=16 * (0.1 + w)),
                _run(d, "c", "ngram", kind="chat", passes=17, decode_s=16 * (0.1 + w), drafted=8, accepted=0)]
    return at(0.0) + at(25.0)


def test_summary_aggregates_speedup_acceptance_and_tokens_per_pass() -> None:
    runs = _measured()
    assert compare_modes(runs) == []
    apply_model(runs)
    by = {(s.delay_ms, s.kind): s for s in summarize(runs)}
    assert list(by) == [(0.0, "grounded"), (0.0, "chat"), (25.0, "grounded"), (25.0, "chat")]
    g0 = by[(0.0, "grounded")]
    assert g0.prompts == 2 and g0.identical == 2 and g0.failed == 0
    assert g0.off_tokens_per_s == pytest.approx(10.0)  # 32 tokens / 3.2 s
    assert g0.ngram_tokens_per_s == pytest.approx(32 / 1.6, abs=1e-3)  # 32 tokens / (0.6 + 1.0) s
    assert g0.speedup == pytest.approx(2.0, abs=1e-3)
    # per prompt: a = (16 / 0.6) / 10 = 2.667, b = (16 / 1.0) / 10 = 1.6; median of two
    assert g0.median_speedup == pytest.approx((16 / 0.6 / 10 + 1.6) / 2, abs=1e-3)
    assert g0.acceptance == pytest.approx(20 / 32, abs=1e-3)
    assert g0.tokens_per_pass == pytest.approx(32 / 12, abs=1e-3)  # 32 decode tokens in 4 + 8 passes
    c0 = by[(0.0, "chat")]
    assert c0.speedup == pytest.approx(1.0) and c0.acceptance == 0.0 and c0.tokens_per_pass == 1.0
    # the model reproduces its first delay exactly, and predicts 25 ms from the engine time there
    assert g0.ngram_measured_vs_predicted == pytest.approx(1.0, abs=1e-3)
    g25 = by[(25.0, "grounded")]
    assert g25.predicted_off_tokens_per_s == pytest.approx(1 / 0.2, abs=1e-3)  # 1 token / (0.1 + 0.1) s
    assert g25.predicted_ngram_tokens_per_s == pytest.approx(32 / (4 * 0.25 + 8 * 0.225), abs=1e-3)
    assert g25.predicted_speedup == pytest.approx(g25.predicted_ngram_tokens_per_s / 5.0, abs=1e-3)
    assert g25.speedup == pytest.approx(g25.predicted_speedup, abs=1e-3)  # the fake data follow the model
    assert g25.speedup > g0.speedup  # the wire makes each saved pass worth more
    # engine time per decode pass, the wire taken off: the same at both delays
    assert (g0.off_engine_ms_per_pass, g25.off_engine_ms_per_pass) == (pytest.approx(100.0), pytest.approx(100.0))
    assert g0.ngram_engine_ms_per_pass == pytest.approx(1600 / 12, abs=1e-3)
    assert g25.ngram_engine_ms_per_pass == pytest.approx(1600 / 12, abs=1e-3)


def test_the_model_takes_engine_time_per_prompt_and_mode_from_the_first_delay() -> None:
    runs = _measured()
    apply_model(runs)
    a_ngram_25 = next(r for r in runs if (r.delay_ms, r.prompt, r.mode) == (25.0, "a", "ngram"))
    assert a_ngram_25.engine_s_per_pass == pytest.approx(0.15)
    assert a_ngram_25.predicted_tokens_per_s == pytest.approx(4 / 0.25, abs=0.01)  # 4 tokens a pass
    b_off_0 = next(r for r in runs if (r.delay_ms, r.prompt, r.mode) == (0.0, "b", "off"))
    assert b_off_0.engine_s_per_pass == pytest.approx(0.1) and b_off_0.predicted_tokens_per_s == 10.0
    # a failed run at the first delay: the next delay gives that prompt's engine time
    runs2 = [_run(0, "x", "off", error="boom"), _run(25, "x", "off", decode_s=16 * 0.2)]
    apply_model(runs2)
    assert runs2[0].predicted_tokens_per_s is None
    assert runs2[1].engine_s_per_pass == pytest.approx(0.1) and runs2[1].predicted_tokens_per_s == 5.0


def test_the_predicted_curve_meets_the_measurements_it_came_from() -> None:
    runs = _measured()
    apply_model(runs)
    first = [r for r in runs if r.delay_ms == 0.0 and r.kind == "grounded" and r.mode == "ngram"]
    at0, at25, at50 = predicted_curve(first, [0.0, 25.0, 50.0])
    assert at0 == pytest.approx(32 / 1.6)  # the aggregate measured at 0 ms
    assert at25 == pytest.approx(32 / (4 * 0.25 + 8 * 0.225))
    assert at50 == pytest.approx(32 / (4 * 0.35 + 8 * 0.325))
    assert predicted_curve([], [0.0]) == [None]


def test_runs_that_did_not_speculate_as_asked_are_flagged() -> None:
    runs = _measured()
    assert check_runs(runs) == []
    runs[1].speculate_used = "off"  # a, ngram, 0 ms
    runs[0].drafted = 3  # a, off, 0 ms
    notes = check_runs(runs)
    assert any("asked speculate=ngram, ran off" in n for n in notes)
    assert any("off drafted 3" in n for n in notes)
    for r in runs:
        if r.delay_ms == 25.0 and r.mode == "ngram":
            r.drafted = r.accepted = 0
    assert "at 25 ms no ngram generation drafted anything" in check_runs(runs)


def test_failed_generations_leave_their_prompt_out_of_the_summary() -> None:
    runs = [_run(0, "a", "off"), _run(0, "a", "ngram", passes=5, drafted=16, accepted=12),
            _run(0, "b", "off"), _run(0, "b", "ngram", error="PeerError: gone")]
    compare_modes(runs)
    apply_model(runs)
    (s,) = summarize(runs)
    assert s.prompts == 1 and s.failed == 1 and s.identical == 1
    assert s.tokens_per_pass == 4.0 and s.acceptance == 0.75


def test_markdown_shows_the_summary_the_prompts_and_mismatches_loudly() -> None:
    runs = _measured()
    runs[3].token_ids = [0, 1, 99] + runs[3].token_ids[3:]  # b, ngram, at 0 ms
    mismatches = compare_modes(runs)
    apply_model(runs)
    md = markdown(summarize(runs), runs, mismatches)
    assert md.startswith("**GREEDY OUTPUT MISMATCH")
    assert "b at 0 ms: ngram output differs from off at token 2" in md
    assert "| 0 | grounded | 2 | 1/2 | 10 | 20 | 2x |" in md
    assert "| 0 | chat | 1 | 1/1 |" in md
    assert "4 legs x one-way delay" in md and "## Per prompt" in md and "engine ms / pass ngram" in md
    assert "| 0 | grounded | b | 17 | 10 | 16 | 1.60x | 17/9 | 8/16 | 0.5 | 2 | 16 | **NO** |" in md
    assert "**NO**" in md and "Warnings" not in md
    assert "Warnings: x drifted" in markdown(summarize(runs), runs, mismatches, ["x drifted"])
    clean = _measured()
    compare_modes(clean)
    assert "MISMATCH" not in markdown(summarize(clean), clean, [])
    runs.append(_run(25, "d", "ngram", error="Stalled: hop 2"))
    assert "failed: Stalled: hop 2" in markdown(summarize(runs), runs, mismatches)


def test_plot_writes_a_png(tmp_path) -> None:
    pytest.importorskip("matplotlib")
    runs = _measured()
    compare_modes(runs)
    apply_model(runs)
    assert plot(summarize(runs), runs, tmp_path / "r.png", "t")
    assert (tmp_path / "r.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_results_json_renders_again_without_measuring(tmp_path) -> None:
    pytest.importorskip("matplotlib")
    runs = _measured()
    data = {"model": "tiny", "tokens": 17, "limit": None, "delays_ms": [0.0, 25.0],
            "prompt_kinds": ["grounded", "chat"], "runs": [asdict(r) for r in runs], "wall_s": 12.0}
    (tmp_path / "results.json").write_text(json.dumps(data))
    assert main(["--from-json", str(tmp_path / "results.json")]) == 0
    md = (tmp_path / "results.md").read_text()
    assert "| 0 | grounded | 2 | 2/2 | 10 | 20 | 2x |" in md and "MISMATCH" not in md
    again = json.loads((tmp_path / "results.json").read_text())
    assert again["mismatches"] == [] and len(again["runs"]) == len(runs) and again["wall_s"] == 12.0
    assert (tmp_path / "results.png").stat().st_size > 0
    data["runs"][3]["token_ids"] = [0, 1, 99]  # b, ngram, 0 ms
    (tmp_path / "results.json").write_text(json.dumps(data))
    assert main(["--from-json", str(tmp_path / "results.json"), "--out", str(tmp_path / "o")]) == 1
    assert (tmp_path / "o" / "results.md").read_text().startswith("**GREEDY OUTPUT MISMATCH")
    data["runs"][3]["token_ids"] = runs[3].token_ids
    data["driver_failures"] = ["the driver failed (1) at 25 ms"]
    (tmp_path / "results.json").write_text(json.dumps(data))
    assert main(["--from-json", str(tmp_path / "results.json")]) == 1  # a failed delay fails the run
    assert "FAILED the driver failed (1) at 25 ms" in (tmp_path / "results.md").read_text()
    assert json.loads((tmp_path / "results.json").read_text())["driver_failures"] == data["driver_failures"]


def test_driver_records_become_runs() -> None:
    rec = {"kind": "chat", "prompt": "poem-autumn", "mode": "ngram", "prompt_tokens": 30, "tokens": 9,
           "tokens_per_s": 12.5, "ttft_s": 0.3, "decode_s": 0.64, "passes": 4, "drafted": 9, "accepted": 5,
           "pushed_steps": 12, "token_ids": [1, 2, 3], "text": "Leaves", "unknown_later_field": 1}
    r = run_from(json.loads(json.dumps(rec)), 25.0)
    assert (r.delay_ms, r.kind, r.prompt, r.mode, r.passes, r.accepted) == (25.0, "chat", "poem-autumn", "ngram", 4, 5)
    assert r.ok and r.per_pass == pytest.approx(8 / 3)
    bad = run_from({"kind": "chat", "prompt": "x", "mode": "off", "prompt_tokens": 3, "error": "boom"}, 0.0)
    assert not bad.ok and bad.tokens == 0


def test_the_prompt_set_has_enough_of_each_kind_and_grounded_ones_carry_text() -> None:
    assert KINDS == ("grounded", "chat")
    grounded = [p for p in PROMPTS if p.kind == "grounded"]
    chat = [p for p in PROMPTS if p.kind == "chat"]
    assert len(grounded) >= 20 and len(chat) >= 8
    assert len({p.name for p in PROMPTS}) == len(PROMPTS)  # names are unique
    assert {p.kind for p in PROMPTS} == set(KINDS)
    for p in grounded:
        instruction, _, passage = p.text.partition("\n\n")
        assert instruction and passage, p.name
        if "def " in passage or "class " in passage:
            continue  # a code snippet
        assert 40 <= len(passage.split()) <= 120, (p.name, len(passage.split()))
    assert sum(1 for p in grounded if "def " in p.text) >= 5  # code edits
    assert all(len(p.text.split()) < 40 for p in chat)  # nothing to copy
    assert all(p.text.isascii() for p in PROMPTS)
    assert by_name("fix-sum").kind == "grounded"


def test_prompt_selection_keeps_kind_order_and_limits_each_kind() -> None:
    both = select(["chat", "grounded"], 2)
    assert [p.kind for p in both] == ["chat", "chat", "grounded", "grounded"]
    assert [p.name for p in both[:2]] == [p.name for p in PROMPTS if p.kind == "chat"][:2]
    assert len(select()) == len(PROMPTS)
    assert len(select(["chat"])) == sum(p.kind == "chat" for p in PROMPTS)
    with pytest.raises(ValueError, match="unknown"):
        select(["poems"])
    with pytest.raises(ValueError, match="at least 1"):
        select(["chat"], 0)


def test_arguments_parse_and_bad_ones_are_refused(capsys) -> None:
    a = parse_args([])
    assert (a.model, a.delays, a.tokens, a.kinds, a.limit, a.driver) == ("tiny", [0.0, 25.0], 64,
                                                                         ["grounded", "chat"], None, False)
    a = parse_args(["--model", "smollm2-135m", "--delays", "0,25,25,50", "--tokens", "16", "--prompts", "chat",
                    "--limit", "3"])
    assert (a.delays, a.tokens, a.kinds, a.limit) == ([0.0, 25.0, 50.0], 16, ["chat"], 3)
    assert parse_delays(" 10 , 0") == [10.0, 0.0]
    assert parse_args([]).out == Path("bench-speculate")
    assert parse_args(["--from-json", "/tmp/x/results.json"]).out == Path("/tmp/x")
    for bad, says in ((["--delays", "0,-5"], "non-negative"), (["--delays", "fast"], "milliseconds"),
                      (["--delays", ","], "non-negative"), (["--prompts", "grounded,poems"], "unknown poems"),
                      (["--tokens", "1"], "at least 2"), (["--limit", "0"], "--limit"),
                      (["--driver"], "--bootstrap")):
        with pytest.raises(SystemExit) as exc:
            parse_args(bad)
        assert exc.value.code == 2
        assert says in capsys.readouterr().err, bad


def test_the_driver_is_bounded_by_its_generations() -> None:
    assert driver_timeout_s(10) > driver_timeout_s(1) > 0
    assert driver_timeout_s(10) - driver_timeout_s(9) == pytest.approx(2 * 120.0)
