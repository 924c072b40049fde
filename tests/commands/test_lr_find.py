"""``finetune-helper lr-find`` on the tiny model for real: the curve, the suggestions, the plot, nothing leaked."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest

#: integration tier (make test-integration): real training steps
pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
TINY = ROOT / "recipes" / "tiny-demo.yaml"


def digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_lr_find_sweeps_the_real_model_and_suggests_within_the_bounds(tmp_path):
    base = ROOT / "finetune_helper" / "train" / "tiny-base"
    before = digest(base)
    out = subprocess.run([sys.executable, "-m", "finetune_helper", "lr-find", str(TINY), "--steps", "40", "--json",
                          "--plot", str(tmp_path / "curve.png"), "data.max_examples=600"],
                         capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-2000:]
    result = json.loads(out.stdout)
    assert set(result) >= {"lrs", "losses", "suggested_lr", "suggested_lr_clamped", "rule_lr", "plot"}
    lrs, losses = result["lrs"], result["losses"]
    assert lrs[0] == pytest.approx(1e-7) and len(lrs) == len(losses) and 10 <= len(lrs) <= 40
    assert all(b > a for a, b in zip(lrs, lrs[1:]))
    assert min(losses) < losses[0]  # the loss fell somewhere in the sweep: it trained for real
    lo, hi = result["bounds"]
    assert lo <= result["suggested_lr_clamped"] <= hi and result["rule_lr"] > 0
    assert (tmp_path / "curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert digest(base) == before  # the model it swept is untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["curve.png"]  # no run folder, no checkpoint


def test_bad_sweep_bounds_are_one_line_errors(tmp_path, capsys):
    from finetune_helper import cli

    for argv, field in ((["--start", "1e-2", "--end", "1e-3"], "--start"), (["--steps", "1"], "--steps"),
                        (["--plot", str(tmp_path / "nowhere" / "x.png")], "--plot")):
        with pytest.raises(SystemExit) as exit_info:
            cli.main(["lr-find", str(TINY), *argv])
        assert exit_info.value.code == 2 and capsys.readouterr().err.startswith(f"finetune-helper: error: {field}")
