"""Runs started from the app: real `python -m finetune_helper run` processes in a tmp workspace, watched through their
run folders; real lock files, real signals, real Trainer runs of the built-in tiny model. No mocks."""

from __future__ import annotations

import contextlib

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

import pytest
import yaml

from finetune_helper.errors import FinetuneHelperError
from finetune_helper.train.recipe import Recipe
from finetune_helper.runs.manager import RunManager, build_recipe, log_tail, read_metrics, redact
from finetune_helper.train.tiny import synthetic_dataset, write_dataset
from finetune_helper.runs.workspace import Workspace

#: integration tier (make test-integration): real torch / transformers / trainer / server work
pytestmark = pytest.mark.integration

TINY = Path(__file__).resolve().parents[2] / "recipes" / "tiny-demo.yaml"
TOKEN = "hf_AbCdEfGhIjKlMnOpQrStUvWxYz01234567"


def recipe_text(training: dict[str, Any] | None = None, **sections: dict[str, Any]) -> str:
    """tiny-demo.yaml with ``training`` and section keys merged in, as the app's recipe box would hold it."""
    raw = yaml.safe_load(TINY.read_text(encoding="utf-8"))
    for name, values in sections.items():
        if isinstance(values, dict):
            raw[name] = {**(raw.get(name) or {}), **values}
        else:
            raw[name] = values
    if training is not None:
        raw["training"] = training
    return yaml.safe_dump(raw, sort_keys=False)


@pytest.fixture
def ws(tmp_path) -> Workspace:
    return Workspace(tmp_path / "ws")


def lock_files(rm: RunManager) -> list:
    return [rm._lock_file(d) for d in rm.devices]


@pytest.fixture
def manager():
    """``manager(ws, devices=None, **env)`` -> a RunManager; every process its runs started is killed (by its own process group)
    at teardown, and reaped, so no test leaves a training process behind."""
    made: list[RunManager] = []

    def make(workspace: Workspace, devices: list[str] | None = None, **env: str) -> RunManager:
        full = dict(os.environ)
        for key, value in env.items():
            if value is None:
                full.pop(key, None)
            else:
                full[key] = value
        rm = RunManager(workspace, env=full, devices=devices)
        made.append(rm)
        return rm

    yield make
    for rm in made:
        for run_dir in sorted(p for p in rm.workspace.runs.iterdir() if (p / "process.json").is_file()):
            if rm.status(run_dir.name)["active"]:
                pid = json.loads((run_dir / "process.json").read_text())["pid"]
                try:
                    os.killpg(pid, signal.SIGKILL)  # start_new_session: the run's group id is its pid
                except ProcessLookupError:
                    pass
            deadline = time.time() + 30
            while rm.status(run_dir.name)["active"] and time.time() < deadline:
                time.sleep(0.05)


def wait_for(rm: RunManager, run_id: str, done: Callable[[dict], bool], what: str, timeout: float = 180) -> dict:
    """Poll ``status`` every 0.5 s until ``done(status)``; on timeout fail with the state and the log tail."""
    deadline = time.time() + timeout
    while True:
        st = rm.status(run_id)
        if done(st):
            return st
        if time.time() > deadline:
            pytest.fail(f"run {run_id} not {what} after {timeout} s: state {st['state']!r}, step {st['step']}, "
                        f"returncode {st['returncode']}\n--- train.log tail ---\n{st['log_tail']}")
        time.sleep(0.5)


def ended(st: dict) -> bool:
    """The process is gone and its exit code is recorded (the reaper thread has written process.json)."""
    return not st["active"] and st["returncode"] is not None


def run_folders(ws: Workspace) -> list[str]:
    return sorted(p.name for p in ws.runs.iterdir() if p.is_dir())


# ------------------------------------------------------------------------------------------- build_recipe
def test_build_recipe_of_the_tiny_demo(ws):
    recipe = build_recipe(ws, TINY.read_text())
    assert isinstance(recipe, Recipe)
    assert recipe.model.name == "builtin:tiny-llama" and recipe.data.path == "builtin:arithmetic"
    assert recipe.model.trust_remote_code is False and recipe.output_dir is None


@pytest.mark.parametrize("text,line", [
    ("model:\n  name: builtin:tiny-llama\ndata:\n  path: [unclosed\n", 5),
    ("model:\n  name: builtin:tiny-llama\n data: x\n", 3),
    ("model: {name: builtin:tiny-llama\n", 2),
])
def test_invalid_yaml_names_the_line(ws, text, line):
    with pytest.raises(FinetuneHelperError) as err:
        build_recipe(ws, text)
    assert err.value.field == "recipe"
    assert "not valid YAML" in err.value.message and f"(line {line}," in err.value.message, err.value.message


@pytest.mark.parametrize("text", ["", "just a string", "- a\n- list\n"])
def test_recipe_that_is_not_a_mapping_is_refused(ws, text):
    with pytest.raises(FinetuneHelperError) as err:
        build_recipe(ws, text)
    assert err.value.field == "recipe"


def test_trust_remote_code_needs_the_box_ticked(ws):
    text = recipe_text(model={"trust_remote_code": True})
    with pytest.raises(FinetuneHelperError) as err:
        build_recipe(ws, text)
    assert err.value.field == "model.trust_remote_code" and "Trust remote code" in err.value.message
    assert build_recipe(ws, text, trust_remote_code=True).model.trust_remote_code is True
    # the box alone turns it on; unticked, a recipe without the key stays off
    assert build_recipe(ws, recipe_text(), trust_remote_code=True).model.trust_remote_code is True
    assert build_recipe(ws, recipe_text()).model.trust_remote_code is False


def test_data_outside_the_workspace_is_refused(ws, tmp_path):
    outside = write_dataset(tmp_path / "outside" / "train.jsonl", synthetic_dataset(20))
    with pytest.raises(FinetuneHelperError) as err:  # typed into the app's dataset path box
        build_recipe(ws, recipe_text(), data_path=str(outside))
    assert err.value.field == "dataset path" and str(ws.root) in err.value.message
    with pytest.raises(FinetuneHelperError) as err:  # written into the recipe
        build_recipe(ws, recipe_text(data={"path": str(outside)}))
    assert err.value.field == "data.path" and str(ws.root) in err.value.message
    with pytest.raises(FinetuneHelperError) as err:
        build_recipe(ws, recipe_text(data={"path": "../outside/train.jsonl"}))
    assert err.value.field == "data.path"
    (ws.root / "link.jsonl").symlink_to(outside)
    with pytest.raises(FinetuneHelperError) as err:
        build_recipe(ws, recipe_text(), data_path="link.jsonl")
    assert err.value.field == "dataset path"


def test_model_outside_the_workspace_is_refused(ws, tmp_path):
    model = tmp_path / "outside-model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    with pytest.raises(FinetuneHelperError) as err:
        build_recipe(ws, recipe_text(model={"name": str(model)}))
    assert err.value.field == "model.name" and str(ws.root) in err.value.message


@pytest.mark.parametrize("name,content,field", [
    ("garbage.jsonl", "{this is not json\nnor this}\n", "data.path"),
    ("no-usable-columns.csv", "colour,size\nred,3\nblue,4\n", "data.format"),
    ("empty.csv", "", "data.path"),
])
def test_an_unreadable_dataset_fails_in_build_recipe_before_any_process(ws, manager, name, content, field):
    manager(ws)
    (ws.uploads / name).write_text(content)
    with pytest.raises(FinetuneHelperError) as err:
        build_recipe(ws, recipe_text(), data_path=f"uploads/{name}")
    assert err.value.field == field, err.value
    with pytest.raises(FinetuneHelperError):  # the same file uploaded
        build_recipe(ws, recipe_text(), data_file=str(ws.uploads / name))
    with pytest.raises(FinetuneHelperError):  # the same file named in the recipe
        build_recipe(ws, recipe_text(data={"path": f"uploads/{name}"}))
    assert run_folders(ws) == []  # nothing was started


def test_upload_wins_over_typed_path_wins_over_recipe_data_path(ws, tmp_path):
    upload = write_dataset(tmp_path / "gradio" / "up.jsonl", synthetic_dataset(20, fmt="messages"))
    typed = write_dataset(ws.root / "typed.jsonl", synthetic_dataset(20, fmt="prompt_completion"))
    in_recipe = write_dataset(ws.root / "in-recipe.csv", synthetic_dataset(20, fmt="alpaca"))
    text = recipe_text(data={"path": "in-recipe.csv"})

    got = build_recipe(ws, text, data_file=str(upload), data_path="typed.jsonl")
    assert Path(got.data.path).parent == ws.uploads and got.data.path.endswith("up.jsonl")
    assert Path(got.data.path).read_bytes() == upload.read_bytes()

    assert build_recipe(ws, text, data_path="typed.jsonl").data.path == str(typed)
    assert build_recipe(ws, text, data_path="   ").data.path == str(in_recipe)  # a blank box doesn't count
    assert build_recipe(ws, text).data.path == str(in_recipe)
    # what the recipe says is not even looked at when the box or an upload gives the data
    outside_recipe = recipe_text(data={"path": "/etc/passwd"})
    assert build_recipe(ws, outside_recipe, data_path="typed.jsonl").data.path == str(typed)
    assert build_recipe(ws, recipe_text(), data_path="tatsu-lab/alpaca").data.path == "tatsu-lab/alpaca"


def test_output_dir_is_cleared(ws, tmp_path):
    recipe = build_recipe(ws, recipe_text(output_dir=str(tmp_path / "elsewhere")))
    assert recipe.output_dir is None
    assert "elsewhere" not in recipe.to_yaml()


def test_recipe_field_errors_keep_their_field(ws):
    with pytest.raises(FinetuneHelperError) as err:
        build_recipe(ws, recipe_text(method={"type": "dpo"}))
    assert err.value.field == "method.type"
    with pytest.raises(FinetuneHelperError) as err:
        build_recipe(ws, recipe_text(hardware={"gpu": "0GB"}))
    assert err.value.field == "hardware.gpu"
    with pytest.raises(FinetuneHelperError) as err:
        build_recipe(ws, recipe_text(model={"name": "builtin:huge"}))
    assert err.value.field == "model.name"


# ------------------------------------------------------------------------------------------- redact, log_tail
def test_redact_hides_token_shaped_strings():
    assert redact(f"login with {TOKEN} now") == "login with [token hidden] now"
    assert redact(f"Authorization: Bearer {TOKEN}\n{TOKEN[:-3]}") == \
        "Authorization: Bearer [token hidden]\n[token hidden]"
    assert redact("hf_short and hf_model_name and no token") == "hf_short and hf_model_name and no token"
    assert redact("") == ""


@pytest.mark.parametrize("var", ["HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HUGGINGFACEHUB_API_TOKEN"])
def test_redact_hides_the_token_variables_value(monkeypatch, var):
    for other in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HUGGINGFACEHUB_API_TOKEN"):
        monkeypatch.delenv(other, raising=False)
    monkeypatch.setenv(var, "not-shaped-like-a-token-9876")
    assert redact("a not-shaped-like-a-token-9876 b not-shaped-like-a-token-9876") == \
        "a [token hidden] b [token hidden]"
    monkeypatch.delenv(var)
    assert "not-shaped-like-a-token-9876" in redact("a not-shaped-like-a-token-9876")


def test_log_tail_and_status_of_a_run_whose_log_holds_the_token(ws, manager, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "plain-secret-value-42")
    run_dir = ws.runs / "leaky-run"
    run_dir.mkdir()
    lines = [f"line {i}" for i in range(100)]
    lines += [f"using token {TOKEN}", "env token plain-secret-value-42",
              f"finetune-helper: error: data.path: could not load with token {TOKEN}"]
    (run_dir / "train.log").write_text("\n".join(lines) + "\n")
    (run_dir / "process.json").write_text(json.dumps({"run_id": "leaky-run", "pid": None, "started": time.time(),
                                                      "args": [], "returncode": 2}))
    tail = log_tail(run_dir)
    assert TOKEN not in tail and "plain-secret-value-42" not in tail
    assert tail.count("[token hidden]") == 3 and len(tail.splitlines()) == 40
    assert log_tail(run_dir, 2).splitlines()[0] == "env token [token hidden]"
    st = manager(ws).status("leaky-run")
    assert TOKEN not in st["log_tail"] and "plain-secret-value-42" not in st["log_tail"]
    assert st["state"] == "failed" and st["message"] == "error: data.path: could not load with token [token hidden]"
    assert log_tail(ws.runs / "no-such-run") == ""


# ------------------------------------------------------------------------------------------- read_metrics
def test_read_metrics_dedupes_resumed_steps_and_skips_a_half_written_line(tmp_path):
    records = [
        {"step": 5, "max_steps": 20, "loss": 3.0},
        {"step": 10, "max_steps": 20, "loss": 2.5},
        {"step": 10, "max_steps": 20, "eval_loss": 2.6},
        {"step": 15, "max_steps": 20, "loss": 2.2},  # logged, then stopped; the checkpoint was step 10
        {"step": 15, "max_steps": 20, "loss": 2.1},  # the resumed run logs step 15 again: it wins
        {"step": 20, "max_steps": 20, "loss": 1.9},
    ]
    text = "".join(json.dumps(r) + "\n" for r in records) + '{"step": 20, "max_steps": 20, "eval_lo'
    (tmp_path / "metrics.jsonl").write_text(text)
    got = read_metrics(tmp_path)
    assert [(m["step"], m.get("loss"), m.get("eval_loss")) for m in got] == [
        (5, 3.0, None), (10, None, 2.6), (10, 2.5, None), (15, 2.1, None), (20, 1.9, None)]
    assert read_metrics(tmp_path / "missing") == []


# ------------------------------------------------------------------------------------------- run folder names
def test_run_ids_are_confined_to_the_runs_folder(ws, manager):
    rm = manager(ws)
    (ws.runs / "real").mkdir()
    assert rm.run_dir("real") == ws.runs / "real"
    for bad in ("", "  ", "../uploads", ".", "..", "real/..", "/etc", "missing"):
        with pytest.raises(FinetuneHelperError) as err:
            rm.status(bad)
        assert err.value.field == "run"
    with pytest.raises(FinetuneHelperError) as err:
        rm.stop("real")
    assert err.value.field == "run" and "not running" in err.value.message


# ------------------------------------------------------------------------------------------- the GPU lock
def test_a_second_start_while_a_run_is_active_is_refused(ws, manager):
    rm = manager(ws)
    text = recipe_text({"max_steps": 50})
    first = rm.start(build_recipe(ws, text))
    st = rm.status(first)
    assert st["active"] and st["state"] == "preparing" and not st["can_resume"]
    with pytest.raises(FinetuneHelperError) as err:
        rm.start(build_recipe(ws, text))
    assert err.value.field == "run" and first in err.value.message
    other_app = manager(ws)  # a second app process on the same workspace sees the same lock
    with pytest.raises(FinetuneHelperError) as err:
        other_app.start(build_recipe(ws, text))
    assert err.value.field == "run" and first in err.value.message
    assert rm.active_run() == other_app.active_run() == first
    assert run_folders(ws) == [first]  # the refused starts made no folder
    with pytest.raises(FinetuneHelperError, match="still running"):
        rm.resume(first)
    rm.stop(first)
    wait_for(rm, first, lambda s: not s["active"], "ended after stop", timeout=60)
    assert rm.active_run() is None and not any(p.exists() for p in lock_files(rm))  # released


@pytest.mark.parametrize("holder", ["dead", "not-a-run"])
def test_a_stale_lock_is_cleared_and_start_succeeds(ws, manager, holder):
    rm = manager(ws)
    if holder == "dead":
        proc = subprocess.Popen([sys.executable, "-c", "pass"])
        proc.wait()
    else:  # a live process that is not a run: the pid was recycled after the run's app died
        proc = subprocess.Popen(["sleep", "60"])
    try:
        lock_files(rm)[0].write_text(json.dumps({"run_id": "ghost-run", "pid": proc.pid}))
        assert rm.active_run() is None and not any(p.exists() for p in lock_files(rm))
        lock_files(rm)[0].write_text(json.dumps({"run_id": "ghost-run", "pid": proc.pid}))
        run_id = rm.start(build_recipe(ws, recipe_text({"max_steps": 50})))
        assert rm.active_run() == run_id
        assert json.loads(lock_files(rm)[0].read_text())["run_id"] == run_id
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_a_process_is_told_a_run_or_not_from_the_moment_popen_returns():
    """Right after ``Popen`` returns, ``/proc/PID/cmdline`` can still read empty (the kernel is setting up the new
    program; seen on a loaded machine): the lock check waits for it, so that a run just started is never taken for
    dead (its GPU given to a second start) nor a stranger for a run.  Repeated, to land in that window: it read empty
    in 6-8 of 200 checks right after Popen on an idle 2-core machine."""
    from finetune_helper.runs.manager import _pid_alive

    for _ in range(100):
        for argv, is_run in ((["sleep", "30"], False),
                             ([sys.executable, "-c", "import time; time.sleep(30)", "finetune_helper"], True)):
            proc = subprocess.Popen(argv)
            try:
                assert _pid_alive(proc.pid) is is_run, argv
            finally:
                proc.kill()
                proc.wait()


def test_a_lock_on_another_gpu_does_not_block(ws, manager):
    on0, on1 = manager(ws, devices=["0"]), manager(ws, devices=["1"])
    assert lock_files(on0) != lock_files(on1)
    text = recipe_text({"max_steps": 50})
    a = on0.start(build_recipe(ws, text))
    b = on1.start(build_recipe(ws, text))
    assert a != b and on0.active_run() == a and on1.active_run() == b
    with pytest.raises(FinetuneHelperError) as err:  # but GPU 1 is now taken
        manager(ws, devices=["1"]).start(build_recipe(ws, text))
    assert err.value.field == "run" and b in err.value.message


@pytest.mark.parametrize("first,second", [(["0", "1"], ["0"]), (["1", "0"], ["1", "0"])])
def test_overlapping_gpu_sets_block_each_other(ws, manager, first, second):
    """A one-GPU run locks one GPU (the first free one): another manager wanting only that one is blocked."""
    holder = manager(ws, devices=first)
    run_id = holder.start(build_recipe(ws, recipe_text({"max_steps": 50})))
    blocked = manager(ws, devices=[first[0]])
    with pytest.raises(FinetuneHelperError) as err:
        blocked.start(build_recipe(ws, recipe_text({"max_steps": 50})))
    assert run_id in err.value.message
    assert manager(ws, devices=["2"]).active_run() is None


def _visible_devices(pid: int) -> str | None:
    # Popen returns once the child's exec has begun (its close-on-exec pipe closed), but the kernel sets up the new
    # program's environment a little later: until then /proc/PID/environ reads empty (seen on a loaded machine)
    deadline = time.time() + 10
    while not (raw := Path(f"/proc/{pid}/environ").read_bytes()) and time.time() < deadline:
        time.sleep(0.01)
    env = dict(kv.split(b"=", 1) for kv in raw.split(b"\0") if b"=" in kv)
    value = env.get(b"CUDA_VISIBLE_DEVICES")
    return value.decode() if value is not None else None


def test_one_gpu_runs_share_a_node_each_pinned_to_its_own_gpu(ws, manager):
    """On a two-GPU node two one-GPU runs start side by side, each seeing only the GPU it locked; a third waits."""
    rm = manager(ws, devices=["0", "1"])
    text = recipe_text({"max_steps": 200})
    a, b = rm.start(build_recipe(ws, text)), rm.start(build_recipe(ws, text))
    pins = {_visible_devices(json.loads((ws.runs / r / "process.json").read_text())["pid"]) for r in (a, b)}
    assert pins == {"0", "1"}
    assert [json.loads((ws.runs / r / "process.json").read_text())["devices"] for r in (a, b)] == [["0"], ["1"]]
    with pytest.raises(FinetuneHelperError, match="not enough free GPUs"):
        rm.start(build_recipe(ws, text))
    with pytest.raises(FinetuneHelperError) as err:  # more GPUs than the app has
        rm.start(build_recipe(ws, recipe_text({"max_steps": 5}, hardware={"gpu": "16GiB", "gpus": 3})))
    assert err.value.field == "hardware.gpus"


@pytest.mark.parametrize("env, gpus, expected", [
    ({}, 0, ["cpu"]), ({"CUDA_VISIBLE_DEVICES": "1"}, 0, ["cpu"]),  # no CUDA: every run shares the CPU
    ({}, 2, ["0", "1"]), ({"CUDA_VISIBLE_DEVICES": "1,0"}, 2, ["0", "1"]), ({"CUDA_VISIBLE_DEVICES": " 1 "}, 2, ["1"]),
])
def test_devices_a_run_locks(env, gpus, expected):
    from finetune_helper.runs.manager import _devices

    assert _devices(env, gpus) == expected


def test_a_lock_being_taken_by_another_start_blocks(ws, manager):
    rm = manager(ws)
    # exactly what _take_lock of another app process has just written, before its _launch records the pid
    lock_files(rm)[0].write_text(json.dumps({"run_id": "starting-elsewhere", "pid": 1, "starting": True,
                                             "time": time.time()}))
    with pytest.raises(FinetuneHelperError) as err:
        rm.start(build_recipe(ws, recipe_text({"max_steps": 50})))
    assert "starting-elsewhere" in err.value.message


def test_stop_right_after_start_shows_stopped(ws, manager):
    rm = manager(ws)
    run_id = rm.start(build_recipe(ws, recipe_text({"max_steps": 50})))
    rm.stop(run_id)  # within milliseconds of start: the runner is still importing torch
    wait_for(rm, run_id, lambda s: not s["active"], "ended after stop", timeout=60)
    time.sleep(0.5)  # let the reaper thread record the exit code
    st = rm.status(run_id)
    assert rm.active_run() is None
    assert st["state"] == "stopped", (st["state"], st["returncode"])


# ------------------------------------------------------------------------------------------- real runs
def test_a_run_failing_inside_the_runner_ends_failed_and_releases_the_lock(ws, manager):
    rm = manager(ws)
    recipe = build_recipe(ws, recipe_text({"max_steps": 5, "optim": "not_an_optimizer"}))  # only the runner knows
    run_id = rm.start(recipe)
    st = wait_for(rm, run_id, ended, "ended")
    assert st["state"] == "failed" and st["returncode"] == 2, st["log_tail"]
    message = st["message"]
    assert message and "\n" not in message
    assert message.startswith("error: training.optim: ") and "not_an_optimizer" in message, message
    assert not st["can_resume"] and st["step"] == 0
    assert rm.active_run() is None and not any(p.exists() for p in lock_files(rm))
    after_restart = RunManager(ws).status(run_id)  # read back from the run folder alone
    assert (after_restart["state"], after_restart["returncode"], after_restart["message"]) == ("failed", 2, message)
    # the run ended while no app was watching (no reaper wrote process.json): the CLI's exit.json tells
    process = ws.runs / run_id / "process.json"
    process.write_text(json.dumps({**json.loads(process.read_text()), "returncode": None}))
    unwatched = RunManager(ws).status(run_id)
    assert (unwatched["state"], unwatched["returncode"]) == ("failed", 2)
    next_id = rm.start(build_recipe(ws, recipe_text({"max_steps": 50})))  # the lock is free
    assert next_id != run_id and rm.active_run() == next_id


@pytest.mark.slow
def test_start_watch_stop_resume_to_the_end(ws, manager):
    rm = manager(ws)
    # batch 8 and 400 examples (eval on 20) keep the 200 steps to ~25 s on 2 free cores
    recipe = build_recipe(ws, recipe_text({"max_steps": 200, "logging_steps": 5, "save_steps": 50,
                                           "per_device_train_batch_size": 8, "gradient_accumulation_steps": 1},
                                          data={"max_examples": 400}))
    run_id = rm.start(recipe, name="tiny demo")
    assert run_id.startswith("tiny-demo-")
    run_dir = ws.runs / run_id
    assert (run_dir / "input-recipe.yaml").is_file() and (run_dir / "process.json").is_file()
    assert [r["run_id"] for r in rm.list_runs()] == [run_id]

    st = wait_for(rm, run_id, lambda s: s["loss"] is not None, "training (a loss logged)", timeout=180)
    assert st["state"] == "training" and st["active"] and st["step"] > 0 and st["max_steps"] == 200
    assert st["eta_seconds"] is not None and st["eta_seconds"] > 0 and 0 < st["progress"] < 1
    assert st["learning_rate"] and st["tokens_per_second"]

    assert rm.stop(run_id)["state"] == "stopping"
    st = wait_for(rm, run_id, ended, "stopped")
    assert st["state"] == "stopped" and st["returncode"] == 130 and st["can_resume"], st["log_tail"]
    assert st["eta_seconds"] is None and 0 < st["step"] < 200
    assert "interrupted by SIGTERM" in st["message"]
    checkpoints = sorted(run_dir.glob("checkpoint-*"))
    assert checkpoints and all(p.is_dir() for p in checkpoints)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "interrupted" and summary["global_step"] == st["step"]
    assert (run_dir / f"checkpoint-{summary['global_step']}").is_dir()  # saved where it stopped
    assert rm.active_run() is None and not any(p.exists() for p in lock_files(rm))

    assert rm.resume(run_id) == run_id
    st = rm.status(run_id)
    assert st["active"] and not st["can_resume"]
    # the stopped attempt's records are not this attempt's progress: no stale ETA or throughput while it loads
    assert st["state"] == "preparing" and st["eta_seconds"] is None and st["tokens_per_second"] is None
    with pytest.raises(FinetuneHelperError) as err:
        rm.start(build_recipe(ws, recipe_text({"max_steps": 50})))
    assert run_id in err.value.message

    st = wait_for(rm, run_id, ended, "done after resume", timeout=300)
    assert st["state"] == "done" and st["returncode"] == 0, st["log_tail"]
    assert st["step"] == 200 and st["progress"] == 1.0 and not st["can_resume"] and st["message"] is None
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "done" and summary["global_step"] == 200
    assert st["summary"]["status"] == "done" and (run_dir / "final").is_dir()
    train_steps = [m["step"] for m in st["metrics"] if "loss" in m]
    assert train_steps == sorted(set(train_steps)) and train_steps[-1] == 200
    assert st["eval_loss"] is not None
    with pytest.raises(FinetuneHelperError, match="already finished"):
        rm.resume(run_id)

    (row,) = rm.list_runs()
    assert row["run_id"] == run_id and row["state"] == "done" and row["step"] == row["max_steps"] == 200
    assert row["method"] == "full" and row["train_loss_last"] == summary["train_loss_last"]

    restarted = RunManager(ws)  # the app restarted: everything is read back from the run folder
    again = restarted.status(run_id)
    for key in ("state", "step", "max_steps", "returncode", "loss", "eval_loss", "summary", "can_resume"):
        assert again[key] == st[key], key
    assert restarted.list_runs() == rm.list_runs()
    details = restarted.details(run_id)
    assert details["plan"]["method"] == "full" and details["training_args"]["max_steps"] == 200
    assert "builtin:tiny-llama" in details["recipe"]
    assert restarted.active_run() is None


@pytest.mark.parametrize("training", [{"push_to_hub": True}, {"hub_token": "hf_x"}, {"hub_model_id": "me/x"},
                                      {"deepspeed": "ds.json"}, {"accelerator_config": "/etc/acc.json"},
                                      {"fsdp_config": "/tmp/x.json"}, {"report_to": "wandb"},
                                      {"resume_from_checkpoint": "/tmp/c"}])
def test_app_runs_refuse_settings_that_reach_outside(ws, training):
    key = next(iter(training))
    with pytest.raises(FinetuneHelperError) as err:
        build_recipe(ws, recipe_text({"max_steps": 5, **training}))
    assert err.value.field == f"training.{key}" and "not allowed" in err.value.message


def test_app_runs_allow_report_to_none(ws):
    assert build_recipe(ws, recipe_text({"max_steps": 5, "report_to": "none"})).training["report_to"] == "none"


def test_a_second_stop_kills_a_run_that_does_not_stop(ws, manager):
    rm = manager(ws)
    run_id = rm.start(build_recipe(ws, recipe_text({"max_steps": 2000, "logging_steps": 5, "save_steps": 1000})))
    wait_for(rm, run_id, lambda s: s["loss"] is not None, "training")
    info = json.loads((ws.runs / run_id / "process.json").read_text())
    os.kill(info["pid"], signal.SIGSTOP)  # a hung run: it cannot act on SIGTERM
    try:
        rm.stop(run_id)
        time.sleep(1)
        assert rm.status(run_id)["active"]  # still there
        rm.stop(run_id)  # the second Stop kills the process group
        st = wait_for(rm, run_id, ended, "killed", timeout=30)
    finally:
        try:
            os.kill(info["pid"], signal.SIGCONT)
        except ProcessLookupError:
            pass
    assert st["state"] == "killed" and st["returncode"] == -signal.SIGKILL and "kept" in st["message"]
    assert rm.active_run() is None


@pytest.mark.slow
def test_a_second_stop_kills_every_process_of_a_two_process_run_before_the_gpus_are_free(ws, manager):
    """torchrun and its workers live in sessions of their own, out of reach of the command's process group: the
    second Stop kills them too, and the GPU lock is freed only once none is left -- no worker goes on writing
    checkpoints, a summary or an exit code into the killed run, or holding the GPUs a new run is given."""
    from finetune_helper.train.launch import run_processes

    rm = manager(ws)
    run_id = rm.start(build_recipe(ws, recipe_text({"max_steps": 2000, "logging_steps": 1, "save_steps": 5},
                                                   hardware={"gpu": "16GiB", "gpus": 2})))
    run_dir = ws.runs / run_id
    wait_for(rm, run_id, lambda s: s["loss"] is not None, "training", timeout=300)
    info = json.loads((run_dir / "process.json").read_text())
    assert len(run_processes(run_dir)) >= 4  # the command, torchrun, two workers
    os.kill(info["pid"], signal.SIGSTOP)  # the command hangs: the first Stop's SIGTERM waits
    try:
        rm.stop(run_id)
        rm.stop(run_id)
        st = wait_for(rm, run_id, ended, "killed", timeout=60)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(info["pid"], signal.SIGCONT)
    assert st["state"] == "killed" and not run_processes(run_dir)
    assert rm.active_run() is None
    files = {p: p.stat().st_mtime_ns for p in run_dir.rglob("*") if p.is_file()}
    time.sleep(3)
    assert {p: p.stat().st_mtime_ns for p in run_dir.rglob("*") if p.is_file()} == files  # nothing writes there now
    assert not (run_dir / "summary.json").exists() and not (run_dir / "exit.json").exists()


@pytest.mark.parametrize("line", ['{"step": 1e400, "loss": 1.0}', '{"step": "abc"}', "[1, 2]", '{"loss": true}'])
def test_a_run_folder_with_a_bad_metrics_line_stays_listed_and_readable(ws, manager, line):
    """One folder's odd metrics.jsonl line (hand-edited, a disk error) does not take the whole runs list down: the
    line is skipped, the run listed with what can be read (issue 20 item 8)."""
    rm = manager(ws)
    run_dir = ws.runs / "odd-run"
    run_dir.mkdir(parents=True)
    (run_dir / "process.json").write_text(json.dumps({"run_id": "odd-run", "pid": None, "started": 0.5,
                                                      "returncode": 0}))
    (run_dir / "metrics.jsonl").write_text("\n".join([json.dumps({"step": 1, "loss": 2.0, "wall_time": 1.0}), line,
                                                      json.dumps({"step": 2, "loss": 1.5, "wall_time": 2.0})]) + "\n")
    rows = {r["run_id"]: r for r in rm.list_runs()}
    assert rows["odd-run"]["step"] == 2 and rows["odd-run"]["train_loss_last"] == 1.5
    assert "1 unreadable line" in rm.status("odd-run")["diagnosis"]["evidence"]
