"""``finetune-helper lr-find`` checks where it writes before anything loads (issue 20): the plot's and the curve's
paths, for real (a folder that refuses a file), and names the file it writes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from finetune_helper.commands.lr_find import PLOT_NAME, plot_path
from finetune_helper.errors import FinetuneHelperError

ROOT = Path(__file__).resolve().parents[2]
TINY = ROOT / "recipes" / "tiny-demo.yaml"
#: a folder that refuses a new file even to root (sysfs)
REFUSING = Path("/sys")


def test_the_plot_path_is_the_file_written(tmp_path):
    assert plot_path(str(tmp_path)) == tmp_path / PLOT_NAME  # a folder: the default name in it
    assert plot_path(str(tmp_path / "curve")) == tmp_path / "curve.png"  # no suffix: matplotlib's .png, said
    assert plot_path(str(tmp_path / "curve.SVG")) == tmp_path / "curve.SVG"
    assert list(tmp_path.iterdir()) == []  # checking leaves nothing behind
    with pytest.raises(FinetuneHelperError) as refused:
        plot_path(str(tmp_path / "curve.txt"))
    assert refused.value.field == "plot" and ".png" in refused.value.message


@pytest.mark.integration  # five interpreters: the integration tier
@pytest.mark.skipif(not REFUSING.is_dir(), reason="needs /sys")
def test_bad_outputs_are_refused_before_anything_loads(tmp_path):
    """Each refused in one line naming the flag, exit 2, neither torch nor transformers imported (the sweep takes
    minutes; a crash after it lost the result).  ``--json`` in a folder that refuses files: the default plot there
    is refused too, so the result is not lost."""
    (tmp_path / "taken").mkdir()
    cases = [(["--plot", str(tmp_path / "x.txt")], "--plot", None),
             (["--curve", "/nope/c.json"], "--curve", None),
             (["--curve", str(tmp_path / "taken")], "--curve", None),
             (["--plot", str(REFUSING / "x.png")], "--plot", None),
             (["--json"], "--plot", str(REFUSING))]
    probe = ("import json, sys\n"
             "from finetune_helper import cli\n"
             "try:\n"
             f"    code = cli.main(['lr-find', {str(TINY)!r}, *json.loads(sys.argv[1])])\n"
             "except SystemExit as exc:\n"
             "    code = exc.code\n"
             "print(json.dumps({'code': code, 'loaded': [m for m in ('torch', 'transformers') if m in sys.modules]}))\n")
    for argv, flag, cwd in cases:
        out = subprocess.run([sys.executable, "-c", probe, json.dumps(argv)], capture_output=True, text=True,
                             timeout=120, cwd=cwd or tmp_path)
        assert json.loads(out.stdout.strip().splitlines()[-1]) == {"code": 2, "loaded": []}, (argv, out.stderr)
        lines = out.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith(f"finetune-helper: error: {flag}: "), (argv, lines)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["taken"]
