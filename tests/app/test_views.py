"""The app's view functions on run data as the runner writes it (no server needed)."""

from __future__ import annotations

import json

import pytest

from finetune_helper.units import GiB

#: integration tier (make test-integration): real torch / transformers / trainer / server work
pytestmark = pytest.mark.integration

views = pytest.importorskip("finetune_helper_app.app")


def status(tmp_path, metrics, **extra):
    return {"run_id": "r", "run_dir": str(tmp_path), "state": "training", "step": metrics[-1]["step"] if metrics else 0,
            "max_steps": 100, "progress": 0.5, "eta_seconds": 75.0, "loss": 1.25, "tokens_per_second": 1234.5,
            "message": None, "metrics": metrics, **extra}


def test_memory_line_compares_measured_and_estimated_on_a_gpu(tmp_path):
    st = status(tmp_path, [], peak_memory_bytes=int(10.5 * GiB), estimated_peak_memory_bytes=10 * GiB)
    text = views.memory_markdown(st)
    assert "10.50 GiB" in text and "10.00 GiB" in text and "+5.0%" in text and "max_memory_allocated" in text
    assert "CUDA runs only" in views.memory_markdown(status(tmp_path, []))


def test_progress_shows_step_eta_loss_and_throughput(tmp_path):
    html = views.progress_html(status(tmp_path, [{"step": 50, "loss": 1.25}]))
    assert 'width:50.0%' in html and "step 50/100" in html and "ETA 0:01:15" in html and "loss 1.2500" in html
    assert "1,234 tok/s" in html or "1,235 tok/s" in html
    assert "&lt;b&gt;" in views.progress_html(status(tmp_path, [{"step": 1}], message="<b>x</b>"))  # escaped
    # on a GPU the runner records the time model's rate for the plan's GPU: shown next to the measured one
    gpu = views.progress_html(status(tmp_path, [{"step": 50}], predicted_tokens_per_second=1500.0))
    assert "tok/s (predicted 1,500)" in gpu


def test_the_verdict_gives_the_predicted_time_or_says_why_not():
    import finetune_helper as fh

    timed = views.verdict_markdown(fh.recommend("meta-llama/Llama-3.1-8B", gpu="A100 80GB", method="lora"))
    assert "Predicted on A100 80GB SXM" in timed and "tokens/s per GPU" in timed
    untimed = views.verdict_markdown(fh.recommend("meta-llama/Llama-3.1-8B", gpu="80GiB", method="lora"))
    assert "No time prediction" in untimed


def test_live_lr_overlays_the_schedule_and_tolerates_an_unknown_scheduler(tmp_path):
    metrics = [{"step": s, "loss": 1.0, "learning_rate": 1e-4} for s in (10, 20)]
    (tmp_path / "training_args.json").write_text(json.dumps({"learning_rate": 1e-4, "warmup_steps": 0.1,
                                                            "lr_scheduler_type": "linear"}))
    frame = views.live_lr_frame(status(tmp_path, metrics))
    assert set(frame.series) == {"trainer", "schedule"}
    planned = frame[frame.series == "schedule"].set_index("step").learning_rate
    assert planned[10] == pytest.approx(1e-4 * 9 / 10) and planned.index.max() == 100  # warmup 10: lr_at(9)
    (tmp_path / "training_args.json").write_text(json.dumps({"learning_rate": 1e-4, "lr_scheduler_type": "wsd"}))
    assert set(views.live_lr_frame(status(tmp_path, metrics)).series) == {"trainer"}


def test_empty_plot_data_clears_the_chart_instead_of_drawing_an_empty_frame():
    assert views._or_none(views.loss_frame([])) is None
    frame = views.loss_frame([{"step": 5, "loss": 2.0}, {"step": 5, "eval_loss": 2.1}])
    assert list(frame.series) == ["train", "eval"] and str(frame.step.dtype) == "int64"
