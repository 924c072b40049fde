"""``recommend`` in a terminal: through the real CLI entry point, every printed line within COLUMNS (80 and 120),
each setting's value on its line, the one-line reasons by default, the full ones (every word, once the wrapping is
undone) with ``--explain``, and ``--json`` unchanged: the full reasons, unwrapped."""

from __future__ import annotations

import functools
import io
import itertools
import json
import os
import re

import pytest

from finetune_helper import cli
from finetune_helper.commands import common
from finetune_helper.recommender import plan as plan_module

_recommend_plan = plan_module.recommend_plan
_PLANS: dict = {}
_parser = functools.lru_cache(maxsize=1)(cli.build_parser)


def _plan_once(req):
    """``recommend_plan``, computed once per request in this module: each plan is printed four times (two widths,
    with and without --explain), and the unit tier has a time budget."""
    if req not in _PLANS:
        _PLANS[req] = _recommend_plan(req)
    return _PLANS[req]


@pytest.fixture(autouse=True)
def _plans_once(monkeypatch):
    """The same plans and the same parser (built once: argparse parsers are not changed by parsing) for every call."""
    monkeypatch.setattr(plan_module, "recommend_plan", _plan_once)
    monkeypatch.setattr(cli, "build_parser", _parser)


MODELS = ("meta-llama/Llama-3.1-8B", "Qwen/Qwen2.5-0.5B")
METHODS = ("full", "lora", "qlora")
GPUS = (("A100 80GB", 1), ("RTX 4090", 4))
GRID = [["--model", model, "--method", method, "--gpu", gpu, "--gpus", str(n)]
        for model, method, (gpu, n) in itertools.product(MODELS, METHODS, GPUS)] + [
    # does not fit; LoRA does (the escalation's first fitting rung)
    ["--model", "meta-llama/Llama-3.1-8B", "--gpu", "RTX 4090", "--method", "full"],
    # does not fit, nothing up to 64 GPUs does: the escalation's lines
    ["--model", "meta-llama/Llama-3.1-70B", "--gpu", "RTX 4090", "--method", "full"],
    # DeepSpeed ZeRO-3 with offload, planned for transformers.Trainer
    ["--model", "meta-llama/Llama-3.1-8B", "--gpu", "RTX 4090", "--gpus", "2", "--method", "full", "--strategy",
     "zero3", "--offload", "optimizer", "--trainer", "transformers"],
    # fp16 (no bfloat16), small data (target lowered), one-cycle, the width rule of the LR
    ["--model", "Qwen/Qwen2.5-0.5B", "--gpu", "T4", "--method", "full", "--dataset-size", "300", "--scheduler",
     "one_cycle", "--lr-max", "1e-3"],
]
#: Llama-3.1-8B, LoRA, one A100 80GB: the 457-character learning-rate reason of issue 21
LORA_A100 = ["--model", "meta-llama/Llama-3.1-8B", "--method", "lora", "--gpu", "A100 80GB", "--gpus", "1"]
IDS = ["-".join(a[i + 1].split("/")[-1].replace(" ", "") for i in range(0, len(a), 2)) for a in GRID]


def plan_for(argv: list[str]):
    """The plan the CLI computes for ``recommend argv``, from the same flags."""
    return common.gather_plan(cli._parse(["recommend", *argv]))


def recommend(capsys, monkeypatch, argv: list[str], columns: int | None) -> str:
    if columns is None:
        monkeypatch.delenv("COLUMNS", raising=False)
    else:
        monkeypatch.setenv("COLUMNS", str(columns))
    assert cli.main(["recommend", *argv]) == 0
    return capsys.readouterr().out


def flat(text: str) -> str:
    """The text with its wrapping undone: every run of whitespace (line breaks and indents too) one space."""
    return " ".join(text.split())


@pytest.mark.parametrize("columns", (80, 120))
@pytest.mark.parametrize("argv", GRID, ids=IDS)
def test_recommend_fits_the_width_and_explain_has_every_reason(capsys, monkeypatch, argv, columns):
    plan = plan_for(argv)
    for explain in (False, True):
        out = recommend(capsys, monkeypatch, argv + ["--explain"] * explain, columns)
        lines = out.splitlines()
        too_wide = [line for line in lines if len(line) > columns]
        assert not too_wide, f"wider than {columns}: {too_wide}"
        for setting, value, _ in plan.settings_rows():  # each value on its setting's line
            assert any(re.fullmatch(rf"{setting} +{re.escape(value)}( .*)?", line) for line in lines), (setting, value)
        text = flat(out)
        assert ("FITS: " if plan.fits else "DOES NOT FIT: ") in text
        for step in plan.escalation:
            assert f"tried {flat(step.change)}:" in text
        for key, full in plan.reasons.items():
            short = plan.short_reason(key)
            if explain:  # every full reason, word for word, where it was wrapped
                assert flat(full) in text, key
            else:
                assert flat(short) in text, key
                if short != full:
                    assert flat(full) not in text, key
        assert ("--explain:" in text) is not explain


def test_the_longest_reasons_wrap_under_their_setting(capsys, monkeypatch):
    """At 80 columns each reason is on its own lines, indented under its setting; at 120 a third column whose
    continuation lines start at that column."""
    argv = LORA_A100
    plan = plan_for(argv)
    assert max(len(r) for r in plan.reasons.values()) > 400
    narrow = recommend(capsys, monkeypatch, argv + ["--explain"], 80).splitlines()
    at = next(i for i, line in enumerate(narrow) if line.startswith("learning_rate "))
    below = list(itertools.takewhile(lambda line: line.startswith("    "), narrow[at + 1:]))
    assert len(below) >= 5 and flat(" ".join(below)) == flat(plan.reasons["learning_rate"])
    wide = recommend(capsys, monkeypatch, argv + ["--explain"], 120).splitlines()
    at = next(i for i, line in enumerate(wide) if line.startswith("learning_rate "))
    column = wide[at].index("square-root rule")
    below = list(itertools.takewhile(lambda line: line[:column].isspace(), wide[at + 1:]))
    assert len(below) >= 3 and all(line[column] != " " for line in below)
    assert flat(wide[at][column:] + " " + " ".join(below)) == flat(plan.reasons["learning_rate"])


def test_short_reasons_are_the_decision_without_the_sources(capsys, monkeypatch):
    for argv in GRID:
        plan = plan_for(argv)
        assert set(plan.short_reasons) == set(plan.reasons), argv
        for key, full in plan.reasons.items():
            short = plan.short_reason(key)
            assert short and "\n" not in short and "et al." not in short, (key, short)
            assert len(short) <= len(full), (key, short, full)
            if "(" in full:  # a derivation or a source: left to --explain
                assert short != full and len(short) < len(full), (key, short, full)
        rows, short_rows = plan.settings_rows(), plan.settings_rows(short=True)
        assert [r[:2] for r in rows] == [r[:2] for r in short_rows]
        assert {s: r for s, _, r in rows if s in plan.reasons} == {s: plan.reasons[s] for s, _, _ in rows
                                                                   if s in plan.reasons}
        assert {s: r for s, _, r in short_rows if s in plan.reasons} == {s: plan.short_reason(s) for s, _, _ in rows
                                                                         if s in plan.reasons}


def test_json_is_unchanged_full_reasons_unwrapped(capsys, monkeypatch):
    argv = LORA_A100
    plan = plan_for(argv)
    out = recommend(capsys, monkeypatch, argv + ["--json"], 80)
    data = json.loads(out)
    expected = plan.to_dict()
    expected["under_transformers_trainer"] = plan.under_trainer("transformers")
    assert data == json.loads(json.dumps(expected))
    assert data["reasons"] == plan.reasons and "short_reasons" not in data
    assert max(len(line) for line in out.splitlines()) > 400  # the JSON is not laid out for the terminal
    # the full text as it was before the short reasons existed (exports, the app and the JSON read it)
    assert data["reasons"]["learning_rate"] == (
        "square-root rule (Adam family): 2.0e-04 x sqrt(64/16) x alpha 16 of the reference / 32 here = 0.5 (Hu et "
        "al. 2021 sec. 4.1: alpha acts as the LR, the rank does not; a heuristic) = 2.00e-04; reference 2e-04 at "
        "batch 16 (QLoRA (Dettmers et al. 2023), app. B.2: LoRA r=64, alpha=16 on all linears, lr 2e-4 for "
        "7B-13B, batch 16); clamped to --lr-max 5.0e-05 (the rule asks for 2.0e-04: widen the bounds to use it)")
    assert data["reasons"]["warmup_ratio"] == (
        "5% of 471 steps (5-10% of steps); +2.50% for an effective batch 4x the reference's (Goyal et al. 2017 "
        "sec. 2.2: longer warmup) -> 7.50% = 36 steps")
    assert plan.short_reason("learning_rate") == ("square-root rule (Adam family) from 2e-04 at batch 16, x 0.5 for "
                                                  "alpha 32, clamped to --lr-max 5.0e-05 (rule: 2.0e-04)")


def test_width_from_columns_else_the_terminal_else_100(monkeypatch):
    monkeypatch.setenv("COLUMNS", "132")
    assert common.terminal_width(io.StringIO()) == 132
    monkeypatch.setenv("COLUMNS", "20")
    assert common.terminal_width(io.StringIO()) == common.MIN_WIDTH
    monkeypatch.delenv("COLUMNS")
    assert common.terminal_width(io.StringIO()) == common.DEFAULT_WIDTH == 100  # a pipe, a file

    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    monkeypatch.setattr(common.shutil, "get_terminal_size", lambda fallback: os.terminal_size((90, 30)))
    assert common.terminal_width(Terminal()) == 90


def test_wrapped_table_keeps_flags_and_figures_whole():
    rows = [("alpha", "1", "set by --no-gradient-checkpointing and 62.96 GiB " * 3), ("beta", "22", "")]
    for width in (50, 60, 80, 120):
        text = common.wrapped_table(rows, ["setting", "value", "reason"], width)
        lines = text.splitlines()
        assert all(len(line) <= width for line in lines)
        assert all(not line.endswith(("--no-", "62.96")) for line in lines)
        assert flat(rows[0][2]) in flat(text)
        assert re.search(r"^beta +22$", text, re.M)
    # the reason column would get under 40 columns: each reason on its own lines under its row
    stacked = common.wrapped_table(rows, ["setting", "value", "reason"], 50).splitlines()
    assert stacked[:4] == ["setting  value", "    reason", "-------  -----", "alpha    1"]
    assert all(line.startswith("    ") and len(line) <= 50 for line in stacked[4:-1]) and stacked[-1] == "beta     22"
    # table() itself is unchanged for the other commands (gpus, models, estimate)
    assert common.table([("a", "bb"), ("ccc", "d")], ["x", "y"]) == "x    y\n---  --\na    bb\nccc  d"
