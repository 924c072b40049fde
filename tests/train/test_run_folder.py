"""Which checkpoints a run resumes from: folders laid out as transformers' Trainer and the engines under it lay them
out (file and folder names from ``Trainer._save_checkpoint``, accelerate's ``save_fsdp_model`` /
``save_fsdp_optimizer`` and DeepSpeed's ``engine.save_checkpoint``), with real contents where the check reads them
(``trainer_state.json``, DeepSpeed's ``latest``, the run's ``training_args.json``)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from finetune_helper.recommender.zero import deepspeed_config
from finetune_helper.train.recipe import load_recipe
from finetune_helper.train.run_folder import TRAINING_ARGS, checkpoint_problem, last_checkpoint, resume_point

RECIPES = Path(__file__).resolve().parents[2] / "recipes"
#: what ``save_pretrained`` and the Trainer write beside the weights in every layout
COMMON = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json", "training_args.bin")


def safetensors_bytes(n: int = 4096) -> bytes:
    """A whole safetensors file: its header's length, the header placing one tensor of ``n`` bytes, the tensor."""
    header = json.dumps({"w": {"dtype": "U8", "shape": [n], "data_offsets": [0, n]}}).encode()
    return len(header).to_bytes(8, "little") + header + bytes(n)


def torch_archive_bytes() -> bytes:
    """What torch.save writes since PyTorch 1.6: a zip archive (here one small entry)."""
    import io
    import zipfile

    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("archive/data.pkl", b"\x80\x02}q\x00." * 100)
    return buffer.getvalue()


def stand_in(name: str) -> bytes:
    """A stand-in file of ``name``'s kind that opens as that kind (the check reads headers and zip directories)."""
    if name.endswith(".json"):
        return b"{}"
    if name.endswith(".safetensors"):
        return safetensors_bytes()
    if name.endswith((".pt", ".bin", ".pth")):
        return torch_archive_bytes()
    return b"stand-in"


def lay_out(folder: Path, files: list[str], *, step: int, world: int) -> Path:
    """A ``checkpoint-<step>`` of ``world`` ranks: ``files`` (folders made as needed; stand-ins of each file's kind),
    the RNG state of every rank (``_save_rng_state``) and, last, as the Trainer writes it, ``trainer_state.json``."""
    ckpt = folder / f"checkpoint-{step}"
    rng = ["rng_state.pth"] if world == 1 else [f"rng_state_{r}.pth" for r in range(world)]
    for name in [*COMMON, *files, *rng]:
        (ckpt / name).parent.mkdir(parents=True, exist_ok=True)
        (ckpt / name).write_bytes(stand_in(name))
    state = {"global_step": step, "max_steps": 12, "epoch": 0.5, "log_history": [{"loss": 2.5, "step": step}],
             "train_batch_size": 4, "is_world_process_zero": True}
    (ckpt / "trainer_state.json").write_text(json.dumps(state, indent=2))
    return ckpt


def training_args(run_dir: Path, **fields) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / TRAINING_ARGS).write_text(json.dumps({"per_device_train_batch_size": 4, **fields}))


# -------------------------------------------------------------------------------------------- one process, DDP
ONE_PROCESS = ["model.safetensors", "optimizer.pt", "scheduler.pt"]
LORA = ["adapter_model.safetensors", "adapter_config.json", "optimizer.pt", "scheduler.pt"]


@pytest.mark.parametrize("files, world", [(ONE_PROCESS, 1), (ONE_PROCESS, 2), (LORA, 2)], ids=["one", "ddp", "lora"])
def test_a_one_process_or_ddp_checkpoint_is_complete_with_weights_optimizer_pt_and_scheduler_pt(tmp_path, files,
                                                                                                 world):
    training_args(tmp_path)
    ckpt = lay_out(tmp_path, files, step=6, world=world)
    assert checkpoint_problem(ckpt) is None
    (ckpt / "optimizer.pt").unlink()
    assert checkpoint_problem(ckpt) == "no optimizer state"


# -------------------------------------------------------------------------------------------------------- FSDP
#: FULL_STATE_DICT: ``save_model`` writes model.safetensors, then rank 0 ``pytorch_model_fsdp.bin`` and
#: ``optimizer.bin`` (the names transformers' ``_load_optimizer_and_scheduler`` accepts as OPTIMIZER_NAME_BIN)
FSDP_FULL = ["model.safetensors", "pytorch_model_fsdp.bin", "optimizer.bin", "scheduler.pt"]
#: SHARDED_STATE_DICT: no model.safetensors (``save_model`` writes none); a torch.distributed.checkpoint folder for
#: the model and one for the optimizer, each rank's ``__<rank>_0.distcp`` and the coordinator's ``.metadata``
FSDP_SHARDED = ["pytorch_model_fsdp_0/__0_0.distcp", "pytorch_model_fsdp_0/__1_0.distcp",
                "pytorch_model_fsdp_0/.metadata", "optimizer_0/__0_0.distcp", "optimizer_0/__1_0.distcp",
                "optimizer_0/.metadata", "scheduler.pt"]
#: PEFT under FSDP (``adapter_only``): the adapter from ``save_model``, the FSDP files hold the adapter alone
FSDP_LORA = ["adapter_model.safetensors", "adapter_config.json", "pytorch_model_fsdp.bin", "optimizer.bin",
             "scheduler.pt"]


@pytest.mark.parametrize("files", [FSDP_FULL, FSDP_SHARDED, FSDP_LORA], ids=["full", "sharded", "lora"])
def test_an_fsdp_checkpoint_resumes_from_optimizer_bin_or_its_sharded_folders(tmp_path, files):
    training_args(tmp_path, fsdp="full_shard auto_wrap", fsdp_config={"transformer_layer_cls_to_wrap": ["X"]})
    ckpt = lay_out(tmp_path, files, step=6, world=2)
    assert checkpoint_problem(ckpt) is None
    assert last_checkpoint(tmp_path) == ckpt


@pytest.mark.parametrize("missing, why", [
    ("optimizer_0/.metadata", "no FSDP optimizer state"),  # a sharded optimizer save that did not finish
    ("pytorch_model_fsdp_0/.metadata", "no FSDP model state"),
    ("scheduler.pt", "no scheduler state"),
])
def test_an_fsdp_checkpoint_without_a_part_is_incomplete(tmp_path, missing, why):
    ckpt = lay_out(tmp_path, FSDP_SHARDED, step=6, world=2)
    (ckpt / missing).unlink()
    assert checkpoint_problem(ckpt).startswith(why)


def test_an_fsdp_checkpoint_without_optimizer_bin_is_incomplete(tmp_path):
    ckpt = lay_out(tmp_path, [name for name in FSDP_FULL if name != "optimizer.bin"], step=6, world=2)
    assert checkpoint_problem(ckpt).startswith("no FSDP optimizer state")


# --------------------------------------------------------------------------------------------------- DeepSpeed
def deepspeed_files(stage: int, world: int, step: int, *, scheduler_pt: bool) -> list[str]:
    """What a ZeRO ``stage`` run of ``world`` bf16 ranks leaves: the Trainer's gathered 16-bit model.safetensors
    (stage3_gather_16bit_weights_on_model_save, which the shipped configs set), DeepSpeed's ``global_step<N>/``
    with the module states (one file under ZeRO-2, one per rank under ZeRO-3) and each rank's optimizer partition,
    its recovery script and ``latest`` (written by the test after the folder); ``scheduler.pt`` only for the
    Trainer's own scheduler."""
    tag = f"global_step{step}"
    modules = ([f"{tag}/mp_rank_00_model_states.pt"] if stage < 3 else
               [f"{tag}/zero_pp_rank_{r}_mp_rank_00_model_states.pt" for r in range(world)])
    optim = [f"{tag}/bf16_zero_pp_rank_{r}_mp_rank_00_optim_states.pt" for r in range(world)]
    return ["model.safetensors", *modules, *optim, "zero_to_fp32.py", *(["scheduler.pt"] if scheduler_pt else [])]


def deepspeed_checkpoint(run_dir: Path, strategy: str, offload: str, *, scheduler_pt: bool, world: int = 2,
                         step: int = 6) -> Path:
    """A run folder whose training_args.json holds the DeepSpeed config a plan of ``strategy`` / ``offload`` ships,
    and a checkpoint of it."""
    training_args(run_dir, deepspeed=deepspeed_config(strategy, offload))
    ckpt = lay_out(run_dir, deepspeed_files(int(strategy[-1]), world, step, scheduler_pt=scheduler_pt), step=step,
                   world=world)
    (ckpt / "latest").write_text(f"global_step{step}")
    return ckpt


def test_the_shipped_zero3_offload_recipe_resumes_without_scheduler_pt(tmp_path):
    """Its config has an optimizer section (DeepSpeed's CPU Adam under offload): the scheduler is DeepSpeed's,
    saved in global_step<N>/, and the Trainer writes no scheduler.pt."""
    hardware = load_recipe(RECIPES / "llama-3.1-8b-full-2x24gb-zero3-offload.yaml").hardware
    ckpt = deepspeed_checkpoint(tmp_path, hardware.strategy, hardware.offload, scheduler_pt=False)
    assert "optimizer" in json.loads((tmp_path / TRAINING_ARGS).read_text())["deepspeed"]
    assert checkpoint_problem(ckpt) is None
    assert resume_point(tmp_path) == (ckpt, [])


@pytest.mark.parametrize("strategy", ["zero2", "zero3"])
def test_a_zero_checkpoint_without_offload_keeps_the_trainers_scheduler_in_scheduler_pt(tmp_path, strategy):
    ckpt = deepspeed_checkpoint(tmp_path, strategy, "none", scheduler_pt=True)
    assert checkpoint_problem(ckpt) is None
    (ckpt / "scheduler.pt").unlink()
    assert checkpoint_problem(ckpt) == "no scheduler state"


@pytest.mark.parametrize("remove, why", [
    ("latest", "no DeepSpeed 'latest' file (the save was cut short)"),
    ("global_step6/bf16_zero_pp_rank_1_mp_rank_00_optim_states.pt", "DeepSpeed optimizer states of global_step6/ "
                                                                      "miss rank 1"),
    ("global_step6/bf16_zero_pp_rank_0_mp_rank_00_optim_states.pt", "DeepSpeed optimizer states of global_step6/ "
                                                                      "miss rank 0"),
    ("global_step6/zero_pp_rank_1_mp_rank_00_model_states.pt", "DeepSpeed module states of global_step6/ miss rank 1"),
])
def test_a_zero3_checkpoint_missing_a_rank_or_latest_is_incomplete(tmp_path, remove, why):
    ckpt = deepspeed_checkpoint(tmp_path, "zero3", "optimizer", scheduler_pt=False)
    (ckpt / remove).unlink()
    assert checkpoint_problem(ckpt) == why


def test_latest_must_name_a_folder_of_the_checkpoint(tmp_path):
    ckpt = deepspeed_checkpoint(tmp_path, "zero2", "optimizer", scheduler_pt=False)
    (ckpt / "latest").write_text("global_step4")
    assert checkpoint_problem(ckpt) == ("DeepSpeed's 'latest' names 'global_step4', which is not a folder of the "
                                        "checkpoint")


def test_resume_passes_over_a_save_cut_short_to_the_last_complete_sharded_checkpoint(tmp_path):
    """A Stop killed during the save of checkpoint-8 (no trainer_state.json) and a checkpoint-6 of ZeRO-3 with
    offload: resume takes checkpoint-6 and says what checkpoint-8 lacks."""
    older = deepspeed_checkpoint(tmp_path, "zero3", "optimizer", scheduler_pt=False, step=6)
    newer = deepspeed_checkpoint(tmp_path, "zero3", "optimizer", scheduler_pt=False, step=8)
    (newer / "trainer_state.json").unlink()
    start, skipped = resume_point(tmp_path)
    assert start == older
    assert skipped == [(newer, "trainer_state.json is missing or unreadable (the save was cut short)")]


@pytest.mark.integration  # torch's own torch.distributed.checkpoint writes the folder
@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")  # one process, no group: what it says
def test_a_real_torch_distributed_checkpoint_folder_is_finished_by_its_metadata_file(tmp_path):
    """The sharded FSDP layout above, checked against the real writer: ``torch.distributed.checkpoint.save`` (one
    process) leaves its ``.distcp`` data and the ``.metadata`` the rule looks for."""
    import torch
    import torch.distributed.checkpoint as dcp

    ckpt = lay_out(tmp_path, ["scheduler.pt"], step=6, world=1)
    dcp.save({"model": {"w": torch.ones(3)}}, checkpoint_id=str(ckpt / "pytorch_model_fsdp_0"))
    assert checkpoint_problem(ckpt).startswith("no FSDP optimizer state")
    dcp.save({"optimizer": {"state": {"0": {"exp_avg": torch.zeros(3)}}}}, checkpoint_id=str(ckpt / "optimizer_0"))
    assert {p.name for p in (ckpt / "optimizer_0").iterdir()} >= {".metadata"}
    assert any(p.suffix == ".distcp" for p in (ckpt / "optimizer_0").iterdir())
    assert checkpoint_problem(ckpt) is None


# --------------------------------------------------------------------------------------------- damaged files
ONE_PROCESS = ["model.safetensors", "optimizer.pt", "scheduler.pt"]


def cut(file: Path, keep: float = 0.5) -> None:
    data = file.read_bytes()
    file.write_bytes(data[: int(len(data) * keep)])


@pytest.mark.parametrize("damage, why", [
    (lambda c: cut(c / "model.safetensors"), "model.safetensors is shorter than its header says"),
    (lambda c: (c / "model.safetensors").write_bytes(b"\x00" * 3), "model.safetensors has no readable safetensors"),
    (lambda c: cut(c / "optimizer.pt"), "optimizer.pt is not a readable torch archive"),
    (lambda c: cut(c / "scheduler.pt", 0.9), "scheduler.pt is not a readable torch archive"),
    (lambda c: (c / "trainer_state.json").write_text("[]"), "trainer_state.json is not the Trainer's state"),
    (lambda c: (c / "config.json").write_text('{"model_type": "lla'), "config.json is not a JSON object"),
])
def test_a_damaged_newest_checkpoint_is_skipped_for_the_previous_complete_one(tmp_path, damage, why):
    run = tmp_path / "run"
    lay_out(run, ONE_PROCESS, step=2, world=1)
    newest = lay_out(run, ONE_PROCESS, step=4, world=1)
    assert checkpoint_problem(newest) is None
    damage(newest)
    assert why in (checkpoint_problem(newest) or "")
    start, skipped = resume_point(run)
    assert start.name == "checkpoint-2" and [p.name for p, _ in skipped] == ["checkpoint-4"]


def test_a_legacy_pickle_checkpoint_file_is_not_taken_for_a_damaged_archive(tmp_path):
    ckpt = lay_out(tmp_path / "run", ONE_PROCESS, step=2, world=1)
    (ckpt / "optimizer.pt").write_bytes(b"\x80\x02}q\x00.")  # torch.save before 1.6: a plain pickle
    assert checkpoint_problem(ckpt) is None
