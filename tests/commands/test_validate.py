"""``finetune-helper validate`` says what ``run`` would say here: the same one-line refusal for what ``run`` refuses on
this machine and for data it cannot read, and no library notices besides."""

from __future__ import annotations

import gzip
import logging
from pathlib import Path

import pytest

from finetune_helper import cli

#: integration tier (make test-integration): real torch / transformers / trainer / server work
pytestmark = pytest.mark.integration

TINY = Path(__file__).resolve().parents[2] / "recipes" / "tiny-demo.yaml"


def refusal(argv: list[str], capsys) -> str:
    """The one line a command that refuses prints on stderr (it must exit 2)."""
    with pytest.raises(SystemExit) as exit_info:
        cli.main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 2 and len(err) == 1, (argv, err)
    return err[0]


@pytest.mark.parametrize("overrides", [["hardware.strategy=zero2"], ["hardware.strategy=zero3"],
                                       ["training.deepspeed={}"]], ids=["zero2", "zero3", "training.deepspeed"])
def test_deepspeed_without_cuda_is_refused_by_validate_as_run_refuses_it(overrides, tmp_path, capsys):
    """``run`` refuses DeepSpeed on a machine without CUDA at once (preflight.check_deepspeed); ``validate``, which
    answers "will run accept this here?", refuses it with the same line (it said ok).  ``run --dry-run`` still
    writes the run's arguments."""
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: run does not refuse DeepSpeed here")
    ran = refusal(["run", str(TINY), *overrides, "--output-dir", str(tmp_path / "run")], capsys)
    assert ran.startswith("finetune-helper: error: hardware.strategy: ") and "DeepSpeed runs on CUDA GPUs" in ran
    assert refusal(["validate", str(TINY), *overrides], capsys) == ran
    assert not (tmp_path / "run").exists()
    assert cli.main(["run", str(TINY), *overrides, "--dry-run", "--output-dir", str(tmp_path / "dry")]) == 0


def _gzipped(path: Path) -> None:
    path.write_bytes(gzip.compress(b'{"instruction": "What is 1 + 1?", "output": "2"}\n'))


def _binary_in_folder(path: Path) -> None:
    path.mkdir()
    _gzipped(path / "part.jsonl")


@pytest.mark.parametrize("name, make, expected", [
    ("empty.jsonl", lambda p: p.write_bytes(b""), "{path} is empty"),
    ("gzipped.jsonl", _gzipped, "{path} is not UTF-8 text"),
    ("folder", _binary_in_folder, "{path}/part.jsonl is not UTF-8 text"),
])
def test_unreadable_data_is_one_field_error_in_validate_and_run(name, make, expected, tmp_path, capsys):
    """An empty data file, binary data, a folder of it: ``validate`` and ``run --dry-run`` refuse with the same line
    naming data.path and the file (they printed "StopIteration" and "DatasetGenerationError")."""
    path = tmp_path / name
    make(path)
    want = f"finetune-helper: error: data.path: {expected.format(path=path)}"
    for argv in (["validate", str(TINY)], ["run", str(TINY), "--dry-run", "--output-dir", str(tmp_path / "r")]):
        line = refusal([*argv, f"data.path={path}"], capsys)
        assert line.startswith(want), (argv, line)
    assert not (tmp_path / "r").exists()


def test_the_kernels_trust_notice_is_held_back_and_the_rest_of_its_log_is_not(caplog):
    """kernels 0.17.2 logs "Skipping publisher trust check for '<repo>' because Hugging Face Hub is in offline mode."
    on ``kernels.hf_hub`` (``_check_trust_remote_code``) when bitsandbytes asks it for its CPU kernel at import, on a
    CPU with AVX512-BF16: every command that loads the stack printed it.  Neither kernels nor such a CPU is on the
    test machines, so the record is logged here as kernels logs it, after ``cli.main`` set up the libraries' logs."""
    assert cli.main(["gpus"]) == 0
    kernels_log = logging.getLogger("kernels.hf_hub")
    with caplog.at_level(logging.WARNING):
        kernels_log.warning("Skipping publisher trust check for 'kernels-community/quantization-bitsandbytes' "
                            "because Hugging Face Hub is in offline mode.")
        kernels_log.warning("Kernel repository 'x/y' has no build for this platform")
    assert [r.getMessage() for r in caplog.records if r.name == "kernels.hf_hub"] == [
        "Kernel repository 'x/y' has no build for this platform"]
