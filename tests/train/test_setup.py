"""The one seam: the setup the runner loads the model from is the setup it estimates (pure Python)."""

from __future__ import annotations

from finetune_helper.recommender.catalog import find_model
from finetune_helper.recommender.model import ModelSpec
from finetune_helper.train.recipe import recipe_from_dict
from finetune_helper.train.setup import executed_setup

SPEC = ModelSpec.from_config(find_model("Qwen/Qwen2.5-0.5B")["config"], name="Qwen/Qwen2.5-0.5B")
ARGS = {"per_device_train_batch_size": 4, "max_length": 512, "bf16": True, "optim": "adamw_torch_fused",
        "activation_checkpointing": True}


def recipe(method: dict, **data):
    return recipe_from_dict({"model": {"name": "Qwen/Qwen2.5-0.5B"}, "method": method,
                             "data": {"path": "train.jsonl", **data}})


def test_mixed_precision_full_fine_tuning_loads_fp32_masters():
    setup = executed_setup(recipe({"type": "full"}), SPEC, ARGS, device="cuda")
    assert (setup.load_dtype, setup.dtype, setup.master_bytes) == ("fp32", "bf16", 4)
    assert (setup.micro_batch_size, setup.seq_len, setup.gradient_checkpointing, setup.optim) == (
        4, 512, True, "adamw_torch_fused")
    assert setup.padded and not setup.packing and setup.device == "cuda"


def test_pure_bf16_comes_from_the_plan_or_the_recipe_and_only_in_bf16_runs():
    assert executed_setup(recipe({"type": "full"}), SPEC, ARGS, device="cuda", weights_dtype="bf16").load_dtype == "bf16"
    assert executed_setup(recipe({"type": "full", "weights_dtype": "bf16"}), SPEC, ARGS,
                          device="cuda").load_dtype == "bf16"
    cpu_fp32 = {**ARGS, "bf16": False, "use_cpu": True}
    assert executed_setup(recipe({"type": "full"}), SPEC, cpu_fp32, device="cpu", weights_dtype="bf16").load_dtype == \
        "fp32"


def test_lora_loads_its_base_in_the_compute_dtype_with_the_recipes_adapter_settings():
    setup = executed_setup(recipe({"type": "lora", "lora_r": 8, "lora_dropout": 0.1,
                                   "target_modules": ["q_proj", "v_proj"]}), SPEC, ARGS, device="cuda")
    assert setup.load_dtype == "bf16" and setup.lora_r == 8 and setup.lora_dropout == 0.1
    assert setup.lora_target_modules == ("q_proj", "v_proj")


def test_packing_is_one_row_of_every_packed_sequence_and_a_batch_shape_wins():
    packed = executed_setup(recipe({"type": "full"}, packing=True), SPEC, ARGS, device="cuda")
    assert (packed.micro_batch_size, packed.seq_len, packed.padded, packed.packing) == (1, 4 * 512, False, True)
    seen = executed_setup(recipe({"type": "full"}), SPEC, ARGS, device="cpu", batch_shape=(4, 300), padded=False)
    assert (seen.micro_batch_size, seen.seq_len, seen.padded, seen.device) == (4, 300, False, "cpu")


def test_label_smoothing_takes_the_full_logits_path():
    assert executed_setup(recipe({"type": "full"}), SPEC, ARGS, device="cuda").loss == "fused"
    smoothed = {**ARGS, "label_smoothing_factor": 0.1}
    assert executed_setup(recipe({"type": "full"}), SPEC, smoothed, device="cuda").loss == "logits"



def test_the_runner_lets_auto_choose_deepspeed_only_where_it_runs(monkeypatch):
    """``hardware.strategy: auto`` on several GPUs may take ZeRO only with DeepSpeed installed and CUDA GPUs."""
    import importlib.util

    from finetune_helper.recommender.gpu import resolve_gpu
    from finetune_helper.train import prepare

    spec = ModelSpec.from_config(find_model("mistralai/Mistral-7B-v0.1")["config"], name="mistralai/Mistral-7B-v0.1")
    gpu = resolve_gpu("RTX 4090")
    real = importlib.util.find_spec

    def request(gpus: int, device: str, installed: bool):
        recipe = recipe_from_dict({"model": {"name": spec.name}, "method": {"type": "qlora"},
                                   "data": {"path": "x.jsonl"}, "hardware": {"gpu": "RTX 4090", "gpus": gpus}})
        monkeypatch.setattr("finetune_helper.train.setup.local_device", lambda: device)
        monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: (real("json") if installed else None)
                            if name == "deepspeed" else real(name, *a))
        return prepare._plan_request(recipe, spec, gpu, 300)

    assert request(8, "cuda", True).deepspeed
    assert "zero3" in request(8, "cuda", True).sharded_strategies
    for gpus, device, installed in ((8, "cpu", True), (8, "cuda", False), (1, "cuda", True)):
        req = request(gpus, device, installed)
        assert not req.deepspeed and not set(req.sharded_strategies) & {"zero2", "zero3"}, (gpus, device, installed)
