"""Load what a prepared run trains: the model as its setup says (dtype, attention, NF4 for QLoRA), PEFT's adapter
settings, and the ``SFTTrainer`` built from the run's arguments (step decay as a ``LambdaLR``).
"""

from __future__ import annotations

from typing import Any

from ..errors import FinetuneHelperError, first_line
from ..recommender.training_setup import TORCH_DTYPE_NAMES
from .prepare import Prepared
from .recipe import Recipe
from .setup import run_setup, shards_parameters


def load_model(prep: Prepared, sft_kwargs: dict[str, Any]):
    """The model as :func:`run_setup` says: fp32 masters for mixed-precision full fine-tuning, bf16 for pure-bf16,
    the compute dtype for a LoRA base, NF4 linears (bitsandbytes) for QLoRA."""
    import torch
    from transformers import AutoModelForCausalLM

    setup = run_setup(prep, sft_kwargs)
    kwargs: dict[str, Any] = {"dtype": getattr(torch, TORCH_DTYPE_NAMES[setup.load_dtype]),
                              "trust_remote_code": prep.recipe.model.trust_remote_code,
                              "attn_implementation": setup.attn_implementation}
    if setup.method == "qlora":
        try:
            import bitsandbytes  # noqa: F401
        except ImportError:
            raise FinetuneHelperError("method.type", "qlora needs the bitsandbytes package (pip install "
                                      "bitsandbytes); use lora or full without it") from None
        from transformers import BitsAndBytesConfig

        # bitsandbytes >= 0.45 quantizes and runs 4-bit layers on the CPU too (slowly): tiny models train there
        compute = getattr(torch, TORCH_DTYPE_NAMES[setup.dtype])
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=compute,
            # FSDP shards one dtype per unit: 4-bit weights stored in the compute dtype can be wrapped with the
            # rest (PEFT's docs, "FSDP + QLoRA" and "DeepSpeed + QLoRA" with ZeRO-3: bnb_4bit_quant_storage
            # matching the other parameters' dtype)
            **({"bnb_4bit_quant_storage": compute} if shards_parameters(sft_kwargs) else {}))
    try:
        return AutoModelForCausalLM.from_pretrained(prep.model_path, **kwargs)
    except OSError as exc:
        raise FinetuneHelperError("model.name", f"cannot load weights of {prep.model_path!r} "
                                  f"({first_line(exc)})") from None


def _peft_config(recipe: Recipe):
    if recipe.method.type == "full":
        return None
    from peft import LoraConfig

    targets = recipe.method.target_modules
    return LoraConfig(r=recipe.method.lora_r, lora_alpha=recipe.method.lora_alpha,
                      lora_dropout=recipe.method.lora_dropout, task_type="CAUSAL_LM",
                      target_modules=targets if isinstance(targets, str) else list(targets))


def build_trainer(prep: Prepared, tokenizer, sft_kwargs: dict[str, Any], callbacks: list) -> Any:
    """The run's trainer for these arguments: its model loaded as the setup says, PEFT applied, the data prepared by
    TRL's ``SFTTrainer``; for a recipe with ``trainer: transformers``, a ``transformers.Trainer`` on what the
    ``SFTTrainer`` prepared (:func:`_transformers_trainer`)."""
    from transformers import Trainer
    from transformers.trainer_callback import PrinterCallback, ProgressCallback
    from trl import SFTConfig, SFTTrainer

    args = SFTConfig(**sft_kwargs)
    model = load_model(prep, sft_kwargs)
    trl = prep.recipe.trainer == "trl"
    trainer_class = SFTTrainer if trl else Trainer
    if prep.plan.lr_scheduler_type == "step_decay" and sft_kwargs.get("lr_scheduler_type") == "constant_with_warmup":
        trainer_class = _with_lambda_schedule(trainer_class, "step_decay", prep.plan.lr_scheduler_kwargs)
    sft = (trainer_class if trl else SFTTrainer)(
        model=model, args=args, train_dataset=prep.train_dataset, eval_dataset=prep.eval_dataset,
        processing_class=tokenizer, peft_config=_peft_config(prep.recipe), callbacks=callbacks)
    trainer = sft if trl else _transformers_trainer(trainer_class, sft, callbacks)
    for printer in (PrinterCallback, ProgressCallback):  # our Progress callback prints one line per log instead
        trainer.remove_callback(printer)
    return trainer


def _transformers_trainer(trainer_class, sft, callbacks: list) -> Any:
    """``transformers.Trainer`` (``trainer_class``) on what ``sft`` (an ``SFTTrainer``) prepared: its tokenized data
    with TRL's labels (-100 outside the completion or the assistant turns), its collator, and the model with PEFT
    applied.  The loss is the model's own (``compute_loss`` without TRL's ``fused_lm_head``: the full logits, upcast
    to fp32), as in a user's own ``transformers.Trainer`` script."""
    return trainer_class(model=sft.model, args=sft.args, data_collator=sft.data_collator,
                         train_dataset=sft.train_dataset, eval_dataset=sft.eval_dataset,
                         processing_class=sft.processing_class, callbacks=callbacks)


def _with_lambda_schedule(trainer_class, scheduler: str, options: dict[str, Any]):
    """``trainer_class`` whose scheduler is a ``LambdaLR`` of :func:`recommender.schedule.lr_at`'s ``scheduler``
    (a schedule ``transformers.get_scheduler`` has no type for), over the Trainer's own step count and warmup."""
    from torch.optim.lr_scheduler import LambdaLR

    from ..recommender.schedule import lr_at

    class LambdaScheduled(trainer_class):
        def create_scheduler(self, num_training_steps: int, optimizer=None):
            if self.lr_scheduler is None:
                warmup = self.args.get_warmup_steps(num_training_steps)
                self.lr_scheduler = LambdaLR(optimizer or self.optimizer, lambda step: lr_at(
                    step, 1.0, num_training_steps, warmup, scheduler, options))
                self._created_lr_scheduler = True
            return self.lr_scheduler

    return LambdaScheduled
