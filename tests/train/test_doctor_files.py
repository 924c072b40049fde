"""The doctor reads any file a run folder may hold (issue 20 item 8): lines of metrics.jsonl that are not records
are skipped and counted, never a traceback; a resume's mark drops what an abandoned attempt logged past the
checkpoint it resumed from.  Run as a user runs it: ``finetune-helper doctor RUN_DIR``."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from finetune_helper import cli
from finetune_helper.train.run_folder import read_metrics_counted


def good(step: int, loss: float) -> str:
    return json.dumps({"step": step, "loss": loss, "learning_rate": 1e-4, "grad_norm": 1.0})


def folder(tmp_path: Path, lines: list[str | bytes], **files: str) -> Path:
    run = tmp_path / "run"
    run.mkdir()
    body = b"".join((line if isinstance(line, bytes) else line.encode()) + b"\n" for line in lines)
    (run / "metrics.jsonl").write_bytes(body)
    for name, text in files.items():
        (run / name.replace("_json", ".json")).write_text(text)
    return run


#: a falling loss of 20 logs, into which each case puts its bad lines
CURVE = [good(i + 1, 2.0 * math.exp(-i / 8) + 0.5) for i in range(20)]
BAD_LINES = {
    "binary": b"\x00\xff\xfe\x81 not text",
    "a list": "[1, 2]",
    "step abc": json.dumps({"step": "abc", "loss": 1.0}),
    "step null": json.dumps({"step": None, "loss": 1.0}),
    "step 1e400": '{"step": 1e400, "loss": 1.0}',
    "400-digit loss": '{"step": 3, "loss": ' + "9" * 400 + "}",
    "loss true": json.dumps({"step": 4, "loss": True}),
}


@pytest.mark.parametrize("name", list(BAD_LINES))
def test_a_line_that_is_no_record_is_skipped_and_counted(tmp_path, capsys, name):
    run = folder(tmp_path, CURVE[:10] + [BAD_LINES[name]] + CURVE[10:])
    records, skipped = read_metrics_counted(run)
    assert skipped == 1 and [r["step"] for r in records] == list(range(1, 21))
    assert all(isinstance(r["loss"], float) for r in records)  # true is no loss of 1.0
    assert cli.main(["doctor", str(run), "--json"]) == 0
    found = json.loads(capsys.readouterr().out)
    assert found["diagnosis"] == "healthy" and "1 unreadable line of metrics.jsonl skipped" in found["evidence"]


def test_a_byte_order_mark_keeps_the_first_record(tmp_path):
    run = folder(tmp_path, ["\ufeff" + CURVE[0], *CURVE[1:]])
    records, skipped = read_metrics_counted(run)
    assert skipped == 0 and records[0]["step"] == 1


@pytest.mark.parametrize("summary, args", [("[1, 2]", "{}"), ('"done"', "[]"), ("{}", "3")])
def test_summary_and_arguments_that_are_not_objects_are_taken_as_absent(tmp_path, capsys, summary, args):
    run = folder(tmp_path, CURVE, summary_json=summary, training_args_json=args)
    assert cli.main(["doctor", str(run)]) == 0
    assert capsys.readouterr().out.startswith("healthy: ")


def test_a_resumes_mark_drops_what_the_abandoned_attempt_logged_past_its_checkpoint(tmp_path, capsys):
    """Killed at step 17, resumed from checkpoint-10 and trained to 12: the curve is steps 1-12."""
    first = CURVE[:17]
    again = [json.dumps({"step": 10, "resumed_at": 10, "wall_time": 1.0}), *(good(s, 0.9) for s in (11, 12))]
    run = folder(tmp_path, first + again)
    records, _ = read_metrics_counted(run)
    assert [r["step"] for r in records] == list(range(1, 13)) and records[-1]["loss"] == 0.9
    assert cli.main(["doctor", str(run)]) == 0
    assert "steps 1-12" in capsys.readouterr().out
