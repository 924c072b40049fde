"""Runs started from the app: each one a ``finetune-helper run`` process, watched through its run folder.

The app never trains in its own process: :meth:`RunManager.start` launches ``python -m finetune_helper run
<recipe> --output-dir <run folder>`` with an argument list (no shell), in a new session, its output in
``train.log``.  A crashed run cannot take the app down, and a run outlives a restart of the app: everything the app
shows is read back from the run folder (``metrics.jsonl``, ``summary.json``, ``plan.json``, ``process.json``).

Stop sends SIGTERM: the runner saves a checkpoint at the end of the step and exits 130; Resume starts the same
command with ``--resume``.  One run at a time per GPU: each GPU the run uses (``CUDA_VISIBLE_DEVICES``, else all;
``cpu`` without one) has a lock file in the workspace naming the run, taken with ``O_EXCL``, so two starts cannot
both win, not even from two app processes.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import signal
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import yaml

from ..errors import FinetuneHelperError
from ..train import run_folder
from ..train.doctor import diagnose_files
from ..train.recipe import Recipe, check_references, parse_yaml, recipe_from_dict
from ..train.launch import run_processes
from ..train.run_folder import last_checkpoint
from ..train.run_folder import read_json as _read_any_json
from ..train.run_folder import read_metrics_counted as _read_any_metrics
from ..train.run_folder import write_json as _write_any_json
from .workspace import Workspace

RECIPE_FILE = "input-recipe.yaml"  # the recipe as the app submitted it; the runner writes its own recipe.yaml
PROCESS_FILE = "process.json"
LOG_FILE = "train.log"
#: ``finetune-helper probe --result`` writes here (a probe started from the app)
PROBE_FILE = "probe.json"
#: ``finetune-helper lr-find --curve`` writes here, step by step (a range test started from the app)
LR_FIND_FILE = "lr_find.json"
#: exit codes of ``finetune-helper run`` (runner.py) and what the app calls them
#: how often the reaper looks for the run's last processes before it frees the GPUs
REAP_POLL_S = 0.5
EXIT_STATES = {0: "done", 1: "failed", 2: "failed", 3: "diverged", 4: "out of memory", 130: "stopped"}
#: Hub user-access tokens start with ``hf_`` (huggingface_hub docs, "User access tokens")
TOKEN_PATTERN = re.compile(r"hf_[A-Za-z0-9]{8,}")
LOG_TAIL_LINES = 40
#: TrainingArguments / SFTConfig fields a run started from the app may not set: they name files (``deepspeed``,
#: ``accelerator_config``, ``logging_dir``, ...), push to the Hub with the server's token (``push_to_hub``,
#: ``hub_*``) or send metrics out (``report_to``). The CLI, run by the file's owner, allows them all.
APP_REFUSED_TRAINING = re.compile(r"^(hub_|push_to_hub|deepspeed$|resume_from_checkpoint$)|"
                                  r"(_dir|_config|_path|_file|_url)$")
#: how long a lock written by a start in progress (before the run's pid is known) counts as held
STARTING_GRACE_S = 60.0


def redact(text: str) -> str:
    """Hide Hub tokens: anything shaped like one, and the values of the token variables of this process."""
    for var in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HUGGINGFACEHUB_API_TOKEN"):
        value = os.environ.get(var)
        if value and len(value) >= 4:
            text = text.replace(value, "[token hidden]")
    return TOKEN_PATTERN.sub("[token hidden]", text)


def build_recipe(workspace: Workspace, text: str, *, data_file: str | None = None, data_path: str = "",
                 trust_remote_code: bool = False) -> Recipe:
    """The recipe YAML typed in the app, with its data and model confined to the workspace.

    ``data_file`` (an upload) wins over ``data_path`` (typed), which wins over the recipe's own ``data.path``.
    ``trust_remote_code`` is the app's checkbox: a recipe asking for it without the box ticked is refused.
    """
    raw = parse_yaml(text or "")
    if not isinstance(raw, dict):
        raise FinetuneHelperError("recipe", "must be a YAML mapping with model, method, data, ... sections")
    recipe = recipe_from_dict(raw)
    if recipe.model.trust_remote_code and not trust_remote_code:
        raise FinetuneHelperError("model.trust_remote_code", "is true in the recipe: tick 'Trust remote code' to run "
                                  "the model repository's own Python code, or set it to false")
    recipe.model.trust_remote_code = bool(trust_remote_code)
    refused = sorted(k for k, v in recipe.training.items() if APP_REFUSED_TRAINING.search(k)
                     or (k == "report_to" and v not in ("none", [], ["none"])))
    if refused:
        raise FinetuneHelperError(f"training.{refused[0]}", "is not allowed in runs started from the app: settings "
                                  "that name files or talk to the Hub or a tracker (" + ", ".join(refused) + ") "
                                  "could reach outside the workspace; run `finetune-helper run` for them")
    recipe.model.name = workspace.model_source(recipe.model.name)
    recipe.output_dir = None  # the app decides the run folder
    upload = workspace.save_upload(data_file) if data_file else None
    try:
        if upload is not None:
            recipe.data.path = str(upload)
        elif data_path and data_path.strip():
            recipe.data.path = workspace.data_source(data_path, field="dataset path")
        else:
            recipe.data.path = workspace.data_source(recipe.data.path)
        check_references(recipe)
        if Path(recipe.data.path).exists():  # read it now: an unreadable file is an error here, not a failed run
            from ..train.data import load_data

            load_data(recipe.data.path, fmt=None if recipe.data.format == "auto" else recipe.data.format,
                      columns=recipe.data.columns or None)
    except FinetuneHelperError:
        if upload is not None:
            upload.unlink(missing_ok=True)  # the copy of a file that cannot be used (the user's own file is untouched)
        raise
    return recipe


# --------------------------------------------------------------------------- run-folder files, never through a link
def _regular(path: Path) -> bool:
    """Whether ``path`` is a regular file itself: a run folder's file that is a link (to a file outside the
    workspace, say) is neither shown nor written through."""
    try:
        return stat.S_ISREG(os.lstat(path).st_mode)
    except OSError:
        return False


def read_json(path: Path) -> Any:
    return _read_any_json(path) if _regular(path) else None


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    return read_metrics_counted(run_dir)[0]


def read_metrics_counted(run_dir: Path) -> tuple[list[dict[str, Any]], int]:
    """The run's metrics records and the lines that were none (run_folder.read_metrics_counted), from a regular
    file only."""
    return _read_any_metrics(run_dir) if _regular(Path(run_dir) / run_folder.METRICS) else ([], 0)


def write_json(path: Path, data: Any) -> None:
    if os.path.lexists(path) and not _regular(path):
        raise FinetuneHelperError("run", f"{path.name} in {path.parent.name} is not a regular file (a link?): the app "
                                  "does not write through it")
    _write_any_json(path, data)


def _own_process(pid: Any, info: dict[str, Any], run_dir: Path) -> bool:
    """Whether ``pid`` is the process this app launched for ``run_dir`` (Linux: its command line is exactly the one
    recorded in process.json, and it started when the record says); a pid recycled by another program, or named by
    a hand-written process.json, is not signalled."""
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[:-1]
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        boot = next(float(line.split()[1]) for line in Path("/proc/stat").read_text().splitlines()
                    if line.startswith("btime "))
    except (OSError, StopIteration, IndexError, ValueError):
        return False
    expected = ["-m", "finetune_helper", str(info.get("command", "run")), *map(str, info.get("args") or [])]
    if [a.decode(errors="replace") for a in argv[1:]] != expected or str(run_dir) not in " ".join(expected):
        return False
    started = boot + int(fields[19]) / os.sysconf("SC_CLK_TCK")  # field 22 of /proc/PID/stat: start time in ticks
    return abs(started - float(info.get("started") or 0)) < 5.0


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9.\-]+", "-", text).strip("-").lower()[:40] or "run"


def log_tail(run_dir: Path, lines: int = LOG_TAIL_LINES) -> str:
    path = Path(run_dir) / LOG_FILE
    if not _regular(path):
        return ""
    try:
        with open(path, "rb") as fh:
            fh.seek(0, os.SEEK_END)
            fh.seek(max(0, fh.tell() - 64 * 1024))
            text = fh.read().decode("utf-8", errors="replace")
    except OSError:
        return ""
    return redact("\n".join(text.splitlines()[-lines:]))


def _devices(env: dict[str, str], gpu_count: int) -> list[str]:
    """The GPUs a run started with ``env`` uses, one lock each: ``CUDA_VISIBLE_DEVICES`` (sorted), else all
    ``gpu_count`` local GPUs; ``cpu`` on a machine without CUDA (every run then shares the CPU)."""
    if gpu_count == 0:
        return ["cpu"]
    visible = env.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return sorted({d.strip() for d in visible.split(",") if d.strip()}) or ["cpu"]
    return [str(i) for i in range(gpu_count)]


#: the ``flags`` bit of /proc/PID/stat that marks a kernel thread (include/linux/sched.h)
PF_KTHREAD = 0x00200000
#: how long an empty /proc/PID/cmdline is waited on: it reads empty while the kernel still sets up a program it has
#: just exec'd (after Popen returned; seen on a loaded machine, both for a run that was then taken for dead and its GPU
#: given to a second start, and for a stranger process that was taken for a run)
CMDLINE_WAIT_S = 2.0


def _pid_alive(pid: int | None) -> bool:
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    cmdline = Path(f"/proc/{pid}/cmdline")
    if cmdline.exists():  # Linux: guard against a recycled pid, and count a zombie as ended
        deadline = time.time() + CMDLINE_WAIT_S
        try:
            while True:
                argv = cmdline.read_bytes()
                state, *fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
                if state == "Z" or int(fields[5]) & PF_KTHREAD:  # ended, or the pid is a kernel thread's now
                    return False
                if argv or time.time() > deadline:
                    return b"finetune_helper" in argv
                time.sleep(0.01)
        except OSError:
            return False
    return True


class RunManager:
    """Start, watch, stop and resume runs in a workspace."""

    def __init__(self, workspace: Workspace, *, python: str | None = None, env: dict[str, str] | None = None,
                 devices: list[str] | None = None) -> None:
        """``devices``: the GPUs this manager's runs use (default: from ``CUDA_VISIBLE_DEVICES`` and the GPUs that
        torch sees)."""
        self.workspace = workspace
        self.python = python or sys.executable
        self.env = dict(os.environ if env is None else env)
        self.env["PYTHONUNBUFFERED"] = "1"
        if devices is None:
            from ..recommender.gpu import detect_gpu_count  # imports torch

            devices = _devices(self.env, detect_gpu_count())
        self.devices = list(devices)
        self._procs: dict[str, subprocess.Popen] = {}
        self._lock = threading.Lock()

    # ------------------------------------------------------------------------------------------- launching
    def run_dir(self, run_id: str) -> Path:
        run_id = str(run_id or "").strip()
        if not run_id:
            raise FinetuneHelperError("run", "no run selected: start one, or pick one from the list")
        path = self.workspace.path(Path("runs") / run_id, "run")
        if path.parent != self.workspace.runs or not path.is_dir():
            raise FinetuneHelperError("run", f"no run named {run_id!r} in {self.workspace.runs}")
        return path

    def _lock_file(self, device: str) -> Path:
        return self.workspace.runs / f".lock-gpu-{_slug(device)}.json"

    def _holder(self, device: str) -> str | None:
        """The run holding ``device``'s lock, or None; a lock left by a dead process is removed."""
        path = self._lock_file(device)
        info = read_json(path)
        if info is None and path.exists():
            time.sleep(0.05)  # being written by a concurrent start
            info = read_json(path)
        if info is None:
            return None
        if info.get("starting") and time.time() - info.get("time", 0) < STARTING_GRACE_S:
            return info.get("run_id")  # a start in progress (possibly in another app process)
        if not info.get("starting") and self._alive(info.get("run_id"), info.get("pid")):
            return info.get("run_id")
        path.unlink(missing_ok=True)
        return None

    @contextlib.contextmanager
    def _mutex(self):
        """Serialises lock checks and changes across app processes sharing the workspace (``flock``; not
        re-entrant: take it once per operation)."""
        with open(self.workspace.runs / ".locks.mutex", "a+") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)

    def active_run(self) -> str | None:
        """The run training on any of this manager's GPUs, or None."""
        with self._mutex():
            return next((holder for d in self.devices if (holder := self._holder(d)) is not None), None)

    def _alive(self, run_id: str | None, pid: int | None) -> bool:
        proc = self._procs.get(run_id or "")
        if proc is not None and proc.pid == pid:
            return proc.poll() is None
        return _pid_alive(pid)

    def _take_locks(self, run_id: str, count: int = 1) -> list[str]:
        """Lock ``count`` free GPUs of this manager's, the first free ones (one lock file each, ``O_EXCL``), and
        return them; without CUDA the one ``cpu`` lock (every process of a run shares the CPU)."""
        with self._mutex():
            return self._take_each(run_id, 1 if self.devices == ["cpu"] else count)

    def _take_each(self, run_id: str, count: int) -> list[str]:
        if count > len(self.devices):
            raise FinetuneHelperError("hardware.gpus", f"the run needs {count} GPUs; this app has {len(self.devices)} "
                                      f"({', '.join(self.devices)})")
        taken: list[Path] = []
        chosen: list[str] = []
        busy: list[tuple[str, str]] = []
        try:
            for device in self.devices:
                if len(chosen) == count:
                    break
                path = self._lock_file(device)
                for attempt in range(2):
                    try:
                        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
                    except FileExistsError:
                        holder = self._holder(device)
                        if holder is not None:
                            busy.append((device, holder))
                            break
                        if attempt:
                            raise FinetuneHelperError("run", "another start is taking the GPU lock; try again") from None
                        continue
                    with os.fdopen(fd, "w") as fh:
                        json.dump({"run_id": run_id, "pid": os.getpid(), "starting": True, "time": time.time()}, fh)
                    taken.append(path)
                    chosen.append(device)
                    break
            if len(chosen) < count:
                where = "; ".join(f"run {holder} on {'the CPU' if d == 'cpu' else 'GPU ' + d}" for d, holder in busy)
                raise FinetuneHelperError("run", f"not enough free GPUs ({len(chosen)} of {count}): {where} is still "
                                          "training; stop it first (one run at a time per GPU)")
        except BaseException:
            for path in taken:
                path.unlink(missing_ok=True)
            raise
        return chosen

    def _release_locks(self, pid: int | None, run_id: str | None = None) -> None:
        with self._mutex():
            self._release_each(pid, run_id)

    def _release_each(self, pid: int | None, run_id: str | None) -> None:
        for device in self.devices:
            path = self._lock_file(device)
            info = _json_object(path)
            if (pid is not None and info.get("pid") == pid and not info.get("starting")) or (
                    run_id is not None and info.get("run_id") == run_id and info.get("starting")):
                path.unlink(missing_ok=True)

    def _launch(self, run_id: str, args: list[str], subcommand: str, devices: list[str]) -> None:
        """Start the command on ``devices`` (the GPUs it locked: ``CUDA_VISIBLE_DEVICES``, so a one-GPU run on a
        node with more uses one and several runs share the node)."""
        run_dir = self.workspace.runs / run_id
        command = [self.python, "-m", "finetune_helper", subcommand, *args]
        env = dict(self.env)
        if devices != ["cpu"]:
            env["CUDA_VISIBLE_DEVICES"] = ",".join(devices)
        with open(run_dir / LOG_FILE, "a", encoding="utf-8") as log:
            log.write(f"$ finetune-helper {subcommand} {' '.join(args)}\n")
            log.flush()
            proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    cwd=self.workspace.root, env=env, start_new_session=True)
        self._procs[run_id] = proc
        info = {"run_id": run_id, "pid": proc.pid, "started": time.time(), "args": args, "returncode": None,
                "stop_requested": False, "devices": devices, "command": subcommand}
        write_json(run_dir / PROCESS_FILE, info)
        with self._mutex():
            for device in devices:
                self._lock_file(device).write_text(json.dumps({"run_id": run_id, "pid": proc.pid}))
        threading.Thread(target=self._reap, args=(run_id, proc), daemon=True, name=f"reap-{run_id}").start()

    def _reap(self, run_id: str, proc: subprocess.Popen) -> None:
        code = proc.wait()
        # the GPUs are free when no process of the run is left, the launcher's workers included (they wind down on
        # their own after the launcher: torchrun is told to stop them when it dies, train/launch.py)
        while run_processes(self.workspace.runs / run_id):
            time.sleep(REAP_POLL_S)
        with self._lock:  # stop() rewrites process.json too
            path = self.workspace.runs / run_id / PROCESS_FILE
            info = _json_object(path)
            if info.get("pid") == proc.pid:
                info.update(returncode=code, ended=time.time())
                with contextlib.suppress(FinetuneHelperError):  # process.json replaced by a link: left alone
                    write_json(path, info)
            self._release_locks(proc.pid)

    def start(self, recipe: Recipe, name: str | None = None, *, kind: str = "run") -> str:
        """Launch a new run of ``recipe``; returns its id (the run folder's name under ``runs/``).  ``kind``:
        ``run``; ``probe`` (``finetune-helper probe``: a few measured steps at a few micro-batches, its result in
        ``probe.json``); ``lr-find`` (the range test, its curve in ``lr_find.json`` step by step)."""
        if kind not in ("run", "probe", "lr-find"):
            raise FinetuneHelperError("kind", f"{kind!r} is not one of run, probe, lr-find")
        with self._lock:
            stem = _slug(name or Path(recipe.model.name).name or "run")
            run_id = f"{stem}-{time.strftime('%Y%m%d-%H%M%S')}"
            n = 1
            while (self.workspace.runs / run_id).exists():
                n += 1
                run_id = f"{stem}-{time.strftime('%Y%m%d-%H%M%S')}-{n}"
            devices = self._take_locks(run_id, recipe.hardware.gpus if kind == "run" else 1)
            try:
                run_dir = self.workspace.runs / run_id
                run_dir.mkdir()
                (run_dir / RECIPE_FILE).write_text(recipe.to_yaml(), encoding="utf-8")
                if kind == "probe":
                    self._launch(run_id, [str(run_dir / RECIPE_FILE), "--output-dir", str(run_dir / "probe"),
                                          "--result", str(run_dir / PROBE_FILE)], "probe", devices)
                elif kind == "lr-find":
                    self._launch(run_id, [str(run_dir / RECIPE_FILE), "--plot", str(run_dir / "lr_find.png"),
                                          "--curve", str(run_dir / LR_FIND_FILE)], "lr-find", devices)
                else:
                    self._launch(run_id, [str(run_dir / RECIPE_FILE), "--output-dir", str(run_dir)], "run", devices)
            except BaseException:
                self._release_locks(None, run_id)
                raise
            return run_id

    def resume(self, run_id: str) -> str:
        """Continue a stopped run from its last checkpoint (the runner checks the recipe is unchanged)."""
        with self._lock:
            run_dir = self.run_dir(run_id)
            if self.active_run() == run_id or run_folder.in_use(run_dir):
                raise FinetuneHelperError("run", f"{run_id} is still running (its folder is in use); stop it first")
            if last_checkpoint(run_dir) is None:
                raise FinetuneHelperError("run", f"{run_id} has no checkpoint to resume from (it stopped before its "
                                          "first save); start it again instead")
            if _json_object(run_dir / run_folder.SUMMARY).get("status") == "done":
                raise FinetuneHelperError("run", f"{run_id} already finished; start a new run to train more")
            devices = self._take_locks(run_id, _recipe_gpus(run_dir))
            try:
                self._launch(run_id, [str(run_dir)], "resume", devices)  # its saved recipe and arguments
            except BaseException:
                self._release_locks(None, run_id)
                raise
            return run_id

    def stop(self, run_id: str) -> dict[str, Any]:
        """Ask a run to stop: SIGTERM, on which the runner saves a checkpoint after the current step and exits.
        Asked again while it still runs, kill it (SIGKILL to its process group; the last saved checkpoint stays)."""
        run_dir = self.run_dir(run_id)
        with self._lock:  # the reaper thread rewrites process.json too
            info = _json_object(run_dir / PROCESS_FILE)
            proc = self._procs.get(run_id)
            ours = (proc is not None and proc.pid == info.get("pid")) or _own_process(info.get("pid"), info, run_dir)
            if not ours or not self._alive(run_id, info.get("pid")):
                raise FinetuneHelperError("run", f"{run_id} is not running (no process this app started for it)")
            if info.get("stop_requested"):  # a second Stop: the run did not stop (a hung data loader, NCCL, ...)
                # every process of the run: the command's group, and torchrun and its workers, in sessions of their own
                for pid in [info["pid"], *run_processes(run_dir)]:
                    with contextlib.suppress(ProcessLookupError, PermissionError):
                        os.kill(pid, signal.SIGKILL)
                info["killed"] = True
            else:
                os.kill(info["pid"], signal.SIGTERM)
            info["stop_requested"] = True
            write_json(run_dir / PROCESS_FILE, info)
        return self.status(run_id)

    # ------------------------------------------------------------------------------------------- reading
    def status(self, run_id: str) -> dict[str, Any]:
        """Everything the app shows about a run, from its folder (the current attempt's files only where an earlier
        attempt, stopped and now resumed, left its own)."""
        run_dir = self.run_dir(run_id)
        info = _json_object(run_dir / PROCESS_FILE)
        started = info.get("started") or 0
        alive = self._alive(run_id, info.get("pid")) or bool(run_processes(run_dir))  # the launcher's workers too
        metrics, skipped = read_metrics_counted(run_dir)
        current = [m for m in metrics if m.get("wall_time", started) >= started]  # this attempt's records
        summary = _fresh_json(run_dir / run_folder.SUMMARY, started)
        code = info.get("returncode")
        if code is None and not alive:  # ended while no app was watching: the CLI recorded its exit code
            code = (_fresh_json(run_dir / run_folder.EXIT, started) or {}).get("returncode")
        train = [m for m in metrics if "loss" in m]
        last = train[-1] if train else {}
        message = None
        if alive:
            state = "stopping" if info.get("stop_requested") else "training" if current else "preparing"
        elif summary is not None:
            state = {"interrupted": "stopped"}.get(summary.get("status"), summary.get("status", "ended"))
            message = summary.get("message")
        elif info.get("killed"):
            state, message = "killed", "killed by a second Stop; the checkpoints it saved before are kept"
        elif code is not None and code != 0 and info.get("stop_requested"):
            state = "stopped"  # Stop pressed while the runner was still starting (no checkpoint yet)
        elif code is not None:
            state = EXIT_STATES.get(code, f"crashed (exit {code})")
        else:
            state = "ended" if info else "unknown"
        if state not in ("done", "training", "preparing", "stopping") and message is None:
            message = _last_error(run_dir)
        step = max((m.get("step", 0) for m in metrics), default=0)
        diagnosis = diagnose_files(metrics, skipped, summary, read_json(run_dir / run_folder.TRAINING_ARGS)).as_dict() \
            if metrics else None
        max_steps = max((m.get("max_steps", 0) for m in metrics), default=0) or None
        now = [m for m in current if "loss" in m]
        return {
            "run_id": run_id, "run_dir": str(run_dir), "state": state, "active": alive, "returncode": code,
            "message": message, "step": step, "max_steps": max_steps,
            "progress": min(1.0, step / max_steps) if max_steps else 0.0,
            "eta_seconds": now[-1].get("eta_seconds") if alive and now else None,
            "loss": last.get("loss"), "learning_rate": last.get("learning_rate"),
            "tokens_per_second": now[-1].get("tokens_per_second") if now else None,
            # on a GPU: the time model's rate for the plan's GPU, all processes together (metrics.jsonl's records)
            "predicted_tokens_per_second": now[-1].get("predicted_tokens_per_second") if now else None,
            "eval_loss": next((m["eval_loss"] for m in reversed(metrics) if "eval_loss" in m), None),
            "peak_memory_bytes": (summary or {}).get("peak_memory_bytes") or last.get("peak_memory_bytes"),
            "estimated_peak_memory_bytes": ((summary or {}).get("estimated_peak_memory_bytes")
                                            or last.get("estimated_peak_memory_bytes")),
            "metrics": metrics, "summary": summary, "log_tail": log_tail(run_dir),
            "kind": info.get("command", "run"), "probe": _fresh_json(run_dir / PROBE_FILE, started),
            "lr_find": _fresh_json(run_dir / LR_FIND_FILE, started),
            "started": started or None, "diagnosis": diagnosis,
            "can_resume": not alive and state != "done" and last_checkpoint(run_dir) is not None,
        }

    def run_ids(self) -> list[str]:
        """The run folders in the workspace, newest first (names only: no status is read)."""
        folders = [p for p in self.workspace.runs.iterdir()
                   if p.is_dir() and not p.is_symlink() and _regular(p / PROCESS_FILE)]
        return [p.name for p in sorted(folders, key=lambda p: p.stat().st_mtime, reverse=True)]

    def list_runs(self) -> list[dict[str, Any]]:
        """Every run folder in the workspace, newest first, with what the runs table shows; a folder that cannot be
        read (hand-edited, a link out of the workspace) is left out rather than breaking the list."""
        rows = []
        for run_id in self.run_ids():
            run_dir = self.workspace.runs / run_id
            try:
                st = self.status(run_id)
                summary = st["summary"] or {}
                plan = _json_object(run_dir / run_folder.PLAN)
                rows.append({"run_id": st["run_id"], "state": st["state"],
                             "model": _recipe_model(run_dir) or plan.get("model"), "method": plan.get("method"),
                             "step": st["step"], "max_steps": st["max_steps"],
                             "train_loss_last": summary.get("train_loss_last", st["loss"]),
                             "eval_loss": summary.get("eval_loss", st["eval_loss"]),
                             "started": time.strftime("%Y-%m-%d %H:%M", time.localtime(st["started"]))
                             if st["started"] else None})
            except (FinetuneHelperError, OSError, ValueError, TypeError, AttributeError, OverflowError):
                continue
        return rows

    def details(self, run_id: str) -> dict[str, Any]:
        """A past run as the Runs tab shows it: status plus its plan, training arguments and recipe."""
        run_dir = self.run_dir(run_id)
        st = self.status(run_id)
        recipe = run_dir / run_folder.RECIPE
        return {**st, "plan": read_json(run_dir / run_folder.PLAN),
                "training_args": read_json(run_dir / run_folder.TRAINING_ARGS),
                "recipe": redact(recipe.read_text(encoding="utf-8", errors="replace")) if _regular(recipe) else None}


def _fresh_json(path: Path, since: float) -> dict[str, Any] | None:
    """``path`` as a JSON object if the current attempt wrote it (at or after ``since``), else None (an older file,
    or one that is not an object)."""
    try:
        if path.stat().st_mtime < since:
            return None
    except OSError:
        return None
    data = read_json(path)  # None unless a regular file
    return data if isinstance(data, dict) else None


def _json_object(path: Path) -> dict[str, Any]:
    """``path`` as a JSON object, or empty when it is missing, not regular or not an object."""
    data = read_json(path)
    return data if isinstance(data, dict) else {}


def _recipe_value(path: Path, section: str, key: str) -> Any:
    """``section.key`` of the recipe file ``path`` (a regular file only), or None when it cannot be read."""
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8")) if _regular(path) else None
    except (OSError, ValueError, yaml.YAMLError):
        return None
    part = raw.get(section) if isinstance(raw, dict) else None
    return part.get(key) if isinstance(part, dict) else None


def _recipe_model(run_dir: Path) -> str | None:
    """The model as the user named it (plan.json holds the resolved path, e.g. the built-in's cache folder)."""
    return _recipe_value(run_dir / RECIPE_FILE, "model", "name")


def _recipe_gpus(run_dir: Path) -> int:
    """``hardware.gpus`` of the run's resolved recipe (1 when it cannot be read)."""
    gpus = _recipe_value(run_dir / run_folder.RECIPE, "hardware", "gpus")
    return gpus if isinstance(gpus, int) and gpus >= 1 else 1


def _last_error(run_dir: Path) -> str | None:
    """The runner's one-line error (``finetune-helper: error: ...`` / ``stopped: ...``) from the log, if any."""
    for line in reversed(log_tail(run_dir, 200).splitlines()):
        if line.startswith("finetune-helper: "):
            return line.removeprefix("finetune-helper: ")
    return None


__all__ = ["RunManager", "build_recipe", "read_metrics", "log_tail", "redact"]
