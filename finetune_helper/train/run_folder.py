"""The files of a run folder, written by ``finetune-helper run`` and read back by the runner (resume), the run
command (its exit code) and the app's run manager.  One place for their names and how they are read.

Written before training: ``recipe.yaml`` (the fully resolved recipe), ``plan.json``, ``training_args.json``; during
it: ``metrics.jsonl`` (one JSON record per log) and ``checkpoint-N/``; at the end: ``final/`` and ``summary.json``;
by the command, whatever happened: ``exit.json`` (its exit code).  No torch import here.
"""

from __future__ import annotations

import json
import os
import re
import time
from pathlib import Path
from typing import Any

from ..errors import FinetuneHelperError

RECIPE = "recipe.yaml"
PLAN = "plan.json"
TRAINING_ARGS = "training_args.json"
#: what the run was started with (:func:`write_inputs`): a resume whose inputs changed is refused
INPUTS = "inputs.json"
#: held (``flock``) by the process that trains into the folder, for its whole life (:class:`FolderLock`)
LOCK = ".lock"
METRICS = "metrics.jsonl"
SUMMARY = "summary.json"
EXIT = "exit.json"
FINAL = "final"
CHECKPOINT_PREFIX = "checkpoint-"


#: the first line of the recipe.yaml a run writes: how a run folder's own file is told from a user's recipe
RECIPE_HEADER = "# fully resolved recipe, as run"


def is_own_recipe(path: Path) -> bool:
    """Whether ``path`` is a recipe.yaml a run wrote (a regular file starting with :data:`RECIPE_HEADER`)."""
    path = Path(path)
    if path.is_symlink() or not path.is_file():
        return False
    try:
        with path.open(encoding="utf-8") as fh:
            return fh.readline().rstrip("\n") == RECIPE_HEADER
    except (OSError, UnicodeDecodeError):
        return False


def run_traces(run_dir: Path) -> list[str]:
    """What in ``run_dir`` shows that a run trained there (checkpoints, metrics, final model, summary); empty for a
    new folder or one that only holds a dry run's files."""
    run_dir = Path(run_dir)
    found = [p.name for p in checkpoints(run_dir)[-1:]]
    found += [name for name in (METRICS, FINAL, SUMMARY) if (run_dir / name).exists()]
    return found


def finished(run_dir: Path) -> bool:
    """Whether the run in ``run_dir`` trained to its end (its summary says done)."""
    summary = read_json(Path(run_dir) / SUMMARY)
    return isinstance(summary, dict) and summary.get("status") == "done"


def read_json(path: Path) -> Any:
    """``path`` as JSON, or None when it is missing, unreadable or being written."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def write_json(path: Path, data: Any) -> None:
    Path(path).write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")


# ------------------------------------------------------------------------------------------- one writer
class FolderLock:
    """One run folder, one writer: an exclusive ``flock`` on ``RUN_DIR/.lock``, held by the process that trains into
    the folder (``run`` / ``resume`` in one process; the launcher of several, for its workers) for its whole life and
    released by the OS when that process ends, however it ends (no stale lock after a SIGKILL).  The file holds the
    holder's pid, so that a refusal can name it."""

    def __init__(self, run_dir: Path) -> None:
        self.path = Path(run_dir) / LOCK
        self._fh = None

    @property
    def held(self) -> bool:
        return self._fh is not None

    def acquire(self) -> None:
        """Take the lock, or refuse in one line (field ``output-dir``) naming the process that holds it."""
        import fcntl

        if self._fh is not None:
            return
        fh = self.path.open("a+", encoding="utf-8")
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fh.seek(0)
            pid = fh.read().strip()
            fh.close()
            raise in_use_error(self.path.parent, pid) from None
        fh.seek(0)
        fh.truncate()
        fh.write(str(os.getpid()))
        fh.flush()
        self._fh = fh

    def release(self) -> None:
        if self._fh is not None:
            self._fh.close()  # closing the file releases the flock
            self._fh = None


def in_use_error(run_dir: Path, pid: str) -> FinetuneHelperError:
    """The one-line refusal of a run folder another process holds (``pid``, as its lock file says)."""
    return FinetuneHelperError("output-dir", f"{run_dir} is in use by another run or resume (process {pid or '?'}): "
                               "one process trains into a run folder at a time; stop it first, or choose another "
                               "--output-dir (nothing was changed)")


def holder(run_dir: Path) -> str | None:
    """The pid written by the process that holds the run folder's :class:`FolderLock` now ('' when unreadable), or
    None when no process holds it."""
    import fcntl

    path = Path(run_dir) / LOCK
    try:
        with path.open("r", encoding="utf-8") as fh:
            try:
                fcntl.flock(fh, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except BlockingIOError:
                return fh.read().strip()
            return None
    except OSError:
        return None


def in_use(run_dir: Path) -> bool:
    """Whether a process holds the run folder's :class:`FolderLock` now."""
    return holder(run_dir) is not None


# ------------------------------------------------------------------------------------------- the run's inputs
def flat(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """A nested recipe dict as ``{"data.max_length": 64, ...}`` (``data.columns`` stays one mapping)."""
    out: dict[str, Any] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and key != "columns":
            out.update(flat(value, name + "."))
        else:
            out[name] = value
    return out


def digest(data: bytes) -> str:
    import hashlib

    return hashlib.sha256(data).hexdigest()


#: data files up to this size are hashed whole; larger ones by their size and their first and last MiB (reading
#: tens of GB at every resume would take minutes)
WHOLE_HASH_BYTES, EDGE_BYTES = 1 << 30, 1 << 20


def data_fingerprint(path: str) -> dict[str, Any] | None:
    """A local data file's size and SHA-256 (of its first and last MiB beyond 1 GiB); None for what is not a local
    file (the built-in data, made from the recipe's seed; a Hub dataset, named by the recipe's fields)."""
    file = Path(path).expanduser()
    if path.startswith("builtin:") or not file.is_file():
        return None
    size = file.stat().st_size
    with file.open("rb") as fh:
        if size <= WHOLE_HASH_BYTES:
            return {"bytes": size, "sha256": digest(fh.read())}
        head = fh.read(EDGE_BYTES)
        fh.seek(size - EDGE_BYTES)
        return {"bytes": size, "sha256_edges": digest(head + fh.read())}


def write_inputs(run_dir: Path, recipe: dict[str, Any]) -> None:
    """Record what the run starts with: the resolved recipe and its data file's fingerprint (a resume compares them,
    :func:`changed_inputs`)."""
    record = read_json(Path(run_dir) / INPUTS)
    record = record if isinstance(record, dict) else {}
    record.update(recipe=recipe, data=data_fingerprint(str(recipe.get("data", {}).get("path", ""))))
    write_json(Path(run_dir) / INPUTS, record)


def write_training_args(run_dir: Path, kwargs: dict[str, Any]) -> None:
    """``training_args.json``, and its digest in :data:`INPUTS` (an edit by hand is then told from the runner's own
    rewrites: a resume's, an out-of-memory back-off's)."""
    text = json.dumps(kwargs, indent=2) + "\n"
    (Path(run_dir) / TRAINING_ARGS).write_text(text, encoding="utf-8")
    record = read_json(Path(run_dir) / INPUTS)
    record = record if isinstance(record, dict) else {}
    record["training_args_sha256"] = digest(text.encode("utf-8"))
    write_json(Path(run_dir) / INPUTS, record)


def changed_inputs(run_dir: Path, recipe: dict[str, Any], allowed: set[str]) -> list[str]:
    """What differs from what the run in ``run_dir`` was started with: recipe fields (but ``allowed`` ones and
    ``output_dir``), ``training_args.json`` edited by hand, the data file's contents.  Empty when nothing did, or
    for a run that recorded no inputs (older runs: their recipe.yaml is what they were started with)."""
    record = read_json(Path(run_dir) / INPUTS)
    if not isinstance(record, dict) or not isinstance(record.get("recipe"), dict):
        return []
    before, now = flat(record["recipe"]), flat(recipe)
    changed = [key for key in sorted(set(before) | set(now))
               if key not in allowed and key != "output_dir" and before.get(key) != now.get(key)]
    args = Path(run_dir) / TRAINING_ARGS
    if "training_args_sha256" in record and args.is_file() and \
            digest(args.read_bytes()) != record["training_args_sha256"]:
        changed.append(f"{TRAINING_ARGS} was edited since the run wrote it")
    if "data" in record and record["data"] != data_fingerprint(str(recipe.get("data", {}).get("path", ""))):
        changed.append("the data file's contents changed")
    return changed


def write_exit(run_dir: str | Path, code: int) -> None:
    """How the command ended (the app reads it: how a run ended, even when no app was watching)."""
    write_json(Path(run_dir) / EXIT, {"returncode": code, "time": time.time()})


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    """``metrics.jsonl``, one record per logged step (:func:`read_metrics_counted`, without the count)."""
    return read_metrics_counted(run_dir)[0]


#: the fields of a record that are numbers when present (a JSON ``true`` is no loss of 1.0)
_NUMBER_FIELDS = ("loss", "eval_loss", "learning_rate", "grad_norm", "epoch", "start_loss", "uniform_loss")


def _record(line: bytes) -> dict[str, Any] | None:
    """One line of metrics.jsonl as a record, or None when it is not one: not UTF-8 JSON, not an object, a step that
    is not a whole number from 0 up, a number field that is not a number (NaN and infinity are numbers: a diverged
    loss; null is no value) or too large for a float."""
    try:
        rec = json.loads(line.decode("utf-8").lstrip("\ufeff"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        return None
    if not isinstance(rec, dict):
        return None
    step = rec.get("step", 0)
    if isinstance(step, float) and step.is_integer():
        step = int(step)
    if not isinstance(step, int) or isinstance(step, bool) or step < 0:
        return None
    for key in _NUMBER_FIELDS:
        value = rec.get(key)
        if value is None:  # absent, or null: no value
            rec.pop(key, None)
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return None
        try:
            rec[key] = float(value)
        except OverflowError:  # an integer of hundreds of digits
            return None
    rec["step"] = step
    return rec


def read_metrics_counted(run_dir: Path) -> tuple[list[dict[str, Any]], int]:
    """``metrics.jsonl``'s records in step order, and how many lines were not records (:func:`_record`; the last
    line, being written right now, is not counted).  A step logged twice keeps its latest record (a resumed run
    repeats the steps after its checkpoint), and a resume's mark (``resumed_at``, written by the runner when it
    resumes) drops what the abandoned attempt logged past the checkpoint it resumed from."""
    try:
        lines = (Path(run_dir) / METRICS).read_bytes().split(b"\n")
    except OSError:
        return [], 0
    records: dict[tuple[int, str], dict[str, Any]] = {}
    skipped = 0
    for number, line in enumerate(lines):
        if not line.strip():
            continue
        rec = _record(line)
        if rec is None:
            skipped += number < len(lines) - 1  # the last line may be half written
            continue
        if isinstance(rec.get("resumed_at"), int):
            records = {key: r for key, r in records.items() if key[0] <= rec["resumed_at"]}
            continue
        kind = "eval" if "eval_loss" in rec else "train" if "loss" in rec else "other"
        records[(rec["step"], kind)] = rec
    return [records[k] for k in sorted(records)], skipped


def starting_loss(run_dir: Path, logs: int) -> float | None:
    """The mean loss of the first ``logs`` logged steps, None before there are that many (a resumed run's
    divergence reference must not restart)."""
    losses = [float(r["loss"]) for r in read_metrics(run_dir) if isinstance(r.get("loss"), (int, float))][:logs]
    return sum(losses) / logs if len(losses) == logs else None


def checkpoint_step(path: Path) -> int:
    return int(path.name[len(CHECKPOINT_PREFIX):])


def checkpoints(run_dir: Path) -> list[Path]:
    """The ``checkpoint-<step>`` folders of ``run_dir``, by step, complete or not."""
    found = [p for p in Path(run_dir).glob(CHECKPOINT_PREFIX + "*")
             if p.is_dir() and p.name[len(CHECKPOINT_PREFIX):].isdigit()]
    return sorted(found, key=checkpoint_step)


# Checkpoints: what transformers' Trainer (``_save_checkpoint``) and the engines under it write, and what its resume
# (``_load_from_checkpoint``, ``_load_optimizer_and_scheduler``, ``deepspeed_load_checkpoint``) reads back.
# ``_save_checkpoint`` writes the weights (``save_model``), the optimizer and scheduler
# (``_save_optimizer_and_scheduler``), the scaler, the RNG states (``rng_state.pth`` / ``rng_state_<rank>.pth``: the
# resume goes on without them) and, last, ``trainer_state.json``.

_TRAINER_STATE = "trainer_state.json"
_SCHEDULER = "scheduler.pt"

#: one process or DDP: ``Trainer._save`` (``save_pretrained``) writes a model or a PEFT adapter, whole or sharded, and
#: ``_load_from_checkpoint`` takes any of them; the optimizer goes to ``optimizer.pt``
_WEIGHTS = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json",
            "adapter_model.safetensors", "adapter_model.bin")
_OPTIMIZER = "optimizer.pt"

#: FSDP: accelerate's ``save_fsdp_model`` / ``save_fsdp_optimizer`` (``accelerate/utils/fsdp_utils.py``) write, with
#: a FULL_STATE_DICT, ``pytorch_model_fsdp.bin`` and ``optimizer.bin`` from rank 0; with a SHARDED_STATE_DICT, a
#: ``torch.distributed.checkpoint`` folder each (``pytorch_model_fsdp_0/``, ``optimizer_0/``), or per-rank files
#: (``use_dcp=False``; LOCAL_STATE_DICT weights: ``pytorch_model_fsdp_rank<r>.bin``)
_FSDP_PREFIX = "pytorch_model_fsdp"
_FSDP_WEIGHTS = "pytorch_model_fsdp.bin"
_FSDP_OPTIMIZER = "optimizer.bin"
_FSDP_WEIGHTS_DIR, _FSDP_OPTIMIZER_DIR = "pytorch_model_fsdp_0", "optimizer_0"
#: a ``torch.distributed.checkpoint`` folder is whole once it holds this: ``FileSystemWriter.finish`` writes it, on
#: the coordinator, after every rank wrote its ``.distcp`` files (``torch/distributed/checkpoint/filesystem.py``)
_DCP_METADATA = ".metadata"

#: DeepSpeed: ``engine.save_checkpoint`` writes a ``global_step<N>/`` folder and, once every rank saved, ``latest``
#: (the folder's name), which ``load_checkpoint`` reads to find it (``deepspeed/runtime/engine.py``)
_DS_LATEST = "latest"
#: in it, the module (and DeepSpeed's scheduler) in ``mp_rank_00_model_states.pt``, one per rank under ZeRO-3
#: (``zero_pp_rank_<r>_mp_rank_00_model_states.pt``: ``_get_ckpt_name``), and each rank's ZeRO optimizer partition
#: (``[bf16_]zero_pp_rank_<r>_mp_rank_00_optim_states.pt``: ``_get_rank_zero_ckpt_name``)
_DS_FILE = re.compile(r"^(?:bf16_)?(?:zero_pp_rank_(\d+)_)?mp_rank_\d+_(model|optim)_states\.pt$")


def checkpoint_problem(path: Path) -> str | None:
    """Why the checkpoint folder ``path`` cannot be resumed from, or None when it is complete.

    The rule follows what the Trainer writes under each strategy and what its resume reads: first
    ``trainer_state.json``, written last (a run killed while saving -- a second Stop, SIGKILL, a full disk -- leaves a
    folder without it, or with the state of an earlier write cut short); then, by the layout the engine left, the
    weights, the optimizer states and the scheduler of one process / DDP (``optimizer.pt``, ``scheduler.pt``), of
    FSDP (:func:`_fsdp_problem`) or of DeepSpeed (:func:`_deepspeed_problem`)."""
    try:
        state = json.loads((path / _TRAINER_STATE).read_text())
    except (OSError, ValueError):
        return "trainer_state.json is missing or unreadable (the save was cut short)"
    if not isinstance(state, dict):
        return "trainer_state.json is not the Trainer's state (not a JSON object)"
    damaged = damaged_file(path)
    if damaged:
        return damaged
    if (path / _DS_LATEST).exists() or any(path.glob("global_step*")):
        return _deepspeed_problem(path)
    if any(path.glob(_FSDP_PREFIX + "*")):
        return _fsdp_problem(path)
    if not any((path / name).is_file() for name in _WEIGHTS):
        return "no model or adapter weights"
    if not (path / _OPTIMIZER).is_file():
        return "no optimizer state"
    return None if (path / _SCHEDULER).is_file() else "no scheduler state"


#: what each saved file is: safetensors (an 8-byte header length, a JSON header, the tensors it places), torch's
#: zip archive (``torch.save`` since PyTorch 1.6; its central directory is at the end, so a cut file loses it) or JSON
_SAFETENSORS, _TORCH_ZIP, _JSON = (".safetensors",), (".pt", ".bin", ".pth"), (".json",)


def damaged_file(path: Path) -> str | None:
    """The first file of checkpoint folder ``path`` (and its engine's sub-folders) that does not open as what it
    is -- a safetensors file shorter than its header says, a torch archive without its zip directory, JSON that is not
    an object -- named with what is wrong; None when every file opens.  Reads headers and directories only."""
    for file in sorted(p for p in path.rglob("*") if p.is_file()):
        suffix = file.suffix.lower()
        if suffix in _SAFETENSORS:
            why = _safetensors_problem(file)
        elif suffix in _TORCH_ZIP:
            why = _torch_file_problem(file)
        elif suffix in _JSON:
            why = None if isinstance(read_json(file), dict) else "is not a JSON object"
        else:
            continue
        if why:
            return f"{file.relative_to(path)} {why} (damaged)"
    return None


def _safetensors_problem(file: Path) -> str | None:
    try:
        with file.open("rb") as fh:
            size = int.from_bytes(fh.read(8), "little")
            header = json.loads(fh.read(size)) if 0 < size < file.stat().st_size else None
    except (OSError, ValueError):
        header = None
    if not isinstance(header, dict):
        return "has no readable safetensors header"
    ends = [t["data_offsets"][1] for k, t in header.items() if k != "__metadata__" and isinstance(t, dict)
            and isinstance(t.get("data_offsets"), list) and len(t["data_offsets"]) == 2]
    if 8 + size + max(ends, default=0) > file.stat().st_size:
        return "is shorter than its header says (cut short)"
    return None


def _torch_file_problem(file: Path) -> str | None:
    import zipfile

    try:
        with file.open("rb") as fh:
            magic = fh.read(2)
        if magic[:1] == b"\x80":  # a legacy pickle (torch.save before 1.6): not checkable
            return None
        with zipfile.ZipFile(file) as archive:
            archive.infolist()
    except (OSError, zipfile.BadZipFile, ValueError):
        return "is not a readable torch archive (its zip directory is missing: cut short)"
    return None


def _fsdp_problem(path: Path) -> str | None:
    """An FSDP checkpoint: the weights and the optimizer states as ``save_fsdp_model`` / ``save_fsdp_optimizer``
    write them (whole, a finished ``torch.distributed.checkpoint`` folder, or per-rank files), and ``scheduler.pt``
    (the Trainer writes it for every strategy but DeepSpeed's own scheduler; its resume loads the optimizer only
    together with it)."""
    def saved(whole: str, folder: str) -> bool:
        return ((path / whole).is_file() or (path / folder / _DCP_METADATA).is_file()
                or any(path.glob(f"{folder}_rank*.bin")))

    if not (saved(_FSDP_WEIGHTS, _FSDP_WEIGHTS_DIR) or any(path.glob(f"{_FSDP_PREFIX}_rank*.bin"))):
        return "no FSDP model state (pytorch_model_fsdp.bin, or a finished pytorch_model_fsdp_0/)"
    if not saved(_FSDP_OPTIMIZER, _FSDP_OPTIMIZER_DIR):
        return "no FSDP optimizer state (optimizer.bin, or a finished optimizer_0/)"
    return None if (path / _SCHEDULER).is_file() else "no scheduler state"


def _deepspeed_problem(path: Path) -> str | None:
    """A DeepSpeed checkpoint: ``latest`` naming its ``global_step<N>/`` folder, which holds the module states and,
    under ZeRO, the optimizer partitions of ranks 0 to n-1 (of every rank that holds module states, under ZeRO-3).

    The scheduler: DeepSpeed's own when the run's DeepSpeed config has an ``optimizer`` or ``scheduler`` section
    (transformers' ``deepspeed_optim_sched`` then hands it a ``DummyScheduler``, which accelerate turns into a
    ``DeepSpeedSchedulerWrapper``): it is saved in the module states (``_common_checkpoint_state``) and the Trainer
    writes no ``scheduler.pt`` (``_save_optimizer_and_scheduler``) -- the shipped offload configs are such.  Else
    the Trainer's scheduler, in ``scheduler.pt``.  The run's ``training_args.json`` says which; without it, either
    is taken."""
    try:
        tag = (path / _DS_LATEST).read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError):
        return "no DeepSpeed 'latest' file (the save was cut short)"
    folder = path / tag
    if not tag or Path(tag).name != tag or not folder.is_dir():
        return f"DeepSpeed's 'latest' names {tag!r}, which is not a folder of the checkpoint"
    ranks: dict[str, set[int | None]] = {"model": set(), "optim": set()}
    for file in folder.iterdir():
        if (m := _DS_FILE.match(file.name)) and file.is_file():
            ranks[m[2]].add(None if m[1] is None else int(m[1]))
    if not ranks["model"]:
        return f"no DeepSpeed module states in {tag}/"
    config = _deepspeed_config(path.parent)
    # ZeRO (stage 1 and up) saves the optimizer in partitions; without it, in the module states (taken when unknown:
    # the recipes' strategies are ZeRO stages)
    if config is None or _zero_stage(config) >= 1:
        optim, per_rank = ranks["optim"] - {None}, ranks["model"] - {None}  # per rank: ZeRO-3's module states
        every = set(range(max(optim | per_rank, default=-1) + 1))
        if not optim:
            return f"no DeepSpeed optimizer states in {tag}/"
        for what, found in (("optimizer", optim), ("module", per_rank or every)):
            if found != every:
                return f"DeepSpeed {what} states of {tag}/ miss rank {', '.join(map(str, sorted(every - found)))}"
    own_scheduler = config is None or "optimizer" in config or "scheduler" in config
    return None if own_scheduler or (path / _SCHEDULER).is_file() else "no scheduler state"


def _deepspeed_config(run_dir: Path) -> dict | None:
    """The DeepSpeed config of the run in ``run_dir`` (``training_args.json``'s ``deepspeed``: the config itself or
    a JSON file's path), or None when it cannot be read."""
    args = read_json(Path(run_dir) / TRAINING_ARGS)
    config = args.get("deepspeed") if isinstance(args, dict) else None
    if isinstance(config, str):
        config = read_json(Path(config).expanduser())
    return config if isinstance(config, dict) else None


def _zero_stage(config: dict) -> int:
    try:
        return int((config.get("zero_optimization") or {}).get("stage", 0) or 0)
    except (TypeError, ValueError, AttributeError):
        return 0


def resume_point(run_dir: Path) -> tuple[Path | None, list[tuple[Path, str]]]:
    """The last complete checkpoint of ``run_dir`` (see :func:`checkpoint_problem`) or None, and the incomplete
    ones after it with what each lacks (oldest first); read newest first, stopping at the first complete one."""
    skipped: list[tuple[Path, str]] = []
    for path in reversed(checkpoints(run_dir)):
        problem = checkpoint_problem(path)
        if problem is None:
            return path, skipped[::-1]
        skipped.append((path, problem))
    return None, skipped[::-1]


def last_checkpoint(run_dir: Path) -> Path | None:
    """The last complete checkpoint of ``run_dir``, or None."""
    return resume_point(run_dir)[0]
