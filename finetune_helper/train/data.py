"""Load a fine-tuning data set, recognise its format and convert it to what TRL's ``SFTTrainer`` trains on.

Five formats are recognised (``FORMATS``):

* ``alpaca``: columns ``instruction``, ``output`` (+ optional ``input``, ``system``);
* ``sharegpt``: a ``conversations`` list of ``{"from": ..., "value": ...}`` turns (human/gpt/system ...);
* ``messages``: a ``messages`` list of ``{"role": ..., "content": ...}`` turns (OpenAI / TRL conversational);
* ``prompt_completion``: columns ``prompt`` and ``completion``, both strings or both lists of messages;
* ``text``: a ``text`` column (plain language modelling: every token is trained).

Where the loss goes (TRL 1.16), decided here so that by default only answers are trained:

* ``alpaca`` becomes *conversational prompt/completion* (``prompt`` = optional system + user turn, ``completion`` =
  the assistant turn). TRL renders both with the tokenizer's chat template and trains on the completion tokens only
  (``completion_only_loss``), which works with any chat template.
* ``prompt_completion`` stays as it is: completion-only loss, string or conversational.
* ``sharegpt`` and ``messages`` become ``messages`` (roles mapped to system/user/assistant). How multi-turn chats
  are masked depends on the chat template (see :func:`chat_template_supports_assistant_mask`):

  - the template marks assistant content with ``{% generation %}`` blocks (or it is one that TRL 1.16 knows how to
    patch, e.g. Llama 3, Qwen 2.5/3, Gemma): the conversation is kept whole and trained with
    ``assistant_only_loss=True``: **every** assistant turn is trained, user/system turns are not;
  - otherwise ``assistant_only_loss`` would stop the trainer ("The chat template is not training-compatible"), and
    training on the whole sequence would train on the user's turns too. So each conversation is split at its
    **last** assistant turn into conversational prompt/completion: everything before it is context (no loss), the
    final assistant answer is trained. Earlier assistant turns are then not trained and turns after the last
    assistant turn are dropped; :func:`to_trl_dataset` returns a note saying so, with counts.

* ``text`` is trained on every token (``dataset_text_field="text"``); there is no answer to single out.

:func:`to_trl_dataset` returns the SFTConfig settings that go with the converted data (``trl_kwargs``); the runner
must set them, since an ``assistant_only_loss`` left on from elsewhere fails on non-conversational data.

Heavy imports (``datasets``, ``transformers``, ``trl``) happen inside the functions that need them.
"""

from __future__ import annotations

import contextlib
import csv
import logging
import math
import random
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import FinetuneHelperError, first_line
from ..names import is_hub_id

if TYPE_CHECKING:  # pragma: no cover
    import datasets

FORMATS = ("alpaca", "sharegpt", "messages", "prompt_completion", "text")

#: file suffix -> ``datasets`` packaged builder
SUFFIX_BUILDERS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}

#: ShareGPT ``from`` values -> chat roles
SHAREGPT_ROLES = {
    "human": "user", "user": "user",
    "gpt": "assistant", "assistant": "assistant", "model": "assistant", "chatgpt": "assistant",
    "bard": "assistant", "bing": "assistant",
    "system": "system",
}

#: roles a ``messages`` turn may have
MESSAGE_ROLES = ("system", "user", "assistant", "tool")

#: how each format is described in error messages
_FORMAT_COLUMNS = {
    "alpaca": "instruction, output[, input, system]",
    "sharegpt": "conversations: [{from, value}, ...]",
    "messages": "messages: [{role, content}, ...]",
    "prompt_completion": "prompt, completion",
    "text": "text",
}

#: the columns each format reads (the first is the one whose shape identifies it)
_FORMAT_KEEP = {
    "alpaca": ("instruction", "input", "output", "system"),
    "sharegpt": ("conversations", "messages"),
    "messages": ("messages", "conversations"),
    "prompt_completion": ("prompt", "completion"),
    "text": ("text",),
}

# ----------------------------------------------------------------------------------------------- format detection

def _expected() -> str:
    return ", ".join(f"{name} ({cols})" for name, cols in _FORMAT_COLUMNS.items())


def _turns_shape(turns: Any) -> str | None:
    """``"messages"`` for role/content turns, ``"sharegpt"`` for from/value turns, None for anything else."""
    if isinstance(turns, list) and turns and all(isinstance(t, Mapping) for t in turns):
        first = turns[0]
        if first.get("role") is not None and "content" in first:
            return "messages"
        if first.get("from") is not None and "value" in first:
            return "sharegpt"
    return None


def _chat_column(cols: set[str], example: Mapping | None, shape: str) -> bool:
    """Whether a conversations/messages column holds turns of ``shape`` (by name when there is no example)."""
    native, other = ("conversations", "messages") if shape == "sharegpt" else ("messages", "conversations")
    for column, by_name in ((native, True), (other, False)):
        if column in cols:
            if example is None or column not in example:
                if by_name:
                    return True
            elif _turns_shape(example[column]) == shape:
                return True
    return False


def _fits(fmt: str, cols: set[str], example: Mapping | None) -> bool:
    """Whether ``cols`` (and, for chat formats, the turns in ``example``) fit ``fmt``.

    Flat formats fit by column names alone: a value of the wrong type is reported precisely by ``to_trl_example``
    rather than as "fits no format".
    """
    if fmt == "alpaca":
        return {"instruction", "output"} <= cols
    if fmt in ("sharegpt", "messages"):
        return _chat_column(cols, example, fmt)
    if fmt == "prompt_completion":
        return {"prompt", "completion"} <= cols
    if fmt == "text":
        return "text" in cols
    raise FinetuneHelperError("data.format", f"{fmt!r} is not a known format; allowed: {', '.join(FORMATS)}")


#: detection order: the structured formats win over ``text`` (many alpaca dumps carry a pre-rendered text column)
_DETECTION_ORDER = ("messages", "sharegpt", "prompt_completion", "alpaca", "text")


def detect_format(columns: Iterable[str], example: dict | None = None) -> str:
    """The format (one of ``FORMATS``) that ``columns`` fit; ``example`` (a row) settles what column names can't.

    With an example, a ``conversations`` column of role/content turns is ``messages``-shaped, a ``messages`` column
    of from/value turns is ShareGPT, and a chat column that doesn't hold turns doesn't count.
    """
    cols = set(columns)
    for fmt in _DETECTION_ORDER:
        if _fits(fmt, cols, example):
            return fmt
    found = ", ".join(sorted(cols))
    raise FinetuneHelperError("data.format", f"columns [{found}] fit no known format; expected one of: {_expected()}; "
                                             "or set data.format and the column mapping (data.columns)")


# ---------------------------------------------------------------------------------------------- row conversion

def _str_field(example: Mapping, key: str, *, required: bool) -> str:
    """``example[key]`` as a string: numbers (a JSON answer such as 42) become ``str(value)``, null/absent ""."""
    value = example.get(key)
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        value = str(value)
    if value is None or (required and value == ""):
        if required:
            raise FinetuneHelperError("data.path", f"{key!r} is missing or empty")
        return ""
    if not isinstance(value, str):
        raise FinetuneHelperError("data.path", f"{key!r} must be a string, got {type(value).__name__}")
    return value


def _chat_turns(example: Mapping, fmt: str) -> list:
    for column in _FORMAT_KEEP[fmt]:
        if column in example and example[column] is not None:
            turns = example[column]
            if not isinstance(turns, list) or not turns:
                raise FinetuneHelperError("data.path", f"{column!r} must be a non-empty list of turns")
            return turns
    raise FinetuneHelperError("data.path", f"{' or '.join(repr(c) for c in _FORMAT_KEEP[fmt])} is missing")


def _as_messages(turns: list, where: str, role_key: str, content_key: str, role_of, allowed: str) -> list[dict]:
    """``turns`` as ``{role, content}`` messages: each a mapping whose ``role_key`` ``role_of`` maps to a role (None:
    not allowed; ``allowed`` says what is) and whose ``content_key`` is a string."""
    out = []
    for i, turn in enumerate(turns):
        if not isinstance(turn, Mapping):
            raise FinetuneHelperError("data.path", f"{where}[{i}] must be a {{{role_key}, {content_key}}} object")
        source, content = turn.get(role_key), turn.get(content_key)
        role = role_of(source)
        if role is None:
            raise FinetuneHelperError("data.path", f"{where}[{i}].{role_key} {source!r} is {allowed}")
        if not isinstance(content, str):
            raise FinetuneHelperError("data.path", f"{where}[{i}].{content_key} must be a string, "
                                                   f"got {type(content).__name__}")
        out.append({"role": role, "content": content})
    return out


def _check_messages(messages: list, where: str) -> list[dict]:
    return _as_messages(messages, where, "role", "content", lambda r: r if r in MESSAGE_ROLES else None,
                        f"not one of {', '.join(MESSAGE_ROLES)}")


def _sharegpt_messages(turns: list) -> list[dict]:
    return _as_messages(turns, "conversations", "from", "value",
                        lambda s: SHAREGPT_ROLES.get(s.lower()) if isinstance(s, str) else None,
                        f"not a known ShareGPT speaker; allowed: {', '.join(SHAREGPT_ROLES)}")


def to_trl_example(example: dict, fmt: str) -> dict:
    """One row of ``fmt`` as TRL 1.16's SFTTrainer consumes it (only the keys TRL reads are returned).

    alpaca -> conversational ``prompt``/``completion``; sharegpt and messages -> ``messages`` (roles mapped and
    checked, at least one assistant turn); prompt_completion -> unchanged ``prompt``/``completion``; text -> ``text``.
    """
    if fmt == "alpaca":
        instruction = _str_field(example, "instruction", required=True)
        extra = _str_field(example, "input", required=False)
        system = _str_field(example, "system", required=False)
        output = _str_field(example, "output", required=True)
        user = instruction + ("\n\n" + extra if extra.strip() else "")
        prompt = ([{"role": "system", "content": system}] if system.strip() else []) + [
            {"role": "user", "content": user}]
        return {"prompt": prompt, "completion": [{"role": "assistant", "content": output}]}
    if fmt in ("sharegpt", "messages"):
        turns = _chat_turns(example, fmt)
        shape = _turns_shape(turns)
        # a row's own shape wins: a `conversations` column may hold role/content turns and vice versa
        if shape == "sharegpt" or (shape is None and fmt == "sharegpt"):
            messages = _sharegpt_messages(turns)
        else:
            messages = _check_messages(turns, "messages")
        if not any(m["role"] == "assistant" for m in messages):
            raise FinetuneHelperError("data.path", "a conversation has no assistant turn, so nothing to train on")
        return {"messages": messages}
    if fmt == "prompt_completion":
        prompt, completion = example.get("prompt"), example.get("completion")
        if isinstance(prompt, str) and isinstance(completion, str):
            if not completion:
                raise FinetuneHelperError("data.path", "'completion' is empty")
            return {"prompt": prompt, "completion": completion}
        if isinstance(prompt, list) and isinstance(completion, list):
            if not prompt or not completion:
                raise FinetuneHelperError("data.path", "'prompt' and 'completion' must be non-empty lists of turns")
            return {"prompt": _check_messages(prompt, "prompt"),
                    "completion": _check_messages(completion, "completion")}
        raise FinetuneHelperError("data.path", "'prompt' and 'completion' must both be strings or both be lists of "
                                               f"{{role, content}} turns, got {type(prompt).__name__} and "
                                               f"{type(completion).__name__}")
    if fmt == "text":
        return {"text": _str_field(example, "text", required=True)}
    raise FinetuneHelperError("data.format", f"{fmt!r} is not a known format; allowed: {', '.join(FORMATS)}")


def split_at_last_assistant(messages: list[dict]) -> dict:
    """Conversational prompt/completion from a conversation: the completion is its last assistant turn.

    Turns after the last assistant turn are dropped; a conversation that opens with its only assistant turn is
    rejected (an empty prompt has nothing to condition on, and TRL cannot tell its format).
    """
    last = max((i for i, m in enumerate(messages) if m["role"] == "assistant"), default=None)
    if last is None:
        raise FinetuneHelperError("data.path", "a conversation has no assistant turn, so nothing to train on")
    if last == 0:
        raise FinetuneHelperError("data.path", "a conversation has no turn before its last assistant turn; "
                                               "the prompt would be empty")
    return {"prompt": messages[:last], "completion": [messages[last]]}


# ------------------------------------------------------------------------------------------ chat template checks

_GENERATION_BLOCK = re.compile(r"\{%-?\s*generation\s*-?%\}")


def _template_text(tokenizer: Any) -> str | None:
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, dict):
        template = template.get("default")
    return template if isinstance(template, str) and template else None


def _mask_works(tokenizer: Any, chat_template: str | None) -> bool:
    probe = [{"role": "user", "content": "Hi there"}, {"role": "assistant", "content": "Hello"}]
    try:
        out = tokenizer.apply_chat_template(probe, tokenize=True, return_dict=True,
                                            return_assistant_tokens_mask=True, chat_template=chat_template)
    except Exception:  # noqa: BLE001 - any template failure means "no"
        return False
    mask = out.get("assistant_masks") if hasattr(out, "get") else None
    if mask and isinstance(mask[0], list):  # batched output
        mask = mask[0]
    return bool(mask) and 1 in list(mask)


def chat_template_supports_assistant_mask(tokenizer: Any) -> bool:
    """Whether TRL 1.16 can train ``messages`` data with ``assistant_only_loss=True`` with this tokenizer.

    True when the chat template has ``{% generation %}`` blocks and rendering a probe conversation with
    ``return_assistant_tokens_mask=True`` marks some assistant tokens; also True when the template lacks them but is
    one that TRL swaps for a training template itself (``trl.chat_template_utils.get_training_chat_template``: Llama
    3, Qwen 2.5/3, Gemma, Phi-3 ...), checked the same way. False without a chat template.
    """
    template = _template_text(tokenizer)
    if template is None:
        return False
    if _GENERATION_BLOCK.search(template):
        return _mask_works(tokenizer, None)
    try:
        from trl.chat_template_utils import get_training_chat_template
    except ImportError:
        return False
    try:
        patched = get_training_chat_template(tokenizer)
    except Exception:  # noqa: BLE001 - "not training-compatible and patching is not supported"
        return False
    return patched is not None and bool(_GENERATION_BLOCK.search(patched)) and _mask_works(tokenizer, patched)


# --------------------------------------------------------------------------------------------- dataset conversion

def to_trl_dataset(dataset: "datasets.Dataset", fmt: str, *, assistant_mask_supported: bool
                   ) -> tuple["datasets.Dataset", dict, str | None]:
    """Convert every row (``to_trl_example``) and say which SFTConfig settings go with the result.

    Returns ``(dataset, trl_kwargs, note)``. The dataset keeps only the columns TRL reads. ``trl_kwargs`` always sets
    ``assistant_only_loss`` and ``completion_only_loss`` (and ``dataset_text_field`` for text) so no setting left
    over from elsewhere changes what is trained:

    * messages/sharegpt, ``assistant_mask_supported``: ``messages`` + ``assistant_only_loss=True``;
    * messages/sharegpt otherwise: prompt/completion split at the last assistant turn + ``completion_only_loss=True``,
      and a note saying what is not trained;
    * alpaca, prompt_completion: ``completion_only_loss=True``;
    * text: ``dataset_text_field="text"``, loss on every token.
    """
    if fmt not in FORMATS:
        raise FinetuneHelperError("data.format", f"{fmt!r} is not a known format; allowed: {', '.join(FORMATS)}")

    def convert(example: dict, index: int) -> dict:
        try:
            return to_trl_example(example, fmt)
        except FinetuneHelperError as exc:
            raise FinetuneHelperError(exc.field, f"row {index}: {exc.message}") from None

    note = None
    if fmt in ("sharegpt", "messages") and not assistant_mask_supported:
        counts = {"multi": 0, "trailing": 0}

        def convert_split(example: dict, index: int) -> dict:
            messages = convert(example, index)["messages"]
            roles = [m["role"] for m in messages]
            try:
                out = split_at_last_assistant(messages)
            except FinetuneHelperError as exc:
                raise FinetuneHelperError(exc.field, f"row {index}: {exc.message}") from None
            counts["multi"] += roles.count("assistant") > 1
            counts["trailing"] += roles[-1] != "assistant"
            return out

        # runs in this process (no num_proc), so the counts the closure keeps are complete afterwards
        converted = dataset.map(convert_split, with_indices=True, remove_columns=dataset.column_names,
                                load_from_cache_file=False)
        note = ("the chat template has no {% generation %} blocks, so assistant_only_loss is not possible: each "
                "conversation was split at its last assistant turn into prompt/completion and only that final "
                "answer is trained")
        if counts["multi"]:
            note += f"; {counts['multi']} of {len(converted)} conversations have earlier assistant turns, kept as " \
                    "context but not trained"
        if counts["trailing"]:
            note += f"; {counts['trailing']} conversations end after their last assistant turn, those turns dropped"
        note += " (use a chat template with {% generation %} blocks to train every assistant turn)"
        return converted, {"assistant_only_loss": False, "completion_only_loss": True}, note

    converted = dataset.map(convert, with_indices=True, remove_columns=dataset.column_names,
                            load_from_cache_file=False)
    if fmt in ("sharegpt", "messages"):
        kwargs: dict[str, Any] = {"assistant_only_loss": True, "completion_only_loss": False}
    elif fmt == "text":
        kwargs = {"assistant_only_loss": False, "completion_only_loss": False, "dataset_text_field": "text"}
    else:
        kwargs = {"assistant_only_loss": False, "completion_only_loss": True}
    return converted, kwargs, note


# ----------------------------------------------------------------------------------------------------- packing
def token_lengths(dataset: "datasets.Dataset", tokenizer: Any) -> list[int]:
    """Tokens per example of a dataset :func:`to_trl_dataset` made, tokenized as TRL 1.16's ``SFTTrainer`` tokenizes
    it (``trl.data_utils._tokenize``, reached through ``_prepare_dataset``): conversations (``messages``, or a
    conversational prompt + completion) through the chat template, plain text (``text``, or a text prompt +
    completion) through the tokenizer with an EOS appended when it is missing."""
    eos = tokenizer.eos_token or ""

    def ids(turns_or_text: Any) -> list[int]:
        if isinstance(turns_or_text, list):
            return tokenizer.apply_chat_template(turns_or_text, tokenize=True, return_dict=True)["input_ids"]
        text = turns_or_text if turns_or_text.endswith(eos) else turns_or_text + eos
        return tokenizer(text=text)["input_ids"]

    def length(example: dict) -> int:
        if "prompt" in example:
            return len(ids(example["prompt"] + example["completion"]))
        return len(ids(example["messages"] if "messages" in example else example["text"]))

    return [length(example) for example in dataset]


def packed_rows(lengths: list[int], max_length: int, strategy: str = "bfd") -> int:
    """How many rows TRL packs examples of ``lengths`` tokens into, ``max_length`` tokens each: TRL's own
    ``pack_dataset`` (what ``SFTTrainer`` applies before training with ``packing=True``) run on placeholder tokens of
    those lengths."""
    from datasets import Dataset
    from trl import pack_dataset

    if not lengths:
        return 0
    placeholders = Dataset.from_dict({"input_ids": [[0] * n for n in lengths]})
    return len(pack_dataset(placeholders, max_length, strategy))


# ---------------------------------------------------------------------------------------------------- loading

def _local_files(path: Path) -> tuple[str, list[str]]:
    supported = ", ".join(SUFFIX_BUILDERS)
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in SUFFIX_BUILDERS
                       and not any(part.startswith(".") for part in p.relative_to(path).parts))
        if not files:
            raise FinetuneHelperError("data.path", f"directory {path} has no {supported} files")
        builders = {SUFFIX_BUILDERS[p.suffix.lower()] for p in files}
        if len(builders) > 1:
            kinds = ", ".join(sorted({p.suffix.lower() for p in files}))
            raise FinetuneHelperError("data.path", f"directory {path} mixes file types ({kinds}); keep one type")
        return builders.pop(), [str(p) for p in files]
    builder = SUFFIX_BUILDERS.get(path.suffix.lower())
    if builder is None:
        raise FinetuneHelperError("data.path", f"unsupported file type {path.suffix or '(none)'!r} of {path}; "
                                               f"supported: {supported} (or a directory of them, or a Hub dataset id)")
    return builder, [str(path)]


def _csv_string_features(files: list[str]):
    """All-string features for CSV files, so "042" stays "042" and empty cells stay "" (not null)."""
    import datasets

    with open(files[0], newline="", encoding="utf-8-sig") as handle:
        header = next(csv.reader(handle), None)
    if not header:
        raise FinetuneHelperError("data.path", f"{files[0]} is empty (no header row)")
    return datasets.Features({name: datasets.Value("string") for name in header})


def _first_line(exc: BaseException) -> str:
    """The exception's type and its first line, cut at 200 characters."""
    return f"{type(exc).__name__}: {first_line(exc)[:200]}" if str(exc).strip() else type(exc).__name__


#: bytes read from the start of each JSON / CSV file to tell text from binary data before ``datasets`` reads it (a
#: file past them is checked by the reader itself: :func:`_read_failure` reports its UnicodeDecodeError)
SNIFF_BYTES = 64 * 1024


def _not_text(head: bytes) -> str | None:
    """Why ``head`` (a file's first bytes) is not UTF-8 text, or None: a byte sequence UTF-8 does not allow, or a NUL
    byte (valid UTF-8, but no text holds one: binary data, or UTF-16 without its byte-order mark).  A multi-byte
    character cut at the end of ``head`` is not an error."""
    import codecs

    try:
        codecs.getincrementaldecoder("utf-8")().decode(head, final=False)
    except UnicodeDecodeError as exc:
        return f"byte 0x{head[exc.start]:02x} at offset {exc.start}"
    nul = head.find(b"\0")
    return f"a NUL byte at offset {nul}" if nul >= 0 else None


def _not_utf8(name: str | Path, problem: str) -> str:
    return (f"{name} is not UTF-8 text ({problem}): binary data, or another encoding? JSON and CSV files are read "
            "as UTF-8")


def _check_files(path: Path, builder: str, files: list[str]) -> None:
    """Refuse, naming the file, what ``datasets`` would only report as its own error: data files that are all empty
    (its JSON reader raises a bare StopIteration) and a JSON / CSV file that is not UTF-8 text (DatasetGenerationError,
    or a UnicodeDecodeError traceback from the CSV header)."""
    if all(Path(f).stat().st_size == 0 for f in files):
        raise FinetuneHelperError("data.path", f"{path} is empty" if path.is_file() else
                                  f"every file in {path} is empty")
    if builder == "parquet":  # binary by design; pyarrow names a file that is not Parquet ("magic bytes not found")
        return
    for name in files:
        try:
            with open(name, "rb") as handle:
                problem = _not_text(handle.read(SNIFF_BYTES))
        except OSError as exc:
            raise FinetuneHelperError("data.path", f"cannot read {name}: {exc.strerror or exc}") from None
        if problem:
            raise FinetuneHelperError("data.path", _not_utf8(name, problem))


def _read_failure(path: Path, builder: str, exc: BaseException) -> str:
    """What went wrong reading ``path``, from what ``datasets`` raised: the cause its DatasetGenerationError wraps
    ("An error occurred while generating the dataset" says nothing), in the user's terms where it is a known one."""
    from datasets.exceptions import DatasetBuildError
    from datasets.table import CastError
    from pyarrow import ArrowException

    chain: list[BaseException] = []
    while exc is not None and exc not in chain:
        chain.append(exc)
        exc = exc.__cause__ or exc.__context__
    for cause in chain:
        # an empty first file: the JSON reader's bare StopIteration; rows of whitespace only: the split's
        # 'Instruction "train" corresponds to no data!' (datasets' arrow_reader)
        if isinstance(cause, StopIteration) or "corresponds to no data" in str(cause):
            return f"{path} has no rows"
        if isinstance(cause, CastError):
            differing = sorted(set(cause.table_column_names) ^ set(cause.requested_column_names))
            return f"the files in {path} do not all have the same columns: {', '.join(differing)} in some of them " \
                   "only; give one set of files with the same columns"
        if isinstance(cause, UnicodeDecodeError):  # past the bytes _check_files read
            return _not_utf8(path, f"byte 0x{cause.object[cause.start]:02x}")
    cause = next((c for c in chain if not isinstance(c, DatasetBuildError)), chain[0])
    # pyarrow's messages say what they are ("JSON parse error: ...", "Parquet magic bytes not found ...")
    detail = first_line(cause)[:200] if isinstance(cause, ArrowException) else _first_line(cause)
    return f"could not read {path} as {builder}: {detail}"


@contextlib.contextmanager
def logger_at(name: str, level: int):
    """The logger ``name`` at ``level`` for the duration (its own level restored after)."""
    logger = logging.getLogger(name)
    before = logger.level
    logger.setLevel(level)
    try:
        yield
    finally:
        logger.setLevel(before)


def _readers_quiet():
    """``datasets``' file readers log the error they then raise ("Failed to load JSON from file ..."); it is
    reported once, as a field error, so their log line is held back while they read."""
    return logger_at("datasets.packaged_modules", logging.CRITICAL)


def _load_local(path: Path, split: str) -> "datasets.Dataset":
    import datasets

    builder, files = _local_files(path)
    if not re.match(r"^train(\[.*\])?$", split):
        raise FinetuneHelperError("data.split", f"a local file has only the 'train' split (slices such as "
                                                f"'train[:100]' work), got {split!r}")
    _check_files(path, builder, files)
    try:
        kwargs: dict[str, Any] = {}
        if builder == "csv":
            kwargs = {"features": _csv_string_features(files), "keep_default_na": False}
        with _readers_quiet():
            return datasets.load_dataset(builder, data_files={"train": files}, split=split, **kwargs)
    except FinetuneHelperError:
        raise
    except Exception as exc:  # noqa: BLE001 - report any reader failure as a data problem
        raise FinetuneHelperError("data.path", _read_failure(path, builder, exc)) from None


def _load_hub(dataset_id: str, split: str, config: str | None) -> "datasets.Dataset":
    import datasets

    try:
        loaded = datasets.load_dataset(dataset_id, config, split=split)
    except Exception as exc:  # noqa: BLE001
        text = _first_line(exc)
        # datasets names the bad part: "Unknown split ...", "BuilderConfig 'x' not found. Available: [...]"
        if "split" in text.lower() and "unknown" in text.lower():
            raise FinetuneHelperError("data.split", f"{dataset_id!r} has no split {split!r}: {text}") from None
        if "config" in text.lower() and ("not found" in text.lower() or "available" in text.lower()):
            raise FinetuneHelperError("data.config", f"{dataset_id!r}: {text}") from None
        raise FinetuneHelperError("data.path", f"no such file, and {dataset_id!r} could not be loaded as a Hub "
                                               f"dataset (offline?): {text}; give a local "
                                               f"{'/'.join(SUFFIX_BUILDERS)} file or directory") from None
    if not isinstance(loaded, datasets.Dataset):
        raise FinetuneHelperError("data.path", f"{dataset_id!r} split {split!r} is not a plain dataset "
                                               f"({type(loaded).__name__})")
    return loaded


def _apply_columns(dataset: "datasets.Dataset", columns: Mapping[str, str]) -> "datasets.Dataset":
    if not isinstance(columns, Mapping) or not all(isinstance(k, str) and isinstance(v, str)
                                                   for k, v in columns.items()):
        raise FinetuneHelperError("data.columns", "must map your column names to format names, e.g. "
                                                  "{question: instruction, answer: output}")
    found = dataset.column_names
    mapping = {k: v for k, v in columns.items() if k != v}
    missing = [k for k in mapping if k not in found]
    if missing:
        raise FinetuneHelperError("data.columns", f"{', '.join(missing)} not in the data; columns found: "
                                                  f"[{', '.join(found)}]")
    targets = list(mapping.values())
    clash = sorted({t for t in targets if targets.count(t) > 1}
                   | {t for t in targets if t in found and t not in mapping})
    if clash:
        raise FinetuneHelperError("data.columns", f"renaming would give two columns named {', '.join(clash)}; "
                                                  f"columns found: [{', '.join(found)}]")
    return dataset.rename_columns(mapping) if mapping else dataset


def load_data(path_or_id: str, *, split: str = "train", config: str | None = None, fmt: str | None = None,
              columns: dict | None = None) -> tuple["datasets.Dataset", str]:
    """Load a local .json/.jsonl/.csv/.parquet file (or a directory of one type of them) or a Hub dataset id.

    ``columns`` renames your columns to the format's names before detection (``{"question": "instruction"}``);
    ``fmt`` (None or ``"auto"`` to detect) must fit the columns. CSV cells are read as strings, empty cells as "".
    Local files have one split, ``train`` (slices like ``train[:100]`` work) and no configurations; ``split`` and
    ``config`` pick a Hub dataset's split and configuration.
    Returns ``(dataset, format)``; the rows are not converted yet (see :func:`to_trl_dataset`).
    """
    if not isinstance(path_or_id, str) or not path_or_id.strip():
        raise FinetuneHelperError("data.path", f"is required: a {'/'.join(SUFFIX_BUILDERS)} file, a directory of "
                                               "them, or a Hub dataset id")
    if fmt is not None and fmt != "auto" and fmt not in FORMATS:
        raise FinetuneHelperError("data.format", f"{fmt!r} is not a known format; allowed: auto, {', '.join(FORMATS)}")
    path = Path(path_or_id).expanduser()
    if path.exists():
        if config:
            raise FinetuneHelperError("data.config", f"a local file has no configurations, got {config!r}")
        dataset = _load_local(path, split)
    elif (path.suffix.lower() in SUFFIX_BUILDERS or path_or_id.startswith((".", "/", "~"))
          or path_or_id.endswith(("/", "\\")) or not is_hub_id(path_or_id, owner_optional=True)):
        raise FinetuneHelperError("data.path", f"no such file: {path_or_id}")
    else:
        dataset = _load_hub(path_or_id, split, config)

    if columns:
        dataset = _apply_columns(dataset, columns)
    if len(dataset) == 0:
        raise FinetuneHelperError("data.path", f"{path_or_id} has no rows")
    example = dataset[0]
    if fmt is None or fmt == "auto":
        return dataset, detect_format(dataset.column_names, example)
    if not _fits(fmt, set(dataset.column_names), example):
        found = ", ".join(dataset.column_names)
        raise FinetuneHelperError("data.format", f"format {fmt!r} needs {_FORMAT_COLUMNS[fmt]}; columns found: "
                                                 f"[{found}]; rename yours with data.columns")
    return dataset, fmt


def split_eval(dataset: "datasets.Dataset", eval_fraction: float, seed: int
               ) -> tuple["datasets.Dataset", "datasets.Dataset | None"]:
    """Hold out ``round(len * eval_fraction)`` rows (at least 1) for evaluation, chosen by ``seed``.

    Deterministic for a given dataset, fraction and seed; both parts keep the file's row order. A fraction of 0
    returns ``(dataset, None)``.
    """
    if isinstance(eval_fraction, bool) or not isinstance(eval_fraction, (int, float)) \
            or not math.isfinite(eval_fraction) or not 0 <= eval_fraction <= 0.5:
        raise FinetuneHelperError("data.eval_fraction", f"must be a number in [0, 0.5], got {eval_fraction!r}")
    if eval_fraction == 0:
        return dataset, None
    n = len(dataset)
    n_eval = max(1, round(n * eval_fraction))
    if n - n_eval < 1:
        raise FinetuneHelperError("data.eval_fraction", f"{n} rows are too few to hold out {eval_fraction}; "
                                                        "set it to 0 or add data")
    order = list(range(n))
    random.Random(seed).shuffle(order)
    eval_idx = sorted(order[:n_eval])
    train_idx = sorted(order[n_eval:])
    return dataset.select(train_idx), dataset.select(eval_idx)
