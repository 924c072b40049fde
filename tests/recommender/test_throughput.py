"""The time model's outputs as the CLI shows them, its refusals, and its constants as their stated derivation gives
them.  Its accuracy is measured by ``benchmarks/time_vs_published.py`` against published rows (calibration and
held-out HF-Trainer / TRL rows); the test here runs that benchmark and checks what it derives is what the data file
says, not how close it lands."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest

from finetune_helper import cli
from finetune_helper.units import fmt_run_length

ROOT = Path(__file__).resolve().parents[2]


def run_json(capsys, *argv: str) -> dict:
    assert cli.main(list(argv)) == 0
    return json.loads(capsys.readouterr().out)


def test_estimate_json_always_carries_flops_and_with_a_gpu_its_speed(capsys):
    plain = run_json(capsys, "estimate", "--model", "Qwen/Qwen2.5-0.5B", "--json")
    assert {"flops_per_token", "model_flops_per_token"} <= set(plain["time"])
    assert "tokens_per_second_per_gpu" not in plain["time"]
    fast = run_json(capsys, "estimate", "--model", "Qwen/Qwen2.5-0.5B", "--json", "--gpu", "H100 SXM 80GB")
    slow = run_json(capsys, "estimate", "--model", "Qwen/Qwen2.5-0.5B", "--json", "--gpu", "T4")
    for data in (fast, slow):
        assert {"tokens_per_second_per_gpu", "seconds_per_micro_step", "mfu"} <= set(data["time"])
        assert 0 < data["time"]["mfu"] < 1
    assert fast["time"]["tokens_per_second_per_gpu"] > 5 * slow["time"]["tokens_per_second_per_gpu"]


def test_recommend_json_has_the_runs_length_and_its_cost(capsys):
    data = run_json(capsys, "recommend", "--model", "meta-llama/Llama-3.1-8B", "--gpu", "A100 80GB", "--method",
                    "lora", "--json", "--price-per-hour", "2")
    time = data["time"]
    assert {"seconds_per_step", "total_seconds", "tokens_per_second_per_gpu", "mfu"} <= set(time)
    assert time["cost"]["gpus"] == 1 and time["cost"]["total"] > 0
    tokens = data["effective_batch_size"] * data["seq_len"] * data["total_steps"]
    # the run's tokens at the predicted rate take the predicted total (the rate and the total from one model)
    assert time["total_seconds"] == pytest.approx(tokens / time["tokens_per_second_per_gpu"], rel=1e-6)


@pytest.mark.parametrize("argv,field", [
    (["recommend", "--model", "7B", "--gpu", "A100 80GB", "--price-per-hour", "-1"], "price-per-hour"),
    (["recommend", "--model", "7B", "--gpu", "A100 80GB", "--price-per-hour", "nan"], "price-per-hour"),
    (["estimate", "--model", "7B", "--gpu", "24GB"], "gpu"),
])
def test_bad_time_inputs_are_one_line_field_errors(capsys, argv, field):
    with pytest.raises(SystemExit) as exit_:
        cli.main(argv)
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"--{field}" in err, err


def test_the_printed_plan_gives_the_predicted_time(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "100")
    assert cli.main(["recommend", "--model", "meta-llama/Llama-3.1-8B", "--gpu", "RTX 4090", "--method", "qlora",
                     "--price-per-hour", "0.4"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"Predicted on RTX 4090 .* tokens/s per\s+GPU", out) and "at 0.4 per GPU-hour" in out


def test_durations_read_at_a_plans_precision():
    assert [fmt_run_length(s) for s in (0.0042, 4.2, 42, 600, 3 * 3600 + 5 * 60, 50 * 3600)] == [
        "0.0042 s", "4.2 s", "42 s", "10 min", "3 h 05 min", "2 d 2 h"]


def test_offload_steps_include_the_hosts_adam_at_one_thread_per_rank():
    """DeepSpeed's CPU Adam runs synchronously in the optimizer step: with several ranks per node each updates its
    partition on one thread (torchrun's OMP_NUM_THREADS=1), so 8 ranks take a quarter of 2 ranks' host time; one
    process uses every core and is bound by the host's memory bandwidth instead."""
    from finetune_helper.recommender.gpu import resolve_gpu
    from finetune_helper.recommender.model import resolve_model
    from finetune_helper.recommender.throughput import constants, step_time
    from finetune_helper.recommender.training_setup import TrainingSetup

    spec, gpu = resolve_model("meta-llama/Llama-3.1-8B"), resolve_gpu("RTX 4090")
    setup = TrainingSetup(method="full", micro_batch_size=1, seq_len=2048, gradient_checkpointing=True)
    host = {n: step_time(spec, setup, gpu, gpus=n, sharding="zero3", offload="optimizer") for n in (1, 2, 8)}
    plain = step_time(spec, setup, gpu, gpus=2, sharding="zero3")
    assert "host_adam" not in plain.parts and all("host_adam" in t.parts for t in host.values())
    adam = {n: t.parts["host_adam"] for n, t in host.items()}
    assert adam[2] == pytest.approx(4 * adam[8])
    const = constants()["host_adam"]
    n = spec.num_parameters()
    assert adam[1] == pytest.approx(n * const["bytes_per_parameter"] / (const["host_memory_gbps"] * 1e9))
    assert adam[1] < adam[2]  # every core of one host against one thread per rank
    assert host[2].seconds_per_step > plain.seconds_per_step + adam[2] - plain.optimizer


def test_small_micro_steps_of_a_large_model_are_bound_by_the_host_issuing_operators():
    """Eager PyTorch issues every operator from the host: a 7B LoRA micro-step on 256 tokens cannot run faster than
    its operators are issued (Qwen's profile: 0.15-0.175 s on an A100 against about 0.07 s of matmuls), so its
    tokens/s is below that of a long micro-step; a long one is bound by its matmuls, not the host."""
    from finetune_helper.recommender.gpu import resolve_gpu
    from finetune_helper.recommender.model import resolve_model
    from finetune_helper.recommender.throughput import step_time
    from finetune_helper.recommender.training_setup import TrainingSetup

    spec, gpu = resolve_model("Qwen/Qwen2.5-7B"), resolve_gpu("A100 80GB SXM")

    def timed(seq: int, gc: bool = True):
        return step_time(spec, TrainingSetup(method="lora", micro_batch_size=1, seq_len=seq, gradient_checkpointing=gc),
                         gpu, accumulation=8)

    short, long = timed(256), timed(8192)
    assert short.bound == "host" and short.micro_step == short.parts["host"] > short.parts["compute"]
    assert long.bound == "compute" and long.parts["host"] < long.parts["compute"] / 10
    assert short.tokens_per_second_per_gpu < long.tokens_per_second_per_gpu / 1.5
    # checkpointing's recompute issues the forward's operators twice: more host time for the same tokens
    assert timed(256).parts["host"] > 1.3 * timed(256, gc=False).parts["host"]


def test_the_stored_efficiency_is_what_the_calibration_rows_give(capsys):
    """``data/throughput.yaml``'s efficiency per GPU class, and its host time per operator, are the medians that
    ``time_vs_published.py --calibrate`` derives from the published calibration rows (a data file that drifted from
    its derivation fails here)."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import time_vs_published
    finally:
        sys.path.pop(0)
    from finetune_helper.recommender.throughput import constants

    assert time_vs_published.main(["--calibrate"]) == 0
    out = capsys.readouterr().out
    derived = {kind: float(value) for kind, value in re.findall(r"^  (\w+): ([\d.]+) \(", out, re.M)}
    stored = constants()["efficiency"]
    assert derived and all(stored[kind] == pytest.approx(value, abs=0.005) for kind, value in derived.items())
    host = re.search(r"median host time per operator .*: ([\d.e-]+) s \((\d+) rows\)", out)
    assert host and int(host.group(2)) >= 2
    assert constants()["host_seconds_per_op"] == pytest.approx(float(host.group(1)), rel=0.02)
    assert time_vs_published.main([]) == 0
    assert re.search(r"\d+ held-out rows: median \|error\| \d+%", capsys.readouterr().out)


def test_the_run_summary_shows_the_measured_rate_next_to_the_prediction():
    from finetune_helper.train.finish import format_summary

    summary = {"status": "done", "global_step": 10, "max_steps": 10, "tokens_per_second_per_gpu": 2900.0,
               "seconds_per_step": 22.6, "mfu": 0.44, "predicted": {"gpu": "A100 80GB SXM",
               "tokens_per_second_per_gpu": 3170.0, "seconds_per_step": 20.7, "mfu": 0.49}}
    line = next(x for x in format_summary(summary).splitlines() if x.startswith("throughput"))
    assert line == ("throughput: 2,900 tokens/s per GPU, 22.6 s per optimizer step, MFU 44%; predicted for A100 80GB "
                    "SXM: 3,170 tokens/s, 20.7 s per step, MFU 49%")


def test_a_probed_speed_calibration_scales_later_plans_and_says_so(tmp_path, monkeypatch):
    """What ``probe`` stores on a GPU (measured / predicted tokens per second) is read back by later plans for the
    same GPU, model and method: the predicted rate scales by it and the time line names it; an implausible ratio
    is not applied, and a calibration stored before speeds were (no speed fields) still reads."""
    import finetune_helper as fh
    from finetune_helper.recommender.calibration import Calibration, lookup, save

    monkeypatch.setenv("FINETUNE_HELPER_CALIBRATION", str(tmp_path / "cal.json"))
    plain = fh.recommend("meta-llama/Llama-3.1-8B", gpu="A100 80GB", method="lora")
    base = dict(device="A100 80GB SXM", model="meta-llama/Llama-3.1-8B", method="lora", ratio=1.02,
                measured_bytes=100, estimated_bytes=98, micro_batch=2, date="2026-12-07", measure="cuda")
    save(Calibration(**base, speed_ratio=0.8, tokens_per_second=3800.0))
    cal = lookup("A100 80GB SXM", "meta-llama/Llama-3.1-8B", "lora")
    slower = fh.recommend("meta-llama/Llama-3.1-8B", gpu="A100 80GB", method="lora", calibration=cal)
    ratio = slower.time()["tokens_per_second_per_gpu"] / plain.time()["tokens_per_second_per_gpu"]
    assert 0.75 < ratio < 0.85 and "speed calibrated on A100 80GB SXM" in slower.time()["calibration"]
    save(Calibration(**base, speed_ratio=9.0, tokens_per_second=40000.0))
    wild = fh.recommend("meta-llama/Llama-3.1-8B", gpu="A100 80GB", method="lora",
                        calibration=lookup("A100 80GB SXM", "meta-llama/Llama-3.1-8B", "lora"))
    assert "calibration" not in wild.time()
    save(Calibration(**base))
    assert lookup("A100 80GB SXM", "meta-llama/Llama-3.1-8B", "lora").speed_ratio is None
