"""finetune-helper's Gradio app: recommend settings, export them, launch, watch and stop the fine-tune.

Start it with ``finetune-helper app [--host 127.0.0.1] [--port 7860] [--auth user:password] [--workspace DIR]``
or ``python app/app.py`` (same flags).  Loopback only and no share link unless asked; analytics off.

A thin front end: the recommendation comes from ``finetune_helper.recommender``, exports from
``finetune_helper.export``, runs from ``finetune_helper.runs`` (each one a ``finetune-helper run`` process writing its
run folder).  Core errors (:class:`FinetuneHelperError`) become ``gr.Error`` messages here and nowhere else; the app
keeps working.  ``finetune-helper app`` finds :func:`launch` through the ``finetune_helper.app`` entry point.

Named endpoints for ``gradio_client``: ``/recommend``, ``/export``, ``/start_run``, ``/run_status``, ``/stop_run``,
``/resume_run``, ``/list_runs``, ``/run_details``.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import html
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # also stops Gradio's Hub telemetry (STACK-NOTES.md)

import gradio as gr  # noqa: E402
import pandas as pd  # noqa: E402

from finetune_helper import defaults  # noqa: E402
from finetune_helper.commands.app import LOOPBACK, add_arguments, parse_auth  # noqa: E402
from finetune_helper.errors import FinetuneHelperError, first_line  # noqa: E402
from finetune_helper.recommender import catalog  # noqa: E402
from finetune_helper.recommender.schedule import logged_schedule_points, schedule_points, warmup_steps_for  # noqa: E402
from finetune_helper.runs.manager import (LR_FIND_FILE, PROBE_FILE, PROCESS_FILE, RECIPE_FILE, RunManager,  # noqa: E402
                                          build_recipe, read_json)
from finetune_helper.runs.workspace import Workspace  # noqa: E402
from finetune_helper.train import run_folder  # noqa: E402
from finetune_helper.train.recipe import BUILTIN_MODEL, PLACEHOLDER_DATA, recipe_from_settings  # noqa: E402
from finetune_helper.units import GiB, fmt_duration, fmt_gib  # noqa: E402

REPO_RECIPES = Path(__file__).resolve().parents[1] / "recipes"
FROM_RECOMMENDATION = "(the current recommendation)"
LOG_LINES = 12
EXPORT_FORMATS = {"python": "python", "json": "json", "yaml": "yaml", "cli": "shell", "recipe": "yaml"}
CSS = """
.fh-bar {height: 14px; background: var(--neutral-200); border-radius: 7px; overflow: hidden; margin: 4px 0 8px}
.fh-bar > div {height: 100%; background: var(--color-accent); transition: width .5s}
.fh-fits {color: #15803d; font-weight: 600} .fh-nofit {color: #b91c1c; font-weight: 600}
"""


def _kept_on_error(fn, outputs: int, *, message: bool):
    """For the page's own events: a core error leaves the last good outputs on screen (``gr.skip()``) and, with
    ``message``, returns its one line as the last output (shown next to the form) instead of error badges."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            result = fn(*args, **kwargs)
        except FinetuneHelperError as exc:
            return (*[gr.skip()] * outputs, f"**{exc}**") if message else tuple([gr.skip()] * outputs)
        result = result if isinstance(result, tuple) else (result,)
        return (*result, "") if message else result
    return wrapper


def _errors_shown(fn):
    """Core errors become a visible ``gr.Error`` (one line, named field); the app keeps serving."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except FinetuneHelperError as exc:
            raise gr.Error(str(exc), print_exception=False) from None
    return wrapper


#: what reading a damaged run folder raises, in the run manager or in the views here: a JSON file holding a list, a
#: metrics line whose step is not a number, bytes that are not UTF-8, a loss that is a string ...
_DAMAGED = (OSError, ValueError, TypeError, AttributeError, KeyError)
#: the files of a run folder the app reads, as a run writes them: one JSON object each (metrics.jsonl: one a line)
_RUN_FILES = (PROCESS_FILE, run_folder.SUMMARY, run_folder.EXIT, run_folder.PLAN, run_folder.TRAINING_ARGS, PROBE_FILE,
              LR_FIND_FILE, run_folder.METRICS, run_folder.RECIPE, RECIPE_FILE)
_JSON_TYPES = {list: "an array", str: "a string", int: "a number", float: "a number", bool: "a boolean",
               type(None): "null"}


def _damaged_file(run_dir: Path, *, lines: bool = True) -> str | None:
    """What is wrong with the first file of ``run_dir`` that is not as a run writes it (text that is not UTF-8, JSON
    that is not an object, with ``lines`` a metrics line without a whole-number step), or None.  Links are not read
    (the manager's rule); JSON cut short reads as a file being written, as the manager reads it."""
    for name in _RUN_FILES:
        path = run_dir / name
        if path.is_symlink() or not path.is_file():
            continue
        if name.endswith(".jsonl") and not lines:
            continue  # its bad lines are skipped and counted where it is read: not read here
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as exc:
            return f"{name} is not UTF-8 text (byte 0x{exc.object[exc.start]:02x} at offset {exc.start})"
        except OSError:
            continue
        if name.endswith(".jsonl"):
            records = list(enumerate(text.splitlines(), 1))
        elif name.endswith(".json"):
            records = [(0, text)]
        else:
            continue
        for number, line in records:
            try:
                value = json.loads(line)
            except ValueError:
                continue
            where = f"{name} line {number}" if number else name
            if not isinstance(value, dict):
                return f"{where} holds {_JSON_TYPES.get(type(value), 'a value')}, not a JSON object"
            if number and (not isinstance(value.get("step", 0), int) or isinstance(value.get("step"), bool)):
                return f"{where} has step {json.dumps(value.get('step'))}, not a whole number"
    return None


def damaged_run(run_dir: Path, exc: BaseException, after: str = "the other runs are not affected"
                ) -> FinetuneHelperError:
    """The one-line error for a run folder that cannot be read: the file at fault where it can be told, else what
    reading it raised."""
    what = _damaged_file(run_dir) or f"it cannot be read ({type(exc).__name__}: {first_line(exc)[:200]})"
    return FinetuneHelperError("run", f"{run_dir.name}: {what}: its run folder was edited or damaged ({after})")


# ------------------------------------------------------------------------------------------- recommend
def _opt_int(value: Any, field: str) -> int | None:
    if value is None or value == "":
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise FinetuneHelperError(field, f"must be a whole number, got {value!r}") from None
    if not math.isfinite(number) or number != int(number):
        raise FinetuneHelperError(field, f"must be a whole number, got {value!r}")
    return int(number)


def _gpus(value: Any) -> int:
    """Empty: one GPU; anything else as given (the planner refuses 0 or too many, naming the field)."""
    n = _opt_int(value, "gpus")
    return 1 if n is None else n


def _seq_len(value: Any) -> int | None:
    """0 or empty: the planner's default, min(2048, the model's maximum)."""
    return _opt_int(value, "seq-len") or None


def _number(value: Any, field: str) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise FinetuneHelperError(field, f"must be a number, got {value!r}") from None
    if not math.isfinite(number):
        raise FinetuneHelperError(field, f"must be a finite number, got {value!r}")
    return number


class App:
    """The handlers, bound to one workspace and its run manager."""

    def __init__(self, workspace: Workspace, detected_gpu: str | None = None) -> None:
        self.workspace = workspace
        self.runs = RunManager(workspace)
        self.detected_gpu = detected_gpu
        self.exports = workspace.root / "exports"
        self.exports.mkdir(exist_ok=True)
        self._profiles: dict[tuple, Any] = {}  # dataset profiles, see profile()

    # --------------------------------------------------------------------------------- recommendation
    def _model_spec(self, model: str):
        from finetune_helper.recommender.model import ModelSpec, resolve_model

        source = self.workspace.model_source(model, field="model")
        if source == BUILTIN_MODEL:
            from finetune_helper.train.tiny import TINY_LLAMA_CONFIG

            return ModelSpec.from_config(TINY_LLAMA_CONFIG, name=BUILTIN_MODEL, origin="builtin")
        return resolve_model(source)

    def plan(self, model, gpu, gpus, method, seq_len, dataset_size, epochs, target_batch, lr_min, lr_max,
             scheduler=defaults.SCHEDULER, strategy=defaults.STRATEGY, offload=defaults.OFFLOAD,
             trainer=defaults.TRAINER):
        return self.plan_and_data(model, gpu, gpus, method, seq_len, dataset_size, epochs, target_batch, lr_min,
                                  lr_max, scheduler, strategy, offload, trainer)[0]

    def plan_and_data(self, model, gpu, gpus, method, seq_len, dataset_size, epochs, target_batch, lr_min, lr_max,
                      scheduler=defaults.SCHEDULER, strategy=defaults.STRATEGY, offload=defaults.OFFLOAD,
                      trainer=defaults.TRAINER, data=None, data_split=None, data_config=None):
        """The plan, and with a dataset its profile (``finetune_helper.train.data_profile``): the examples the
        trainer keeps as the dataset size (the Training examples field is then not used), the max_length covering
        the data's p99 as the sequence length unless one is given."""
        from finetune_helper.recommender.gpu import resolve_gpu
        from finetune_helper.recommender.plan import PlanRequest, recommend_plan

        spec = self._model_spec(model)
        gpu_spec = resolve_gpu(str(gpu or "").strip() or "")
        n_gpus = _gpus(gpus)
        from finetune_helper.recommender.calibration import lookup

        source = str(data or "").strip()
        req = PlanRequest(model=spec, gpu=gpu_spec, gpus=n_gpus, method=str(method), seq_len=_seq_len(seq_len),
                          dataset_size=None if source else _opt_int(dataset_size, "dataset-size"),
                          epochs=_number(epochs, "epochs"),
                          target_effective_batch=_opt_int(target_batch, "target-batch") or 0,
                          lr_min=_number(lr_min, "lr-min"), lr_max=_number(lr_max, "lr-max"),
                          scheduler=str(scheduler or defaults.SCHEDULER),
                          strategy=str(strategy or defaults.STRATEGY), offload=str(offload or defaults.OFFLOAD),
                          trainer=str(trainer or defaults.TRAINER),
                          calibration=lookup(gpu_spec.name, spec.name, str(method)))
        if not source:
            return recommend_plan(req), None
        from finetune_helper.train.data_profile import plan_with_data

        return plan_with_data(req, self.profile(source, data_split, data_config, model, spec))

    #: the dataset fields as the form names them
    _DATA_FIELDS = {"data.path": "dataset", "data.split": "dataset split", "data.config": "dataset config",
                    "data.format": "dataset", "data.columns": "dataset"}

    def profile(self, data, split, config, model, spec):
        """The dataset's profile for the model (:func:`~finetune_helper.train.data_profile.profile_data`), kept for
        the same file (same size and modification time), split, configuration and model: reading and tokenizing
        takes seconds, changing the batch or the GPU does not need it again."""
        from finetune_helper.train.data_profile import profile_data

        source = self.workspace.data_source(data, field="dataset")
        split = str(split or "").strip() or "train"
        config = str(config or "").strip() or None
        try:
            stat = Path(source).stat()
            stamp = (stat.st_size, stat.st_mtime_ns)
        except OSError:  # a Hub id or builtin:arithmetic
            stamp = None
        key = (source, split, config, spec.name, stamp)
        if key not in self._profiles:
            tokenizer = None
            if str(model).strip() == BUILTIN_MODEL:
                from finetune_helper.train.tiny import base_model_dir

                tokenizer = str(base_model_dir())
            try:
                found = profile_data(source, model=spec, split=split, config=config, tokenizer=tokenizer)
            except FinetuneHelperError as exc:
                raise FinetuneHelperError(self._DATA_FIELDS.get(exc.field, exc.field), exc.message) from None
            while len(self._profiles) >= 8:
                self._profiles.pop(next(iter(self._profiles)))
            self._profiles[key] = found
        return self._profiles[key]

    def recommend(self, model, gpu, gpus, method, seq_len, dataset_size, epochs, target_batch, lr_min, lr_max,
                  scheduler=defaults.SCHEDULER, strategy=defaults.STRATEGY, offload=defaults.OFFLOAD,
                  trainer=defaults.TRAINER, data=None, data_split=None, data_config=None):
        """Verdict, settings, memory chart, LR schedule and the plan as JSON (with a dataset: its profile under
        ``data``)."""
        return self.recommend_view(model, gpu, gpus, method, seq_len, dataset_size, epochs, target_batch, lr_min,
                                   lr_max, scheduler, strategy, offload, trainer, data, data_split, data_config)[:5]

    def recommend_view(self, model, gpu, gpus, method, seq_len, dataset_size, epochs, target_batch, lr_min, lr_max,
                       scheduler=defaults.SCHEDULER, strategy=defaults.STRATEGY, offload=defaults.OFFLOAD,
                       trainer=defaults.TRAINER, data=None, data_split=None, data_config=None):
        """:meth:`recommend` and the dataset's figures and length histogram (hidden without a dataset)."""
        plan, profile = self.plan_and_data(model, gpu, gpus, method, seq_len, dataset_size, epochs, target_batch,
                                           lr_min, lr_max, scheduler, strategy, offload, trainer, data, data_split,
                                           data_config)
        settings = pd.DataFrame(plan.settings_rows(), columns=["setting", "value", "reason"])
        plan_json = plan.to_dict()
        if profile is not None:
            plan_json["data"] = profile.to_dict()
        frame = histogram_frame(profile) if profile is not None else None
        return (verdict_markdown(plan), settings, memory_frame(plan), schedule_frame(plan), plan_json,
                data_markdown(profile, packing=plan.request.packing) if profile is not None else "",
                gr.BarPlot(value=frame, sort=list(frame["tokens"]), visible=True) if frame is not None
                else gr.BarPlot(value=None, visible=False))

    def export(self, model, gpu, gpus, method, seq_len, dataset_size, epochs, target_batch, lr_min, lr_max,
               scheduler=defaults.SCHEDULER, strategy=defaults.STRATEGY, offload=defaults.OFFLOAD,
               trainer=defaults.TRAINER, fmt="python", data=None, data_split=None, data_config=None):
        from finetune_helper.export.formats import render

        if fmt not in EXPORT_FORMATS:
            raise FinetuneHelperError("format", f"{fmt!r} is not one of {', '.join(EXPORT_FORMATS)}")
        plan, profile = self.plan_and_data(model, gpu, gpus, method, seq_len, dataset_size, epochs, target_batch,
                                           lr_min, lr_max, scheduler, strategy, offload, trainer, data, data_split,
                                           data_config)
        output_dir = f"outputs/{plan.request.model.name.rstrip('/').split('/')[-1]}"
        texts = {"recipe": self.recipe_text(model, gpu, gpus, method, seq_len, dataset_size, epochs, target_batch,
                                            lr_min, lr_max, scheduler, strategy, offload, trainer, checked=True,
                                            profile=profile, data_split=data_split, data_config=data_config)}
        names = {"python": "train_args.py", "json": "training_args.json", "yaml": "training_args.yaml",
                 "recipe": "recipe.yaml"}
        try:
            texts.update({f: render(plan, f, output_dir=output_dir) for f in ("python", "json", "yaml", "cli")})
        except FinetuneHelperError as exc:  # a schedule with no TrainingArguments type: the recipe runs it
            if exc.field != "scheduler":
                raise
            texts.update(dict.fromkeys(("python", "json", "yaml", "cli"), f"# {exc.message}\n"))
            names = {"recipe": "recipe.yaml"}
        folder = Path(tempfile.mkdtemp(prefix=time.strftime("%Y%m%d-%H%M%S-"), dir=self.exports))
        files = []
        for key, name in names.items():
            path = folder / name
            path.write_text(texts[key], encoding="utf-8")
            files.append(str(path))
        return texts[fmt], files

    def recipe_text(self, model, gpu, gpus, method, seq_len, dataset_size, epochs, target_batch, lr_min, lr_max,
                    scheduler=defaults.SCHEDULER, strategy=defaults.STRATEGY, offload=defaults.OFFLOAD,
                    trainer=defaults.TRAINER, data_path: str = PLACEHOLDER_DATA, checked: bool = False,
                    profile=None, data_split=None, data_config=None) -> str:
        """The form as a recipe; ``checked``: the caller has already planned these values (so they are valid); with
        a dataset's ``profile`` the recipe reads that data at the max_length planned from it (and counts its
        examples when it runs)."""
        if not checked:
            self.plan(model, gpu, gpus, method, seq_len, dataset_size, epochs, target_batch, lr_min, lr_max,
                      scheduler, strategy, offload, trainer)
        if profile is not None:
            data_path, seq_len, dataset_size = profile.source, profile.max_length, None
        recipe = recipe_from_settings(
            model=str(model).strip(), gpu=str(gpu).strip(), gpus=_gpus(gpus), method=str(method),
            seq_len=_seq_len(seq_len), dataset_size=_opt_int(dataset_size, "dataset-size"),
            epochs=_number(epochs, "epochs"), target_effective_batch=_opt_int(target_batch, "target-batch") or 0,
            lr_min=_number(lr_min, "lr-min"), lr_max=_number(lr_max, "lr-max"), data_path=data_path,
            scheduler=str(scheduler or defaults.SCHEDULER), strategy=str(strategy or defaults.STRATEGY),
            offload=str(offload or defaults.OFFLOAD), trainer=str(trainer or defaults.TRAINER))
        if profile is not None:
            recipe.data.split, recipe.data.config = profile.split, profile.config
            header = ("# Made by the finetune-helper app from its recommendation for this dataset (max_length from "
                      "its token lengths).\n# Run: finetune-helper run recipe.yaml\n")
        else:
            header = ("# Made by the finetune-helper app from its recommendation.\n"
                      f"# data.path: replace {PLACEHOLDER_DATA} with your dataset (or upload one in the Train tab).\n"
                      "# Run: finetune-helper run recipe.yaml\n")
        return header + recipe.to_yaml()

    # --------------------------------------------------------------------------------- train
    def load_recipe(self, choice, model, gpu, gpus, method, seq_len, dataset_size, epochs, target_batch, lr_min,
                    lr_max, scheduler=defaults.SCHEDULER, strategy=defaults.STRATEGY,
                    offload=defaults.OFFLOAD, trainer=defaults.TRAINER, data=None, data_split=None,
                    data_config=None) -> str:
        if choice == FROM_RECOMMENDATION:
            profile = None
            if str(data or "").strip():
                profile = self.plan_and_data(model, gpu, gpus, method, seq_len, dataset_size, epochs, target_batch,
                                             lr_min, lr_max, scheduler, strategy, offload, trainer, data, data_split,
                                             data_config)[1]
            return self.recipe_text(model, gpu, gpus, method, seq_len, dataset_size, epochs, target_batch, lr_min,
                                    lr_max, scheduler, strategy, offload, trainer, checked=profile is not None,
                                    profile=profile)
        names = {p.name: p for p in shipped_recipes()}
        if choice not in names:
            raise FinetuneHelperError("recipe", f"{choice!r} is not a shipped recipe; choose from "
                                      f"{', '.join(names) or 'none'}")
        return names[choice].read_text(encoding="utf-8")

    def start_run(self, recipe_yaml, data_file, data_path, trust_remote_code, run_name):
        return self._start("run", recipe_yaml, data_file, data_path, trust_remote_code, run_name)

    def start_probe(self, recipe_yaml, data_file, data_path, trust_remote_code, run_name):
        return self._start("probe", recipe_yaml, data_file, data_path, trust_remote_code, run_name)

    def start_lr_find(self, recipe_yaml, data_file, data_path, trust_remote_code, run_name):
        return self._start("lr-find", recipe_yaml, data_file, data_path, trust_remote_code, run_name)

    #: per kind of run the Train tab starts: the default name and the line it answers with
    _STARTS = {
        "run": (None, "preparing (loading the model and data takes a few seconds)."),
        "probe": ("probe", "measuring a few real steps at the recommended micro-batch and larger ones "
                           "(finetune-helper probe); the table appears below when it ends."),
        "lr-find": ("lr-find", "the learning-rate range test (finetune-helper lr-find), an exponential sweep on the "
                               "recipe's model, data and batch; the curve is plotted as it runs."),
    }

    def _start(self, kind, recipe_yaml, data_file, data_path, trust_remote_code, run_name):
        recipe = build_recipe(self.workspace, recipe_yaml, data_file=data_file, data_path=data_path or "",
                              trust_remote_code=bool(trust_remote_code))
        default_name, what = self._STARTS[kind]
        run_id = self.runs.start(recipe, name=(run_name or "").strip() or default_name, kind=kind)
        return run_id, f"Started **{run_id}**: {what}"

    @contextlib.contextmanager
    def _reading(self, run_id):
        """Showing a run: a folder that cannot be read (a file edited by hand, or damaged) is a one-line error
        naming the run and the file (:func:`damaged_run`), like any core error, not Gradio's generic one.  The
        manager reads such a file as absent (its list goes on); shown alone, the run names it.  Bad metrics lines
        are not an error: the curve skips and counts them."""
        run_dir = self.workspace.runs / str(run_id).strip()
        if run_dir.name in self.run_ids() and (what := _damaged_file(run_dir, lines=False)):
            raise FinetuneHelperError("run", f"{run_dir.name}: {what}: its run folder was edited or damaged (the "
                                             "other runs are not affected)")
        try:
            yield
        except FinetuneHelperError:
            raise
        except _DAMAGED as exc:
            raise damaged_run(self.workspace.runs / str(run_id).strip(), exc) from None

    def run_status(self, run_id) -> dict[str, Any]:
        with self._reading(run_id):
            return self.runs.status(run_id)

    def stop_run(self, run_id) -> str:
        st = self.runs.stop(run_id)
        if st.get("kind") == "lr-find":
            return (f"Stopping **{st['run_id']}**: the range test ends after the current step and keeps its curve so "
                    "far (a sweep saves no checkpoint: nothing to resume).")
        if st.get("kind") == "probe":
            return f"Stopping **{st['run_id']}**: the probe ends (nothing to resume)."
        return f"Stopping **{st['run_id']}**: it saves a checkpoint at the end of the current step, then exits."

    def resume_run(self, run_id) -> str:
        self.runs.resume(run_id)
        return f"Resumed **{run_id}** from its last checkpoint."

    def run_ids(self) -> list[str]:
        return self.runs.run_ids()

    def refresh(self, run_id, last_fingerprint):
        """The Train tab's live view (timer tick): skipped when nothing changed since the last tick."""
        if not run_id:
            return (*[gr.skip()] * 7, last_fingerprint)
        try:
            with self._reading(run_id):
                return self._live_view(run_id, last_fingerprint)
        except FinetuneHelperError as exc:
            return (f"<p>{html.escape(str(exc))}</p>", *[gr.skip()] * 6, None)

    def _live_view(self, run_id, last_fingerprint):
        st = self.runs.status(run_id)
        curve = st.get("lr_find") or {}
        fingerprint = (run_id, st["state"], len(st["metrics"]), st["log_tail"][-200:], len(curve.get("lrs") or []),
                       curve.get("done"))
        if fingerprint == last_fingerprint:
            return (*[gr.skip()] * 7, last_fingerprint)
        log = "\n".join(st["log_tail"].splitlines()[-LOG_LINES:])  # the newest lines, all in view
        sweep = (gr.LinePlot(value=_or_none(lr_find_frame(curve)), visible=True) if curve
                 else gr.LinePlot(visible=False))
        return (progress_html(st), _or_none(loss_frame(st["metrics"])), _or_none(live_lr_frame(st)),
                memory_markdown(st), log, _status_json(st), sweep, fingerprint)

    def current_runs(self):
        """On page load: every run in the list, the one training now (or the newest) selected."""
        ids = self.run_ids()
        return gr.Dropdown(choices=ids, value=self.runs.active_run() or (ids[0] if ids else None))

    # --------------------------------------------------------------------------------- runs
    def list_runs(self):
        try:
            rows = self.runs.list_runs()
        except FinetuneHelperError:
            raise
        except _DAMAGED as exc:  # a folder the manager's list does not leave out: named, so it can be removed
            damaged = next((self.workspace.runs / r for r in self.run_ids()
                            if _damaged_file(self.workspace.runs / r)), None)
            if damaged is None:
                raise FinetuneHelperError("run", f"the runs in {self.workspace.runs} cannot be listed "
                                                 f"({type(exc).__name__}: {first_line(exc)[:200]})") from None
            raise damaged_run(damaged, exc, "the list is shown again once it is fixed or removed") from None
        columns = ["run_id", "state", "model", "method", "step", "max_steps", "train_loss_last", "eval_loss", "started"]
        frame = pd.DataFrame(rows, columns=columns).round({"train_loss_last": 4, "eval_loss": 4})
        return frame, gr.Dropdown(choices=[r["run_id"] for r in rows], value=rows[0]["run_id"] if rows else None)

    def run_details(self, run_id):
        with self._reading(run_id):
            return self._details(run_id)

    def _details(self, run_id):
        d = self.runs.details(run_id)
        summary = d["summary"] or {}
        lines = [f"### {d['run_id']}: {d['state']}", f"step {d['step']}/{d['max_steps'] or '?'}; "
                 f"final train loss {_fmt(summary.get('train_loss_last', d['loss']))}; "
                 f"eval loss {_fmt(summary.get('eval_loss', d['eval_loss']))}"]
        if summary.get("exact_match_after") is not None:
            lines.append(f"held-out exact match: {_fmt(summary.get('exact_match_before'), '{:.1%}')} before, "
                         f"{_fmt(summary['exact_match_after'], '{:.1%}')} after")
        if d["message"]:
            lines.append(f"message: {d['message']}")
        if d.get("diagnosis"):
            lines.append(diagnosis_markdown(d["diagnosis"]))
        return ("\n\n".join(lines), _or_none(loss_frame(d["metrics"])), d["plan"] or {}, d["training_args"] or {},
                d["recipe"] or "")


def _or_none(frame: pd.DataFrame) -> pd.DataFrame | None:
    """No points yet: clear the chart. (Sent an empty frame first, a Gradio 6 line chart never draws the lines of
    the later frames; measured in the browser test's screenshots.)"""
    return frame if len(frame) else None


def _fmt(value, fmt="{:.4f}") -> str:
    return "-" if value is None else fmt.format(value)


def _status_json(st: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in st.items() if k not in ("metrics", "log_tail")}


# ------------------------------------------------------------------------------------------- views
def verdict_markdown(plan) -> str:
    r = plan.request
    head = (f"**{r.model.name}** ({r.model.model_type}, {r.model.num_parameters() / 1e9:.3g}B parameters) on "
            f"{r.gpus} x {r.gpu.describe()}, {r.method}, seq {r.resolved_seq_len}: per-device batch "
            f"**{plan.per_device_train_batch_size}** x accumulation **{plan.gradient_accumulation_steps}** = effective "
            f"**{plan.effective_batch_size}**, lr **{plan.learning_rate:.2e}**, warmup **{plan.warmup_ratio:.1%}** "
            f"({plan.warmup_steps} of {plan.total_steps} steps)")
    verdict = ('<span class="fh-fits">Fits</span>' if plan.fits else '<span class="fh-nofit">Does not fit</span>')
    total = plan.peak_memory_bytes
    parts = " + ".join(f"{MEMORY_PARTS.get(k, k)} {b / GiB:.2f}" for k, b in plan.estimate.breakdown.items() if b)
    lines = [head, f"{verdict}: {plan.reasons['fits']}", *([f"**{plan.lr_note[0].upper() + plan.lr_note[1:]}**"]
                                                            if plan.lr_note else []),
             f"Peak per GPU {fmt_gib(total)} = {parts} GiB; GPU {fmt_gib(r.gpu.memory_bytes)}, usable "
             f"{fmt_gib(r.budget_bytes)} ({1 - r.safety_margin:.0%})."]
    from finetune_helper.export.formats import TRAINER_LABELS

    trainer = f"Planned for {TRAINER_LABELS[r.trainer]}"
    if r.trainer == "trl":
        other = plan.under_trainer("transformers")
        trainer += (f"; under transformers.Trainer the same batch would need {fmt_gib(other['peak_memory_bytes'])} "
                    f"({'fits' if other['fits'] else 'does not fit'}): Trainer *transformers* plans batch "
                    f"{other['per_device_train_batch_size']}")
    lines.append(trainer + ".")
    from finetune_helper.recommender.throughput import describe

    speed = describe(plan.time(), r.gpu.name, plan.total_steps)
    lines.append(f"**{speed[0].upper() + speed[1:]}.**" if speed else
                 f"No time prediction: {r.gpu.name} has no catalog peak TFLOP/s and memory bandwidth (name a catalog "
                 "GPU for one).")
    for step in plan.escalation:
        lines.append(f"- tried {step.change}: {fmt_gib(step.peak_memory_bytes)}: "
                     f"{'fits' if step.fits else 'does not fit'}")
    return "\n\n".join(lines)


def data_markdown(profile, packing: bool = False) -> str:
    """The dataset's figures (what ``recommend --data`` prints): what was read, the length distribution,
    max_length and truncation, padding, packing, and the sampling error."""
    from finetune_helper.commands.recommend import data_lines

    lines = data_lines(profile)
    counted = (f"The plan counts the **{profile.packed_rows:,}** packed rows" if packing else
               f"The plan counts the **{profile.trained_examples:,}** examples SFTTrainer trains on")
    return "\n\n".join([f"**{lines[0][0].upper() + lines[0][1:]}**", *(f"- {line}" for line in lines[1:]),
                         counted + f" and uses max_length **{profile.max_length}** as the sequence length."])


#: the histogram's colours: bars within max_length, and bars with examples longer than it
DATA_COLORS = {"within max_length": "#2563eb", "longer than max_length": "#ea580c"}


def histogram_frame(profile) -> pd.DataFrame:
    """One bar per histogram bin of the token lengths (the share of the examples, in %), coloured by whether its
    examples fit max_length; the last bar holds those above p99."""
    rows = [{"tokens": f"{bar['low']}-{bar['high']}" if bar["high"] > bar["low"] else str(bar["low"]),
             "examples (%)": round(100 * bar["share"], 3),
             "part": "within max_length" if bar["high"] <= profile.max_length else "longer than max_length"}
            for bar in profile.histogram]
    return pd.DataFrame(rows, columns=["tokens", "examples (%)", "part"])


#: the memory chart's names for MemoryEstimate.breakdown (estimate.py documents each part)
MEMORY_PARTS = {"weights": "weights", "gradients": "gradients", "optimizer_states": "optimizer states",
                "activations": "activations", "transient": "transient peak", "overhead": "CUDA ctx + fragm."}
MEMORY_COLORS = {"estimate, by part": "#2563eb", "estimated peak": "#ea580c", "GPU": "#16a34a"}
#: fixed colour domains: a Gradio line chart keeps the colour domain of the first data it drew, so a series that
#: appears later (eval loss, or any series after an empty first frame) would get no colour and stay invisible
LOSS_COLORS = {"train": "#2563eb", "eval": "#ea580c"}
#: "schedule" sorts before "trainer", so the logged values are drawn over the planned curve
LR_COLORS = {"schedule": "#cbd5e1", "trainer": "#2563eb"}
MEMORY_BARS = [*MEMORY_PARTS.values(), "estimated peak", "usable budget", "GPU memory"]


def memory_frame(plan) -> pd.DataFrame:
    """One bar per part of the estimated peak, then the peak itself next to the GPU's usable budget and capacity."""
    rows = [{"part": MEMORY_PARTS.get(part, part), "GiB": round(b / GiB, 3), "kind": "estimate, by part"}
            for part, b in plan.estimate.breakdown.items()]
    rows.append({"part": "estimated peak", "GiB": round(plan.peak_memory_bytes / GiB, 3), "kind": "estimated peak"})
    rows.append({"part": "usable budget",
                 "GiB": round(plan.request.budget_bytes / GiB, 3), "kind": "GPU"})
    rows.append({"part": "GPU memory", "GiB": round(plan.request.gpu.memory_bytes / GiB, 3), "kind": "GPU"})
    return pd.DataFrame(rows)


def schedule_frame(plan) -> pd.DataFrame:
    """The learning rate at every optimizer step, as the Trainer schedules it (finetune_helper.recommender.schedule)."""
    warmup = warmup_steps_for(plan.warmup_ratio, plan.total_steps)
    points = schedule_points(plan.learning_rate, plan.total_steps, warmup, plan.schedule_type,
                             options=plan.lr_scheduler_kwargs)
    return pd.DataFrame(points, columns=["step", "learning_rate"])


def _typed(rows: list[dict[str, Any]], y: str) -> pd.DataFrame:
    """Plot data with numeric axes even when empty: Gradio types an empty column as nominal, and the chart keeps
    the types of the first data it drew."""
    return pd.DataFrame(rows, columns=["step", y, "series"]).astype({"step": "int64", y: "float64", "series": "str"})


def loss_frame(metrics: list[dict[str, Any]]) -> pd.DataFrame:
    rows = [{"step": m["step"], "loss": m["loss"], "series": "train"} for m in metrics if m.get("loss") is not None]
    rows += [{"step": m["step"], "loss": m["eval_loss"], "series": "eval"} for m in metrics
             if m.get("eval_loss") is not None]
    return _typed(rows, "loss")


def live_lr_frame(st: dict[str, Any]) -> pd.DataFrame:
    """Logged learning rates, over the schedule planned for this run's steps (they should lie on it)."""
    rows = [{"step": m["step"], "learning_rate": m["learning_rate"], "series": "trainer"} for m in st["metrics"]
            if m.get("learning_rate") is not None]
    args = _run_json(st["run_dir"], "training_args.json")
    if st.get("max_steps") and args.get("learning_rate"):
        total = int(st["max_steps"])
        warmup = warmup_steps_for(args.get("warmup_steps", args.get("warmup_ratio", 0)) or 0, total)
        sched, options = args.get("lr_scheduler_type", "linear"), args.get("lr_scheduler_kwargs") or None
        planned = _run_json(st["run_dir"], "plan.json")
        if planned.get("lr_scheduler_type") == "step_decay":  # the runner's LambdaLR over constant_with_warmup
            sched, options = "step_decay", planned.get("lr_scheduler_kwargs")
        try:
            points = logged_schedule_points(args["learning_rate"], total, warmup, sched, max_points=400,
                                            options=options)
        except FinetuneHelperError:  # a scheduler schedule.py does not model: show the logged values only
            points = []
        rows += [{"step": step, "learning_rate": lr, "series": "schedule"} for step, lr in points]
    return _typed(rows, "learning_rate")


def _run_json(run_dir: str, name: str) -> dict[str, Any]:
    """A run folder's JSON file as a dict (empty if missing, unreadable, or not a regular file: the manager's rule)."""
    data = read_json(Path(run_dir) / name)
    return data if isinstance(data, dict) else {}


def progress_html(st: dict[str, Any]) -> str:
    pct = 100 * st["progress"]
    parts = [f"<b>{html.escape(st['run_id'])}</b>: {html.escape(st['state'])}",
             f"step {st['step']}/{st['max_steps'] or '?'} ({pct:.0f}%)"]
    if st.get("eta_seconds") is not None:
        parts.append(f"ETA {fmt_duration(st['eta_seconds'])}")
    if st.get("loss") is not None:
        parts.append(f"loss {st['loss']:.4f}")
    if st.get("tokens_per_second"):
        parts.append(f"{st['tokens_per_second']:,.0f} tok/s"
                     + (f" (predicted {st['predicted_tokens_per_second']:,.0f})"
                        if st.get("predicted_tokens_per_second") else ""))
    text = " · ".join(parts)
    if st.get("message"):
        text += f"<br>{html.escape(st['message'])}"
    if st.get("diagnosis"):  # the doctor, live: what the curves show so far
        d = st["diagnosis"]
        text += (f'<br><span id="fh-diagnosis">doctor: <b>{html.escape(d["diagnosis"])}</b>: '
                 f'{html.escape(d["evidence"])}</span>')
    return f'<div class="fh-bar"><div style="width:{pct:.1f}%"></div></div><div id="fh-status">{text}</div>'


def diagnosis_markdown(d: dict[str, Any]) -> str:
    """The doctor's reading of a run (``finetune-helper doctor``): label, evidence, advice."""
    return f"**doctor: {d['diagnosis']}**: {d['evidence']}  \nadvice: {d['advice']}"


def probe_markdown(probe: dict[str, Any]) -> str:
    """``finetune-helper probe``'s result as a table: micro-batch, estimated, measured, error."""
    rows = ["| micro-batch | estimated | measured | error | fits |", "|---:|---:|---:|---:|:---|"]
    for r in probe.get("rows", []):
        measured = fmt_gib(r["measured_bytes"]) if r.get("measured_bytes") else "-"
        err = f"{r['error']:+.1%}" if r.get("error") is not None else "-"
        fits = {True: "yes", False: "no", None: "-"}[r.get("fits")]
        rows.append(f"| {r['micro_batch']} | {fmt_gib(r['estimated_bytes'])} | {measured} | {err} | {fits} |")
    cal = probe.get("calibration")
    note = (f"\n\nCalibration measured / estimated = {cal['ratio']:.3f} on {cal['device']} ({probe.get('measure')}); "
            "later plans for this device, model and method use it." if cal else "")
    return f"Probe on {probe.get('device')} ({probe.get('measure')}):\n\n" + "\n".join(rows) + note


def lr_find_markdown(curve: dict[str, Any]) -> str:
    """The range test so far, or its suggestion (or why there is none) when it is done."""
    lrs = curve.get("lrs") or []
    if not curve.get("done"):
        return f"LR range test: {len(lrs)} steps so far" + (f", LR {lrs[-1]:.2g}" if lrs else "")
    suggested, clamped, steep, valley, rule = (curve.get(k) for k in (
        "suggested_lr", "suggested_lr_clamped", "steepest_lr", "valley_lr", "rule_lr"))
    lo, hi = curve.get("bounds") or (None, None)
    head = (f"interrupted by {curve['interrupted']} after {len(lrs)} steps: " if curve.get("interrupted") else "")
    if suggested:
        parts = [f"LR range test: {head}suggested **{suggested:.3g}** ({curve.get('suggestion')})"
                 + (f", within the bounds [{lo:g}, {hi:g}]: {clamped:.3g}" if clamped else "")]
        parts += [f"{name} {lr:.3g}" for name, lr in (("steepest", steep), ("valley", valley)) if lr]
    else:
        parts = [f"LR range test: {head}no suggestion ({curve.get('no_suggestion') or 'the loss never fell'})"]
    if rule:
        parts.append(f"rule-based plan {rule:.3g}")
    return "; ".join(parts)


def lr_find_frame(curve: dict[str, Any]) -> pd.DataFrame:
    """The range test's curve for the loss chart: loss (raw and smoothed) against log10 of the learning rate."""
    rows = [{"log10_lr": math.log10(lr), "loss": loss, "series": series}
            for series, values in (("loss", curve.get("losses") or []), ("smoothed", curve.get("smoothed") or []))
            for lr, loss in zip(curve.get("lrs") or [], values) if math.isfinite(loss)]
    return pd.DataFrame(rows, columns=["log10_lr", "loss", "series"])


def memory_markdown(st: dict[str, Any]) -> str:
    if st.get("lr_find"):
        return lr_find_markdown(st["lr_find"])
    if st.get("probe"):
        return probe_markdown(st["probe"])
    measured, estimated = st.get("peak_memory_bytes"), st.get("estimated_peak_memory_bytes")
    if measured:
        ratio = f" ({measured / estimated - 1:+.1%})" if estimated else ""
        return (f"GPU memory: measured peak {fmt_gib(measured)} (torch.cuda.max_memory_allocated) vs estimated "
                f"{fmt_gib(estimated) if estimated else '-'}{ratio}")
    return "GPU memory: measured on CUDA runs only (this run has no GPU)."


def shipped_recipes() -> list[Path]:
    return sorted(REPO_RECIPES.glob("*.yaml")) if REPO_RECIPES.is_dir() else []


def _detect_gpu_label() -> str | None:
    try:
        from finetune_helper.recommender.gpu import detect_gpu

        gpu = detect_gpu()
    except (FinetuneHelperError, ImportError, RuntimeError):
        return None
    return gpu.describe()


# ------------------------------------------------------------------------------------------- layout
def _recommend_tab(app: App) -> SimpleNamespace:
    """The Recommend tab's components (the form opens on a worked example: Llama-3.1-8B LoRA on a 24 GB card)."""
    models = [BUILTIN_MODEL] + [m["id"] for m in catalog.model_entries()]
    gpus = [g["name"] for g in catalog.gpu_entries()]
    gpu_choices = ([(f"auto (detected: {app.detected_gpu})", "auto")] if app.detected_gpu else []) + gpus
    t = SimpleNamespace()
    with gr.Row():
        t.model = gr.Dropdown(models, value="meta-llama/Llama-3.1-8B", allow_custom_value=True,
                              label="Model", info="catalog, Hub id (owner/name), or a folder in the workspace")
        t.gpu = gr.Dropdown(gpu_choices, value="auto" if app.detected_gpu else "RTX 4090",
                            allow_custom_value=True, label="GPU", info="catalog name, or memory such as 24GB")
        # no `minimum` on the number fields: gr.Number checks it before the handler runs, so a string sent through
        # the API (gpus="two") failed there with Gradio's generic error and a number under it with a message naming
        # no field; the handlers check every value (_opt_int, _number, the planner) and name the field
        t.n_gpus = gr.Number(1, step=1, label="GPUs")
        t.method = gr.Radio(list(defaults.METHODS), value="lora", label="Method")
    with gr.Row():
        t.seq_len = gr.Number(0, step=1, label="Sequence length", info="0: min(2048, the model's maximum)")
        t.dataset_size = gr.Number(20000, step=1, label="Training examples")
        t.epochs = gr.Number(2, label="Epochs")
        t.target_batch = gr.Number(defaults.TARGET_EFFECTIVE_BATCH, step=1, label="Target effective batch")
        t.lr_min = gr.Number(defaults.LR_MIN, label="LR min")
        t.lr_max = gr.Number(defaults.LR_MAX, label="LR max")
        t.scheduler = gr.Dropdown(list(defaults.SCHEDULES), value=defaults.SCHEDULER, label="LR schedule",
                                  elem_id="scheduler")
        t.strategy = gr.Dropdown(list(defaults.STRATEGIES), value=defaults.STRATEGY, label="Several GPUs",
                                 info="auto: the fastest predicted of DDP, FSDP, ZeRO-2, ZeRO-3; zero2 / zero3: DeepSpeed",
                                 elem_id="strategy")
        t.offload = gr.Dropdown(list(defaults.OFFLOADS), value=defaults.OFFLOAD, label="Offload to host",
                                info="DeepSpeed: optimizer (zero2 / zero3), all (zero3)", elem_id="offload")
        t.trainer = gr.Dropdown(list(defaults.TRAINERS), value=defaults.TRAINER, label="Trainer",
                                info="trl: SFTTrainer (what Train runs); transformers: Trainer, full logits",
                                elem_id="trainer")
    with gr.Row():
        t.data = gr.Textbox(label="Dataset (optional)", elem_id="data-path", scale=3,
                            placeholder="a .json/.jsonl/.csv/.parquet file in the workspace, a Hub dataset id, or "
                            "builtin:arithmetic",
                            info="tokenized with the model's tokenizer: the examples replace Training examples, a "
                            "max_length covering its p99 the sequence length (unless one is given)")
        t.data_split = gr.Textbox("train", label="Split", elem_id="data-split")
        t.data_config = gr.Textbox(label="Config (Hub datasets)", elem_id="data-config")
    t.button = gr.Button("Recommend", variant="primary", elem_id="recommend-btn")
    t.error = gr.Markdown(elem_id="recommend-error")
    #: the named endpoints /recommend and /export (errors raised to the API client); the page's own button keeps
    #: the last good recommendation on screen instead
    t.api_button = gr.Button(visible=False)
    t.verdict = gr.Markdown(elem_id="verdict")
    t.data_md = gr.Markdown(elem_id="data-profile")
    t.data_plot = gr.BarPlot(x="tokens", y="examples (%)", color="part", label="Token lengths of the dataset "
                             "(share of the examples per range of tokens)", elem_id="data-plot", height=320,
                             color_map=DATA_COLORS, x_title="tokens per example", y_title="examples (%)",
                             x_label_angle=-35, visible=False)
    t.settings = gr.Dataframe(headers=["setting", "value", "reason"], label="Recommended settings",
                              interactive=False, wrap=True, elem_id="settings-table",
                              column_widths=["18%", "12%", "70%"], max_height=900)
    with gr.Row():
        t.memory_plot = gr.BarPlot(x="part", y="GiB", color="kind", label="Peak memory per GPU vs capacity",
                                   elem_id="memory-plot", height=400, color_map=MEMORY_COLORS, sort=MEMORY_BARS,
                                   x_title=" ", y_title="GiB (2^30 bytes)", x_label_angle=-35)
        t.lr_plot = gr.LinePlot(x="step", y="learning_rate", label="Learning-rate schedule (as the Trainer "
                                "schedules it)", elem_id="lr-plot", height=470, x_title="optimizer step",
                                y_title="learning rate")
    with gr.Row():
        t.export_format = gr.Radio(list(EXPORT_FORMATS), value="python", label="Export format")
    t.code = gr.Code(language="python", label="Trainer arguments (SFTConfig or TrainingArguments)",
                     elem_id="export-code")
    t.downloads = gr.File(label="Downloads: Python, JSON, YAML, recipe", file_count="multiple", elem_id="downloads")
    with gr.Accordion("Plan as JSON", open=False):
        t.plan_json = gr.JSON()
    t.form = [t.model, t.gpu, t.n_gpus, t.method, t.seq_len, t.dataset_size, t.epochs, t.target_batch, t.lr_min,
              t.lr_max, t.scheduler, t.strategy, t.offload, t.trainer]
    t.outputs = [t.verdict, t.settings, t.memory_plot, t.lr_plot, t.plan_json]
    t.data_inputs = [t.data, t.data_split, t.data_config]
    t.data_outputs = [t.data_md, t.data_plot]
    return t


def _train_tab() -> SimpleNamespace:
    """The Train tab's components: a recipe editor, data, Start / Stop / Resume and the live view of a run."""
    recipes = [FROM_RECOMMENDATION] + [p.name for p in shipped_recipes()]
    t = SimpleNamespace()
    with gr.Row():
        t.recipe_choice = gr.Dropdown(recipes, value="tiny-demo.yaml" if "tiny-demo.yaml" in recipes
                                      else FROM_RECOMMENDATION, label="Start from")
        t.load_btn = gr.Button("Load recipe", elem_id="load-recipe-btn")
    t.recipe_yaml = gr.Code(language="yaml", label="Recipe (editable)", interactive=True, elem_id="recipe-yaml")
    with gr.Row():
        t.data_file = gr.File(label="Dataset upload (.json/.jsonl/.csv/.parquet)", type="filepath",
                              file_types=[".json", ".jsonl", ".csv", ".parquet"])
        with gr.Column():
            t.data_path = gr.Textbox(label="or dataset path in the workspace / Hub dataset id",
                                     placeholder="empty: the recipe's data.path")
            t.trust = gr.Checkbox(False, label="Trust remote code (run the model repository's own Python code)")
            t.run_name = gr.Textbox(label="Run name (optional)")
    with gr.Row():
        t.start_btn = gr.Button("Start", variant="primary", elem_id="start-btn")
        t.stop_btn = gr.Button("Stop (saves a checkpoint)", variant="stop", elem_id="stop-btn")
        t.resume_btn = gr.Button("Resume", elem_id="resume-btn")
        t.probe_btn = gr.Button("Probe memory", elem_id="probe-btn")
        t.lr_find_btn = gr.Button("Find LR (range test)", elem_id="lr-find-btn")
        t.refresh_btn = gr.Button("Refresh")
    t.run_id = gr.Dropdown([], value=None, allow_custom_value=True, label="Run", elem_id="run-id")
    t.message = gr.Markdown(elem_id="train-message")
    t.status = gr.HTML(elem_id="run-status")
    with gr.Row():
        t.loss_plot = gr.LinePlot(x="step", y="loss", color="series", label="Loss (blue: train, orange: eval)",
                                  elem_id="loss-plot", height=300, color_map=LOSS_COLORS)
        t.live_lr = gr.LinePlot(x="step", y="learning_rate", color="series",
                                label="Learning rate (blue: logged by the Trainer, grey: the planned schedule)",
                                elem_id="live-lr-plot", height=300, color_map=LR_COLORS)
    t.memory = gr.Markdown(elem_id="run-memory")
    t.lr_find_plot = gr.LinePlot(x="log10_lr", y="loss", color="series", label="LR range test: loss against "
                                 "log10(learning rate)", elem_id="lr-find-plot", height=300, visible=False)
    t.log = gr.Textbox(label="Log (newest lines)", lines=LOG_LINES, max_lines=2 * LOG_LINES, elem_id="run-log")
    with gr.Accordion("Run status as JSON", open=False):
        t.status_json = gr.JSON()
    t.fingerprint = gr.State(None)
    t.timer = gr.Timer(1.0)
    return t


def _runs_tab() -> SimpleNamespace:
    """The Runs tab's components: every run folder in the workspace, and one run's details."""
    t = SimpleNamespace()
    t.refresh = gr.Button("Refresh list", elem_id="runs-refresh")
    t.table = gr.Dataframe(interactive=False, label="Runs in the workspace", wrap=True)
    with gr.Row():
        t.run = gr.Dropdown([], label="Run", allow_custom_value=True)
        t.show_btn = gr.Button("Show")
    t.summary = gr.Markdown()
    t.loss = gr.LinePlot(x="step", y="loss", color="series", label="Loss (blue: train, orange: eval)", height=300,
                         color_map=LOSS_COLORS, elem_id="past-loss-plot")
    with gr.Row():
        t.plan = gr.JSON(label="plan.json")
        t.args = gr.JSON(label="training_args.json")
    t.recipe = gr.Code(language="yaml", label="recipe.yaml")
    t.details = [t.summary, t.loss, t.plan, t.args, t.recipe]
    return t


def _wire(app: App, demo: gr.Blocks, rec: SimpleNamespace, train: SimpleNamespace, runs: SimpleNamespace) -> None:
    """The events: the named endpoints (``api_name``) and the private updates (page load, timer, format change)."""
    # the dataset fields come last: the endpoints' earlier parameters keep their places
    form = [*rec.form, *rec.data_inputs]
    export_io = ([*rec.form, rec.export_format, *rec.data_inputs], [rec.code, rec.downloads])
    page_outputs = [*rec.outputs, *rec.data_outputs]
    shown_recommend = _kept_on_error(app.recommend_view, len(page_outputs), message=True)
    shown_export = _kept_on_error(app.export, len(export_io[1]), message=False)
    rec.api_button.click(_errors_shown(app.recommend), form, rec.outputs, api_name="recommend").then(
        _errors_shown(app.export), *export_io, api_name="export")
    rec.button.click(shown_recommend, form, [*page_outputs, rec.error], api_visibility="private").then(
        shown_export, *export_io, api_visibility="private")
    rec.export_format.change(lambda fmt: gr.Code(language=EXPORT_FORMATS.get(fmt, "python")), rec.export_format,
                             rec.code, api_visibility="private").then(shown_export, *export_io,
                                                                      api_visibility="private")
    train.load_btn.click(_errors_shown(app.load_recipe), [train.recipe_choice, *form], train.recipe_yaml,
                         api_name="load_recipe")
    start_inputs = [train.recipe_yaml, train.data_file, train.data_path, train.trust, train.run_name]
    for button, fn, name in ((train.start_btn, app.start_run, "start_run"),
                             (train.probe_btn, app.start_probe, "start_probe"),
                             (train.lr_find_btn, app.start_lr_find, "start_lr_find")):
        button.click(_errors_shown(fn), start_inputs, [train.run_id, train.message], api_name=name).success(
            lambda current: gr.Dropdown(choices=app.run_ids(), value=current), train.run_id, train.run_id,
            api_visibility="private")
    train.stop_btn.click(_errors_shown(app.stop_run), train.run_id, train.message, api_name="stop_run")
    train.resume_btn.click(_errors_shown(app.resume_run), train.run_id, train.message, api_name="resume_run")
    train.refresh_btn.click(_errors_shown(app.run_status), train.run_id, train.status_json, api_name="run_status")
    train.timer.tick(app.refresh, [train.run_id, train.fingerprint],
                     [train.status, train.loss_plot, train.live_lr, train.memory, train.log, train.status_json,
                      train.lr_find_plot, train.fingerprint], api_visibility="private", show_progress="hidden")
    runs.refresh.click(_errors_shown(app.list_runs), None, [runs.table, runs.run], api_name="list_runs")
    runs.show_btn.click(_errors_shown(app.run_details), runs.run, runs.details, api_name="run_details")
    # picking a run shows it; the list emptied or not yet filled (page load) is no error of the user's
    runs.run.change(_errors_shown(lambda run_id: app.run_details(run_id) if run_id else
                                  tuple([gr.skip()] * len(runs.details))),
                    runs.run, runs.details, api_visibility="private")
    demo.load(_errors_shown(app.list_runs), None, [runs.table, runs.run], api_visibility="private")
    demo.load(app.current_runs, None, train.run_id, api_visibility="private")
    # open on a worked example: the default form's recommendation
    demo.load(shown_recommend, form, [*page_outputs, rec.error], api_visibility="private").then(
        shown_export, *export_io, api_visibility="private")
    demo.load(_errors_shown(app.load_recipe), [train.recipe_choice, *form], train.recipe_yaml,
              api_visibility="private")


def build_app(workspace: Workspace, *, detect: bool = True) -> gr.Blocks:
    app = App(workspace, _detect_gpu_label() if detect else None)
    with gr.Blocks(title="finetune-helper") as demo:
        gr.Markdown("# finetune-helper\nWith this model on this GPU: which batch, accumulation, learning rate and "
                    "warmup, and will it fit? Then run it.")
        with gr.Tab("Recommend"):
            rec = _recommend_tab(app)
        with gr.Tab("Train"):
            train = _train_tab()
        with gr.Tab("Runs"):
            runs = _runs_tab()
        _wire(app, demo, rec, train, runs)
    return demo


# ------------------------------------------------------------------------------------------- entry point
def launch(args: argparse.Namespace, *, block: bool = True) -> gr.Blocks:
    auth = parse_auth(args.auth)
    if not 0 < args.port < 65536:
        raise FinetuneHelperError("port", f"must be in 1..65535, got {args.port}")
    workspace = Workspace(args.workspace)
    os.environ.setdefault("GRADIO_TEMP_DIR", str(workspace.root / ".gradio"))
    # Work from inside the workspace: whatever a library resolves relative to the working directory (a Hub-id-shaped
    # name that is also a relative folder, a dataset id) then lands in the workspace, never beside the app.
    os.chdir(workspace.root)
    if args.host not in LOOPBACK and auth is None:
        print(f"finetune-helper: warning: listening on {args.host} without --auth: anyone who can reach this port "
              "can start runs", file=sys.stderr)
    demo = build_app(workspace)
    demo.queue(default_concurrency_limit=4)
    demo.launch(server_name=args.host, server_port=args.port, auth=auth, share=args.share, css=CSS,
                theme=gr.themes.Soft(), allowed_paths=[str(workspace.root / "exports")], prevent_thread_lock=not block,
                quiet=not block)
    return demo


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="finetune-helper app", description=__doc__.splitlines()[0])
    add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        launch(args)
    except FinetuneHelperError as exc:
        print(f"finetune-helper: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
