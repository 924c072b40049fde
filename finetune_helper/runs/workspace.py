"""The app's workspace: one folder that holds uploads and run folders, and the only place typed paths may point.

A path typed into the app (a dataset file, a local model directory) is resolved against the workspace and refused when
it lands outside it, symlinks included, so the app cannot be used to read arbitrary files on the machine.  Names that
are not paths pass through unchanged: catalog models, ``builtin:`` assets, Hub ids (``owner/name``).
"""

from __future__ import annotations

import re
import shutil
import time
import uuid
from pathlib import Path

from ..recommender import catalog
from ..errors import FinetuneHelperError
from ..names import is_hub_id, model_size
from ..train.recipe import BUILTIN_DATA, BUILTIN_MODEL, DATA_SUFFIXES

#: longest name a file system takes (POSIX NAME_MAX) and a sane bound on a whole path
NAME_MAX, PATH_MAX = 255, 1024


def _named(text: str, field: str, builtin: str, kind: str, choices: str) -> str:
    """``text`` stripped; refused when empty, too long for a file system, or an unknown ``builtin:`` name."""
    text = str(text or "").strip()
    if not text:
        raise FinetuneHelperError(field, f"is empty: {choices}, or {builtin}")
    if len(text) > PATH_MAX or any(len(part) > NAME_MAX for part in text.split("/")):
        raise FinetuneHelperError(field, f"is too long ({len(text)} characters; at most {NAME_MAX} per path part)")
    if text.startswith("builtin:") and text != builtin:
        raise FinetuneHelperError(field, f"unknown built-in {kind} {text!r}; the built-in is {builtin}")
    return text


class Workspace:
    """``root/uploads`` holds uploaded datasets, ``root/runs`` one folder per run."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root).expanduser().resolve()
        self.uploads = self.root / "uploads"
        self.runs = self.root / "runs"
        for folder in (self.root, self.uploads, self.runs):
            folder.mkdir(parents=True, exist_ok=True)

    # ------------------------------------------------------------------------------------------- paths
    def path(self, text: str, field: str) -> Path:
        """``text`` as a path inside the workspace (relative paths are relative to the workspace root)."""
        text = str(text).strip()
        if "\x00" in text:
            raise FinetuneHelperError(field, "contains a NUL byte; type a plain path")
        if len(text) > PATH_MAX or any(len(part) > NAME_MAX for part in text.split("/")):
            raise FinetuneHelperError(field, f"is too long ({len(text)} characters; at most {NAME_MAX} per path part)")
        raw = Path(text).expanduser()
        try:
            resolved = (raw if raw.is_absolute() else self.root / raw).resolve()
        except (OSError, RuntimeError, ValueError) as exc:
            raise FinetuneHelperError(field, f"{text!r} is not a usable path ({exc})") from None
        if not resolved.is_relative_to(self.root):
            raise FinetuneHelperError(field, f"{text!r} is outside the workspace {self.root}; paths typed into the "
                                      "app must be inside it (upload the file, or copy it there)")
        return resolved

    def _looks_local(self, text: str) -> bool:
        return (text.startswith(("/", ".", "~")) or "\\" in text or ".." in text
                or (self.root / text).exists())

    def data_source(self, text: str, field: str = "data.path") -> str:
        """A dataset reference for a recipe: ``builtin:arithmetic``, a Hub dataset id, or an existing file in the
        workspace (returned as an absolute path)."""
        text = _named(text, field, BUILTIN_DATA, "data", "upload a dataset (.json/.jsonl/.csv/.parquet), type a "
                      "path in the workspace, a Hub dataset id")
        if text == BUILTIN_DATA:
            return text
        if not self._looks_local(text) and Path(text).suffix.lower() not in DATA_SUFFIXES and is_hub_id(text):
            return text
        path = self.path(text, field)
        if not path.exists():
            raise FinetuneHelperError(field, f"no such file in the workspace: {path}")
        if path.is_file() and path.suffix.lower() not in DATA_SUFFIXES:
            raise FinetuneHelperError(field, f"{path.name}: a dataset file must end in {', '.join(DATA_SUFFIXES)}")
        if path.is_dir():
            if path == self.root or self.runs.is_relative_to(path) or path.is_relative_to(self.runs):
                raise FinetuneHelperError(field, f"{path} holds the workspace's runs; name a data file or a folder "
                                          "of data files")
            self._check_inside(path, field)
        return str(path)

    def _check_inside(self, folder: Path, field: str) -> None:
        """A folder is read file by file: each of its files (symlinks resolved) must be inside the workspace too."""
        for item in folder.rglob("*"):
            if not item.resolve().is_relative_to(self.root):
                raise FinetuneHelperError(field, f"{item} links outside the workspace {self.root}; copy the file "
                                          "into the workspace instead")

    def model_source(self, text: str, field: str = "model.name") -> str:
        """A model reference: a catalog name, ``builtin:tiny-llama``, a Hub id, a size such as ``7B``, or a local
        directory inside the workspace (returned absolute)."""
        text = _named(text, field, BUILTIN_MODEL, "model", "pick a catalog model, type a Hub id (owner/name), a "
                      "folder in the workspace with config.json")
        if text == BUILTIN_MODEL or catalog.find_model(text) is not None:
            return text
        if not self._looks_local(text):
            if is_hub_id(text) or model_size(text) is not None:
                return text  # resolve_model fetches the Hub config (offline: a clear error) or sizes a generic model
            raise FinetuneHelperError(field, f"{text!r} is not a catalog model, a Hub id (owner/name), a size such "
                                      "as 7B, or a folder in the workspace")
        path = self.path(text, field)
        if not (path / "config.json").is_file():
            raise FinetuneHelperError(field, f"{path} is not a model folder (no config.json)")
        self._check_inside(path, field)
        return str(path)

    # ------------------------------------------------------------------------------------------- uploads
    def save_upload(self, source: str | Path, field: str = "dataset") -> Path:
        """Copy an uploaded file (from Gradio's temp folder) into ``uploads/``; the copy is what the run reads."""
        source = Path(source)
        if source.suffix.lower() not in DATA_SUFFIXES:
            raise FinetuneHelperError(field, f"{source.name}: upload a {', '.join(DATA_SUFFIXES)} file")
        safe = re.sub(r"[^\w.\-]", "_", source.name)
        target = self.uploads / f"{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:8]}-{safe}"
        shutil.copyfile(source, target)
        return target
