"""finetune_helper.train.data with real `datasets` and a real TRL SFTTrainer (tiny model, CPU, offline).

The end-to-end tests check what TRL 1.16 actually trains on: after preparation the processed train dataset holds
``input_ids`` and ``labels`` (TRL folds ``completion_mask`` / ``assistant_masks`` into ``labels`` = -100 and drops
the mask columns), so "loss-bearing tokens" are the positions whose label is not -100.
"""

from __future__ import annotations

import json
import re

import pytest

from finetune_helper.train import data as dio
from finetune_helper.errors import FinetuneHelperError

#: integration tier (make test-integration): real torch / transformers / trainer / server work
pytestmark = pytest.mark.integration

datasets = pytest.importorskip("datasets")

SYSTEM = "Be brief."
ALPACA = [
    {"instruction": "What is 12 + 30?", "input": "", "output": "42"},
    {"instruction": "Add the numbers.", "input": "7 and 8", "output": "15", "system": SYSTEM},
    {"instruction": "Reverse the digits 123.", "input": "", "output": "321"},
]
SHAREGPT = [
    {"conversations": [{"from": "system", "value": SYSTEM}, {"from": "human", "value": "What is 1 + 1?"},
                       {"from": "gpt", "value": "2"}]},
    {"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"},
                       {"from": "human", "value": "What is 2 + 2?"}, {"from": "gpt", "value": "4"}]},
]
MESSAGES = [
    {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello there"},
                  {"role": "user", "content": "What is 3 + 4?"}, {"role": "assistant", "content": "7"}]},
    {"messages": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "What is 5 + 5?"},
                  {"role": "assistant", "content": "10"}]},
]
PROMPT_COMPLETION = [
    {"prompt": "What is 6 + 6? ", "completion": "12"},
    {"prompt": "What is 9 + 1? ", "completion": "10"},
]
PROMPT_COMPLETION_CHAT = [
    {"prompt": [{"role": "user", "content": "What is 6 + 6?"}], "completion": [{"role": "assistant", "content": "12"}]},
]
TEXT = [{"text": "User: What is 2 + 2?\nAssistant: 4"}, {"text": "User: What is 1 + 2?\nAssistant: 3"}]
ROWS = {"alpaca": ALPACA, "sharegpt": SHAREGPT, "messages": MESSAGES, "prompt_completion": PROMPT_COMPLETION,
        "text": TEXT}
FLAT = ("alpaca", "prompt_completion", "text")


def write(path, rows):
    """Write rows by suffix (.jsonl, .json, .csv, .parquet) and return the path as a string."""
    suffix = path.suffix
    if suffix == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    elif suffix == ".json":
        path.write_text(json.dumps(rows), encoding="utf-8")
    elif suffix == ".csv":
        import csv

        columns = list(dict.fromkeys(k for r in rows for k in r))
        with path.open("w", newline="", encoding="utf-8") as handle:
            writer = csv.DictWriter(handle, fieldnames=columns)
            writer.writeheader()
            writer.writerows(rows)
    elif suffix == ".parquet":
        datasets.Dataset.from_list(rows).to_parquet(str(path))
    else:
        path.write_text("\n".join(map(str, rows)), encoding="utf-8")
    return str(path)


def err(excinfo) -> FinetuneHelperError:
    return excinfo.value


# --------------------------------------------------------------------------------------------------- detection

@pytest.mark.parametrize("columns, example, expected", [
    (["instruction", "output"], None, "alpaca"),
    (["instruction", "input", "output", "system"], None, "alpaca"),
    (["instruction", "input", "output", "text"], None, "alpaca"),  # structured beats a pre-rendered text column
    (["conversations"], None, "sharegpt"),
    (["conversations"], {"conversations": [{"from": "human", "value": "x"}]}, "sharegpt"),
    (["conversations"], {"conversations": [{"role": "user", "content": "x"}]}, "messages"),
    (["messages"], None, "messages"),
    (["messages"], {"messages": [{"from": "human", "value": "x"}]}, "sharegpt"),
    (["prompt", "completion"], None, "prompt_completion"),
    (["prompt", "completion"], PROMPT_COMPLETION_CHAT[0], "prompt_completion"),
    (["text", "id"], None, "text"),
    # a `messages` column that is not a list of turns does not make it chat data: the text column decides
    (["messages", "text"], {"messages": "not turns", "text": "hello"}, "text"),
])
def test_detect_format(columns, example, expected):
    assert dio.detect_format(columns, example) == expected


def test_detect_format_error_lists_columns_and_formats():
    with pytest.raises(FinetuneHelperError) as excinfo:
        dio.detect_format(["question", "answer"])
    e = err(excinfo)
    assert e.field == "data.format"
    assert "columns [answer, question] fit no known format" in e.message
    for fmt in dio.FORMATS:
        assert fmt in e.message
    assert "alpaca (instruction, output[, input" in e.message and "data.columns" in e.message
    assert "\n" not in str(e)


def test_flat_formats_fit_by_column_names_and_conversion_reports_types():
    assert dio.detect_format(["text"], {"text": ["a"]}) == "text"
    with pytest.raises(FinetuneHelperError, match="'text' must be a string, got list"):
        dio.to_trl_example({"text": ["a"]}, "text")
    # a JSON number as the answer is written as a string
    assert dio.to_trl_example({"instruction": "1 + 1?", "output": 2}, "alpaca")["completion"][0]["content"] == "2"
    with pytest.raises(FinetuneHelperError, match="'output' is missing or empty"):
        dio.to_trl_example({"instruction": "q", "output": ""}, "alpaca")


# -------------------------------------------------------------------------------------------------- conversion

def test_alpaca_becomes_conversational_prompt_completion():
    assert dio.to_trl_example(ALPACA[0], "alpaca") == {
        "prompt": [{"role": "user", "content": "What is 12 + 30?"}],
        "completion": [{"role": "assistant", "content": "42"}]}
    assert dio.to_trl_example(ALPACA[1], "alpaca") == {
        "prompt": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "Add the numbers.\n\n7 and 8"}],
        "completion": [{"role": "assistant", "content": "15"}]}
    # CSV/JSON nulls for the optional columns are treated as absent
    assert dio.to_trl_example({"instruction": "a", "input": None, "output": "b", "system": None}, "alpaca") == {
        "prompt": [{"role": "user", "content": "a"}], "completion": [{"role": "assistant", "content": "b"}]}


def test_sharegpt_roles_are_mapped():
    row = {"conversations": [{"from": "system", "value": "s"}, {"from": "human", "value": "q"},
                             {"from": "gpt", "value": "a"}, {"from": "user", "value": "q2"},
                             {"from": "model", "value": "a2"}, {"from": "ChatGPT", "value": "a3"}]}
    assert dio.to_trl_example(row, "sharegpt") == {"messages": [
        {"role": "system", "content": "s"}, {"role": "user", "content": "q"}, {"role": "assistant", "content": "a"},
        {"role": "user", "content": "q2"}, {"role": "assistant", "content": "a2"},
        {"role": "assistant", "content": "a3"}]}


def test_sharegpt_unknown_speaker_is_named():
    row = {"conversations": [{"from": "human", "value": "q"}, {"from": "bot", "value": "a"}]}
    with pytest.raises(FinetuneHelperError) as excinfo:
        dio.to_trl_example(row, "sharegpt")
    assert err(excinfo).field == "data.path"
    assert "conversations[1].from 'bot'" in err(excinfo).message and "human" in err(excinfo).message
    with pytest.raises(FinetuneHelperError, match=r"conversations\[0\]\.from \['human'\] is not a known"):
        dio.to_trl_example({"conversations": [{"from": ["human"], "value": "q"}]}, "sharegpt")  # not a crash


def test_messages_are_validated_and_extra_keys_dropped():
    row = {"messages": [{"role": "user", "content": "q", "name": None}, {"role": "assistant", "content": "a"}]}
    assert dio.to_trl_example(row, "messages") == {"messages": [{"role": "user", "content": "q"},
                                                                {"role": "assistant", "content": "a"}]}
    with pytest.raises(FinetuneHelperError, match=r"messages\[1\]\.role 'bot' is not one of system, user"):
        dio.to_trl_example({"messages": [{"role": "user", "content": "q"}, {"role": "bot", "content": "a"}]},
                           "messages")
    with pytest.raises(FinetuneHelperError, match=r"messages\[0\]\.content must be a string"):
        dio.to_trl_example({"messages": [{"role": "user", "content": 3}]}, "messages")
    with pytest.raises(FinetuneHelperError, match="no assistant turn"):
        dio.to_trl_example({"messages": [{"role": "user", "content": "q"}]}, "messages")
    # a `conversations` column holding role/content turns is messages-shaped
    assert dio.to_trl_example({"conversations": row["messages"]}, "messages")["messages"][1]["role"] == "assistant"


def test_prompt_completion_and_text_pass_through():
    assert dio.to_trl_example({**PROMPT_COMPLETION[0], "id": 1}, "prompt_completion") == PROMPT_COMPLETION[0]
    assert dio.to_trl_example(PROMPT_COMPLETION_CHAT[0], "prompt_completion") == PROMPT_COMPLETION_CHAT[0]
    with pytest.raises(FinetuneHelperError, match="both be strings or both be lists"):
        dio.to_trl_example({"prompt": "q", "completion": [{"role": "assistant", "content": "a"}]},
                           "prompt_completion")
    assert dio.to_trl_example({"text": "hello", "meta": 1}, "text") == {"text": "hello"}


def test_split_at_last_assistant():
    msgs = dio.to_trl_example(MESSAGES[0], "messages")["messages"] + [{"role": "user", "content": "thanks"}]
    out = dio.split_at_last_assistant(msgs)
    assert out["completion"] == [{"role": "assistant", "content": "7"}]
    assert out["prompt"] == msgs[:3]
    with pytest.raises(FinetuneHelperError, match="prompt would be empty"):
        dio.split_at_last_assistant([{"role": "assistant", "content": "a"}])


def test_to_trl_dataset_kwargs_and_note():
    ds = datasets.Dataset.from_list(MESSAGES + [{"messages": MESSAGES[1]["messages"] + [
        {"role": "user", "content": "thanks"}]}])
    kept, kwargs, note = dio.to_trl_dataset(ds, "messages", assistant_mask_supported=True)
    assert kept.column_names == ["messages"] and note is None
    assert kwargs == {"assistant_only_loss": True, "completion_only_loss": False}

    split, kwargs, note = dio.to_trl_dataset(ds, "messages", assistant_mask_supported=False)
    assert split.column_names == ["prompt", "completion"]
    assert kwargs == {"assistant_only_loss": False, "completion_only_loss": True}
    assert "last assistant turn" in note and "{% generation %}" in note
    assert "1 of 3 conversations have earlier assistant turns" in note
    assert "1 conversations end after their last assistant turn" in note
    assert split[0]["completion"] == [{"role": "assistant", "content": "7"}]

    for fmt in ("alpaca", "prompt_completion"):
        _, kwargs, note = dio.to_trl_dataset(datasets.Dataset.from_list(ROWS[fmt]), fmt,
                                             assistant_mask_supported=False)
        assert kwargs == {"assistant_only_loss": False, "completion_only_loss": True} and note is None
    conv, kwargs, _ = dio.to_trl_dataset(datasets.Dataset.from_list(TEXT), "text", assistant_mask_supported=True)
    assert kwargs["dataset_text_field"] == "text" and conv.column_names == ["text"]


def test_to_trl_dataset_names_the_bad_row():
    ds = datasets.Dataset.from_list(SHAREGPT + [{"conversations": [{"from": "human", "value": "q"},
                                                                   {"from": "robot", "value": "a"}]}])
    with pytest.raises(FinetuneHelperError) as excinfo:
        dio.to_trl_dataset(ds, "sharegpt", assistant_mask_supported=True)
    assert err(excinfo).field == "data.path" and err(excinfo).message.startswith("row 2: ")
    assert "'robot'" in err(excinfo).message


# ------------------------------------------------------------------------------------------------------ loading

LOAD_CASES = [(fmt, suffix) for fmt in dio.FORMATS for suffix in (".jsonl", ".json", ".parquet")] + [
    (fmt, ".csv") for fmt in FLAT]


@pytest.mark.parametrize("fmt, suffix", LOAD_CASES)
def test_load_data_detects_every_format_and_file_type(tmp_path, fmt, suffix):
    path = write(tmp_path / f"data{suffix}", ROWS[fmt])
    ds, detected = dio.load_data(path)
    assert detected == fmt
    assert len(ds) == len(ROWS[fmt])
    converted, _, _ = dio.to_trl_dataset(ds, detected, assistant_mask_supported=True)
    assert converted[0] == dio.to_trl_example(ROWS[fmt][0], fmt)


def test_load_data_conversational_prompt_completion(tmp_path):
    ds, fmt = dio.load_data(write(tmp_path / "pc.jsonl", PROMPT_COMPLETION_CHAT))
    assert fmt == "prompt_completion"
    assert dio.to_trl_example(ds[0], fmt) == PROMPT_COMPLETION_CHAT[0]


def test_load_csv_keeps_strings(tmp_path):
    rows = [{"instruction": "Pad 42 to three digits.", "input": "", "output": "042"},
            {"instruction": "What is 1.50 + 1.60?", "input": "NA", "output": "3.10"}]
    ds, fmt = dio.load_data(write(tmp_path / "a.csv", rows))
    assert fmt == "alpaca"
    assert ds["output"] == ["042", "3.10"] and ds["input"] == ["", "NA"]
    bom = tmp_path / "bom.csv"  # as Excel writes it
    bom.write_bytes(b"\xef\xbb\xbf" + (tmp_path / "a.csv").read_bytes())
    assert dio.load_data(str(bom))[0]["output"] == ["042", "3.10"]


def test_load_data_directory(tmp_path):
    (tmp_path / "d").mkdir()
    write(tmp_path / "d" / "part1.jsonl", ALPACA[:2])
    write(tmp_path / "d" / "part2.jsonl", ALPACA[2:])
    ds, fmt = dio.load_data(str(tmp_path / "d"))
    assert fmt == "alpaca" and len(ds) == 3
    write(tmp_path / "d" / "part3.csv", ALPACA)
    with pytest.raises(FinetuneHelperError, match=r"mixes file types \(.csv, .jsonl\)"):
        dio.load_data(str(tmp_path / "d"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FinetuneHelperError, match="has no .json, .jsonl, .csv, .parquet files"):
        dio.load_data(str(tmp_path / "empty"))


def test_load_data_path_errors(tmp_path):
    with pytest.raises(FinetuneHelperError) as excinfo:
        dio.load_data(str(tmp_path / "missing.jsonl"))
    assert err(excinfo).field == "data.path" and err(excinfo).message.startswith("no such file: ")

    txt = write(tmp_path / "data.txt", ["a", "b"])
    with pytest.raises(FinetuneHelperError) as excinfo:
        dio.load_data(txt)
    assert err(excinfo).field == "data.path"
    assert "unsupported file type '.txt'" in err(excinfo).message and ".json, .jsonl, .csv, .parquet" in str(
        excinfo.value)

    (tmp_path / "empty.jsonl").write_text("", encoding="utf-8")
    with pytest.raises(FinetuneHelperError) as excinfo:
        dio.load_data(str(tmp_path / "empty.jsonl"))
    assert err(excinfo).field == "data.path"

    with pytest.raises(FinetuneHelperError, match=r"data.split: a local file has only the 'train' split"):
        dio.load_data(write(tmp_path / "a.jsonl", ALPACA), split="test")
    assert len(dio.load_data(str(tmp_path / "a.jsonl"), split="train[:2]")[0]) == 2


def _gzipped(path):
    """Binary data with a data file's name: JSON Lines gzipped, the name left as it was."""
    import gzip

    path.write_bytes(gzip.compress(json.dumps(ALPACA[0]).encode() + b"\n"))


def _utf16(path):
    """Another encoding: the JSON Lines as Windows Notepad saves "Unicode" (UTF-16 with a byte-order mark)."""
    path.write_bytes(json.dumps(ALPACA[0]).encode("utf-16"))


def _in_folder(make):
    def folder(path):
        path.mkdir()
        write(path / "part1.jsonl", ALPACA)
        make(path / "part2.jsonl")
    return folder


@pytest.mark.parametrize("name, make, expected", [
    ("empty.jsonl", lambda p: p.write_bytes(b""), "{path} is empty"),
    ("empty.json", lambda p: p.write_bytes(b""), "{path} is empty"),
    ("empty.csv", lambda p: p.write_bytes(b""), "{path} is empty"),
    ("empty.parquet", lambda p: p.write_bytes(b""), "{path} is empty"),
    ("blank.jsonl", lambda p: p.write_text("\n\n"), "{path} has no rows"),
    ("gzipped.jsonl", _gzipped, "{path} is not UTF-8 text (byte 0x8b at offset 1)"),
    ("gzipped.csv", _gzipped, "{path} is not UTF-8 text (byte 0x8b at offset 1)"),
    ("utf16.json", _utf16, "{path} is not UTF-8 text (byte 0xff at offset 0)"),
    ("broken.jsonl", lambda p: p.write_text(json.dumps(ALPACA[0]) + "\n{not json\n"),
     "could not read {path} as json: JSON parse error: "),
    ("random.parquet", lambda p: p.write_bytes(bytes(range(256)) * 4),
     "could not read {path} as parquet: Parquet magic bytes not found in footer"),
    ("folder", _in_folder(_gzipped), "{path}/part2.jsonl is not UTF-8 text (byte 0x8b at offset 1)"),
    ("folder", _in_folder(lambda p: p.write_bytes(b"")), None),  # an empty part among others is no data
    ("folder", _in_folder(lambda p: write(p, PROMPT_COMPLETION)),
     "the files in {path} do not all have the same columns: "),
])
def test_unreadable_data_files_are_one_line_field_errors(tmp_path, capfd, name, make, expected):
    """Empty, binary, mis-encoded or broken data files, and folders of them: a field error naming the file and what
    is wrong, in one line, instead of what ``datasets`` raises (StopIteration, DatasetGenerationError, a
    UnicodeDecodeError traceback) and the error line its reader logs first."""
    path = tmp_path / name
    make(path)
    if expected is None:
        assert len(dio.load_data(str(path))[0]) == len(ALPACA)
        return
    with pytest.raises(FinetuneHelperError) as excinfo:
        dio.load_data(str(path))
    e = err(excinfo)
    assert e.field == "data.path" and e.message.startswith(expected.format(path=path)), e.message
    assert "\n" not in str(e) and "Error" not in e.message and "StopIteration" not in e.message
    assert "Failed to" not in capfd.readouterr().err  # datasets' readers log "Failed to load JSON from file ..."


def test_load_data_hub_offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(FinetuneHelperError) as excinfo:
        dio.load_data("finetune-helper-nobody/no-such-dataset")
    e = err(excinfo)
    assert e.field == "data.path"
    assert "could not be loaded as a Hub dataset (offline?)" in e.message and "give a local" in e.message
    assert "\n" not in str(e)


def test_load_data_column_mapping(tmp_path):
    rows = [{"question": "What is 1 + 1?", "answer": "2"}, {"question": "What is 2 + 2?", "answer": "4"}]
    path = write(tmp_path / "qa.jsonl", rows)
    with pytest.raises(FinetuneHelperError) as excinfo:
        dio.load_data(path)
    assert "columns [answer, question]" in err(excinfo).message

    ds, fmt = dio.load_data(path, columns={"question": "instruction", "answer": "output"})
    assert fmt == "alpaca" and set(ds.column_names) == {"instruction", "output"}
    ds, fmt = dio.load_data(path, columns={"question": "prompt", "answer": "completion"})
    assert fmt == "prompt_completion"

    with pytest.raises(FinetuneHelperError) as excinfo:
        dio.load_data(path, columns={"query": "instruction"})
    assert err(excinfo).field == "data.columns"
    assert "query not in the data; columns found: [question, answer]" in err(excinfo).message
    with pytest.raises(FinetuneHelperError, match="two columns named instruction"):
        dio.load_data(path, columns={"question": "instruction", "answer": "instruction"})


def test_load_data_format_override(tmp_path):
    rows = [{"instruction": "q", "output": "a", "text": "q a"}]
    path = write(tmp_path / "both.jsonl", rows)
    assert dio.load_data(path)[1] == "alpaca"
    assert dio.load_data(path, fmt="text")[1] == "text"
    assert dio.load_data(path, fmt="auto")[1] == "alpaca"
    with pytest.raises(FinetuneHelperError) as excinfo:
        dio.load_data(path, fmt="sharegpt")
    e = err(excinfo)
    assert e.field == "data.format" and "format 'sharegpt' needs conversations" in e.message
    assert "columns found: [instruction, output, text]" in e.message
    with pytest.raises(FinetuneHelperError, match="'chatml' is not a known format"):
        dio.load_data(path, fmt="chatml")


# ----------------------------------------------------------------------------------------------------- eval split

def test_split_eval_deterministic():
    ds = datasets.Dataset.from_list([{"text": f"row {i}"} for i in range(100)])
    train, ev = dio.split_eval(ds, 0.1, seed=3)
    train2, ev2 = dio.split_eval(ds, 0.1, seed=3)
    assert len(ev) == 10 and len(train) == 90
    assert ev["text"] == ev2["text"] and train["text"] == train2["text"]
    assert set(train["text"]).isdisjoint(ev["text"]) and set(train["text"]) | set(ev["text"]) == set(ds["text"])
    assert ev["text"] != dio.split_eval(ds, 0.1, seed=4)[1]["text"]
    assert train["text"] == sorted(train["text"], key=lambda t: int(t.split()[1]))  # file order kept
    assert dio.split_eval(ds, 0, seed=0) == (ds, None)
    assert len(dio.split_eval(ds.select(range(3)), 0.01, seed=0)[1]) == 1  # at least one row


@pytest.mark.parametrize("bad", [-0.1, 0.51, 1, float("nan"), "0.1", True])
def test_split_eval_rejects_bad_fraction(bad):
    ds = datasets.Dataset.from_list([{"text": "a"}, {"text": "b"}])
    with pytest.raises(FinetuneHelperError) as excinfo:
        dio.split_eval(ds, bad, seed=0)
    assert err(excinfo).field == "data.eval_fraction" and "[0, 0.5]" in err(excinfo).message


def test_split_eval_too_few_rows():
    with pytest.raises(FinetuneHelperError, match="too few"):
        dio.split_eval(datasets.Dataset.from_list([{"text": "a"}]), 0.5, seed=0)


# --------------------------------------------------------------------------------- end to end with SFTTrainer

@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(model, tokenizer) of the project's tiny Llama; its chat template has {% generation %} blocks."""
    pytest.importorskip("trl")
    from finetune_helper.train.tiny import load_tiny

    return load_tiny(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module")
def plain_tokenizer(tiny):
    """The tiny tokenizer with its chat template stripped of the {% generation %} blocks."""
    import copy

    tok = copy.deepcopy(tiny[1])
    tok.chat_template = re.sub(r"\{%-?\s*(end)?generation\s*-?%\}", "", tok.chat_template)
    assert "{% generation" not in tok.chat_template and "endgeneration" not in tok.chat_template
    return tok


def prepared(tmp_path, model, tokenizer, dataset, trl_kwargs):
    """The train dataset as a real SFTTrainer prepared it."""
    from trl import SFTConfig, SFTTrainer

    args = SFTConfig(output_dir=str(tmp_path / "out"), use_cpu=True, bf16=False, fp16=False, report_to="none",
                     max_length=256, activation_checkpointing=False, gradient_checkpointing=False,
                     dataset_num_proc=None, **trl_kwargs)
    assert not args.gradient_checkpointing and not args.activation_checkpointing
    trainer = SFTTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer)
    return trainer.train_dataset


def runs(tokenizer, ids, labels):
    """The sequence cut into maximal runs of trained / untrained tokens: [(trained, decoded text), ...]."""
    out: list[tuple[bool, list[int]]] = []
    for token, label in zip(ids, labels):
        trained = label != -100
        if trained:
            assert label == token
        if out and out[-1][0] == trained:
            out[-1][1].append(token)
        else:
            out.append((trained, [token]))
    return [(trained, tokenizer.decode(tokens)) for trained, tokens in out]


def trained_texts(tokenizer, row):
    return [text for trained, text in runs(tokenizer, row["input_ids"], row["labels"]) if trained]


def answers(messages):
    return [m["content"] for m in messages if m["role"] == "assistant"]


def test_assistant_mask_support(tiny, plain_tokenizer):
    import copy

    from trl.chat_template_utils import qwen2_5_chat_template

    assert dio.chat_template_supports_assistant_mask(tiny[1]) is True
    assert dio.chat_template_supports_assistant_mask(plain_tokenizer) is False
    none = copy.deepcopy(plain_tokenizer)
    none.chat_template = None
    assert dio.chat_template_supports_assistant_mask(none) is False
    # a template TRL 1.16 swaps for its own training template (Qwen 2.5 here) counts as supported
    qwen = copy.deepcopy(plain_tokenizer)
    qwen.chat_template = qwen2_5_chat_template
    assert "{% generation" not in qwen2_5_chat_template and "{%- generation" not in qwen2_5_chat_template
    assert dio.chat_template_supports_assistant_mask(qwen) is True


@pytest.mark.parametrize("fmt", dio.FORMATS)
def test_sft_trainer_trains_on_answers_only(tmp_path, tiny, fmt):
    model, tok = tiny
    eos = tok.eos_token
    suffix = ".csv" if fmt in FLAT else ".jsonl"
    raw, detected = dio.load_data(write(tmp_path / f"data{suffix}", ROWS[fmt]))
    assert detected == fmt
    data, kwargs, note = dio.to_trl_dataset(raw, fmt, assistant_mask_supported=
                                            dio.chat_template_supports_assistant_mask(tok))
    assert note is None
    ds = prepared(tmp_path, model, tok, data, kwargs)
    assert len(ds) == len(ROWS[fmt])
    assert not {"completion_mask", "assistant_masks"} & set(ds.column_names)  # folded into labels by TRL 1.16
    for row, source in zip(ds, data):
        got = trained_texts(tok, row)
        if fmt == "text":  # language modelling: every token, plus the EOS TRL appends
            assert row["labels"] == row["input_ids"]
            assert got == [source["text"] + eos]
        elif fmt == "prompt_completion":  # plain strings: completion + EOS; the prompt untrained
            assert got == [source["completion"] + eos]
            assert runs(tok, row["input_ids"], row["labels"])[0] == (False, source["prompt"])
        elif fmt == "alpaca":  # chat-rendered prompt untrained; the answer, its end-of-turn token and newline trained
            assert got == [source["completion"][0]["content"] + eos + "\n"]
            prompt_text = tok.apply_chat_template(source["prompt"], tokenize=False, add_generation_prompt=True)
            assert runs(tok, row["input_ids"], row["labels"])[0] == (False, prompt_text)
        else:  # sharegpt, messages: every assistant turn (content + end-of-turn) and nothing else
            assert kwargs["assistant_only_loss"] is True
            assert got == [a + eos for a in answers(source["messages"])]
            assert len(got) == sum(m["role"] == "assistant" for m in source["messages"])


def test_sft_trainer_conversational_prompt_completion(tmp_path, tiny):
    model, tok = tiny
    raw, fmt = dio.load_data(write(tmp_path / "pc.jsonl", PROMPT_COMPLETION_CHAT))
    data, kwargs, _ = dio.to_trl_dataset(raw, fmt, assistant_mask_supported=True)
    row = prepared(tmp_path, model, tok, data, kwargs)[0]
    assert trained_texts(tok, row) == ["12" + tok.eos_token + "\n"]


@pytest.mark.parametrize("fmt", ["messages", "sharegpt"])
def test_without_generation_tags_only_the_last_answer_is_trained(tmp_path, tiny, plain_tokenizer, fmt):
    model, _ = tiny
    tok = plain_tokenizer
    raw, detected = dio.load_data(write(tmp_path / "chat.jsonl", ROWS[fmt]))
    assert detected == fmt
    supported = dio.chat_template_supports_assistant_mask(tok)
    assert supported is False
    data, kwargs, note = dio.to_trl_dataset(raw, fmt, assistant_mask_supported=supported)
    assert note and "split at its last assistant turn" in note and "1 of 2 conversations" in note
    assert kwargs == {"assistant_only_loss": False, "completion_only_loss": True}
    ds = prepared(tmp_path, model, tok, data, kwargs)
    for row, source in zip(ds, ROWS[fmt]):
        converted = dio.to_trl_example(source, fmt)["messages"]
        assert trained_texts(tok, row) == [answers(converted)[-1] + tok.eos_token + "\n"]
        earlier = answers(converted)[:-1]
        untrained = "".join(text for trained, text in runs(tok, row["input_ids"], row["labels"]) if not trained)
        assert all(a in untrained for a in earlier)  # earlier answers are context only


def test_assistant_only_loss_needs_generation_tags(tmp_path, tiny, plain_tokenizer):
    """Why the split exists: TRL 1.16 refuses assistant_only_loss with a template it can't make training-ready."""
    data, _, _ = dio.to_trl_dataset(datasets.Dataset.from_list(MESSAGES), "messages", assistant_mask_supported=True)
    with pytest.raises(ValueError, match="not training-compatible"):
        prepared(tmp_path, tiny[0], plain_tokenizer, data, {"assistant_only_loss": True})
