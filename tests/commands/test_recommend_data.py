"""``recommend --data`` (and ``export --data``) through the real CLI entry point: the data block of ``--json``, the
plan's steps from the examples SFTTrainer trains on (or the packed rows with ``--packing``), the seq_len from the
data's max_length unless ``--seq-len`` is given, the data section of the text output within the terminal width, and
bad input as one line naming the flag.

Reading data loads ``datasets`` and the tokenizer: those tests are integration; the flag check that refuses before
anything is read is unit."""

from __future__ import annotations

import json
import math
import re
import random
from pathlib import Path

import pytest

from finetune_helper import cli
from finetune_helper.train.tiny import format_example

TINY_BASE = str(Path(__file__).resolve().parents[2] / "finetune_helper" / "train" / "tiny-base")
BASE = ["--model", TINY_BASE, "--gpu", "16GiB"]
integration = pytest.mark.integration


def main(capsys, *argv: str) -> tuple[int, str, str]:
    try:
        code = cli.main(list(argv)) or 0
    except SystemExit as exc:
        code = exc.code
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """500 alpaca examples of varied length (a skewed run of digits after an addition question)."""
    rng = random.Random(0)
    path = tmp_path_factory.mktemp("data") / "train.jsonl"
    with path.open("w", encoding="utf-8") as f:
        for _ in range(500):
            a, b = rng.randrange(10, 100), rng.randrange(10, 100)
            filler = "".join(str(rng.randrange(10)) for _ in range(int(rng.expovariate(1 / 25))))
            f.write(json.dumps(format_example(f"What is {a} + {b}? {filler}".strip(), str(a + b))) + "\n")
    return path


def steps(size: int, plan: dict) -> int:
    return max(1, math.ceil(math.ceil(size / plan["effective_batch_size"]) * 3))  # recommend's default: 3 epochs


def test_dataset_size_and_data_together_is_one_line(capsys, tmp_path):
    code, out, err = main(capsys, "recommend", *BASE, "--data", str(tmp_path / "x.jsonl"), "--dataset-size", "5")
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and "--dataset-size" in err and "--data" in err


@integration
def test_json_has_the_data_block_and_the_plan_follows_it(capsys, data):
    code, out, _ = main(capsys, "recommend", *BASE, "--data", str(data), "--json")
    assert code == 0
    plan = json.loads(out)
    block = plan["data"]
    assert block["examples"] == 500 and not block["sampled"] and block["format"] == "alpaca"
    assert block["tokenizer"] == TINY_BASE and block["approximation"] is None
    assert plan["seq_len"] == block["recommended_max_length"] == block["max_length"] == block["tokens"]["p99"]
    assert block["max_length_source"] == "p99" and block["truncated_share"] <= 0.01
    assert plan["total_steps"] == steps(block["trained_examples"], plan)
    assert f"{block['trained_examples']} examples" in plan["reasons"]["total_steps"]
    assert block["padding"]["batch"] == plan["per_device_train_batch_size"] and 0 < block["padding"]["waste"] < 1
    assert block["packing"]["rows"] < 500 and sum(bar["count"] for bar in block["histogram"]) == 500
    assert set(block["percentile_bounds_95"]) == {"p50", "p90", "p99"}


@integration
def test_packing_counts_the_packed_rows_and_seq_len_wins(capsys, data):
    code, out, _ = main(capsys, "recommend", *BASE, "--data", str(data), "--packing", "--seq-len", "128", "--json")
    assert code == 0
    plan = json.loads(out)
    block = plan["data"]
    assert plan["seq_len"] == block["max_length"] == 128 and block["max_length_given"]
    assert block["recommended_max_length"] == block["tokens"]["p99"] != 128
    rows = block["packing"]["rows"]
    assert rows < 500 and plan["total_steps"] == steps(rows, plan)
    assert f"{rows} packed rows of 128 tokens" in plan["reasons"]["total_steps"]
    assert block["dropped_share"] <= block["truncated_share"] < 0.05


@integration
def test_the_data_section_fits_the_terminal(capsys, monkeypatch, data):
    monkeypatch.setenv("COLUMNS", "80")
    code, out, _ = main(capsys, "recommend", *BASE, "--data", str(data), "--seq-len", "40")
    assert code == 0
    section = out[out.index("\ndata: "):]
    assert all(len(line) <= 80 for line in out.splitlines())
    text = " ".join(section.split())
    for part in ("500 examples", "tokenized as TRL's SFTTrainer tokenizes them", "max_length 40 (--seq-len)",
                 "are longer and truncated", "SFTTrainer drops those", "padding at micro-batch",
                 "packing (TRL's bfd) into rows of 40 tokens", "examples SFTTrainer trains on"):
        assert part in text, part


@integration
def test_export_takes_the_data_too(capsys, data):
    code, out, err = main(capsys, "export", *BASE, "--data", str(data), "--format", "json")
    assert code == 0
    args = json.loads(out)
    code, rec, _ = main(capsys, "recommend", *BASE, "--data", str(data), "--json")
    assert args["max_length"] == json.loads(rec)["seq_len"]
    assert "# data: " in err and "examples trained" in err


@integration
@pytest.mark.parametrize("extra, flag", [
    (["--data", "/no/such/file.jsonl"], "--data: no such file"),
    (["--data-split", "validation"], "--data-split: "),
    (["--data-config", "x"], "--data-config: "),
    (["--data-sample", "-3"], "--data-sample: "),
    (["--seq-len", "100000"], "--seq-len: "),  # beyond the model's 256, refused before the data is read
])
def test_bad_data_input_is_one_line_naming_the_flag(capsys, data, extra, flag):
    argv = ["recommend", *BASE, *(["--data", str(data)] if extra[0] != "--data" else []), *extra]
    code, out, err = main(capsys, *argv)
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and flag in err, err


@integration
def test_packing_left_open_is_chosen_by_the_predicted_time_on_this_data(capsys, data):
    """Without --packing / --no-packing, --data plans both ways: packed where it is predicted faster for this data and
    a variable-length attention kernel runs (flash_attention_2 on a GPU), otherwise unpacked with the reason."""
    a100 = ["--model", TINY_BASE, "--gpu", "A100 80GB", "--data", str(data), "--json"]
    flash = [*a100, "--attn-implementation", "flash_attention_2"]
    runs = {name: json.loads(main(capsys, "recommend", *argv)[1]) for name, argv in (
        ("flash", flash), ("flash-packed", [*flash, "--packing"]), ("flash-unpacked", [*flash, "--no-packing"]),
        ("sdpa", a100), ("cpu", [*flash, "--device", "cpu"]))}
    chosen = runs["flash"]["data"]["packing"]
    assert chosen["choice"] == "packed" and runs["flash"]["packing"]
    times = re.findall(r"packed ([\d.]+) s against unpacked ([\d.]+) s", chosen["choice_reason"])
    assert times and float(times[0][0]) < float(times[0][1]), chosen["choice_reason"]
    # the packed plan is the one --packing gives; --packing / --no-packing leave nothing to choose
    same = ("per_device_train_batch_size", "gradient_accumulation_steps", "total_steps", "seq_len")
    assert all(runs["flash"][k] == runs["flash-packed"][k] for k in same)
    assert runs["flash"]["total_steps"] < runs["flash-unpacked"]["total_steps"]
    assert runs["flash-packed"]["data"]["packing"]["choice"] is None is runs["flash-unpacked"]["data"]["packing"][
        "choice"]
    # SDPA attends a packed row as one masked sequence (quadratic in its length), the CPU has no varlen kernel
    assert runs["sdpa"]["data"]["packing"]["choice"] == "unpacked" and not runs["sdpa"]["packing"]
    cpu = runs["cpu"]["data"]["packing"]
    assert cpu["choice"] == "unpacked" and "flash_attention_2 on the CPU has no variable-length kernel" in cpu[
        "choice_reason"], cpu["choice_reason"]
