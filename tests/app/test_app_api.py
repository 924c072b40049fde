"""The app's named endpoints, through a real ``gradio_client.Client`` against a real server (``python app/app.py``)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

import finetune_helper as fh
from finetune_helper.recommender.gpu import resolve_gpu
from finetune_helper.recommender.model import resolve_model
from finetune_helper.recommender.plan import PlanRequest, recommend_plan
from finetune_helper.recommender.schedule import lr_at, warmup_steps_for
from finetune_helper.units import GiB

from .conftest import FAKE_TOKEN, REPO, AppServer, wait_for

#: integration tier (make test-integration): real torch / transformers / trainer / server work
pytestmark = pytest.mark.integration

FORM = ("meta-llama/Llama-3.1-8B", "RTX 4090", 1, "lora", 0, 20000, 2, 64, 1e-5, 5e-5, "cosine", "auto", "none",
        "trl")


def core_plan(trainer: str = "trl"):
    req = PlanRequest(model=resolve_model("meta-llama/Llama-3.1-8B"), gpu=resolve_gpu("RTX 4090"), method="lora",
                      dataset_size=20000, epochs=2, target_effective_batch=64, lr_min=1e-5, lr_max=5e-5,
                      trainer=trainer)
    return recommend_plan(req)


def tiny_recipe(max_steps: int, **training) -> str:
    raw = yaml.safe_load((REPO / "recipes" / "tiny-demo.yaml").read_text())
    raw["training"] = {"max_steps": max_steps, "logging_steps": 5, "save_steps": 50, **training}
    return yaml.safe_dump(raw)


@pytest.fixture(scope="module")
def client(app_server):
    return app_server.client()


def test_named_endpoints_are_listed(client):
    names = set(client.view_api(print_info=False, return_format="dict")["named_endpoints"])
    assert {"/recommend", "/export", "/start_run", "/start_probe", "/start_lr_find", "/run_status", "/stop_run", "/resume_run",
            "/list_runs", "/run_details"} <= names


def test_recommend_matches_the_core_planner(client):
    verdict, table, memory, schedule, plan_json = client.predict(*FORM, api_name="/recommend")
    plan = core_plan()
    assert table["data"] == [list(row) for row in plan.settings_rows()]
    assert plan_json == json.loads(json.dumps(plan.to_dict()))
    assert "Fits" in verdict and plan.reasons["fits"] in verdict
    # memory chart: every part of the estimate, the peak, the usable budget and the GPU's capacity, in GiB
    bars = {row[0]: row[1] for row in memory["data"]}
    for part, value in plan.estimate.breakdown.items():
        assert any(abs(v - value / GiB) < 1e-3 for v in bars.values()), part
    assert bars["estimated peak"] == pytest.approx(plan.peak_memory_bytes / GiB, abs=1e-3)
    assert bars["GPU memory"] == pytest.approx(plan.request.gpu.memory_bytes / GiB, abs=1e-3)
    # LR schedule: the Trainer's schedule (finetune_helper.recommender.schedule is checked against it in test_schedule.py)
    points = schedule["data"]
    warmup = warmup_steps_for(plan.warmup_ratio, plan.total_steps)
    assert points[0] == [0, 0.0] and points[-1][0] == plan.total_steps - 1
    for step, lr in points:
        assert lr == pytest.approx(lr_at(step, plan.learning_rate, plan.total_steps, warmup, "cosine"), abs=1e-10)  # Gradio rounds plot data
    assert max(lr for _, lr in points) == pytest.approx(plan.learning_rate)


def test_a_deepspeed_recommendation_and_its_recipe(client):
    """The form's strategy and offload reach the plan (as the core plans them) and the recipe it writes."""
    form = FORM[:2] + (2,) + ("full",) + FORM[4:11] + ("zero3", "optimizer", "trl")
    plan_json = client.predict(*form, api_name="/recommend")[4]
    assert plan_json["distributed"] == "zero3" and plan_json["offload"] == "optimizer" and plan_json["fits"]
    assert plan_json["host_memory_bytes"] > 0
    text = client.predict("(the current recommendation)", *form, api_name="/load_recipe")
    hardware = yaml.safe_load(text)["hardware"]
    assert (hardware["gpus"], hardware["strategy"], hardware["offload"]) == (2, "zero3", "optimizer")


def test_a_step_decay_export_is_its_recipe(client):
    """Step decay has no TrainingArguments type: the export says so where the arguments would be, and the recipe
    (which finetune-helper run trains with the runner's LambdaLR) is the one download."""
    text, files = client.predict(*FORM[:10], "step_decay", "auto", "none", "trl", "yaml", api_name="/export")
    assert text.startswith("# step_decay has no TrainingArguments type")
    assert [Path(f).name for f in files] == ["recipe.yaml"]
    assert "scheduler: step_decay" in Path(files[0]).read_text()


@pytest.mark.parametrize("trainer, cls", [("trl", "SFTConfig"), ("transformers", "TrainingArguments")])
def test_export_files_read_back(client, tmp_path, trainer, cls):
    """The form's trainer picks the arguments class every download is written for, and they read back equal."""
    from transformers import HfArgumentParser
    from transformers.utils import is_torch_bf16_gpu_available

    from finetune_helper.export.training_args import arguments_class

    form = FORM[:13] + (trainer,)
    text, files = client.predict(*form, "yaml", api_name="/export")
    by_name = {Path(f).name: Path(f) for f in files}
    assert set(by_name) == {"train_args.py", "training_args.json", "training_args.yaml", "recipe.yaml"}
    assert by_name["training_args.yaml"].read_text().rstrip("\n") == text.rstrip("\n")  # gr.Code drops the last newline
    # transformers refuses bf16 without a bf16 GPU unless use_cpu=True (as in tests/export/test_export.py)
    machine = {} if is_torch_bf16_gpu_available() else {"use_cpu": True}
    yaml_file, json_file = tmp_path / "args.yaml", tmp_path / "args.json"
    yaml_file.write_text(text + "".join(f"\n{k}: {str(v).lower()}" for k, v in machine.items()) + "\n")
    json_file.write_text(json.dumps({**json.loads(by_name["training_args.json"].read_text()), **machine}))
    plan = core_plan(trainer)
    parser = HfArgumentParser(arguments_class(plan))
    (from_yaml,) = parser.parse_yaml_file(str(yaml_file))
    (from_json,) = parser.parse_json_file(str(json_file))
    expected = fh.to_training_arguments(plan, output_dir="outputs/Llama-3.1-8B", **machine)
    assert type(expected).__name__ == cls and type(from_yaml) is type(expected) is type(from_json)
    assert from_yaml.to_dict() == expected.to_dict() == from_json.to_dict()
    # the Python snippet runs and builds the same arguments
    snippet = by_name["train_args.py"].read_text()
    assert snippet.count(f"{cls}(") == 1
    snippet = snippet.replace(f"{cls}(", f"{cls}(" + "".join(f"{k}={v!r}, " for k, v in machine.items()))
    namespace: dict = {"__name__": "snippet"}
    exec(compile(snippet, "train_args.py", "exec"), namespace)  # noqa: S102
    assert namespace["args"].to_dict() == expected.to_dict()
    # the recipe reproduces the recommendation
    from finetune_helper.train.recipe import recipe_from_dict

    recipe = recipe_from_dict(yaml.safe_load(by_name["recipe.yaml"].read_text()))
    assert (recipe.model.name, recipe.method.type, recipe.hardware.gpu, recipe.recommend.epochs, recipe.trainer) == (
        "meta-llama/Llama-3.1-8B", "lora", "RTX 4090", 2, trainer)


@pytest.mark.parametrize("form, field", [
    (("nobody/no-such-model",) + FORM[1:], "model"),  # unknown model, offline
    ((FORM[0], "0GB") + FORM[2:], "gpu"),  # memory <= 0
    ((FORM[0], "-24GB") + FORM[2:], "gpu"),
    (("/etc",) + FORM[1:], "model"),  # a path outside the workspace
    (FORM[:4] + (10**6,) + FORM[5:], "seq-len"),
    (FORM[:8] + (1e-3, 1e-5) + FORM[10:], "lr-min"),
    (FORM[:2] + (1.5,) + FORM[3:], "gpus"),  # never rounded to 2
    (FORM[:11] + ("auto", "optimizer", "trl"), "offload"),  # offloading is DeepSpeed's
    (FORM[:2] + (2,) + FORM[3:11] + ("zero2", "all", "trl"), "offload"),
])
def test_bad_recommend_input_is_a_visible_error_and_the_app_keeps_working(client, form, field):
    from gradio_client.exceptions import AppError

    with pytest.raises(AppError) as info:
        client.predict(*form, api_name="/recommend")
    message = str(info.value)
    assert message.startswith(f"{field}: ") and "\n" not in message and "Traceback" not in message
    assert client.predict(*FORM, api_name="/recommend")[4]["fits"] is True


def test_bad_run_input_is_refused_before_any_process_starts(client, app_workspace, tmp_path):
    from gradio_client import handle_file
    from gradio_client.exceptions import AppError

    garbage = tmp_path / "broken.jsonl"
    garbage.write_text("{not json at all\n")
    outside = tmp_path / "outside.jsonl"
    outside.write_text('{"instruction": "a", "output": "b"}\n')
    cases = [
        ((tiny_recipe(10), handle_file(str(garbage)), "", False, ""), "data"),  # unreadable upload
        ((tiny_recipe(10), None, str(outside), False, ""), "dataset path"),  # outside the workspace
        ((tiny_recipe(10), None, "../../etc/passwd", False, ""), "dataset path"),
        ((tiny_recipe(10).replace("name: builtin:tiny-llama", "name: builtin:tiny-llama\n  trust_remote_code: true"),
          None, "", False, ""), "model.trust_remote_code"),
        (("model: [unclosed", None, "", False, ""), "recipe"),
        ((tiny_recipe(10).replace("gpu: 16GiB", "gpu: 0GB"), None, "", False, ""), "hardware.gpu"),
    ]
    before = sorted(p.name for p in (app_workspace / "runs").iterdir())
    uploads = sorted((app_workspace / "uploads").iterdir())
    for args, field in cases:
        with pytest.raises(AppError) as info:
            client.predict(*args, api_name="/start_run")
        assert str(info.value).startswith(field), (field, str(info.value))
    assert sorted(p.name for p in (app_workspace / "runs").iterdir()) == before  # nothing was started
    assert sorted((app_workspace / "uploads").iterdir()) == uploads  # the refused upload's copy is gone
    with pytest.raises(AppError, match="^run: no run named"):
        client.predict("no-such-run", api_name="/run_status")


@pytest.mark.slow
def test_tiny_run_start_poll_stop_resume_and_read_after_restart(client, app_server, tmp_path):
    from gradio_client.exceptions import AppError

    from gradio_client import handle_file

    from finetune_helper.train.tiny import synthetic_dataset, write_dataset

    # the data comes as an upload (a CSV of 1,000 alpaca examples), as a user's own file would. Batch 8 x 1 (the
    # plan's is 64) keeps the 200 steps to ~10 s on 2 free cores; the doctor still reads "healthy" at every seed 0-4
    # with 1 and 2 threads (loss down 87-95%, the last eval the best)
    upload = write_dataset(tmp_path / "my data.csv", synthetic_dataset(1000, fmt="alpaca", seed=3))
    recipe = tiny_recipe(200, per_device_train_batch_size=8, gradient_accumulation_steps=1)
    run_id, message = client.predict(recipe, handle_file(str(upload)), "", False, "api test", api_name="/start_run")
    assert run_id.startswith("api-test-") and run_id in message
    input_recipe = yaml.safe_load((app_server.workspace / "runs" / run_id / "input-recipe.yaml").read_text())
    data_path = Path(input_recipe["data"]["path"])
    assert data_path.parent == app_server.workspace / "uploads" and data_path.name.endswith("my_data.csv")
    assert data_path.read_bytes() == upload.read_bytes()
    with pytest.raises(AppError, match="still training"):  # one run at a time per GPU
        client.predict(tiny_recipe(200), None, "", False, "second", api_name="/start_run")

    def status():
        return client.predict(run_id, api_name="/run_status")

    st = wait_for(lambda: (s := status())["loss"] is not None and s, 300, "the first logged loss")
    assert st["state"] == "training" and st["step"] > 0 and st["max_steps"] == 200
    assert 0 < st["progress"] < 1 and st["eta_seconds"] is not None

    client.predict(run_id, api_name="/stop_run")
    st = wait_for(lambda: not (s := status())["active"] and s, 60, "the run to stop")
    assert st["state"] == "stopped" and st["can_resume"], st
    stopped_at = st["step"]
    assert stopped_at < 200 and "checkpoint" in st["message"]

    client.predict(run_id, api_name="/resume_run")
    st = wait_for(lambda: not (s := status())["active"] and s["state"] != "stopped" and s, 300, "the resumed run")
    assert st["state"] == "done" and st["step"] == 200, st["log_tail"]
    assert st["diagnosis"]["diagnosis"] == "healthy", st["diagnosis"]
    assert st["summary"]["status"] == "done" and st["summary"]["train_loss_last"] < st["summary"]["train_loss_first"]
    log = (Path(st["run_dir"]) / "train.log").read_text()
    assert log.count("$ finetune-helper run ") == 1 and log.rstrip().splitlines()[-1].startswith("saved:")
    assert f"$ finetune-helper resume {st['run_dir']}" in log  # the run's own saved recipe and arguments
    assert FAKE_TOKEN not in json.dumps(st)
    # the live LR plot's planned curve is what the Trainer logged, step by step, across the stop and the resume
    from finetune_helper_app.app import live_lr_frame

    frame = live_lr_frame(st)
    logged = frame[frame.series == "trainer"].set_index("step").learning_rate
    planned = frame[frame.series == "schedule"].set_index("step").learning_rate
    assert len(logged) >= 200 // 5 - 1
    for step, lr in logged.items():
        assert lr == pytest.approx(planned[step], rel=1e-6, abs=1e-12), step

    # the run is readable by a fresh app on the same workspace (a restart)
    again = AppServer(app_server.workspace, tmp_path / "app2.log")
    try:
        second = again.client()
        table, _ = second.predict(api_name="/list_runs")
        row = next(r for r in table["data"] if r[0] == run_id)
        assert row[1] == "done" and row[4] == 200
        summary, loss, plan, args, recipe = second.predict(run_id, api_name="/run_details")
        assert run_id in summary and "done" in summary and "doctor: healthy" in summary  # the doctor's reading
        assert len(loss["data"]) >= 200 // 5 and plan["method"] == "full"
        assert args["max_steps"] == 200 and "builtin:tiny-llama" in recipe and "my_data.csv" in recipe
    finally:
        again.close()


def test_auth_is_required_when_asked(tmp_path):
    server = AppServer(tmp_path / "ws", tmp_path / "auth.log", "--auth", "alice:s3cret")
    try:
        with pytest.raises(Exception):
            server.client().predict(*FORM, api_name="/recommend")
        assert server.client(auth=("alice", "s3cret")).predict(*FORM, api_name="/recommend")[4]["fits"]
    finally:
        server.close()


def test_recipe_from_the_current_recommendation(client):
    from finetune_helper.train.recipe import PLACEHOLDER_DATA, recipe_from_dict

    text = client.predict("(the current recommendation)", *FORM, api_name="/load_recipe")
    recipe = recipe_from_dict(yaml.safe_load(text))
    assert (recipe.model.name, recipe.hardware.gpu, recipe.method.type, recipe.recommend.dataset_size,
            recipe.recommend.epochs, recipe.recommend.target_effective_batch) == (
        "meta-llama/Llama-3.1-8B", "RTX 4090", "lora", 20000, 2, 64)
    assert recipe.data.path == PLACEHOLDER_DATA and "replace" in text.splitlines()[1]
    shipped = client.predict("tiny-demo.yaml", *FORM, api_name="/load_recipe")
    assert shipped.rstrip("\n") == (REPO / "recipes" / "tiny-demo.yaml").read_text().rstrip("\n")  # gr.Code trims


def test_files_outside_the_workspace_are_not_served(app_server, client):
    import urllib.error
    import urllib.request

    client.predict(*FORM, "json", api_name="/export")  # something legitimately downloadable exists
    secret = app_server.workspace.parent / "secret.txt"
    secret.write_text("not for the browser")
    for target in ("/etc/passwd", str(secret), str(REPO / "pyproject.toml")):
        try:
            with urllib.request.urlopen(f"{app_server.url}gradio_api/file={target}", timeout=10) as resp:
                body = resp.read().decode(errors="replace")
        except urllib.error.HTTPError as exc:
            assert exc.code in (403, 404), (target, exc.code)
        else:
            raise AssertionError(f"{target} was served: {body[:80]!r}")


@pytest.mark.parametrize("argv, field", [(["--auth", "alice"], "--auth"), (["--port", "0"], "--port")])
def test_app_command_rejects_bad_options_in_one_line(argv, field, tmp_path):
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-m", "finetune_helper", "app", "--workspace", str(tmp_path), *argv],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().count("\n") == 0 and field in proc.stderr and "Traceback" not in proc.stderr


def test_probe_from_the_train_tab_measures_the_recipe_and_shows_the_table(client):
    """Probe runs as its own process, like a run; its table (estimated next to measured) comes back in the status."""
    raw = yaml.safe_load(tiny_recipe(10))
    raw["data"]["max_examples"] = 600  # enough for 100 steps at the target batch 64: the probe measures batch 64
    run_id, message = client.predict(yaml.safe_dump(raw), None, "", False, "probe test", api_name="/start_probe")
    assert run_id.startswith("probe-test-") and "probe" in message
    st = wait_for(lambda: (s := client.predict(run_id, api_name="/run_status"))["state"] == "done" and s, 180,
                  "the probe to end")
    assert st["kind"] == "probe"
    rows = st["probe"]["rows"]
    assert rows[0]["micro_batch"] == 64 and abs(rows[0]["error"]) < 0.05
    assert st["probe"]["calibration"]["device"] == "cpu"


def test_lr_find_from_the_train_tab_runs_the_range_test_and_returns_its_curve(client):
    """The range test runs as its own process, like a run; its curve (growing step by step) and its suggestions
    come back in the status."""
    raw = yaml.safe_load(tiny_recipe(10))
    # 100 examples: the plan's batch is 14 (42 with 300), a third of the sweep's work; over seeds 0-4 with 1 and 2
    # threads it still runs all 100 steps and suggests an LR every time
    raw["data"]["max_examples"] = 100
    run_id, message = client.predict(yaml.safe_dump(raw), None, "", False, "lr test", api_name="/start_lr_find")
    assert run_id.startswith("lr-test-") and "range test" in message
    st = wait_for(lambda: (s := client.predict(run_id, api_name="/run_status"))["state"] == "done" and s, 240,
                  "the range test to end")
    curve = st["lr_find"]
    assert st["kind"] == "lr-find" and curve["done"] and len(curve["lrs"]) == len(curve["losses"]) >= 10
    assert curve["lrs"][0] == pytest.approx(1e-7) and curve["rule_lr"] > 0
    lo, hi = curve["bounds"]
    assert lo <= curve["suggested_lr_clamped"] <= hi


def test_stop_on_find_lr_keeps_the_curve_so_far_and_leaves_no_scratch_folder(client, app_server):
    """Stop on a range test: the message says what a sweep does (its curve kept, no checkpoint), the sweep ends
    after its step with the curve so far (interrupted by SIGTERM), and its scratch folder is removed (from the
    server's own TMPDIR, which its runs inherit)."""
    import glob

    pattern = str(app_server.tmp / "finetune-helper-lr-find-*")
    before = set(glob.glob(pattern))
    raw = yaml.safe_load(tiny_recipe(10))
    raw["data"]["max_examples"] = 300
    run_id, _ = client.predict(yaml.safe_dump(raw), None, "", False, "lr stop", api_name="/start_lr_find")
    wait_for(lambda: len((client.predict(run_id, api_name="/run_status").get("lr_find") or {}).get("lrs") or [])
             >= 3, 240, "the sweep's first steps")
    message = client.predict(run_id, api_name="/stop_run")
    assert "range test ends" in message and "checkpoint at the end" not in message
    st = wait_for(lambda: (s := client.predict(run_id, api_name="/run_status"))["state"] not in ("running", "stopping")
                  and s, 120, "the range test to stop")
    curve = st["lr_find"]
    assert st["state"] == "stopped" and curve["done"] and curve["interrupted"] == "SIGTERM", st
    assert 3 <= len(curve["lrs"]) < 100
    assert set(glob.glob(pattern)) <= before


def test_linked_run_files_are_not_shown_and_a_forged_process_is_not_signalled(client, app_workspace, tmp_path):
    """A run folder whose files link outside the workspace, and whose process.json names a process the app never
    started (its command line even says finetune_helper): nothing is read through the links, nothing is killed."""
    import subprocess
    import sys
    import time

    from gradio_client.exceptions import AppError

    secret = tmp_path / "secret.yaml"
    secret.write_text("model:\n  name: TOP-SECRET-CONTENT\n")
    run_dir = app_workspace / "runs" / "forged-run"
    run_dir.mkdir(parents=True)
    for name in ("recipe.yaml", "input-recipe.yaml", "plan.json", "summary.json", "train.log"):
        (run_dir / name).symlink_to(secret)
    victim = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)", "finetune_helper"])
    try:
        (run_dir / "process.json").write_text(json.dumps({
            "run_id": "forged-run", "pid": victim.pid, "started": time.time(), "command": "run",
            "args": [str(run_dir / "input-recipe.yaml"), "--output-dir", str(run_dir)], "returncode": None}))
        text, _, plan, _, recipe = client.predict("forged-run", api_name="/run_details")
        assert "TOP-SECRET" not in json.dumps([text, plan, recipe]) and recipe == ""
        with pytest.raises(AppError, match="not running"):
            client.predict("forged-run", api_name="/stop_run")
        time.sleep(0.5)
        assert victim.poll() is None  # still alive: never signalled
        (run_dir / "process.json").unlink()
        (run_dir / "process.json").symlink_to(secret)  # and a linked process.json is not written through
        with pytest.raises(AppError):
            client.predict("forged-run", api_name="/stop_run")
        assert secret.read_text().startswith("model:")
    finally:
        victim.kill()
        victim.wait()


@pytest.mark.parametrize("form, field", [
    (FORM[:2] + ("two",) + FORM[3:], "gpus"),  # a string through the API: Gradio's number field refused it first
    (FORM[:2] + (0,) + FORM[3:], "gpus"),  # under the field's minimum: Gradio's own message named no field
    (FORM[:4] + ("long",) + FORM[5:], "seq-len"),
], ids=["gpus-two", "gpus-0", "seq-len-long"])
def test_a_value_the_number_fields_do_not_take_is_a_field_error(client, form, field):
    from gradio_client.exceptions import AppError

    with pytest.raises(AppError) as info:
        client.predict(*form, api_name="/recommend")
    message = str(info.value)
    assert message.startswith(f"{field}: ") and "\n" not in message, message


def test_a_damaged_run_folder_is_a_field_error_and_the_other_runs_stay_listed(client, app_workspace):
    """Run folders whose files were edited or damaged (a summary.json or process.json that is not an object, a
    recipe.yaml that is not UTF-8): showing one is a one-line error naming the run and the file (it was Gradio's
    generic "Error"), and the runs list still shows a sound run beside them."""
    import shutil
    import subprocess
    import sys
    import time

    from gradio_client.exceptions import AppError

    ended = subprocess.Popen([sys.executable, "-c", "pass"])
    ended.wait()

    def run_folder(run_id: str, **files: str | bytes) -> None:
        folder = app_workspace / "runs" / run_id
        folder.mkdir(parents=True)
        contents = {"process.json": json.dumps({"run_id": run_id, "pid": ended.pid, "started": time.time() - 60,
                                                "args": [], "returncode": 0, "command": "run"}),
                    "recipe.yaml": tiny_recipe(2),
                    "summary.json": json.dumps({"status": "done", "train_loss_last": 1.5}),
                    "metrics.jsonl": "".join(json.dumps({"step": s, "loss": 2.0 - s / 4, "max_steps": 2,
                                                         "wall_time": time.time()}) + "\n" for s in (1, 2)), **files}
        for name, content in contents.items():
            (folder / name).write_bytes(content if isinstance(content, bytes) else content.encode())

    #: run id: (its damaged files, what the error says of them, the endpoints that read them)
    damaged = {"damaged-summary": ({"summary.json": "[1, 2]"}, "summary.json holds an array, not a JSON object",
                                   ("/run_details", "/run_status")),
               "damaged-process": ({"process.json": '"ended"'}, "process.json holds a string, not a JSON object",
                                   ("/run_details", "/run_status")),
               "damaged-recipe": ({"recipe.yaml": b"\xff\xfe\x00"},
                                  "recipe.yaml is not UTF-8 text (byte 0xff at offset 0)", ("/run_details",))}
    try:
        run_folder("sound-run")
        for run_id, (files, _, _) in damaged.items():
            run_folder(run_id, **files)
        for run_id, (_, what, endpoints) in damaged.items():
            for api in endpoints:
                with pytest.raises(AppError) as info:
                    client.predict(run_id, api_name=api)
                assert str(info.value).startswith(f"run: {run_id}: {what}: its run folder was edited or damaged"), (
                    api, str(info.value))
                assert "\n" not in str(info.value)
        table, _ = client.predict(api_name="/list_runs")
        assert "sound-run" in [row[0] for row in table["data"]]
        assert client.predict("sound-run", api_name="/run_details")[0].startswith("### sound-run: done")
    finally:
        for run_id in ("sound-run", *damaged):
            shutil.rmtree(app_workspace / "runs" / run_id, ignore_errors=True)


TINY_FORM = ("builtin:tiny-llama", "16GiB", 1, "full", 0, 20000, 2, 64, 1e-5, 5e-5, "cosine", "auto", "none", "trl")


def test_a_dataset_in_the_recommend_tab_plans_from_its_token_lengths(client, app_workspace):
    """The dataset field: /recommend plans for the examples the trainer keeps and the max_length covering the data's
    p99 (the Training examples field is not used), with the profile under "data"; /export and the recipe read that
    data at that length; the same dataset without the field plans for the form's 20000 examples."""
    import math

    from finetune_helper.train.tiny import synthetic_dataset, write_dataset

    write_dataset(app_workspace / "profile-me.jsonl", synthetic_dataset(700, fmt="messages", seed=4,
                                                                        tasks=("add", "reverse")))
    plan_json = client.predict(*TINY_FORM, "profile-me.jsonl", "train", "", api_name="/recommend")[4]
    data = plan_json["data"]
    assert data["examples"] == 700 and data["format"] == "messages" and data["tokenizer"]
    assert plan_json["seq_len"] == data["max_length"] == data["tokens"]["p99"]
    eff = plan_json["effective_batch_size"]
    assert plan_json["total_steps"] == max(1, math.ceil(math.ceil(data["trained_examples"] / eff) * 2))
    assert data["padding"]["batch"] == plan_json["per_device_train_batch_size"]
    assert sum(bar["count"] for bar in data["histogram"]) == 700
    assert "data" not in client.predict(*TINY_FORM, api_name="/recommend")[4]  # no dataset: as before
    text, files = client.predict(*TINY_FORM, "json", "profile-me.jsonl", "train", "", api_name="/export")
    assert json.loads(text)["max_length"] == data["max_length"]
    recipe = yaml.safe_load(next(Path(f) for f in files if f.endswith("recipe.yaml")).read_text())
    assert recipe["data"]["path"] == str(app_workspace / "profile-me.jsonl")
    assert recipe["data"]["max_length"] == data["max_length"] and recipe["recommend"]["dataset_size"] is None


@pytest.mark.parametrize("data, split, field", [("no-such.jsonl", "train", "dataset"),
                                                ("profile-me.jsonl", "test", "dataset split"),
                                                ("../outside.jsonl", "train", "dataset")])
def test_a_bad_dataset_is_a_field_error(client, app_workspace, data, split, field):
    from gradio_client.exceptions import AppError

    from finetune_helper.train.tiny import synthetic_dataset, write_dataset

    write_dataset(app_workspace / "profile-me.jsonl", synthetic_dataset(50, fmt="alpaca", seed=4))
    with pytest.raises(AppError) as info:
        client.predict(*TINY_FORM, data, split, "", api_name="/recommend")
    message = str(info.value)
    assert message.startswith(f"{field}: ") and "\n" not in message


def test_the_dataset_view_shows_the_figures_and_the_length_histogram(tmp_path):
    """The page's own view (what the Recommend button shows): the figures and the histogram of the token lengths,
    bars past max_length coloured apart; hidden without a dataset."""
    from finetune_helper.runs.workspace import Workspace
    from finetune_helper.train.tiny import format_example
    from finetune_helper_app import app as views

    workspace = Workspace(tmp_path / "ws")
    rows = [format_example("What is 1 + 2? " + "7" * n, "3") for n in range(0, 200, 2)]
    (workspace.root / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    app = views.App(workspace)
    out = app.recommend_view(*TINY_FORM[:4], 64, *TINY_FORM[5:], "d.jsonl", "train", "")
    assert len(out) == 7 and out[4]["data"]["max_length"] == 64 and out[4]["data"]["max_length_given"]
    markdown, plot = out[5], out[6]
    assert "100 examples" in markdown and "max_length 64 (--seq-len)" in markdown and "SFTTrainer drops" in markdown
    frame = views.histogram_frame(app.profile("d.jsonl", "train", "", TINY_FORM[0], app._model_spec(TINY_FORM[0])))
    assert frame["examples (%)"].sum() == pytest.approx(100)
    assert set(frame["part"]) == {"within max_length", "longer than max_length"}
    assert plot.visible is True and list(plot.sort) == list(frame["tokens"])
    assert app.recommend_view(*TINY_FORM)[6].visible is False
