"""The app's workspace confines typed paths: real folders, real files and real symlinks in tmp_path, no mocks."""

from __future__ import annotations

from pathlib import Path

import pytest

from finetune_helper.errors import FinetuneHelperError
from finetune_helper.train.tiny import synthetic_dataset, write_dataset
from finetune_helper.runs.workspace import Workspace


@pytest.fixture
def ws(tmp_path) -> Workspace:
    return Workspace(tmp_path / "ws")


@pytest.fixture
def outside(tmp_path) -> Path:
    """A folder next to the workspace (not in it) holding a real dataset and a real model folder."""
    folder = tmp_path / "outside"
    write_dataset(folder / "secret.jsonl", synthetic_dataset(5))
    (folder / "model").mkdir()
    (folder / "model" / "config.json").write_text('{"model_type": "llama"}')
    return folder


def refused(call, field: str, ws: Workspace) -> FinetuneHelperError:
    """``call()`` raises a FinetuneHelperError for ``field`` whose message names the workspace."""
    with pytest.raises(FinetuneHelperError) as err:
        call()
    assert err.value.field == field, err.value
    return err.value


def assert_outside(err: FinetuneHelperError, ws: Workspace) -> None:
    assert str(ws.root) in err.message and "outside the workspace" in err.message, err.message


# ------------------------------------------------------------------------------------------- path
def test_workspace_creates_its_folders(tmp_path):
    ws = Workspace(tmp_path / "a" / "b")
    assert ws.root == (tmp_path / "a" / "b").resolve()
    assert ws.uploads.is_dir() and ws.runs.is_dir()
    assert ws.uploads.parent == ws.root and ws.runs.parent == ws.root


@pytest.mark.parametrize("field", ["dataset path", "model.name"])
def test_absolute_path_outside_is_refused(ws, outside, field):
    err = refused(lambda: ws.path(str(outside / "secret.jsonl"), field), field, ws)
    assert_outside(err, ws)
    assert_outside(refused(lambda: ws.path("/etc/passwd", field), field, ws), ws)


@pytest.mark.parametrize("text", ["../outside/secret.jsonl", "uploads/../../outside/secret.jsonl", "..",
                                  "runs/../../../etc/passwd"])
def test_dotdot_escape_is_refused(ws, outside, text):
    assert_outside(refused(lambda: ws.path(text, "f"), "f", ws), ws)


@pytest.mark.parametrize("text", ["~", "~/", "~/secret.jsonl"])
def test_home_is_refused(ws, text):
    err = refused(lambda: ws.path(text, "data.path"), "data.path", ws)
    assert_outside(err, ws)


def test_symlink_inside_pointing_outside_is_refused(ws, outside):
    (ws.root / "link-file.jsonl").symlink_to(outside / "secret.jsonl")
    (ws.root / "link-dir").symlink_to(outside, target_is_directory=True)
    (ws.uploads / "nested").symlink_to(outside, target_is_directory=True)
    for text in ["link-file.jsonl", "link-dir", "link-dir/secret.jsonl", str(ws.root / "link-dir" / "secret.jsonl"),
                 "uploads/nested/secret.jsonl"]:
        assert_outside(refused(lambda: ws.path(text, "dataset path"), "dataset path", ws), ws)


def test_symlink_inside_pointing_inside_is_allowed(ws):
    target = write_dataset(ws.uploads / "real.jsonl", synthetic_dataset(3))
    (ws.root / "alias.jsonl").symlink_to(target)
    assert ws.path("alias.jsonl", "f") == target


def test_paths_inside_resolve_relative_and_absolute(ws):
    target = write_dataset(ws.uploads / "train.jsonl", synthetic_dataset(3))
    assert ws.path("uploads/train.jsonl", "f") == target
    assert ws.path("  uploads/train.jsonl  ", "f") == target  # typed with spaces around
    assert ws.path(str(target), "f") == target
    assert ws.path("runs/../uploads/train.jsonl", "f") == target  # .. that stays inside is fine
    assert ws.path("./uploads/./train.jsonl", "f") == target
    assert ws.path("not-yet-there.jsonl", "f") == ws.root / "not-yet-there.jsonl"  # existence is the caller's call
    assert ws.path(".", "f") == ws.root
    assert ws.path(str(ws.root), "f") == ws.root


def test_workspace_reached_through_a_symlink_still_confines(tmp_path, outside):
    real = Workspace(tmp_path / "real-ws")
    (tmp_path / "ws-link").symlink_to(real.root, target_is_directory=True)
    via_link = Workspace(tmp_path / "ws-link")
    assert via_link.root == real.root
    target = write_dataset(real.uploads / "d.jsonl", synthetic_dataset(3))
    assert via_link.path(str(tmp_path / "ws-link" / "uploads" / "d.jsonl"), "f") == target
    assert_outside(refused(lambda: via_link.path(str(outside / "secret.jsonl"), "f"), "f", via_link), via_link)


# ------------------------------------------------------------------------------------------- data_source
def test_data_source_builtin(ws):
    assert ws.data_source("builtin:arithmetic") == "builtin:arithmetic"
    assert ws.data_source("  builtin:arithmetic ") == "builtin:arithmetic"
    err = refused(lambda: ws.data_source("builtin:poetry"), "data.path", ws)
    assert "builtin:poetry" in err.message and "builtin:arithmetic" in err.message
    refused(lambda: ws.data_source("builtin:poetry", field="dataset path"), "dataset path", ws)


@pytest.mark.parametrize("hub_id", ["tatsu-lab/alpaca", "HuggingFaceH4/ultrachat_200k", "yahma/alpaca-cleaned"])
def test_data_source_hub_id_passes_through_unchanged(ws, hub_id):
    assert ws.data_source(hub_id) == hub_id


def test_data_source_empty_is_refused(ws):
    for text in ["", "   ", None]:
        refused(lambda: ws.data_source(text, field="dataset path"), "dataset path", ws)


def test_data_source_missing_file_is_refused(ws):
    for text in ["missing.jsonl", "uploads/missing.csv", str(ws.root / "missing.parquet")]:
        err = refused(lambda: ws.data_source(text), "data.path", ws)
        assert "no such file in the workspace" in err.message and str(ws.root) in err.message


def test_data_source_non_data_suffix_is_refused(ws):
    (ws.root / "notes.txt").write_text("instruction,output\n1,2\n")
    (ws.root / "recipe.yaml").write_text("model: {name: x}\n")
    for name in ("notes.txt", "recipe.yaml"):
        err = refused(lambda: ws.data_source(name, field="dataset path"), "dataset path", ws)
        assert name in err.message and ".jsonl" in err.message


@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".csv", ".parquet"])
def test_data_source_existing_file_returns_the_absolute_path(ws, suffix):
    target = write_dataset(ws.uploads / f"train{suffix}", synthetic_dataset(4))
    for text in (f"uploads/train{suffix}", str(target), f"./uploads/train{suffix}"):
        got = ws.data_source(text)
        assert got == str(target) and Path(got).is_absolute()


def test_data_source_file_at_the_root_without_a_slash_is_local(ws):
    target = write_dataset(ws.root / "train.jsonl", synthetic_dataset(4))
    assert ws.data_source("train.jsonl") == str(target)


def test_data_source_hub_shaped_name_that_exists_in_the_workspace_is_the_local_folder(ws):
    folder = ws.root / "tatsu-lab" / "alpaca"
    write_dataset(folder / "part.jsonl", synthetic_dataset(4))
    assert ws.data_source("tatsu-lab/alpaca") == str(folder)


def test_data_source_outside_is_refused(ws, outside):
    for text in (str(outside / "secret.jsonl"), "../outside/secret.jsonl", "~/x.jsonl"):
        assert_outside(refused(lambda: ws.data_source(text, field="dataset path"), "dataset path", ws), ws)
    (ws.root / "leak.jsonl").symlink_to(outside / "secret.jsonl")
    assert_outside(refused(lambda: ws.data_source("leak.jsonl"), "data.path", ws), ws)


def test_data_source_folder_with_a_symlink_pointing_outside_is_refused(ws, outside):
    (ws.root / "data").mkdir()
    write_dataset(ws.root / "data" / "a.jsonl", synthetic_dataset(3))
    (ws.root / "data" / "b.jsonl").symlink_to(outside / "secret.jsonl")
    refused(lambda: ws.data_source("data"), "data.path", ws)


def test_data_source_accepts_upper_case_suffixes_like_the_runner(ws):
    target = write_dataset(ws.uploads / "Export.CSV", synthetic_dataset(4))
    assert ws.data_source("uploads/Export.CSV") == str(target)


def test_nul_byte_in_a_typed_path_is_a_field_error(ws):
    with pytest.raises(FinetuneHelperError) as err:
        ws.data_source("uploads/a\x00b.jsonl", field="dataset path")
    assert err.value.field == "dataset path"


# ------------------------------------------------------------------------------------------- model_source
@pytest.mark.parametrize("name", ["meta-llama/Llama-3.1-8B", "Llama-3.1-8B", "Qwen/Qwen2.5-0.5B"])
def test_model_source_catalog_names_pass_through(ws, name):
    assert ws.model_source(name) == name


@pytest.mark.parametrize("name", ["someone/my-finetune", "org.name/model_v1.5", "7B"])
def test_model_source_hub_ids_and_sizes_pass_through(ws, name):
    assert ws.model_source(name) == name


def test_model_source_builtin(ws):
    assert ws.model_source("builtin:tiny-llama") == "builtin:tiny-llama"
    err = refused(lambda: ws.model_source("builtin:huge-llama"), "model.name", ws)
    assert "builtin:tiny-llama" in err.message


def test_model_source_empty_is_refused(ws):
    refused(lambda: ws.model_source("  "), "model.name", ws)


def test_model_source_folder_without_config_is_refused(ws):
    (ws.root / "models" / "empty").mkdir(parents=True)
    (ws.root / "models" / "empty" / "model.safetensors").write_bytes(b"\0")
    for text in ("models/empty", str(ws.root / "models" / "empty"), "./models/empty"):
        err = refused(lambda: ws.model_source(text), "model.name", ws)
        assert "config.json" in err.message
    refused(lambda: ws.model_source("./models/missing", field="model"), "model", ws)


def test_model_source_folder_with_config_returns_the_absolute_path(ws):
    folder = ws.root / "models" / "mine"
    folder.mkdir(parents=True)
    (folder / "config.json").write_text('{"model_type": "llama"}')
    for text in ("models/mine", "./models/mine", str(folder), "models/mine/"):
        got = ws.model_source(text)
        assert got == str(folder) and Path(got).is_absolute()


def test_model_source_outside_is_refused(ws, outside):
    for text in ("/etc", str(outside / "model"), "../outside/model", "~"):
        assert_outside(refused(lambda: ws.model_source(text), "model.name", ws), ws)
    (ws.root / "linked-model").symlink_to(outside / "model", target_is_directory=True)
    assert_outside(refused(lambda: ws.model_source("linked-model"), "model.name", ws), ws)


# ------------------------------------------------------------------------------------------- save_upload
def test_save_upload_copies_into_uploads_with_a_safe_name(ws, tmp_path):
    gradio_tmp = tmp_path / "gradio" / "abc123"
    source = write_dataset(gradio_tmp / "my data (v2);rm -rf.jsonl", synthetic_dataset(6))
    target = ws.save_upload(source)
    assert target.parent == ws.uploads and target.is_file()
    assert target.name.endswith("my_data__v2__rm_-rf.jsonl")
    assert all(c.isalnum() or c in "._-" for c in target.name), target.name
    assert target.read_bytes() == source.read_bytes()
    assert source.exists()  # a copy, the upload is left alone
    assert ws.data_source(str(target)) == str(target)  # and the copy is a valid dataset reference


@pytest.mark.parametrize("name", ["notes.txt", "script.py", "archive.jsonl.gz", "noext"])
def test_save_upload_refuses_non_data_suffixes(ws, tmp_path, name):
    source = tmp_path / name
    source.write_text("x")
    err = refused(lambda: ws.save_upload(source), "dataset", ws)
    assert name in err.message
    assert list(ws.uploads.iterdir()) == []  # nothing copied
    refused(lambda: ws.save_upload(source, field="upload"), "upload", ws)


def test_save_upload_never_overwrites_an_earlier_upload(ws, tmp_path):
    targets, contents = [], []
    for i in range(5):  # 5 quick uploads: even if a second boundary falls between two, 3 share a second
        source = write_dataset(tmp_path / f"user{i}" / "train.jsonl", synthetic_dataset(2 + i))
        contents.append(source.read_bytes())
        targets.append(ws.save_upload(source))
    assert len(set(targets)) == 5
    assert [t.read_bytes() for t in targets] == contents


def test_save_upload_accepts_upper_case_suffixes(ws, tmp_path):
    source = write_dataset(tmp_path / "EXPORT.CSV", synthetic_dataset(4))
    assert ws.save_upload(source).is_file()



@pytest.mark.parametrize("name", ["a/b/c", "some folder", "x" * 300, "a/" + "b" * 300])
def test_model_names_that_are_neither_hub_ids_nor_workspace_folders_are_refused(tmp_path, name):
    ws = Workspace(tmp_path / "ws")
    with pytest.raises(FinetuneHelperError) as err:
        ws.model_source(name)
    assert err.value.field == "model.name"


@pytest.mark.parametrize("name", ["7B", "500M", "Qwen/Qwen2.5-7B", "owner/some-model"])
def test_sizes_and_hub_ids_pass(tmp_path, name):
    assert Workspace(tmp_path / "ws").model_source(name) == name


@pytest.mark.parametrize("folder", [".", "runs", "runs/x"])
def test_the_workspace_itself_or_its_runs_is_not_a_dataset(tmp_path, folder):
    ws = Workspace(tmp_path / "ws")
    (ws.runs / "x").mkdir()
    with pytest.raises(FinetuneHelperError, match="holds the workspace's runs"):
        ws.data_source(folder)


def test_overlong_paths_are_a_field_error(tmp_path):
    ws = Workspace(tmp_path / "ws")
    for call in (lambda: ws.path("a" * 300, "dataset path"), lambda: ws.data_source("d/" + "a" * 300 + ".jsonl")):
        with pytest.raises(FinetuneHelperError, match="too long"):
            call()
