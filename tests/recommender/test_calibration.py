"""Calibrations from ``finetune-helper probe``: stored per device, model and method, used by later plans."""

from __future__ import annotations

import json

import pytest

import finetune_helper as fh
from finetune_helper.recommender import calibration
from finetune_helper.recommender.calibration import Calibration


@pytest.fixture()
def store(tmp_path, monkeypatch):
    path = tmp_path / "calibration.json"
    monkeypatch.setenv("FINETUNE_HELPER_CALIBRATION", str(path))
    return path


def cal(ratio: float, **kw) -> Calibration:
    return Calibration(**{"device": "H100 SXM 80GB", "model": "meta-llama/Llama-3.1-8B", "method": "lora",
                          "ratio": ratio, "measured_bytes": 1, "estimated_bytes": 1, "micro_batch": 2,
                          "date": "2026-11-29", "measure": "cuda max_memory_allocated", **kw})


def test_stored_calibrations_are_found_by_device_model_and_method(store):
    assert calibration.lookup("H100 SXM 80GB", "meta-llama/Llama-3.1-8B", "lora") is None
    calibration.save(cal(1.1))
    calibration.save(cal(0.9, method="full"))
    assert calibration.lookup("h100 sxm 80gb", "meta-llama/Llama-3.1-8B", "lora").ratio == 1.1
    assert calibration.lookup("H100 SXM 80GB", "meta-llama/Llama-3.1-8B", "full").ratio == 0.9
    assert calibration.lookup("A100 80GB SXM", "meta-llama/Llama-3.1-8B", "lora") is None
    assert len(json.loads(store.read_text())) == 2


def test_implausible_or_unreadable_calibrations_are_not_used(store):
    with pytest.raises(ValueError, match="outside"):
        calibration.save(cal(3.0))
    store.write_text("{not json")
    assert calibration.lookup("H100 SXM 80GB", "meta-llama/Llama-3.1-8B", "lora") is None


def test_a_plan_uses_the_calibration_and_says_so(store):
    plain = fh.recommend("meta-llama/Llama-3.1-8B", gpu="H100", method="lora", dataset_size=5000)
    calibrated = fh.recommend("meta-llama/Llama-3.1-8B", gpu="H100", method="lora", dataset_size=5000,
                              calibration=cal(1.2))
    b = calibrated.per_device_train_batch_size
    again = fh.estimate_memory(plain.request.model, plain.request.setup(b, calibrated.gradient_checkpointing),
                               accumulation=calibrated.gradient_accumulation_steps)
    assert calibrated.peak_memory_bytes == again.total_bytes + round(0.2 * again.allocated_peak)
    assert b <= plain.per_device_train_batch_size
    assert "calibrated on H100 SXM 80GB on 2026-11-29: +20%" in calibrated.reasons["fits"]


def test_the_cli_plans_with_the_stored_calibration(store):
    from finetune_helper.commands.common import gather_plan
    from finetune_helper.cli import build_parser

    calibration.save(cal(1.2))
    args = build_parser().parse_args(["recommend", "--model", "llama-3.1-8b", "--gpu", "H100", "--method", "lora"])
    assert "+20%" in gather_plan(args).reasons["fits"]
